"""The training loop of the examples: data, checkpoints, the loop, the plot.

``examples/train.py`` is its command line; tests import it with ``examples/`` on
``sys.path``. Everything model-specific comes from a generated model module
(``generated/models/<name>.py``, made from ``specs/models/<name>.toml`` by
``python -m codegen``): ``init``, ``init_state``, ``train_step``, ``loss``, ``predict``.

Checkpoints are one ``.npz`` file per run directory, replaced atomically after every
epoch (written to a temporary file in the same directory, then ``os.replace``), holding
the parameters, the optimizer state, the epoch, the shuffling RNG's state, the history
and the run's configuration; a run stopped at any moment resumes from the last
completed epoch and continues exactly as if it had not been stopped.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomllib

import numpy as np

CHECKPOINT = "checkpoint.npz"
PLOT = "training.png"
METRICS = "metrics.json"
SPECS = Path(__file__).resolve().parent.parent / "specs" / "models"


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Dataset:
    """A scikit-learn bundled dataset: ``load() -> (features, targets)``; or a sequence
    dataset (task "sequence", examples/sequences.py): ``load() -> (x_train, y_train,
    x_test, y_test)``, integer tokens (N, T) and integer targets per position (N, T),
    split already."""

    name: str
    task: str  # "classification" (integer labels), "regression" (real targets) or "sequence"
    load: Callable[[], tuple[np.ndarray, ...]]
    description: str


def _sklearn(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load():
        import sklearn.datasets

        return getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)

    return load


MAJORITY_SAMPLES, MAJORITY_STEPS = 2000, 15


def majority_bits(n: int = MAJORITY_SAMPLES, steps: int = MAJORITY_STEPS, seed: int = 1234):
    """A generated sequence task: ``n`` random bit sequences of ``steps`` steps (odd), as
    features of shape (n, steps, 1), and whether the majority of the bits is 1 (a label
    0 or 1). Half the sequences have 7 or 8 ones of 15: the model must count."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(n, steps, 1))
    return bits.astype(np.float64), (2 * bits.sum(axis=(1, 2)) > steps).astype(np.int64)


TEMPORAL_SAMPLES, TEMPORAL_STEPS = 2000, 50
TEMPORAL_SYMBOLS = ("B", "E", "a", "b", "c", "d", "X", "Y")  # one-hot features, in this order


def temporal_order(n: int = TEMPORAL_SAMPLES, steps: int = TEMPORAL_STEPS, seed: int = 1234):
    """A generated long-memory task, the temporal order problem of Hochreiter and
    Schmidhuber's LSTM paper (1997, experiment 6a) at ``steps`` steps: a sequence of
    random distractor symbols (a, b, c, d) between a start symbol B and an end symbol E
    holds two relevant symbols, X or Y, one in the first third of the sequence and one in
    its second half; the class (4) is their order: XX, XY, YX or YY. Features are one-hot
    symbols, shape (n, steps, 8); the model must carry the first symbol over 10 to 39
    steps of distractors."""
    rng = np.random.default_rng(seed)
    symbols = rng.integers(2, 6, size=(n, steps))  # distractors
    symbols[:, 0], symbols[:, -1] = 0, 1  # B, E
    first = rng.integers(5, steps // 3, size=n)
    second = rng.integers(steps // 2, steps - 5, size=n)
    v1, v2 = rng.integers(0, 2, size=n), rng.integers(0, 2, size=n)
    rows = np.arange(n)
    symbols[rows, first], symbols[rows, second] = 6 + v1, 6 + v2
    return np.eye(len(TEMPORAL_SYMBOLS))[symbols], 2 * v1 + v2
def _sequences(name: str) -> Callable[[], tuple[np.ndarray, ...]]:
    def load():
        import sequences

        return sequences.char_data() if name == "chars" else sequences.sort_data()

    return load


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("digits", "classification", _sklearn("digits"), "8x8 handwritten digits: 1797 samples, 64 features, 10 classes"),
        Dataset("breast_cancer", "classification", _sklearn("breast_cancer"), "Wisconsin breast cancer: 569 samples, 30 features, 2 classes"),
        Dataset("diabetes", "regression", _sklearn("diabetes"), "diabetes progression: 442 samples, 10 features, 1 real target"),
        Dataset(
            "majority",
            "classification",
            majority_bits,
            f"generated: {MAJORITY_SAMPLES} random bit sequences of {MAJORITY_STEPS} steps; is the majority 1? (2 classes)",
        ),
        Dataset(
            "temporal_order",
            "classification",
            temporal_order,
            f"generated: {TEMPORAL_SAMPLES} symbol sequences of {TEMPORAL_STEPS} steps; the order of the two "
            "relevant symbols among distractors (XX, XY, YX, YY: 4 classes)",
        ),
        Dataset(
            "chars", "sequence", _sequences("chars"),
            "Python standard library source (300,000 characters of this interpreter's Lib/): windows of 32 characters, "
            "the next character at each position (96 symbols)",
        ),
        Dataset(
            "sort", "sequence", _sequences("sort"),
            "generated: 6 random digits then the same digits sorted, next token at each position (10,000 train, "
            "2,000 distinct test sequences)",
        ),
    )
}


