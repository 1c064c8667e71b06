"""Differential fuzzing of the spec language (issue 11): random specs, each with its
PyTorch reference, and the check that builds one and compares it.

The generator draws one expression tree per equation and renders it twice: as spec text
(SymPy syntax, what a user writes in a TOML file) and as a function on float64 torch
tensors (the oracle). Nothing is derived by hand and nothing is shared with derive/ or
codegen/: the oracle is an interpreter of the same tree over torch, with reads as
gathers (out-of-bounds reads are zero, as the spec language says) and reductions as
torch sums and maxima over the axes of an index space.

Families (``family`` of :func:`specs`), together the whole spec language:

* ``activation``: ``kind = "activation"``, ``expr`` in ``x`` (float attributes too);
* ``layer``: inputs and params of shapes over B, N, K; intermediates (rank 0, 1, 2);
  one or two outputs, a later equation reading an earlier output; sums, maxima and
  contractions (``sum(x[b,i] * w[i,k], i)``); float attributes; ``differentiate``;
  reads with integer arithmetic (``x[b, N - 1 - n]``, ``x[b, (n + 1) % N]``, ``x[b, n//2]``,
  ``x[b, n + 1]`` read as zero past the end); sizes 1, 2-4, sometimes 9 or 17;
* ``window``: strided, padded and dilated reads ``x[b, c, o*S + p*D - P]`` with attributes
  (default and given at run time), ``dims`` and ``ranges``, sum or max over the window;
* ``split``: an axis split into parts, ``dims = { G = "R*H" }`` (a relation),
  ``ranges = { j = "H" }``, ``x[b, j + 2*H]`` (GLU's halves, an LSTM's gates);
* ``loss``: a scalar output (``sum(..., b, n) / B``), ``differentiate = [...]``;
* ``optimizer``: state, scalar state, hyperparameters (default and given at run time),
  ``t``, temporaries; ``op.step`` over three steps is compared with the same update tree
  evaluated by torch;
* ``gather``: an integer input (``dtypes = { idx = "int" }``) used as an index into a
  parameter table (``table[idx[b], d]``, also ``table[(idx[b] + 1) % V, d]``), drawn with
  repeated values so that the table's gradient is a scatter-add, and as a value in
  comparisons (``where(idx[b] > 1, ...)``, a one-hot ``where(Eq(v, idx[b]), table[v, d], 0)``);
* ``assume``: ``assume = ["sum(target[b, c], c) == 1"]`` with target rows drawn to satisfy
  it, read by cross-entropy-like forms whose derivation may use it; the check then
  breaks a row (masked to zero, scaled) and requires the forward to stay right and the
  backward to raise the documented error naming the op and the assumption.

The large-input mode (``large=True``; families ``stable_act``, ``stable_layer``,
``stable_loss`` and the general ``activation`` and ``layer``) draws the shapes where
stability matters (log of a sigmoid, softplus written out, ratios of exponentials
inline and over an index, softmax and attention, log-sum-exp, log-softmax, the log of a
softmax ratio, a softmax or sigmoid named on its own line and then logged, ``x log x``,
focal and binary cross-entropy losses, scores from a contraction) on inputs at |v| ~
1e2-1e3 (mixed signs, one in five near zero, or a large row offset plus small
differences; and a second sample with exact 0, 1 and -1 among them, where functions
have kinks, see :func:`_check_kinks`). The reference there is :func:`mp_reference`: the same tree evaluated with
mpmath at 50 digits, more where its intermediates are large (50 + m digits where one
reaches 1e m, and a step of 1e-(20 + m) with m more digits where the step of 1e-20 is too
coarse; 1000 where 50 leave a value non-finite), gradients by central differences; a sample whose true value or gradient overflows is
discarded, and everything else must be finite and accurate (:func:`_check_large`).

Expressions use every whitelisted function (derive/functions.py FUNCTIONS), where with
comparisons (``>``, ``==``, ``Gt(a, b)``, ``Ne(a, b)``), ``and``/``or``/``not`` and ``And``/``Or``/``Not``,
Max/Min, quotients (negative coefficients over squares:
``1/x``, ``x/s``), integer, negative, rational, float and symbolic powers, unary minus,
nested divisions and reductions. Inputs keep every function in its domain: each float
input is sampled away from zero (|v| in [0.3, 1.5]), some inputs positive; a logarithm,
square root or fractional power gets a positive argument (a positive input, or a wrapped
``1 + e**2``, ``exp(e)``, ``cosh(e)``, ``2 + sin(e)`` ...), a quotient a non-zero
denominator (an input read, or such a wrapped form). Kinks (abs, sign, floor, Max, Min,
where, relu) can still land near a sample point inside a compound argument: a sample
where PyTorch's own autograd disagrees with central differences is *discarded*, not
counted, as is one whose reference value overflows.

:func:`check` builds one spec (``codegen.build``) in its own directory and returns an
:class:`Outcome`: ``ok``; ``refused`` (a clear ``SpecError``; not wrong); ``discarded``
(the sample point is unusable, see above); ``wrong`` (a value, a gradient, a shape, a
dtype, or the op's signature differs from the contract); ``crash`` (any other exception
while building, printing LaTeX or running: a TypeError in the LaTeX printer, a
SyntaxError in the generated module); ``oracle`` (this file's own reference failed: a
bug here). Every op is called twice, the second time with another batch size. With
``float32=True`` the float32 results' error must be within a factor of PyTorch's own
float32 error (else ``imprecise``, reported apart). tests/test_fuzz.py runs a bounded,
derandomised number of these; scripts/fuzz_campaign.py runs long campaigns.
"""

from __future__ import annotations

import hashlib
import math
import operator
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import mpmath
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import reference as ref

torch.set_default_dtype(torch.float64)

# ======================================================================================
# Index expressions: integer arithmetic over indices, attributes and dimensions
# ======================================================================================


class IExpr:
    def spec(self) -> str:
        raise NotImplementedError

    def eval(self, ctx: "Ctx"):
        raise NotImplementedError


@dataclass(frozen=True)
class IVar(IExpr):
    name: str  # an index (an axis of the index space), or an integer attribute or dim

    def spec(self):
        return self.name

    def eval(self, ctx):
        if ctx is not None and self.name in ctx.axes:
            return ctx.arange(self.name)
        return ctx.ints[self.name]


@dataclass(frozen=True)
class IConst(IExpr):
    value: int

    def spec(self):
        return str(self.value)

    def eval(self, ctx):
        return self.value


@dataclass(frozen=True)
class IOp(IExpr):
    op: str  # + - * // %
    a: IExpr
    b: IExpr

    def spec(self):
        a, b = self.a.spec(), self.b.spec()
        if self.op == "+":
            return f"{a} + {b}"
        if self.op == "-":
            return f"{a} - {_iparen(self.b, b)}"
        if self.op == "*":
            return f"{_iparen(self.a, a)}*{_iparen(self.b, b)}"
        if self.op == "%":
            return f"({a}) % {_iparen(self.b, b)}" if isinstance(self.a, IOp) else f"{a} % {b}"
        return f"({a})//{_iparen(self.b, b)}" if isinstance(self.a, IOp) else f"{a}//{b}"

    def eval(self, ctx):
        a, b = self.a.eval(ctx), self.b.eval(ctx)
        if self.op == "+":
            return a + b
        if self.op == "-":
            return a - b
        if self.op == "*":
            return a * b
        if self.op == "%":
            return a % b
        return a // b


def _iparen(node, text):
    return f"({text})" if isinstance(node, IOp) and node.op in "+-" else text


@dataclass(frozen=True)
class IRead(IExpr):
    """A read of an integer input (``dtypes = { idx = "int" }``) by plain indices:
    ``idx[b]`` inside another read (``table[idx[b], d]``, a gather) or as a value."""

    name: str
    idx: tuple  # IVar per dimension

    def spec(self):
        return f"{self.name}[{', '.join(i.spec() for i in self.idx)}]"

    def eval(self, ctx):
        return ctx.env[self.name][tuple(e.eval(ctx) for e in self.idx)]


# ======================================================================================
# Value expressions
# ======================================================================================


class Node:
    prec = 100  # binding strength of the rendered text (atoms: 100)

    def spec(self) -> str:
        raise NotImplementedError

    def eval(self, ctx: "Ctx") -> torch.Tensor:
        raise NotImplementedError

    def children(self) -> tuple:
        return ()

    def walk(self):
        yield self
        for c in self.children():
            yield from c.walk()


def _wrap(node: Node, min_prec: int) -> str:
    text = node.spec()
    return f"({text})" if node.prec < min_prec else text


@dataclass(frozen=True)
class Num(Node):
    text: str
    value: float

    @property
    def prec(self):
        return 100 if self.value >= 0 and "/" not in self.text else 0

    def spec(self):
        return self.text

    def eval(self, ctx):
        return torch.tensor(self.value)


@dataclass(frozen=True)
class Sym(Node):
    """An attribute, a hyperparameter, a dimension or the step counter t."""

    name: str

    def spec(self):
        return self.name

    def eval(self, ctx):
        return torch.tensor(float(ctx.scalars[self.name]))


@dataclass(frozen=True)
class Read(Node):
    name: str
    idx: tuple = ()  # IExpr per dimension; () reads a rank-0 tensor (or an optimizer's p, g, state)
    padded: bool = False  # may read out of bounds (then the value is zero)

    def spec(self):
        if not self.idx:
            return self.name
        return f"{self.name}[{', '.join(i.spec() for i in self.idx)}]"

    def eval(self, ctx):
        t = ctx.env[self.name]
        if not self.idx:
            return t
        mask = None
        clamped = []
        for e, n in zip(self.idx, t.shape):
            v = e.eval(ctx)
            v = v if isinstance(v, torch.Tensor) else torch.tensor(v).reshape([1] * ctx.nd)
            ok = (v >= 0) & (v < n)
            mask = ok if mask is None else mask & ok
            clamped.append(v.clamp(0, max(n - 1, 0)))
        value = t[tuple(clamped)]
        return torch.where(mask, value, torch.zeros(()))


@dataclass(frozen=True)
class Neg(Node):
    a: Node
    prec = 40

    def spec(self):
        return "-" + _wrap(self.a, 50)

    def eval(self, ctx):
        return -self.a.eval(ctx)

    def children(self):
        return (self.a,)


_BIN_PREC = {"+": 20, "-": 20, "*": 30, "/": 30}


@dataclass(frozen=True)
class Bin(Node):
    op: str
    a: Node
    b: Node

    @property
    def prec(self):
        return _BIN_PREC[self.op]

    def spec(self):
        p = self.prec
        right = p + 1 if self.op in "-/" else p  # a - (b - c), a / (b * c)
        if self.op == "*":
            right = p + 1  # a * (b / c) keeps its grouping as written
        return f"{_wrap(self.a, p)} {self.op} {_wrap(self.b, right)}"

    def eval(self, ctx):
        a, b = self.a.eval(ctx), self.b.eval(ctx)
        return {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div}[self.op](a, b)

    def children(self):
        return (self.a, self.b)


@dataclass(frozen=True)
class Pow(Node):
    base: Node
    expo: Node
    prec = 60

    def spec(self):
        return f"{_wrap(self.base, 70)}**{_wrap(self.expo, 70)}"

    def eval(self, ctx):
        return torch.pow(self.base.eval(ctx), self.expo.eval(ctx))

    def children(self):
        return (self.base, self.expo)


@dataclass(frozen=True)
class IVal(Node):
    """An index expression used as a value: ``Eq(v, idx[b])``, ``idx[b] > 1``."""

    e: IExpr

    @property
    def prec(self):
        return 100 if isinstance(self.e, (IVar, IConst, IRead)) else 20

    def spec(self):
        return self.e.spec()

    def eval(self, ctx):
        v = self.e.eval(ctx)
        return torch.as_tensor(v).to(torch.get_default_dtype())


def _leaky(x, slope=None):
    s = 0.01 if slope is None else slope
    return torch.where(x > 0, x, s * x)


def _elu(x, alpha=None):
    a = 1.0 if alpha is None else alpha
    return torch.where(x > 0, x, a * torch.expm1(x))


def _max(*a):
    out = a[0]
    for b in a[1:]:
        out = torch.maximum(out, b)
    return out


def _min(*a):
    out = a[0]
    for b in a[1:]:
        out = torch.minimum(out, b)
    return out


# name -> (torch function, domain of the first argument, weight)
#   domain: any | pos (positive, away from 0) | tan (|arg| < 1.5) | unit (|arg| < 0.91) | ge1 (arg > 1)
TORCH_FUNCTIONS = {
    "exp": (torch.exp, "any", 3),
    "log": (torch.log, "pos", 3),
    "log1p": (torch.log1p, "pos", 2),
    "expm1": (torch.expm1, "any", 2),
    "sqrt": (torch.sqrt, "pos", 3),
    "sin": (torch.sin, "any", 2),
    "cos": (torch.cos, "any", 2),
    "tan": (torch.tan, "tan", 2),
    "atan": (torch.atan, "any", 2),
    "asin": (torch.asin, "unit", 1),
    "acos": (torch.acos, "unit", 1),
    "atanh": (torch.atanh, "unit", 1),
    "asinh": (torch.asinh, "any", 1),
    "acosh": (torch.acosh, "ge1", 1),
    "erfc": (torch.erfc, "any", 1),
    "sinh": (torch.sinh, "any", 2),
    "cosh": (torch.cosh, "any", 2),
    "tanh": (torch.tanh, "any", 3),
    "erf": (torch.erf, "any", 2),
    "abs": (torch.abs, "any", 2),
    "sign": (torch.sign, "any", 1),
    "floor": (torch.floor, "any", 1),
    "Max": (_max, "any", 2),
    "Min": (_min, "any", 2),
    # the library's named activations
    "sigmoid": (torch.sigmoid, "any", 4),
    "softplus": (lambda x: torch.logaddexp(x, torch.zeros(())), "any", 4),
    "relu": (torch.relu, "any", 2),
    "leaky_relu": (_leaky, "any", 1),
    "elu": (_elu, "any", 1),
    "gelu": (lambda x: F.gelu(x, approximate="none"), "any", 1),
    "silu": (F.silu, "any", 1),
    "mish": (F.mish, "any", 1),
    # its value, with derivative 0 (central differences see the value: a sample where it
    # changes the gradient is discarded as a kink is; the large-input mode leaves it out)
    "stop_gradient": (lambda x: x.detach(), "any", 1),
}


@dataclass(frozen=True)
class Fn(Node):
    name: str
    args: tuple

    def spec(self):
        return f"{self.name}({', '.join(a.spec() for a in self.args)})"

    def eval(self, ctx):
        fn = TORCH_FUNCTIONS[self.name][0]
        if self.name in ("leaky_relu", "elu") and len(self.args) == 2:
            return fn(self.args[0].eval(ctx), float(self.args[1].value))
        return fn(*[a.eval(ctx) for a in self.args])

    def children(self):
        return self.args


_CMP = {">": torch.gt, ">=": torch.ge, "<": torch.lt, "<=": torch.le, "==": torch.eq, "!=": torch.ne}
_CMP_FN = {">": "Gt", ">=": "Ge", "<": "Lt", "<=": "Le", "==": "Eq", "!=": "Ne"}


@dataclass(frozen=True)
class Cmp(Node):
    op: str
    a: Node
    b: Node
    fn: bool = False  # SymPy's spelling: Gt(a, b)

    @property
    def prec(self):
        return 100 if self.fn else 10

    def spec(self):
        if self.fn:
            return f"{_CMP_FN[self.op]}({self.a.spec()}, {self.b.spec()})"
        return f"{_wrap(self.a, 20)} {self.op} {_wrap(self.b, 20)}"

    def eval(self, ctx):
        return _CMP[self.op](self.a.eval(ctx), self.b.eval(ctx))

    def children(self):
        return (self.a, self.b)


@dataclass(frozen=True)
class BoolOp(Node):
    op: str  # and | or | not (b unused)
    a: Node
    b: Node | None = None
    fn: bool = False  # SymPy's spelling: And(a, b), Or(a, b), Not(a)

    @property
    def prec(self):
        return 100 if self.fn else (3 if self.op == "not" else 5)

    def spec(self):
        if self.fn:
            args = (self.a,) if self.op == "not" else (self.a, self.b)
            return f"{self.op.capitalize()}({', '.join(a.spec() for a in args)})"
        if self.op == "not":
            return f"not {_wrap(self.a, 6)}"
        return f"{_wrap(self.a, 6)} {self.op} {_wrap(self.b, 6)}"

    def eval(self, ctx):
        a = self.a.eval(ctx)
        if self.op == "not":
            return ~a
        b = self.b.eval(ctx)
        return a & b if self.op == "and" else a | b

    def children(self):
        return (self.a,) if self.b is None else (self.a, self.b)


