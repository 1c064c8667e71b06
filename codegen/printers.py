"""Code printers: SymPy scalar expressions to Numba-compilable Python.

:class:`CPUPrinter` prints for ``@njit`` kernels and is the shared base of every
target's printer: the CUDA target's ``CUDAPrinter`` (codegen/targets/numba_cuda.py,
re-exported here) overrides only what differs. Both are dtype-aware without
being dtype-specific: every kernel binds ``_F = <float array>.dtype.type`` on entry,
and the printer wraps every number and every integer-valued quantity that enters
floating-point arithmetic in ``_F(...)``. A float32 kernel therefore computes in
float32 throughout (Numba would otherwise promote ``float32 * 0.5`` or
``float32 / int64`` to float64), and a float64 kernel in float64, from one source.

Expressions are printed in one of two modes:

* ``"float"``: the value is floating point; numbers become ``_F(0.5)``,
  integer-valued symbols (dimensions, indices, integer attributes) become ``_F(B)``.
* ``"int"``: index arithmetic (subscripts, loop bounds, comparisons of indices);
  numbers stay integers, ``floor(a/b)`` prints as ``a // b``.

``Piecewise`` prints as nested scalar ternaries (never ``numpy.select``), so a read
guarded by a condition is only evaluated when the condition holds.
"""

from __future__ import annotations

import ast
import builtins
import functools
import keyword

import sympy
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.pycode import PythonCodePrinter

#: SymPy function class name -> the ``math`` function it prints as.
MATH_FUNCTIONS = {
    "exp": "math.exp",
    "log": "math.log",
    "sin": "math.sin",
    "cos": "math.cos",
    "tan": "math.tan",
    "asin": "math.asin",
    "acos": "math.acos",
    "atan": "math.atan",
    "atan2": "math.atan2",
    "sinh": "math.sinh",
    "cosh": "math.cosh",
    "tanh": "math.tanh",
    "asinh": "math.asinh",
    "acosh": "math.acosh",
    "atanh": "math.atanh",
    "erf": "math.erf",
    "erfc": "math.erfc",
    "gamma": "math.gamma",
    "loggamma": "math.lgamma",
    "log1p": "math.log1p",
    "expm1": "math.expm1",
}

#: Named stable functions that derive leaves in expressions -> generated helper name.
#: Each helper takes the value and the float type ``_F``.
HELPER_FUNCTIONS = {
    "sigmoid": "_sigmoid",
    "softplus": "_softplus",
}

#: The counter-based generator's draws (derive/functions.py ``RandomFunction``) -> the
#: generated helper; each takes its integer arguments (seed, step, counter) and ``_F``,
#: and calls the Philox helper (``_philox``), which the runtime holds beside it.
RANDOM_FUNCTIONS = {
    "uniform": "_uniform",
    "normal": "_normal",
}

CAST = "_F"

#: Names a symbol that codegen invents (a loop index) must not take: the modules the
#: generated files import (``math``, ``np``, ``njit``, ``cuda``, ... in the
#: templates' import blocks), Python's keywords and builtins (``range``, ``len``, ``min``
#: are called by the kernels). Codegen's own locals (``_F``, ``_dot``, ``_t0``) start
#: with ``_``, which no invented name does.
RESERVED_NAMES = frozenset(
    {"math", "np", "numpy", "numba", "njit", "cuda", "float32", "float64", "generated", "importlib", "os", "sys"}
    | set(keyword.kwlist)
    | set(dir(builtins))
)


def ordered_complement(cond):
    """Where ``cond`` is false for ordered operands: ``x <= 0`` for ``x > 0`` (both are
    false for a NaN ``x``), De Morgan through And/Or. An if-then-else ``ITE(c, a, b)``
    is false where the branch it takes is false, so its complement keeps ``c`` once
    (``to_nnf`` would write ``c`` and its complement, doubling the text at each level
    of nesting)."""
    if isinstance(cond, sympy.logic.boolalg.ITE):
        c, a, b = cond.args
        return sympy.logic.boolalg.ITE(c, ordered_complement(a), ordered_complement(b))
    if isinstance(cond, sympy.And):
        return sympy.Or(*[ordered_complement(a) for a in cond.args])
    if isinstance(cond, sympy.Or):
        return sympy.And(*[ordered_complement(a) for a in cond.args])
    return sympy.logic.boolalg.to_nnf(sympy.Not(cond))


