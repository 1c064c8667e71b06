"""``op.jax()`` (issue 15): every generated op as a JAX function with a custom_vjp.

For every op with gradients (and its attribute variants): the jitted forward equals
``op.forward``, and the jitted vector-Jacobian product equals central finite
differences of the forward (float64). Also: ``jax.grad`` of a composed function,
``vmap``, float32 without x64, integer arguments, refusals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import FD_TOL, as_tuple, make_inputs, make_seeds, numerical_vjp, op_cases

import generated


@pytest.fixture(autouse=True)
def x64():
    """float64 in JAX for the length of each test (JAX's default is float32)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("case", op_cases())
def test_vjp_against_finite_differences(case, rng):
    op = generated.op(case.name, **case.kw)
    f = op.jax()
    args = make_inputs(case.name, rng, np.float64, case.kw)
    expected = as_tuple(op.forward(*args))
    out, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(*args)
    for o, e in zip(as_tuple(out), expected):
        assert o.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(o), e)
    seeds = make_seeds(expected, rng, np.float64)
    cotangents = tuple(jnp.asarray(s) for s in seeds)
    grads = jax.jit(vjp)(cotangents if len(seeds) > 1 else cotangents[0])
    wrt = [op.arg_names.index(a) for a in op.differentiable]
    numeric = numerical_vjp(op.forward, args, seeds, wrt)
    for i, n in zip(wrt, numeric):
        np.testing.assert_allclose(np.asarray(grads[i]), n, rtol=FD_TOL.rtol, atol=FD_TOL.atol,
                                   err_msg="%s: gradient of %s" % (case.id, op.arg_names[i]))
    for i in set(range(len(args))) - set(wrt):  # data: a zero cotangent; integers: float0
        if np.issubdtype(args[i].dtype, np.integer):
            assert grads[i].dtype == jax.dtypes.float0
        else:
            assert not np.any(np.asarray(grads[i]))


def test_grad_through_a_composed_function(rng):
    """jax.grad of a small network (JAX's own ops around symgrad's), against finite
    differences of the same function evaluated in NumPy."""
    dense, gelu, ce = (generated.op(n).jax() for n in ("dense", "gelu", "softmax_cross_entropy"))
    x, w, b = make_inputs("dense", rng)
    target = np.eye(w.shape[1])[rng.integers(0, w.shape[1], size=x.shape[0])]

    def loss(w, b):
        return ce(gelu(dense(x, w, b)) * 2.0, target)

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, b)
    ops = [generated.op(n) for n in ("dense", "gelu", "softmax_cross_entropy")]
    numeric = numerical_vjp(lambda w, b: ops[2].forward(ops[1].forward(ops[0].forward(x, w, b)) * 2.0, target),
                            [w, b], [1.0], [0, 1])
    for a, n in zip(g, numeric):
        np.testing.assert_allclose(np.asarray(a), n, rtol=FD_TOL.rtol, atol=FD_TOL.atol)


def test_vmap_and_float32(rng):
    f = generated.op("softplus").jax()
    x = rng.normal(size=(3, 4, 5))
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), generated.op("softplus").forward(x))
    jax.config.update("jax_enable_x64", False)
    g = jax.grad(lambda x: f(x).sum())(jnp.asarray(x, jnp.float32))
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), 1.0 / (1.0 + np.exp(-x)), rtol=1e-5)


def test_integer_arguments(rng):
    lp, idx = make_inputs("categorical_nll", rng)
    value, grad = jax.value_and_grad(generated.op("categorical_nll").jax())(lp, idx)
    expected = np.zeros_like(lp)
    expected[np.arange(len(idx)), idx] = -1.0 / len(idx)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-12)
    assert float(value) == pytest.approx(-lp[np.arange(len(idx)), idx].mean(), rel=1e-12)


@pytest.mark.parametrize("name", ["adamw", "step"])
def test_optimizers_and_schedules_are_not_jax_functions(name):
    with pytest.raises(TypeError, match=name + " is an? (optimizer|learning-rate schedule)"):
        generated.op(name).jax()
