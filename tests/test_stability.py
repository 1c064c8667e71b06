"""Numerical stability: inputs of magnitude 1e3 (both signs) in float32 and float64 give
finite outputs and finite gradients for every activation, layer and loss, equal to PyTorch's
float64 results wherever those are finite."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

MAGNITUDE = 1e3
CASES = ref.op_cases(oracle_only=True)  # activations, row-wise ops, dense, losses
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def make_op(case):
    import generated

    return generated.op(case.name, **case.kw)


def extreme_args(case, rng, dtype):
    args = ref.extreme_inputs(case.name, rng, MAGNITUDE, case.kw)
    assert args is not None, f"no extreme-input recipe for {case.name}: add one to reference.extreme_inputs"
    return ref.cast(args, dtype)


def compare_where_torch_finite(ours, expected, dtype, what, terms=1):
    ours = np.asarray(ours, dtype=np.float64)
    assert np.all(np.isfinite(ours)), f"{what}: not finite: {ours}"
    finite = np.isfinite(expected)
    ref.assert_close(ours[finite], expected[finite], dtype, what, ref.extreme_tol(dtype, MAGNITUDE * terms))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_is_finite_and_correct_at_extremes(case, dtype, rng):
    op = make_op(case)
    args = extreme_args(case, rng, dtype)
    outs = ref.run_forward(op, args)
    expected = ref.as_tuple(ref.torch_forward(case.name, args, case.kw))
    assert len(outs) == len(expected)
    for out, e in zip(outs, expected):
        compare_where_torch_finite(out, e, dtype, f"{case.id} forward at |x|={MAGNITUDE:g}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backward_is_finite_and_correct_at_extremes(case, dtype, rng):
    op = make_op(case)
    args = extreme_args(case, rng, dtype)
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, dtype)
    wrt = ref.differentiable_indices(op)
    grads = ref.run_backward(op, seeds, args)
    expected = ref.torch_vjp(case.name, args, case.kw, seeds, wrt)
    for name, g, e in zip(op.differentiable, grads, expected):
        compare_where_torch_finite(g, e, dtype, f"{case.id}: gradient of {name} at |x|={MAGNITUDE:g}",
                                   ref.EXTREME_TERMS.get(case.name, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+1e3", "-1e3"])
@pytest.mark.parametrize("name", ref.ELEMENTWISE)
def test_activation_uniform_extreme_input(name, sign, dtype):
    """A whole array at +1e3 or -1e3 (no mixing that could hide a reduction's overflow)."""
    import generated

    op = generated.op(name)
    x = np.full((2, 3), sign * MAGNITUDE, dtype=dtype)
    y = op.forward(x)
    g = op.backward(np.ones_like(x), x)
    compare_where_torch_finite(y, ref.torch_forward(name, [x], {}), dtype, f"{name}({sign * MAGNITUDE:g})")
    compare_where_torch_finite(g, ref.torch_vjp(name, [x], {}, np.ones_like(x), [0])[0], dtype, f"{name}'({sign * MAGNITUDE:g})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_rows_with_huge_spread(name, dtype):
    import generated

    op = generated.op(name)
    x = np.array([[MAGNITUDE, -MAGNITUDE, 0.0], [MAGNITUDE, MAGNITUDE, MAGNITUDE], [-MAGNITUDE, -MAGNITUDE, -MAGNITUDE + 1]], dtype=dtype)
    gy = np.array([[1.0, -2.0, 0.5], [0.3, 0.2, -0.1], [1.0, 1.0, 1.0]], dtype=dtype)
    compare_where_torch_finite(op.forward(x), ref.torch_forward(name, [x], {}), dtype, f"{name} forward")
    compare_where_torch_finite(op.backward(gy, x), ref.torch_vjp(name, [x], {}, gy, [0])[0], dtype, f"{name} backward")


# Infinities and NaNs keep their IEEE meaning in the kernels (the CPU kernels are
# compiled with fastmath, but without nnan and ninf: codegen/template_util.py NJIT).


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_inputs_keep_their_ieee_meaning(dtype):
    import generated

    inf = dtype(np.inf)
    x = np.array([[-inf, 0.0, 1.0, inf]], dtype)
    np.testing.assert_array_equal(generated.op("relu").forward(x), [[0.0, 0.0, 1.0, inf]])
    np.testing.assert_array_equal(generated.op("sigmoid").forward(x)[0, [0, 3]], [0.0, 1.0])
    # a masked logit (-inf) gets probability 0; the others share all of it
    logits = np.array([[-inf, 0.0, np.log(3.0)]], dtype)
    np.testing.assert_allclose(generated.op("softmax").forward(logits), [[0.0, 0.25, 0.75]], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["mse", "softmax_cross_entropy", "bce_with_logits"])
def test_a_nan_input_gives_a_nan_loss(name, dtype):
    """What the training loop's NaN check relies on: NaN is never optimised away."""
    import generated

    pred = np.zeros((2, 3), dtype)
    pred[1, 2] = np.nan
    target = np.full((2, 3), 1 / 3, dtype)
    assert np.isnan(generated.op(name).forward(pred, target))
    assert np.isnan(generated.op(name).backward(1.0, pred, target)).any()