@dataclass
class Split:
    """Standardised train/test arrays. ``x_*`` keep the dataset's sample shape (digits:
    64 features; majority: 15 steps of 1; temporal_order: 50 steps of 8). ``y_*`` are one-hot rows (classification) or
    standardised targets of shape (N, 1) (regression); ``labels_*`` the class indices."""

    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels_train: np.ndarray | None = None
    labels_test: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        """Numbers per sample."""
        return math.prod(self.x_train.shape[1:])

    @property
    def n_outputs(self) -> int:
        return self.y_train.shape[1]


def load_dataset(name: str, test_size: float = 0.2, split_seed: int = 0, dtype=np.float32) -> Split:
    """Load a registered dataset, split it (stratified for classification) and
    standardise each feature with the training split's mean and deviation."""
    from sklearn.model_selection import train_test_split

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    ds = DATASETS[name]
    if ds.task == "sequence":  # integer tokens and targets, split by the dataset itself
        return Split("sequence", *ds.load())
    x, t = ds.load()
    x = np.asarray(x, dtype=np.float64)
    stratify = t if ds.task == "classification" else None
    x_tr, x_te, t_tr, t_te = train_test_split(x, t, test_size=test_size, random_state=split_seed, stratify=stratify)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0  # constant features (digits has some) stay at 0
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std

    def arr(a):
        return np.ascontiguousarray(a, dtype=dtype)

    if ds.task == "classification":
        classes = np.unique(t_tr)
        l_tr, l_te = np.searchsorted(classes, t_tr), np.searchsorted(classes, t_te)
        eye = np.eye(len(classes))
        return Split("classification", arr(x_tr), arr(eye[l_tr]), arr(x_te), arr(eye[l_te]), l_tr, l_te)
    t_tr, t_te = np.asarray(t_tr, np.float64).reshape(len(t_tr), -1), np.asarray(t_te, np.float64).reshape(len(t_te), -1)
    t_mean, t_std = t_tr.mean(axis=0), t_tr.std(axis=0)
    return Split("regression", arr(x_tr), arr((t_tr - t_mean) / t_std), arr(x_te), arr((t_te - t_mean) / t_std))


