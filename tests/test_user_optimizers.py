"""Optimizers written as a user's TOML specs (tests/specs/{nadam,radam,lion}.toml):
update lines may name temporaries (local values of the step, not state) and an
optimizer may keep per-step scalar state (``scalar_state = { mu_prod = 1.0 }``: one
number per parameter array, updated once per step). NAdam and RAdam are checked
against torch.optim over many steps on the CPU and on CUDA (the simulator unless a GPU
is lent), in float32 and float64, with the helpers of tests/test_optimizers.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref
from test_optimizers import OTHER_VALUES, SHAPE, STEPS, run_symgrad, sequence, torch_kwargs

from conftest import SPECS
from derive.errors import SpecError

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
TORCH = {"nadam": torch.optim.NAdam, "radam": torch.optim.RAdam}


def run_torch(name, p0, grads, hyper):
    """torch.optim in float64 throughout: NAdam keeps its mu_product (and both keep the
    step) in the default float type, float32 unless float64 is the default."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p = torch.tensor(np.asarray(p0, dtype=np.float64), requires_grad=True)
        opt = TORCH[name]([p], **torch_kwargs(hyper))
        for g in grads:
            p.grad = torch.tensor(np.asarray(g, dtype=np.float64))
            opt.step()
        assert all(v.dtype == torch.float64 for s in opt.state.values() for v in s.values())
    finally:
        torch.set_default_dtype(default)
    return p.detach().numpy()


@pytest.fixture
def spec_op(build_spec, target):
    return lambda name: build_spec(SPECS / f"{name}.toml").op(target=target)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(TORCH))
def test_matches_torch_over_many_steps(spec_op, name, dtype, rng):
    op = spec_op(name)
    p0, grads = sequence(rng, dtype)
    p, state = run_symgrad(op, p0, grads, dtype, dict(op.hyper))
    assert p.dtype == np.dtype(dtype)
    expected = run_torch(name, p0, grads, dict(op.hyper))
    assert not np.allclose(expected, p0, atol=1e-3), "the parameters moved"
    ref.assert_close(p, expected, dtype, f"{name} ({op.target}) after {STEPS} steps")


@pytest.mark.parametrize("name", sorted(TORCH))
def test_hyperparameters_given_to_step_are_in_force(build_spec, name, rng):
    op = build_spec(SPECS / f"{name}.toml").op()
    hyper = {k: OTHER_VALUES[k](v) if k in OTHER_VALUES else v for k, v in op.hyper.items()}
    if "momentum_decay" in hyper:
        hyper["momentum_decay"] = 0.01
    p0, grads = sequence(rng, np.float64)
    p, _ = run_symgrad(op, p0, grads, np.float64, hyper)
    ref.assert_close(p, run_torch(name, p0, grads, hyper), np.float64, f"{name} with {hyper}")


def test_scalar_state_is_one_number_updated_once_per_step(spec_op, rng):
    """mu_prod after k steps is the product of the k momentum coefficients: a kernel that
    updated it once per element (15 of them) would raise each factor to the 15th power."""
    op = spec_op("nadam")
    assert list(op.state_names) == ["m", "v", "mu_prod"]
    for dtype in (np.float32, np.float64):
        p = rng.normal(size=SHAPE).astype(dtype)
        m, v, mu_prod = op.init_state(p)
        assert m.shape == v.shape == p.shape and m.dtype == v.dtype == p.dtype and not m.any() and not v.any()
        assert mu_prod.shape == (1,) and mu_prod.dtype == p.dtype and mu_prod[0] == 1.0
        beta1, psi, expected = op.hyper["beta1"], op.hyper["momentum_decay"], 1.0
        for t in range(1, 4):
            op.step(p, rng.normal(size=SHAPE).astype(dtype), m, v, mu_prod, t=t)
            expected *= beta1 * (1 - 0.5 * 0.96 ** (t * psi))
            np.testing.assert_allclose(mu_prod[0], expected, rtol=1e-6)


