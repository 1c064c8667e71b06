"""Named functions of the spec language and their derivatives.

Two kinds of names live here:

* *Stable primitives* (``sigmoid``, ``softplus``) stay as SymPy functions all the way to
  the printers, which emit overflow-free implementations of them. Their derivatives are
  not written by hand: :func:`derived_fdiff` differentiates the mathematical definition
  with SymPy and then re-expresses the result through the named functions
  (``sigmoid' = sigmoid (1 - sigmoid)``, ``softplus' = sigmoid``), choosing the form
  with the fewest operations.
* *Macros* (``relu``, ``where``, ``abs`` ...) expand at parse time into elementary SymPy
  expressions (``Piecewise``, ``Abs``).

Reductions (``sum(expr, i, j)``, ``max(expr, i)``, ``mean(expr, i)``) are :class:`Reduce`
nodes; a mean becomes a sum over its size once the indices are bound, and
derive/normalize.py lifts the sums and maxima into intermediates before differentiation.
"""

from __future__ import annotations

import functools
import importlib

import sympy
from sympy import Function, Piecewise, exp, log
from sympy.codegen.cfunctions import expm1, log1p


class NamedFunction(Function):
    """A one-argument function defined by an elementary ``definition``."""

    is_real = True
    latex_name = None  # default: \operatorname{<class name>}

    @staticmethod
    def definition(x):  # pragma: no cover - overridden
        raise NotImplementedError

    def _latex(self, printer, exp=None):
        """``name(x)``, or ``name^{k}(x)`` under a power (as LaTeX writes sin^2 x)."""
        name = self.latex_name or r"\operatorname{%s}" % type(self).__name__.replace("_", r"\_")
        head = name if exp is None else r"%s^{%s}" % (name, exp)
        return r"%s\left(%s\right)" % (head, printer._print(self.args[0]))

    def fdiff(self, argindex=1):
        if argindex != 1:
            raise sympy.ArgumentIndexError(self, argindex)
        return derived_fdiff(type(self))(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return self.definition(x)

    def _eval_evalf(self, prec):
        """A number from the definition, so that a condition on constants (sqrt(softplus(2))
        <= 0) is decided when it is built: undecided, it made SymPy's Piecewise raise
        KeyError (its rewrite of a condition without free symbols)."""
        if self.args[0].is_number:
            from mpmath.libmp.libmpf import prec_to_dps

            value = self.definition(self.args[0]).evalf(prec_to_dps(prec))
            return value if value.is_Number else None
        return None

    def _eval_is_real(self):
        return self.args[0].is_real


class sigmoid(NamedFunction):
    """The logistic function 1 / (1 + exp(-x)); printed as a stable two-branch kernel."""

    latex_name = r"\sigma"

    @staticmethod
    def definition(x):
        return 1 / (1 + exp(-x))


class softplus(NamedFunction):
    """log(1 + exp(x)); printed as max(x, 0) + log1p(exp(-|x|))."""

    latex_name = r"\operatorname{softplus}"

    @staticmethod
    def definition(x):
        return log(1 + exp(x))


STABLE_PRIMITIVES = (sigmoid, softplus)


def _exp_as_power(expr, x, E):
    """Write every exp(k*x) with integer k as E**k so the expression is rational in E."""

    def repl(arg):
        k = sympy.simplify(arg / x)
        if k.is_Integer:
            return E**k
        return exp(arg)

    return expr.replace(exp, repl)


@functools.lru_cache(maxsize=None)
def derived_fdiff(cls):
    """The derivative of a named function, from SymPy's diff of its definition.

    The raw derivative (e.g. ``exp(-x)/(1 + exp(-x))**2``) is re-expressed through each
    stable primitive g by solving ``g = definition_g(x)`` for exp(x) and substituting;
    the candidate with the fewest operations wins. Returns a callable of the argument.
    """
    x = sympy.Dummy("x", real=True)
    raw = sympy.diff(cls.definition(x), x)
    candidates = [sympy.simplify(raw)]
    E = sympy.Dummy("E", positive=True)
    rational = _exp_as_power(raw, x, E)
    for g_cls in STABLE_PRIMITIVES:
        g = sympy.Dummy("g", positive=True)
        relation = _exp_as_power(g_cls.definition(x), x, E)
        solutions = [s for s in sympy.solve(sympy.Eq(g, relation), E) if s.free_symbols <= {g}]
        for sol in solutions:
            expressed = sympy.factor(sympy.cancel(rational.subs(E, sol)))
            if x in expressed.free_symbols or E in expressed.free_symbols:
                continue
            candidates.append(expressed.subs(g, g_cls(x)))
    best = min(candidates, key=lambda c: (sympy.count_ops(c), sympy.srepr(c)))
    best = tidy_signs(best)
    return sympy.Lambda(x, best)


def tidy_signs(expr):
    """-(s)(s - 1) -> s (1 - s): the textbook sign convention for factored products."""
    if isinstance(expr, sympy.Mul) and expr.could_extract_minus_sign():
        factors = list((-expr).as_ordered_factors())
        for k, f in enumerate(factors):
            if isinstance(f, sympy.Add):
                factors[k] = sympy.expand(-f)
                return sympy.Mul(*factors, evaluate=True)
    return expr


class Reduce(Function):
    """A reduction node ``kind(body, i, j, ...)``; lifted into an intermediate later."""

    kind = "?"

    @property
    def body(self):
        return self.args[0]

    def _sympystr(self, printer):
        return "%s(%s, %s)" % (self.kind, printer._print(self.body), ", ".join(map(printer._print, self.indices)))

    def _latex(self, printer, exp=None):
        """``op_{i,j} (body)``, parenthesised whole under a power."""
        idx = ",".join(printer._print(i) for i in self.indices)
        text = r"%s_{%s} \left(%s\right)" % (self.latex_op, idx, printer._print(self.body))
        return text if exp is None else r"\left(%s\right)^{%s}" % (text, exp)

    @property
    def indices(self):
        return self.args[1:]

    def _rewrite(self, pattern, rule, method, **hints):
        """A reduction's body is a value, never a condition: SymPy rewrites a condition
        holding a Piecewise into Boolean ITE form (relu of a where whose condition reads a
        max of a relu), and doing so inside the body failed (a value is not a Boolean)."""
        if method == "_eval_rewrite_as_ITE":
            return self
        return super()._rewrite(pattern, rule, method, **hints)


class ReduceSum(Reduce):
    kind = "sum"
    latex_op = r"\sum"


class ReduceMax(Reduce):
    kind = "max"
    latex_op = r"\max"


class ReduceMean(Reduce):
    """``mean(body, i, ...)``: the sum over the indices divided by the product of their
    ranges. The ranges are known once the spec's indices are bound, where
    :func:`expand_means` rewrites it into that sum, so everything after (stability,
    lifting, differentiation, the kernels) sees only the sum."""

    kind = "mean"
    latex_op = r"\operatorname{mean}"


class ReduceTerms(Reduce):
    """``reduce(body, i, ..., weight=w)``: a loss's terms reduced as PyTorch's
    ``reduction`` attribute says (an attribute the construct declares: 1 = "mean", the
    default, 2 = "sum", 0 = "none"). The mean divides the sum by the number of terms, or
    by the sum of ``weight`` over the same indices where one is given (PyTorch's weighted
    mean, cross-entropy's class weights); "none" keeps the terms: the output takes the
    reduced indices as its own (derive/reductions.py builds that variant of the op).
    Arguments: (body, weight, *indices)."""

    kind = "reduce"
    latex_op = r"\operatorname{reduce}"

    @property
    def weight(self):
        return self.args[1]

    @property
    def indices(self):
        return self.args[2:]

    def _sympystr(self, printer):
        weight = "" if self.weight == 1 else ", weight=%s" % printer._print(self.weight)
        return "reduce(%s, %s%s)" % (printer._print(self.body), ", ".join(map(printer._print, self.indices)), weight)


def reduce_terms(body, *indices, weight=sympy.S.One):
    """``reduce(body, i, ..., weight=w)`` (:class:`ReduceTerms`)."""
    return ReduceTerms(body, sympy.sympify(weight), *indices)


def _fold_outside_reductions(fold):
    """SymPy's piecewise_fold with every reduction opaque. A Piecewise in a condition
    (``where(x <= max(relu(w[j]), j), ...)``, relu a Piecewise) is folded when the condition
    is built, and the fold took ``max(Piecewise((w[j], w[j] > 0), (0, True)), j)`` apart as
    if max were an ordinary function: the condition w[j] > 0 left the reduction that binds
    j (the kernels then read an undefined j). A reduction is held as a placeholder while
    the rest folds; its body is folded, if ever, when it is lifted."""

    @functools.wraps(fold)
    def piecewise_fold(expr, evaluate=True):
        if isinstance(expr, Reduce) or not isinstance(expr, sympy.Basic):
            return expr
        held = {r: sympy.Dummy("reduction", real=True) for r in expr.atoms(Reduce) if r.has(Piecewise)}
        if not held:
            return fold(expr, evaluate)
        folded = fold(expr.xreplace(held), evaluate)
        return folded.xreplace({d: r for r, d in held.items()})

    return piecewise_fold


# ExprCondPair and piecewise_fold's own recursion call the module's name
_piecewise_module = importlib.import_module("sympy.functions.elementary.piecewise")
if not hasattr(_piecewise_module.piecewise_fold, "__wrapped__"):
    _piecewise_module.piecewise_fold = _fold_outside_reductions(_piecewise_module.piecewise_fold)


def expand_means(expr, ranges):
    """Every ``mean(body, i, ...)`` in ``expr`` as ``sum(body, i, ...) / (R_i * ...)``
    with ``ranges`` (index symbol -> size), innermost first."""
    if not expr.has(ReduceMean):
        return expr

    def as_sum(node):
        body = expand_means(node.body, ranges)
        return ReduceSum(body, *node.indices) / sympy.Mul(*[ranges[i] for i in node.indices])

    return expr.replace(lambda e: isinstance(e, ReduceMean), as_sum)


def expand_terms(expr, ranges, reduction):
    """Every ``reduce(body, i, ..., weight=w)`` of ``expr`` as the sum of ``body`` over
    the indices times ``where(reduction == 2, 1, 1/count)`` (``ranges``: index -> size).
    A body that is itself a sum joins the outer one (``sum(sum(t, c), b)`` is
    ``sum(t, b, c)``)."""
    if not expr.has(ReduceTerms):
        return expr

    def expand(node):
        body, indices = node.body, tuple(node.indices)
        if isinstance(body, ReduceSum):
            total = ReduceSum(body.body, *indices, *body.indices)
        else:
            total = ReduceSum(body, *indices)
        count = sympy.Mul(*[ranges[i] for i in indices]) if node.weight == 1 else ReduceSum(node.weight, *indices)
        return total * sympy.Piecewise((1, sympy.Eq(reduction, 2)), (1 / count, True))

    return expr.replace(lambda e: isinstance(e, ReduceTerms), expand)


# ---------------------------------------------------------------------------
# The whitelist: every function name a spec may call, and what it builds.


def _where(cond, a, b):
    return Piecewise((a, cond), (b, True))


def _relu(x):
    return Piecewise((x, x > 0), (0, True))


def _leaky_relu(x, slope=sympy.Rational(1, 100)):
    return Piecewise((x, x > 0), (slope * x, True))


def _elu(x, alpha=1):
    return Piecewise((x, x > 0), (alpha * expm1(x), True))


class stop_gradient(Function):
    """The value of its argument, with derivative 0 (``torch.Tensor.detach``,
    ``jax.lax.stop_gradient``): a straight-through estimator is
    ``x + stop_gradient(round(x) - x)``, PyTorch's clamp under ``no_grad`` is
    ``v + stop_gradient(Max(v, eps) - v)``. Differentiation (reverse and forward mode)
    sees a constant; derive/pipeline.py removes the marker once every derivative is
    taken, so the kernels compute the argument itself."""

    is_real = True
    nargs = 1

    def fdiff(self, argindex=1):
        return sympy.S.Zero

    def _latex(self, printer, exp=None):
        head = r"\operatorname{sg}" if exp is None else r"\operatorname{sg}^{%s}" % exp
        return r"%s\left(%s\right)" % (head, printer._print(self.args[0]))

    def _eval_evalf(self, prec):
        return self.args[0].evalf(prec) if self.args[0].is_number else None


class RandomFunction(Function):
    """A draw of a counter-based generator: ``uniform(seed, step, counter)`` and
    ``normal(seed, step, counter)``, integer arguments, one value per (seed, step,
    counter). The generator is Philox-4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel
    random numbers: as easy as 1, 2, 3", SC 2011; the generator of cuRAND and of
    PyTorch's CUDA dropout): the key is the seed's two 32-bit words, the counter the
    counter's two words then the step's two. It is pure integer arithmetic, so the
    CPU and the CUDA kernels (each target's runtime holds it once) draw the same bits.
    A draw is data: its derivative with respect to anything is 0 (the arguments are
    integers besides). ``dropout`` keeps ``x[b,d]`` where
    ``uniform(seed, step, b*N + d) >= p``."""

    is_real = True
    nargs = 3

    @classmethod
    def eval(cls, *args):
        """Nothing is evaluated; an argument that is not an integer is an error (the
        parser reports it naming the equation)."""
        for a in args:
            if not sympy.sympify(a).is_integer:
                raise TypeError(
                    f"{cls.__name__}(seed, step, counter) takes integers (integer attributes, dimensions, "
                    f"indices and their arithmetic); {a} is not one"
                )
        return None

    def fdiff(self, argindex=1):
        return sympy.S.Zero

    def _latex(self, printer, exp=None):
        name = r"\operatorname{%s}" % type(self).__name__
        head = name if exp is None else r"%s^{%s}" % (name, exp)
        return r"%s\left(%s\right)" % (head, ", ".join(printer._print(a) for a in self.args))

    def _eval_evalf(self, prec):
        return None


class uniform(RandomFunction):
    """Uniform on (0, 1): the first 32-bit word of the Philox block, its top 23 bits as
    the odd multiples of 2**-24 ((2k + 1) / 2**24, k < 2**23), exact in float32 and in
    float64 (so a mask does not depend on the float type) and never 0 or 1."""


class normal(RandomFunction):
    """Standard normal by Box-Muller from the block's first two words as uniforms u1, u2
    (as ``uniform`` makes them): sqrt(-2 log u1) cos(2 pi u2); |value| <= 5.77 (u1 >=
    2**-24)."""


RANDOM = {"uniform": uniform, "normal": normal}


def _gelu(x):
    return x * (1 + sympy.erf(x / sympy.sqrt(2))) / 2


def _silu(x):
    return x * sigmoid(x)


def _mish(x):
    return x * sympy.tanh(softplus(x))


def _scalar_max(*args):
    return sympy.Max(*args)


def _scalar_min(*args):
    return sympy.Min(*args)


ELEMENTARY = {
    "exp": sympy.exp,
    "log": sympy.log,
    "log1p": log1p,
    "expm1": expm1,
    "sqrt": sympy.sqrt,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "asin": sympy.asin,
    "acos": sympy.acos,
    "atan": sympy.atan,
    "sinh": sympy.sinh,
    "cosh": sympy.cosh,
    "tanh": sympy.tanh,
    "asinh": sympy.asinh,
    "acosh": sympy.acosh,
    "atanh": sympy.atanh,
    "erf": sympy.erf,
    "erfc": sympy.erfc,
    "abs": sympy.Abs,
    "sign": sympy.sign,
    "floor": sympy.floor,
    "Max": _scalar_max,
    "Min": _scalar_min,
    "where": _where,
    "stop_gradient": stop_gradient,
    **RANDOM,
}

def _relation(cls):
    def build(a, b):
        return cls(a, b)

    build.__name__ = cls.__name__
    return build


# comparisons and logic in SymPy's spelling, the same objects as ``a == b``, ``a < b``,
# ``c and d``: usable wherever a condition is (where's first argument)
RELATIONS = {
    "Eq": _relation(sympy.Eq),
    "Ne": _relation(sympy.Ne),
    "Lt": _relation(sympy.Lt),
    "Le": _relation(sympy.Le),
    "Gt": _relation(sympy.Gt),
    "Ge": _relation(sympy.Ge),
    "And": sympy.And,
    "Or": sympy.Or,
    "Not": sympy.Not,
}

ACTIVATIONS = {
    "sigmoid": sigmoid,
    "softplus": softplus,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "gelu": _gelu,
    "silu": _silu,
    "mish": _mish,
}

REDUCTIONS = {"sum": ReduceSum, "max": ReduceMax, "mean": ReduceMean, "reduce": reduce_terms}

CONSTANTS = {"pi": sympy.pi}

FUNCTIONS = {**ELEMENTARY, **RELATIONS, **ACTIVATIONS}
