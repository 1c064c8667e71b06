"""Optimizers against torch.optim over 50 steps of the same random gradients, and
learning-rate schedules against torch.optim.lr_scheduler over 30 epochs."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import reference as ref

STEPS = 50
EPOCHS = 30
SHAPE = (3, 5)
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]

# symgrad optimizer -> (torch class, fixed torch keywords); hyper names as torch's,
# except Adam's betas, written beta1 and beta2.
TORCH_OPTIMIZER = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {}),
    "nesterov": (torch.optim.SGD, {"nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
}
# Documented defaults that differ from torch's: the momentum optimizers' momentum.
DEFAULT_OVERRIDES = {"momentum": {"momentum": 0.9}, "nesterov": {"momentum": 0.9}}
# Non-default values, to check that hyperparameters given to step() are in force.
OTHER_VALUES = {
    "lr": lambda v: 5 * v,
    "momentum": lambda v: 0.5,
    "beta1": lambda v: 0.8,
    "beta2": lambda v: 0.99,
    "eps": lambda v: 1e-6,
    "weight_decay": lambda v: 0.05,
    "alpha": lambda v: 0.9,
    "lr_decay": lambda v: 0.01,
    "dampening": lambda v: 0.0,
    "initial_accumulator_value": lambda v: 0.0,
}


def torch_kwargs(hyper: dict) -> dict:
    kw = {k: v for k, v in hyper.items() if k not in ("beta1", "beta2")}
    if "beta1" in hyper or "beta2" in hyper:
        kw["betas"] = (hyper["beta1"], hyper["beta2"])
    return kw


def torch_defaults(name: str) -> dict:
    cls, _ = TORCH_OPTIMIZER[name]
    params = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    beta1, beta2 = defaults.pop("betas", (None, None))
    defaults.update({"beta1": beta1, "beta2": beta2})
    defaults.update(DEFAULT_OVERRIDES.get(name, {}))
    return defaults


def run_symgrad(op, p0, grads, dtype, hyper):
    p = p0.astype(dtype).copy()
    state = op.init_state(p)
    for t, g in enumerate(grads, start=1):
        op.step(p, g.astype(dtype), *state, t=t, **hyper)
    return p, state


def run_torch(name, p0, grads, hyper):
    cls, fixed = TORCH_OPTIMIZER[name]
    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = cls([p], **torch_kwargs(hyper), **fixed)
    for g in grads:
        p.grad = torch.tensor(np.asarray(g, dtype=np.float64))
        opt.step()
    return p.detach().numpy()


def sequence(rng, dtype):
    """A start point and STEPS gradients, exactly representable in ``dtype``."""
    p0 = rng.normal(size=SHAPE).astype(dtype)
    grads = rng.normal(size=(STEPS, *SHAPE)).astype(dtype)
    return p0, grads


NAMES = sorted(TORCH_OPTIMIZER)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameter_defaults_match_torch(name):
    import generated

    op = generated.op(name)
    assert op.kind == "optimizer"
    defaults = torch_defaults(name)
    unknown = sorted(set(op.hyper) - set(defaults))
    assert not unknown, f"{name}: hyperparameters torch.optim does not have: {unknown}"
    assert "lr" in op.hyper
    for k, v in op.hyper.items():
        assert v == pytest.approx(defaults[k]), f"{name}.{k}"


@pytest.mark.parametrize("name", NAMES)
def test_init_state_is_zeros_in_state_order(name, rng):
    import generated

    op = generated.op(name)
    for dtype in (np.float32, np.float64):
        p = rng.normal(size=SHAPE).astype(dtype)
        state = op.init_state(p)
        assert isinstance(state, tuple)
        for s in state:
            assert s.shape == p.shape and s.dtype == p.dtype
            assert not np.any(s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_matches_torch_over_many_steps(name, dtype, rng):
    import generated

    op = generated.op(name)
    p0, grads = sequence(rng, dtype)
    p, _ = run_symgrad(op, p0, grads, dtype, dict(op.hyper))
    assert p.dtype == np.dtype(dtype)
    expected = run_torch(name, p0, grads, dict(op.hyper))
    assert not np.allclose(expected, p0), "the parameters moved"
    ref.assert_close(p, expected, dtype, f"{name} after {STEPS} steps")


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_given_to_step_are_in_force(name, rng):
    import generated

    op = generated.op(name)
    hyper = {k: OTHER_VALUES[k](v) if k in OTHER_VALUES else v for k, v in op.hyper.items()}
    p0, grads = sequence(rng, np.float64)
    p, _ = run_symgrad(op, p0, grads, np.float64, hyper)
    ref.assert_close(p, run_torch(name, p0, grads, hyper), np.float64, f"{name} with {hyper}")


@pytest.mark.parametrize("name", NAMES)
def test_step_updates_parameter_in_place(name, rng):
    import generated

    op = generated.op(name)
    p = rng.normal(size=SHAPE)
    before, buffer = p.copy(), p
    state = op.init_state(p)
    op.step(p, rng.normal(size=SHAPE), *state, t=1, **op.hyper)
    assert p is buffer and not np.array_equal(p, before)


# ---------------------------------------------------------------- schedules

BASE_LR = 0.1
SCHEDULES = {
    # name: (symgrad hyper, torch scheduler factory)
    "step": ({"step_size": 7, "gamma": 0.5}, lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)),
    "exponential": ({"gamma": 0.9}, lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)),
    "cosine": (
        {"T_max": 10, "eta_min": 0.001},
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.001),
    ),
}
SCHEDULE_DEFAULTS = {"step": {"gamma": 0.1}, "cosine": {"eta_min": 0.0}}


def torch_lrs(factory) -> list[float]:
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=BASE_LR)
    sched = factory(opt)
    lrs = []
    for _ in range(EPOCHS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_matches_torch(name):
    import generated

    op = generated.op(name)
    assert op.kind == "schedule"
    hyper, factory = SCHEDULES[name]
    ours = [op.lr(t, lr=BASE_LR, **hyper) for t in range(EPOCHS)]
    assert all(isinstance(v, float) for v in ours)
    np.testing.assert_allclose(ours, torch_lrs(factory), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULE_DEFAULTS))
def test_schedule_defaults(name):
    import generated

    hyper = generated.op(name).hyper
    for k, v in SCHEDULE_DEFAULTS[name].items():
        assert hyper[k] == pytest.approx(v), f"{name}.{k}"
