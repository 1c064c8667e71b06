"""Full-batch training by SciPy's solvers: Newton (trust-region Newton-CG on the model's
derived Hessian-vector products) and L-BFGS.

``examples/train.py --method newton|lbfgs`` calls :func:`train`. The objective is the
generated model's full-batch loss on the training split, as a function of one float64
vector: the model's parameters flattened in their dict order (``PARAM_SHAPES``). Its
value and gradient come from the model's ``loss_and_grads``, its Hessian-vector products
(Newton) from the model's ``hvp``: every derivative is derived by symgrad, none is
written here.

``--l2 LAMBDA`` adds the library op ``l2_penalty`` (lam/2 * ||w||^2, its gradient and
Hessian-vector product derived like every other op's) for every parameter of rank 2 or
more: weight matrices and convolution kernels are penalised; rank-1 parameters (biases,
normalisation scales and shifts) are not. With the model's loss a mean over n training
samples, ``--l2 1/(C n)`` is scikit-learn's ``LogisticRegression(C=C)`` objective
(C * summed loss + ||w||^2/2, the intercept unpenalised) divided by C n: the same
minimiser. The history's (and the plot's) training "loss" is this objective, penalty
included; the test loss is the model's alone.

Checkpoints: after every solver iteration the parameters, the iteration count and the
history are written atomically to OUT/checkpoint.npz (``trainer.save_checkpoint``);
``--resume`` starts the solver again from the saved parameters with the iterations
left. The solver's own state (the trust radius, L-BFGS's curvature pairs) is not part
of a checkpoint: a resumed run takes a different path to the same minimiser, which it
reaches to the solver's tolerance.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import trainer

# --method -> the scipy.optimize.minimize method that drives it
SCIPY_METHODS = {"newton": "trust-ncg", "lbfgs": "L-BFGS-B"}
# default iteration budgets and gradient tolerances (the solvers stop earlier when converged)
MAX_ITER = {"newton": 100, "lbfgs": 1000}
GTOL = {"newton": 1e-10, "lbfgs": 1e-6}


def penalised(shapes: dict) -> list[str]:
    """The parameters an L2 penalty applies to: those of rank 2 or more (weights,
    kernels), not rank-1 ones (biases, scales and shifts)."""
    return [k for k, s in shapes.items() if len(s) >= 2]


class Objective:
    """The model's full-batch loss on (x, y) plus ``l2`` * ||w||^2 / 2 over the
    penalised parameters, as functions of one float64 vector (parameters flattened in
    ``model.PARAM_SHAPES`` order): :meth:`fun_and_grad` and :meth:`hessp`."""

    def __init__(self, model, x, y, l2: float = 0.0):
        if not l2 >= 0.0:
            raise ValueError(f"the L2 penalty must be a number >= 0, got {l2}")
        self.model, self.x, self.y, self.l2 = model, x, y, float(l2)
        self.shapes = {k: tuple(s) for k, s in model.PARAM_SHAPES.items()}
        self.sizes = [math.prod(s) for s in self.shapes.values()]
        self.size = sum(self.sizes)
        self.penalised = penalised(self.shapes) if self.l2 > 0 else []
        self.penalty = None
        if self.penalised:
            import generated

            self.penalty = generated.op("l2_penalty", lam=self.l2)
        self._last = None  # (x bytes, f, g): the evaluation at the latest point
        self.evaluations = 0

    def unflat(self, vector: np.ndarray) -> dict:
        """The parameter dict of a vector (views into it)."""
        out, start = {}, 0
        for (key, shape), size in zip(self.shapes.items(), self.sizes):
            out[key] = vector[start : start + size].reshape(shape)
            start += size
        return out

    def flat(self, tree: dict) -> np.ndarray:
        """A dict shaped like the parameters, as one float64 vector."""
        return np.concatenate([np.asarray(tree[k], np.float64).reshape(-1) for k in self.shapes])

    def fun_and_grad(self, vector: np.ndarray) -> tuple[float, np.ndarray]:
        """The objective and its gradient at ``vector``."""
        vector = np.ascontiguousarray(vector, np.float64)
        key = vector.tobytes()
        if self._last is not None and self._last[0] == key:
            return self._last[1], self._last[2].copy()
        params = self.unflat(vector)
        loss, grads = self.model.loss_and_grads(params, self.x, self.y)
        loss = float(loss)
        grads = dict(grads)
        for k in self.penalised:
            w = params[k].reshape(-1)
            loss += float(self.penalty.forward(w))
            grads[k] = np.asarray(grads[k]) + self.penalty.backward(1.0, w).reshape(self.shapes[k])
        g = self.flat(grads)
        self.evaluations += 1
        self._last = (key, loss, g)
        return loss, g.copy()

    def hessp(self, vector: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The objective's Hessian at ``vector`` times ``v``."""
        vector = np.ascontiguousarray(vector, np.float64)
        v = np.ascontiguousarray(v, np.float64)
        params, tangents = self.unflat(vector), self.unflat(v)
        hv = dict(self.model.hvp(params, self.x, self.y, tangents))
        for k in self.penalised:
            w, t = params[k].reshape(-1), tangents[k].reshape(-1)
            hv[k] = np.asarray(hv[k]) + np.asarray(self.penalty.hvp(1.0, w, tangents=(t,))).reshape(self.shapes[k])
        return self.flat(hv)


