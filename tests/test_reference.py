"""The references check themselves: the finite-difference checker agrees with torch
autograd on every oracle, so a failure elsewhere is symgrad's, not the helpers'."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

CASES = [(n, {}) for n in sorted(ref.TORCH_ORACLE)] + [
    (n, attrs) for n, variants in sorted(ref.ATTR_VARIANTS.items()) for attrs in variants
]


@pytest.mark.parametrize("name, attrs", CASES, ids=[n + "".join(f"-{k}={v}" for k, v in a.items()) for n, a in CASES])
def test_finite_differences_agree_with_torch_autograd(name, attrs, rng):
    args = ref.make_inputs(name, rng, attrs=attrs)
    outs = ref.as_tuple(ref.torch_forward(name, args, attrs))  # lstm_cell has two
    seeds = ref.make_seeds(outs, rng, np.float64)
    wrt = ref.oracle_wrt(name)
    numeric = ref.numerical_vjp(lambda *a: ref.torch_forward(name, a, attrs), args, seeds, wrt)
    for g, e in zip(numeric, ref.torch_vjp(name, args, attrs, seeds, wrt)):
        ref.assert_close(g, e, np.float64, name, ref.FD_TOL)


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "nll", "kl_div"])
def test_probability_targets_are_valid(name, rng):
    args = ref.make_inputs(name, rng)
    target = np.exp(args[1]) if name == "kl_div" else args[1]
    assert np.all(target > 0)
    np.testing.assert_allclose(target.sum(axis=-1), 1.0)


@pytest.mark.parametrize("name", sorted(set(ref.TORCH_ORACLE) - set(ref.LAYER_ORACLE)))
def test_extreme_inputs_reach_the_magnitude(name, rng):
    args = ref.extreme_inputs(name, rng, 1e3)
    assert np.max(np.abs(args[0])) >= 1e3 - 1e-9
    assert all(np.all(np.isfinite(a)) for a in args)
