"""Likelihood losses as PyTorch defines them (issue 14), and ``stop_gradient``, the
construct gaussian_nll's clamp is written with.

The library's own tests (tests/test_ops.py, tests/test_second_order.py) check the new
losses like every op, with their attribute variants. Here: what those inputs do not
reach (a variance below the clamp, integer class indices at extreme log-probabilities)
and ``stop_gradient`` in a user's spec, against ``torch.Tensor.detach``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from spec_check import TextSpec, build


def test_gaussian_nll_clamps_the_variance_without_blocking_its_gradient(rng):
    """PyTorch clamps var at eps under no_grad: the loss sees eps, the gradient still
    reaches var (a plain Max would give it 0 there)."""
    import generated

    op = generated.op("gaussian_nll", eps=1e-3)
    pred, target = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    var = rng.uniform(0.5, 2.0, size=(3, 4))
    var[0, :2] = [1e-5, 0.0]  # below the clamp, and zero
    got_loss = op.forward(pred, target, var)
    gp, gv = op.backward(1.0, pred, target, var)
    tp, tv = (torch.tensor(a, requires_grad=True) for a in (pred, var))
    loss = F.gaussian_nll_loss(tp, torch.tensor(target), tv, eps=1e-3)
    loss.backward()
    ref.assert_close(got_loss, loss.item(), np.float64, "gaussian_nll forward with var < eps")
    ref.assert_close(gp, tp.grad.numpy(), np.float64, "gaussian_nll gradient of pred with var < eps")
    ref.assert_close(gv, tv.grad.numpy(), np.float64, "gaussian_nll gradient of var with var < eps")
    assert np.all(gv[0, :2] != 0), "the clamp passes the gradient through"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_categorical_nll_at_extreme_log_probabilities(dtype, rng):
    import generated

    op = generated.op("categorical_nll")
    logprobs = -1e3 * rng.uniform(size=(4, 5))
    idx = np.array([0, 0, 3, 4])
    got = op.forward(logprobs.astype(dtype), idx)
    (grad,) = ref.as_tuple(op.backward(1.0, logprobs.astype(dtype), idx))
    t = torch.tensor(logprobs, requires_grad=True)
    want = F.nll_loss(t, torch.tensor(idx))
    want.backward()
    ref.assert_close(got, want.item(), dtype, "categorical_nll forward", ref.extreme_tol(dtype, 1e3))
    ref.assert_close(grad, t.grad.numpy(), dtype, "categorical_nll gradient (repeated indices add up)")


STRAIGHT_THROUGH = TextSpec(
    """name = "st_floor"
kind = "layer"
inputs = { x = "N" }
outputs = { y = "N" }
equations = ["y[n] = x[n] + stop_gradient(floor(x[n]) - x[n]) + stop_gradient(x[n]) * x[n]"]
""",
    sizes={"N": 6},
)


def test_stop_gradient_is_detach(tmp_path, rng):
    """Value as written, derivative as if the marked part were a constant, in reverse
    and forward mode, on the CPU and CUDA: the straight-through estimator."""
    _, module = build(STRAIGHT_THROUGH, tmp_path)
    x = 3 * rng.normal(size=6)
    gy, tx = rng.normal(size=6), rng.normal(size=6)
    tx_ = torch.tensor(x, requires_grad=True)
    y = tx_ + (torch.floor(tx_) - tx_).detach() + tx_.detach() * tx_
    (want_g,) = torch.autograd.grad(y, tx_, torch.tensor(gy))
    for target in ("cpu", "cuda"):
        op = module.op(target=target)
        ref.assert_close(op.forward(x), np.floor(x) + x * x, np.float64, f"stop_gradient forward ({target})")
        ref.assert_close(op.backward(gy, x), want_g.numpy(), np.float64, f"stop_gradient backward ({target})")
        ref.assert_close(op.jvp(x, tangents=(tx,)), (1 + x) * tx, np.float64, f"stop_gradient jvp ({target})")
    assert r"\operatorname{sg}" in module.op().latex()


def test_stop_gradient_in_an_optimizer_update_is_its_value(tmp_path):
    """An update is not differentiated: the marker is the identity there (a fuzz
    campaign found it left in the kernel, which no printer prints)."""
    spec = TextSpec(
        """name = "sg_step"
kind = "optimizer"
state = ["m"]
scalar_state = { sc = 1.0 }
hyper = { lr = 0.01 }
update = ["sc = sc * 0.5", "c2 = stop_gradient(sc)", "m = 0.9 * m + (1 - 0.9) * g", "p = p - lr * (m + c2)"]
""")
    _, module = build(spec, tmp_path)
    for target in ("cpu", "cuda"):
        op = module.op(target=target)
        p, g = np.ones(3), np.full(3, 2.0)
        state = op.init_state(p)
        op.step(p, g, *state, t=1)
        ref.assert_close(p, 1 - 0.01 * (0.2 + 0.5), np.float64, f"stop_gradient in an update ({target})")