@dataclass(frozen=True)
class Where(Node):
    cond: Node
    a: Node
    b: Node

    def spec(self):
        return f"where({self.cond.spec()}, {self.a.spec()}, {self.b.spec()})"

    def eval(self, ctx):
        return torch.where(self.cond.eval(ctx), self.a.eval(ctx), self.b.eval(ctx))

    def children(self):
        return (self.cond, self.a, self.b)


@dataclass(frozen=True)
class Red(Node):
    kind: str  # sum | max | mean | reduce (a loss's: the attribute ``reduction`` says how)
    body: Node
    idx: tuple  # ((index name, size name), ...)

    def spec(self):
        return f"{self.kind}({self.body.spec()}, {', '.join(i for i, _ in self.idx)})"

    def eval(self, ctx):
        if self.kind == "reduce":  # "none" never gets here: see Equation.resolved
            return Red("sum" if ctx.scalars["reduction"] == 2 else "mean", self.body, self.idx).eval(ctx)
        body = self.body.eval(ctx)
        axes = [ctx.axes[i] for i, _ in self.idx]
        shape = [1] * ctx.nd
        for i, _ in self.idx:
            shape[ctx.axes[i]] = ctx.size(i)
        body = body.expand(torch.broadcast_shapes(body.shape, tuple(shape)))
        if self.kind == "sum":
            return body.sum(dim=axes, keepdim=True)
        if self.kind == "mean":
            return body.mean(dim=axes, keepdim=True)
        return body.amax(dim=axes, keepdim=True)

    def children(self):
        return (self.body,)


# ======================================================================================
# The oracle: equations over an index space
# ======================================================================================


@dataclass
class Ctx:
    env: dict  # tensor name -> torch tensor
    ints: dict  # integer attributes and dimension sizes
    scalars: dict  # every attribute, hyperparameter, dimension and t, as numbers
    axes: dict = field(default_factory=dict)  # index name -> axis
    sizes: dict = field(default_factory=dict)  # index name -> size name (a dim or an attr)
    nd: int = 0

    def size(self, index):
        return int(self.ints[self.sizes[index]])

    def arange(self, index):
        shape = [1] * self.nd
        shape[self.axes[index]] = self.size(index)
        return torch.arange(self.size(index)).reshape(shape)


@dataclass(frozen=True)
class Equation:
    target: str
    lhs: tuple  # ((index name, size name), ...)
    rhs: Node

    def spec(self):
        if not self.lhs:
            return f"{self.target} = {self.rhs.spec()}"
        return f"{self.target}[{', '.join(i for i, _ in self.lhs)}] = {self.rhs.spec()}"

    def resolved(self, scalars: dict) -> "Equation":
        """The equation the oracle evaluates: ``loss = reduce(body, b, n)`` with
        reduction = 0 ("none") is ``loss[b, n] = body``, the terms."""
        if isinstance(self.rhs, Red) and self.rhs.kind == "reduce" and scalars.get("reduction") == 0:
            return Equation(self.target, self.rhs.idx, self.rhs.body)
        return self

    def eval(self, ctx: Ctx) -> torch.Tensor:
        sizes = dict(self.lhs)
        for node in self.rhs.walk():
            if isinstance(node, Red):
                sizes.update(dict(node.idx))
        names = [i for i, _ in self.lhs] + [i for i in sizes if i not in dict(self.lhs)]
        ctx.axes = {n: k for k, n in enumerate(names)}
        ctx.sizes = sizes
        ctx.nd = len(names)
        value = self.rhs.eval(ctx)
        shape = [ctx.size(i) for i, _ in self.lhs]
        value = value.reshape(value.shape + (1,) * (ctx.nd - value.dim())) if value.dim() < ctx.nd else value
        if value.dim() == 0:
            return value.expand(shape) if shape else value
        value = value.expand(shape + list(value.shape[len(shape):]))
        return value.reshape(shape)


# ======================================================================================
# A generated spec
# ======================================================================================


@dataclass
class FuzzSpec:
    family: str
    kind: str
    name: str = ""
    toml: str = ""
    # layers, activations, losses
    inputs: dict = field(default_factory=dict)  # name -> tuple of dim names
    params: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    positive: set = field(default_factory=set)  # tensors sampled positive
    sampling: dict = field(default_factory=dict)  # name -> how its values are drawn (see sample_inputs)
    dtypes: dict = field(default_factory=dict)  # name -> "int" (an integer input)
    assume: list = field(default_factory=list)  # assumptions, as the spec writes them
    large: bool = False  # large-input mode: checked against the high-precision oracle
    attrs: dict = field(default_factory=dict)  # name -> default
    run_attrs: dict = field(default_factory=dict)  # attributes given at run time
    derived: dict = field(default_factory=dict)  # dim name -> IExpr
    relations: dict = field(default_factory=dict)  # input dim name -> IExpr over other dims (G = 2*H)
    ranges: dict = field(default_factory=dict)  # index name -> size name
    equations: list = field(default_factory=list)
    differentiate: list | None = None
    sizes: dict = field(default_factory=dict)  # base dim -> size
    act_shape: tuple = ()  # activations: the input's shape
    # optimizers
    state: list = field(default_factory=list)
    scalar_state: dict = field(default_factory=dict)  # name -> initial value
    hyper: dict = field(default_factory=dict)
    temporaries: list = field(default_factory=list)
    steps: int = 3
    seed: int = 0

    # ------------------------------------------------------------------ derived facts
    @property
    def arg_names(self) -> tuple:
        return tuple(self.inputs) + tuple(self.params)

    @property
    def expected_differentiable(self) -> tuple:
        if self.kind == "activation":
            return ("x",)
        if self.differentiate is not None:
            return tuple(n for n in self.arg_names if n in self.differentiate)
        return tuple(n for n in self.arg_names if self.dtypes.get(n) != "int")

    def attr_values(self) -> dict:
        values = dict(self.attrs)
        for k, v in self.run_attrs.items():
            values[k] = int(v) if isinstance(self.attrs[k], int) else float(v)
        return values

    def dim_values(self) -> dict:
        ints = {k: v for k, v in self.attr_values().items() if isinstance(v, int)}
        ints.update(self.sizes)
        for d, e in self.derived.items():
            ints[d] = int(e.eval(_IntCtx(ints)))
        return ints

    def shape(self, name) -> tuple:
        dims = {**self.inputs, **self.params, **self.outputs}[name]
        ints = self.dim_values()
        return tuple(ints[d] for d in dims)

    # ------------------------------------------------------------------ the oracle
    def reference(self, args: dict) -> list:
        """Outputs (declaration order) of the spec on torch tensors ``args``."""
        if self.kind == "activation":
            ctx = Ctx(env={"x": args["x"]}, ints={}, scalars=self.attr_values())
            return [self.equations[0].rhs.eval(ctx).expand(args["x"].shape)]
        ints = self.dim_values()
        scalars = {**ints, **self.attr_values()}
        ctx = Ctx(env=dict(args), ints=ints, scalars=scalars)
        for eq in self.equations:
            ctx.env[eq.target] = eq.resolved(scalars).eval(ctx)
        return [ctx.env[o] for o in self.outputs]

    def reference_step(self, env: dict, t: int, hyper: dict) -> dict:
        """One optimizer step on torch tensors ``env`` (p, g, state): the new values."""
        env = dict(env)
        ctx = Ctx(env=env, ints={}, scalars={**hyper, "t": t})
        for eq in self.equations:
            value = eq.rhs.eval(ctx)
            env[eq.target] = value.clone() if eq.target in self.scalar_state else value.expand(env["p"].shape).clone()
        return env

    def describe(self) -> str:
        run = f"attributes at run time: {self.run_attrs}" if self.run_attrs else "default attributes"
        if self.kind == "activation":
            where = f"input shape {self.act_shape}"
        elif self.kind == "optimizer":
            where = f"{self.steps} steps, parameter size {self.sizes.get('n')}"
        else:
            where = f"sizes {self.sizes}"
        pos = f", positive inputs {sorted(self.positive)}" if self.positive else ""
        samp = f", inputs drawn {self.sampling}" if self.sampling else ""
        mode = " (large-input mode)" if self.large else ""
        return f"# family {self.family}{mode}, seed {self.seed}, {where}, {run}{pos}{samp}\n{self.toml}"


class _IntCtx:
    def __init__(self, ints):
        self.ints = ints
        self.axes = {}


# ======================================================================================
# TOML rendering
# ======================================================================================


def _toml_value(v):
    if isinstance(v, bool):
        raise TypeError(v)
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def _table(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {v}" for k, v in d.items()) + " }"


def render_toml(s: FuzzSpec) -> str:
    lines = [f'name = "{s.name}"', f'kind = "{s.kind}"']
    if s.kind == "activation":
        if s.attrs:
            lines.append("attrs = " + _table({k: _toml_value(v) for k, v in s.attrs.items()}))
        lines.append(f'expr = "{s.equations[0].rhs.spec()}"')
        return "\n".join(lines) + "\n"
    if s.kind == "optimizer":
        lines.append("state = [" + ", ".join(f'"{n}"' for n in s.state) + "]")
        if s.scalar_state:
            lines.append("scalar_state = " + _table({k: _toml_value(v) for k, v in s.scalar_state.items()}))
        lines.append("hyper = " + _table({k: _toml_value(v) for k, v in s.hyper.items()}))
        lines.append("update = [")
        lines += [f'  "{eq.spec()}",' for eq in s.equations]
        lines.append("]")
        return "\n".join(lines) + "\n"
    if s.attrs:
        lines.append("attrs = " + _table({k: _toml_value(v) for k, v in s.attrs.items()}))
    for key in ("inputs", "params", "outputs"):
        table = getattr(s, key)
        if table:
            lines.append(f"{key} = " + _table({k: f'"{" ".join(v)}"' for k, v in table.items()}))
    if s.derived or s.relations:
        lines.append("dims = " + _table({k: f'"{e.spec()}"' for k, e in {**s.derived, **s.relations}.items()}))
    if s.ranges:
        lines.append("ranges = " + _table({k: f'"{v}"' for k, v in s.ranges.items()}))
    if s.dtypes:
        lines.append("dtypes = " + _table({k: f'"{v}"' for k, v in s.dtypes.items()}))
    if s.differentiate is not None:
        lines.append("differentiate = [" + ", ".join(f'"{n}"' for n in s.differentiate) + "]")
    if s.assume:
        lines.append("assume = [" + ", ".join(f'"{a}"' for a in s.assume) + "]")
    lines.append("equations = [")
    lines += [f'  "{eq.spec()}",' for eq in s.equations]
    lines.append("]")
    return "\n".join(lines) + "\n"


def finish(s: FuzzSpec) -> FuzzSpec:
    if s.kind == "activation" and not s.outputs:
        s.outputs = {"y": ()}  # the output every check compares (an activation's y has x's shape)
    body = render_toml(FuzzSpec(**{**s.__dict__, "name": "NAME"}))
    s.name = "fz_" + hashlib.sha1(body.encode()).hexdigest()[:10]
    s.toml = render_toml(s)
    return s


# ======================================================================================
# The generator
# ======================================================================================


NUMBERS = [("1", 1.0), ("2", 2.0), ("3", 3.0), ("0.5", 0.5), ("1.5", 1.5), ("0.25", 0.25), ("0.044715", 0.044715),
           ("1/3", 1 / 3), ("2/3", 2 / 3)]
POWERS_ANY = [("2", 2.0), ("3", 3.0), ("4", 4.0)]
POWERS_NONZERO = [("-1", -1.0), ("-2", -2.0), ("-3", -3.0)]
POWERS_POSITIVE = [("(1/2)", 0.5), ("(3/2)", 1.5), ("(-1/2)", -0.5), ("(1/3)", 1 / 3), ("(2/3)", 2 / 3),
                   ("(-3/2)", -1.5), ("0.5", 0.5), ("2.5", 2.5), ("(5/2)", 2.5)]


def _num(text, value):
    return Num(text, value) if not text.startswith("(") else Num(text[1:-1], value)


@dataclass
class TensorInfo:
    dims: tuple
    role: str  # input | param | inter | output | opt (an optimizer's p, g or state)
    positive: bool = False

    @property
    def safe(self):
        """Sampled away from zero (|v| >= 0.3): a denominator as it stands."""
        return self.role in ("input", "param")


@dataclass
class Scope:
    """What an expression may use at one point: indices (name -> size name)."""

    indices: dict
    reduce: bool = True


class HypothesisSource:
    """Choices drawn by Hypothesis (inside a composite strategy): shrinkable, replayable."""

    def __init__(self, draw):
        self.draw = draw

    def pick(self, options):
        return self.draw(st.sampled_from(options))

    def integer(self, lo, hi):
        return self.draw(st.integers(lo, hi))


class RandomSource:
    """Choices from a seeded ``random.Random`` (long campaigns: spec k of seed s)."""

    def __init__(self, seed):
        import random

        self.rng = random.Random(seed)

    def pick(self, options):
        return options[self.rng.randrange(len(options))]

    def integer(self, lo, hi):
        return self.rng.randint(lo, hi)


