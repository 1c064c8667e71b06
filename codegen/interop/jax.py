"""A generated op as a JAX function: ``op.jax()``.

``jax_function(op)`` returns a function with a ``jax.custom_vjp``: its forward runs the
op's CPU forward kernels and its backward the op's generated backward, each through
``jax.pure_callback``, with the results' shapes from the op's generated ``shapes``
function (plain Python on the arguments' shapes), so it works under ``jax.jit``,
``jax.grad``, ``jax.vjp`` and ``jax.vmap`` (one callback per batch element).

The kernels run on the host: on an accelerator JAX copies the arguments to the host and
the results back. The float type follows the arguments (float64 where
``jax_enable_x64`` is on, else float32). Arrays JAX hands to a callback are read-only;
they are copied before the kernels see them (Numba compiles read-only arrays as a type
of their own).

What is differentiated: the arguments the spec declares differentiable
(``op.differentiable``); integer arguments and float data the spec does not
differentiate (a loss's target) get zero cotangents. Optimizers and schedules are not
functions: ``jax()`` raises TypeError. Forward-mode (``jax.jvp``) and second
derivatives are not available through a ``custom_vjp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from codegen.interop import qualified_name, reject

# qualified name -> (the CPU forward it runs, the jax function): one function per op and
# attribute set (so that jax.jit's cache keeps it), made again for a rebuilt module
_FUNCTIONS: dict = {}


def jax_function(op):
    """The JAX function of ``op`` (its CPU kernels, whatever target ``op`` is bound to)."""
    reject(op, "JAX")
    cpu = op.on("cpu")
    name = qualified_name(cpu)
    known = _FUNCTIONS.get(name)
    if known is None or known[0] is not cpu._funcs["forward"]:
        known = _FUNCTIONS[name] = (cpu._funcs["forward"], _build(cpu))
    return known[1]


def _float_dtype(args):
    """The op's float type as the generated wrappers choose it (that of the first
    float32/float64 argument, else float64), within what JAX allows (float32 without x64)."""
    for a in args:
        if jnp.dtype(a.dtype) in (jnp.float32, jnp.float64):
            return jnp.dtype(a.dtype)
    return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


def _host(a):
    a = np.asarray(a)
    return a if a.flags.writeable else a.copy()


def _build(op):
    n_args = len(op.arg_names)
    n_results = op._seeds
    wrt = [op.arg_names.index(a) for a in op.differentiable]
    has_backward = bool(wrt) and "backward" in op._funcs

    def call(entry, dtype, arrays, shapes):
        """``op.<entry>`` on the host, its results as arrays of ``dtype``."""
        def host(*arrays):
            results = getattr(op, entry)(*[_host(a) for a in arrays])
            results = results if isinstance(results, tuple) else (results,)
            return tuple(np.asarray(r, dtype=dtype).reshape(s) for r, s in zip(results, shapes))

        structs = tuple(jax.ShapeDtypeStruct(s, dtype) for s in shapes)
        return jax.pure_callback(host, structs, *arrays, vmap_method="sequential")

    def forward(*args):
        shapes = tuple(tuple(s) for s in op.shapes(*args))
        results = call("forward", _float_dtype(args), args, shapes)
        return results[0] if n_results == 1 else results

    @jax.custom_vjp
    def function(*args):
        return forward(*args)

    def function_fwd(*args):
        return forward(*args), args

    def function_bwd(args, cotangents):
        cotangents = cotangents if n_results > 1 else (cotangents,)
        out = [None] * n_args  # no cotangent: integer and data arguments
        if has_backward:
            dtype = _float_dtype(args)
            shapes = tuple(tuple(args[i].shape) for i in wrt)
            grads = call("backward", dtype, (*cotangents, *args), shapes)
            for i, g in zip(wrt, grads):
                out[i] = g.astype(args[i].dtype)
        return tuple(out)

    function.defvjp(function_fwd, function_bwd)

    def wrapper(*args):
        if len(args) != n_args:
            raise TypeError("%s takes %d arrays (%s); got %d" % (op.name, n_args, ", ".join(op.arg_names), len(args)))
        return function(*args)

    wrapper.__name__ = wrapper.__qualname__ = op.name
    wrapper.__doc__ = "%s (symgrad, JAX custom_vjp): %s\n\nArguments: %s; attributes %s." % (
        op.name, op.doc, ", ".join(op.arg_names), op.attrs or "none")
    wrapper.op = op
    return wrapper
