"""Second-order training through SciPy (issue 14): ``examples/train.py --method newton``
(trust-ncg on the model's derived Hessian-vector products) and ``--method lbfgs``
(L-BFGS-B), full batch in float64, with ``--l2`` (the library op ``l2_penalty`` on
the parameters of rank >= 2) driven by examples/solvers.py.

Newton on the breast-cancer logistic regression reaches scikit-learn's
``LogisticRegression`` solution with the same penalty (C * summed log-loss +
||w||^2 / 2, intercept unpenalised; symgrad's loss is a mean over n samples, so
lam = 1/(C n)) to 1e-6 relative in at most 10 iterations. The solver's objective,
gradient and Hessian-vector product (model plus penalty) are checked against PyTorch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
C = 1.0  # scikit-learn's default inverse regularisation strength
NEWTON_MAX_ITERATIONS = 10
RTOL = 1e-6


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import solvers
        import train
        import trainer
    finally:
        sys.path.remove(str(REPO / "examples"))
    return trainer, solvers, train


@pytest.fixture(scope="module")
def breast_cancer(examples):
    trainer, _, _ = examples
    model = trainer.load_model(trainer.EXAMPLES["logreg_breast_cancer"].spec)
    data = trainer.fit_to_model(trainer.load_dataset("breast_cancer", dtype=np.float64), model)
    return model, data


def config(examples, out, **kw):
    trainer, _, _ = examples
    spec = str(trainer.EXAMPLES["logreg_breast_cancer"].spec)
    return trainer.Config(spec=spec, out=str(out), dataset="breast_cancer", progress=False, plot=False, **kw)


def lam_for(data) -> float:
    return 1.0 / (C * len(data.x_train))


def sklearn_solution(data) -> np.ndarray:
    """scikit-learn's coefficients then intercept, solved to machine precision."""
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=C, tol=1e-14, max_iter=10_000, solver="newton-cholesky")
    fit.fit(data.x_train, data.labels_train)
    assert fit.n_iter_[0] < 10_000
    return np.concatenate([fit.coef_.ravel(), fit.intercept_])


def test_newton_reaches_sklearns_logistic_regression_in_at_most_10_iterations(examples, breast_cancer, tmp_path):
    trainer, solvers, _ = examples
    model, data = breast_cancer
    result = trainer.train(config(examples, tmp_path, method="newton", l2=lam_for(data)), log=lambda *a: None)
    solver = result["solver"]
    assert solver["scipy_method"] == "trust-ncg" and solver["penalised"] == ["dense0.weight"]
    assert 1 <= solver["iterations"] <= NEWTON_MAX_ITERATIONS, solver
    got = np.concatenate([result["params"]["dense0.weight"].ravel(), result["params"]["dense0.bias"]])
    expected = sklearn_solution(data)
    rel = np.abs(got - expected) / np.abs(expected)
    assert rel.max() <= RTOL, f"largest relative difference {rel.max():.3g} at coefficient {rel.argmax()}"
    # what the run leaves: one history record and one checkpoint per iteration, metrics
    assert [h["epoch"] for h in result["history"]] == list(range(1, solver["iterations"] + 1))
    ckpt = trainer.load_checkpoint(tmp_path / trainer.CHECKPOINT)
    assert ckpt["epoch"] == solver["iterations"] and ckpt["config"]["method"] == "newton"
    np.testing.assert_array_equal(ckpt["params"]["dense0.weight"], result["params"]["dense0.weight"])
    assert (tmp_path / trainer.METRICS).exists()
    assert result["test_accuracy"] >= 0.95