class CodegenError(Exception):
    """An expression codegen cannot print (names the construct)."""


def _is_square(e) -> bool:
    """A symbol or tensor element squared: printed as ``x * x`` (see _print_Pow)."""
    return isinstance(e, sympy.Pow) and e.exp == 2 and (e.base.is_Symbol or isinstance(e.base, sympy.Indexed))


# ---------------------------------------------------------------------------------
# Precedence of printed text.
#
# Whether a sub-expression needs parentheses depends on how it is *printed*, not on its
# SymPy class: ``x**2`` prints as the product ``x * x``, ``x**-2`` as the quotient
# ``_F(1) / (x * x)``, ``-3`` as the unary minus ``-_F(3)``, a Piecewise as a
# parenthesised ternary. Asking SymPy's ``precedence(expr)`` gets these wrong (``-g/x**2``
# printed as ``-g/x * x``). So every composite form below parenthesises its operands
# from the precedence of the operand's printed text, read back with Python's own parser:
# the text says what Python will do with it, whatever printed it.

#: Python's operator precedence on SymPy's scale (sympy.printing.precedence.PRECEDENCE),
#: with unary minus between Mul and Pow as in Python.
PREC_LAMBDA = PRECEDENCE["Lambda"]
PREC_ADD = PRECEDENCE["Add"]
PREC_MUL = PRECEDENCE["Mul"]
PREC_NEG = (PRECEDENCE["Mul"] + PRECEDENCE["Pow"]) // 2
PREC_POW = PRECEDENCE["Pow"]
PREC_ATOM = PRECEDENCE["Atom"]

_BINOP_PREC = {
    ast.Add: PREC_ADD, ast.Sub: PREC_ADD,
    ast.Mult: PREC_MUL, ast.Div: PREC_MUL, ast.FloorDiv: PREC_MUL, ast.Mod: PREC_MUL,
    ast.Pow: PREC_POW,
}


def _node_precedence(node) -> int:
    if isinstance(node, ast.BinOp):
        return _BINOP_PREC.get(type(node.op), PREC_LAMBDA)
    if isinstance(node, ast.UnaryOp):
        return PRECEDENCE["Not"] if isinstance(node.op, ast.Not) else PREC_NEG
    if isinstance(node, ast.BoolOp):
        return PRECEDENCE["And"] if isinstance(node.op, ast.And) else PRECEDENCE["Or"]
    if isinstance(node, ast.Compare):
        return PRECEDENCE["Relational"]
    if isinstance(node, (ast.Call, ast.Name, ast.Constant, ast.Subscript, ast.Attribute)):
        return PREC_ATOM
    return PREC_LAMBDA  # a conditional expression, or anything unforeseen: parenthesise


@functools.lru_cache(maxsize=1 << 16)
def _parse_printed(text: str):
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError:
        return None


def _wrapped(text: str) -> bool:
    """Whether ``text`` is one parenthesised group, ``( ... )``."""
    if not text.startswith("("):
        return False
    depth = 0
    for k, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return k == len(text) - 1
    return False


def printed_precedence(text: str) -> int:
    """The precedence of the outermost operation of the Python expression ``text`` (an
    atom when the whole text is in parentheses)."""
    if _wrapped(text):
        return PREC_ATOM
    node = _parse_printed(text)
    return PREC_LAMBDA if node is None else _node_precedence(node)


def _is_product_chain(text: str) -> bool:
    """Whether ``text`` is ``a*b/c*...``: ``*`` and ``/`` all along its left spine, down to
    an operand that binds tighter than unary minus. Only then does ``-`` + text mean
    ``-(text)``: ``-a*b/c`` is ``((-a)*b)/c``, the same number, but ``-a % b`` is
    ``(-a) % b``. (Right operands cannot capture a prefixed minus.)"""
    node = _parse_printed(text)
    while isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        node = node.left
    if node is None:
        return False
    # the leftmost operand starts after column 0 only when it is in parentheses
    return node.col_offset > 0 or _node_precedence(node) > PREC_NEG


