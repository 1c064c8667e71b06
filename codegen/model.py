"""Model specs (``kind = "model"``) -> ``generated/models/<name>.py``.

A model spec composes library ops into a network, a loss and an optimizer::

    name = "mlp_digits"
    kind = "model"
    input = 64
    layers = [{ op = "dense", out = 128 }, { op = "relu" }, { op = "dense", out = 10 }]
    loss = "softmax_cross_entropy"
    optimizer = { op = "adam", lr = 0.001 }

:func:`render_model` checks the spec against the library's ops (their kinds, arguments,
parameter shapes, attributes and hyperparameters, read from the derived
:class:`derive.ir.Program` objects) and renders ``codegen/templates/model/model.py.jinja``.
The emitted module has no kernels of its own. ``forward``, ``loss`` and
``loss_and_grads`` call the library's ops through ``generated.op(...)``; ``train_step``
checks its arguments once and calls one ``@njit(cache=True)`` function that chains the
library's compiled cores (``_dense_fwd_core``, ``_dense_bwd_params_core``,
``_adam_step_core``, ...: the code the ops' own wrappers call), so a training step is a
single compiled call with no per-op Python overhead and no unused gradients (the first
layer uses a params-only backward core).

The spec is read with :mod:`tomllib` and nothing in it is evaluated: op names are looked
up in the library, attribute values must be TOML numbers.
"""

from __future__ import annotations

import hashlib
import keyword
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import tomllib

from derive.errors import SpecError

from .emit import backward_variants, core_name, group_of
from .template_util import render

TEMPLATE = "model/model.py.jinja"
COMMAND = "python -m codegen"
REPO_ROOT = Path(__file__).resolve().parent.parent

REQUIRED_FIELDS = ("name", "kind", "input", "layers", "loss", "optimizer")
OPTIONAL_FIELDS = ("doc",)
LAYER_KINDS = ("activation", "layer")

# What the model's output means, by loss: it decides what ``predict`` returns.
CLASSIFICATION_LOSSES = ("softmax_cross_entropy", "nll")
BINARY_LOSSES = ("bce_with_logits",)

_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


class ModelSpecError(SpecError):
    """A model spec that cannot be built; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(path, problem)


@dataclass(frozen=True)
class OpInfo:
    """What a model needs to know about one library op (read off its Program)."""

    name: str
    kind: str
    args: tuple[tuple[str, str, tuple[str, ...]], ...]  # (name, role, shape as dim names)
    output_shape: tuple[str, ...]
    differentiable: tuple[str, ...]
    attrs: tuple[str, ...]
    hyper: tuple[str, ...]
    state: tuple[str, ...]
    elementwise: bool
    module: str = ""  # the generated module holding the op's compiled cores
    attr_defaults: tuple[tuple[str, int | float], ...] = ()  # attributes in core order
    counter: str = ""  # an optimizer's step counter, passed before its attributes
    variants: tuple[str, ...] = ()  # backward cores for a subset of the gradients
    int_args: tuple[str, ...] = ()  # arguments holding int64 data

    @property
    def inputs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return tuple((n, s) for n, r, s in self.args if r == "input")

    @property
    def params(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return tuple((n, s) for n, r, s in self.args if r == "param")


def op_info(program) -> OpInfo:
    """The model-relevant facts of a :class:`derive.ir.Program`."""
    args = tuple((a.name, a.role, tuple(str(d) for d in a.shape)) for a in program.args)
    output_shape = tuple(str(d) for d in program.outputs[0].shape) if program.outputs else ()
    attrs = tuple(str(sym) for sym, _ in program.attrs)
    extra = program.extra or {}
    hyper = extra.get("hyper")
    if hyper is not None:
        hyper_names = tuple(str(k) for k in hyper)
    elif program.kind in ("optimizer", "schedule"):
        hyper_names = attrs  # an optimizer's hyperparameters are its attributes
    else:
        hyper_names = ()
    return OpInfo(
        name=program.name,
        kind=program.kind,
        args=args,
        output_shape=output_shape,
        differentiable=tuple(program.grad_of),
        attrs=attrs,
        hyper=hyper_names,
        state=tuple(program.state),
        elementwise=bool(program.elementwise),
        module=group_of(program),
        attr_defaults=tuple((str(sym), v) for sym, v in program.attrs),
        counter=program.step_counter.name if program.step_counter is not None else "",
        variants=tuple(suffix for suffix, _ in backward_variants(program)),
        int_args=tuple(a.name for a in program.args if a.dtype == "int"),
    )


def _library_infos(programs) -> dict[str, OpInfo]:
    if programs is None:
        import derive

        programs = derive.library()
    if isinstance(programs, Mapping):
        programs = programs.values()
    infos = {}
    for p in programs:
        info = p if isinstance(p, OpInfo) else op_info(p)
        infos[info.name] = info
    return infos


def _display_path(path: Path) -> str:
    """The spec's path as the header shows it: relative to the repository when inside it."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name