# ------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """A model spec of the library (``specs/models/<model>.toml``), the dataset it is
    made for and the settings it reaches its stated result with."""

    model: str
    dataset: str
    epochs: int
    batch_size: int
    about: str
    schedule: str | None = None  # the learning-rate schedule it is trained with (--schedule)

    @property
    def spec(self) -> Path:
        return SPECS / f"{self.model}.toml"


EXAMPLES: dict[str, Example] = {
    e.model: e
    for e in (
        Example("mlp_digits", "digits", 20, 32, "MLP 64-128-10 on the 8x8 digits (>= 96% test accuracy)"),
        Example("cnn_digits", "digits", 20, 32, "conv 3x3 (32 maps), ReLU, max-pool, dense on the digits as 1x8x8 images (>= 98%)"),
        Example("resnet_digits", "digits", 15, 32, "residual CNN: conv 3x3, ReLU, avg-pool, a block of two 3x3 convs + shortcut, dense (>= 98.5%)"),
        Example("logreg_breast_cancer", "breast_cancer", 30, 32, "logistic regression (BCE with logits) on breast cancer (>= 95%)"),
        Example("linear_diabetes", "diabetes", 200, 512, "linear regression (MSE, full batch) on diabetes: the least-squares fit"),
        Example("gru_majority", "majority", 10, 32, "GRU over 15 random bits, trained through time: is the majority 1? (>= 95%)"),
        Example(
            "lstm_temporal_order", "temporal_order", 10, 32,
            "two stacked LSTMs over 50 symbols: the order of two symbols 10-39 steps apart (>= 95%)",
        ),
        Example("transformer_chars", "chars", 3, 32, "decoder-only transformer (2 blocks, causal attention) as a character LM on stdlib source",
                "cosine"),
        Example("transformer_sort", "sort", 5, 64, "the same transformer sorting 6 digits (>= 99% of held-out sequences)", "cosine"),
    )
}


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


def fit_to_model(data: Split, model) -> Split:
    """``data`` as ``model`` takes it: each sample reshaped to ``model.INPUT_SHAPE`` (the
    same numbers per sample: digits' 64 features become a 1x8x8 image) and, for a binary
    model (one logit per sample), the labels of a two-class dataset as 0/1 targets."""
    if data.task == "sequence":
        return _fit_sequences(data, model)
    if not hasattr(model, "INPUT"):
        raise TrainError(f"the model {model.NAME!r} has named inputs ({', '.join(model.INPUTS)}); train it on a sequence dataset")
    if data.n_features != model.INPUT:
        raise TrainError(
            f"the model {model.NAME!r} takes samples of shape {model.INPUT_SHAPE} ({model.INPUT} numbers), "
            f"but the dataset's samples have shape {data.x_train.shape[1:]} ({data.n_features} numbers)"
        )

    def x(a):
        return a.reshape((len(a),) + tuple(model.INPUT_SHAPE))

    y_train, y_test = data.y_train, data.y_test
    if model.TASK == "binary" and data.task == "classification":
        if data.n_outputs != 2:
            raise TrainError(f"the model {model.NAME!r} is a binary classifier, but the dataset has {data.n_outputs} classes")
        y_train = data.labels_train.reshape(-1, 1).astype(data.x_train.dtype)
        y_test = data.labels_test.reshape(-1, 1).astype(data.x_train.dtype)
    if y_train.shape[1:] != tuple(model.OUTPUT_SHAPE):
        what = "classes" if data.task == "classification" else "targets"
        raise TrainError(
            f"the model {model.NAME!r} gives outputs of shape {model.OUTPUT_SHAPE}, "
            f"but the dataset has {data.n_outputs} {what}"
        )
    return Split(data.task, x(data.x_train), y_train, x(data.x_test), y_test, data.labels_train, data.labels_test)


def _fit_sequences(data: Split, model) -> Split:
    """A sequence dataset's tokens and targets checked against ``model``: one integer
    input of the tokens' shape, targets of ``model.TARGET_SHAPE`` (a class per position)."""
    inputs = getattr(model, "INPUTS", {})
    shapes = {name: shape for name, (shape, dtype) in inputs.items() if dtype == "int64"}
    if len(inputs) != 1 or tuple(data.x_train.shape[1:]) not in shapes.values():
        raise TrainError(
            f"the model {model.NAME!r} takes {inputs or getattr(model, 'INPUT_SHAPE', '?')}, but a sequence dataset "
            f"feeds one integer input of shape {data.x_train.shape[1:]} (tokens)"
        )
    target = tuple(getattr(model, "TARGET_SHAPE", getattr(model, "OUTPUT_SHAPE", ())))
    if target != tuple(data.y_train.shape[1:]):
        raise TrainError(f"the model {model.NAME!r} takes targets of shape {target}, but the dataset's are {data.y_train.shape[1:]}")
    return data


def feed(model, x):
    """A batch as the model takes it: a model with named inputs gets ``{name: x}``."""
    inputs = getattr(model, "INPUTS", None)
    return {next(iter(inputs)): x} if inputs and not isinstance(x, dict) else x


def least_squares(data: Split) -> dict:
    """The closed-form baseline of a regression: the affine least-squares fit
    (``np.linalg.lstsq`` with an intercept column) on the training split, and its test
    MSE and R^2 (in the standardised targets the models are trained on)."""
    def design(x):
        x = x.reshape(len(x), -1).astype(np.float64)
        return np.hstack([x, np.ones((len(x), 1))])

    coef, *_ = np.linalg.lstsq(design(data.x_train), data.y_train.astype(np.float64), rcond=None)
    pred = design(data.x_test) @ coef
    y = data.y_test.astype(np.float64)
    return {"test_mse": float(np.mean((pred - y) ** 2)), "test_r2": _r2(pred, y)}


def _r2(pred, y) -> float:
    return 1.0 - float(np.sum((pred - y) ** 2)) / float(np.sum((y - y.mean(axis=0)) ** 2))


# ---------------------------------------------------------------------------- model


def model_name(spec_path) -> str:
    """The ``name`` of a model spec (read with tomllib; nothing is evaluated)."""
    path = Path(spec_path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrainError(f"cannot read the model spec {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainError(f"{path}: invalid TOML: {exc}") from None
    name = spec.get("name")
    if spec.get("kind") != "model" or not isinstance(name, str):
        raise TrainError(f"{path}: not a model spec (it needs kind = \"model\" and a name)")
    return name


def load_model(spec_path, build_dir=None, device: str = "cpu"):
    """The generated module of a model spec (``device="cuda"``: its CUDA twin,
    ``<name>_cuda``, whose parameters and state are device arrays; see :func:`host_copy`).

    A spec of the library (``generated/models/<name>.py`` exists) imports the committed
    module. Any other spec is rendered with ``codegen.model.render_model`` into
    ``build_dir`` and imported from there, so a user's own model trains without
    touching ``generated/``.
    """
    if device not in DEVICES:
        raise TrainError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    name = model_name(spec_path)
    suffix = "" if device == "cpu" else "_" + device
    try:
        return importlib.import_module(f"generated.models.{name}{suffix}")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"generated.models.{name}{suffix}", "generated.models"):
            raise
        if device != "cpu" and importlib.util.find_spec(f"generated.models.{name}") is not None:
            raise TrainError(f"the model {name!r} has no {device} module in generated/models (see `python -m codegen`); train it on the CPU")
    if build_dir is None:
        raise TrainError(
            f"no generated module for the model {name!r}; run `python -m codegen` "
            f"(or pass an output directory to build {spec_path} there)"
        )
    from codegen.model import ModelSpecError, render_model

    try:
        _, text = render_model(spec_path, target=device)
    except ModelSpecError as exc:
        raise TrainError(str(exc)) from None
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / f"{name}{suffix}.py"
    _write_atomic(target, text.encode())
    module_name = f"symgrad_user_model_{name}{suffix}"
    spec = importlib.util.spec_from_file_location(module_name, target)
    module = importlib.util.module_from_spec(spec)
    # registered before it runs: Numba's on-disk cache of its fused step finds the
    # module by name when a later run loads the cached code
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


DEVICES = ("cpu", "cuda")


def host_copy(model, tree):
    """``tree`` (parameters, optimizer state, an output) as NumPy arrays: what a
    checkpoint holds. A CUDA model's ``to_host``; the CPU's arrays are already there."""
    to_host = getattr(model, "to_host", None)
    return tree if to_host is None else to_host(tree)


def device_copy(model, tree):
    """The inverse of :func:`host_copy`: a checkpoint's arrays where ``model`` trains."""
    to_device = getattr(model, "to_device", None)
    return tree if to_device is None else to_device(tree)


# ------------------------------------------------------------------------ checkpoints


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path):
    """Open a temporary file beside ``path`` for writing; on success it replaces
    ``path`` (``os.replace``), on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_atomic(path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def save_checkpoint(path, *, params, state, epoch, rng, history, config) -> None:
    """Write a checkpoint atomically: a temporary file in the same directory, then
    ``os.replace`` (an interrupted write leaves the previous checkpoint intact)."""
    arrays = {f"param/{k}": v for k, v in params.items()}
    arrays.update({f"state/{k}": np.asarray(v) for k, v in state.items()})
    arrays["epoch"] = np.asarray(epoch, dtype=np.int64)
    arrays["rng"] = np.asarray(json.dumps(rng.bit_generator.state))
    arrays["history"] = np.asarray(json.dumps(history))
    arrays["config"] = np.asarray(json.dumps(config, sort_keys=True))
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    with np.load(path, allow_pickle=False) as z:
        params = {k[len("param/") :]: z[k].copy() for k in z.files if k.startswith("param/")}
        state = {}
        for k in z.files:
            if k.startswith("state/"):
                v = z[k]
                state[k[len("state/") :]] = v.item() if v.ndim == 0 and v.dtype.kind == "i" else v.copy()
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(z["rng"]))
        return {
            "params": params,
            "state": state,
            "epoch": int(z["epoch"]),
            "rng": rng,
            "history": json.loads(str(z["history"])),
            "config": json.loads(str(z["config"])),
        }


# ----------------------------------------------------------------------------- loop


class Diverged(TrainError):
    """The loss stopped being finite."""


@dataclass
class Config:
    spec: str
    out: str
    dataset: str = "digits"
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    lr: float | None = None  # None: the spec's (or the optimizer's default)
    schedule: str | None = None  # None, "step", "exponential" or "cosine"
    schedule_hyper: dict = field(default_factory=dict)
    resume: bool = False
    dtype: str = "float32"
    test_size: float = 0.2
    split_seed: int = 0
    progress: bool = True
    plot: bool = True
    method: str = "first-order"  # or "newton", "lbfgs": examples/solvers.py (full batch, float64)
    l2: float = 0.0  # solvers: L2 penalty on the parameters of rank >= 2
    max_iter: int | None = None  # solvers: iteration budget (None: the solver's default)
    tol: float | None = None  # solvers: gradient tolerance (None: the solver's default)
    distributed: bool = False  # data-parallel over the MPI ranks (examples/distributed.py)
    device: str = "cpu"  # "cuda": the model's CUDA twin; params and state stay on the GPU


# what must agree between a checkpoint and the run that resumes from it
_RESUME_KEYS = ("model", "dataset", "dtype", "test_size", "split_seed")

SCHEDULES = ("step", "exponential", "cosine")


def _schedule_defaults(name: str, epochs: int) -> dict:
    return {
        "step": {"step_size": max(1, epochs // 3), "gamma": 0.1},
        "exponential": {"gamma": 0.9},
        "cosine": {"T_max": epochs, "eta_min": 0.0},
    }[name]


def learning_rates(config: Config, base_lr: float):
    """``lr(epoch)`` for the run: constant, or the generated schedule op's ``lr``."""
    if config.schedule is None:
        return lambda epoch: base_lr
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r} (known: {', '.join(SCHEDULES)})")
    import generated

    sched = generated.op(config.schedule)
    hyper = {**_schedule_defaults(config.schedule, config.epochs), **config.schedule_hyper}
    if "lr" in getattr(sched, "hyper", {}):
        return lambda epoch: float(sched.lr(epoch, lr=base_lr, **hyper))
    # a schedule without a base rate gives the factor to multiply it by
    return lambda epoch: base_lr * float(sched.lr(epoch, **hyper))


