"""Learning-rate schedules as closed forms in the epoch counter t (torch.optim.lr_scheduler)."""

import sympy

from ..dsl import scalar, schedule

lr, gamma, step_size, T_max, eta_min = (scalar(n) for n in "lr gamma step_size T_max eta_min".split())
t = sympy.Symbol("t", integer=True, nonnegative=True)

OPS = [
    schedule("step", {"lr": 0.1, "step_size": 30, "gamma": 0.1}, lr * gamma ** sympy.floor(t / step_size),
             doc="StepLR: decay by gamma every step_size epochs."),
    schedule("exponential", {"lr": 0.1, "gamma": 0.9}, lr * gamma**t, doc="ExponentialLR."),
    schedule("cosine", {"lr": 0.1, "T_max": 50, "eta_min": 0.0},
             eta_min + (lr - eta_min) * (1 + sympy.cos(sympy.pi * t / T_max)) / 2, doc="CosineAnnealingLR (closed form)."),
]
