"""The compiled cores the fused model steps call besides the public forward and backward.

* ``_<op>_bwd_params_core``: the gradients of the parameters only (the first trained
  layer of a network needs no gradient for its input);
* ``_<op>_fwd_saving_core`` / ``_<op>_bwd_saved_core`` (and ``_bwd_params_saved``): the
  forward also returns what the backward reads of its reductions (softmax's
  log-sum-exp, max-pooling's argmax, a norm's statistics), and the backward takes those
  instead of recomputing the reductions;
* ``_<op>_<entry>_alloc`` / ``_<op>_<entry>_into``: every core with results is the two in
  turn, so that a fused step allocates its arrays once per batch shape and then writes
  into them every step: writing into arrays that hold an earlier step's values (or
  garbage) must give the same results.

Each must give what the public entry points give, for every library op that has it,
in float64 and float32. The public forward and backward are checked against PyTorch
and finite differences elsewhere (test_ops.py, test_layers.py).
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import pytest

import reference as ref
from codegen.emit import alloc_name, backward_variants, core_name, into_name, op_module, saved_for_backward

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


@functools.lru_cache(maxsize=None)
def _programs() -> dict:
    import derive

    return {p.name: p for p in derive.library()}


def _names(has) -> list[str]:
    return sorted(name for name, p in _programs().items() if p.kind not in ("optimizer", "schedule") and has(p))


SAVING = _names(lambda p: any(saved_for_backward(p)))
PARAMS_ONLY = _names(lambda p: bool(backward_variants(p)))
DIFFERENTIABLE = _names(lambda p: bool(p.grads))


def _core(name: str, entry: str, kind=core_name):
    program = _programs()[name]
    module = importlib.import_module("generated." + op_module(program))
    return getattr(module, kind(name, entry))


def _case(name: str, dtype, rng):
    """The op, its inputs, output seeds (one-element arrays for a scalar output, as
    the cores take them) and attribute values in core order."""
    program = _programs()[name]
    op = __import__("generated").op(name)
    args = ref.make_inputs(name, rng, dtype)
    outputs = ref.run_forward(op, args)
    seeds = ref.make_seeds(outputs, rng, dtype)
    core_seeds = [np.full(1, s, dtype) if np.ndim(s) == 0 else s for s in seeds]
    attrs = [dtype(v) if isinstance(v, float) else v for _, v in program.attrs]
    return op, args, outputs, seeds, core_seeds, attrs


def _assert_same(actual, expected, dtype, what):
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert len(actual) == len(expected), what
    for n, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(np.asarray(a).reshape(np.shape(e)), e, rtol=tol, atol=tol, err_msg=f"{what} [{n}]")


def test_the_library_has_ops_that_keep_their_reductions():
    # the mechanism must not quietly select nothing
    assert {"softmax_cross_entropy", "log_softmax", "softmax", "layer_norm", "max_pool2d"} <= set(SAVING)


def test_activations_keep_nothing():
    # elementwise values are cheaper to recompute than to store and load again
    assert not [name for name in SAVING if _programs()[name].elementwise]


def test_softmax_cross_entropy_keeps_its_log_sum_exp():
    # the maximum and the shifted sum: the gradient's softmax is exp(logits - max) / sum
    assert saved_for_backward(_programs()["softmax_cross_entropy"]) == ([], ["loss_max0", "loss_sumexp0"])


def test_softmax_hands_its_output_to_the_backward_and_has_no_second_forward():
    # the output is kept by whoever called the forward: the plain forward serves
    assert saved_for_backward(_programs()["softmax"]) == (["y"], [])
    module = importlib.import_module("generated.layers.softmax")
    assert hasattr(module, core_name("softmax", "bwd_saved"))
    assert not hasattr(module, core_name("softmax", "fwd_saving"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SAVING)
def test_forward_saving_core_returns_the_forward(name, dtype, rng):
    kept = saved_for_backward(_programs()[name])[1]
    entry = "fwd_saving" if kept else "fwd"  # keeping only outputs, the plain forward serves
    op, args, outputs, _, _, attrs = _case(name, dtype, rng)
    got = ref.as_tuple(_core(name, entry)(*args, *attrs))
    assert len(got) == len(outputs) + len(kept)
    _assert_same(got[: len(outputs)], outputs, dtype, f"{name} fwd_saving outputs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SAVING)
def test_backward_from_the_saved_reductions_is_the_backward(name, dtype, rng):
    program = _programs()[name]
    op, args, outputs, seeds, core_seeds, attrs = _case(name, dtype, rng)
    given_outputs, kept = saved_for_backward(program)
    got = ref.as_tuple(_core(name, "fwd_saving" if kept else "fwd")(*args, *attrs))
    out_names = [d.name for d in program.outputs]
    values = dict(zip(out_names + kept, got))
    given = [values[n] for n in given_outputs + kept]
    expected = ref.run_backward(op, seeds, args)
    grads = ref.as_tuple(_core(name, "bwd_saved")(*core_seeds, *args, *given, *attrs))
    _assert_same(grads, expected, dtype, f"{name} bwd_saved")
    for suffix, names in backward_variants(program):
        which = [[d.name for d in program.grads].index(n) for n in names]
        part = ref.as_tuple(_core(name, f"bwd_{suffix}_saved")(*core_seeds, *args, *given, *attrs))
        _assert_same(part, [expected[i] for i in which], dtype, f"{name} bwd_{suffix}_saved")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", PARAMS_ONLY)
def test_params_only_backward_is_part_of_the_backward(name, dtype, rng):
    program = _programs()[name]
    op, args, _, seeds, core_seeds, attrs = _case(name, dtype, rng)
    expected = ref.run_backward(op, seeds, args)
    for suffix, names in backward_variants(program):
        which = [[d.name for d in program.grads].index(n) for n in names]
        part = ref.as_tuple(_core(name, f"bwd_{suffix}")(*core_seeds, *args, *attrs))
        _assert_same(part, [expected[i] for i in which], dtype, f"{name} bwd_{suffix}")


def _spoiled(arrays):
    """Fresh result arrays from ``_alloc``, filled with what a stale step might leave."""
    for a in arrays:
        a.fill(-7 if a.dtype.kind == "i" else np.nan)
    return arrays


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_writing_into_used_arrays_gives_the_cores_results(name, dtype, rng):
    program = _programs()[name]
    op, args, outputs, seeds, core_seeds, attrs = _case(name, dtype, rng)
    for entry, inputs in (("fwd", [*args, *attrs]), ("bwd", [*core_seeds, *args, *attrs])):
        expected = ref.as_tuple(_core(name, entry)(*inputs))
        arrays = _spoiled(list(ref.as_tuple(_core(name, entry, alloc_name)(*inputs))))
        assert [a.shape for a in arrays] == [np.shape(e) for e in expected]
        for _ in range(2):  # into NaN-filled arrays, then into its own earlier results
            _core(name, entry, into_name)(*inputs, *arrays)
            _assert_same(arrays, expected, dtype, f"{name} {entry} into")
