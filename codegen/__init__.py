"""codegen: Programs (derive.ir) to Numba kernels through Jinja templates.

Knows no particular op. Public API:

* :func:`render_library` -- {path under generated/: text} for the whole library
  (one module per op and target, the runtimes they import, the derivations,
  ``__init__.py``, model modules).
* :func:`regenerate` / :func:`check` -- write ``generated/`` / compare it (``python -m
  codegen`` and ``python -m codegen --check``).
* :func:`render_spec` / :func:`build` -- a user's TOML spec to a self-contained module
  (``python -m codegen my_op.toml --out DIR``), and that module imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .template_util import COMMAND
from .writer import stale_files, sync_directory, write_if_changed

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "generated"
MODEL_SPECS = REPO / "specs" / "models"

__all__ = ["render_library", "regenerate", "check", "render_spec", "build", "load_module"]


def render_programs(programs, command: str = COMMAND) -> dict:
    """{relative path: text} for the op modules, the runtime modules, the group
    packages with their derivations and __init__.py (emit.render_op_modules)."""
    from .emit import render_op_modules

    return render_op_modules(programs, command)


def render_models(spec_dir=MODEL_SPECS, programs=None, modules=None) -> dict:
    """{relative path: text} for model specs (``generated/models/``), via
    ``codegen.model`` when that module exists."""
    try:
        from . import model
    except ImportError:
        return {}
    files = {}
    names = []
    specs = {}  # module path -> the spec that renders it
    from . import targets

    for spec in sorted(Path(spec_dir).glob("*.toml")):
        for target in targets.all_targets():
            if not target.primary and (
                not target.renders_models or model.unsupported(model.plan_model(spec, programs, target.name), target)
            ):
                continue  # e.g. no CUDA twin for a model with an unrolled cell
            rel, text = model.render_model(spec, programs, modules, target=target.name)
            rel = Path(rel).as_posix()
            if rel.startswith("generated/"):
                rel = rel[len("generated/"):]
            if rel in specs:
                raise model.ModelSpecError(spec, f"name: {Path(rel).stem!r} is also the name of {specs[rel]}; each model needs a name of its own")
            specs[rel] = spec
            files[rel] = text
            if target.primary:
                names.append(Path(rel).stem)
    if names and hasattr(model, "render_models_init"):
        rel, text = model.render_models_init(names)
        files[rel] = text
    return files


def render_library(programs=None) -> dict:
    """Everything ``generated/`` should hold, as {relative path: text}."""
    if programs is None:
        from derive import library

        programs = library()
    files = render_programs(programs)
    files.update(render_models(programs=programs, modules=files))
    return files


def regenerate(root=GENERATED, programs=None) -> dict:
    """Write ``generated/`` (only files whose content changed; atomically)."""
    return sync_directory(root, render_library(programs))


def check(root=GENERATED, programs=None) -> dict:
    """{"stale", "missing", "extra"} lists: what ``regenerate`` would change."""
    return stale_files(root, render_library(programs))


def render_spec(path, out_dir=".", command: str | None = None, target: str = "cpu") -> dict:
    """{file name: text} for a user's TOML spec: ``<name>.py`` and ``<name>_cuda.py`` for
    an op; ``<name><suffix>.py`` of ``target`` for a model spec (``kind = "model"``, via
    codegen.model: ``<name>.py``, or ``<name>_cuda.py`` with ``target="cuda"``)."""
    from derive import from_file

    from . import targets
    from .emit import render_targets

    if command is None:
        command = "%s %s --out %s" % (COMMAND, path, out_dir)
    if _spec_kind(path) == "model":
        from . import model

        rel, text = model.render_model(path, command=command, target=target)
        return {Path(rel).name: text}
    program = from_file(path)
    stem = _module_name(program.name)
    texts = render_targets([program], stem, command, single=program.name)
    return {t.module_file(stem): texts[t.name] for t in targets.all_targets() if texts[t.name] is not None}


def build(path, out_dir, target: str = "cpu"):
    """Generate a user's TOML spec into ``out_dir`` and return the imported module: an
    op's module (its CUDA companion beside it), or a model's module for ``target``
    (``target="cuda"``: ``<name>_cuda.py``, the model over device arrays)."""
    from . import targets

    out_dir = Path(out_dir)
    if not targets.get(target).primary and _spec_kind(path) != "model":
        raise ValueError("build: target=%r is for model specs; an op's module takes target= in its op()" % target)
    files = render_spec(path, out_dir, target=target)
    for name, text in files.items():
        write_if_changed(out_dir / name, text)
    stem = min(files, key=len)[: -len(".py")]
    return load_module(out_dir / (stem + ".py"))


def load_module(path, name: str | None = None):
    """Import a generated module by file path (never exec of strings: Numba caches by
    file). Re-importing the same path returns a fresh module."""
    path = Path(path).resolve()
    name = name or path.stem
    other = sys.modules.get(name)
    if other is not None and Path(getattr(other, "__file__", "") or "").resolve() != path:
        name = "symgrad_user_" + name  # never shadow an unrelated module (json, math, ...)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _spec_kind(path) -> str | None:
    """The ``kind`` of a TOML spec, or None when it cannot be read (derive reports)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            kind = tomllib.load(f).get("kind")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return kind if isinstance(kind, str) else None


def _module_name(name: str) -> str:
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    if not stem or stem[0].isdigit():
        stem = "op_" + stem
    return stem
