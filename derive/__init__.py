"""derive: the mathematics of symgrad.

Specs (TOML files or Python modules in derive/ops/) become :class:`derive.ir.Program`
objects with every gradient derived by SymPy, simplified, stabilised, and explained as a
LaTeX derivation. Nothing here knows about Numba or code generation.
"""

from __future__ import annotations

import functools
import os

from .errors import SpecError
from .ir import Program

GROUPS = ("activations", "layers", "losses", "optimizers", "schedules")
KIND_GROUP = {"activation": "activations", "layer": "layers", "loss": "losses",
              "optimizer": "optimizers", "schedule": "schedules"}

__all__ = ["SpecError", "Program", "library", "library_defs", "from_file", "build", "GROUPS", "KIND_GROUP"]


def library_defs():
    """The library's OpDefs in a stable order (by group, then name)."""
    from .ops import (activations, attention, combine, conv, graph, layers, losses, norm, optimizers, pool, recurrent,
                      rowwise, schedules)

    ops = []
    for module in (activations, rowwise, layers, combine, conv, pool, norm, recurrent, attention, graph, losses, optimizers,
                   schedules):
        ops.extend(module.OPS)
    names = [o.name for o in ops]
    assert len(names) == len(set(names)), "duplicate op names in the library"
    return sorted(ops, key=lambda o: (GROUPS.index(KIND_GROUP[o.kind]), o.name))


@functools.lru_cache(maxsize=None)
def library() -> tuple[Program, ...]:
    """Every library op, derived, in a stable order (by group, then name).

    The ops are independent, so they are derived in parallel worker processes (one per
    core; ``SYMGRAD_JOBS=1`` derives them in this process). A Program pickles exactly,
    so the result, and everything rendered from it, is the same either way."""
    defs = library_defs()
    jobs = _jobs(len(defs))
    if jobs == 1:
        return tuple(build(op) for op in defs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return tuple(pool.map(build, defs))


def _jobs(n_ops: int) -> int:
    raw = os.environ.get("SYMGRAD_JOBS", "")
    if raw.strip():
        try:
            return max(1, min(n_ops, int(raw)))
        except ValueError:
            raise ValueError(f"SYMGRAD_JOBS must be a whole number of worker processes, got {raw!r}") from None
    return max(1, min(n_ops, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def from_file(path) -> Program:
    """Derive a user's TOML spec; raises SpecError with the file, equation and problem."""
    from .spec import load_toml

    return build(load_toml(path))


def build(opdef) -> Program:
    from .pipeline import build as _build

    return _build(opdef)