class Gen:
    """Draws one spec's trees from ``src`` (a HypothesisSource or a RandomSource)."""

    def __init__(self, src, max_depth):
        self.src = src
        self.max_depth = max_depth
        self.tensors: dict[str, TensorInfo] = {}
        self.float_attrs: list[str] = []
        self.dim_syms: list[str] = []
        self.n_index = 0
        self.allow_mean = True
        self.exclude: set = set()  # functions not to draw

    # ---------------------------------------------------------------- drawing helpers
    def pick(self, options):
        return self.src.pick(list(options))

    def integer(self, lo, hi):
        return self.src.integer(lo, hi)

    def weighted(self, table: dict):
        keys = [k for k, w in table.items() for _ in range(w) if w > 0]
        return self.pick(keys)

    def chance(self, percent: int) -> bool:
        return self.src.integer(0, 99) < percent

    def fresh_index(self) -> str:
        self.n_index += 1
        return f"j{self.n_index}"

    # ---------------------------------------------------------------- reads
    def readable(self, scope: Scope, name: str) -> bool:
        dims = self.tensors[name].dims
        have = set(scope.indices.values())
        return all(d in have for d in dims)

    def read(self, scope: Scope, name: str, arithmetic: bool = True) -> Read:
        """A read of ``name`` by indices of ``scope``; with ``arithmetic``, sometimes an
        index inside integer arithmetic: reversed (N - 1 - i), cyclic ((i + 1) % N),
        halved (i // 2), or shifted (i + 1, i - 1: out of bounds at one end, read as zero)."""
        dims = self.tensors[name].dims
        idx = []
        padded = False
        for d in dims:
            options = sorted(i for i, s in scope.indices.items() if s == d)
            i = IVar(self.pick(options))
            form = self.weighted({"plain": 22, "flip": 1, "cyclic": 1, "half": 1, "shift": 1}) if arithmetic else "plain"
            if form == "flip":
                i = IOp("-", IOp("-", IVar(d), IConst(1)), i)
            elif form == "cyclic":
                i = IOp("%", IOp("+", i, IConst(1)), IVar(d))
            elif form == "half":
                i = IOp("//", i, IConst(2))
            elif form == "shift":
                i = IOp(self.pick(["+", "-"]), i, IConst(1))
                padded = True
            idx.append(i)
        return Read(name, tuple(idx), padded=padded)

    def leaf_reads(self, scope):
        return sorted(n for n in self.tensors if self.readable(scope, n))

    def leaf(self, scope: Scope) -> Node:
        names = self.leaf_reads(scope)
        kind = self.weighted({"read": 14 if names else 0, "num": 3, "attr": 2 if self.float_attrs else 0,
                              "dim": 1 if self.dim_syms else 0})
        if kind == "read":
            return self.read(scope, self.pick(names))
        if kind == "attr":
            return Sym(self.pick(self.float_attrs))
        if kind == "dim":
            return Sym(self.pick(self.dim_syms))
        return Num(*self.pick(NUMBERS))

    def safe_read(self, scope: Scope, positive=False):
        names = [n for n in self.leaf_reads(scope)
                 if self.tensors[n].safe and (self.tensors[n].positive or not positive)]
        return self.read(scope, self.pick(names), arithmetic=False) if names else None

    # ---------------------------------------------------------------- domains
    def positive(self, scope: Scope, depth: int) -> Node:
        """An expression > 0 (and away from 0) for every sample."""
        r = self.safe_read(scope, positive=True)
        nz = self.safe_read(scope)
        form = self.weighted({"read": 4 if r is not None else 0, "sq1": 3, "exp": 3, "cosh": 1, "sin2": 1,
                              "sigmoid": 2, "softplus": 1, "square": 3 if nz is not None else 0,
                              "abs": 2 if nz is not None else 0, "num": 1, "sqrt1": 1})
        e = self.gen(scope, depth - 1) if depth > 0 else self.leaf(scope)
        if form == "read":
            return r
        if form == "sq1":
            return Bin("+", Num("1", 1.0), Pow(e, Num("2", 2.0)))
        if form == "exp":
            return Fn("exp", (e,))
        if form == "cosh":
            return Fn("cosh", (e,))
        if form == "sin2":
            return Bin("+", Num("2", 2.0), Fn(self.pick(["sin", "cos", "tanh"]), (e,)))
        if form == "sigmoid":
            return Fn("sigmoid", (e,))
        if form == "softplus":
            return Fn("softplus", (e,))
        if form == "square":
            return Pow(nz, Num("2", 2.0))
        if form == "abs":
            return Fn("abs", (nz,))
        if form == "sqrt1":
            return Fn("sqrt", (Bin("+", Num("1", 1.0), Pow(e, Num("2", 2.0))),))
        return Num(*self.pick([("2", 2.0), ("0.5", 0.5), ("3", 3.0)]))

    def nonzero(self, scope: Scope, depth: int) -> Node:
        nz = self.safe_read(scope)
        form = self.weighted({"read": 6 if nz is not None else 0, "pos": 3, "neg": 1})
        if form == "read":
            return nz
        p = self.positive(scope, depth)
        return Neg(p) if form == "neg" else p

    def small(self, scope: Scope, depth: int) -> Node:
        """|value| < 1.5 (tan's argument)."""
        nz = self.safe_read(scope)
        if nz is not None and self.chance(40):
            return nz
        e = self.gen(scope, depth - 1) if depth > 0 else self.leaf(scope)
        return Fn(self.pick(["tanh", "sin", "cos", "erf"]), (e,))

    # ---------------------------------------------------------------- expressions
    def gen(self, scope: Scope, depth: int) -> Node:
        if depth <= 0:
            return self.leaf(scope)
        kind = self.weighted({"leaf": 3, "fn": 7, "bin": 8, "pow": 3, "neg": 1, "where": 2,
                              "reduce": 2 if scope.reduce else 0})
        d = depth - 1
        if kind == "leaf":
            return self.leaf(scope)
        if kind == "fn":
            return self.function(scope, depth)
        if kind == "bin":
            op = self.weighted({"+": 3, "-": 3, "*": 3, "/": 4})
            a = self.gen(scope, d)
            b = self.nonzero(scope, d) if op == "/" else self.gen(scope, d)
            if op == "/" and self.chance(20):
                a = Num("1", 1.0)  # 1/x, the quotient with a negative derivative
            return Bin(op, a, b)
        if kind == "pow":
            return self.power(scope, d)
        if kind == "neg":
            return Neg(self.gen(scope, d))
        if kind == "where":
            return self.where(scope, d)
        return self.reduction(scope, d)

    def function(self, scope: Scope, depth: int) -> Node:
        name = self.weighted({n: w for n, (_, _, w) in TORCH_FUNCTIONS.items() if n not in self.exclude})
        domain = TORCH_FUNCTIONS[name][1]
        d = depth - 1
        if name in ("Max", "Min"):
            n = self.pick([2, 2, 3])
            args = [self.gen(scope, d) for _ in range(n)]
            if self.chance(30):
                args[-1] = Num(*self.pick([("0", 0.0), ("0.5", 0.5), ("1", 1.0)]))
            return Fn(name, tuple(args))
        if domain == "pos":
            arg = self.positive(scope, d)
            if name == "log1p" and self.chance(30):
                arg = Pow(self.gen(scope, d), Num("2", 2.0))  # log1p(e**2): e**2 > -1
            return Fn(name, (arg,))
        if domain == "tan":
            return Fn(name, (self.small(scope, d),))
        if domain == "unit":  # tanh of |value| < 1.5: inside (-0.91, 0.91), away from the poles at +-1
            return Fn(name, (Fn("tanh", (self.small(scope, d),)),))
        if domain == "ge1":  # 1 + a positive value: away from acosh's pole at 1
            return Fn(name, (Bin("+", Num("1", 1.0), self.positive(scope, d)),))
        arg = self.gen(scope, d)
        if name == "leaky_relu" and self.chance(50):
            return Fn(name, (arg, Num(*self.pick([("0.2", 0.2), ("0.1", 0.1)]))))
        if name == "elu" and self.chance(50):
            return Fn(name, (arg, Num(*self.pick([("0.5", 0.5), ("2", 2.0)]))))
        return Fn(name, (arg,))

    def power(self, scope: Scope, d: int) -> Node:
        kind = self.weighted({"int": 4, "negint": 3, "frac": 3, "sym": 1, "attr": 1 if self.float_attrs else 0,
                              "fnpow": 2})
        if kind == "int":
            return Pow(self.gen(scope, d), Num(*self.pick(POWERS_ANY)))
        if kind == "negint":
            return Pow(self.nonzero(scope, d), _num(*self.pick(POWERS_NONZERO)))
        if kind == "frac":
            return Pow(self.positive(scope, d), _num(*self.pick(POWERS_POSITIVE)))
        if kind == "fnpow":  # a power of a named function: sigmoid(e)**2, softplus(e)**3, tanh(e)**-1 ...
            name = self.pick(["sigmoid", "softplus", "tanh", "exp", "cosh", "gelu", "silu", "mish", "erf"])
            e = self.gen(scope, d - 1) if d > 0 else self.leaf(scope)
            base = Fn(name, (e,))
            if name in ("sigmoid", "softplus", "exp", "cosh"):
                return Pow(base, _num(*self.pick(POWERS_ANY + POWERS_NONZERO + POWERS_POSITIVE)))
            return Pow(base, Num(*self.pick(POWERS_ANY)))
        if kind == "attr":
            return Pow(self.positive(scope, d), Sym(self.pick(self.float_attrs)))
        # a symbolic exponent: (positive)**(expression)
        return Pow(self.positive(scope, d), Fn(self.pick(["tanh", "sin", "sigmoid"]), (self.gen(scope, d),)))

    def where(self, scope: Scope, d: int) -> Node:
        def cmp():
            a = self.gen(scope, d)
            b = Num(*self.pick([("0", 0.0), ("0.5", 0.5), ("1", 1.0), ("-1/2", -0.5)])) if self.chance(60) \
                else self.gen(scope, d)
            # == and != hold nowhere and everywhere for continuous samples: still conditions to print
            op = self.weighted({">": 3, ">=": 2, "<": 3, "<=": 2, "==": 1, "!=": 1})
            return Cmp(op, a, b, fn=self.chance(40))

        cond = cmp()
        if self.chance(25):
            cond = BoolOp(self.pick(["and", "or"]), cond, cmp(), fn=self.chance(40))
        if self.chance(15):
            cond = BoolOp("not", cond, fn=self.chance(50))
        return Where(cond, self.gen(scope, d), self.gen(scope, d))

    def reduction(self, scope: Scope, d: int) -> Node:
        dims = sorted({dd for t in self.tensors.values() for dd in t.dims if self._reducible(scope, dd)})
        if not dims:
            return self.gen(Scope(scope.indices, reduce=False), d + 1)
        dim = self.pick(dims)
        j = self.fresh_index()
        inner = Scope({**scope.indices, j: dim}, reduce=scope.reduce)
        body = self.gen(inner, d)
        body = self.ensure_index(inner, body, j, dim)
        kind = self.weighted({"sum": 6, "max": 3, "mean": 1 if self.allow_mean else 0})
        return Red(kind, body, ((j, dim),))

    def _reducible(self, scope, dim):
        """Some tensor with dimension ``dim`` is readable once an index binds it."""
        probe = Scope({**scope.indices, "_probe": dim})
        return any(dim in t.dims and self.readable(probe, n) for n, t in self.tensors.items())

    def ensure_index(self, scope: Scope, body: Node, j: str, dim: str) -> Node:
        """Make ``j`` stand alone in a read of ``body`` (it takes its range from there)."""
        if any(isinstance(n, Read) and any(isinstance(e, IVar) and e.name == j for e in n.idx) for n in body.walk()):
            return body
        names = [n for n, t in self.tensors.items() if dim in t.dims and self.readable(scope, n)]
        name = self.pick(sorted(names))
        dims = self.tensors[name].dims
        idx = []
        for dd in dims:
            options = sorted(i for i, s in scope.indices.items() if s == dd)
            idx.append(IVar(j if dd == dim else self.pick(options)))
        r = Read(name, tuple(idx))
        op = self.pick(["+", "*", "-"])
        return Bin(op, r, body) if self.chance(50) else Bin(op, body, r)

    def force_read(self, scope: Scope, expr: Node, name: str) -> Node:
        """``expr`` combined with a read of tensor ``name`` (summed over the dimensions
        ``scope`` has no index for)."""
        dims = self.tensors[name].dims
        have = dict(scope.indices)
        red = []
        idx = []
        for dd in dims:
            options = sorted(i for i, s in have.items() if s == dd)
            if options:
                idx.append(IVar(self.pick(options)))
            else:
                j = self.fresh_index()
                have[j] = dd
                red.append((j, dd))
                idx.append(IVar(j))
        term: Node = Read(name, tuple(idx))
        if self.chance(40):
            term = Fn(self.pick(["tanh", "sin", "sigmoid", "exp", "atan"]), (term,))
        if red:
            term = Red(self.pick(["sum", "sum", "max"]), term, tuple(red))
        op = self.pick(["+", "-", "*"])
        return Bin(op, expr, term) if self.chance(60) else Bin(op, term, expr)

    @staticmethod
    def reads_of(node: Node) -> set:
        return {n.name for n in node.walk() if isinstance(n, Read)}

    @staticmethod
    def standalone(node: Node) -> set:
        return {e.name for n in node.walk() if isinstance(n, Read) for e in n.idx if isinstance(e, IVar)}


# ======================================================================================
# Families
# ======================================================================================


def _runtime(g: Gen, spec: FuzzSpec, variants: dict):
    """Some attributes given at run time (a value different from the default)."""
    for k, options in variants.items():
        if g.chance(40):
            spec.run_attrs[k] = g.pick(options)


def gen_activation(g: Gen, spec: FuzzSpec):
    g.tensors["x"] = TensorInfo((), "input", positive=False)
    if g.chance(30):
        spec.attrs["alpha"] = g.pick([0.5, 1.5, 2.0])
        g.float_attrs.append("alpha")
        _runtime(g, spec, {"alpha": [0.75, 1.25]})
    rhs = g.gen(Scope({}, reduce=False), g.max_depth)
    if "x" not in g.reads_of(rhs):
        rhs = Bin(g.pick(["+", "*", "-"]), rhs, Read("x"))
    spec.equations = [Equation("y", (), rhs)]
    spec.inputs = {"x": ()}
    spec.act_shape = g.pick([(5,), (2, 3), (7,), (1,), ()])  # () : a 0-d input keeps its shape


_SHAPES = [("B", "N"), ("N",), ("B",), ("B", "N"), ("N", "K"), ("K",), ("B", "K")]


def gen_layer(g: Gen, spec: FuzzSpec, loss: bool = False):
    spec.sizes = {"B": g.pick([2, 3]), "N": g.pick([3, 4]), "K": g.pick([2, 3])}
    if g.chance(10):
        spec.sizes[g.pick(["B", "N", "K"])] = 1
    elif g.chance(10):  # larger than any unrolling or blocking would notice at 3
        spec.sizes[g.pick(["B", "N", "K"])] = g.pick([9, 17])
    g.dim_syms = ["B", "N"]
    if g.chance(25):
        spec.attrs["alpha"] = g.pick([0.5, 2.0, 1.5])
        g.float_attrs.append("alpha")
        _runtime(g, spec, {"alpha": [0.25, 3.0]})
    # inputs and params
    n_in = g.pick([1, 2, 2, 3])
    n_par = g.pick([0, 1, 1, 2])
    names_in = ["x", "u", "s"][:n_in]
    names_par = ["w", "v"][:n_par]
    for k, n in enumerate(names_in):
        dims = ("B", "N") if k == 0 else g.pick(_SHAPES)
        spec.inputs[n] = dims
        g.tensors[n] = TensorInfo(dims, "input", positive=g.chance(30))
    for n in names_par:
        dims = g.pick(_SHAPES)
        spec.params[n] = dims
        g.tensors[n] = TensorInfo(dims, "param", positive=g.chance(30))
    spec.positive = {n for n, t in g.tensors.items() if t.positive}
    present = {d for t in g.tensors.values() for d in t.dims}

    def shape(options):  # a target's shape, over dimensions the inputs define
        return g.pick([o for o in options if set(o) <= present])

    if loss:
        spec.outputs = {"loss": ()}
        targets = [(f"t{k}", shape([("B", "N"), ("B",), ("N", "K"), ()])) for k in range(g.pick([0, 0, 1, 2]))]
        targets += [("loss", ())]
        g.allow_mean = True
    else:
        n_out = g.pick([1, 2, 2])
        outs = [("y", shape([("B", "N"), ("B", "N"), ("B",), ("B", "K"), ("N",)]))]
        if n_out == 2:
            outs.append(("z", shape([("B", "N"), ("B",), ("B", "K")])))
        n_inter = g.pick([0, 0, 1, 2])
        inters = [(f"t{k}", shape([("B", "N"), ("B",), ("N",), (), ("B", "K")])) for k in range(n_inter)]
        targets = list(inters)
        for o in outs:  # outputs interleaved with the intermediates, in order
            targets.insert(g.integer(0, len(targets)), o)
        if targets[-1][0] not in dict(outs):
            targets.append(targets.pop(next(k for k, t in enumerate(targets) if t[0] in dict(outs))))
        spec.outputs = {n: d for n, d in targets if n in dict(outs)}
    unread = list(g.tensors)
    eqs = []
    for k, (target, dims) in enumerate(targets):
        lhs = tuple((f"i{m}", d) for m, d in enumerate(dims))
        scope = Scope(dict(lhs))
        if target == "loss" and g.chance(70):  # the usual form: sum(f(pred[b,n], target[b,n]), b, n) / B
            red = (("b", "B"), ("n", "N"))
            inner = Scope(dict(red))
            body = g.gen(inner, g.max_depth)
            for j, d in red:
                body = g.ensure_index(inner, body, j, d)
            rhs = Red(g.weighted({"sum": 4, "mean": 1}), body, red)
            if rhs.kind == "sum" and g.chance(70):
                rhs = Bin("/", rhs, Sym("B"))
        else:
            rhs = g.gen(scope, g.max_depth)
        # every earlier intermediate is read (by the next equation that may), every input
        # by the end; a later equation reads an earlier output half of the time
        must = []
        prev = [t for t, _ in targets[:k]]
        for p in prev:
            if p in unread and (p not in spec.outputs or g.chance(50)):
                must.append(p)
        last = k == len(targets) - 1
        if last:
            must += [n for n in unread if n not in must and n not in spec.outputs]
        for name in must:
            if name not in g.reads_of(rhs):
                rhs = g.force_read(scope, rhs, name)
        if target not in spec.outputs:  # an intermediate's indices must stand alone in a read
            for i, d in lhs:
                if i not in g.standalone(rhs):
                    holders = [n for n, t in g.tensors.items() if d in t.dims]
                    rhs = g.force_read(scope, rhs, g.pick(sorted(holders)))
                    if i not in g.standalone(rhs):
                        rhs = _force_standalone(g, scope, rhs, i, d)
        for name in g.reads_of(rhs):
            if name in unread:
                unread.remove(name)
        eqs.append(Equation(target, lhs, rhs))
        role = "output" if target in spec.outputs else "inter"
        g.tensors[target] = TensorInfo(dims, role)
        unread.append(target)
    spec.equations = eqs
    last = eqs[-1].rhs if loss else None
    if isinstance(last, Bin) and last.op == "/" and isinstance(last.a, Red) and last.b == Sym("B"):
        last = last.a  # sum(..., b, n) / B
    if isinstance(last, Red) and last.kind in ("sum", "mean") and g.chance(50):
        # PyTorch's reduction (the spec language's reduce): "none", "mean" or "sum"
        eqs[-1] = Equation("loss", (), Red("reduce", last.body, last.idx))
        spec.attrs["reduction"] = 1
        reduction = g.pick([0, 0, 1, 2])
        if reduction != 1:
            spec.run_attrs["reduction"] = reduction
    if loss or g.chance(15):
        args = list(spec.inputs) + list(spec.params)
        chosen = [a for a in args if g.chance(60)] or [args[0]]
        if len(chosen) < len(args) or g.chance(50):
            spec.differentiate = chosen


def _force_standalone(g, scope, rhs, i, d):
    holders = sorted(n for n, t in g.tensors.items() if d in t.dims and g.readable(scope, n))
    name = g.pick(holders)
    dims = g.tensors[name].dims
    idx = tuple(IVar(i) if dd == d else IVar(g.pick(sorted(k for k, s in scope.indices.items() if s == dd)))
                for dd in dims)
    return Bin(g.pick(["+", "*"]), rhs, Read(name, idx))


