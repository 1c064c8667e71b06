"""A generated op as a PyTorch function: ``op.torch()``.

``torch_function(op)`` registers two custom operators with ``torch.library.custom_op``,
named deterministically from the op's module, name and attributes
(``symgrad::activations_elu_<digest>`` and ``..._backward``):

- the forward, whose result autograd differentiates through the op's generated
  backward (``register_autograd``): no gradient is computed by PyTorch;
- the backward, itself a custom operator, so that ``torch.compile`` (AOTAutograd)
  traces the backward graph too.

Both have fake (meta) implementations: the forward's result shapes come from the op's
generated ``shapes`` function (its dimensions and derived dimensions, plain Python on
the arguments' shapes), the gradients are shaped like their arguments. So the function
works in ``torch.compile`` graphs (as an opaque call) and with ``torch.func``-free
tracing such as ``torch.export``.

Tensors reach the kernels without copies: a contiguous CPU tensor as a NumPy view
(``tensor.detach().numpy()``); a CUDA tensor through ``__cuda_array_interface__``
(``numba.cuda.as_cuda_array``, no synchronisation), with the kernels launched on
PyTorch's current stream. A tensor of another float type than float32/float64, or a
non-contiguous one, is converted by the op's own argument checks (a copy), as NumPy
arrays are.

What is differentiated: the arguments the spec declares differentiable
(``op.differentiable``). Integer arguments (class indices, embedding ids) and float
data the spec does not differentiate (a loss's target) get no gradient, as if
detached. Optimizers and schedules are not functions: ``torch()`` raises TypeError.
An op with nothing differentiable (``batch_norm2d_stats``) returns results that carry
no gradient.

Second derivatives: the backward operator is differentiable once more (double
backward: ``create_graph=True``, gradient penalties, Hessian-vector products) through
the op's generated ``jvp`` and ``hvp`` kernels, two more custom operators; third
derivatives are not available. Forward-mode AD (``torch.func.jvp``) is not registered.
"""

from __future__ import annotations

import numpy as np
import torch

from codegen.interop import qualified_name, reject

# qualified name -> (signature, {"op": the op it runs}, the torch function): each op and
# attribute set is registered once per process. A module built again from the same
# file and imported afresh (codegen.build) takes over the registration when its
# signature is the same: the torch function then runs the new module's kernels.
_FUNCTIONS: dict = {}


def torch_function(op):
    """The torch function of ``op`` (a generated op on any target; the function runs
    each call on the device of its tensors)."""
    reject(op, "PyTorch")
    cpu = op.on("cpu")
    name = "symgrad::" + qualified_name(cpu)
    signature = (cpu.arg_names, cpu._seeds, cpu.differentiable, "backward" in cpu._funcs)
    known = _FUNCTIONS.get(name)
    if known is None:
        current = {"op": cpu}
        known = _FUNCTIONS[name] = (signature, current, _register(current, name))
    elif known[0] != signature:
        raise RuntimeError(
            "%s: PyTorch already has %s in this process with other arguments or results (%s rebuilt "
            "with another signature?); PyTorch cannot replace a custom operator: restart the process "
            "or build the spec into another file" % (op.name, name, op.name))
    known[1]["op"] = cpu
    return known[2]


def _float_dtype(tensors) -> torch.dtype:
    """The op's float type, chosen as the generated wrappers choose it: that of the
    first float32/float64 argument, else float64."""
    for t in tensors:
        if t.dtype in (torch.float32, torch.float64):
            return t.dtype
    return torch.float64


def _schema(names, n_results: int) -> str:
    results = "Tensor" if n_results == 1 else "(%s)" % ", ".join(["Tensor"] * n_results)
    return "(%s) -> %s" % (", ".join("Tensor %s" % n for n in names), results)


