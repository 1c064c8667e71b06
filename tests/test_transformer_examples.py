"""The transformer examples (specs/models/transformer_*.toml, examples/sequences.py) and
what they rest on: entries applied at every position of a sequence (codegen/model.py,
"folding": the leading position axes joined to the batch as a free view, the output
unfolded back) and the loss at every position (logits (B, T, V), integer targets (B, T)).

* the committed transformer_sort module (embedding, positional embedding, two pre-norm
  blocks of causal multi-head attention and a GELU MLP with residual adds, a final layer
  norm, dense and log_softmax, categorical NLL) against the same network run by PyTorch
  entry by entry on the unfolded arrays (tests/reference.py's oracles, which apply to
  leading axes as torch.nn's layers do): loss and every parameter gradient for one batch
  in float64; the fused step is loss_and_grads then adam; hvp against torch's double
  backward (math attention: the fused CPU kernel has no double backward);
* folding's checks: a float input has no position axes (dense after a (T, D) float input
  stays a shape mismatch), arrays read together must share their position axes, the CUDA
  twin is refused naming the reason;
* training, short: the sort transformer sorts >= 99% of held-out sequences after 500
  steps; the character model beats the character bigram's validation bits per
  character after 200 steps. The main job (scripts/main.sh) trains both in full.
"""

from __future__ import annotations

import math
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from model_check import assert_steps_follow_the_optimizer
from codegen.model import ModelSpecError, check_model, render_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import sequences  # noqa: E402


def _torch_model(spec: dict, names, params: dict, x: np.ndarray):
    """The model spec's network in PyTorch, entry by entry on the unfolded arrays (the
    oracles apply dense, layer_norm, embedding, gelu and log_softmax to leading axes)."""
    values = {"tokens": torch.tensor(x)}
    prev = None
    for i, entry in enumerate(spec["layers"]):
        op = entry["op"]
        args = [values[n] for n in entry.get("inputs", [])] or [prev]
        ps = [params[k] for k in names if k.startswith(f"{op}{i}.")]
        attrs = {k: v for k, v in entry.items() if k in ("heads", "causal")}
        prev = _MATH_ATTENTION(*args, *ps, **attrs) if op == "multi_head_attention" else ref.TORCH_ORACLE[op](*args, *ps, **attrs)
        if "name" in entry:
            values[entry["name"]] = prev
    return prev


def _MATH_ATTENTION(x, wq, wk, wv, bq, bk, bv, wo, bo, heads=2, causal=0):
    """Multi-head attention written out (softmax of masked scores), as reference.py's
    oracle computes it with F.scaled_dot_product_attention, whose CPU kernel has no
    double backward (hvp)."""
    B, L, E = x.shape

    def split(t):
        return t.reshape(B, L, heads, E // heads).transpose(1, 2)

    q, k, v = split(x @ wq + bq), split(x @ wk + bk), split(x @ wv + bv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(E // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(scores, dim=-1) @ v
    return o.transpose(1, 2).reshape(B, L, E) @ wo + bo


def _torch_loss(spec, model, params, x, y):
    out = _torch_model(spec, list(model.PARAM_SHAPES), params, x)
    return F.nll_loss(out.reshape(-1, out.shape[-1]), torch.tensor(y).reshape(-1))


@pytest.fixture(scope="module")
def sort_model():
    from generated.models import transformer_sort

    return transformer_sort


@pytest.fixture(scope="module")
def sort_spec():
    return tomllib.loads((ROOT / "specs/models/transformer_sort.toml").read_text())


def test_the_sort_transformer_matches_torch(sort_model, sort_spec, rng):
    """Loss and every parameter gradient of one batch, float64, as PyTorch's; the fused
    step equals loss_and_grads then adam; predict gives a class per position."""
    m = sort_model
    assert m.INPUTS == {"tokens": ((11,), "int64")} and m.TARGET_SHAPE == (11,) and m.OUTPUT_SHAPE == (11, 10)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in m.init(0, dtype=np.float64).items()}
    x = {"tokens": rng.integers(0, 10, size=(3, 11))}
    y = rng.integers(0, 10, size=(3, 11))
    loss, grads = m.loss_and_grads(params, x, y)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    expected = _torch_loss(sort_spec, m, tp, x["tokens"], y)
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, "loss")
    ref.assert_close(m.loss(params, x, y), expected.item(), np.float64, "loss()")
    for k in m.PARAM_SHAPES:
        ref.assert_close(grads[k], tp[k].grad.numpy(), np.float64, f"gradient of {k}")
    assert m.predict(params, x).shape == (3, 11)

    assert_steps_follow_the_optimizer(m, params, [(x, y)])
    with pytest.raises(ValueError, match=r"y must have shape \(B,\) \+ \(11,\)"):
        m.train_step(params, m.init_state(params), x, y[:, :5])


def test_the_sort_transformer_hvp_matches_torch(sort_model, sort_spec, rng):
    m = sort_model
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in m.init(1, dtype=np.float64).items()}
    x = {"tokens": rng.integers(0, 10, size=(2, 11))}
    y = rng.integers(0, 10, size=(2, 11))
    v = {k: rng.standard_normal(s) for k, s in m.PARAM_SHAPES.items()}
    got = m.hvp(params, x, y, v)
    names = list(m.PARAM_SHAPES)

    def loss(*flat):
        return _torch_loss(sort_spec, m, dict(zip(names, flat)), x["tokens"], y)

    _, expected = torch.autograd.functional.hvp(
        loss, tuple(torch.tensor(params[k]) for k in names), tuple(torch.tensor(v[k]) for k in names))
    for k, e in zip(names, expected):
        ref.assert_close(got[k], e.numpy(), np.float64, f"hvp {k}")


