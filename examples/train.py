"""Train a model spec on a dataset with the generated kernels.

    python examples/train.py                          # the digits MLP (mlp_digits)
    python examples/train.py --model cnn_digits       # an example, by name (--list)
    python examples/train.py specs/models/mlp_digits.toml --epochs 20 --batch-size 32 \
        --seed 0 --out runs/mlp_digits                # any model spec, on --dataset
    python examples/train.py --model logreg_breast_cancer --method newton --l2 0.0022
                                                      # full batch by SciPy (examples/solvers.py)
    mpiexec -n 2 python examples/train.py --model mlp_digits --distributed
                                                      # data-parallel over MPI ranks

An example (``--model``) brings its dataset, epochs and batch size; the options
override them. Prints the loss and test accuracy (regression: R^2, and the test MSE
against closed-form least squares) per epoch, checkpoints every epoch to
OUT/checkpoint.npz (``--resume`` continues from it), writes OUT/metrics.json and the
loss/accuracy plot OUT/training.png. Exits with status 1 if the loss becomes NaN or
infinite.
"""

from __future__ import annotations

import argparse
import sys

import distributed  # data-parallel training over MPI (mpi4py is imported only with --distributed)
import trainer


def parse_args(argv=None) -> trainer.Config | None:
    """The run's configuration; None for ``--list``."""
    p = argparse.ArgumentParser(
        prog="python examples/train.py",
        description="Train a model spec (specs/models/*.toml) with the generated kernels.",
    )
    p.add_argument("spec", nargs="?", default=None, help="model spec, e.g. specs/models/mlp_digits.toml")
    p.add_argument("--model", choices=sorted(trainer.EXAMPLES), default=None, help="an example by name (default: mlp_digits)")
    p.add_argument("--list", action="store_true", help="list the examples and datasets, and exit")
    p.add_argument("--dataset", default=None, choices=sorted(trainer.DATASETS), help="dataset (default: the example's, or digits)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (with --resume: train until this many; default: the example's, or 20)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the example's, or 32")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial parameters and the shuffling")
    p.add_argument("--out", default=None, help="run directory for checkpoint, metrics and plot (default: runs/<model name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the spec's)")
    p.add_argument("--schedule", choices=trainer.SCHEDULES, default=None, help="per-epoch learning-rate schedule (generated schedule ops)")
    p.add_argument("--step-size", type=int, default=None, help="step schedule: epochs between decays (default: epochs // 3)")
    p.add_argument("--gamma", type=float, default=None, help="step/exponential schedule: decay factor (default 0.1 / 0.9)")
    p.add_argument("--eta-min", type=float, default=None, help="cosine schedule: final learning rate (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--method", choices=("first-order", "newton", "lbfgs"), default="first-order",
                   help="first-order: the spec's optimizer over mini-batches; newton (trust-ncg on derived Hessian-vector "
                   "products) or lbfgs (L-BFGS-B): scipy.optimize.minimize, full batch, float64 (examples/solvers.py)")
    p.add_argument("--l2", type=float, default=0.0, metavar="LAMBDA", help="newton/lbfgs: L2 penalty LAMBDA/2 * ||w||^2 on the parameters of rank >= 2 (not biases)")
    p.add_argument("--max-iter", type=int, default=None, help="newton/lbfgs: most solver iterations (default 100 / 1000)")
    p.add_argument("--tol", type=float, default=None, help="newton/lbfgs: gradient tolerance (default 1e-10 / 1e-6)")
    p.add_argument("--device", choices=trainer.DEVICES, default="cpu", help="cuda: train the model's CUDA twin on the GPU (checkpoints hold host copies)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write training.png")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over the ranks of `mpiexec -n N` (mpi4py: pip install 'symgrad[mpi]'); the batch size must divide by N",
    )
    a = p.parse_args(argv)
    if a.list:
        return None
    if a.spec is not None and a.model is not None:
        p.error("give a model spec or --model, not both")
    if a.spec is None:
        example = trainer.EXAMPLES[a.model or "mlp_digits"]
        a.spec = str(example.spec)
    else:
        # a library spec given by its path is still that example
        example = trainer.EXAMPLES.get(trainer.model_name(a.spec))
    defaults = {"dataset": "digits", "epochs": 20, "batch_size": 32}
    if example is not None:
        defaults = {"dataset": example.dataset, "epochs": example.epochs, "batch_size": example.batch_size}
        if example.schedule:  # the schedule the example is trained with
            defaults["schedule"] = example.schedule
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    for name in ("epochs", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.method == "first-order" and (a.l2 or a.max_iter is not None or a.tol is not None):
        p.error("--l2, --max-iter and --tol need --method newton or lbfgs")
    if a.l2 < 0 or (a.max_iter is not None and a.max_iter < 1) or (a.tol is not None and a.tol <= 0):
        p.error("--l2 must be >= 0, --max-iter >= 1 and --tol > 0")
    hyper = {}
    if a.step_size is not None:
        hyper["step_size"] = a.step_size
    if a.gamma is not None:
        hyper["gamma"] = a.gamma
    if a.eta_min is not None:
        hyper["eta_min"] = a.eta_min
    if hyper and a.schedule is None:
        p.error("--step-size/--gamma/--eta-min need --schedule")
    if a.distributed and a.method != "first-order":
        p.error("--distributed trains first-order (the spec's optimizer over mini-batches); --method newton/lbfgs run in one process")
    if a.device != "cpu" and (a.distributed or a.method != "first-order"):
        p.error("--device cuda trains first-order in one process; --distributed and --method newton/lbfgs run on the CPU")
    out = a.out if a.out is not None else f"runs/{trainer.model_name(a.spec)}"
    return trainer.Config(
        spec=a.spec,
        out=out,
        dataset=a.dataset,
        epochs=a.epochs,
        batch_size=a.batch_size,
        seed=a.seed,
        lr=a.lr,
        schedule=a.schedule,
        schedule_hyper=hyper,
        resume=a.resume,
        dtype=a.dtype,
        progress=not a.no_progress,
        plot=not a.no_plot,
        method=a.method,
        l2=a.l2,
        max_iter=a.max_iter,
        tol=a.tol,
        distributed=a.distributed,
        device=a.device,
    )


def print_examples() -> None:
    print("examples (--model NAME):")
    for e in trainer.EXAMPLES.values():
        print(f"  {e.model:<22} {e.dataset:<14} {e.about}")
    print("datasets (--dataset NAME):")
    for d in trainer.DATASETS.values():
        print(f"  {d.name:<22} {d.description}")


def main(argv=None) -> int:
    try:
        config = parse_args(argv)
    except trainer.TrainError as exc:  # an unreadable spec
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if config is None:
        print_examples()
        return 0
    if not config.distributed and distributed.launched_size() > 1:
        print(
            f"error: started by mpiexec as one of {distributed.launched_size()} processes without --distributed: "
            "each would train the whole run and write the same files; add --distributed",
            file=sys.stderr,
        )
        return 1
    try:
        result = trainer.train(config)
    except trainer.TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if config.distributed:
            distributed.abort_others()
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; `--resume` continues from the last completed epoch in {config.out}", file=sys.stderr)
        return 130
    steps = f"{result['epochs']} {'epochs' if config.method == 'first-order' else config.method + ' iterations'}"
    if config.distributed and not distributed.is_root():
        return 0
    if "bigram_bits_per_char" in result:
        print(
            f"validation bits per character: {result['test_bits_per_char']:.3f}; character bigram of the training text: "
            f"{result['bigram_bits_per_char']:.3f} ({result['model']} on {result['dataset']}, {steps}); "
            f"next-character accuracy {result['test_accuracy']:.4f}"
        )
        print("sample (seeded, after the first validation window):\n" + result["sample"])
    elif "test_accuracy" in result:
        what = "held-out sequences sorted correctly" if result["dataset"] == "sort" else "test accuracy"
        print(f"{what}: {result['test_accuracy']:.4f} ({result['model']} on {result['dataset']}, {steps})")
    elif "test_r2" in result:
        print(f"test R^2: {result['test_r2']:.4f} ({result['model']} on {result['dataset']}, {steps})")
        ls = result["least_squares"]
        print(
            f"test MSE: {result['test_mse']:.4f}; closed-form least squares (np.linalg.lstsq) on the same split: "
            f"{ls['test_mse']:.4f} (R^2 {ls['test_r2']:.4f}); ratio {result['test_mse'] / ls['test_mse']:.3f}"
        )
    print(f"checkpoint, metrics and plot in {config.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