def _register(current: dict, name: str):
    op = current["op"]  # the signature; each call runs current["op"]
    n_args = len(op.arg_names)
    n_results = op._seeds
    wrt = [op.arg_names.index(a) for a in op.differentiable]
    has_backward = bool(wrt) and "backward" in op._funcs
    arg_names = ["%s_" % a for a in op.arg_names]  # never a reserved schema word (self, out)
    seed_names = ["grad_%d" % k for k in range(n_results)]

    def forward_impl(*args):
        return _single(_run(current["op"], "forward", args, _float_dtype(args)))

    def forward_fake(*args):
        dtype = _float_dtype(args)
        return _single(tuple(args[0].new_empty(tuple(s), dtype=dtype) for s in current["op"].shapes(*args)))

    forward = torch.library.custom_op(name, forward_impl, mutates_args=(), schema=_schema(arg_names, n_results))
    forward.register_fake(forward_fake)

    if has_backward:
        def backward_impl(*seeds_and_args):
            return _single(_run(current["op"], "backward", seeds_and_args, _float_dtype(seeds_and_args[n_results:])))

        def backward_fake(*seeds_and_args):
            args = seeds_and_args[n_results:]
            dtype = _float_dtype(args)
            return _single(tuple(args[i].new_empty(args[i].shape, dtype=dtype) for i in wrt))

        backward = torch.library.custom_op(
            name + "_backward", backward_impl, mutates_args=(), schema=_schema(seed_names + arg_names, len(wrt)))
        backward.register_fake(backward_fake)

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        def autograd_backward(ctx, *seeds):
            args = ctx.saved_tensors
            grads = backward(*seeds, *args)
            grads = grads if isinstance(grads, tuple) else (grads,)
            out = [None] * n_args
            for i, g in zip(wrt, grads):
                out[i] = g.reshape(args[i].shape).to(args[i].dtype)  # no-ops unless a scalar or another float type
            return tuple(out)

        _register_second_order(current, name, backward, arg_names, seed_names, wrt)
    else:  # nothing differentiable: results are data to autograd
        def setup_context(ctx, inputs, output):
            pass

        def autograd_backward(ctx, *seeds):
            return (None,) * n_args

    forward.register_autograd(autograd_backward, setup_context=setup_context)

    def function(*args):
        if len(args) != n_args:
            raise TypeError("%s takes %d tensors (%s); got %d" % (op.name, n_args, ", ".join(op.arg_names), len(args)))
        return forward(*args)

    function.__name__ = op.name
    function.__qualname__ = op.name
    function.__doc__ = "%s (symgrad, registered as %s): %s\n\nArguments: %s; attributes %s." % (
        op.name, name, op.doc, ", ".join(op.arg_names), op.attrs or "none")
    function.custom_op = forward
    return function