def gen_window(g: Gen, spec: FuzzSpec):
    """conv1d/pool1d-like layers: y[b, (f,) o] = red(body(x[b, (c,) o*S + p*D - P], w[(f, c,) p]), (c,) p)."""
    channels = g.chance(50)
    pool = g.chance(35)  # no weight: K is an attribute and p needs `ranges`
    out_ch = channels and not pool and g.chance(50)
    dilated = g.chance(30)
    spec.attrs = {"S": g.pick([1, 2]), "P": g.pick([0, 1])}
    variants = {"S": [1, 2, 3], "P": [0, 1, 2]}
    if dilated:
        spec.attrs["D"] = g.pick([1, 2])
        variants["D"] = [1, 2]
    if pool:
        spec.attrs["K"] = g.pick([2, 3])
        variants["K"] = [2, 3]
        spec.ranges = {"p": "K"}
    _runtime(g, spec, variants)
    spec.sizes = {"B": g.pick([1, 2]), "N": g.pick([5, 6, 7])}
    if channels:
        spec.sizes["C"] = 2
    if out_ch:
        spec.sizes["F"] = g.pick([2, 3])
    if not pool:
        spec.sizes["K"] = g.pick([2, 3])
    xd = ("B", "C", "N") if channels else ("B", "N")
    spec.inputs["x"] = xd
    g.tensors["x"] = TensorInfo(xd, "input", positive=g.chance(20))
    if not pool:
        wd = (("F",) if out_ch else ()) + (("C",) if channels else ()) + ("K",)
        spec.params["w"] = wd
        g.tensors["w"] = TensorInfo(wd, "param", positive=g.chance(20))
    bias = not pool and g.chance(40)
    if bias:
        bd = ("F",) if out_ch else ("B",)
        spec.params["bias"] = bd
        g.tensors["bias"] = TensorInfo(bd, "param")
    spec.positive = {n for n, t in g.tensors.items() if t.positive}
    two_p = IOp("*", IConst(2), IVar("P"))
    if dilated:  # (N + 2*P - D*(K - 1) - 1)//S + 1
        span = IOp("-", IOp("-", IOp("+", IVar("N"), two_p), IOp("*", IVar("D"), IOp("-", IVar("K"), IConst(1)))),
                   IConst(1))
    else:  # (N + 2*P - K)//S + 1
        span = IOp("-", IOp("+", IVar("N"), two_p), IVar("K"))
    osize = IOp("+", IOp("//", span, IVar("S")), IConst(1))
    spec.derived = {"O": osize}
    # keep O >= 1 for the run-time attributes
    vals = spec.attr_values()
    k = vals.get("K", spec.sizes.get("K"))
    need = vals.get("D", 1) * (k - 1) + 1 - 2 * vals["P"]
    spec.sizes["N"] = max(spec.sizes["N"], need)
    ydims = ("B",) + (("F",) if out_ch else ()) + ("O",)
    spec.outputs = {"y": ydims}
    lhs = tuple(zip(["b", "f", "o"] if out_ch else ["b", "o"], ydims))
    pos = IOp("*", IVar("o"), IVar("S"))
    pos = IOp("+", pos, IOp("*", IVar("p"), IVar("D")) if dilated else IVar("p"))
    pos = IOp("-", pos, IVar("P"))
    xidx = (IVar("b"),) + ((IVar("c"),) if channels else ()) + (pos,)
    X = Read("x", xidx, padded=True)
    # the body: reads X (padded: zero outside) and W; no division by X, no log of X
    g.tensors["_X"] = TensorInfo((), "inter")  # placeholder so leaves can be X
    leaves = [X]
    if not pool:
        widx = ((IVar("f"),) if out_ch else ()) + ((IVar("c"),) if channels else ()) + (IVar("p"),)
        leaves.append(Read("w", widx))
    form = g.weighted({"prod": 4, "fprod": 3, "free": 3})
    if form == "prod" and not pool:
        body = Bin("*", X, leaves[1])
    elif form == "fprod":
        f = g.pick(["tanh", "sigmoid", "exp", "sin", "softplus", "relu", "abs", "atan", "erf"])
        body = Fn(f, (X,))
        if not pool:
            body = Bin("*", body, leaves[1])
    else:
        body = _window_body(g, leaves, 2)
        if not pool and "w" not in Gen.reads_of(body):
            body = Bin("*", body, leaves[1])
    del g.tensors["_X"]
    if "x" not in Gen.reads_of(body):
        body = Bin("+", body, X)
    red_idx = ((("c", "C"),) if channels else ()) + (("p", "K"),)
    kind = g.weighted({"sum": 3, "max": 2})
    rhs: Node = Red(kind, body, red_idx)
    if bias:
        rhs = Bin("+", rhs, Read("bias", (IVar("f"),) if out_ch else (IVar("b"),)))
    if g.chance(30):
        rhs = Fn(g.pick(["tanh", "sigmoid", "softplus", "exp"]), (rhs,))
    spec.equations = [Equation("y", lhs, rhs)]


def _window_body(g: Gen, leaves, depth):
    if depth == 0:
        if g.chance(80):
            return g.pick(leaves)
        return Num(*g.pick(NUMBERS))
    kind = g.weighted({"leaf": 2, "fn": 3, "bin": 4, "pow": 1})
    if kind == "leaf":
        return g.pick(leaves)
    if kind == "fn":
        name = g.pick(["tanh", "sigmoid", "exp", "sin", "cos", "softplus", "relu", "atan", "erf", "gelu", "silu",
                       "abs", "elu", "mish"])
        return Fn(name, (_window_body(g, leaves, depth - 1),))
    if kind == "pow":
        return Pow(_window_body(g, leaves, depth - 1), Num(*g.pick(POWERS_ANY)))
    op = g.pick(["+", "-", "*", "/"])
    a = _window_body(g, leaves, depth - 1)
    if op == "/":
        b = Bin("+", Num("1", 1.0), Pow(_window_body(g, leaves, depth - 1), Num("2", 2.0)))
    else:
        b = _window_body(g, leaves, depth - 1)
        if op == "-" and b == a:  # x - x cancels, and with it the only read binding an index
            b = Num("0.5", 0.5)
    return Bin(op, a, b)


def gen_split(g: Gen, spec: FuzzSpec):
    """An axis split into R equal parts (GLU's halves, an LSTM's four gates):
    x = "B G", dims = { G = "R*H" } (a relation checked at run time), ranges = { j = "H" },
    y[b, j] = f(x[b, j], x[b, j + H], ..., x[b, j + (R-1)*H]) (times a per-part param)."""
    r = g.pick([2, 2, 3, 4])
    spec.sizes = {"B": g.pick([1, 2, 3]), "H": g.pick([2, 3])}
    spec.sizes["G"] = r * spec.sizes["H"]
    spec.inputs = {"x": ("B", "G")}
    g.tensors["x"] = TensorInfo(("B", "G"), "input", positive=g.chance(20))
    spec.relations = {"G": IOp("*", IConst(r), IVar("H")) if g.chance(70) else IOp("*", IVar("H"), IConst(r))}
    spec.ranges = {"j": "H"}
    parts = []
    for k in range(r):
        off = IVar("j") if k == 0 else IOp("+", IVar("j"), IVar("H") if k == 1 else IOp("*", IConst(k), IVar("H")))
        parts.append(Read("x", (IVar("b"), off)))
    leaves = list(parts)
    if g.chance(50):
        wide = g.chance(50)  # a parameter over the whole axis, read per part, or over one part
        spec.params = {"w": ("G",) if wide else ("H",)}
        g.tensors["w"] = TensorInfo(spec.params["w"], "param")
        if wide:
            leaves.append(Read("w", (IOp("+", IVar("j"), IVar("H")) if r > 1 and g.chance(50) else IVar("j"),)))
        else:
            leaves.append(Read("w", (IVar("j"),)))
    spec.positive = {n for n, t in g.tensors.items() if t.positive}
    body = _window_body(g, leaves, g.max_depth)
    gates = {"sigmoid", "tanh"}
    if g.chance(50):  # the usual gate form: part * sigmoid(other part)
        body = Bin("*", parts[0], Fn(g.pick(sorted(gates)), (parts[-1],)))
        if g.chance(50):
            body = Bin("+", body, _window_body(g, leaves, 1))
    for name in ["x", *spec.params]:
        if name not in Gen.reads_of(body):
            body = Bin("+", body, leaves[-1] if name == "w" else parts[0])
    spec.outputs = {"y": ("B", "H")}
    spec.equations = [Equation("y", (("b", "B"), ("j", "H")), body)]


def gen_optimizer(g: Gen, spec: FuzzSpec, temporaries: bool):
    spec.sizes = {"n": g.pick([3, 5])}
    spec.state = [s for s in ["m", "v"] if g.chance(60)]
    spec.hyper = {"lr": g.pick([0.1, 0.01, 0.05])}
    for h, opts in (("beta", [0.9, 0.5]), ("eps", [0.001, 0.1]), ("c", [0.5, 2.0])):
        if g.chance(60):
            spec.hyper[h] = g.pick(opts)
    _runtime(g, spec, {h: [0.3, 0.7] for h in spec.hyper if h != "lr"} | {"lr": [0.2, 0.02]})
    g.float_attrs = [h for h in spec.hyper if h not in ("lr",)] + ["t"] * g.pick([0, 1])
    for n in ["p", "g", *spec.state]:
        g.tensors[n] = TensorInfo((), "input" if n == "g" else "opt")
    scope = Scope({}, reduce=False)
    eqs = []
    for s in spec.state:
        beta = Sym("beta") if "beta" in spec.hyper else Num("0.9", 0.9)
        form = g.weighted({"ema": 3, "free": 2})
        if form == "ema":
            inner = g.gen(scope, 1)
            if "g" not in Gen.reads_of(inner):
                inner = Bin("*", inner, Read("g"))
            rhs = Bin("+", Bin("*", beta, Read(s)), Bin("*", Bin("-", Num("1", 1.0), beta), inner))
        else:
            rhs = g.gen(scope, 2)
            if s not in Gen.reads_of(rhs):
                rhs = Bin("+", rhs, Bin("*", Num("0.5", 0.5), Read(s)))
        eqs.append(Equation(s, (), rhs))
    temp = None
    scalars = []  # read by the p update
    if temporaries and g.chance(35):  # scalar state (second round): per step, from hyper, t and itself
        name = "sc"
        spec.scalar_state = {name: g.pick([1.0, 0.5])}
        saved, g.tensors = g.tensors, {name: TensorInfo((), "opt")}
        saved_attrs, g.float_attrs = g.float_attrs, [h for h in spec.hyper] + ["t"]
        factor = g.gen(scope, 1)
        eqs.insert(0, Equation(name, (), Bin("*", Read(name), factor) if g.chance(70) else Bin("+", Read(name), factor)))
        scalars.append(name)
        if g.chance(50):  # a per-step scalar temporary
            eqs.insert(1, Equation("c2", (), g.gen(scope, 1)))
            spec.temporaries.append("c2")
            scalars.append("c2")
        g.tensors, g.float_attrs = saved, saved_attrs
        for n in scalars:
            g.tensors[n] = TensorInfo((), "inter")
    if temporaries and g.chance(50):  # an elementwise temporary (second round): read by the p update
        temp = "c1"
        eqs.append(Equation(temp, (), g.gen(scope, 2)))
        spec.temporaries.append(temp)
        g.tensors[temp] = TensorInfo((), "inter")
    step = g.gen(scope, 2)
    for n in ([temp] if temp else []) + scalars:
        if n not in Gen.reads_of(step):
            step = Bin(g.pick(["+", "*"]), step, Read(n) if g.chance(50) else Fn("tanh", (Read(n),)))
    if g.chance(40):  # bias correction in t
        bc = Bin("-", Num("1", 1.0), Pow(Sym("beta") if "beta" in spec.hyper else Num("0.9", 0.9), Sym("t")))
        step = Bin("/", step, bc)
    rhs = Bin("-", Read("p"), Bin("*", Sym("lr"), step))
    if not Gen.reads_of(step) - {"p"}:
        rhs = Bin("-", rhs, Bin("*", Sym("lr"), Read("g")))
    # the parameter is updated last, or (one time in five) before a state update that then reads the new p
    first = len(scalars)  # after the scalar updates, which read neither p nor g
    pos = len(eqs) if temp is not None or g.chance(80) else g.integer(first, len(eqs))
    eqs.insert(pos, Equation("p", (), rhs))
    spec.equations = eqs


def _reindex(node, mapping: dict):
    """``node`` with its plain indices renamed (``mapping``: old name -> new name)."""
    import dataclasses

    if isinstance(node, IVar):
        return IVar(mapping.get(node.name, node.name))
    if isinstance(node, (IConst, Num, Sym)):
        return node
    if isinstance(node, IOp):
        return IOp(node.op, _reindex(node.a, mapping), _reindex(node.b, mapping))
    if isinstance(node, (Read, IRead)):
        return dataclasses.replace(node, idx=tuple(_reindex(e, mapping) for e in node.idx))
    if isinstance(node, IVal):
        return IVal(_reindex(node.e, mapping))
    if isinstance(node, Fn):
        return Fn(node.name, tuple(_reindex(a, mapping) for a in node.args))
    if isinstance(node, Red):
        return Red(node.kind, _reindex(node.body, mapping), node.idx)
    fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    return dataclasses.replace(node, **{k: _reindex(v, mapping) for k, v in fields.items() if isinstance(v, Node)})


def gen_gather(g: Gen, spec: FuzzSpec):
    """Integer inputs (``dtypes = { idx = "int" }``): a gather from a parameter table by
    an index input with repeated values (its gradient is a scatter-add), the index in
    comparisons (``where(idx[b] > 1, ...)``, ``Eq(v, idx[b])``, a one-hot) and in
    integer arithmetic (``table[(idx[b] + 1) % V, d]``)."""
    spec.sizes = {"B": g.pick([4, 5]), "V": g.pick([2, 3]), "D": g.pick([2, 3])}
    spec.inputs = {"idx": ("B",)}
    spec.dtypes = {"idx": "int"}
    spec.sampling = {"idx": "int:V"}
    if g.chance(60):
        spec.inputs["x"] = ("B", "D")
        g.tensors["x"] = TensorInfo(("B", "D"), "input")
    spec.params = {"table": ("V", "D")}
    g.tensors["table"] = TensorInfo(("V", "D"), "param")
    if g.chance(30):
        spec.params["w"] = ("D",)
        g.tensors["w"] = TensorInfo(("D",), "param")
    i_b = IRead("idx", (IVar("b"),))
    row = i_b if g.chance(80) else IOp("%", IOp("+", i_b, IConst(g.pick([1, 2]))), IVar("V"))
    gathered = Read("table", (row, IVar("d")))
    leaves = [gathered] + [Read(n, (IVar("b"), IVar("d")) if n == "x" else (IVar("d"),))
                           for n in spec.inputs if n == "x"] + ([Read("w", (IVar("d"),))] if "w" in spec.params else [])
    form = g.weighted({"gather": 4, "onehot": 2, "compare": 2})
    if form == "onehot":  # sum(where(Eq(v, idx[b]), table[v, d], 0), v): the gather written as a one-hot
        cmp = Cmp("==", IVal(IVar("v")), IVal(i_b), fn=g.chance(70)) if g.chance(70) else \
            Cmp("==", IVal(i_b), IVal(IVar("v")), fn=True)
        gathered = Red("sum", Where(cmp, Read("table", (IVar("v"), IVar("d"))), Num("0", 0.0)), (("v", "V"),))
        leaves[0] = gathered
    body = _window_body(g, leaves, g.pick([1, 2]))
    if "table" not in Gen.reads_of(body):
        body = Bin(g.pick(["+", "*"]), body, gathered)
    for n in spec.inputs:
        if n != "idx" and n not in Gen.reads_of(body):
            body = Bin("+", body, leaves[1])
    if "w" in spec.params and "w" not in Gen.reads_of(body):
        body = Bin("*", body, Read("w", (IVar("d"),)))
    if form == "compare":  # the index as a value in a condition
        thr = g.pick([0, 1])
        cond = Cmp(g.pick([">", ">=", "<", "!="]), IVal(i_b), Num(str(thr), float(thr)), fn=g.chance(30))
        other = _window_body(g, leaves, 1)
        body = Where(cond, body, other) if g.chance(50) else Where(cond, other, body)
    out = g.weighted({"elementwise": 3, "row": 2, "loss": 2})
    if out == "elementwise":
        spec.outputs = {"y": ("B", "D")}
        spec.equations = [Equation("y", (("b", "B"), ("d", "D")), body)]
    elif out == "row":
        spec.outputs = {"y": ("B",)}
        spec.equations = [Equation("y", (("b", "B"),), Red("sum", body, (("d", "D"),)))]
    else:
        spec.kind = "loss"
        spec.outputs = {"loss": ()}
        spec.equations = [Equation("loss", (), Bin("/", Red("sum", body, (("b", "B"), ("d", "D"))), Sym("B")))]
    if g.chance(30):
        floats = [a for a in spec.arg_names if spec.dtypes.get(a) != "int"]
        spec.differentiate = [a for a in floats if a == "table" or g.chance(50)]


