"""`assume`: a fact about the data that a derivation uses is checked when the op runs.

softmax_cross_entropy derives its textbook gradient (softmax(x) - target)/B from
`sum(target[b, c], c) == 1`. A target row that breaks it (an all-zero, masked row) must
not silently get the gradient of another loss: its backward (CPU, CUDA, the fused model
step) raises an error naming the op and the assumption, while rows that satisfy it up to
rounding (float32 softmax outputs, label smoothing) pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref

MESSAGE = r"softmax_cross_entropy: its gradient is derived from the assumption sum\(target\[b, c\], c\) == 1"


def _rows(rng, B=5, C=4, dtype=np.float64):
    return rng.normal(size=(B, C)).astype(dtype), ref.prob_rows(rng, (B, C)).astype(dtype)


@pytest.mark.parametrize("target_", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_masked_row_is_an_error_not_a_wrong_gradient(target_, rng):
    import generated

    op = generated.op("softmax_cross_entropy", target=target_)
    x, t = _rows(rng)
    t[2] = 0.0  # a masked row
    # the loss itself is right for any target: only the derivation used the fact
    np.testing.assert_allclose(op.forward(x, t), F.cross_entropy(torch.tensor(x), torch.tensor(t)).item(), rtol=1e-12)
    with pytest.raises(ValueError, match=MESSAGE + r".*'target' at b = 2: the sum is 0.0"):
        op.backward(1.0, x, t)


@pytest.mark.cuda
def test_device_arrays_are_checked_too(rng):
    import generated
    from numba import cuda

    op = generated.op("softmax_cross_entropy", target="cuda")
    x, t = _rows(rng)
    g = op.backward(1.0, cuda.to_device(x), cuda.to_device(t))
    np.testing.assert_allclose(g.copy_to_host(), generated.op("softmax_cross_entropy").backward(1.0, x, t), rtol=1e-12)
    t[0] = 0.0
    with pytest.raises(ValueError, match=MESSAGE + r".*at b = 0"):
        op.backward(1.0, cuda.to_device(x), cuda.to_device(t))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_summing_to_one_up_to_rounding_pass(dtype, rng):
    import generated

    op = generated.op("softmax_cross_entropy")
    x = rng.normal(size=(64, 1000)).astype(dtype)
    z = rng.normal(size=(64, 1000)).astype(dtype)
    soft = torch.softmax(torch.tensor(z), dim=1).numpy()  # PyTorch's own rounding in the dtype
    smooth = (0.9 * np.eye(1000)[rng.integers(0, 1000, 64)] + 0.1 / 1000).astype(dtype)  # label smoothing
    for t in (soft, smooth):
        g = op.backward(1.0, x, t)
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        F.cross_entropy(xt, torch.tensor(t.astype(np.float64))).backward()
        np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-3 if dtype == np.float32 else 1e-9, atol=1e-9)


def test_a_row_off_by_more_than_the_tolerance_fails(rng):
    import generated

    op = generated.op("softmax_cross_entropy")
    x, t = _rows(rng, dtype=np.float32)
    t[0] *= 1.001  # 1e-3 off: beyond float32's sqrt(eps) = 3.5e-4
    with pytest.raises(ValueError, match=MESSAGE):
        op.backward(1.0, x, t)


def test_fused_train_step_checks_its_targets(rng):
    from generated.models import mlp_digits as m

    params = m.init(0, dtype=np.float64)
    state = m.init_state(params)
    x = rng.normal(size=(8, m.INPUT))
    y = np.eye(m.OUTPUT)[rng.integers(0, m.OUTPUT, 8)]
    m.train_step(params, state, x, y)
    y[3] = 0.0
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: its gradient is derived from .*'y' at b = 3"):
        m.train_step(params, state, x, y)
    for k in params:  # nothing was updated
        np.testing.assert_array_equal(params[k], before[k])


SPEC = """
name = "masked_ce"
kind = "loss"
task = "classification"
inputs = { logits = "B C", target = "B C" }
differentiate = ["logits"]
outputs = { loss = "" }
assume = ["sum(target[b,c], c) == 1"]
equations = [
  "lse[b] = log(sum(exp(logits[b,c]), c))",
  "loss = -sum(target[b,c] * (logits[b,c] - lse[b]), b, c) / B",
]
"""


def test_a_user_spec_with_assume_is_checked(tmp_path, rng):
    import codegen

    path = tmp_path / "masked_ce.toml"
    path.write_text(SPEC)
    mod = codegen.build(str(path), str(tmp_path / "out"))
    op = mod.op()
    x, t = _rows(rng)
    g = op.backward(1.0, x, t)
    xt = torch.tensor(x, requires_grad=True)
    F.cross_entropy(xt, torch.tensor(t)).backward()
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    t[4] = 0.0
    with pytest.raises(ValueError, match=r"masked_ce: its gradient is derived from the assumption "
                                         r"sum\(target\[b,c\], c\) == 1 \(.*masked_ce.toml\)"):
        op.backward(1.0, x, t)


@pytest.mark.parametrize(
    "assume, problem",
    [
        ('"sum(logits[b,c], c) == 1"', "`logits` is differentiated"),
        ('"sum(target[b,c] * 2, c) == 1"', "not one tensor read"),
        ('"sum(target[b,c], c) == B"', "is not a number"),
        ('"max(target[b,c], c) == 1"', "not a sum"),
    ],
)
def test_an_assumption_the_code_cannot_check_is_refused(tmp_path, assume, problem):
    import codegen
    from derive.errors import SpecError

    path = tmp_path / "bad.toml"
    path.write_text(SPEC.replace('"sum(target[b,c], c) == 1"', assume).replace('"masked_ce"', '"bad"'))
    with pytest.raises(SpecError, match=problem) as info:
        codegen.build(str(path), str(tmp_path / "out"))
    assert "bad.toml" in str(info.value) and "an assumption must read" in str(info.value)


def test_readme_documents_assume():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "assume" in text and "sum(target[b, c], c) == 1" in text
