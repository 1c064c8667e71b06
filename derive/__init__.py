"""derive: the mathematics of symgrad.

Specs (TOML files or Python modules in derive/ops/) become :class:`derive.ir.Program`
objects with every gradient derived by SymPy, simplified, stabilised, and explained as a
LaTeX derivation. Nothing here knows about Numba or code generation.
"""

from __future__ import annotations

import functools

from .errors import SpecError
from .ir import Program

GROUPS = ("activations", "layers", "losses", "optimizers", "schedules")
KIND_GROUP = {"activation": "activations", "layer": "layers", "loss": "losses",
              "optimizer": "optimizers", "schedule": "schedules"}

__all__ = ["SpecError", "Program", "library", "library_defs", "from_file", "build", "GROUPS", "KIND_GROUP"]


def library_defs():
    """The library's OpDefs in a stable order (by group, then name)."""
    from .ops import (activations, attention, conv, graph, layers, losses, norm, optimizers, pool, recurrent,
                      rowwise, schedules)

    ops = []
    for module in (activations, rowwise, layers, conv, pool, norm, recurrent, attention, graph, losses, optimizers,
                   schedules):
        ops.extend(module.OPS)
    names = [o.name for o in ops]
    assert len(names) == len(set(names)), "duplicate op names in the library"
    return sorted(ops, key=lambda o: (GROUPS.index(KIND_GROUP[o.kind]), o.name))


@functools.lru_cache(maxsize=None)
def library() -> tuple[Program, ...]:
    """Every library op, derived, in a stable order (by group, then name)."""
    return tuple(build(op) for op in library_defs())


def from_file(path) -> Program:
    """Derive a user's TOML spec; raises SpecError with the file, equation and problem."""
    from .spec import load_toml

    return build(load_toml(path))


def build(opdef) -> Program:
    from .pipeline import build as _build

    return _build(opdef)