def gen_assume(g: Gen, spec: FuzzSpec):
    """``assume = ["sum(target[b, c], c) == 1"]``: a target whose rows are distributions
    (drawn so), read by a cross-entropy-like form whose derivation may use the fact;
    :func:`check` also breaks one row and requires the documented error."""
    spec.sizes = {"B": g.pick([2, 3]), "C": g.pick([3, 4])}
    spec.inputs = {"logits": ("B", "C"), "target": ("B", "C")}
    spec.sampling = {"target": "rows"}
    g.tensors["logits"] = TensorInfo(("B", "C"), "input")
    if g.chance(40):
        spec.params = {"w": ("C",)}
        g.tensors["w"] = TensorInfo(("C",), "param")
    spec.assume = [g.pick(["sum(target[b, c], c) == 1", "sum(target[b,c], c) == 1"])]
    spec.differentiate = ["logits"] + list(spec.params)
    leaves = [Read("logits", (IVar("b"), IVar("c")))] + [Read(n, (IVar("c"),)) for n in spec.params]
    h = leaves[0] if g.chance(40) else _window_body(g, leaves, g.pick([1, 2]))
    if "logits" not in Gen.reads_of(h):
        h = Bin("+", h, leaves[0])
    if "w" in spec.params and "w" not in Gen.reads_of(h):
        h = Bin("*", h, leaves[1])
    hk = _reindex(h, {"c": "k"})
    lse = Fn("log", (Red("sum", Fn("exp", (hk,)), (("k", "C"),)),))
    t = Read("target", (IVar("b"), IVar("c")))
    form = g.weighted({"inline": 3, "named": 2, "layer": 2, "free": 2})
    if form == "free":  # any expression of the logits, weighted by the target
        free = _window_body(g, leaves, 2)
        if "logits" not in Gen.reads_of(free):
            free = Bin(g.pick(["+", "*"]), free, leaves[0])
        body = Bin("*", t, free)
    else:
        body = Bin("*", t, Bin("-", h, lse))
    if form == "named":
        spec.equations = [Equation("lse", (("b", "B"),), lse),
                          Equation("loss", (), Bin("/", Neg(Red("sum", Bin("*", t, Bin("-", h, Read("lse", (IVar("b"),)))),
                                                                   (("b", "B"), ("c", "C")))), Sym("B")))]
    elif form == "layer":
        spec.kind = "layer"
        spec.outputs = {"y": ("B",)}
        spec.equations = [Equation("y", (("b", "B"),), Neg(Red("sum", body, (("c", "C"),))))]
        return
    else:
        spec.equations = [Equation("loss", (), Bin("/", Neg(Red("sum", body, (("b", "B"), ("c", "C")))), Sym("B")))]
    spec.kind = "loss"
    spec.outputs = {"loss": ()}


# ======================================================================================
# Large-input mode: stability-relevant shapes at |x| ~ 1e2-1e3
# ======================================================================================


def _one(v=1.0):
    return Num(str(int(v)) if float(v).is_integer() else repr(v), float(v))


def _large_arg(g: Gen, read: Node) -> Node:
    """A linear argument around a large read: x, -x, x/2, 2*x - 1, alpha*x: large stays large."""
    form = g.weighted({"plain": 6, "neg": 2, "half": 1, "affine": 1, "attr": 1 if g.float_attrs else 0})
    if form == "neg":
        return Neg(read)
    if form == "half":
        return Bin("/", read, Num("2", 2.0))
    if form == "affine":
        return Bin("-", Bin("*", Num("2", 2.0), read), Num("1", 1.0))
    if form == "attr":
        return Bin("*", Sym(g.float_attrs[0]), read)
    return read


def _stable_atom(g: Gen, a: Node, b: Node, p: Node | None, y: Node | None) -> Node:
    """One shape whose naive evaluation overflows, underflows or cancels at large
    arguments ``a``, ``b``; ``p`` is positive (or None), ``y`` in [0, 1] (or None)."""
    one = Num("1", 1.0)
    weights = {"softplus": 2, "logsig": 4, "log1msig": 3, "log1pexp": 3, "log1p_exp": 2, "sig_ratio": 3,
               "sig_recip": 2, "sig_var": 2, "swish": 2, "tanh_ratio": 2, "logcosh": 2, "lse2": 4, "ratio2": 4,
               "named": 3, "focal": 2, "bce": 2 if y is not None else 0, "hypot": 1, "expdiff": 1,
               "xlogx": 3 if p is not None else 0, "softsign": 1, "log_exp": 1, "sig_diff": 1, "siglogsig": 2,
               "mish_written": 1, "gelu_tanh": 1, "exp_neg_sq": 1, "sum_ratio": 2}
    k = g.weighted(weights)
    sig = Fn("sigmoid", (a,))
    if k == "softplus":
        return Fn("softplus", (a,))
    if k == "logsig":
        return Fn("log", (sig,))
    if k == "log1msig":
        return Fn("log", (Bin("-", one, sig),))
    if k == "log1pexp":
        return Fn("log", (Bin("+", one, Fn("exp", (a,))),))
    if k == "log1p_exp":
        return Fn("log1p", (Fn("exp", (a,)),))
    if k == "sig_ratio":
        return Bin("/", Fn("exp", (a,)), Bin("+", one, Fn("exp", (a,))))
    if k == "sig_recip":
        return Bin("/", one, Bin("+", one, Fn("exp", (Neg(a),))))
    if k == "sig_var":
        return Bin("*", sig, Bin("-", one, sig))
    if k == "swish":
        return Bin("*", a, sig)
    if k == "tanh_ratio":
        e, f = Fn("exp", (a,)), Fn("exp", (Neg(a),))
        return Bin("/", Bin("-", e, f), Bin("+", e, f))
    if k == "logcosh":
        return Fn("log", (Fn("cosh", (a,)),))
    if k == "lse2":
        return Fn("log", (Bin("+", Fn("exp", (a,)), Fn("exp", (b,))),))
    if k == "ratio2":
        return Bin("/", Fn("exp", (a,)), Bin("+", Fn("exp", (a,)), Fn("exp", (b,))))
    if k == "sum_ratio":  # (exp(a) - exp(b)) / (exp(a) + exp(b))
        return Bin("/", Bin("-", Fn("exp", (a,)), Fn("exp", (b,))), Bin("+", Fn("exp", (a,)), Fn("exp", (b,))))
    if k == "named":
        return Fn(g.pick(["silu", "mish", "gelu", "elu", "tanh", "sigmoid", "softplus", "erf", "atan", "relu",
                          "leaky_relu", "abs"]), (a,))
    if k == "focal":
        return Bin("*", Neg(Pow(Bin("-", one, sig), Num("2", 2.0))), Fn("log", (sig,)))
    if k == "bce":
        return Bin("+", Bin("*", y, Fn("log", (sig,))), Bin("*", Bin("-", one, y), Fn("log", (Bin("-", one, sig),))))
    if k == "hypot":
        return Fn("sqrt", (Bin("+", Pow(a, Num("2", 2.0)), Pow(b, Num("2", 2.0))),))
    if k == "expdiff":
        return Fn("exp", (Bin("-", a, b),))
    if k == "xlogx":
        return Bin("*", p, Fn("log", (p,)))
    if k == "softsign":
        return Bin("/", a, Bin("+", one, Fn("abs", (a,))))
    if k == "log_exp":
        return Fn("log", (Fn("exp", (a,)),))
    if k == "sig_diff":
        return Fn("sigmoid", (Bin("-", a, b),))
    if k == "siglogsig":
        return Bin("*", sig, Fn("log", (sig,)))
    if k == "mish_written":
        return Bin("*", a, Fn("tanh", (Fn("log", (Bin("+", one, Fn("exp", (a,))),)),)))
    if k == "gelu_tanh":
        inner = Bin("*", Num("0.7978845608", 0.7978845608),
                    Bin("+", a, Bin("*", Num("0.044715", 0.044715), Pow(a, Num("3", 3.0)))))
        return Bin("*", Bin("*", Num("0.5", 0.5), a), Bin("+", one, Fn("tanh", (inner,))))
    return Fn("exp", (Neg(Pow(a, Num("2", 2.0))),))


def _stable_expr(g: Gen, args, p=None, y=None) -> Node:
    """A stability atom, sometimes combined with another or scaled (``args()`` draws one
    large argument)."""
    e = _stable_atom(g, args(), args(), p, y)
    if g.chance(40):
        op = g.pick(["+", "-", "*"])
        e = Bin(op, e, _stable_atom(g, args(), args(), p, y))
    if g.chance(15):
        e = Bin("*", Num(*g.pick([("0.5", 0.5), ("3", 3.0), ("0.25", 0.25)])), e)
    return e


def gen_stable_act(g: Gen, spec: FuzzSpec):
    spec.inputs = {"x": ()}
    spec.sampling = {"x": "large"}
    if g.chance(20):
        spec.attrs["alpha"] = g.pick([0.5, 1.5, 2.0])
        g.float_attrs.append("alpha")
    x = Read("x")
    p = g.pick([Fn("abs", (x,)), Pow(x, Num("2", 2.0))])
    rhs = _stable_expr(g, lambda: _large_arg(g, x), p=p)
    if "x" not in Gen.reads_of(rhs):
        rhs = Bin("+", rhs, x)
    spec.equations = [Equation("y", (), rhs)]
    spec.act_shape = g.pick([(6,), (2, 4), (9,)])


def _row_forms(g: Gen, S, v):
    """Row-wise shapes over j (S(i) is a large score at index i of the row; v(i) values)."""
    j, n = "j", "n"
    e_n, den = Fn("exp", (S(n),)), Red("sum", Fn("exp", (S(j),)), ((j, "N"),))
    lse = Fn("log", (den,))
    form = g.weighted({"softmax": 3, "attention": 3, "lse": 2, "logsoftmax": 2, "logratio": 3, "lsediff": 1,
                       "maxshift": 1})
    if form == "softmax":
        return ("B", "N"), Bin("/", e_n, den)
    if form == "attention":
        return ("B",), Bin("/", Red("sum", Bin("*", Fn("exp", (S(j),)), v(j)), ((j, "N"),)), den)
    if form == "lse":
        return ("B",), lse
    if form == "logsoftmax":
        return ("B", "N"), Bin("-", S(n), lse)
    if form == "logratio":
        return ("B", "N"), Fn("log", (Bin("/", e_n, den),))
    if form == "lsediff":
        return ("B", "N"), Fn("log", (Red("sum", Fn("exp", (Bin("-", S(j), S(n)),)), ((j, "N"),)),))
    m = Red("max", S("k"), (("k", "N"),))
    return ("B",), Bin("+", m, Fn("log", (Red("sum", Fn("exp", (Bin("-", S(j), m),)), ((j, "N"),)),)))


def gen_stable_layer(g: Gen, spec: FuzzSpec, loss: bool = False):
    """Layers and losses of stability-relevant shapes over large inputs: softmax and
    attention ratios of sums of exponentials, log-sum-exp, log-softmax, the log of a
    softmax ratio, a softmax or a sigmoid named on its own line then logged, entropies
    ``q log q``, cross-entropy, focal and binary cross-entropy losses, elementwise atoms
    (:func:`_stable_atom`); scores are an input or a contraction ``sum(u[b,k]*w[k,n], k)``."""
    spec.sizes = {"B": g.pick([2, 3]), "N": g.pick([3, 4, 5]), "K": g.pick([2, 3])}
    spec.inputs = {"x": ("B", "N")}
    spec.sampling = {"x": g.pick(["large", "offset", "offset"])}
    g.tensors["x"] = TensorInfo(("B", "N"), "input")
    scores = g.chance(25)
    if scores:
        spec.inputs["u"] = ("B", "K")
        spec.sampling["u"] = g.pick(["large", "offset"])
        spec.params["w"] = ("K", "N")
    want_v = g.chance(50)
    if want_v:
        spec.inputs["v"] = ("B", "N")
    want_p = g.chance(25)
    if want_p:
        spec.inputs["p"] = ("B", "N")
        spec.sampling["p"] = "large"
        spec.positive = {"p"}
    want_t = loss or g.chance(15)
    if want_t:
        spec.inputs["target"] = ("B", "N")
        spec.sampling["target"] = g.pick(["prob", "rows"])
    eqs = []

    def X(i):
        return Read("x", (IVar("b"), IVar(i)))

    if scores:
        eqs.append(Equation("t", (("b", "B"), ("n", "N")),
                            Bin("+", Red("sum", Bin("*", Read("u", (IVar("b"), IVar("k"))), Read("w", (IVar("k"), IVar("n")))),
                                         (("k", "K"),)), Read("x", (IVar("b"), IVar("n"))))))

        def S(i):
            return Read("t", (IVar("b"), IVar(i)))
    else:
        shape = _large_arg(g, X("n"))

        def S(i):
            return _reindex(shape, {"n": i})

    def V(i):
        return Read("v", (IVar("b"), IVar(i))) if want_v else Fn("tanh", (X(i),))

    P = Read("p", (IVar("b"), IVar("n"))) if want_p else None
    T = Read("target", (IVar("b"), IVar("n"))) if want_t else None
    lhs_bn = (("b", "B"), ("n", "N"))
    form = g.weighted({"row": 5, "named_softmax": 3, "named_sigmoid": 2, "elementwise": 4})
    if form == "row":
        dims, rhs = _row_forms(g, S, V)
        body_bn = rhs if dims == ("B", "N") else None
        if body_bn is None:
            target = ("y", (("b", "B"),), rhs)
    elif form == "named_softmax":
        eqs.append(Equation("q", lhs_bn, Bin("/", Fn("exp", (S("n"),)), Red("sum", Fn("exp", (S("j"),)), (("j", "N"),)))))
        q = Read("q", (IVar("b"), IVar("n")))
        k = g.weighted({"entropy": 2, "log": 2, "weighted": 1})
        if k == "entropy":
            body_bn = None
            target = ("y", (("b", "B"),), Red("sum", Bin("*", q, Fn("log", (q,))), (("n", "N"),)))
        elif k == "log":
            body_bn = Fn("log", (q,))
        else:
            body_bn = Bin("*", q, V("n"))
    elif form == "named_sigmoid":
        eqs.append(Equation("q", lhs_bn, Fn("sigmoid", (S("n"),))))
        q = Read("q", (IVar("b"), IVar("n")))
        one = Num("1", 1.0)
        k = g.weighted({"focal": 2, "log": 1, "log1m": 1, "bce": 1 if T is not None else 0})
        if k == "focal":
            body_bn = Bin("*", Neg(Pow(Bin("-", one, q), Num("2", 2.0))), Fn("log", (q,)))
        elif k == "log":
            body_bn = Fn("log", (q,))
        elif k == "log1m":
            body_bn = Fn("log", (Bin("-", one, q),))
        else:
            body_bn = Bin("+", Bin("*", T, Fn("log", (q,))), Bin("*", Bin("-", one, T), Fn("log", (Bin("-", one, q),))))
    else:
        def arg():
            return _large_arg(g, X("n")) if not scores or g.chance(50) else S("n")

        body_bn = _stable_expr(g, arg, p=P, y=T)
        if scores and "t" not in Gen.reads_of(body_bn):
            body_bn = Bin("+", body_bn, _stable_atom(g, S("n"), X("n"), P, T))
        if want_p and "p" not in Gen.reads_of(body_bn):  # x*log(x), x large or near 0
            body_bn = Bin(g.pick(["+", "-"]), body_bn, Bin("*", P, Fn("log", (P,))))
        if want_v and g.chance(50):
            body_bn = Bin("*", body_bn, V("n"))
    if loss:
        spec.kind = "loss"
        spec.outputs = {"loss": ()}
        if body_bn is not None:
            w = T if T is not None and g.chance(60) else None
            body = Bin("*", w, body_bn) if w is not None else body_bn
            rhs = Bin("/", Neg(Red("sum", body, (("b", "B"), ("n", "N")))), Sym("B"))
        else:
            _, lhs, row = target
            rhs = Bin("/", Red("sum", _reindex(row, {}), (("b", "B"),)), Sym("B"))
        eqs.append(Equation("loss", (), rhs))
    else:
        if body_bn is not None:
            spec.outputs = {"y": ("B", "N")}
            eqs.append(Equation("y", lhs_bn, body_bn))
        else:
            name, lhs, rhs = target
            spec.outputs = {"y": ("B",)}
            eqs.append(Equation("y", lhs, rhs))
    spec.equations = eqs
    # every declared input is read; a target, an index tensor and p are data
    reads = set().union(*(Gen.reads_of(e.rhs) for e in eqs))
    for n in list(spec.inputs):
        if n not in reads:
            del spec.inputs[n]
            spec.sampling.pop(n, None)
            spec.positive.discard(n)
    for n in list(spec.params):
        if n not in reads:
            del spec.params[n]
    if "target" in spec.inputs:
        spec.differentiate = [n for n in spec.arg_names if n != "target"]


# ======================================================================================
# The strategy
# ======================================================================================

