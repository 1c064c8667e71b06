"""Training with generated modules: the model module of ``specs/models/mlp_digits.toml``
computes PyTorch's loss and gradients, its fused ``train_step`` is loss-and-gradients
followed by the optimizer, and the examples (examples/trainer.py's EXAMPLES) reach
their stated results on real data: the digits MLP and CNN, a breast-cancer classifier,
and a linear regression on diabetes that matches closed-form least squares."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from model_check import assert_steps_follow_the_optimizer

REPO = Path(__file__).resolve().parent.parent
MLP_DIGITS = REPO / "specs" / "models" / "mlp_digits.toml"
TARGET_ACCURACY = 0.96
CNN_DIGITS_ACCURACY = 0.98
BREAST_CANCER_ACCURACY = 0.95
LEAST_SQUARES_MSE_RATIO = 1.05  # the linear model's test MSE over least squares'


@pytest.fixture(scope="module")
def trainer():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import trainer as module
    finally:
        sys.path.remove(str(REPO / "examples"))
    return module


@pytest.fixture(scope="module")
def mlp():
    from generated.models import mlp_digits

    return mlp_digits


def batch(rng, n=7):
    x = rng.normal(size=(n, 64))
    y = np.eye(10)[rng.integers(0, 10, size=n)]
    return x, y


def torch_mlp_loss(params: dict, keys: list[str], x, y):
    """dense(64->128) -> relu -> dense(128->10) -> softmax cross-entropy, in torch."""
    w1, b1, w2, b2 = (params[k] for k in keys)
    h = F.relu(torch.tensor(x) @ w1 + b1) @ w2 + b2
    return F.cross_entropy(h, torch.tensor(y))


def test_model_loss_and_grads_match_torch(mlp, rng):
    params = mlp.init(0, dtype=np.float64)
    keys = list(mlp.PARAM_SHAPES)
    assert [params[k].shape for k in keys] == [(64, 128), (128,), (128, 10), (10,)]
    x, y = batch(rng)
    loss, grads = mlp.loss_and_grads(params, x, y)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    expected = torch_mlp_loss(tparams, keys, x, y)
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, "loss")
    assert sorted(grads) == sorted(keys)
    for k in keys:
        ref.assert_close(grads[k], tparams[k].grad.numpy(), np.float64, f"gradient of {k}")


def test_train_step_is_loss_and_grads_then_optimizer_step(mlp, rng):
    assert_steps_follow_the_optimizer(mlp, mlp.init(1, dtype=np.float64), [batch(rng) for _ in range(3)])


def test_train_step_keeps_float32(mlp, rng):
    params = mlp.init(0, dtype=np.float32)
    state = mlp.init_state(params)
    x, y = (a.astype(np.float32) for a in batch(rng))
    loss = mlp.train_step(params, state, x, y)
    assert np.asarray(loss).dtype == np.float32
    assert all(v.dtype == np.float32 for v in params.values())


@pytest.mark.slow
def test_digits_mlp_reaches_stated_accuracy(trainer, tmp_path):
    config = trainer.Config(
        spec=str(MLP_DIGITS), out=str(tmp_path / "run"), epochs=15, batch_size=32, seed=0, progress=False, plot=False
    )
    result = trainer.train(config, log=lambda *a: None)
    assert result["test_accuracy"] >= TARGET_ACCURACY, result["history"][-1]


@pytest.mark.slow
def test_resumed_training_continues_exactly(trainer, tmp_path):
    def config(out, epochs, resume=False):
        return trainer.Config(
            spec=str(MLP_DIGITS), out=str(out), epochs=epochs, batch_size=64, seed=3, resume=resume, progress=False, plot=False
        )

    straight = trainer.train(config(tmp_path / "a", 3), log=lambda *a: None)
    trainer.train(config(tmp_path / "b", 2), log=lambda *a: None)
    resumed = trainer.train(config(tmp_path / "b", 3, resume=True), log=lambda *a: None)
    for k, v in straight["params"].items():
        np.testing.assert_array_equal(resumed["params"][k], v, err_msg=k)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def train_example(trainer, name, tmp_path, **overrides):
    """Train an example with its own settings (as ``examples/train.py --model NAME``)."""
    example = trainer.EXAMPLES[name]
    settings = dict(dataset=example.dataset, epochs=example.epochs, batch_size=example.batch_size, seed=0)
    settings.update(overrides)
    config = trainer.Config(spec=str(example.spec), out=str(tmp_path / name), progress=False, plot=False, **settings)
    return trainer.train(config, log=lambda *a: None)


def test_digits_become_images_for_a_model_of_images(trainer):
    from generated.models import cnn_digits

    data = trainer.fit_to_model(trainer.load_dataset("digits"), cnn_digits)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.y_train.shape[1:] == (10,)
    flat = trainer.load_dataset("digits")
    np.testing.assert_array_equal(data.x_test[:, 0].reshape(len(data.x_test), 64), flat.x_test)


def test_two_classes_become_zero_one_targets_for_a_binary_model(trainer):
    from generated.models import logreg_breast_cancer

    data = trainer.fit_to_model(trainer.load_dataset("breast_cancer"), logreg_breast_cancer)
    assert data.y_train.shape[1:] == (1,)
    np.testing.assert_array_equal(data.y_train[:, 0], data.labels_train)


def test_a_model_of_another_sample_shape_is_refused(trainer):
    from generated.models import cnn_digits

    with pytest.raises(trainer.TrainError, match=r"samples of shape \(1, 8, 8\) \(64 numbers\).*\(30 numbers\)"):
        trainer.fit_to_model(trainer.load_dataset("breast_cancer"), cnn_digits)


@pytest.mark.slow
def test_digits_cnn_reaches_stated_accuracy(trainer, tmp_path):
    result = train_example(trainer, "cnn_digits", tmp_path)
    assert result["test_accuracy"] >= CNN_DIGITS_ACCURACY, result["history"][-1]


@pytest.mark.slow
def test_breast_cancer_classifier_reaches_stated_accuracy(trainer, tmp_path):
    result = train_example(trainer, "logreg_breast_cancer", tmp_path)
    assert result["test_accuracy"] >= BREAST_CANCER_ACCURACY, result["history"][-1]


@pytest.mark.slow
def test_linear_regression_matches_least_squares(trainer, tmp_path):
    result = train_example(trainer, "linear_diabetes", tmp_path)
    ratio = result["test_mse"] / result["least_squares"]["test_mse"]
    assert 1 / LEAST_SQUARES_MSE_RATIO <= ratio <= LEAST_SQUARES_MSE_RATIO, (result["test_mse"], result["least_squares"])


def test_least_squares_is_the_closed_form_fit(trainer):
    from sklearn.linear_model import LinearRegression

    data = trainer.load_dataset("diabetes", dtype=np.float64)
    fit = LinearRegression().fit(data.x_train, data.y_train)
    expected = np.mean((fit.predict(data.x_test) - data.y_test) ** 2)
    assert trainer.least_squares(data)["test_mse"] == pytest.approx(expected, rel=1e-9)


def test_train_cli_trains_an_example_by_name(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import train
    finally:
        sys.path.remove(str(REPO / "examples"))
    out = tmp_path / "run"
    status = train.main(["--model", "logreg_breast_cancer", "--epochs", "2", "--out", str(out), "--no-progress", "--no-plot"])
    assert status == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (out / "checkpoint.npz").exists() and (out / "metrics.json").exists()