def _register_second_order(current: dict, name: str, backward, arg_names, seed_names, wrt):
    """Autograd of the backward operator (double backward: gradient penalties, Hessian
    products) from the op's generated forward-mode and second-order kernels. The
    backward maps (seeds g, arguments x) to the gradients J(x)^T g; its vector-Jacobian
    product with cotangents v (one per gradient) is, for g, the forward-mode product
    J(x) v (``op.jvp``), and for x, the derivative of the gradients along v with g held
    fixed (``op.hvp``: the Hessian of g.f, symmetric, times v). Data arguments get none."""
    op = current["op"]
    n_args = len(op.arg_names)
    n_results = op._seeds
    tangent_names = ["t_%s" % op.arg_names[i] for i in wrt]

    def jvp_impl(*args_and_tangents):
        return _single(_run(current["op"], "jvp", args_and_tangents, _float_dtype(args_and_tangents), len(wrt)))

    def jvp_fake(*args_and_tangents):
        args = args_and_tangents[:n_args]
        dtype = _float_dtype(args)
        return _single(tuple(args[0].new_empty(tuple(s), dtype=dtype) for s in current["op"].shapes(*args)))

    def hvp_impl(*seeds_args_tangents):
        dtype = _float_dtype(seeds_args_tangents[n_results:])
        return _single(_run(current["op"], "hvp", seeds_args_tangents, dtype, len(wrt)))

    def hvp_fake(*seeds_args_tangents):
        args = seeds_args_tangents[n_results:n_results + n_args]
        dtype = _float_dtype(args)
        return _single(tuple(args[i].new_empty(args[i].shape, dtype=dtype) for i in wrt))

    jvp = torch.library.custom_op(name + "_jvp", jvp_impl, mutates_args=(), schema=_schema(arg_names + tangent_names, n_results))
    jvp.register_fake(jvp_fake)
    hvp = torch.library.custom_op(
        name + "_hvp", hvp_impl, mutates_args=(), schema=_schema(seed_names + arg_names + tangent_names, len(wrt)))
    hvp.register_fake(hvp_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_backward(ctx, *cotangents):
        saved = ctx.saved_tensors
        seeds, args = saved[:n_results], saved[n_results:]
        d_seeds = jvp(*args, *cotangents)
        d_seeds = d_seeds if isinstance(d_seeds, tuple) else (d_seeds,)
        d_args = hvp(*seeds, *args, *cotangents)
        d_args = d_args if isinstance(d_args, tuple) else (d_args,)
        out = [d.reshape(s.shape).to(s.dtype) for d, s in zip(d_seeds, seeds)] + [None] * n_args
        for i, d in zip(wrt, d_args):
            out[n_results + i] = d.reshape(args[i].shape).to(args[i].dtype)
        return tuple(out)

    backward.register_autograd(backward_backward, setup_context=setup_context)


def _single(results: tuple):
    return results[0] if len(results) == 1 else results


def _call(op, entry: str, arrays, n_tangents: int):
    """``op.<entry>(*arrays)``; the last ``n_tangents`` arrays are its ``tangents=``."""
    if n_tangents:
        return getattr(op, entry)(*arrays[:-n_tangents], tangents=tuple(arrays[-n_tangents:]))
    return getattr(op, entry)(*arrays)


def _run(op, entry: str, tensors, dtype: torch.dtype, n_tangents: int = 0) -> tuple:
    """``op.<entry>`` on the tensors' device: their data as NumPy views or CUDA arrays,
    the results as tensors on the same device."""
    device = tensors[0].device
    if device.type == "cuda":
        return _run_cuda(op.on("cuda"), entry, tensors, dtype, n_tangents)
    if device.type != "cpu":
        raise ValueError("%s: tensors on %s; symgrad runs on CPU and CUDA tensors" % (op.name, device))
    arrays = [t.detach().numpy() for t in tensors]  # views; the wrappers copy what is not C-contiguous
    results = _call(op, entry, arrays, n_tangents)
    results = results if isinstance(results, tuple) else (results,)
    return tuple(torch.from_numpy(np.asarray(r)) if np.ndim(r) else torch.tensor(float(r), dtype=dtype)
                 for r in results)


def _run_cuda(op, entry: str, tensors, dtype: torch.dtype, n_tangents: int) -> tuple:
    """The CUDA kernels on PyTorch's current stream of the tensors' device. Inputs are
    imported through ``__cuda_array_interface__`` without synchronising (the kernels
    are ordered after PyTorch's work by the stream itself); results left on the device
    are handed to PyTorch without copies. On a stream other than the default one the
    stream is synchronised once first: the argument checks that read device data
    (assumptions such as rows summing to one) copy on the default stream."""
    from numba import cuda

    device = tensors[0].device
    stream = torch.cuda.current_stream(device)
    with cuda.gpus[device.index if device.index is not None else torch.cuda.current_device()]:
        launch_stream = cuda.external_stream(stream.cuda_stream) if stream.cuda_stream else 0
        if launch_stream:
            stream.synchronize()
        arrays = [cuda.as_cuda_array(t.detach().contiguous(), sync=False) for t in tensors]
        cell = _stream_cell(op._funcs[entry])
        saved, cell[0] = cell[0], launch_stream
        try:
            results = _call(op, entry, arrays, n_tangents)
        finally:
            cell[0] = saved
    results = results if isinstance(results, tuple) else (results,)
    out = []
    for r in results:
        if hasattr(r, "__cuda_array_interface__"):
            out.append(torch.as_tensor(r, device=device))
        else:  # a scalar result, copied to the host by the wrapper
            out.append(torch.tensor(float(np.asarray(r).reshape(())), dtype=dtype, device=device))
    return tuple(out)


def _stream_cell(fn) -> list:
    """The ``_STREAM`` cell of the CUDA runtime that ``fn``'s module launches through
    (``generated/_runtime_cuda.py``, or the runtime inside a user's CUDA module)."""
    g = fn.__globals__
    if "_STREAM" in g:
        return g["_STREAM"]
    for helper in ("_launch", "_launch_gemm", "_zeros", "_result"):
        if helper in g:
            return g[helper].__globals__["_STREAM"]
    raise RuntimeError("%s: no CUDA runtime (_STREAM) found for its kernels" % fn.__qualname__)