FAMILIES = ("activation", "layer", "window", "split", "loss", "optimizer", "gather", "assume")


LARGE_FAMILIES = ("stable_act",) * 3 + ("stable_layer",) * 4 + ("stable_loss",) * 2 + ("activation", "layer")


def generate(src, families=FAMILIES, temporaries=True, max_depth=3, large=False) -> FuzzSpec:
    """One random :class:`FuzzSpec` from the choices of ``src`` (``.toml`` is its text).
    ``large``: the large-input mode's mix (LARGE_FAMILIES, unless ``families`` names some
    of them): stability-relevant shapes, and inputs at |v| ~ 1e2-1e3."""
    if large:
        chosen = [f for f in LARGE_FAMILIES if f in families] if families is not FAMILIES else []
        families = chosen or LARGE_FAMILIES
    family = src.pick(list(families))
    depth = src.integer(1, max_depth)
    g = Gen(src, depth)
    if large:  # the high-precision oracle's central differences would differentiate through it
        g.exclude = {"stop_gradient"}
    kind = {"window": "layer", "split": "layer", "gather": "layer", "assume": "loss", "stable_act": "activation",
            "stable_layer": "layer", "stable_loss": "loss"}.get(family, family)
    spec = FuzzSpec(family=family, kind=kind)
    if family == "activation":
        gen_activation(g, spec)
    elif family == "layer":
        gen_layer(g, spec)
    elif family == "loss":
        gen_layer(g, spec, loss=True)
    elif family == "split":
        gen_split(g, spec)
    elif family == "window":
        gen_window(g, spec)
    elif family == "gather":
        gen_gather(g, spec)
    elif family == "stable_act":
        gen_stable_act(g, spec)
    elif family in ("stable_layer", "stable_loss"):
        gen_stable_layer(g, spec, loss=family == "stable_loss")
    elif family == "assume":
        gen_assume(g, spec)
    else:
        gen_optimizer(g, spec, temporaries)
    spec.seed = src.integer(0, 2**31 - 1)
    if large:
        spec.large = True
        for n in spec.arg_names if family in ("activation", "layer") else ():  # the general families' inputs: large too
            if spec.dtypes.get(n) != "int" and n not in spec.sampling:
                spec.sampling[n] = "large"
    return finish(spec)


@st.composite
def specs(draw, families=FAMILIES, temporaries=True, max_depth=3, large=False):
    """The Hypothesis strategy of random specs."""
    return generate(HypothesisSource(draw), families, temporaries, max_depth, large)


def random_spec(seed: int, k: int, **kw) -> FuzzSpec:
    """Spec number ``k`` of campaign seed ``seed`` (reproducible on its own)."""
    return generate(RandomSource(f"{seed}:{k}"), **kw)


# ======================================================================================
# The high-precision oracle (large-input mode)
# ======================================================================================
#
# The same expression trees, evaluated with mpmath at MP_DIGITS significant digits on
# numpy object arrays: no overflow (mpmath's exponent range is unbounded), no
# cancellation at these magnitudes. Its forward value is "the true value"; its
# gradients are central differences at a step of 1e-20 (relative), exact to far more
# digits than float64 keeps. A tree whose true value is not real (a logarithm of a
# negative number) or whose evaluation divides by zero is not a usable sample.

MP_DIGITS = 50
MP_DIGITS_WIDE = 1000
# the most digits the oracle takes: a sample whose intermediates need more (a cosine of
# exp(exp(x))) has no true value the oracle can give, and is discarded
MP_DIGITS_MAX = 20000
MP_SMALL = 10  # intermediates below 10**MP_SMALL need no more than MP_DIGITS


def _mp_sigmoid(x):
    return 1 / (1 + mpmath.exp(-x))


def _mp_softplus(x):
    return mpmath.log1p(mpmath.exp(x)) if x < 0 else x + mpmath.log1p(mpmath.exp(-x))


MP_FUNCTIONS = {
    "exp": mpmath.exp, "log": mpmath.log, "log1p": mpmath.log1p, "expm1": mpmath.expm1, "sqrt": mpmath.sqrt,
    "sin": mpmath.sin, "cos": mpmath.cos, "tan": mpmath.tan, "atan": mpmath.atan, "sinh": mpmath.sinh,
    "asin": mpmath.asin, "acos": mpmath.acos, "atanh": mpmath.atanh, "asinh": mpmath.asinh, "acosh": mpmath.acosh,
    "erfc": mpmath.erfc,
    "cosh": mpmath.cosh, "tanh": mpmath.tanh, "erf": mpmath.erf, "abs": abs, "sign": mpmath.sign,
    "floor": mpmath.floor,
    "Max": lambda *a: max(a), "Min": lambda *a: min(a),
    "sigmoid": _mp_sigmoid, "softplus": _mp_softplus,
    "relu": lambda x: x if x > 0 else mpmath.mpf(0),
    "leaky_relu": lambda x, s=mpmath.mpf("0.01"): x if x > 0 else s * x,
    "elu": lambda x, a=mpmath.mpf(1): x if x > 0 else a * mpmath.expm1(x),
    "gelu": lambda x: x * (1 + mpmath.erf(x / mpmath.sqrt(2))) / 2,
    "silu": lambda x: x * _mp_sigmoid(x),
    "mish": lambda x: x * mpmath.tanh(_mp_softplus(x)),
    "stop_gradient": lambda x: x,
}


def _obj(v):
    return np.asarray(v, dtype=object)


def _vec(f, *args):
    return _obj(np.frompyfunc(f, len(args), 1)(*args))


def _mp_num(text):
    if "/" in text:
        a, b = text.split("/")
        return mpmath.mpf(a) / mpmath.mpf(b)
    return mpmath.mpf(text)


class MpCtx(Ctx):
    top = None  # a one-element list: the largest magnitude met (see mp_eval), when tracked

    def arange(self, index):
        shape = [1] * self.nd
        shape[self.axes[index]] = self.size(index)
        return np.arange(self.size(index)).reshape(shape)


_MP_CMP = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
           "!=": operator.ne}


def mp_eval(node: Node, ctx: MpCtx):
    """``node`` on object arrays of mpf (the high-precision twin of ``Node.eval``). With
    ``ctx.top`` (a one-element list) set, records there the largest magnitude (in
    decimal digits before the point) of any value computed: what the working precision
    must cover for the digits after the point to be right (``cos(expm1(x) - x)`` at x =
    350 reads the fractional part of a number of 152 digits)."""
    value = _mp_eval(node, ctx)
    top = ctx.top
    if top is not None and value.dtype == object and value.size:
        digits = max((mpmath.mag(v) for v in value.flat if isinstance(v, (mpmath.mpf, mpmath.mpc)) and v),
                     default=0) * 0.30103  # log10(2): mag is a bound on log2 |v|
        if digits > top[0]:
            top[0] = digits
    return value