# --------------------------------------------------------------------------- checks

FOLD_OPS = ("adam", "add", "categorical_nll", "dense", "embedding", "layer_norm", "log_softmax", "softmax_cross_entropy")


@pytest.fixture(scope="module")
def programs():
    import derive

    return [derive.build(d) for d in derive.library_defs() if d.name in FOLD_OPS]


def _spec(tmp_path, inputs, layers, loss='"categorical_nll"'):
    path = tmp_path / "fold.toml"
    path.write_text(textwrap.dedent(f"""
        name = "fold"
        kind = "model"
        {inputs}
        layers = [{layers}]
        loss = {loss}
        optimizer = "adam"
    """))
    return path


def test_position_axes_fold_and_their_checks(programs, tmp_path):
    tokens = 'inputs = { tokens = { shape = [5], dtype = "int64" } }'
    ok = _spec(tmp_path, tokens, '{ op = "embedding", V = 7, D = 4, inputs = ["tokens"] }, '
               '{ op = "dense", out = 7 }, { op = "log_softmax" }')
    plan = check_model(ok, programs)
    assert [(layer.shape_out, layer.fold) for layer in plan["layers"]] == [((5, 4), 1), ((5, 7), 1), ((5, 7), 1)]
    assert plan["loss_fold"] == 1 and plan["target_shape"] == "(5,)"
    with pytest.raises(ModelSpecError, match=r"fold\.toml.*layers\[0\].*at every position .*has no cuda training step"):
        render_model(ok, programs, target="cuda")
    # one-hot rows at every position: the target is (T, V) per sample
    rows = _spec(tmp_path, tokens, '{ op = "embedding", V = 7, D = 4, inputs = ["tokens"] }, { op = "dense", out = 7 }',
                 '"softmax_cross_entropy"')
    assert check_model(rows, programs)["target_shape"] == "(5, 7)"
    # a float input has no position axes: dense after it is the shape mismatch it was
    floats = _spec(tmp_path, "input = [5, 4]", '{ op = "dense", out = 7 }, { op = "log_softmax" }')
    with pytest.raises(ModelSpecError, match=r"fold\.toml: layers\[0\].*shape mismatch: this op takes x \(B, I\)"):
        check_model(floats, programs)
    # arrays read together share their position axes
    two = 'inputs = { a = { shape = [5], dtype = "int64" }, b = { shape = [3], dtype = "int64" } }'
    mixed = _spec(tmp_path, two, '{ op = "embedding", V = 7, D = 4, inputs = ["a"], name = "ea" }, '
                  '{ op = "embedding", V = 7, D = 4, inputs = ["b"], name = "eb" }, { op = "add", inputs = ["ea", "eb"] }, '
                  '{ op = "dense", out = 7 }, { op = "log_softmax" }')
    with pytest.raises(ModelSpecError, match=r"layers\[2\].*shape mismatch: the op runs at every position of 'ea'.*\(5,\).*'eb' .*\(3, 4\)"):
        check_model(mixed, programs)


# ------------------------------------------------------------------------- training


@pytest.mark.slow
def test_the_sort_transformer_sorts_held_out_sequences(sort_model):
    """500 steps of 64 sequences (the example trains 5 epochs of 157): >= 99% of 2,000
    held-out digit sequences sorted (every one of the last 6 predictions right). Without
    the decay the accuracy swings by several points from step to step near the end."""
    m = sort_model
    x, y, x_test, y_test = sequences.sort_data()
    params = m.init(0)
    state = m.init_state(params)
    rng = np.random.default_rng(0)
    for step in range(500):  # Adam at 3e-3 with a cosine decay over the run, as the example
        idx = rng.integers(0, len(x), 64)
        loss = m.train_step(params, state, {"tokens": x[idx]}, y[idx], lr=0.0015 * (1 + math.cos(math.pi * step / 500)))
    assert np.isfinite(loss)
    accuracy = np.mean(sequences.sorted_correctly(m.predict(params, {"tokens": x_test}), y_test))
    assert accuracy >= 0.99, accuracy


@pytest.mark.slow
def test_the_char_transformer_beats_the_bigram():
    """200 steps of 32 windows of stdlib source: the validation bits per character are
    below the training text's character bigram."""
    from generated.models import transformer_chars as m

    x, y, x_val, y_val = sequences.char_data()
    bigram = sequences.bigram_bits(x, y, x_val, y_val)
    assert 3.0 < bigram < 3.6  # the bigram of Python source, for scale
    params = m.init(0)
    state = m.init_state(params)
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = rng.integers(0, len(x), 32)
        m.train_step(params, state, {"tokens": x[idx]}, y[idx])
    bits = m.loss(params, {"tokens": x_val}, y_val) / math.log(2)
    assert bits < bigram, (bits, bigram)
    text = sequences.sample(m, params, sequences.decode(x_val[0]), length=20)
    assert len(text) == 20 and set(text) <= set(sequences.VOCAB)