class CPUPrinter(PythonCodePrinter):
    """Prints scalar SymPy expressions for ``@njit`` kernels.

    ``int_symbols``: names of integer-valued symbols (dimensions, indices, integer
    attributes, integer CSE temporaries). ``int_tensors``: names of int64 tensors.
    ``scalars``: tensors of shape ``()``, stored as one-element arrays and read as
    ``name[0]``. ``locals_``: symbols that name float scalar locals of the kernel.
    """

    target = "cpu"
    helper_functions = HELPER_FUNCTIONS
    random_functions = RANDOM_FUNCTIONS

    def __init__(self, int_symbols=(), int_tensors=(), scalars=(), settings=None):
        super().__init__(dict({"fully_qualified_modules": True}, **(settings or {})))
        self.int_symbols = frozenset(int_symbols)
        self.int_tensors = frozenset(int_tensors)
        self.scalars = frozenset(scalars)
        self._mode = "float"
        self._int_memo: dict = {}
        self.helpers_used: set[str] = set()
        #: index symbols known to keep every subscript they enter in bounds (the
        #: innermost loop of a guard-split span): such subscripts print as unsigned
        #: (``np.uint64(...)``), which spares Numba's negative-index wraparound test
        #: and lets the loop vectorise. Set by the emitter around such loops only.
        self.unsigned: frozenset = frozenset()

    # ----------------------------------------------------------------- entry points
    def expr(self, e, mode: str = "float") -> str:
        """Print ``e`` in ``mode`` ("float" or "int")."""
        e = sympy.sympify(e)
        old, self._mode = self._mode, mode
        try:
            return self._print(e)
        finally:
            self._mode = old

    def index(self, e) -> str:
        """Print an integer (index) expression."""
        return self.expr(e, "int")

    def auto(self, e) -> str:
        """Print in the mode the expression's own type calls for."""
        return self.expr(e, "int" if self.is_int(e) else "float")

    # ----------------------------------------------------------------- typing
    def is_int(self, e) -> bool:
        """Whether ``e`` is integer-valued (prints without a float cast)."""
        try:
            return self._int_memo[e]
        except KeyError:
            pass
        r = self._is_int(e)
        self._int_memo[e] = r
        return r

    def _is_int(self, e) -> bool:
        if isinstance(e, sympy.Basic) and (e.is_Boolean or e.is_Relational):
            return False
        if isinstance(e, sympy.Integer):
            return True
        if isinstance(e, sympy.Number):
            return False
        if isinstance(e, sympy.Symbol):
            if e.name in self.scalars:
                return False
            return e.name in self.int_symbols or bool(e.is_integer)
        if isinstance(e, sympy.Indexed):
            return e.base.label.name in self.int_tensors
        if isinstance(e, (sympy.Add, sympy.Max, sympy.Min, sympy.Mod)):
            return all(self.is_int(a) for a in e.args)
        if isinstance(e, sympy.Mul):
            return all(self.is_int(a) for a in e.args)
        if isinstance(e, sympy.Pow):
            return (
                self.is_int(e.base)
                and isinstance(e.exp, sympy.Integer)
                and e.exp >= 0
            )
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            # floor(a / b) of integers is integer arithmetic; floor of a float is a float
            # (it may be NaN or infinite), see _float_rounding
            return self._int_quotient(e.args[0]) is not None
        if isinstance(e, sympy.KroneckerDelta):
            return True
        if isinstance(e, sympy.Piecewise):
            return all(self.is_int(a.expr) for a in e.args)
        return False

    def _print(self, expr, **kwargs):
        if (
            self._mode == "float"
            and isinstance(expr, sympy.Expr)
            and not isinstance(expr, sympy.Piecewise)
            and self.is_int(expr)
        ):
            self._mode = "int"
            try:
                s = super()._print(expr, **kwargs)
            finally:
                self._mode = "float"
            if isinstance(expr, sympy.Integer) and expr < 0:
                return "-%s(%s)" % (CAST, -expr)
            return "%s(%s)" % (CAST, s)
        return super()._print(expr, **kwargs)

    def parenthesize(self, item, level, strict=False):
        """``item`` printed, in parentheses when its printed text binds less tightly
        than ``level`` (or as tightly, unless ``strict``). See printed_precedence."""
        text = self._print(item)
        p = printed_precedence(text)
        if p < level or (not strict and p <= level):
            return "(%s)" % text
        return text

    def _negate(self, text: str) -> str:
        """``-(text)``, without parentheses where Python reads ``-text`` the same."""
        if _is_product_chain(text) or printed_precedence(text) >= PREC_POW:
            return "-" + text
        return "-(%s)" % text

    def _factor(self, item, first: bool) -> str:
        """A factor of a product: in parentheses when it binds less tightly than ``*``, and
        a later factor also when it binds as tightly (``c*(g * g)``, ``a*(b % c)``)."""
        return self.parenthesize(item, PREC_MUL, strict=first)

    def _in_mode(self, mode, fn, *args):
        old, self._mode = self._mode, mode
        try:
            return fn(*args)
        finally:
            self._mode = old

    def _floordiv(self, num, den, negate=False):
        p = PRECEDENCE["Mul"]
        n = self._in_mode("int", self.parenthesize, num, p)
        d = self._in_mode("int", self.parenthesize, den, p, False)
        return ("-(%s // %s)" if negate else "(%s // %s)") % (n, d)

    def _float(self, value) -> str:
        """A typed float literal."""
        if self._mode == "int":
            raise CodegenError("non-integer number %s in an index expression" % value)
        v = float(value)
        if v < 0:
            return "-%s(%r)" % (CAST, -v)
        return "%s(%r)" % (CAST, v)

    # ----------------------------------------------------------------- atoms
    def _print_Integer(self, expr):
        return str(int(expr))

    _print_Zero = _print_Integer
    _print_One = _print_Integer
    _print_NegativeOne = _print_Integer

    def _print_Rational(self, expr):
        return self._float(expr)

    _print_Half = _print_Rational

    def _print_Float(self, expr):
        return self._float(expr)

    def _print_Infinity(self, expr):
        return "%s(math.inf)" % CAST

    def _print_NegativeInfinity(self, expr):
        return "-%s(math.inf)" % CAST

    def _print_NaN(self, expr):
        return "%s(math.nan)" % CAST

    def _print_Exp1(self, expr):
        return "%s(math.e)" % CAST

    def _print_Pi(self, expr):
        return "%s(math.pi)" % CAST

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Symbol(self, expr):
        name = super()._print_Symbol(expr)
        if expr.name in self.scalars:
            return "%s[0]" % name
        return name

    _print_Dummy = _print_Symbol

    def _print_Indexed(self, expr):
        name = expr.base.label.name
        old, self._mode = self._mode, "int"
        try:
            idx = []
            for i in expr.indices:
                text = self._print(i)
                if self.unsigned and sympy.sympify(i).free_symbols & self.unsigned:
                    text = "np.uint64(%s)" % text
                idx.append(text)
        finally:
            self._mode = old
        return "%s[%s]" % (name, ", ".join(idx))

    # ----------------------------------------------------------------- arithmetic
    def _print_Add(self, expr, order=None):
        terms = self._as_ordered_terms(expr, order=order)
        text = self.parenthesize(terms[0], PREC_ADD, strict=True)
        for term in terms[1:]:
            if term.as_coeff_Mul()[0] < 0:
                # ``a - b``: b is a right operand of ``-``, so ``a - (b - c)`` and
                # ``a - (-b)`` keep their parentheses
                text += " - " + self.parenthesize(-term, PREC_ADD)
            else:
                text += " + " + self.parenthesize(term, PREC_ADD, strict=True)
        return text

    def _print_Mul(self, expr):
        c, rest = expr.as_coeff_Mul()
        negative = c < 0
        if negative:
            expr = sympy.Mul(-c, rest) if c != -1 else rest
        numer, denom = [], []
        for item in sympy.Mul.make_args(expr) if not expr.is_Mul else expr.as_ordered_factors():
            if item.is_commutative and item.is_Pow and item.exp.is_Rational and item.exp.is_negative:
                denom.append(item.base if item.exp == -1 else sympy.Pow(item.base, -item.exp, evaluate=False))
            else:
                numer.append(item)
        numer = numer or [sympy.S.One]
        text = "*".join(self._factor(f, k == 0) for k, f in enumerate(numer))
        if len(denom) == 1:
            d = self._print(denom[0])
            # a right operand of ``/``: anything looser than a power gets parentheses
            text += "/" + (d if printed_precedence(d) >= PREC_POW else "(%s)" % d)
        elif denom:
            text += "/(%s)" % "*".join(self._factor(f, k == 0) for k, f in enumerate(denom))
        return self._negate(text) if negative else text

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.base, expr.exp
        if self._mode == "int":
            if _is_square(expr):
                # K * K: Numba lowers an integer ``**`` through float64 (on CUDA, f64
                # instructions inside float32 kernels)
                b = self._print(base)
                return "%s * %s" % (b, b)
            if isinstance(exp, sympy.Integer) and exp >= 0:
                return "%s**%s" % (self.parenthesize(base, PRECEDENCE["Pow"]), exp)
            raise CodegenError("non-integer power %s in an index expression" % expr)
        if exp == sympy.S.Half:
            return "math.sqrt(%s)" % self._print(base)
        if exp == -sympy.S.Half:
            return "%s(1) / math.sqrt(%s)" % (CAST, self._print(base))
        if isinstance(exp, sympy.Integer):
            n = int(exp)
            if n < 0:
                inner = base if n == -1 else sympy.Pow(base, -n, evaluate=False)
                return "%s(1) / %s" % (CAST, self.parenthesize(inner, PRECEDENCE["Mul"] + 1))
            if _is_square(expr):
                b = self._print(base)
                return "%s * %s" % (b, b)
            return "%s**%d" % (self.parenthesize(base, PRECEDENCE["Pow"] + 1), n)
        b = self.parenthesize(base, PRECEDENCE["Pow"] + 1)
        if self.is_int(exp):
            # beta**t with an integer t: the exponent cast to the kernel's float type, or
            # Numba types float32 ** int64 as float64 and promotes the whole expression
            return "%s**%s(%s)" % (b, CAST, self.expr(exp, "int"))
        return "%s**(%s)" % (b, self._print(exp))

    def _int_quotient(self, arg):
        """(numerator, denominator) when ``arg`` is integer-valued or a quotient of
        integer-valued expressions, else None."""
        if self.is_int(arg):
            return arg, sympy.S.One
        num, den = sympy.fraction(sympy.together(arg))
        if self.is_int(num) and self.is_int(den):
            return num, den
        return None

    def _float_rounding(self, fn, arg):
        """floor/ceil of a float value, as a float: ``math.floor`` returns an integer,
        which NaN and infinities do not fit. A float of magnitude 2**52 or more is already
        a whole number, and so is returned as it is (NaN too: the comparison is false)."""
        v = self.expr(arg, "float")
        return "(%s(%s(%s)) if abs(%s) < %s(4503599627370496.0) else %s)" % (CAST, fn, v, v, CAST, v)

    def _rounding(self, expr, fn, sign):
        """floor (``sign`` 1) or ceiling (``sign`` -1, as -floor(-a/b)) of ``expr``'s argument."""
        q = self._int_quotient(expr.args[0])
        if q is None:
            if self._mode == "float":
                return self._float_rounding(fn, expr.args[0])
            return "int(%s(%s))" % (fn, self.expr(expr.args[0], "float"))
        num, den = q
        return self.expr(num, "int") if den == 1 else self._floordiv(sign * num, den, negate=sign < 0)

    def _print_floor(self, expr):
        return self._rounding(expr, "math.floor", 1)

    def _print_ceiling(self, expr):
        return self._rounding(expr, "math.ceil", -1)

    def _print_Mod(self, expr):
        p = PRECEDENCE["Mul"]
        return "%s %% %s" % (self.parenthesize(expr.args[0], p), self.parenthesize(expr.args[1], p + 1))

    def _minmax(self, name, args):
        args = list(args)
        if self._mode == "float":
            # NaN in, NaN out: max(a, b) is a unless b > a, so a NaN b would be dropped.
            # Numbers (never NaN) go last; any other later argument is tested for NaN.
            args = [a for a in args if not a.is_number] + [a for a in args if a.is_number]
        s = self._print(args[-1])
        for k in range(len(args) - 2, -1, -1):
            b = s
            s = "%s(%s, %s)" % (name, self._print(args[k]), b)
            if self._mode == "float" and not all(a.is_number for a in args[k + 1:]):
                s = "(%s if %s != %s else %s)" % (b, b, b, s)
        return s

    def _print_Max(self, expr):
        return self._minmax("max", expr.args)

    def _print_Min(self, expr):
        return self._minmax("min", expr.args)

    def _print_Abs(self, expr):
        return "abs(%s)" % self._print(expr.args[0])

    def _one_zero(self):
        if self._mode == "int":
            return "1", "-1", "0"
        return "%s(1)" % CAST, "-%s(1)" % CAST, "%s(0)" % CAST

    def _at_zero(self, arg, x, value):
        """``value`` where ``x`` (printed ``arg``) is neither positive nor negative: at 0,
        or NaN for a float NaN (NaN in, NaN out)."""
        if self._mode == "float" and not self.is_int(arg):
            return "(%s if %s == 0 else %s)" % (value, x, self._print(sympy.nan))
        return value

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        one, mone, zero = self._one_zero()
        return "(%s if %s > 0 else (%s if %s < 0 else %s))" % (one, x, mone, x, self._at_zero(expr.args[0], x, zero))

    def _print_Heaviside(self, expr):
        x = self._print(expr.args[0])
        one, _, zero = self._one_zero()
        h0 = self._print(expr.args[1]) if len(expr.args) > 1 else self._float(0.5)
        return "(%s if %s > 0 else (%s if %s < 0 else %s))" % (one, x, zero, x, self._at_zero(expr.args[0], x, h0))

    def _print_KroneckerDelta(self, expr):
        a, b = (self.expr(x, "int") for x in expr.args)
        one, _, zero = self._one_zero()
        return "(%s if %s == %s else %s)" % (one, a, b, zero)

    # ----------------------------------------------------------------- logic
    def _float_comparison(self, cond) -> bool:
        """Whether a condition compares float values (a NaN operand makes it unordered).
        A draw of the generator compared with an expression reading no tensor
        (``uniform(seed, step, i) >= p``) counts as ordered: the draw is never NaN, and
        the other side holds attributes and sizes only (a NaN attribute is not data
        whose NaN the kernel carries through); the NaN branch would draw twice."""
        return any(
            not (self.is_int(r.lhs) and self.is_int(r.rhs)) and not self._ordered_draw(r)
            for r in cond.atoms(sympy.core.relational.Relational)
        )

    def _ordered_draw(self, rel) -> bool:
        """A comparison of a random draw with a tensor-free expression."""
        for a, b in ((rel.lhs, rel.rhs), (rel.rhs, rel.lhs)):
            if isinstance(a, sympy.Function) and type(a).__name__ in self.random_functions and not b.atoms(sympy.Indexed):
                return True
        return False

    def _print_Piecewise(self, expr):
        pieces = list(expr.args)
        nan = "%s(math.nan)" % CAST if self._mode == "float" else "0"
        if pieces[-1].cond == sympy.true:
            tail = self._print(pieces[-1].expr)
            pieces = pieces[:-1]
            last = pieces[-1].cond if pieces else None
            if self._mode == "float" and last is not None and self._float_comparison(last):
                # NaN in, NaN out: a comparison with a NaN operand is false, so the
                # default branch is taken only where the last condition's ordered
                # complement holds (x <= 0 after x > 0), and NaN otherwise
                tail = "(%s if %s else %s)" % (tail, self._print(ordered_complement(last)), nan)
        else:
            tail = nan
        s = tail
        for piece in reversed(pieces):
            s = "(%s if %s else %s)" % (self._print(piece.expr), self._print(piece.cond), s)
        return s

    def _print_ITE(self, expr):
        """A Boolean if-then-else (SymPy folds a comparison of a Piecewise into one) as a
        Boolean ternary. Not through Piecewise: that would append the NaN default, and
        a NaN is truthy where a condition is read."""
        c, a, b = expr.args
        return "(%s if %s else %s)" % (self._print(a), self._print(c), self._print(b))

    def _print_Relational(self, expr):
        mode = "int" if self.is_int(expr.lhs) and self.is_int(expr.rhs) else "float"
        lhs = self.expr(expr.lhs, mode)
        rhs = self.expr(expr.rhs, mode)
        return "(%s %s %s)" % (lhs, expr.rel_op, rhs)

    def _print_And(self, expr):
        return "(%s)" % " and ".join(self._print(a) for a in expr.args)

    def _print_Or(self, expr):
        return "(%s)" % " or ".join(self._print(a) for a in expr.args)

    def _print_Not(self, expr):
        return "(not %s)" % self._print(expr.args[0])

    # ----------------------------------------------------------------- functions
    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in self.helper_functions:
            self.helpers_used.add(name)
            args = ", ".join(self.expr(a, "float") for a in expr.args)
            return "%s(%s, %s)" % (self.helper_functions[name], args, CAST)
        if name in self.random_functions:
            # integer arguments; the helper draws through the Philox helper (a helper too)
            self.helpers_used.update((name, "philox"))
            args = ", ".join(self.expr(a, "int") for a in expr.args)
            return "%s(%s, %s)" % (self.random_functions[name], args, CAST)
        if name in MATH_FUNCTIONS:
            args = ", ".join(self.expr(a, "float") for a in expr.args)
            return "%s(%s)" % (MATH_FUNCTIONS[name], args)
        raise CodegenError("no code printer for the function %r in %s" % (name, expr))

    def _print_not_supported(self, expr):
        raise CodegenError("no code printer for %s (%s)" % (type(expr).__name__, expr))

    def emptyPrinter(self, expr):
        raise CodegenError("no code printer for %s (%s)" % (type(expr).__name__, expr))


