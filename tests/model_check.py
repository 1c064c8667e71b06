"""Checks that the model tests share: a fused training step against its parts, and a
model's Hessian-vector product against central differences of its gradient."""

from __future__ import annotations

import numpy as np

import reference as ref


def assert_steps_follow_the_optimizer(model, params: dict, batches) -> None:
    """The fused ``train_step`` on each ``(x, y)`` of ``batches`` (float64) equals
    ``loss_and_grads`` on a copy of the parameters followed by the step of the model's
    library optimizer: the loss and every parameter, step after step (the step's arrays
    are kept while the batch shape stays and replaced when it changes). ``params`` is
    updated in place, as ``train_step`` updates it."""
    import generated

    manual = {k: v.copy() for k, v in params.items()}
    state = model.init_state(params)
    optimizer = generated.op(model.OPTIMIZER)
    slots = {k: optimizer.init_state(v) for k, v in manual.items()}
    hyper = {**optimizer.hyper, **model.HYPER}
    for t, (x, y) in enumerate(batches, start=1):
        loss_manual, grads = model.loss_and_grads(manual, x, y)
        for k in manual:
            optimizer.step(manual[k], grads[k], *slots[k], t=t, **hyper)
        ref.assert_close(model.train_step(params, state, x, y), loss_manual, np.float64, f"loss at step {t}")
        for k in params:
            ref.assert_close(params[k], manual[k], np.float64, f"{k} after step {t}")


def assert_hvp_matches_gradient_differences(model, params: dict, x, y, v: dict, h: float = 1e-5,
                                            tol: ref.Tol = ref.Tol(rtol=1e-6, atol=1e-8)) -> None:
    """``model.hvp(params, x, y, v)`` equals the central difference of the gradient along
    ``v``, (grad(params + h v) - grad(params - h v)) / 2h, for every parameter."""
    hv = model.hvp(params, x, y, v)
    plus = model.loss_and_grads({k: p + h * v[k] for k, p in params.items()}, x, y)[1]
    minus = model.loss_and_grads({k: p - h * v[k] for k, p in params.items()}, x, y)[1]
    for k in params:
        ref.assert_close(hv[k], (plus[k] - minus[k]) / (2 * h), np.float64, f"Hv for {k}", tol)
