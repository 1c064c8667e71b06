"""Every differentiable op of the generated library (activations, layers, losses), on
the CPU target: forward and backward against PyTorch, backward against finite
differences, float32 against float64, dtypes kept.

The op list comes from ``generated.ops()``, so a new op is tested as soon as it is
generated; an op without a torch oracle still gets the finite-difference checks.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

CASES = ref.op_cases()
ORACLE_CASES = ref.op_cases(oracle_only=True)
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def make_op(case: ref.OpCase, target: str = "cpu"):
    import generated

    return generated.op(case.name, target=target, **case.kw)


# ---------------------------------------------------------------- the library itself


def test_library_lists_every_documented_op():
    import generated

    names = generated.ops()
    assert list(names) == sorted(names)
    missing = sorted(set(ref.DOCUMENTED_KINDS) - set(names))
    assert not missing, f"documented ops missing from generated.ops(): {missing}"


@pytest.mark.parametrize("name", sorted(ref.DOCUMENTED_KINDS))
def test_op_has_documented_kind(name):
    import generated

    op = generated.op(name)
    assert op.name == name
    documented = ref.DOCUMENTED_KINDS[name]
    assert op.kind in (documented if isinstance(documented, tuple) else (documented,))


@pytest.mark.parametrize("name", sorted(ref.DOCUMENTED_ATTRS))
def test_attribute_defaults(name):
    import generated

    assert generated.op(name).attrs == pytest.approx(ref.DOCUMENTED_ATTRS[name])


@pytest.mark.parametrize("name", sorted(ref.DOCUMENTED_ATTRS))
def test_attributes_given_at_run_time_are_in_force(name):
    import generated

    for variant in ref.ATTR_VARIANTS[name]:
        assert generated.op(name, **variant).attrs == pytest.approx({**ref.DOCUMENTED_ATTRS[name], **variant})


@pytest.mark.parametrize("case", CASES)
def test_differentiable_arguments(case):
    op = make_op(case)
    expected = ref.DOCUMENTED_DIFFERENTIABLE.get(case.name)
    if expected is None and op.kind in ("activation", "layer"):
        expected = tuple(op.arg_names)  # activations and layers differentiate everything
    if expected is None:  # an undocumented loss: at least its first argument
        assert op.differentiable and op.differentiable[0] == op.arg_names[0]
    else:
        assert tuple(op.differentiable) == expected


@pytest.mark.parametrize("case", CASES)
def test_latex_derivation_is_available(case):
    text = make_op(case).latex()
    assert isinstance(text, str) and "\\" in text, "latex() should return the LaTeX derivation"


# ---------------------------------------------------------------- against PyTorch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_forward_matches_torch(case, dtype, rng):
    op = make_op(case)
    args = ref.make_inputs(case.name, rng, dtype, case.kw)
    outs = ref.run_forward(op, args)
    expected = ref.as_tuple(ref.torch_forward(case.name, args, case.kw))
    assert len(outs) == len(expected)
    for out, e in zip(outs, expected):
        assert np.shape(out) == e.shape
        ref.assert_close(out, e, dtype, f"{case.id} forward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_backward_matches_torch_autograd(case, dtype, rng):
    op = make_op(case)
    args = ref.make_inputs(case.name, rng, dtype, case.kw)
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, dtype)
    wrt = ref.differentiable_indices(op)
    grads = ref.run_backward(op, seeds, args)
    expected = ref.torch_vjp(case.name, args, case.kw, seeds, wrt)
    assert len(grads) == len(wrt)
    for name, g, e in zip(op.differentiable, grads, expected):
        assert np.shape(g) == e.shape, f"gradient of {name}"
        ref.assert_close(g, e, dtype, f"{case.id}: gradient of {name}")


# ---------------------------------------------------------------- finite differences


@pytest.mark.parametrize("case", CASES)
def test_backward_matches_finite_differences(case, rng):
    op = make_op(case)
    args = ref.make_inputs(case.name, rng, np.float64, case.kw)
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, np.float64)
    wrt = ref.differentiable_indices(op)
    grads = ref.run_backward(op, seeds, args)
    numeric = ref.numerical_vjp(op.forward, args, seeds, wrt)
    assert len(grads) == len(wrt)
    for name, g, e in zip(op.differentiable, grads, numeric):
        ref.assert_close(g, e, np.float64, f"{case.id}: gradient of {name}", ref.FD_TOL)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("case", CASES)
def test_float32_forward_close_to_float64(case, rng):
    op = make_op(case)
    args32 = ref.make_inputs(case.name, rng, np.float32, case.kw)
    args64 = ref.cast(args32, np.float64)
    for o32, o64 in zip(ref.run_forward(op, args32), ref.run_forward(op, args64)):
        ref.assert_close(o32, o64, np.float32, f"{case.id} forward")


@pytest.mark.parametrize("case", CASES)
def test_float32_backward_close_to_float64(case, rng):
    op = make_op(case)
    args32 = ref.make_inputs(case.name, rng, np.float32, case.kw)
    args64 = ref.cast(args32, np.float64)
    seeds32 = ref.make_seeds(ref.run_forward(op, args32), rng, np.float32)
    seeds64 = [s if isinstance(s, float) else s.astype(np.float64) for s in seeds32]
    g32 = ref.run_backward(op, seeds32, args32)
    g64 = ref.run_backward(op, seeds64, args64)
    for name, a, b in zip(op.differentiable, g32, g64):
        ref.assert_close(a, b, np.float32, f"{case.id}: gradient of {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_keeps_input_dtype(case, dtype, rng):
    op = make_op(case)
    args = ref.make_inputs(case.name, rng, dtype, case.kw)
    for out in ref.run_forward(op, args):
        assert isinstance(out, (np.ndarray, np.generic)), type(out)
        assert out.dtype == np.dtype(dtype)
        if op.kind == "loss":
            assert np.ndim(out) == 0, "a loss is a NumPy scalar"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_gradients_keep_input_dtype_and_shape(case, dtype, rng):
    op = make_op(case)
    args = ref.make_inputs(case.name, rng, dtype, case.kw)
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, dtype)
    grads = ref.run_backward(op, seeds, args)
    for i, g in zip(ref.differentiable_indices(op), grads):
        assert isinstance(g, np.ndarray)
        assert g.dtype == np.dtype(dtype), op.arg_names[i]
        assert g.shape == args[i].shape, op.arg_names[i]


@pytest.mark.parametrize("case", CASES)
def test_arguments_are_not_modified(case, rng):
    op = make_op(case)
    args = ref.make_inputs(case.name, rng, np.float64, case.kw)
    before = [a.copy() for a in args]
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, np.float64)
    seeds_before = [np.copy(s) for s in seeds]
    ref.run_backward(op, seeds, args)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)
    for s, b in zip(seeds, seeds_before):
        np.testing.assert_array_equal(s, b)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)], ids=["1d", "3d"])
@pytest.mark.parametrize("name", ref.ELEMENTWISE)
def test_elementwise_activation_takes_any_shape(name, shape, rng):
    import generated

    op = generated.op(name)
    x = rng.normal(size=shape)
    y = op.forward(x)
    ref.assert_close(y, ref.torch_forward(name, [x], {}), np.float64, f"{name} forward {shape}")
    gy = rng.normal(size=shape)
    gx = op.backward(gy, x)
    ref.assert_close(gx, ref.torch_vjp(name, [x], {}, gy, [0])[0], np.float64, f"{name} backward {shape}")


def test_dense_uses_weight_of_shape_inputs_by_outputs(rng):
    import generated

    x, w, b = rng.normal(size=(2, 3)), rng.normal(size=(3, 7)), rng.normal(size=(7,))
    y = generated.op("dense").forward(x, w, b)
    assert y.shape == (2, 7)
    ref.assert_close(y, x @ w + b, np.float64)