def evaluate(model, params, x, y, labels=None, state=None, dataset: str | None = None) -> dict:
    """Test loss and, for classification, accuracy (for regression, MSE and R^2; for a
    sequence dataset, examples/sequences.py's metrics), in eval mode: a model keeping
    running statistics (batch norm: ``RUNNING``) reads them from ``state``."""
    if dataset is not None and DATASETS[dataset].task == "sequence":
        import sequences

        return sequences.metrics(dataset, model, params, x, y)
    kw = {"state": state} if hasattr(model, "RUNNING") else {}
    out = {"test_loss": float(model.loss(params, x, y, **kw))}
    if labels is not None:
        out["test_accuracy"] = float(np.mean(np.reshape(model.predict(params, x, **kw), len(labels)) == labels))
    else:
        pred = np.asarray(host_copy(model, model.forward(params, x, **kw)), dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        out["test_mse"] = float(np.mean((pred - y) ** 2))
        out["test_r2"] = _r2(pred, y)
    return out


def _optimizer_default_lr(model) -> float:
    if "lr" in model.HYPER:
        return float(model.HYPER["lr"])
    import generated

    return float(generated.op(model.OPTIMIZER).hyper["lr"])


def open_run(config: Config, dtype, **settings) -> tuple[Path, object, Split, dict]:
    """The run directory (made), the model (on ``config.device``), the data fitted to it,
    and the run's settings that a checkpoint records: the ones a resume must match
    (``_RESUME_KEYS``), the method, and the method's own ``settings``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(config.spec, build_dir=out / "model", device=config.device)
    dtype = np.dtype(dtype)
    try:
        data = fit_to_model(load_dataset(config.dataset, config.test_size, config.split_seed, dtype), model)
    except TrainError as exc:
        raise TrainError(f"{exc} (dataset {config.dataset!r})") from None
    run_config = {
        "model": model.NAME,
        "spec": str(config.spec),
        "dataset": config.dataset,
        "dtype": dtype.name,
        "test_size": config.test_size,
        "split_seed": config.split_seed,
        "seed": config.seed,
        "method": config.method,
        **settings,
    }
    return out, model, data, run_config


def resumable_checkpoint(path, run_config: dict, keys=_RESUME_KEYS) -> dict:
    """The checkpoint at ``path``, refused (naming what differs) unless the run that
    wrote it had the same method and the same ``keys`` of ``run_config``."""
    ckpt = load_checkpoint(path)
    there = {"method": "first-order", **ckpt["config"]}  # checkpoints before --method
    if there["method"] != run_config["method"]:
        raise TrainError(f"{path} was written by --method {there['method']}; resume it with that method, "
                         "or use another --out")
    mismatch = [k for k in keys if there.get(k) != run_config[k]]
    if mismatch:
        raise TrainError(
            f"{path} was written by a different run ("
            + ", ".join(f"{k}: {there.get(k)!r} there, {run_config[k]!r} here" for k in mismatch)
            + "); use another --out or drop --resume"
        )
    return ckpt


def train(config: Config, log=print) -> dict:
    """Train ``config.spec`` on ``config.dataset``; return the history and final metrics.

    Raises :class:`Diverged` when the loss becomes NaN or infinite (the checkpoint of
    the last completed epoch is kept). ``config.method`` "newton" or "lbfgs": full-batch
    training by SciPy's solvers (examples/solvers.py). ``config.distributed``:
    data-parallel over the MPI ranks (examples/distributed.py); rank 0 alone logs and
    writes files.
    """
    if config.method != "first-order":
        import solvers

        return solvers.train(config, log)
    from tqdm import tqdm

    parallel = None
    if config.distributed:
        import distributed

        parallel = distributed.DataParallel(distributed.Group.world(), config.batch_size)
        if not parallel.root:
            log = lambda *args, **kwargs: None  # noqa: E731
    writes = parallel is None or parallel.root
    out, model, data, run_config = open_run(config, np.dtype(config.dtype))
    dtype = np.dtype(config.dtype)
    ckpt_path = out / CHECKPOINT
    start, history = 0, []
    if config.resume and ckpt_path.exists():
        ckpt = resumable_checkpoint(ckpt_path, run_config)
        params, state, rng = device_copy(model, ckpt["params"]), device_copy(model, ckpt["state"]), ckpt["rng"]
        start, history = ckpt["epoch"], ckpt["history"]
        log(f"resuming {model.NAME} from {ckpt_path} after epoch {start}")
    else:
        if config.resume:
            log(f"no checkpoint in {out}; starting from scratch")
        elif ckpt_path.exists() and writes:
            ckpt_path.unlink()  # a fresh run: an old run's checkpoint must not pass for this one's
        params = model.init(config.seed, dtype=dtype)
        # a model whose layers draw (dropout) takes its seed in the state
        draws = "seed" in inspect.signature(model.init_state).parameters
        state = model.init_state(params, seed=config.seed % 2**32) if draws else model.init_state(params)
        rng = np.random.default_rng(config.seed)

    train_step = model.train_step
    if parallel is not None:
        parallel.attach(model)
        params, state, rng, start, history = parallel.share(params, state, rng, start, history)
        train_step = parallel.step
        log(parallel.describe(dtype))
    base_lr = float(config.lr) if config.lr is not None else _optimizer_default_lr(model)
    lr_at = learning_rates(config, base_lr)
    labels_test = data.labels_test if data.task == "classification" else None
    sequence = data.task == "sequence"
    n = len(data.x_train)
    n_batches = math.ceil(n / config.batch_size)
    metric = "test_accuracy" if labels_test is not None or sequence else "test_r2"
    on_device = config.device != "cpu"  # the data set and the step's loss stay on the device (see below)
    if on_device:  # copied once: each batch is gathered there by its rows (train_step's index=)
        x_device, y_device = device_copy(model, data.x_train), device_copy(model, data.y_train)

    for epoch in range(start + 1, config.epochs + 1):
        lr = lr_at(epoch - 1)
        order = rng.permutation(n)
        t0 = time.perf_counter()
        total = 0.0
        bar = tqdm(
            range(n_batches),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=None if config.progress and writes else True,  # None: off when not a terminal
            file=sys.stderr,
        )
        # a device model adds each batch's loss to a running sum on the device, read at
        # the progress bar's refreshes and once at the end of the epoch (nothing per batch)
        loss_sum = device_copy(model, np.zeros(1, dtype)) if on_device else None
        order_device = device_copy(model, order.astype(np.int64)) if on_device else None
        seen = 0
        for b in bar:
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            seen += len(idx)
            if on_device:
                rows = order_device[b * config.batch_size : (b + 1) * config.batch_size]  # a view: nothing copied
                train_step(params, state, x_device, y_device, lr=lr, loss_sum=loss_sum, index=rows)
                if bar.disable or b % 10 != 0:
                    continue
                loss = float(host_copy(model, loss_sum)[0]) / seen  # the epoch's mean so far
            else:
                loss = float(train_step(params, state, feed(model, data.x_train[idx]), data.y_train[idx], lr=lr))
                total += loss * len(idx)
            if not math.isfinite(loss):
                bar.close()
                _diverged(loss, epoch, b, lr, ckpt_path, on_device)
            if b % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if on_device:
            total = float(host_copy(model, loss_sum)[0])
            if not math.isfinite(total):
                bar.close()
                _diverged(total, epoch, n_batches - 1, lr, ckpt_path, on_device)
        bar.close()
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "loss": total / n, "lr": lr, "seconds": seconds}
        record.update(evaluate(model, params, data.x_test, data.y_test, labels_test, state, config.dataset if sequence else None))
        if not math.isfinite(record["test_loss"]):
            kept = f"the checkpoint of epoch {epoch - 1} is kept in {ckpt_path}" if epoch > 1 else "no checkpoint was written"
            raise Diverged(
                f"training diverged: the test loss became {record['test_loss']} after epoch {epoch} "
                f"(learning rate {lr:g}); {kept}. Try a smaller --lr."
            )
        history.append(record)
        if parallel is not None:
            parallel.check_identical(params, state, f"after epoch {epoch}")
        if writes:
            save_checkpoint(ckpt_path, params=host_copy(model, params), state=host_copy(model, state), epoch=epoch, rng=rng, history=history, config=run_config)
        log(
            f"epoch {epoch:3d}/{config.epochs}  loss {record['loss']:.4f}  test loss {record['test_loss']:.4f}  "
            f"{metric.replace('_', ' ')} {record[metric]:.4f}  lr {lr:.3g}  {seconds:.2f} s"
        )

    result = {
        "model": model.NAME,
        "dataset": config.dataset,
        "epochs": len(history),
        "history": history,
        "config": asdict(config),
    }
    if history:
        result[metric] = history[-1][metric]
        result["test_loss"] = history[-1]["test_loss"]
        if "test_mse" in history[-1]:
            result["test_mse"] = history[-1]["test_mse"]
        result["seconds_per_epoch"] = float(np.median([h["seconds"] for h in history]))
    baseline = None
    if sequence and config.dataset == "chars" and history:
        import sequences

        # the bigram's bits per character, and a sample from the trained model
        result["bigram_bits_per_char"] = sequences.bigram_bits(data.x_train, data.y_train, data.x_test, data.y_test)
        result["test_bits_per_char"] = history[-1]["test_bits_per_char"]
        result["sample"] = sequences.sample(model, host_copy(model, params), sequences.decode(data.x_test[0]), seed=config.seed)
        baseline = result["bigram_bits_per_char"] * math.log(2)  # in the loss's nats per character
    if data.task == "regression":
        result["least_squares"] = least_squares(data)
        if model.LOSS == "mse":  # the same measure as the test loss
            baseline = result["least_squares"]["test_mse"]
    result["params"] = host_copy(model, params)
    metrics = {k: v for k, v in result.items() if k != "params"}
    if parallel is not None:
        metrics["ranks"] = parallel.group.size
    if not writes:
        return result
    _write_atomic(out / METRICS, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    if config.plot and history:
        label = "character bigram (test)" if "bigram_bits_per_char" in result else "least squares (test)"
        plot_history(history, out / PLOT, title=f"{model.NAME} on {config.dataset}", baseline=baseline, baseline_label=label)
    return result


def _diverged(loss, epoch, b, lr, ckpt_path, on_device):
    """Raise :class:`Diverged`: the training loss of batch ``b`` (0-based) of ``epoch``
    is not finite (on a device: the epoch's running sum, read by that batch)."""
    if epoch > 1:
        kept = f"the checkpoint of epoch {epoch - 1} is kept in {ckpt_path}"
    else:
        kept = "no epoch was completed, so no checkpoint was written"
    where = f"by batch {b + 1} (the epoch's loss is summed on the device)" if on_device else f"batch {b + 1}"
    raise Diverged(
        f"training diverged: the loss became {loss} at epoch {epoch}, {where} "
        f"(learning rate {lr:g}); {kept}. Try a smaller --lr."
    )


# ----------------------------------------------------------------------------- plot


def plot_history(history: list[dict], path, title: str = "", baseline: float | None = None,
                 xlabel: str = "epoch", baseline_label: str = "least squares (test)") -> None:
    """Loss (train and test) and the test metric per epoch (or per solver iteration:
    ``xlabel``), as a PNG (written atomically). ``baseline``: a reference test loss
    drawn as a line (least squares, for regression)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    metric = "test_accuracy" if "test_accuracy" in history[0] else "test_r2"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o", label="train")
    ax1.plot(epochs, [h["test_loss"] for h in history], marker="o", label="test")
    if baseline is not None:
        ax1.axhline(baseline, color="C3", linestyle="--", label=baseline_label)
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [h[metric] for h in history], marker="o", color="C2")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("test accuracy" if metric == "test_accuracy" else "test $R^2$")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
