"""Printing is correct by construction: every expression form the printers meet, printed
for the CPU, CUDA and the host, evaluates to the number SymPy itself computes.

A table of the forms that have bitten before (negative coefficients over squares,
quotients of powers, unary minus, rational and integer powers, nested divisions, integer
arithmetic in indices) is checked form by form; then Hypothesis builds random expression
trees over the same operators and checks them the same way. The printed text is
evaluated with Python itself (test only: generated code is imported, never exec'd), in
float64 (``_F = numpy.float64``) and, for index expressions, in exact integers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen.printers import CPUPrinter, CUDAPrinter, HostPrinter

a, b, c = (sympy.Symbol(n, real=True) for n in "abc")
i, j = (sympy.Symbol(n, integer=True) for n in "ij")
K, S = (sympy.Symbol(n, integer=True, positive=True) for n in "KS")
x = sympy.IndexedBase("x", real=True)

FLOAT_VALUES = {"a": 1.7, "b": -0.6, "c": 2.3}
INT_VALUES = {"i": 7, "j": -3, "K": 3, "S": 2}
X = np.linspace(-3.0, 4.0, 20)  # the reads below stay inside


def _sigmoid(v, _F):
    return _F(1) / (_F(1) + math.exp(-v))


def _softplus(v, _F):
    return _F(math.log1p(math.exp(v)))


NAMESPACE = {
    "math": math, "np": np, "_F": np.float64, "x": X,
    "_sigmoid": _sigmoid, "_softplus": _softplus,
    "_sigmoid_dev": _sigmoid, "_softplus_dev": _softplus,
}


class sigmoid(sympy.Function):
    def _eval_evalf(self, prec):
        return (1 / (1 + sympy.exp(-self.args[0])))._eval_evalf(prec)


PRINTERS = {
    "cpu": lambda: CPUPrinter(int_symbols=["K", "S", "i", "j"]),
    "cuda": lambda: CUDAPrinter(int_symbols=["K", "S", "i", "j"]),
    "host": lambda: HostPrinter(int_symbols=["K", "S", "i", "j"]),
}


def _sympy_value(e):
    values = {**FLOAT_VALUES, **INT_VALUES}
    subs = {s: values[s.name] for s in e.free_symbols if s.name in values}
    v = e.subs(subs).replace(lambda n: isinstance(n, sympy.Indexed), lambda n: sympy.Float(float(X[int(n.indices[0])])))
    return complex(v.evalf(30))


def _printed_value(printer, e, mode="float"):
    text = printer.expr(e, mode)
    return text, eval(text, dict(NAMESPACE), {**FLOAT_VALUES, **INT_VALUES})  # test only


def _check(target, e, mode="float"):
    expected = _sympy_value(e)
    if not (math.isfinite(expected.real) and abs(expected.imag) < 1e-12 and abs(expected.real) < 1e12):
        return None  # outside the real domain: nothing to compare
    text, got = _printed_value(PRINTERS[target](), e, mode)
    assert float(got) == pytest.approx(expected.real, rel=1e-9, abs=1e-9), f"{e} printed as {text}"
    return text


#: The forms the printers must get right, with what each one is.
FORMS = [
    (-a / b**2, "a negative quotient over a square"),
    (-1 / a**2, "minus one over a square"),
    (-a / (2 * b**2), "a rational coefficient over a square"),
    (-a / (b**2 * c), "a negative quotient over a square times a factor"),
    (a**2 / b**2, "a quotient of squares"),
    (-(a**2) / b**3, "a negative square over a cube"),
    (a / b**3, "a quotient over a cube"),
    (a**-3, "a negative integer power"),
    (-(a**-2), "minus a negative square"),
    (a / b / c, "nested divisions"),
    (a / (b / c), "a division by a quotient"),
    (1 / (a * b), "one over a product"),
    (-(a + b) / c**2, "a negated sum over a square"),
    (a - (b - c), "a difference subtracted"),
    (a - (-b) * c, "minus a negative product"),
    (-(a**2), "minus a square"),
    ((-a) ** 3, "a negative base cubed"),
    ((a - b) ** 2, "a sum squared"),
    ((a + b) ** -2, "a sum to a negative power"),
    (sympy.sqrt(c), "a square root"),
    (1 / sympy.sqrt(c), "a reciprocal square root"),
    (-a / sympy.sqrt(c), "a negative quotient by a square root"),
    (c ** sympy.Rational(3, 2), "a rational power"),
    (c ** sympy.Rational(-3, 2), "a negative rational power"),
    (a ** (b + c), "a symbolic exponent"),
    (c ** -(a * b), "a negative symbolic exponent"),
    (2 ** (a**2), "a power of a square"),
    ((a**2) ** b, "a square to a power"),
    (sympy.exp(-(a**2) / 2), "an exponential of a negative half-square"),
    (-sympy.Rational(1, 3) * a * b / c**2, "a negative rational coefficient over a square"),
    (x[i + 1] ** 2 / x[2 * j + 9] ** 2, "a quotient of squared tensor reads"),
    (-x[S * i - 2] / x[K] ** 2, "a negative quotient of tensor reads over a square"),
    (a * sympy.Mod(i, K), "a product with a remainder"),
    (-sympy.Mod(i, K), "a negated remainder"),
    (a / K**2, "a quotient by an integer square"),
    (K**2 / a, "an integer square over a float"),
    (-a * sympy.floor(i / K), "a negated product with a floor division"),
    (sympy.Piecewise((a, b > 0), (-b, True)) / c**2, "a piecewise over a square"),
    (-sympy.Piecewise((a, b > 0), (-b, True)) * c, "a negated piecewise"),
    (sigmoid(a) ** 2 / (-b), "a helper squared over a negation"),
    (-sigmoid(-a) ** -2, "a negated helper to a negative power"),
    (sympy.Max(a, b) ** -2 - sympy.Min(a, -c), "max and min in arithmetic"),
    (sympy.Abs(b) ** sympy.Rational(1, 3) / -sympy.Abs(a), "a root of an absolute value"),
    (sympy.floor(a) * b - sympy.ceiling(-c / 2), "floor and ceiling of floats"),
    (sympy.floor(i / K) / a, "a floor division over a float"),
]


@pytest.mark.parametrize("target", sorted(PRINTERS))
@pytest.mark.parametrize("form, what", FORMS, ids=[w for _, w in FORMS])
def test_form_prints_the_value_sympy_computes(target, form, what):
    if target == "host" and form.has(sigmoid):
        pytest.skip("host code has no stable helpers (a CodegenError, tested elsewhere)")
    assert _check(target, form) is not None, f"{what}: the table's values must be in the domain"


INDEX_FORMS = [
    (i * S - 2 * K, "a difference of products"),
    (-(i - K) * S, "a negated difference times a size"),
    (sympy.floor(i / K), "a floor division"),
    (sympy.floor(-i / K), "a floor division of a negation"),
    (sympy.floor((i - 1) / (K * S)), "a floor division by a product"),
    (sympy.ceiling(i / S), "a ceiling division"),
    (sympy.Mod(i * S + 1, K), "a remainder of a sum"),
    (sympy.Mod(i, K) * S, "a remainder times a size"),
    (-sympy.Mod(i, K) * S, "a negated remainder times a size"),
    (K**2 - i**3, "integer powers"),
    (sympy.Max(0, i - K + 1), "a clamp"),
    (sympy.floor(i / K) * K + sympy.Mod(i, K), "the division identity"),
]


@pytest.mark.parametrize("target", sorted(PRINTERS))
@pytest.mark.parametrize("form, what", INDEX_FORMS, ids=[w for _, w in INDEX_FORMS])
def test_index_form_prints_exact_integer_arithmetic(target, form, what):
    text, got = _printed_value(PRINTERS[target](), form, "int")
    expected = int(form.subs({s: INT_VALUES[s.name] for s in form.free_symbols}))
    assert isinstance(got, (int, np.integer)) and got == expected, f"{what}: {form} printed as {text}"


# ---------------------------------------------------------------------------------
# Random expression trees


def _trees():
    leaves = st.sampled_from([
        a, b, c, x[i + 9], x[S * 2 + 1], K, sympy.Integer(3), sympy.Integer(-2),
        sympy.Rational(1, 2), sympy.Rational(-3, 4), sympy.Float(0.044715),
    ])

    def grow(children):
        binary = st.tuples(children, children)
        return st.one_of(
            binary.map(lambda t: t[0] + t[1]),
            binary.map(lambda t: t[0] - t[1]),
            binary.map(lambda t: t[0] * t[1]),
            binary.map(lambda t: t[0] / t[1]),
            st.tuples(children, st.integers(-3, 3)).map(lambda t: t[0] ** t[1]),
            st.tuples(children, st.sampled_from([sympy.Rational(1, 2), sympy.Rational(-1, 2), sympy.Rational(3, 2)]))
            .map(lambda t: sympy.Abs(t[0]) ** t[1]),
            children.map(lambda t: -t),
            children.map(lambda t: sympy.exp(-(t**2))),
            children.map(sigmoid),
            binary.map(lambda t: sympy.Max(t[0], t[1])),
            st.tuples(children, children, children).map(lambda t: sympy.Piecewise((t[0], t[1] > t[2]), (t[1], True))),
        )

    return st.recursive(leaves, grow, max_leaves=8)


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees(), st.sampled_from(["cpu", "cuda"]))
def test_random_expressions_print_their_value(form, target):
    _check(target, sympy.sympify(form))


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 2.0**60, -2.5])
def test_floor_of_a_float_keeps_nan_and_infinities(target, value):
    """floor/ceil of a float is a float: NaN, infinities and huge values pass through
    (math.floor's integer result cannot hold them)."""
    text = PRINTERS[target]().expr(sympy.floor(a) + sympy.ceiling(a))
    got = eval(text, dict(NAMESPACE), {"a": np.float64(value)})  # test only
    np.testing.assert_equal(got, np.floor(value) + np.ceil(value))
