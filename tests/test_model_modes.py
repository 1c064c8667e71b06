"""Train and eval modes in model specs (codegen/model.py ``_layer_modes``, docs/models.md):
dropout draws its mask from the model's seed and step counter, batch norm trains on batch
statistics and updates running statistics held in the state, and ``forward`` runs in
eval mode (no dropout, batch norm on the running statistics).

One tiny model (batch norm, dense, dropout: docs/models.md's example), float64, against the same network in
PyTorch with the same masks (regenerated from the generator's NumPy twin,
tests/reference.py): the loss and every gradient of one batch, several fused training
steps (parameters and running statistics), the eval-mode forward, and a checkpoint and
resume that draws the same masks.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from codegen.model import ModelSpecError, render_model

REPO = Path(__file__).resolve().parent.parent
OPS = ("batch_norm2d", "batch_norm2d_eval", "batch_norm2d_stats", "dense", "dropout", "flatten", "sgd",
       "softmax_cross_entropy", "tanh")
P, MOMENTUM, LR, SEED = 0.3, 0.2, 0.1, 7


def _doc_spec() -> str:
    """The example of docs/models.md's "Train and eval modes", as written there."""
    text = (REPO / "docs" / "models.md").read_text()
    spec = next(m for m in re.findall(r"```toml\n(.*?)```", text, re.S) if 'name = "bn_dropout"' in m)
    for setting in (f"momentum = {MOMENTUM}", f"p = {P} }}", f"lr = {LR} }}"):  # what the PyTorch twin uses
        assert setting in spec, setting
    return spec


SPEC = _doc_spec()
DROPOUT_LAYER = 4  # its stream: the seed's high word


@pytest.fixture(scope="module")
def programs():
    import derive

    return [derive.build(d) for d in derive.library_defs() if d.name in OPS]


@pytest.fixture(scope="module")
def model(programs, tmp_path_factory):
    import codegen

    out = tmp_path_factory.mktemp("modes")
    path = out / "bn_dropout.toml"
    path.write_text(SPEC)
    rel, text = render_model(path, programs)
    target = out / rel.split("/")[-1]
    target.write_text(text)
    return codegen.load_module(target)


def _batch(rng, n=5):
    x = rng.normal(size=(n, 2, 3, 3)) * 1.5 + 0.3
    y = np.eye(3)[rng.integers(0, 3, size=n)]
    return x, y


def _mask(step, seed=SEED, shape=(5, 6)):
    return ref.dropout_keep(shape, P, seed + (DROPOUT_LAYER << 32), step)


def _torch_loss(params, x, y, step, running=None):
    """The network in PyTorch, training mode with the model's mask at ``step``; updates
    ``running`` (torch tensors) in place as nn.BatchNorm2d does."""
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    rm, rv = running if running is not None else (None, None)
    h = F.batch_norm(torch.tensor(x), rm, rv, t["batch_norm2d0.weight"], t["batch_norm2d0.bias"], training=True,
                     momentum=MOMENTUM, eps=1e-5)
    h = torch.tanh(torch.flatten(h, 1) @ t["dense2.weight"] + t["dense2.bias"])
    h = h * torch.tensor(_mask(step, shape=tuple(h.shape))) / (1 - P)
    logits = h @ t["dense5.weight"] + t["dense5.bias"]
    loss = F.cross_entropy(logits, torch.tensor(y))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in t.items()}


def _init(model):
    params = model.init(0, np.float64)
    # a scale and shift away from 1 and 0, so that the batch norm's affine part is checked
    rng = np.random.default_rng(1)
    params["batch_norm2d0.weight"] += rng.normal(size=2) * 0.3
    params["batch_norm2d0.bias"] += rng.normal(size=2) * 0.3
    return params


def test_loss_and_grads_match_pytorch_with_the_same_mask(model):
    rng = np.random.default_rng(0)
    params = _init(model)
    state = model.init_state(params, seed=SEED)
    x, y = _batch(rng)
    loss, grads = model.loss_and_grads(params, x, y, state)  # draws at the next step: t + 1 = 1
    expected_loss, expected = _torch_loss(params, x, y, step=1)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for key in params:
        ref.assert_close(grads[key], expected[key], np.float64, key)
    # another step draws another mask, so other gradients
    state["t"] = 1
    _, later = model.loss_and_grads(params, x, y, state)
    assert not np.allclose(later["dense2.weight"], grads["dense2.weight"])
    ref.assert_close(later["dense2.weight"], _torch_loss(params, x, y, step=2)[1]["dense2.weight"], np.float64)


