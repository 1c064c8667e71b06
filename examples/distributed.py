"""Data-parallel training with MPI (mpi4py), for ``examples/train.py --distributed``.

    mpiexec -n 4 python examples/train.py --model mlp_digits --distributed

Every rank (process) holds the whole model and the whole dataset, draws the same
shuffled order of the training set (the same seed; rank 0's random state is sent to
all at the start, so a resumed run agrees too) and, of every global batch of B
samples, computes the loss and gradients of its contiguous slice (B/N samples on N
ranks). The gradients go into one flat buffer, each scaled by the rank's share of the
batch (its samples over B), with the scaled loss as the buffer's last number; ONE
in-place ``Allreduce`` (a sum) per step makes of every rank's buffer the gradient of
the global batch's mean loss, and that loss. Every rank then applies the same update
with the model's optimizer op (``generated.op(model.OPTIMIZER).step``, per parameter
in ``PARAM_SHAPES`` order, with the spec's hyperparameters and the run's learning
rate), so the parameters stay identical on all ranks; a checksum of the parameters
and the optimizer state is compared across ranks at the start and after every epoch.
Rank 0 alone prints, checkpoints and writes the metrics and the plot.

The step is the model's fused ``train_step`` taken apart: ``loss_and_grads``, the sum
over ranks, then the optimizer; on one rank it computes what ``train_step`` computes
(tests/test_distributed.py checks it in float64).

The split assumes what every library loss is: a mean over the batch's samples
(PyTorch's default reductions), so that the mean over B is the shares' weighted sum.
The global batch size must divide by the number of ranks (every rank then computes the
same number of samples, and a run on N ranks follows the same batches as on one); the
last, smaller batch of an epoch is split as evenly as it goes, weighted exactly.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import numpy as np

from trainer import TrainError

INSTALL = "pip install 'symgrad[mpi]' (mpi4py and Open MPI, from PyPI wheels)"

# set by the launchers for every process they start: Open MPI, MPICH/Intel MPI (Hydra), PMIx
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def launched_size() -> int:
    """How many processes ``mpiexec`` started with this one (1 when not under mpiexec),
    from the launcher's environment; no MPI is initialised."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def mpi():
    """The ``mpi4py.MPI`` module (initialising MPI), or a :class:`TrainError` saying how
    to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise TrainError(
            f"--distributed needs mpi4py and an MPI library, and cannot import mpi4py ({exc}); "
            f"install them with `{INSTALL}` and start the run with "
            "`mpiexec -n N python examples/train.py ... --distributed`"
        ) from None
    except RuntimeError as exc:  # mpi4py is there, its MPI library is not
        raise TrainError(f"--distributed: mpi4py cannot load an MPI library ({exc}); install one with `{INSTALL}`") from None
    return MPI


class Group:
    """The processes that train together, and the three collectives the training uses.
    ``comm``: an mpi4py communicator; ``None`` is one process without MPI (the same
    arithmetic, for tests and for comparison)."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = 0 if comm is None else comm.Get_rank()
        self.size = 1 if comm is None else comm.Get_size()
        self._mpi = None if comm is None else mpi()

    @classmethod
    def world(cls) -> Group:
        return cls(mpi().COMM_WORLD)

    def allreduce_sum(self, buffer: np.ndarray) -> None:
        """Sum ``buffer`` over the ranks, in place (one ``MPI_Allreduce``)."""
        if self.comm is not None:
            self.comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def allgather(self, obj) -> list:
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def abort(self, code: int = 1) -> None:
        """End every rank (after this one reported an error the others may not see)."""
        if self.comm is not None and self.size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            self.comm.Abort(code)


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous slice ``[lo, hi)`` of a batch of ``n`` samples that ``rank`` of
    ``size`` computes: ``n/size`` samples each when ``size`` divides ``n``, otherwise
    shares that differ by at most one."""
    return rank * n // size, (rank + 1) * n // size


def checksum(params: dict, state: dict) -> str:
    """A digest of the parameters' and the optimizer state's bytes (sorted by name)."""
    h = hashlib.blake2b(digest_size=16)
    for tree in (params, state):
        for key in sorted(tree):
            h.update(key.encode())
            h.update(np.ascontiguousarray(tree[key]).tobytes())
    return h.hexdigest()


class DataParallel:
    """Data-parallel training of a generated model module over a :class:`Group`.

    ``step(params, state, x, y, lr=...)`` is the drop-in for the model's ``train_step``
    on a global batch ``(x, y)`` (the same on every rank); ``timings`` accumulates the
    seconds spent computing gradients, in the allreduce and in the update.
    """

    def __init__(self, group: Group, batch_size: int):
        if batch_size % group.size:
            raise TrainError(
                f"--distributed: the batch size {batch_size} does not divide by the {group.size} ranks "
                f"(each rank computes batch size / ranks samples of every batch); "
                f"use a multiple of {group.size}, e.g. --batch-size {max(group.size, batch_size // group.size * group.size)}"
            )
        self.group = group
        self.batch_size = batch_size
        self.root = group.rank == 0
        self.timings = {"compute": 0.0, "allreduce": 0.0, "update": 0.0, "steps": 0}
        self._model = None

    # ------------------------------------------------------------------ set-up

    def attach(self, model) -> None:
        """Take ``model`` (a generated model module): its optimizer op and the flat
        buffer of its gradients (allocated per dtype on the first step)."""
        import generated

        self._model = model
        self._optimizer = generated.op(model.OPTIMIZER)
        self._keys = tuple(model.PARAM_SHAPES)
        self._sizes = [int(np.prod(model.PARAM_SHAPES[k], dtype=np.int64)) for k in self._keys]
        self.n_numbers = sum(self._sizes) + 1  # the gradients and the loss
        self._buffer = None

    def describe(self, dtype) -> str:
        nbytes = self.n_numbers * np.dtype(dtype).itemsize
        return (
            f"data-parallel on {self.group.size} ranks: each computes {self.batch_size // self.group.size} "
            f"samples of every batch of {self.batch_size}; one allreduce of {self.n_numbers} numbers "
            f"({nbytes / 1024:.1f} KiB) per step"
        )

    def share(self, params: dict, state: dict, rng, start: int, history: list):
        """Rank 0's starting point (fresh or resumed) on every rank, checked."""
        params, state, rng, start, history = self.group.bcast((params, state, rng, start, history))
        self.check_identical(params, state, "at the start")
        return params, state, rng, start, history

    def check_identical(self, params: dict, state: dict, when: str) -> None:
        """Raise on every rank when the ranks' parameters or optimizer states differ."""
        sums = self.group.allgather(checksum(params, state))
        if len(set(sums)) > 1:
            differ = [r for r, s in enumerate(sums) if s != sums[0]]
            raise TrainError(
                f"--distributed: the ranks hold different parameters or optimizer states {when} "
                f"(rank(s) {differ} differ from rank 0); the ranks must run the same code, "
                "library versions and CPU kind, as the same update is applied on each"
            )

    # -------------------------------------------------------------------- step

    def _views(self, dtype):
        if self._buffer is None or self._buffer.dtype != dtype:
            self._buffer = np.empty(self.n_numbers, dtype)
            self._grads, start = {}, 0
            for key, size in zip(self._keys, self._sizes):
                self._grads[key] = self._buffer[start : start + size].reshape(self._model.PARAM_SHAPES[key])
                start += size
        return self._buffer, self._grads

    def step(self, params: dict, state: dict, x, y, **hyper) -> float:
        """One training step on the global batch ``(x, y)``, in place on every rank;
        returns the global batch's loss before the step (as ``train_step`` does)."""
        model = self._model
        group = self.group
        t0 = time.perf_counter()
        dtype = params[self._keys[0]].dtype
        buffer, grads = self._views(dtype)
        n = len(x)
        lo, hi = shard(n, group.rank, group.size)
        if hi > lo:
            weight = (hi - lo) / n
            loss, g = model.loss_and_grads(params, x[lo:hi], y[lo:hi])
            for key in self._keys:
                np.multiply(g[key], weight, out=grads[key])
            buffer[-1] = float(loss) * weight
        else:  # a last batch smaller than the ranks: nothing to add
            buffer[:] = 0
        t1 = time.perf_counter()
        group.allreduce_sum(buffer)
        t2 = time.perf_counter()
        t = state["t"] + 1
        state["t"] = t
        h = {**model.HYPER, **hyper}
        slots = tuple(model.SLOTS)
        for key in self._keys:
            self._optimizer.step(params[key], grads[key], *(state[f"{key}.{s}"] for s in slots), t=t, **h)
        t3 = time.perf_counter()
        self.timings["compute"] += t1 - t0
        self.timings["allreduce"] += t2 - t1
        self.timings["update"] += t3 - t2
        self.timings["steps"] += 1
        return float(buffer[-1])


def _initialised_mpi():
    """``mpi4py.MPI`` if this process has initialised MPI, else None (nothing is imported)."""
    module = sys.modules.get("mpi4py.MPI")
    return module if module is not None and module.Is_initialized() and not module.Is_finalized() else None


def is_root() -> bool:
    """Whether this process is rank 0 (or runs without MPI)."""
    MPI = _initialised_mpi()
    return MPI is None or MPI.COMM_WORLD.Get_rank() == 0


def abort_others(code: int = 1) -> None:
    """After an error on this rank: end the job (the other ranks would wait for it in
    the next collective). Nothing when MPI is not running or this is the only rank."""
    MPI = _initialised_mpi()
    if MPI is not None:
        Group(MPI.COMM_WORLD).abort(code)
