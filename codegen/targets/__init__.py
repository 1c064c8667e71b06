"""Code-generation targets: one module per target, and the registry emit.py asks.

* :mod:`codegen.targets.numba_cpu` -- ``@njit`` kernels, contractions as BLAS
  products, the primary module (specs, ``op()``, the fused model steps' cores).
* :mod:`codegen.targets.numba_cuda` -- ``@cuda.jit`` kernels, one thread per output
  element, tiled GEMMs, its companion module ``<stem>_cuda.py``.

:func:`get` returns a target by name; :func:`all_targets` lists them in the order
their modules are rendered. See docs/targets.md.
"""

from __future__ import annotations

from .base import Target
from .numba_cpu import NumbaCPU
from .numba_cuda import NumbaCUDA

_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add a target to the registry (its ``name`` must be new)."""
    if not target.name or target.name in _REGISTRY:
        raise ValueError("target name %r is empty or already registered" % target.name)
    _REGISTRY[target.name] = target
    return target


def get(name) -> Target:
    """The target called ``name`` (or ``name`` itself when it is a Target)."""
    if isinstance(name, Target):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError("unknown code-generation target %r; known targets: %s" % (name, ", ".join(_REGISTRY))) from None


def all_targets() -> list:
    """Every registered target, the primary one first."""
    return list(_REGISTRY.values())


def primary() -> Target:
    """The target whose module holds the specs and ``op()``."""
    (target,) = [t for t in _REGISTRY.values() if t.primary]
    return target


register(NumbaCPU())
register(NumbaCUDA())

__all__ = ["Target", "NumbaCPU", "NumbaCUDA", "register", "get", "all_targets", "primary"]
