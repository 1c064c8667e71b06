"""Writing library ops in Python with SymPy: the twin of the TOML spec language.

The helpers build exactly the symbols the TOML parser builds (indices are integer
Symbols, dimensions positive integer Symbols, tensors real IndexedBases), so a Python op
and its TOML twin produce the same OpDef and therefore the same code.
"""

from __future__ import annotations

import inspect

import sympy

from .functions import ReduceMax, ReduceMean, ReduceSum, reduce_terms
from .ir import dim, index
from .spec import Attr, Equation, OpDef, attr_domain, attr_symbol, check_shorthands, declare_attrs, finish_activation

Sum = ReduceSum
Max = ReduceMax
Mean = ReduceMean  # Mean(body, i, ...): the sum over the indices divided by their ranges' product
# Reduce(body, i, ..., weight=w): a loss's terms under PyTorch's `reduction` (derive/reductions.py)
Reduce = reduce_terms

x = sympy.Symbol("x", real=True)  # the argument of an activation


def dims(names: str):
    return tuple(dim(n) for n in names.split())


def indices(names: str):
    return tuple(index(n) for n in names.split())


def tensors(names: str):
    return tuple(sympy.IndexedBase(n, real=True) for n in names.split())


def scalar(name: str):
    return sympy.Symbol(name, real=True)


def attr(name: str, default):
    """The symbol of an attribute; ``default`` is a number or an :class:`Attr` (a default
    with the allowed values)."""
    if isinstance(default, Attr):
        default = attr_domain("derive/ops", name, default)[0]
    return attr_symbol(name, default)


def choice(default, values):
    """An attribute taking one of ``values`` (a list of numbers, or a dict name -> number,
    as PyTorch's ``reduction``: ``{"none": 0, "mean": 1, "sum": 2}``)."""
    return Attr(default, values=values)


FLAG = Attr(0, values=[0, 1])  # an integer switch, off by default (``causal``)


def _source():
    """The ops file that called the helper (loss() calls layer(): skip this file's frames)."""
    here = inspect.stack()[0].filename
    frame = next(f for f in inspect.stack()[1:] if f.filename != here)
    return "derive/ops/" + frame.filename.replace("\\", "/").rsplit("/", 1)[-1]


def _text(lhs, rhs):
    return f"{sympy.sstr(lhs)} = {sympy.sstr(rhs)}"


def activation(name, expr, attrs=None, doc=""):
    op = OpDef(name=name, kind="activation", source=_source(), doc=doc)
    declare_attrs(op, op.source, dict(attrs or {}))
    op.expr = expr
    op.expr_text = sympy.sstr(expr)
    return finish_activation(op)


def layer(name, inputs, outputs, equations, params=None, attrs=None, dims=None, ranges=None,
          differentiate=None, doc="", kind="layer", assume=(), dtypes=None, modes=None, shorthands=None):
    op = OpDef(name=name, kind=kind, source=_source(), doc=doc)
    op.inputs = {k: tuple(v.split()) for k, v in inputs.items()}
    op.params = {k: tuple(v.split()) for k, v in (params or {}).items()}
    op.outputs = {k: tuple(v.split()) for k, v in outputs.items()}
    op.dtypes = dict(dtypes or {})
    names = {d for t in (op.inputs, op.params, op.outputs) for s in t.values() for d in s} | set(dims or {})
    for d in sorted(names):
        op.symbols[d] = dim(d)
    declare_attrs(op, op.source, dict(attrs or {}))
    op.shorthands = check_shorthands(op.source, op.attrs, dict(shorthands or {}))
    op.derived_dims = dict(dims or {})
    op.ranges = dict(ranges or {})
    for lhs, rhs in equations:
        if isinstance(lhs, sympy.Indexed):
            op.equations.append(Equation(str(lhs.base), tuple(lhs.indices), rhs, _text(lhs, rhs)))
        else:
            op.equations.append(Equation(str(lhs), (), rhs, _text(lhs, rhs)))
    op.differentiate = differentiate
    op.assumptions = [(lhs, rhs, f"{sympy.sstr(lhs)} == {sympy.sstr(rhs)}") for lhs, rhs in assume]
    op.modes = dict(modes or {})
    return op


def loss(name, task="regression", **kw):
    """A layer with a scalar output; ``task`` says what the model's output means
    (one of derive.spec.TASKS)."""
    op = layer(name, kind="loss", **kw)
    op.task = task
    return op


def optimizer(name, state, hyper, update, doc="", scalar_state=None):
    """``update``: list of (target name, rhs) over scalar symbols p, g, state, hyper, t;
    a target that is none of p and the state is a temporary of the step.
    ``scalar_state``: per-step scalars (name -> initial value), as in a TOML spec."""
    op = OpDef(name=name, kind="optimizer", source=_source(), doc=doc)
    op.state = list(state)
    op.scalar_state = {k: float(v) for k, v in (scalar_state or {}).items()}
    op.hyper = dict(hyper)
    for h in op.hyper:
        op.symbols[h] = sympy.Symbol(h, real=True)
    op.symbols["t"] = sympy.Symbol("t", integer=True, positive=True)
    for target, rhs in update:
        op.equations.append(Equation(target, (), rhs, f"{target} = {sympy.sstr(rhs)}"))
    return op


def schedule(name, hyper, expr, doc=""):
    op = OpDef(name=name, kind="schedule", source=_source(), doc=doc)
    op.hyper = dict(hyper)
    for h in op.hyper:
        op.symbols[h] = sympy.Symbol(h, real=True)
    op.symbols["t"] = sympy.Symbol("t", integer=True, nonnegative=True)
    op.expr = expr
    op.expr_text = sympy.sstr(expr)
    return op