def test_train_steps_and_running_statistics_match_pytorch(model):
    rng = np.random.default_rng(2)
    params = _init(model)
    expected = {k: v.copy() for k, v in params.items()}
    state = model.init_state(params, seed=SEED)
    running = (torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    for step in range(1, 4):
        x, y = _batch(rng)
        loss = model.train_step(params, state, x, y)
        expected_loss, grads = _torch_loss(expected, x, y, step, running)
        assert loss == pytest.approx(expected_loss, rel=1e-12)
        for key in expected:
            expected[key] = expected[key] - LR * grads[key]
    assert state["t"] == 3
    for key in params:
        ref.assert_close(params[key], expected[key], np.float64, key)
    ref.assert_close(state["batch_norm2d0.running_mean"], running[0].numpy(), np.float64, "running mean")
    ref.assert_close(state["batch_norm2d0.running_var"], running[1].numpy(), np.float64, "running var")

    # eval mode: batch norm on the running statistics, no dropout
    x, y = _batch(rng)
    h = F.batch_norm(torch.tensor(x), running[0], running[1], torch.tensor(params["batch_norm2d0.weight"]),
                     torch.tensor(params["batch_norm2d0.bias"]), training=False, eps=1e-5)
    h = torch.tanh(torch.flatten(h, 1) @ torch.tensor(params["dense2.weight"]) + torch.tensor(params["dense2.bias"]))
    logits = (h @ torch.tensor(params["dense5.weight"]) + torch.tensor(params["dense5.bias"])).numpy()
    ref.assert_close(model.forward(params, x, state), logits, np.float64, "eval forward")
    np.testing.assert_array_equal(model.predict(params, x, state), np.argmax(logits, axis=1))
    assert model.loss(params, x, y, state) == pytest.approx(F.cross_entropy(torch.tensor(logits), torch.tensor(y)).item(), rel=1e-12)
    with pytest.raises(ValueError, match="running statistics .* pass state="):
        model.forward(params, x)

    # examples/trainer.py evaluates in eval mode, with the state
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import trainer
    finally:
        sys.path.remove(str(REPO / "examples"))
    labels = np.argmax(y, axis=1)
    metrics = trainer.evaluate(model, params, x, y, labels, state)
    assert metrics["test_loss"] == pytest.approx(model.loss(params, x, y, state), rel=1e-12)
    assert metrics["test_accuracy"] == np.mean(np.argmax(logits, axis=1) == labels)


def _checkpoint(state, path):
    """The state through an .npz file, as examples/trainer.py saves and loads it."""
    np.savez(path, **{k: np.asarray(v) for k, v in state.items()})
    with np.load(path) as z:
        return {k: z[k].item() if z[k].ndim == 0 else z[k].copy() for k in z.files}


def test_resuming_from_a_checkpoint_draws_the_same_masks(model, tmp_path):
    rng = np.random.default_rng(3)
    batches = [_batch(rng) for _ in range(4)]
    straight = _init(model)
    state = model.init_state(straight, seed=SEED)
    for x, y in batches:
        model.train_step(straight, state, x, y)
    resumed = _init(model)
    state = model.init_state(resumed, seed=SEED)
    for x, y in batches[:2]:
        model.train_step(resumed, state, x, y)
    params = {k: v.copy() for k, v in resumed.items()}
    state = _checkpoint(state, tmp_path / "state.npz")
    for x, y in batches[2:]:
        model.train_step(params, state, x, y)
    for key in straight:
        np.testing.assert_array_equal(params[key], straight[key], key)
    # another seed draws other masks
    other = _init(model)
    state = model.init_state(other, seed=SEED + 1)
    for x, y in batches:
        model.train_step(other, state, x, y)
    assert not np.allclose(other["dense2.weight"], straight["dense2.weight"])


def test_the_cuda_twin_is_refused_naming_the_reason(programs, tmp_path):
    path = tmp_path / "bn_dropout.toml"
    path.write_text(SPEC)
    with pytest.raises(ModelSpecError, match=r"layers\[0\] \(op 'batch_norm2d'\): train and eval modes .* on the CPU"):
        render_model(path, programs, target="cuda")


def test_a_layer_does_not_take_the_models_seed(programs, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(SPEC.replace(f"p = {P} }}", f"p = {P}, seed = 3 }}"))
    with pytest.raises(ModelSpecError, match=r"bad.toml.*layers\[4\].*attribute 'seed' is the model's"):
        render_model(path, programs)
