"""Models' Hessian-vector products and dense Hessians (issue 14): forward over reverse
through the layers' derived jvp, backward and hvp (codegen/templates/model/model.py.jinja).

Every generated model without a recurrent cell is checked against central differences
of its own ``loss_and_grads`` along ``v`` (float64; the step is small enough that no
ReLU or max-pool kink is crossed with these seeded inputs), the MLP against the same
network in PyTorch, and the logistic regression's dense Hessian against
``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref

MODELS = ["cnn_digits", "gcn_karate", "linear_diabetes", "logreg_breast_cancer", "mlp_bench", "mlp_digits",
          "resnet_digits", "transformer_chars", "transformer_sort"]
# the batch is the graph's nodes where an input is a graph's adjacency (one row per node)
BATCH = {"gcn_karate": 34}


def model(name):
    return importlib.import_module("generated.models." + name)


def batch(m, rng, n=5):
    n = BATCH.get(m.NAME, n)
    if hasattr(m, "INPUTS"):  # named inputs: token ids (small, valid for any table) and float data
        x = {k: rng.integers(0, 2, size=(n,) + shape) if dtype == "int64" else rng.normal(size=(n,) + shape)
             for k, (shape, dtype) in m.INPUTS.items()}
    else:
        x = rng.normal(size=(n,) + m.INPUT_SHAPE)
    if hasattr(m, "TARGET_SHAPE"):  # a class per position
        return x, rng.integers(0, m.OUTPUT_SHAPE[-1], size=(n,) + m.TARGET_SHAPE)
    if m.TASK == "classification":
        y = np.eye(m.OUTPUT)[rng.integers(0, m.OUTPUT, n)]
    elif m.TASK == "binary":
        y = rng.integers(0, 2, size=(n,) + m.OUTPUT_SHAPE).astype(np.float64)
    else:
        y = rng.normal(size=(n,) + m.OUTPUT_SHAPE)
    return x, y


def test_every_model_without_a_cell_is_covered():
    import generated.models as models

    names = {n for n in models.MODELS if not model(n).__doc__.count("unrolled cell")}
    assert names <= set(MODELS), sorted(names - set(MODELS))


@pytest.mark.parametrize("name", MODELS)
def test_hvp_matches_central_differences_of_the_gradient(name, rng):
    m = model(name)
    params = m.init(0, np.float64)
    x, y = batch(m, rng)
    v = {k: rng.normal(size=s) for k, s in m.PARAM_SHAPES.items()}
    got = m.hvp(params, x, y, v)
    assert list(got) == list(m.PARAM_SHAPES)
    h = 1e-7
    up = m.loss_and_grads({k: params[k] + h * v[k] for k in params}, x, y)[1]
    down = m.loss_and_grads({k: params[k] - h * v[k] for k in params}, x, y)[1]
    for key in params:
        assert got[key].shape == params[key].shape and got[key].dtype == np.float64
        ref.assert_close(got[key], (up[key] - down[key]) / (2 * h), np.float64, f"{name}: (H v)[{key}]",
                         ref.Tol(rtol=1e-5, atol=1e-6))


def test_mlp_hvp_matches_pytorch(rng):
    m = model("mlp_digits")
    params = m.init(0, np.float64)
    x, y = batch(m, rng)
    v = {k: rng.normal(size=s) for k, s in m.PARAM_SHAPES.items()}
    got = m.hvp(params, x, y, v)
    P = {k: torch.tensor(a, requires_grad=True) for k, a in params.items()}
    hidden = torch.relu(torch.tensor(x) @ P["dense0.weight"] + P["dense0.bias"])
    loss = F.cross_entropy(hidden @ P["dense2.weight"] + P["dense2.bias"], torch.tensor(y))
    grads = torch.autograd.grad(loss, list(P.values()), create_graph=True)
    dot = sum((g * torch.tensor(v[k])).sum() for g, k in zip(grads, P))
    for key, want in zip(P, torch.autograd.grad(dot, list(P.values()))):
        ref.assert_close(got[key], want.numpy(), np.float64, f"mlp_digits: (H v)[{key}] vs torch")


def test_logistic_regression_hessian_matches_pytorch(rng):
    m = model("logreg_breast_cancer")
    params = m.init(0, np.float64)
    x, y = batch(m, rng, 7)
    H = m.hessian(params, x, y)
    (wkey, wshape), (bkey, bshape) = m.PARAM_SHAPES.items()
    n = int(np.prod(wshape))

    def loss(flat):
        logits = torch.tensor(x) @ flat[:n].reshape(wshape) + flat[n:].reshape(bshape)
        return F.binary_cross_entropy_with_logits(logits, torch.tensor(y))

    flat = torch.tensor(np.concatenate([params[wkey].ravel(), params[bkey].ravel()]))
    want = torch.autograd.functional.hessian(loss, flat).numpy()
    assert H.shape == want.shape
    ref.assert_close(H, want, np.float64, "logistic regression: dense Hessian vs torch")
    ref.assert_close(H, H.T, np.float64, "the Hessian is symmetric")


def test_hvp_checks_its_direction(rng):
    m = model("linear_diabetes")
    params = m.init(0, np.float64)
    x, y = batch(m, rng)
    with pytest.raises(ValueError, match="keys"):
        m.hvp(params, x, y, {})
    key, shape = next(iter(m.PARAM_SHAPES.items()))
    bad = {k: np.zeros(s) for k, s in m.PARAM_SHAPES.items()}
    bad[key] = np.zeros(shape + (1,))
    with pytest.raises(ValueError, match="shape"):
        m.hvp(params, x, y, bad)


def test_hessian_refuses_a_model_too_large_for_a_dense_matrix(rng):
    m = model("mlp_bench")
    params = m.init(0, np.float64)
    x, y = batch(m, rng, 2)
    with pytest.raises(ValueError, match="use hvp"):
        m.hessian(params, x, y)