def _mp_eval(node: Node, ctx: MpCtx):
    if isinstance(node, Num):
        return _obj(_mp_num(node.text))
    if isinstance(node, Sym):
        return _obj(mpmath.mpf(repr(ctx.scalars[node.name])))
    if isinstance(node, IVal):
        return _vec(lambda v: mpmath.mpf(int(v)), np.asarray(node.e.eval(ctx)))
    if isinstance(node, Read):
        t = ctx.env[node.name]
        if not node.idx:
            return t
        mask, clamped = None, []
        for e, n in zip(node.idx, t.shape):
            v = np.asarray(e.eval(ctx))
            v = v.reshape([1] * ctx.nd) if v.ndim == 0 else v
            ok = (v >= 0) & (v < n)
            mask = ok if mask is None else mask & ok
            clamped.append(np.clip(v, 0, max(n - 1, 0)))
        return _obj(np.where(mask, t[tuple(clamped)], mpmath.mpf(0)))
    if isinstance(node, Neg):
        return _obj(-mp_eval(node.a, ctx))
    if isinstance(node, Bin):
        a, b = mp_eval(node.a, ctx), mp_eval(node.b, ctx)
        return _obj({"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}[node.op](a, b))
    if isinstance(node, Pow):
        return _vec(lambda a, b: a ** b, mp_eval(node.base, ctx), mp_eval(node.expo, ctx))
    if isinstance(node, Fn):
        f = MP_FUNCTIONS[node.name]
        if node.name in ("leaky_relu", "elu") and len(node.args) == 2:
            c = _mp_num(node.args[1].text)
            return _vec(lambda x: f(x, c), mp_eval(node.args[0], ctx))
        return _vec(f, *[mp_eval(a, ctx) for a in node.args])
    if isinstance(node, Cmp):
        return _vec(_MP_CMP[node.op], mp_eval(node.a, ctx), mp_eval(node.b, ctx)).astype(bool)
    if isinstance(node, BoolOp):
        a = mp_eval(node.a, ctx).astype(bool)
        if node.op == "not":
            return ~a
        b = mp_eval(node.b, ctx).astype(bool)
        return a & b if node.op == "and" else a | b
    if isinstance(node, Where):
        return _obj(np.where(mp_eval(node.cond, ctx).astype(bool), mp_eval(node.a, ctx), mp_eval(node.b, ctx)))
    if isinstance(node, Red) and node.kind == "reduce":
        return mp_eval(Red("sum" if ctx.scalars["reduction"] == 2 else "mean", node.body, node.idx), ctx)
    if isinstance(node, Red):
        body = mp_eval(node.body, ctx)
        axes = tuple(ctx.axes[i] for i, _ in node.idx)
        shape = [1] * ctx.nd
        for i, _ in node.idx:
            shape[ctx.axes[i]] = ctx.size(i)
        body = body.reshape(body.shape + (1,) * (ctx.nd - body.ndim)) if body.ndim < ctx.nd else body
        body = np.broadcast_to(body, np.broadcast_shapes(body.shape, tuple(shape)))
        if node.kind == "max":
            return _obj(np.max(body, axis=axes, keepdims=True))
        total = _obj(np.sum(body, axis=axes, keepdims=True))
        if node.kind == "mean":
            count = 1
            for a in axes:
                count *= body.shape[a]
            return _obj(total / count)
        return total
    raise TypeError(f"no high-precision rule for {type(node).__name__}")


def _mp_equation(eq: Equation, ctx: MpCtx):
    sizes = dict(eq.lhs)
    for node in eq.rhs.walk():
        if isinstance(node, Red):
            sizes.update(dict(node.idx))
    names = [i for i, _ in eq.lhs] + [i for i in sizes if i not in dict(eq.lhs)]
    ctx.axes = {n: k for k, n in enumerate(names)}
    ctx.sizes = sizes
    ctx.nd = len(names)
    value = mp_eval(eq.rhs, ctx)
    shape = [ctx.size(i) for i, _ in eq.lhs]
    if value.ndim < ctx.nd:
        value = value.reshape(value.shape + (1,) * (ctx.nd - value.ndim))
    if value.ndim == 0:
        return _obj(np.broadcast_to(value, shape).copy()) if shape else value
    value = np.broadcast_to(value, shape + list(value.shape[len(shape):]))
    return _obj(value.reshape(shape))


def mp_outputs(spec: FuzzSpec, env: dict, top: list | None = None) -> list:
    """The outputs (object arrays of mpf) of ``spec`` on ``env`` (name -> object array,
    or an int64 array for an integer input); ``top``: see :func:`mp_eval`."""
    if spec.kind == "activation":
        ctx = MpCtx(env={"x": env["x"]}, ints={}, scalars=spec.attr_values())
        ctx.top = top
        return [_obj(np.broadcast_to(mp_eval(spec.equations[0].rhs, ctx), env["x"].shape).copy())]
    ints = spec.dim_values()
    ctx = MpCtx(env=dict(env), ints=ints, scalars={**ints, **spec.attr_values()})
    ctx.top = top
    for eq in spec.equations:
        ctx.env[eq.target] = _mp_equation(eq.resolved(ctx.scalars), ctx)
    return [ctx.env[o] for o in spec.outputs]


def _to_float(a) -> np.ndarray:
    """Object array of mpf -> float64 (inf beyond float64's range, NaN where not real)."""
    def conv(v):
        if isinstance(v, mpmath.mpc):
            return float("nan") if abs(v.imag) > 1e-40 * max(1, abs(v.real)) else float(v.real)
        return float(v)
    return np.vectorize(conv, otypes=[np.float64])(a) if np.size(a) else np.zeros(np.shape(a))


def mp_reference(spec: FuzzSpec, args, seeds, wrt):
    """The true outputs and the true gradients (of sum(seed * output) with respect to
    ``args[i]``, i in ``wrt``) as float64 arrays, from the high-precision oracle.

    The precision grows with the magnitude of the values the evaluation meets: where an
    intermediate reaches 10**m (m > MP_SMALL) the oracle works at MP_DIGITS + m digits
    (``cos(expm1(x) - x)`` at x = 350 reads the fractional part of a number of 152
    digits: 50 digits gave a wrong value; a central difference resolves a change of 1e-20
    relative to the argument in an output element only if the digits cover that element
    too). Where the central difference's step (1e-20 relative) is too coarse for the
    function (its two one-sided differences disagree: the derivative of that cosine is
    of order 1e152), the step shrinks to 10**-(20 + m) and the digits grow by m more.
    Where MP_DIGITS leave a value non-finite (``1 - sigmoid(800)`` is 0 at 50 digits; its
    logarithm is not -inf) it takes at least MP_DIGITS_WIDE. Repeated until the precision
    covers what the evaluation at that precision meets; a sample needing more than
    MP_DIGITS_MAX digits is discarded."""
    digits, grow = MP_DIGITS, 0
    if seeds is not None:  # the forward alone first: what the intermediates' magnitude asks for
        top = [0.0]
        _mp_reference(spec, args, None, wrt, MP_DIGITS, top)
        digits = MP_DIGITS + (math.ceil(top[0]) if top[0] > MP_SMALL else 0)
    while True:
        top, coarse = [0.0], [False]
        out = _mp_reference(spec, args, seeds, wrt, digits, top, grow, coarse)
        m = math.ceil(top[0]) if top[0] > MP_SMALL else 0
        step = m if coarse[0] and not grow else grow  # the step shrinks once: a kink stays coarse
        need = MP_DIGITS + m + step
        if not all(np.all(np.isfinite(a)) for a in out[0] + (out[1] or [])):
            need = max(need, MP_DIGITS_WIDE)
        if need <= digits and step <= grow:
            return out
        if need > MP_DIGITS_MAX:
            raise _Discard(f"the true value needs {need} digits (an intermediate of about 1e{top[0]:.0f}); "
                           f"the oracle takes at most {MP_DIGITS_MAX}")
        digits, grow = max(digits, need), step


def _mp_reference(spec: FuzzSpec, args, seeds, wrt, digits, top=None, grow=0, coarse=None):
    """:func:`mp_reference` at ``digits`` digits and a step of 10**-(20 + grow) relative;
    ``top``: see :func:`mp_eval`; ``coarse`` (a one-element list) is set where the
    one-sided differences of a gradient element disagree beyond 1e-8 of it."""
    with mpmath.workdps(digits):
        env = {n: (a if ref._is_int(a) else _vec(lambda v: mpmath.mpf(float(v)), a))
               for n, a in zip(spec.arg_names, args)}
        outs = mp_outputs(spec, env, top)
        if seeds is None:
            return [_to_float(o) for o in outs], None
        s_mp = [_vec(lambda v: mpmath.mpf(float(v)), np.asarray(s, dtype=np.float64)) for s in seeds]
        grads = []
        for i in wrt:
            name = spec.arg_names[i]
            base = env[name]
            g = np.zeros(np.shape(base))
            for k in np.ndindex(np.shape(base)):
                x0 = base[k]
                h = mpmath.mpf(10) ** -(20 + grow) * max(1, abs(x0))
                base[k] = x0 + h
                up = mp_outputs(spec, env)
                base[k] = x0 - h
                down = mp_outputs(spec, env)
                base[k] = x0
                # differences element by element: an output at 1e200 that does not depend on
                # this argument must not swamp one at 1 that does
                ahead = sum((np.sum(sk * (u - o)) for sk, u, o in zip(s_mp, up, outs)), mpmath.mpf(0))
                behind = sum((np.sum(sk * (o - w)) for sk, o, w in zip(s_mp, outs, down)), mpmath.mpf(0))
                if coarse is not None and abs(ahead - behind) > 1e-8 * max(abs(ahead), abs(behind)):
                    coarse[0] = True
                g[k] = _to_float(_obj((ahead + behind) / (2 * h)))
            grads.append(g)
        return [_to_float(o) for o in outs], grads


# ======================================================================================
# The check
# ======================================================================================

SPEC_TOL = ref.Tol(rtol=1e-7, atol=1e-9)  # against torch, float64, relative to each array's scale
FD_TOL = ref.Tol(rtol=1e-4, atol=1e-5)  # against central differences, float64
LIMIT = 1e6  # a reference value beyond this is an unusable sample, not a test


@dataclass
class Outcome:
    status: str  # ok | refused | discarded | wrong | crash | oracle (the fuzzer's own reference failed) | imprecise
    stage: str = ""
    message: str = ""
    spec: FuzzSpec | None = None
    target: str = "cpu"

    @property
    def failed(self):
        return self.status in ("wrong", "crash", "oracle")

    def report(self) -> str:
        text = self.spec.describe() if self.spec else ""
        return f"{self.status} at {self.stage} on {self.target}: {self.message}\n--- spec ---\n{text}"


class _Discard(Exception):
    pass


class _Oracle(Exception):
    pass


class _Imprecise(Exception):
    pass


class _Wrong(Exception):
    def __init__(self, stage, message):
        super().__init__(message)
        self.stage = stage


def _close(actual, expected, tol: ref.Tol, what: str, stage: str):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise _Wrong(stage, f"{what}: shape {a.shape}, expected {e.shape}")
    scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    bad = ~(np.abs(a - e) <= tol.atol * scale + tol.rtol * np.abs(e))
    if np.any(bad):
        k = np.argwhere(bad)[0] if a.ndim else ()
        k = tuple(int(v) for v in k)
        raise _Wrong(stage, f"{what}: {int(bad.sum())} of {bad.size} differ; at {k}: got {a[k]!r}, "
                            f"expected {e[k]!r} (scale {scale:.3g})")


def _finite_ok(arrays, what):
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        if not np.all(np.isfinite(a)) or (a.size and np.max(np.abs(a)) > LIMIT):
            raise _Discard(f"the reference's {what} is not finite or beyond {LIMIT:g}")


def sample_inputs(spec: FuzzSpec, rng: np.random.Generator) -> list:
    """The arguments, float64 (int64 for integer inputs). By default |v| in [0.3, 1.5],
    positive for the tensors in ``spec.positive``; ``spec.sampling`` draws others:

    * ``large``: |v| log-uniform in [1e2, 1e3], mixed signs (positive if in
      ``spec.positive``), one entry in five near zero (|v| in [1e-3, 1]);
    * ``offset``: a row offset ±[1e2, 1e3] plus small differences (normal, sd 1-3) along
      the last axis: large logits whose softmax is not one-hot;
    * ``prob``: uniform in [0, 1]; ``rows``: rows summing to 1 along the last axis
      (what ``assume = ["sum(t[b, c], c) == 1"]`` states);
    * ``int:V``: integers in [0, V) (V a dimension), with repeats (a gather's scatter-add).
    """
    args = []
    ints = spec.dim_values() if spec.kind != "activation" else {}
    for name in spec.arg_names:
        shape = spec.act_shape if spec.kind == "activation" else spec.shape(name)
        how = spec.sampling.get(name, "")
        positive = name in spec.positive
        if how.startswith("int:"):
            n = ints[how[4:]]
            v = rng.integers(0, n, size=shape)
            if v.size > 1:
                v.reshape(-1)[-1] = v.reshape(-1)[0]  # a repeated index, always
            args.append(v.astype(np.int64))
            continue
        if how == "large":
            v = 10.0 ** rng.uniform(2, 3, size=shape)
            near = rng.random(size=shape) < 0.2
            v = np.where(near, 10.0 ** rng.uniform(-3, 0, size=shape), v)
        elif how == "offset":
            off = 10.0 ** rng.uniform(2, 3, size=shape[:-1] + (1,) if shape else ())
            off = off * (1.0 if positive else rng.choice([-1.0, 1.0], size=np.shape(off)))
            v = off + rng.normal(size=shape) * rng.uniform(1, 3)
            positive = True  # the offset has its sign already
        elif how == "prob":
            v = rng.uniform(0, 1, size=shape)
            positive = True
        elif how == "rows":
            v = ref.prob_rows(rng, shape)
            positive = True
        else:
            v = rng.uniform(0.3, 1.5, size=shape)
        if not positive:
            v = v * rng.choice([-1.0, 1.0], size=shape)
        args.append(np.asarray(v, dtype=np.float64))
    return args


def _torch_call(spec, args, grad=False):
    ts = {n: torch.tensor(a, requires_grad=grad and spec.dtypes.get(n) != "int") for n, a in zip(spec.arg_names, args)}
    return ts, spec.reference(ts)


def _torch_forward_np(spec):
    def fwd(*args):
        with torch.no_grad():
            _, outs = _torch_call(spec, args)
        return tuple(o.numpy() for o in outs)
    return fwd


def check(spec: FuzzSpec, workdir, target: str = "cpu", fd: bool = True, float32: bool = False,
          second_order: bool = False) -> Outcome:
    """Build ``spec`` in ``workdir`` and compare it with its oracle on ``target``.

    ``float32``: also run the op on the same inputs rounded to float32 and require float32
    results (outputs and gradients) whose error against the float64 oracle is within
    :data:`F32_FACTOR` of PyTorch's own float32 error on those inputs (issue 11's
    precision criterion); a miss is ``imprecise`` (reported, not a failure).
    ``second_order``: also compare ``op.jvp`` and ``op.hvp`` with PyTorch's forward-mode
    and second derivatives of the same tree (issue 14), see :func:`_check_second_order`."""
    from derive.errors import SpecError

    import codegen

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{spec.name}.toml"
    path.write_text(spec.toml)
    try:
        module = codegen.build(str(path), str(workdir / "out"))
    except SpecError as exc:
        return Outcome("refused", "build", str(exc).replace(str(workdir) + "/", ""), spec, target)
    except Exception:  # noqa: BLE001 - any other exception is a failure to report
        return Outcome("crash", "build", _tb(), spec, target)
    stage = "op"
    try:
        op = module.op(target=target, **spec.run_attrs)
        stage = "latex"
        text = op.latex()
        if not isinstance(text, str) or not text.strip():
            raise _Wrong("latex", f"op.latex() returned {text!r}")
        stage = "run"
        if spec.kind == "optimizer":
            _check_optimizer(spec, op, target)
        elif spec.large:
            _check_large(spec, op, float32)
        else:
            _check_layer(spec, op, target, fd, second_order)
            if float32:
                _check_float32(spec, op)
    except _Imprecise as exc:
        return Outcome("imprecise", "float32", str(exc), spec, target)
    except _Discard as exc:
        return Outcome("discarded", stage, str(exc), spec, target)
    except _Oracle as exc:
        return Outcome("oracle", "reference", str(exc), spec, target)
    except _Wrong as exc:
        return Outcome("wrong", exc.stage, str(exc), spec, target)
    except Exception:  # noqa: BLE001
        return Outcome("crash", stage, _tb(), spec, target)
    return Outcome("ok", "", "", spec, target)


def _tb():
    lines = traceback.format_exc().strip().splitlines()
    return "\n".join(lines[-12:])


def _check_layer(spec: FuzzSpec, op, target: str, fd: bool, second_order: bool = False):
    rng = np.random.default_rng(spec.seed)
    args = sample_inputs(spec, rng)
    if tuple(op.arg_names) != spec.arg_names:
        raise _Wrong("signature", f"op.arg_names {tuple(op.arg_names)}, expected {spec.arg_names}")
    want = spec.expected_differentiable
    if tuple(op.differentiable) != want:
        raise _Wrong("signature", f"op.differentiable {tuple(op.differentiable)}, expected {want}")
    # the oracle first: a sample whose reference is unusable is discarded
    wrt = [spec.arg_names.index(n) for n in want]
    try:
        ref_out, seeds, ref_grads = _torch_reference(spec, args, rng, wrt)
    except _Discard:
        raise
    except Exception as exc:  # noqa: BLE001 - the fuzzer's own oracle failed: a bug in this file
        raise _Oracle(_tb()) from exc
    _finite_ok(ref_grads, "gradient")
    if fd:
        numeric = ref.numerical_vjp(_torch_forward_np(spec), args, seeds, wrt)
        for g, n in zip(ref_grads, numeric):
            try:
                _close(g, n, FD_TOL, "", "")
            except _Wrong:
                raise _Discard("PyTorch's autograd and central differences disagree at this sample "
                               "(a kink or a steep point)") from None
    # symgrad
    out = ref.as_tuple(op.forward(*args))
    if len(out) != len(ref_out):
        raise _Wrong("forward", f"{len(out)} outputs, expected {len(ref_out)}")
    for name, o, e in zip(spec.outputs, out, ref_out):
        if np.asarray(o).dtype != np.float64:
            raise _Wrong("forward", f"output {name} has dtype {np.asarray(o).dtype}, expected float64")
        _close(o, e, SPEC_TOL, f"forward output {name}", "forward")
    grads = ref.as_tuple(op.backward(*seeds, *args))
    if len(grads) != len(want):
        raise _Wrong("backward", f"{len(grads)} gradients, expected {len(want)}")
    for i, g, e in zip(wrt, grads, ref_grads):
        _close(g, e, SPEC_TOL, f"gradient of {spec.arg_names[i]} (against torch autograd)", "backward")
    if fd and target == "cpu":
        numeric = ref.numerical_vjp(op.forward, args, seeds, wrt)
        for i, g, n in zip(wrt, grads, numeric):
            _close(g, n, FD_TOL, f"gradient of {spec.arg_names[i]} (against central differences)", "backward")
    if second_order and want:
        _check_second_order(spec, op, args, seeds, wrt, rng)
    _check_other_shape(spec, op, rng, wrt)
    if spec.assume:
        _check_assumption_enforced(spec, op, args, seeds, rng)


def _check_second_order(spec: FuzzSpec, op, args, seeds, wrt, rng):
    """``op.jvp`` against PyTorch's directional derivative of the tree's outputs and
    ``op.hvp`` against its second derivative (reverse over reverse: the derivative of
    sum(seed * outputs)'s gradient along the tangents), float64. Where PyTorch's own
    second derivative is not finite or not defined, the second-order part is skipped."""
    tangents = [rng.normal(size=np.shape(args[i])) for i in wrt]
    names = [spec.arg_names[i] for i in wrt]
    try:
        ts, outs = _torch_call(spec, args, grad=True)
        diff = [ts[n] for n in names]
        live = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
        tt = [torch.tensor(t) for t in tangents]
        # forward mode by the double-vjp trick: d/du <vjp(u), t> is J t
        jvp_ref = []
        for o in outs:
            if not o.requires_grad:
                jvp_ref.append(np.zeros(tuple(o.shape)))
                continue
            u = torch.zeros_like(o, requires_grad=True)
            g = torch.autograd.grad(o, diff, grad_outputs=u, create_graph=True, allow_unused=True)
            dot = sum((gi * ti).sum() for gi, ti in zip(g, tt) if gi is not None)
            jt = torch.autograd.grad(dot, u, allow_unused=True)[0] if torch.is_tensor(dot) and dot.requires_grad else None
            jvp_ref.append(np.zeros(tuple(o.shape)) if jt is None else jt.detach().numpy())
        hvp_ref = [np.zeros(np.shape(args[i])) for i in wrt]
        if live:
            g = torch.autograd.grad([o for o, _ in live], diff, create_graph=True, allow_unused=True,
                                    grad_outputs=[torch.tensor(np.asarray(s, dtype=np.float64)).reshape(o.shape)
                                                  for o, s in live])
            dot = sum((gi * ti).sum() for gi, ti in zip(g, tt) if gi is not None and gi.requires_grad)
            if torch.is_tensor(dot) and dot.requires_grad:
                second = torch.autograd.grad(dot, diff, allow_unused=True)
                hvp_ref = [np.zeros(np.shape(args[i])) if h is None else h.detach().numpy()
                           for h, i in zip(second, wrt)]
    except RuntimeError:  # an op PyTorch does not differentiate twice
        return
    if not all(np.all(np.isfinite(r)) for r in jvp_ref + hvp_ref):
        return
    got = ref.as_tuple(op.jvp(*args, tangents=tangents))
    for name, g, e in zip(spec.outputs, got, jvp_ref):
        _close(g, e, SPEC_TOL, f"jvp of output {name} (against torch)", "jvp")
    got = ref.as_tuple(op.hvp(*seeds, *args, tangents=tangents))
    for name, g, e in zip(names, got, hvp_ref):
        _close(g, e, SPEC_TOL, f"hvp of {name} (against torch's second derivative)", "hvp")


def _check_assumption_enforced(spec: FuzzSpec, op, args, seeds, rng):
    """Inputs that break an assumption (one row of the assumed tensor masked to zero, or
    scaled): the forward still matches the oracle (it uses no assumption), and the
    backward raises the documented error naming the op and the assumption instead of
    returning a gradient derived from a fact that does not hold."""
    import re as _re

    for a in spec.assume:
        name = _re.match(r"sum\((\w+)\[", a).group(1)
        k = spec.arg_names.index(name)
        for how in ("masked", "scaled"):
            bad = [np.array(v) for v in args]
            row = int(rng.integers(0, bad[k].shape[0]))
            bad[k][row] = 0.0 if how == "masked" else bad[k][row] * 1.5
            with torch.no_grad():
                _, outs = _torch_call(spec, bad)
            for n, o, e in zip(spec.outputs, ref.as_tuple(op.forward(*bad)), outs):
                _close(o, e.numpy(), SPEC_TOL, f"forward output {n} with a {how} row of {name}", "assume")
            try:
                op.backward(*seeds, *bad)
            except ValueError as exc:
                text = str(exc)
                if "assumption" not in text or spec.name not in text:
                    raise _Wrong("assume", f"the error for a {how} row of {name} does not name the op and "
                                           f"the assumption: {text}") from None
                continue
            raise _Wrong("assume", f"a {how} row {row} of {name} breaks `{a}`, and the backward returned a "
                                   f"gradient instead of the documented error")


def _torch_reference(spec: FuzzSpec, args, rng, wrt):
    """The oracle at ``args``: (forward outputs, random output gradients, the gradients of
    the arguments at positions ``wrt``), in float64; a non-finite forward is discarded."""
    ts, outs = _torch_call(spec, args, grad=True)
    ref_out = [o.detach().numpy() for o in outs]
    _finite_ok(ref_out, "forward")
    seeds = ref.make_seeds(ref_out, rng, np.float64)
    live = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
    grads_t = [None] * len(wrt)
    if live:
        grads_t = torch.autograd.grad(
            [o for o, _ in live], [ts[spec.arg_names[i]] for i in wrt],
            grad_outputs=[torch.tensor(np.asarray(s, dtype=np.float64)).reshape(o.shape) for o, s in live],
            allow_unused=True)
    return ref_out, seeds, [np.zeros_like(args[i]) if g is None else g.numpy() for i, g in zip(wrt, grads_t)]


def _check_other_shape(spec: FuzzSpec, op, rng, wrt):
    """The same op called again with another batch size (another shape for an activation):
    kernels and whatever the module keeps between calls must follow the shapes."""
    import dataclasses

    if spec.kind == "activation":
        other = dataclasses.replace(spec, act_shape=(2, 4) if spec.act_shape != (2, 4) else (3,))
    elif "B" in spec.sizes:
        other = dataclasses.replace(spec, sizes={**spec.sizes, "B": spec.sizes["B"] + 2})
    else:
        return
    args = sample_inputs(other, rng)
    try:
        ref_out, seeds, ref_grads = _torch_reference(other, args, rng, wrt)
        _finite_ok(ref_grads, "gradient")
    except _Discard:
        return  # this second sample is unusable; the first one was checked
    where = f"(second call, {'shape ' + str(other.act_shape) if spec.kind == 'activation' else 'sizes ' + str(other.sizes)})"
    for name, o, e in zip(spec.outputs, ref.as_tuple(op.forward(*args)), ref_out):
        _close(o, e, SPEC_TOL, f"forward output {name} {where}", "forward")
    for i, g, e in zip(wrt, ref.as_tuple(op.backward(*seeds, *args)), ref_grads):
        _close(g, e, SPEC_TOL, f"gradient of {spec.arg_names[i]} {where}", "backward")


def _check_optimizer(spec: FuzzSpec, op, target: str):
    rng = np.random.default_rng(spec.seed)
    n = spec.sizes["n"]
    p = rng.uniform(0.3, 1.5, size=n) * rng.choice([-1.0, 1.0], size=n)
    state = op.init_state(p)
    state = tuple(state) if isinstance(state, (tuple, list)) else (state,)
    names = [*spec.state, *spec.scalar_state]
    if len(state) != len(names):
        raise _Wrong("init_state", f"{len(state)} state arrays, expected {len(names)} ({names})")
    for name, s in zip(names, state):
        init = np.full(1, spec.scalar_state[name]) if name in spec.scalar_state else np.zeros(n)
        _close(s, init, SPEC_TOL, f"initial state {name}", "init_state")
    env = {"p": torch.tensor(p.copy()), **{s: torch.zeros(n) for s in spec.state},
           **{s: torch.tensor(float(v)) for s, v in spec.scalar_state.items()}}
    hyper = {**spec.hyper, **spec.run_attrs}
    for t in range(1, spec.steps + 1):
        g = rng.uniform(0.3, 1.5, size=n) * rng.choice([-1.0, 1.0], size=n)
        env["g"] = torch.tensor(g)
        try:
            new = spec.reference_step(env, t, hyper)
        except Exception as exc:  # noqa: BLE001 - the fuzzer's own oracle failed
            raise _Oracle(_tb()) from exc
        _finite_ok([new[k].numpy() for k in ["p", *names]], f"step {t}")
        op.step(p, g, *state, t=t, **spec.run_attrs)
        _close(p, new["p"].numpy(), SPEC_TOL, f"p after step {t}", "step")
        for name, s in zip(names, state):
            expected = new[name].numpy().reshape(1) if name in spec.scalar_state else new[name].numpy()
            _close(s, expected, SPEC_TOL, f"state {name} after step {t}", "step")
        env = {k: new[k] for k in ["p", *names]}


F32_FACTOR = 16.0  # symgrad's float32 error may be this many times PyTorch's float32 error ...
F32_FLOOR = 8.0  # ... plus this many float32 epsilons of the array's scale


def _check_float32(spec: FuzzSpec, op):
    """Outputs and gradients in float32: float32 dtype, and an error against the float64
    oracle within F32_FACTOR of PyTorch's float32 error on the same (rounded) inputs."""
    rng = np.random.default_rng(spec.seed)
    args = [a if ref._is_int(a) else a.astype(np.float32).astype(np.float64) for a in sample_inputs(spec, rng)]
    want = spec.expected_differentiable
    wrt = [spec.arg_names.index(n) for n in want]

    def torch_eval(dtype, seeds=None):
        torch.set_default_dtype(dtype)
        try:
            ts = {n: torch.tensor(a) if ref._is_int(a) else torch.tensor(a, dtype=dtype, requires_grad=True)
                  for n, a in zip(spec.arg_names, args)}
            outs = spec.reference(ts)
            if seeds is None:
                return [o.detach().double().numpy() for o in outs], None
            live = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
            grads = [None] * len(wrt)
            if live:
                grads = torch.autograd.grad(
                    [o for o, _ in live], [ts[spec.arg_names[i]] for i in wrt],
                    grad_outputs=[torch.tensor(np.asarray(s), dtype=dtype).reshape(o.shape) for o, s in live],
                    allow_unused=True)
            return ([o.detach().double().numpy() for o in outs],
                    [np.zeros_like(args[i]) if g is None else g.double().numpy() for i, g in zip(wrt, grads)])
        finally:
            torch.set_default_dtype(torch.float64)

    out64, _ = torch_eval(torch.float64)
    seeds = [float(np.float32(s)) if np.ndim(s) == 0 else np.asarray(s, np.float32).astype(np.float64)
             for s in ref.make_seeds(out64, rng, np.float64)]
    out64, g64 = torch_eval(torch.float64, seeds)
    out32, g32 = torch_eval(torch.float32, seeds)
    _finite_ok(out32 + g32, "float32 values")
    a32 = [a if ref._is_int(a) else a.astype(np.float32) for a in args]
    s32 = [s if np.ndim(s) == 0 else np.asarray(s, np.float32) for s in seeds]
    mine = ref.as_tuple(op.forward(*a32))
    grads = ref.as_tuple(op.backward(*s32, *a32))
    eps = float(np.finfo(np.float32).eps)
    pairs = [(f"output {n}", m, t, e) for n, m, t, e in zip(spec.outputs, mine, out32, out64)]
    pairs += [(f"gradient of {spec.arg_names[i]}", m, t, e) for i, m, t, e in zip(wrt, grads, g32, g64)]
    for what, m, t, e in pairs:
        if np.asarray(m).dtype != np.float32:
            raise _Wrong("float32", f"{what} has dtype {np.asarray(m).dtype} for float32 inputs")
        m64 = np.asarray(m, dtype=np.float64)
        scale = max(1.0, float(np.max(np.abs(e))) if np.size(e) else 1.0)
        mine_err = float(np.max(np.abs(m64 - e))) if np.size(e) else 0.0
        torch_err = float(np.max(np.abs(t - e))) if np.size(e) else 0.0
        if not np.all(np.isfinite(m64)) or mine_err > F32_FACTOR * torch_err + F32_FLOOR * eps * scale:
            raise _Imprecise(f"{what} in float32: error {mine_err:.3g} against float64, PyTorch float32's "
                             f"{torch_err:.3g} (scale {scale:.3g})")


LARGE_TOL = ref.Tol(rtol=1e-7, atol=1e-9)  # float64 against the true value, relative to each array's scale
LARGE_SENS = 16.0  # ... plus this many times the true value's change under one rounding of the inputs
LARGE_LIMIT = {np.float64: 1e300, np.float32: 1e37}  # a true value beyond this overflows: discarded


def _true_or_discard(spec, args, seeds, wrt):
    try:
        return mp_reference(spec, args, seeds, wrt)
    except (ZeroDivisionError, OverflowError, ValueError) as exc:
        raise _Discard(f"the true value is undefined at this sample ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - the fuzzer's own oracle failed: a bug in this file
        raise _Oracle(_tb()) from exc


def _check_large(spec: FuzzSpec, op, float32: bool):
    """Large-input mode: inputs at |v| ~ 1e2-1e3 (``spec.sampling``), checked against the
    high-precision oracle (:func:`mp_reference`) wherever the true forward and gradients
    are finite (else the sample is discarded). float64: finite, and within LARGE_TOL of
    the true value plus LARGE_SENS times its sensitivity to one rounding of the inputs
    (what any backward-stable evaluation may lose; the sensitivity is the largest change
    of the true value when every input moves one unit in the last place, up or down); a
    non-finite or inaccurate result is ``wrong``. A sample that one rounding of the
    inputs moves by ILL_CONDITIONED of its scale has no digit any evaluation in that
    precision could get (``cos(expm1(x) - x)`` at x ~ 350): discarded. With ``float32``: the same inputs rounded to float32 must give finite
    results (else ``wrong``) within F32_FACTOR of PyTorch float32's own error on the
    same tree, or, where PyTorch's float32 is not finite itself, of the float32
    sensitivity (else ``imprecise``)."""
    rng = np.random.default_rng(spec.seed)
    args = sample_inputs(spec, rng)
    if float32:
        args = [a if ref._is_int(a) else a.astype(np.float32).astype(np.float64) for a in args]
    if tuple(op.arg_names) != spec.arg_names:
        raise _Wrong("signature", f"op.arg_names {tuple(op.arg_names)}, expected {spec.arg_names}")
    want = spec.expected_differentiable
    if tuple(op.differentiable) != want:
        raise _Wrong("signature", f"op.differentiable {tuple(op.differentiable)}, expected {want}")
    wrt = [spec.arg_names.index(n) for n in want]
    limit = LARGE_LIMIT[np.float32 if float32 else np.float64]
    out_t, _ = _true_or_discard(spec, args, None, wrt)
    _within(out_t, limit, "true forward")
    seeds = [float(np.float32(s)) if np.ndim(s) == 0 else np.asarray(s, np.float32).astype(np.float64)
             for s in ref.make_seeds(out_t, rng, np.float64)]
    out_t, grads_t = _true_or_discard(spec, args, seeds, wrt)
    _within(grads_t, limit, "true gradient")
    for dtype in [np.float64] + ([np.float32] if float32 else []):
        sens = [0.0] * len(out_t + grads_t)
        up = [rng.random(size=np.shape(a)) < 0.5 for a in args]
        for side in (up, [~u for u in up]):  # every input moved one rounding, then the other way
            moved = [a if ref._is_int(a) else _ulp_moved(a, u, dtype) for a, u in zip(args, side)]
            out_m, grads_m = _true_or_discard(spec, moved, seeds, wrt)
            for k, (m, t) in enumerate(zip(out_m + grads_m, out_t + grads_t)):
                d = np.abs(np.asarray(m) - np.asarray(t))
                sens[k] = max(sens[k], float(np.max(np.where(np.isfinite(d), d, np.inf))) if d.size else 0.0)
        for k, t in enumerate(out_t + grads_t):
            scale = float(np.max(np.abs(t))) if np.size(t) else 0.0
            if sens[k] > ILL_CONDITIONED * max(scale, 1e-300):
                raise _Discard(f"ill-conditioned in {np.dtype(dtype).name}: one rounding of the inputs moves the true "
                               f"value by {sens[k]:.3g} (its scale {scale:.3g}); no evaluation in that precision has a "
                               f"digit of it")
        _compare_large(spec, op, args, seeds, wrt, out_t + grads_t, sens, dtype)
    _check_kinks(spec, op, wrt)


KINK_VALUES = (0.0, 1.0, -1.0)  # where abs, sign, relu, where(x > 0), log(x), x**p, Max(x, 1) ... change form
KINK_SHARE = 0.3  # the share of each large or offset input's entries moved to them
KINK_GAP = 1e-3  # a gradient off the true value by this (times its scale) and on PyTorch's is a kink's side


def kink_inputs(spec: FuzzSpec, rng) -> list:
    """A second large-input sample with about KINK_SHARE of the entries of every input
    drawn ``large`` or ``offset`` replaced by exact 0, 1 or -1 (only 1 for a positive
    input): the points where functions have kinks, jumps or a limit (``x log x`` at 0)."""
    args = sample_inputs(spec, rng)
    for k, name in enumerate(spec.arg_names):
        if spec.sampling.get(name) not in ("large", "offset") or ref._is_int(args[k]):
            continue
        values = np.array([1.0]) if name in spec.positive else np.array(KINK_VALUES)
        a = np.array(args[k], dtype=np.float64)
        hit = rng.random(size=a.shape) < KINK_SHARE
        args[k] = np.where(hit, rng.choice(values, size=a.shape), a)
    return args


def _check_kinks(spec: FuzzSpec, op, wrt):
    """Large-input mode at exact kinks (:func:`kink_inputs`), float64, against the
    high-precision oracle as :func:`_check_large` does. A sample whose true value is not
    finite there (``log(0)``) is skipped. The oracle's central difference at a kink is
    the mean of the two one-sided slopes (relu'(0) = 1/2), where symgrad's contract is
    PyTorch's one-sided value (relu'(0) = 0, docs/spec-language.md): a gradient element
    off the true value is accepted only where PyTorch float64 is off it too by more than
    KINK_GAP of the scale (a side taken, not a rounding) and symgrad matches PyTorch.
    Outputs must match the true value everywhere."""
    rng = np.random.default_rng(spec.seed + 1)
    args = kink_inputs(spec, rng)
    mine = list(ref.as_tuple(op.forward(*args)))
    seeds = ref.make_seeds(mine, rng, np.float64)  # one oracle run: the outputs' shapes are symgrad's
    try:
        out_t, grads_t = _true_or_discard(spec, args, seeds, wrt)
        _within(out_t, LARGE_LIMIT[np.float64], "true forward")
        _within(grads_t, LARGE_LIMIT[np.float64], "true gradient")
    except _Discard:
        return
    mine += list(ref.as_tuple(op.backward(*seeds, *args)))
    try:
        theirs = _torch_in(spec, args, seeds, wrt, np.float64)
    except Exception as exc:  # noqa: BLE001
        raise _Oracle(_tb()) from exc
    whats = [f"output {n}" for n in spec.outputs] + [f"gradient of {spec.arg_names[i]}" for i in wrt]
    for k, (what, m, e, t) in enumerate(zip(whats, mine, out_t + grads_t, theirs)):
        m64 = np.asarray(m, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        if not m64.size:
            continue
        scale = max(1.0, float(np.max(np.abs(e))))
        err = np.abs(m64 - e)
        bad = ~(err <= LARGE_TOL.rtol * np.abs(e) + LARGE_TOL.atol * scale)
        if k >= len(spec.outputs):
            sided = (np.abs(t - e) > KINK_GAP * scale) & (np.abs(m64 - t) <= SPEC_TOL.rtol * scale + SPEC_TOL.atol)
            bad &= ~sided
        if np.any(bad):
            i = tuple(int(v) for v in np.argwhere(bad)[0]) if m64.ndim else ()
            raise _Wrong("kinks", f"{what} (float64) at inputs with exact 0 and +-1: {int(bad.sum())} of {bad.size} "
                                  f"differ from the true value; at {i}: got {m64[i]!r}, true {e[i]!r}, PyTorch {t[i]!r}")


ILL_CONDITIONED = 0.5  # a true value that one rounding of the inputs moves by this share of its scale


def _ulp_moved(a, up, dtype) -> np.ndarray:
    """``a`` (float64 holding ``dtype`` values) moved by one unit in the last place of
    ``dtype``, up where ``up``, down elsewhere: one rounding of every input."""
    a = np.asarray(a, dtype=np.float64)
    d = a.astype(dtype)
    return np.where(up, np.nextafter(d, dtype(np.inf)), np.nextafter(d, dtype(-np.inf))).astype(np.float64)


def _within(arrays, limit, what):
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        if not np.all(np.isfinite(a)) or (a.size and np.max(np.abs(a)) > limit):
            raise _Discard(f"the {what} is not finite or beyond {limit:g} (it overflows)")


def _torch_in(spec, args, seeds, wrt, dtype):
    """PyTorch on the same tree in ``dtype``: outputs and gradients (float64 arrays)."""
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    torch.set_default_dtype(tdtype)
    try:
        ts = {n: torch.tensor(a) if ref._is_int(a) else torch.tensor(a, dtype=tdtype, requires_grad=True)
              for n, a in zip(spec.arg_names, args)}
        outs = spec.reference(ts)
        live = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
        grads = [None] * len(wrt)
        if live:
            grads = torch.autograd.grad([o for o, _ in live], [ts[spec.arg_names[i]] for i in wrt],
                                        grad_outputs=[torch.tensor(np.asarray(s), dtype=tdtype).reshape(o.shape)
                                                      for o, s in live], allow_unused=True)
        return ([o.detach().double().numpy() for o in outs]
                + [np.zeros(np.shape(args[i])) if g is None else g.double().numpy() for i, g in zip(wrt, grads)])
    finally:
        torch.set_default_dtype(torch.float64)


def _compare_large(spec, op, args, seeds, wrt, truth, sens, dtype):
    a_d = [a if ref._is_int(a) else a.astype(dtype) for a in args]
    s_d = [s if np.ndim(s) == 0 else np.asarray(s, dtype) for s in seeds]
    mine = list(ref.as_tuple(op.forward(*a_d)))
    if len(mine) != len(spec.outputs):
        raise _Wrong("forward", f"{len(mine)} outputs, expected {len(spec.outputs)}")
    mine += list(ref.as_tuple(op.backward(*s_d, *a_d)))
    try:
        theirs = _torch_in(spec, args, seeds, wrt, dtype)
    except Exception as exc:  # noqa: BLE001
        raise _Oracle(_tb()) from exc
    whats = [f"output {n}" for n in spec.outputs] + [f"gradient of {spec.arg_names[i]}" for i in wrt]
    eps = float(np.finfo(dtype).eps)
    label = np.dtype(dtype).name
    for what, m, e, t, sv in zip(whats, mine, truth, theirs, sens):
        m = np.asarray(m)
        if m.dtype != dtype:
            raise _Wrong("large", f"{what} has dtype {m.dtype} for {label} inputs")
        e = np.asarray(e, dtype=np.float64)
        m64 = m.astype(np.float64)
        if m64.shape != e.shape:
            raise _Wrong("large", f"{what}: shape {m64.shape}, expected {e.shape}")
        if not m64.size:
            continue
        if not np.all(np.isfinite(m64)):
            k = tuple(int(v) for v in np.argwhere(~np.isfinite(m64))[0]) if m64.ndim else ()
            raise _Wrong("large", f"{what} ({label}) is not finite where the true value is: at {k}: got "
                                  f"{m64[k]!r}, true {e[k]!r}, PyTorch {label} on the same tree {t[k]!r}")
        scale = max(1.0, float(np.max(np.abs(e))))
        err = np.abs(m64 - e)
        if dtype == np.float64:
            bad = err > LARGE_TOL.rtol * np.abs(e) + LARGE_TOL.atol * scale + LARGE_SENS * sv
            if np.any(bad):
                k = tuple(int(v) for v in np.argwhere(bad)[0]) if m64.ndim else ()
                raise _Wrong("large", f"{what} (float64): {int(bad.sum())} of {bad.size} differ from the true "
                                      f"value; at {k}: got {m64[k]!r}, true {e[k]!r}, PyTorch {t[k]!r} "
                                      f"(scale {scale:.3g}, sensitivity {sv:.3g})")
        else:
            torch_ok = np.all(np.isfinite(t))
            base = float(np.max(np.abs(t - e))) if torch_ok else sv
            mine_err = float(np.max(err))
            if mine_err > F32_FACTOR * base + F32_FLOOR * eps * scale:
                against = "PyTorch float32's" if torch_ok else "the float32 sensitivity (PyTorch's float32 is not finite)"
                raise _Imprecise(f"{what} in float32 at large inputs: error {mine_err:.3g} against the true "
                                 f"value, {against} {base:.3g} (scale {scale:.3g})")