def test_scalar_state_may_be_a_0d_array_and_must_hold_one_element(build_spec, rng):
    op = build_spec(SPECS / "nadam.toml").op()
    p = rng.normal(size=SHAPE)
    m, v, _ = op.init_state(p)
    mu_prod = np.array(1.0)
    op.step(p, rng.normal(size=SHAPE), m, v, mu_prod, t=1)
    assert mu_prod.shape == () and mu_prod != 1.0
    with pytest.raises(ValueError, match="'mu_prod' is per-step scalar state and must hold one element"):
        op.step(p, rng.normal(size=SHAPE), m, v, np.ones(SHAPE), t=2)


def lion_reference(p, m, grads, lr, beta1, beta2, weight_decay):
    for g in grads:
        c = beta1 * m + (1 - beta1) * g
        p = p - lr * (np.sign(c) + weight_decay * p)
        m = beta2 * m + (1 - beta2) * g
    return p, m


def test_temporaries_are_locals_of_the_step_not_state(spec_op, rng):
    op = spec_op("lion")
    assert list(op.state_names) == ["m"]
    hyper = dict(op.hyper, lr=0.01, weight_decay=0.1)
    p0, grads = sequence(rng, np.float64)
    p, (m,) = run_symgrad(op, p0, grads, np.float64, hyper)
    p_ref, m_ref = lion_reference(p0, np.zeros_like(p0), grads, **hyper)
    ref.assert_close(p, p_ref, np.float64, "lion")
    ref.assert_close(m, m_ref, np.float64, "lion's m")


def test_a_temporary_read_in_the_loop_allocates_no_array(build_spec):
    import inspect

    module = build_spec(SPECS / "lion.toml")
    source = inspect.getsource(module)
    assert "_v_c = " in source  # a local of the kernel's loop
    assert "c = np." not in source and "c = _empty" not in source
    # RAdam's rho_t is computed once per step (in a kernel without loops), not per element
    radam = inspect.getsource(build_spec(SPECS / "radam.toml"))
    (kernel,) = [k for k in radam.split("\n\n\n") if "_v_rho_t = " in k]
    assert kernel.count("_v_rho_t = ") == 1 and "for n in range" not in kernel


# ---------------------------------------------------------------- bad specs


def _build(tmp_path, text):
    import codegen

    path = tmp_path / "opt.toml"
    path.write_text(text)
    return codegen.build(str(path), str(tmp_path / "out"))


BAD = [
    ('state = ["m"]\nupdate = ["mm = 0.9*m + g", "p = p - 0.1*m"]', "`mm` is assigned but no later line reads it"),
    ('state = ["m"]\nupdate = ["p = p - 0.1*g"]', "state `m` is declared but no update line assigns it"),
    ('scalar_state = { s = 1.0 }\nupdate = ["s = s*g", "p = p - s"]', "scalar state `s` is updated once per step, but this line reads per-element values (g)"),
    ('state = ["s"]\nscalar_state = { s = 1.0 }\nupdate = ["s = s", "p = p - s"]', "`s` is in both `state` and `scalar_state`"),
    ('scalar_state = { s = "one" }\nupdate = ["p = p - g"]', "`scalar_state.s` must be a number"),
    ('update = ["g = 2*g", "p = p - g"]', "the gradient `g` cannot be assigned"),
    ('hyper = { lr = 0.1 }\nupdate = ["lr = 2*lr", "p = p - lr*g"]', "`lr` is a hyperparameter"),
    ('update = ["p[n] = p - g"]', "an update line assigns a plain name"),
    ('update = ["p = p - c*g", "c = 2"]', "unknown name `c`"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_optimizer_specs_name_the_problem(tmp_path, body, message):
    with pytest.raises(SpecError) as info:
        _build(tmp_path, f'name = "opt"\nkind = "optimizer"\n{body}\n')
    assert message in str(info.value)
    assert "opt.toml" in str(info.value)