@dataclass(frozen=True)
class _Layer:
    index: int
    var: str  # the module-level name of the op object, e.g. _dense0
    op: str
    kind: str
    attrs: tuple[tuple[str, str], ...]  # (name, Python literal)
    params: tuple[tuple[str, str, tuple[int, ...], str], ...]  # (arg, key, shape, local name)
    fan_in: int
    width_in: int
    width_out: int
    grads: tuple[str, ...]  # what backward returns, unpacked: g<index> or _ for the input
    param_grads: tuple[tuple[str, str, str], ...]  # (params key, local name, its grad's name)
    fwd_core: str = ""  # compiled cores the fused step calls
    bwd_core: str = ""
    bwd_unpack: tuple[str, ...] = ()  # what the backward core returns, unpacked
    core_attrs: tuple[str, ...] = ()  # attribute values (literals), in core order

    @property
    def needs_backward(self) -> bool:
        return bool(self.params) or self.index > 0


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tuple_literal(names) -> str:
    items = ", ".join(f'"{n}"' for n in names)
    return f"({items},)" if len(names) == 1 else f"({items})"


def _literal(value) -> str:
    return repr(int(value)) if isinstance(value, int) else repr(float(value))


def _core_attrs(info: OpInfo, given: dict) -> tuple[str, ...]:
    """Every attribute of ``info`` as a literal of its default's type (what ``op()``
    converts to), the spec's value where it gives one."""
    out = []
    for name, default in info.attr_defaults:
        value = given.get(name, default)
        if isinstance(default, int) and not isinstance(default, bool):
            out.append(repr(int(value)))
        else:
            out.append(repr(float(value)))
    return tuple(out)


class _Checker:
    """Validates one spec; every error names the file (and the entry) it is about."""

    def __init__(self, path: Path, infos: dict[str, OpInfo]):
        self.path = path
        self.infos = infos

    def fail(self, where: str, problem: str):
        raise ModelSpecError(self.path, f"{where}: {problem}" if where else problem)

    def lookup(self, where: str, name, kinds: tuple[str, ...]) -> OpInfo:
        if not isinstance(name, str):
            self.fail(where, f"op must be a string naming a library op, got {name!r}")
        info = self.infos.get(name)
        if info is None:
            known = ", ".join(sorted(n for n, i in self.infos.items() if i.kind in kinds))
            self.fail(where, f"unknown op {name!r} (known {'/'.join(kinds)} ops: {known})")
        if info.kind not in kinds:
            self.fail(where, f"op {name!r} is {_a(info.kind)}, not {' or '.join(_a(k) for k in kinds)}")
        return info

    def attrs(self, where: str, table: dict, allowed: tuple[str, ...], what: str):
        out = []
        for key, value in table.items():
            if key not in allowed:
                have = ", ".join(allowed) if allowed else "none"
                self.fail(where, f"unknown {what} {key!r} (this op has: {have})")
            if not _number(value):
                self.fail(where, f"{what} {key!r} must be a number, got {value!r}")
            out.append((key, _literal(value)))
        return tuple(out)