def minimize(objective: Objective, x0: np.ndarray, method: str, max_iter: int, gtol: float | None = None,
             callback=None):
    """``scipy.optimize.minimize`` of ``objective`` from ``x0`` by ``method`` ("newton"
    or "lbfgs"); ``callback(xk)`` after every iteration."""
    from scipy.optimize import minimize as scipy_minimize

    gtol = GTOL[method] if gtol is None else gtol
    if method == "newton":
        return scipy_minimize(objective.fun_and_grad, x0, jac=True, hessp=objective.hessp, method=SCIPY_METHODS[method],
                              callback=callback, options={"maxiter": max_iter, "gtol": gtol})
    if method == "lbfgs":
        return scipy_minimize(objective.fun_and_grad, x0, jac=True, method=SCIPY_METHODS[method], callback=callback,
                              options={"maxiter": max_iter, "gtol": gtol, "ftol": 0.0})
    raise ValueError(f"unknown method {method!r} (known: {', '.join(SCIPY_METHODS)})")


def train(config, log=print) -> dict:
    """Train ``config.spec`` on ``config.dataset`` by ``config.method`` ("newton" or
    "lbfgs"), full batch, float64; return the history and final metrics (as
    ``trainer.train`` does, with the solver's outcome under ``"solver"``)."""
    method = config.method
    if method not in SCIPY_METHODS:
        raise trainer.TrainError(f"unknown method {method!r} (known: {', '.join(SCIPY_METHODS)})")
    out, model, data, run_config = trainer.open_run(config, np.float64, l2=float(config.l2))
    dtype = np.dtype(np.float64)
    max_iter = config.max_iter if config.max_iter is not None else MAX_ITER[method]
    objective = Objective(model, data.x_train, data.y_train, config.l2)
    ckpt_path = out / trainer.CHECKPOINT
    start, history = 0, []
    if config.resume and ckpt_path.exists():
        ckpt = trainer.resumable_checkpoint(ckpt_path, run_config, (*trainer._RESUME_KEYS, "l2"))
        x0 = objective.flat(ckpt["params"])
        start, history = ckpt["epoch"], ckpt["history"]
        log(f"resuming {model.NAME} ({method}) from {ckpt_path} after iteration {start}")
    else:
        if config.resume:
            log(f"no checkpoint in {out}; starting from scratch")
        elif ckpt_path.exists():
            ckpt_path.unlink()
        x0 = objective.flat(model.init(config.seed, dtype=dtype))
        if not history:
            loss0, g0 = objective.fun_and_grad(x0)
            log(f"{method} ({SCIPY_METHODS[method]}): {objective.size} parameters, {len(data.x_train)} samples, "
                f"L2 {config.l2:g} on {', '.join(objective.penalised) or 'none'}; "
                f"initial loss {loss0:.6g}, |grad| {np.linalg.norm(g0):.3g}")

    labels_test = data.labels_test if data.task == "classification" else None
    metric = "test_accuracy" if labels_test is not None else "test_r2"
    rng = np.random.default_rng(config.seed)  # unused by the solvers; kept in the checkpoint's format
    clock = {"t": time.perf_counter(), "evals": objective.evaluations, "done": 0}

    def after_iteration(xk):
        clock["done"] += 1
        iteration = start + clock["done"]
        loss, g = objective.fun_and_grad(xk)
        now = time.perf_counter()
        seconds = now - clock["t"]
        record = {"epoch": iteration, "loss": loss, "grad_norm": float(np.linalg.norm(g)), "seconds": seconds,
                  "evaluations": objective.evaluations - clock["evals"]}
        params = {k: v.copy() for k, v in objective.unflat(np.array(xk, np.float64)).items()}
        record.update(trainer.evaluate(model, params, data.x_test, data.y_test, labels_test))
        if not (math.isfinite(loss) and math.isfinite(record["test_loss"])):
            raise trainer.Diverged(f"the solver reached a non-finite loss ({loss}) at iteration {iteration}")
        history.append(record)
        trainer.save_checkpoint(ckpt_path, params=params, state={}, epoch=iteration, rng=rng, history=history,
                                config=run_config)
        log(f"iter {iteration:4d}/{max_iter}  loss {loss:.8g}  |grad| {record['grad_norm']:.3g}  "
            f"test loss {record['test_loss']:.4f}  {metric.replace('_', ' ')} {record[metric]:.4f}  {seconds:.3f} s")
        clock["t"], clock["evals"] = time.perf_counter(), objective.evaluations

    t0 = time.perf_counter()
    solution = None
    if start < max_iter:
        solution = minimize(objective, x0, method, max_iter - start, config.tol, callback=after_iteration)
        xs = np.asarray(solution.x, np.float64)
    else:
        xs = x0
        log(f"the checkpoint is at iteration {start}, the budget is {max_iter}: nothing to do")
    seconds = time.perf_counter() - t0
    loss, g = objective.fun_and_grad(xs)
    params = {k: v.copy() for k, v in objective.unflat(xs).items()}
    final = trainer.evaluate(model, params, data.x_test, data.y_test, labels_test)
    solver = {
        "method": method,
        "scipy_method": SCIPY_METHODS[method],
        "l2": float(config.l2),
        "penalised": objective.penalised,
        "iterations": len(history),
        "max_iter": max_iter,
        "loss": loss,
        "grad_norm": float(np.linalg.norm(g)),
        "seconds": seconds,
        "evaluations": objective.evaluations,
    }
    if solution is not None:
        solver.update({"success": bool(solution.success), "message": str(solution.message)})
        log(f"{SCIPY_METHODS[method]}: {solution.message} after {len(history)} iterations "
            f"({seconds:.2f} s this run); loss {loss:.10g}, |grad| {solver['grad_norm']:.3g}")
    result = {
        "model": model.NAME,
        "dataset": config.dataset,
        "epochs": len(history),
        "history": history,
        "config": asdict(config),
        "solver": solver,
        **final,
    }
    baseline = None
    if data.task == "regression":
        result["least_squares"] = trainer.least_squares(data)
        if model.LOSS == "mse":
            baseline = result["least_squares"]["test_mse"]
    metrics = dict(result)
    trainer._write_atomic(out / trainer.METRICS, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    result["params"] = params
    if config.plot and history:
        trainer.plot_history(history, out / trainer.PLOT, title=f"{model.NAME} on {config.dataset} ({method})",
                             baseline=baseline, xlabel="iteration")
    return result


if __name__ == "__main__":  # pragma: no cover - the command line is examples/train.py
    sys.exit("use: python examples/train.py --method newton|lbfgs ...")
