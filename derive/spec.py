"""Op definitions: what a spec says, before any derivation.

An :class:`OpDef` is built either from a TOML file (:func:`load_toml`) or by a library
module in derive/ops/ written in Python with SymPy (:func:`activation`, :func:`layer`,
:func:`optimizer`, :func:`schedule`). Both paths end in the same object, so a TOML
spec and its Python twin produce the same Op and the same code.

:func:`bind` then checks the equations and gives every index its range: an index takes
its range from a position where it stands alone in a tensor read (``x[b,i]`` binds
``i`` to x's second dimension), or from ``ranges``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

import sympy

from .errors import SpecError
from .functions import Reduce, ReduceTerms, expand_means, expand_terms
from .ir import dim as dim_symbol
from .ir import index as index_symbol
from .parse import Scope, distribute, parse_equation, parse_expression

KINDS = ("activation", "layer", "loss", "optimizer", "schedule")

_KEYS = {
    "activation": {"name", "kind", "doc", "expr", "attrs"},
    "layer": {"name", "kind", "doc", "inputs", "params", "outputs", "attrs", "dims", "ranges", "equations", "differentiate", "assume", "dtypes", "shorthands"},
    "optimizer": {"name", "kind", "doc", "state", "scalar_state", "hyper", "update"},
    "schedule": {"name", "kind", "doc", "hyper", "expr"},
}
# a loss may say what the model's output means, which decides what a model predicts
_KEYS["loss"] = _KEYS["layer"] | {"task"}
TASKS = ("classification", "binary", "regression")
_REQUIRED = {
    "activation": ("name", "kind", "expr"),
    "layer": ("name", "kind", "inputs", "outputs", "equations"),
    "loss": ("name", "kind", "inputs", "outputs", "equations"),
    "optimizer": ("name", "kind", "update"),
    "schedule": ("name", "kind", "expr"),
}


@dataclass(frozen=True)
class AttrDomain:
    """The values an attribute may take, checked when the op is made (``op(...)``) and by
    a model spec: a finite set (``values``, with optional names for them: PyTorch's
    ``reduction = "none" | "mean" | "sum"`` are the codes 0, 1, 2) and/or bounds
    (``min``/``max`` inclusive, ``above``/``below`` exclusive). Whether the value is an
    integer comes from the attribute's default, as always."""

    values: tuple = ()  # the allowed values; empty: any (within the bounds)
    names: tuple = ()  # (name, value) pairs: a value may be given by its name
    min: int | float | None = None
    max: int | float | None = None
    above: int | float | None = None
    below: int | float | None = None

    def allows(self, value) -> bool:
        if self.values and value not in self.values:
            return False
        return not ((self.min is not None and value < self.min) or (self.max is not None and value > self.max)
                    or (self.above is not None and value <= self.above)
                    or (self.below is not None and value >= self.below))

    def describe(self) -> str:
        """The allowed values in words: ``0 (none), 1 (mean), 2 (sum)``, ``0 <= p < 1``."""
        label = {v: n for n, v in self.names}
        parts = []
        if self.values:
            parts.append(", ".join(f"{v!r} ({label[v]})" if v in label else repr(v) for v in self.values))
        low = f"{self.min!r} <= " if self.min is not None else (f"{self.above!r} < " if self.above is not None else "")
        high = f" <= {self.max!r}" if self.max is not None else (f" < {self.below!r}" if self.below is not None else "")
        if low or high:
            parts.append(f"{low}value{high}")
        return "; ".join(parts)

    def table(self) -> dict:
        """The domain as plain Python data, for the generated modules (only what is set)."""
        out = {}
        if self.values:
            out["values"] = tuple(self.values)
        if self.names:
            out["names"] = dict(self.names)
        for key in ("min", "max", "above", "below"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class Attr:
    """An attribute with its allowed values, in a library op (derive/dsl.py) as in a TOML
    spec's ``attrs = { name = { default = ..., values = [...] | { name = value }, min, max,
    above, below } }``. ``default`` may be one of the names of ``values``."""

    default: object
    values: object = None  # a list of numbers, or a dict name -> number
    min: int | float | None = None
    max: int | float | None = None
    above: int | float | None = None
    below: int | float | None = None


def attr_domain(path, name, spec: Attr):
    """(default, AttrDomain) of an attribute declared with its allowed values, or a
    SpecError naming the file and the attribute."""
    values, names = (), ()
    if isinstance(spec.values, dict):
        for n, v in spec.values.items():
            if not isinstance(n, str) or not n.isidentifier():
                raise SpecError(path, f"attribute `{name}`: the names of `values` must be identifiers, got {n!r}")
            _number(path, f"{name}.values.{n}", v)
        names = tuple(spec.values.items())
        values = tuple(v for _, v in names)
    elif spec.values is not None:
        if not isinstance(spec.values, (list, tuple)) or not spec.values:
            raise SpecError(path, f"attribute `{name}`: `values` must be a non-empty list of numbers or a table of named numbers")
        values = tuple(_number(path, f"{name}.values", v) for v in spec.values)
    bounds = {}
    for key in ("min", "max", "above", "below"):
        if getattr(spec, key) is not None:
            bounds[key] = _number(path, f"{name}.{key}", getattr(spec, key))
    default = spec.default
    if isinstance(default, str):
        if default not in dict(names):
            raise SpecError(path, f"attribute `{name}`: the default {default!r} is not one of the names of its values "
                                  f"({', '.join(n for n, _ in names) or 'none'})")
        default = dict(names)[default]
    _number(path, f"{name}.default", default)
    domain = AttrDomain(values, names, **bounds)
    if isinstance(default, int) and any(isinstance(v, float) and v != int(v) for v in (*values, *bounds.values())):
        raise SpecError(path, f"attribute `{name}` is an integer (its default {default!r} is) but its allowed values are not")
    if not domain.allows(default):
        raise SpecError(path, f"attribute `{name}`: the default {default!r} is not an allowed value ({domain.describe()})")
    return default, domain


def declare_attrs(op, path, table: dict) -> None:
    """``op.attrs`` (defaults), ``op.attr_domains`` and the attributes' symbols from a
    table name -> number or :class:`Attr` (a TOML spec's inline table is turned into one)."""
    for a, v in table.items():
        if isinstance(v, dict):
            unknown = sorted(set(v) - {"default", "values", "min", "max", "above", "below"})
            if unknown or "default" not in v:
                raise SpecError(path, f"attribute `{a}`: a table declares `default` and may declare `values`, "
                                      f"`min`, `max`, `above`, `below`" + (f"; unknown key `{unknown[0]}`" if unknown else ""))
            v = Attr(**v)
        if isinstance(v, Attr):
            op.attrs[a], op.attr_domains[a] = attr_domain(path, a, v)
        else:
            op.attrs[a] = _number(path, a, v)
        op.symbols[a] = attr_symbol(a, op.attrs[a])


@dataclass
class Equation:
    """``target[index] = rhs``; ``rhs`` may contain Reduce nodes."""

    target: str
    index: tuple[sympy.Symbol, ...]
    rhs: sympy.Expr
    text: str
    ranges: dict[sympy.Symbol, sympy.Expr] = field(default_factory=dict)  # set by bind()
    # the tensor reads and reductions of the text as written (a TOML spec's), before
    # SymPy's evaluation: sum(w[b, n] / w[b, n], n) still binds n to w's axis although the
    # rhs is sum(1, n), and 0 * max(x[j], j) still binds j
    reads: tuple = ()


@dataclass
class OpDef:
    name: str
    kind: str
    source: str
    doc: str = ""
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # input name -> "int" (index data)
    attrs: dict[str, int | float] = field(default_factory=dict)
    attr_domains: dict[str, AttrDomain] = field(default_factory=dict)  # allowed values, where declared
    # a name setting several attributes at once (S = ("SH", "SW")), see check_shorthands
    shorthands: dict[str, tuple[str, ...]] = field(default_factory=dict)
    derived_dims: dict[str, sympy.Expr] = field(default_factory=dict)
    # `dims` entries naming an argument's dimension: relations checked against the shapes
    # at run time (``G = 4*H``); split off derived_dims by bind()
    relations: dict[str, sympy.Expr] = field(default_factory=dict)
    relation_notes: dict[str, str] = field(default_factory=dict)  # why a relation is implied
    ranges: dict[str, sympy.Expr] = field(default_factory=dict)
    equations: list[Equation] = field(default_factory=list)
    differentiate: list[str] | None = None
    # losses: what the model's output means (TASKS): classes scored by the output's
    # last axis, a binary label per element (logit > 0), or the value itself
    task: str = "regression"
    # layers: how a model runs it outside training (ir.Program.modes)
    modes: dict[str, str | float] = field(default_factory=dict)
    # facts about the data the derivation may use, e.g. sum(target[b, c], c) == 1
    assumptions: list[tuple[sympy.Expr, sympy.Expr, str]] = field(default_factory=list)
    # optimizers and schedules: per-element state (arrays shaped like p, starting at 0)
    # and per-step scalar state (name -> initial value, updated once per step)
    state: list[str] = field(default_factory=list)
    scalar_state: dict[str, float] = field(default_factory=dict)
    hyper: dict[str, int | float] = field(default_factory=dict)
    expr: sympy.Expr | None = None
    expr_text: str = ""
    # every symbol by name (dims, attrs, hyper)
    symbols: dict[str, sympy.Symbol] = field(default_factory=dict)
    # filled by bind(): index -> range size, intermediate shapes
    index_ranges: dict[sympy.Symbol, sympy.Expr] = field(default_factory=dict)
    intermediates: dict[str, tuple[sympy.Expr, ...]] = field(default_factory=dict)

    def shape_of(self, name: str) -> tuple[sympy.Expr, ...]:
        for table in (self.inputs, self.params, self.outputs):
            if name in table:
                return tuple(self.symbols[d] for d in table[name])
        return self.intermediates[name]


# ---------------------------------------------------------------------------
# TOML


def _parse_dims(path, owner, text) -> tuple[str, ...]:
    if not isinstance(text, str):
        raise SpecError(path, f"the shape of `{owner}` must be a string of dimension names, got {text!r}")
    names = tuple(text.split())
    for n in names:
        if not n.isidentifier() or n.startswith("_"):
            raise SpecError(path, f"`{n}` in the shape of `{owner}` is not a dimension name")
    return names


def _number(path, owner, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(path, f"`{owner}` must be a number, got {value!r}")
    return value


def attr_symbol(name, default):
    """The SymPy symbol of an attribute: an integer default makes it an integer, and a
    positive default a nonnegative one (a stride, a size, a padding, a flag: 0 is a value
    a user may give), which the derivation's index arithmetic relies on. Positivity is
    taken only where it is needed, for an attribute that divides (:func:`positive_divisors`)."""
    if isinstance(default, int):
        return sympy.Symbol(name, integer=True, nonnegative=True) if default > 0 else sympy.Symbol(name, integer=True)
    return sympy.Symbol(name, real=True)


def check_shorthands(path, attrs: dict, table: dict) -> dict[str, tuple[str, ...]]:
    """A spec's ``shorthands``: each name sets several attributes of one type at once
    (``S = ["SH", "SW"]``: ``op(S=2)`` is ``op(SH=2, SW=2)``, as PyTorch's ``stride=2``);
    an attribute given by its own name overrides the shorthand."""
    out = {}
    for name, parts in table.items():
        if name in attrs:
            raise SpecError(path, f"shorthand `{name}` is also an attribute")
        if isinstance(parts, str) or not isinstance(parts, (list, tuple)) or not parts:
            raise SpecError(path, f"shorthand `{name}` must be a list of attribute names, like [\"SH\", \"SW\"]")
        for part in parts:
            if part not in attrs:
                raise SpecError(path, f"shorthand `{name}` names `{part}`, which is not an attribute")
        if len({type(attrs[part]) for part in parts}) != 1:
            raise SpecError(path, f"shorthand `{name}` sets attributes of different types ({', '.join(parts)})")
        out[name] = tuple(parts)
    return out


def _divisors(expr) -> set:
    """The symbols of ``expr`` that stand in a divisor: ``a / S``, ``a // S`` (a floor of a
    quotient), ``a % S``."""
    found = set()
    if not isinstance(expr, sympy.Basic):
        return found
    for node in sympy.preorder_traversal(expr):
        if node.is_Pow and node.exp.is_negative:
            found |= node.base.free_symbols
        elif isinstance(node, sympy.Mod):
            found |= node.args[1].free_symbols
    return found


def _replace_everywhere(obj, mapping):
    if isinstance(obj, sympy.Basic):
        return obj.xreplace(mapping)
    if isinstance(obj, tuple):
        return tuple(_replace_everywhere(o, mapping) for o in obj)
    if isinstance(obj, list):
        return [_replace_everywhere(o, mapping) for o in obj]
    return obj


def positive_divisors(op: OpDef) -> None:
    """An integer attribute that divides (a stride in ``(H - K) // S + 1``, ``n % S``) is
    positive to the derivation: its symbol is replaced, in place, by a positive one in
    every expression of ``op``. Any other integer attribute keeps the sign its default
    gives (nonnegative where the default is positive), so a condition on it
    (``where(flag > 0, ...)``) is decided by the value the op is given, not when it is
    derived."""
    exprs = [*op.derived_dims.values(), *op.relations.values(), *op.ranges.values(), op.expr,
             *(e.rhs for e in op.equations), *(r for e in op.equations for r in e.reads),
             *(v for a in op.assumptions for v in a[:2])]
    divisors = set().union(*(_divisors(e) for e in exprs))
    mapping = {}
    for a, v in op.attrs.items():
        sym = op.symbols.get(a)
        if isinstance(v, int) and v > 0 and sym in divisors and not sym.is_positive:
            mapping[sym] = sympy.Symbol(a, integer=True, positive=True)
    if not mapping:
        return
    for a, sym in list(op.symbols.items()):
        op.symbols[a] = mapping.get(sym, sym)
    for table in (op.derived_dims, op.relations, op.ranges):
        for k in table:
            table[k] = table[k].xreplace(mapping)
    if op.expr is not None:
        op.expr = op.expr.xreplace(mapping)
    for e in op.equations:
        e.rhs = e.rhs.xreplace(mapping)
        e.reads = _replace_everywhere(e.reads, mapping)
        e.ranges = {k: v.xreplace(mapping) for k, v in e.ranges.items()}
    op.assumptions = [(lhs.xreplace(mapping), rhs.xreplace(mapping), text) for lhs, rhs, text in op.assumptions]


def load_toml(path) -> OpDef:
    """Read a TOML spec file into an OpDef (nothing in it is evaluated as Python)."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, f"TOML syntax error: {exc}") from None
    except OSError as exc:
        raise SpecError(path, f"cannot read the spec: {exc.strerror}") from None
    return from_dict(data, path)


def from_dict(data: dict, path: str) -> OpDef:
    kind = data.get("kind")
    if kind not in KINDS:
        raise SpecError(path, f"`kind` must be one of {', '.join(KINDS)}, got {kind!r}")
    for key in _REQUIRED[kind]:
        if key not in data:
            article = "an" if kind[0] in "aeiou" else "a"
            raise SpecError(path, f"{article} {kind} spec needs the key `{key}`")
    for key in data:
        if key not in _KEYS[kind]:
            raise SpecError(path, f"unknown key `{key}` for a {kind} spec")
    name = data["name"]
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(path, f"`name` must be an identifier, got {name!r}")
    op = OpDef(name=name, kind=kind, source=path, doc=str(data.get("doc", "")))
    if kind == "activation":
        return _activation_from_dict(op, data, path)
    if kind == "optimizer":
        return _optimizer_from_dict(op, data, path)
    if kind == "schedule":
        return _schedule_from_dict(op, data, path)
    if kind == "loss" and "task" in data:
        if data["task"] not in TASKS:
            raise SpecError(path, f"`task` must be one of {', '.join(TASKS)}, got {data['task']!r}")
        op.task = data["task"]
    return _layer_from_dict(op, data, path)


def _table(path, data, key):
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(path, f"`{key}` must be a table")
    return value


def _layer_from_dict(op: OpDef, data: dict, path: str) -> OpDef:
    for key in ("inputs", "params", "outputs"):
        table = {n: _parse_dims(path, n, t) for n, t in _table(path, data, key).items()}
        setattr(op, key, table)
    names = list(op.inputs) + list(op.params) + list(op.outputs)
    if len(set(names)) != len(names):
        raise SpecError(path, "a tensor name is declared twice among inputs, params and outputs")
    attrs_table = _table(path, data, "attrs")
    for k, v in _table(path, data, "dtypes").items():
        if k not in op.inputs:
            raise SpecError(path, f"`dtypes` names `{k}`, which is not an input")
        if v not in ("int", "float"):
            raise SpecError(path, f"the dtype of `{k}` must be \"int\" or \"float\", got {v!r}")
        op.dtypes[k] = v
    dims_text = _table(path, data, "dims")
    ranges_text = _table(path, data, "ranges")
    all_dims = {d for table in (op.inputs, op.params, op.outputs) for shape in table.values() for d in shape}
    for d in sorted(all_dims | set(dims_text)):
        op.symbols[d] = dim_symbol(d)
    declare_attrs(op, path, attrs_table)
    op.shorthands = check_shorthands(path, op.attrs, _table(path, data, "shorthands"))
    scope = Scope(path, symbols=dict(op.symbols))
    for d, text in dims_text.items():
        op.derived_dims[d] = parse_expression(str(text), scope)
    for i, text in ranges_text.items():
        op.ranges[i] = parse_expression(str(text), scope)
    equations = data["equations"]
    if isinstance(equations, str):
        equations = [equations]
    if not isinstance(equations, list) or not equations:
        raise SpecError(path, "`equations` must be a non-empty list of strings")
    op.equations = parse_equations(op, equations, path)
    assume = data.get("assume", [])
    if not isinstance(assume, list):
        raise SpecError(path, "`assume` must be a list of equalities such as `sum(target[b, c], c) == 1`")
    tensors = {n: len(s) for table in (op.inputs, op.params, op.outputs) for n, s in table.items()}
    for text in assume:
        fact = parse_expression(text, Scope(path, tensors=dict(tensors), symbols=dict(op.symbols)))
        if not isinstance(fact, sympy.Eq) or not isinstance(fact.lhs, Reduce):
            raise SpecError(path, "an assumption must read `sum(expr, i, ...) == value`", text)
        op.assumptions.append((fact.lhs, fact.rhs, text))
    diff = data.get("differentiate")
    if diff is not None:
        if not isinstance(diff, list) or not all(isinstance(d, str) for d in diff):
            raise SpecError(path, "`differentiate` must be a list of argument names")
        for d in diff:
            if d not in op.inputs and d not in op.params:
                raise SpecError(path, f"`differentiate` names `{d}`, which is not an input or param")
        op.differentiate = list(diff)
    return op


def parse_equations(op: OpDef, texts: list[str], path: str) -> list[Equation]:
    """Parse equations in order; each target not declared as an output is an intermediate
    that later equations may read."""
    tensors = {n: len(s) for table in (op.inputs, op.params, op.outputs) for n, s in table.items()}
    scope = Scope(path, tensors=dict(tensors), symbols=dict(op.symbols))
    extra = set(op.ranges)
    result = []
    for text in texts:
        if not isinstance(text, str):
            raise SpecError(path, f"an equation must be a string, got {text!r}")
        reads = []
        target, idx, rhs = parse_equation(text, scope, extra, reads)
        if target in op.inputs or target in op.params:
            raise SpecError(path, f"`{target}` is an input and cannot be assigned", text)
        if target in op.outputs and len(op.outputs[target]) != len(idx):
            raise SpecError(path, f"output `{target}` has rank {len(op.outputs[target])} but is written with {len(idx)} indices", text)
        scope.tensors.setdefault(target, len(idx))
        result.append(Equation(target, idx, rhs, text.strip(), reads=tuple(reads)))
    return result


def _activation_from_dict(op, data, path):
    declare_attrs(op, path, _table(path, data, "attrs"))
    scope = Scope(path, symbols=dict(op.symbols))
    scope.symbols["x"] = sympy.Symbol("x", real=True)
    op.expr = parse_expression(data["expr"], scope)
    op.expr_text = str(data["expr"])
    return finish_activation(op)


def finish_activation(op: OpDef) -> OpDef:
    """An activation ``y = f(x)`` is the layer ``y[n] = f(x[n])`` over the flat array."""
    x = sympy.Symbol("x", real=True)
    n = sympy.Symbol("n", integer=True)
    op.symbols["N"] = dim_symbol("N")
    op.inputs = {"x": ("N",)}
    op.outputs = {"y": ("N",)}
    xb = sympy.IndexedBase("x", real=True)
    with distribute(False):  # a decimal times a sum stays as written (derive/parse.py)
        rhs = op.expr.subs(x, xb[n])
    text = op.expr_text or str(op.expr)
    op.equations = [Equation("y", (n,), rhs, f"y = {text}")]
    return op


def _optimizer_from_dict(op, data, path):
    state = data.get("state", [])
    if not isinstance(state, list) or not all(isinstance(s, str) and s.isidentifier() for s in state):
        raise SpecError(path, "`state` must be a list of names")
    op.state = list(state)
    for k, v in _table(path, data, "scalar_state").items():
        if not k.isidentifier() or k.startswith("_"):
            raise SpecError(path, f"`{k}` in `scalar_state` is not a name")
        if k in op.state:
            raise SpecError(path, f"`{k}` is in both `state` and `scalar_state`")
        op.scalar_state[k] = float(_number(path, f"scalar_state.{k}", v))
    op.hyper = {k: _number(path, k, v) for k, v in _table(path, data, "hyper").items()}
    updates = data["update"]
    if not isinstance(updates, list) or not updates:
        raise SpecError(path, "`update` must be a non-empty list of equations")
    for h in op.hyper:
        op.symbols[h] = sympy.Symbol(h, real=True)
    op.symbols["t"] = sympy.Symbol("t", integer=True, positive=True)
    for name in ["p", "g", *op.state, *op.scalar_state]:
        if name in op.symbols:
            raise SpecError(path, f"`{name}` names both a hyperparameter (or the step t) and a tensor of the update")
    scope = Scope(path, tensors={n: 0 for n in ["p", "g", *op.state, *op.scalar_state]}, symbols=dict(op.symbols),
                  whole=WHOLE)
    for text in updates:
        target, idx, rhs = parse_equation(text, scope)
        if idx:
            raise SpecError(path, f"an update line assigns a plain name (p, a state or a temporary), not `{target}[...]`", text)
        if target in op.symbols:
            raise SpecError(path, f"`{target}` is a hyperparameter (or the step t) and cannot be assigned", text)
        # any other new name is a temporary: a local value of the step that later lines read
        scope.tensors.setdefault(target, 0)
        op.equations.append(Equation(target, (), rhs, text.strip()))
    return op


# the element an optimizer's update reads; ``sum(expr)`` in an update reduces over it
WHOLE = index_symbol("n")


def _schedule_from_dict(op, data, path):
    op.hyper = {k: _number(path, k, v) for k, v in _table(path, data, "hyper").items()}
    for h in op.hyper:
        op.symbols[h] = sympy.Symbol(h, real=True)
    op.symbols["t"] = sympy.Symbol("t", integer=True, nonnegative=True)
    op.symbols["lr"] = sympy.Symbol("lr", real=True)
    scope = Scope(path, symbols=dict(op.symbols))
    op.expr = parse_expression(data["expr"], scope)
    op.expr_text = str(data["expr"])
    return op


# ---------------------------------------------------------------------------
# Binding: ranges for every index, shapes for every intermediate.


def _reduce_nodes(expr):
    return [n for n in sympy.preorder_traversal(expr) if isinstance(n, Reduce)]


def split_dims(op: OpDef) -> None:
    """Sort ``dims`` into derived dimensions (computed from the arguments' sizes and the
    attributes) and relations: an entry naming a dimension an argument already has
    (``G = "4*H"`` where x is ``B G``) states a fact about the shapes, checked at run
    time and used by the derivation. A relation whose right-hand side has a dimension no
    argument binds (GLU's ``G = "2*H"``, H only in the output) is solved for it: H is
    derived as the exact quotient G/2 (a size that does not divide is an error at run
    time, never a truncation)."""
    path = op.source
    arg_dims = {d for table in (op.inputs, op.params) for shape in table.values() for d in shape}
    derived = {}
    for d, e in op.derived_dims.items():
        if d in arg_dims:
            op.relations[d] = e
        else:
            derived[d] = e
    # an exact quotient H = G/2 states the relation G = 2*H too
    for d, e in derived.items():
        if e.is_integer is not False and not e.is_integer:
            num, den = sympy.fraction(sympy.together(e))
            for s in sorted(num.free_symbols, key=str):
                if s.name in arg_dims and s.name not in op.relations:
                    solutions = sympy.solve(sympy.Eq(num, den * op.symbols[d]), s)
                    if len(solutions) == 1:
                        op.relations[s.name] = solutions[0]
                        break
    known = arg_dims | set(derived) | set(op.attrs)
    solved = {}
    for d, e in op.relations.items():
        unknown = sorted((s for s in e.free_symbols if s.name not in known), key=str)
        if not unknown:
            continue
        if len(unknown) > 1:
            raise SpecError(
                path,
                f"the relation {d} = {e} in `dims` has more than one dimension no argument binds "
                f"({', '.join(map(str, unknown))}); give each of them in `dims` or bind it from an argument",
            )
        x = unknown[0]
        solutions = sympy.solve(sympy.Eq(op.symbols[d], e), x)
        if len(solutions) != 1:
            raise SpecError(path, f"the relation {d} = {e} in `dims` cannot be solved for {x}; give {x} in `dims`")
        solved[x.name] = solutions[0]
        known.add(x.name)
    op.derived_dims = {**solved, **derived}


def multiple_of(op: OpDef, big, small) -> bool:
    """Whether the relations of ``dims`` make the size ``big`` a whole multiple (2 or
    more) of ``small``."""
    if not op.relations:
        return False
    facts = {op.symbols[d]: e for d, e in op.relations.items()}
    ratio = sympy.simplify(sympy.sympify(big).xreplace(facts) / sympy.sympify(small).xreplace(facts))
    return ratio.is_Integer and ratio > 1


def _range_from_readers(op: OpDef, eq, i, shapes: dict):
    """The range of index ``i`` of an intermediate's left-hand side that no read of its own
    equation binds (``theta[t,d] = t * 10000**(-2*(d // 2) / D)``), from where a later
    equation reads the intermediate with a bare index at that position, bound there by a
    tensor of known shape (``y[b,t,d] = x[b,t,d]*cos(theta[t,d]) ...``): (size, where), or None."""
    k = eq.index.index(i)
    for other in op.equations[op.equations.index(eq) + 1:]:
        reads = sorted(other.rhs.atoms(sympy.Indexed) | {r for r in other.reads if isinstance(r, sympy.Indexed)},
                       key=sympy.default_sort_key)
        for r in reads:
            if str(r.base) != eq.target or len(r.indices) != len(eq.index) or not isinstance(r.indices[k], sympy.Symbol):
                continue
            j = r.indices[k]
            if j.name in op.ranges:
                return op.ranges[j.name], f"the range of `{j}`, where `{eq.target}` is read as `{r}`"
            bound = [(str(t.base), n) for t in reads if str(t.base) in shapes for n, e in enumerate(t.indices) if e == j]
            if other.target in op.outputs:
                bound += [(other.target, n) for n, e in enumerate(other.index) if e == j]
            if bound:
                name, n = bound[0]
                return shapes[name][n], f"dimension {n + 1} of `{name}`, where `{eq.target}` is read as `{r}`"
    return None


def bind(op: OpDef) -> OpDef:
    """Give every index a range and every intermediate a shape, or fail clearly."""
    path = op.source
    positive_divisors(op)
    split_dims(op)
    shapes: dict[str, tuple[sympy.Expr, ...]] = {}
    dim_names: dict[str, tuple[str, ...]] = {}
    for table in (op.inputs, op.params, op.outputs):
        for n, s in table.items():
            shapes[n] = tuple(op.symbols[d] for d in s)
            dim_names[n] = s
    ranges: dict[sympy.Symbol, sympy.Expr] = {}
    for name, size in op.ranges.items():
        ranges[sympy.Symbol(name, integer=True)] = size
    for eq in op.equations:
        local: dict[sympy.Symbol, tuple[sympy.Expr, str]] = {}

        def bind_index(i, size, where):
            if i in local and local[i][1] == "ranges":
                return  # an explicit range wins: the read covers part of that dimension
            if i in local and local[i][0] != size:
                # a relation in `dims` (G = 4*H) says one axis is a whole multiple of the
                # other: the index runs over the smaller one, a part of the larger axis
                if multiple_of(op, local[i][0], size):
                    local[i] = (size, where)
                    return
                if multiple_of(op, size, local[i][0]):
                    return
                raise SpecError(
                    path,
                    f"index `{i}` is bound to two different dimensions: {local[i][0]} "
                    f"({local[i][1]}) and {size} ({where}); if one read covers only part of "
                    f"its axis (a slice at an offset, such as one gate of a 4*H axis), state "
                    f"the relation in `dims` (G = \"4*H\") or give `{i}` the slice's size in `ranges`; "
                    f"if they are different axes, use a different index name for each",
                    eq.text,
                )
            local.setdefault(i, (size, where))

        for i_name, size in op.ranges.items():
            local[sympy.Symbol(i_name, integer=True)] = (size, "ranges")
        # the reads of the text as written too: one that SymPy cancelled (w/w, x - x)
        # still binds its indices, as the user reads the spec
        written = {r for r in eq.reads if isinstance(r, sympy.Indexed)}
        reads = sorted(eq.rhs.atoms(sympy.Indexed) | written, key=sympy.default_sort_key)
        for read in reads:
            name = str(read.base)
            if name not in shapes:
                raise SpecError(path, f"`{name}` is read before it is defined", eq.text)
            shape = shapes[name]
            for k, e in enumerate(read.indices):
                if isinstance(e, sympy.Symbol) and e.is_integer and e not in op.symbols.values():
                    bind_index(e, shape[k], f"dimension {k + 1} of `{name}`")
        if eq.target in shapes and eq.target in op.outputs:
            for k, i in enumerate(eq.index):
                bind_index(i, shapes[eq.target][k], f"dimension {k + 1} of output `{eq.target}`")
        bound_by_reduce = set()
        for node in _reduce_nodes(eq.rhs) + [r for r in eq.reads if isinstance(r, Reduce)]:
            bound_by_reduce.update(node.indices)
        all_indices = set()
        for read in reads:
            for e in read.indices:
                all_indices |= {
                    s for s in e.free_symbols
                    if isinstance(s, sympy.Symbol) and s not in op.symbols.values() and s.name not in shapes
                }
        all_indices |= set(eq.index) | bound_by_reduce
        for i in sorted(all_indices, key=str):
            if i not in local and i in eq.index and eq.target not in shapes:
                found = _range_from_readers(op, eq, i, shapes)
                if found is not None:
                    bind_index(i, *found)
            if i not in local:
                raise SpecError(
                    path,
                    f"index `{i}` has no range: it never stands alone in a tensor read; "
                    f"give it one in `ranges`",
                    eq.text,
                )
            if i not in eq.index and i not in bound_by_reduce:
                raise SpecError(
                    path,
                    f"index `{i}` is used but never bound: it is neither on the left-hand "
                    f"side nor summed or maximised over",
                    eq.text,
                )
        for i, (size, _) in local.items():
            ranges[i] = size
        eq.ranges = {i: size for i, (size, _) in local.items()}
        eq.rhs = expand_means(eq.rhs, eq.ranges)
        if eq.rhs.has(ReduceTerms):  # a loss's reduce(...) (derive/reductions.py)
            eq.rhs = expand_terms(eq.rhs, eq.ranges, op.symbols["reduction"])
        if eq.target not in shapes:
            shapes[eq.target] = tuple(local[i][0] for i in eq.index)
            op.intermediates[eq.target] = shapes[eq.target]
        for i in eq.index:
            if i not in local:
                raise SpecError(path, f"index `{i}` on the left-hand side has no range", eq.text)
    missing = [o for o in op.outputs if o not in [e.target for e in op.equations]]
    if missing:
        raise SpecError(path, f"output `{missing[0]}` is never assigned")
    op.index_ranges = ranges
    implied_relations(op)
    return op


def implied_relations(op: OpDef) -> None:
    """A dimension derived by floor division, ``H = "G // 2"``, that the equations use as
    the size of blocks of G (a read of an axis of size G at ``j + m*H``, j over H and m a
    whole number or a loop index over the divisor) splits G into parts: the spec implies
    the relation G = 2*H, which is checked when the op runs (an odd G is an error, not a
    silently dropped column) and used by the derivation, as if it were stated."""
    shapes = {n: op.shape_of(n) for table in (op.inputs, op.params) for n in table}
    for d, e in op.derived_dims.items():
        if not isinstance(e, sympy.floor):
            continue
        whole, divisor = sympy.fraction(sympy.together(e.args[0]))
        if not (isinstance(whole, sympy.Symbol) and whole.name in shapes_dims(op)) or whole.name in op.relations:
            continue
        size = op.symbols[d]
        if _splits(op, shapes, whole, size, divisor):
            op.relations[whole.name] = divisor * size
            op.relation_notes[whole.name] = f"implied by {d} = {whole} // {divisor} splitting {whole} into parts"


def shapes_dims(op: OpDef) -> set[str]:
    return {d for table in (op.inputs, op.params) for shape in table.values() for d in shape}


def _splits(op, shapes, whole, size, divisor) -> bool:
    for eq in op.equations:
        for read in eq.rhs.atoms(sympy.Indexed):
            shape = shapes.get(str(read.base))
            if shape is None:
                continue
            for e, n in zip(read.indices, shape):
                if n != whole:
                    continue
                terms = sympy.Add.make_args(sympy.expand(e))
                inner = [t for t in terms if t in eq.ranges and sympy.simplify(eq.ranges[t] - size) == 0]
                blocks = [t for t in terms if t not in inner]
                if len(inner) != 1 or not blocks:
                    continue
                ok = True
                for t in blocks:
                    m = sympy.simplify(t / size)
                    if not ((m.is_Integer and m > 0) or (m in eq.ranges and sympy.simplify(eq.ranges[m] - divisor) == 0)):
                        ok = False
                if ok:
                    return True
    return False