def _positive_int(check: _Checker, where: str, field: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        check.fail(where, f"{field!r} must be a positive integer, got {value!r}")
    return value


def _layers(check: _Checker, spec: dict) -> list[_Layer]:
    raw = spec["layers"]
    if not isinstance(raw, list) or not raw:
        check.fail("layers", "must be a non-empty list of tables like { op = \"dense\", out = 10 }")
    width = spec["input"]
    layers = []
    for i, entry in enumerate(raw):
        where = f"layers[{i}]"
        if not isinstance(entry, dict):
            check.fail(where, f"must be a table like {{ op = \"relu\" }}, got {entry!r}")
        if "op" not in entry:
            check.fail(where, "missing field 'op' (the library op of this layer)")
        info = check.lookup(where, entry["op"], LAYER_KINDS)
        where = f"layers[{i}] (op {info.name!r})"
        rest = {k: v for k, v in entry.items() if k not in ("op", "out")}
        attrs = check.attrs(where, rest, info.attrs, "attribute")

        width_in = width
        if info.elementwise:
            if "out" in entry:
                check.fail(where, "'out' is only for layers that change the width; this op is elementwise")
            width_out = width_in
            dims = {}
        else:
            if len(info.inputs) != 1 or len(info.inputs[0][1]) != 2 or len(info.output_shape) != 2:
                check.fail(where, "a model layer must map one (batch, features) input to a (batch, features) output")
            in_dim = info.inputs[0][1][1]
            out_dim = info.output_shape[1]
            if out_dim == in_dim:
                if "out" in entry:
                    check.fail(where, "'out' is not used: this op keeps the width of its input")
                width_out = width_in
            else:
                if "out" not in entry:
                    check.fail(where, "missing field 'out' (the width of this layer's output)")
                width_out = _positive_int(check, where, "out", entry["out"])
            dims = {in_dim: width_in, out_dim: width_out}

        params = []
        for pname, pshape in info.params:
            shape = []
            for d in pshape:
                if d not in dims:
                    check.fail(where, f"parameter {pname!r} has dimension {d!r}, which a model layer cannot bind")
                shape.append(dims[d])
            key = f"{info.name}{i}.{pname}"
            params.append((pname, key, tuple(shape), key.replace(".", "_")))

        first_input = info.inputs[0][0] if info.inputs else info.args[0][0]
        if i > 0 and first_input not in info.differentiable:
            check.fail(where, f"input {first_input!r} is not differentiable, so no gradient reaches the layers before it")
        by_arg = {p[0]: p for p in params}
        grads, param_grads = [], []
        for arg in info.differentiable:
            if arg in by_arg:
                _, key, _, local = by_arg[arg]
                grads.append("g_" + local)
                param_grads.append((key, local, "g_" + local))
            else:
                grads.append(f"g{i}" if i > 0 else "_")
        for pname, key, _, _ in params:
            if pname not in info.differentiable:
                check.fail(where, f"parameter {pname!r} is not differentiable, so it cannot be trained")
        # the first layer's input gradient is never used: its params-only core skips it
        if i == 0 and "params" in info.variants:
            bwd_core, bwd_unpack = core_name(info.name, "bwd_params"), tuple(g for _, _, g in param_grads)
        else:
            bwd_core, bwd_unpack = core_name(info.name, "bwd"), tuple(grads)
        layers.append(
            _Layer(
                index=i,
                var=f"_{info.name}{i}",
                op=info.name,
                kind=info.kind,
                attrs=attrs,
                params=tuple(params),
                fan_in=width_in,
                width_in=width_in,
                width_out=width_out,
                grads=tuple(grads),
                param_grads=tuple(param_grads),
                fwd_core=core_name(info.name, "fwd"),
                bwd_core=bwd_core,
                bwd_unpack=bwd_unpack,
                core_attrs=_core_attrs(info, rest),
            )
        )
        width = width_out
    return layers


def _check_spec(path: Path, spec: dict, infos: dict[str, OpInfo]) -> dict:
    """Validate ``spec``; return the template's context."""
    check = _Checker(path, infos)
    for field in REQUIRED_FIELDS:
        if field not in spec:
            check.fail("", f"missing field {field!r} (a model spec has {', '.join(REQUIRED_FIELDS)})")
    for field in spec:
        if field not in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            check.fail("", f"unknown field {field!r} (a model spec has {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})")
    if spec["kind"] != "model":
        check.fail("kind", f"must be \"model\" for a model spec, got {spec['kind']!r}")
    name = spec["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name) or keyword.iskeyword(name):
        check.fail("name", f"must be a lower-case Python identifier (it names the module), got {name!r}")
    doc = spec.get("doc", "")
    if not isinstance(doc, str):
        check.fail("doc", f"must be a string, got {doc!r}")
    _positive_int(check, "", "input", spec["input"])
    layers = _layers(check, spec)
    infos = check.infos

    loss_name = spec["loss"]
    loss_attrs: tuple = ()
    loss_given: dict = {}
    if isinstance(loss_name, dict):
        if "op" not in loss_name:
            check.fail("loss", "missing field 'op' (the library loss)")
        loss = check.lookup("loss", loss_name["op"], ("loss",))
        rest = {k: v for k, v in loss_name.items() if k != "op"}
        loss_attrs = check.attrs(f"loss (op {loss.name!r})", rest, loss.attrs, "attribute")
        loss_given = rest
    else:
        loss = check.lookup("loss", loss_name, ("loss",))
    if len(loss.differentiable) != 1 or loss.differentiable[0] != loss.args[0][0]:
        check.fail(f"loss (op {loss.name!r})", "a model loss must be differentiable in its first argument only")

    opt_spec = spec["optimizer"]
    if isinstance(opt_spec, str):
        opt_spec = {"op": opt_spec}
    if not isinstance(opt_spec, dict) or "op" not in opt_spec:
        check.fail("optimizer", "must be an op name or a table like { op = \"adam\", lr = 0.001 }")
    opt = check.lookup("optimizer", opt_spec["op"], ("optimizer",))
    rest = {k: v for k, v in opt_spec.items() if k != "op"}
    hyper = check.attrs(f"optimizer (op {opt.name!r})", rest, opt.hyper, "hyperparameter")

    if loss.name in CLASSIFICATION_LOSSES:
        task = "classification"
    elif loss.name in BINARY_LOSSES:
        task = "binary"
    else:
        task = "regression"

    params = [(key, shape, layer.fan_in) for layer in layers for _, key, shape, _ in layer.params]
    summary = []
    for layer in layers:
        width = f"{layer.width_in} -> {layer.width_out}"
        shapes = ", ".join(f"{key} {shape}" for _, key, shape, _ in layer.params)
        summary.append(f"{layer.index:<5}  {layer.op:<22}  {width:<11}  {shapes}".rstrip())
    # the fused step: the compiled cores it calls, by module
    cores: dict[str, set] = {}
    for layer, info in ((layer, infos[layer.op]) for layer in layers):
        cores.setdefault(info.module, set()).add(layer.fwd_core)
        if layer.needs_backward:
            cores[info.module].add(layer.bwd_core)
    loss_cores = (core_name(loss.name, "fwd"), core_name(loss.name, "bwd"))
    opt_core = core_name(opt.name, "step")
    cores.setdefault(loss.module, set()).update(loss_cores)
    cores.setdefault(opt.module, set()).add(opt_core)
    target = loss.args[1][0] if len(loss.args) > 1 else None
    slot_locals = [
        (f"{key}.{s}", f"{local}_{s}") for layer in layers for _, key, _, local in layer.params for s in opt.state
    ]
    return {
        "imports": [(m, sorted(cores[m])) for m in sorted(cores)],
        "modules": sorted(cores),
        "loss_fwd_core": loss_cores[0],
        "loss_bwd_core": loss_cores[1],
        "loss_core_attrs": _core_attrs(loss, loss_given),
        "target_int": target in loss.int_args,
        "opt_core": opt_core,
        "opt_counter": opt.counter,
        "opt_attrs": [
            (a, "int" if isinstance(d, int) and not isinstance(d, bool) else "float") for a, d in opt.attr_defaults
        ],
        "param_locals": [local for layer in layers for _, _, _, local in layer.params],
        "param_keys": [key for layer in layers for _, key, _, _ in layer.params],
        "slot_locals": slot_locals,
        "summary": summary,
        "hyper_literal": "{" + ", ".join(f'"{k}": {v}' for k, v in hyper) + "}",
        "slots_literal": _tuple_literal(opt.state),
        "name": name,
        "doc": doc.strip() or f"The {name} model.",
        "input": spec["input"],
        "output": layers[-1].width_out,
        "layers": layers,
        "params": params,
        "loss": loss.name,
        "loss_attrs": loss_attrs,
        "task": task,
        "optimizer": opt.name,
        "hyper": hyper,
        "slots": opt.state,
        "n": len(layers),
    }


def load_spec(spec_path) -> dict:
    """Parse a model spec's TOML (nothing is evaluated)."""
    path = Path(spec_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelSpecError(path, f"cannot read the model spec: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelSpecError(path, f"invalid TOML: {exc}") from None


def render_model(
    spec_path, programs: Iterable | Mapping | None = None, modules: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """Render one model spec; return ``("models/<name>.py", text)``.

    ``programs`` are the library's :class:`derive.ir.Program` objects (a list, or a dict
    by name); by default :func:`derive.library` is asked. The filename is relative to
    the ``generated/`` package. ``modules`` ({"layers.py": text, ...}) are the library
    modules the model's fused step compiles in, as they will be written; by default
    they are read from ``generated/``. Their digests go into the model's text, so the
    fused step's Numba cache (keyed on the model file) is invalidated whenever a
    kernel it was compiled from changes.
    """
    path = Path(spec_path)
    spec = load_spec(path)
    context = _check_spec(path, spec, _library_infos(programs))
    context["header"] = {"sources": [_display_path(path)], "template": TEMPLATE, "command": COMMAND}
    context["digests"] = [(m, _digest(m + ".py", modules)) for m in context["modules"]]
    text = render(TEMPLATE, **context)
    return f"models/{context['name']}.py", text


def _digest(filename: str, modules: Mapping[str, str] | None) -> str:
    if modules is not None and filename in modules:
        data = modules[filename].encode("utf-8")
    else:
        try:
            data = (REPO_ROOT / "generated" / filename).read_bytes()
        except OSError:
            return "missing"
    return hashlib.sha256(data).hexdigest()[:16]


def render_models_init(names: Iterable[str]) -> tuple[str, str]:
    """``generated/models/__init__.py``: the package of generated models, listing them."""
    context = {
        "names": sorted(names),
        "names_literal": _tuple_literal(sorted(names)),
        "header": {"sources": ["specs/models/*.toml"], "template": "model/__init__.py.jinja", "command": COMMAND},
    }
    text = render("model/__init__.py.jinja", **context)
    return "models/__init__.py", text