def test_lbfgs_lowers_the_loss_to_a_stationary_point(examples, breast_cancer, tmp_path):
    trainer, solvers, _ = examples
    model, data = breast_cancer
    result = trainer.train(config(examples, tmp_path, method="lbfgs", l2=lam_for(data), tol=1e-9), log=lambda *a: None)
    solver = result["solver"]
    assert solver["scipy_method"] == "L-BFGS-B" and solver["success"], solver
    objective = solvers.Objective(model, data.x_train, data.y_train, lam_for(data))
    start, _ = objective.fun_and_grad(objective.flat(model.init(0, dtype=np.float64)))
    loss, grad = objective.fun_and_grad(objective.flat(result["params"]))
    assert loss < 0.2 * start
    assert np.abs(grad).max() <= 1e-9  # L-BFGS-B's gtol: the largest gradient component
    # the same minimiser as scikit-learn's (the gradient bounds the distance to it)
    got = objective.flat(result["params"])
    np.testing.assert_allclose(got, sklearn_solution(data), rtol=1e-4)


def test_resumed_solver_reaches_the_uninterrupted_result(examples, breast_cancer, tmp_path):
    trainer, _, _ = examples
    _, data = breast_cancer
    lam = lam_for(data)
    whole = trainer.train(config(examples, tmp_path / "whole", method="newton", l2=lam), log=lambda *a: None)
    part = trainer.train(config(examples, tmp_path / "split", method="newton", l2=lam, max_iter=3), log=lambda *a: None)
    assert part["solver"]["iterations"] == 3
    assert trainer.load_checkpoint(tmp_path / "split" / trainer.CHECKPOINT)["epoch"] == 3
    # the first iterations are the same computation
    assert [h["loss"] for h in part["history"]] == [h["loss"] for h in whole["history"][:3]]
    with pytest.raises(trainer.TrainError, match="l2"):
        trainer.train(config(examples, tmp_path / "split", method="newton", l2=2 * lam, resume=True), log=lambda *a: None)
    resumed = trainer.train(config(examples, tmp_path / "split", method="newton", l2=lam, resume=True),
                            log=lambda *a: None)
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, resumed["solver"]["iterations"] + 1))
    assert resumed["history"][:3] == part["history"]
    for key, value in whole["params"].items():
        np.testing.assert_allclose(resumed["params"][key], value, rtol=1e-8, atol=0, err_msg=key)
    with pytest.raises(trainer.TrainError, match="--method newton"):  # not by the first-order loop
        trainer.train(config(examples, tmp_path / "split", resume=True), log=lambda *a: None)


def test_objective_gradient_and_hessian_vector_product_match_torch(examples, breast_cancer, rng):
    """Model loss plus ``l2_penalty`` on the weight (not the bias), against PyTorch."""
    _, solvers, _ = examples
    model, data = breast_cancer
    x, y = data.x_train[:40], data.y_train[:40]
    lam = 0.05
    objective = solvers.Objective(model, x, y, lam)
    theta = rng.normal(size=objective.size)
    v = rng.normal(size=objective.size)

    def torch_objective(t):
        w, b = t[:-1].reshape(30, 1), t[-1:]
        logits = torch.tensor(x) @ w + b
        return F.binary_cross_entropy_with_logits(logits, torch.tensor(y)) + lam * (w * w).sum() / 2

    t = torch.tensor(theta, requires_grad=True)
    expected_loss = torch_objective(t)
    (expected_grad,) = torch.autograd.grad(expected_loss, t)
    _, expected_hv = torch.autograd.functional.hvp(torch_objective, torch.tensor(theta), torch.tensor(v))
    loss, grad = objective.fun_and_grad(theta)
    np.testing.assert_allclose(loss, expected_loss.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(objective.hessp(theta, v), expected_hv.numpy(), rtol=1e-10, atol=1e-14)


def test_solver_options_need_a_solver_method(examples, capsys):
    _, _, train = examples
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "logreg_breast_cancer", "--l2", "0.01"])
    assert "--method newton or lbfgs" in capsys.readouterr().err
    cfg = train.parse_args(["--model", "logreg_breast_cancer", "--method", "newton", "--l2", "0.01", "--max-iter", "5"])
    assert (cfg.method, cfg.l2, cfg.max_iter) == ("newton", 0.01, 5)


def test_solver_methods_do_not_run_distributed(examples, capsys):
    _, _, train = examples
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "logreg_breast_cancer", "--method", "lbfgs", "--distributed"])
    assert "--distributed trains first-order" in capsys.readouterr().err