class HostPrinter(CPUPrinter):
    """Prints for plain (un-jitted) Python on the host: shapes, derived dimensions,
    learning-rate schedules. Numbers print as Python literals; no ``_F`` casts."""

    target = "host"

    def _print(self, expr, **kwargs):
        return PythonCodePrinter._print(self, expr, **kwargs)

    def _float(self, value):
        return repr(float(value))

    def _print_Infinity(self, expr):
        return "math.inf"

    def _print_NegativeInfinity(self, expr):
        return "-math.inf"

    def _print_NaN(self, expr):
        return "math.nan"

    def _print_Exp1(self, expr):
        return "math.e"

    def _print_Pi(self, expr):
        return "math.pi"

    def _one_zero(self):
        return ("1", "-1", "0") if self._mode == "int" else ("1.0", "-1.0", "0.0")

    def _float_rounding(self, fn, arg):
        return "float(%s(%s))" % (fn, self.expr(arg, "float"))

    def _print_Pow(self, expr, rational=False):
        if self._mode == "int" or not (expr.exp == sympy.S.Half or expr.exp == -sympy.S.Half):
            b = self.parenthesize(expr.base, PRECEDENCE["Pow"] + 1)
            e = self.parenthesize(expr.exp, PRECEDENCE["Pow"] + 1)
            if isinstance(expr.exp, sympy.Integer) and expr.exp < 0:
                return "1.0 / %s**%d" % (b, -int(expr.exp))
            return "%s**%s" % (b, e)
        if expr.exp == sympy.S.Half:
            return "math.sqrt(%s)" % self._print(expr.base)
        return "1.0 / math.sqrt(%s)" % self._print(expr.base)

    def _print_Piecewise(self, expr):
        return CPUPrinter._print_Piecewise(self, expr).replace("%s(math.nan)" % CAST, "math.nan")

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in HELPER_FUNCTIONS or name in RANDOM_FUNCTIONS:
            raise CodegenError("%s is not available in host code (%s)" % (name, expr))
        if name in MATH_FUNCTIONS:
            return "%s(%s)" % (MATH_FUNCTIONS[name], ", ".join(self._print(a) for a in expr.args))
        raise CodegenError("no code printer for the function %r in %s" % (name, expr))


__all__ = ["CPUPrinter", "CUDAPrinter", "HostPrinter", "CodegenError", "precedence"]


def __getattr__(name):
    # the CUDA printer lives with its target (codegen/targets/numba_cuda.py)
    if name == "CUDAPrinter":
        from .targets.numba_cuda import CUDAPrinter

        return CUDAPrinter
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
