"""codegen's printers: dtype-aware literals, index arithmetic, Piecewise as ternaries,
the stable helpers, and (for float32) no silent promotion to float64 in a kernel."""

from __future__ import annotations

import numpy as np
import pytest
import sympy
from numba import njit

from codegen.printers import CodegenError, CPUPrinter, CUDAPrinter, HostPrinter

i, j, p = (sympy.Symbol(n, integer=True) for n in "ijp")
N, K, S = (sympy.Symbol(n, integer=True, positive=True) for n in "NKS")
x = sympy.IndexedBase("x")
slope = sympy.Symbol("slope")


class sigmoid(sympy.Function):
    pass


class softplus(sympy.Function):
    pass


@pytest.fixture
def pr():
    return CPUPrinter(int_symbols=["K", "S"], scalars=["g_loss"])


@pytest.mark.parametrize(
    "expr, text",
    [
        (x[i] / 2 - 3, "_F(0.5)*x[i] - _F(3)"),
        (2 * x[i] + 1, "_F(2)*x[i] + _F(1)"),
        (x[i] / N, "x[i]/_F(N)"),
        (x[i] ** 2, "x[i] * x[i]"),
        (sympy.sqrt(x[i]), "math.sqrt(x[i])"),
        (sympy.Max(0, x[i]), "max(x[i], _F(0))"),
        (-sympy.oo, "-_F(math.inf)"),
        (sympy.Float(1e-8) * x[i], "_F(1e-08)*x[i]"),
        (sympy.Symbol("g_loss") * x[i], "g_loss[0]*x[i]"),
        (sympy.KroneckerDelta(i, j) * x[i], "_F((1 if i == j else 0))*x[i]"),
    ],
)
def test_float_literals_are_typed(pr, expr, text):
    assert pr.expr(expr) == text


@pytest.mark.parametrize(
    "expr, text, values",
    [
        (sympy.Symbol("y") / sympy.Symbol("u") ** 2, "y/(u * u)", {"y": 3.0, "u": 2.0}),
        (1 / sympy.Symbol("u") ** 2, "_F(1) / (u * u)", {"u": 2.0}),
        (sympy.floor(N / K**2), "_F((N // (K * K)))", {"N": 20, "K": 2}),
    ],
)
def test_a_square_printed_as_a_product_binds_as_one(pr, expr, text, values):
    """x**2 prints as ``x * x``; under a division it keeps its parentheses."""
    printed = pr.expr(expr)
    assert printed == text
    by_name = {str(s): s for s in expr.free_symbols}
    expected = float(expr.subs({by_name[k]: v for k, v in values.items()}))
    assert eval(printed, {"_F": float, **values}) == pytest.approx(expected)  # test only


def test_an_integer_exponent_is_cast_to_the_float_type(pr):
    """beta**t with an integer t: float32 ** int64 would be float64 in Numba."""
    beta, t = sympy.Symbol("beta"), sympy.Symbol("t", integer=True)
    assert pr.expr(1 - beta**t) == "_F(1) - beta**_F(t)"


def test_floor_division_by_a_product_keeps_its_parentheses(pr):
    assert pr.index(sympy.floor(i / (N * K))) == "(i // (K*N))"
    assert eval(pr.index(sympy.floor(i / (N * K))), {"i": 23, "N": 2, "K": 3}) == 3


def test_index_expressions_stay_integer(pr):
    assert pr.index(x[S * i + p].indices[0]) == "S*i + p"
    assert pr.expr(x[S * i + p]) == "x[S*i + p]"
    assert pr.index(sympy.floor((N - K) / S) + 1) == "((-K + N) // S) + 1"
    assert pr.index(sympy.Max(0, i - K + 1)) == "max(0, -K + i + 1)"
    assert pr.index(sympy.Mod(i, 3)) == "i % 3"
    # an integer-valued expression in float arithmetic is cast once, as a whole
    assert pr.expr(sympy.floor(N / S) * x[i]) == "_F((N // S))*x[i]"


def test_piecewise_prints_nested_ternaries(pr):
    guarded = sympy.Piecewise((x[i - p], (i - p >= 0) & (i - p < N)), (0, True))
    text = pr.expr(guarded)
    assert text.startswith("(x[i - p] if (") and text.endswith("else _F(0))")
    assert "select" not in text
    three = sympy.Piecewise((x[i], x[i] > 1), (slope, x[i] < -1), (0, True))
    # the default branch is taken where the last condition's complement holds, NaN otherwise
    assert pr.expr(three) == ("(x[i] if (x[i] > _F(1)) else (slope if (x[i] < -_F(1)) else "
                              "(_F(0) if (x[i] >= -_F(1)) else _F(math.nan))))")


def test_stable_helpers_and_functions(pr):
    assert pr.expr(sigmoid(x[i])) == "_sigmoid(x[i], _F)"
    assert pr.expr(softplus(x[i])) == "_softplus(x[i], _F)"
    assert pr.helpers_used == {"sigmoid", "softplus"}
    assert CUDAPrinter().expr(sigmoid(x[i])) == "_sigmoid_dev(x[i], _F)"
    assert pr.expr(sympy.erf(x[i])) == "math.erf(x[i])"
    assert pr.expr(sympy.sign(x[i])) == ("(_F(1) if x[i] > 0 else (-_F(1) if x[i] < 0 else "
                                         "(_F(0) if x[i] == 0 else _F(math.nan))))")  # sign(NaN) is NaN


def test_unknown_function_is_an_error(pr):
    with pytest.raises(CodegenError, match="besselj"):
        pr.expr(sympy.besselj(0, x[i]))


def test_host_printer_plain_python():
    hp = HostPrinter()
    t = sympy.Symbol("t", integer=True)
    step = sympy.Symbol("step_size", integer=True)
    assert hp.expr(sympy.Symbol("gamma") ** sympy.floor(t / step)) == "gamma**(t // step_size)"
    u = sympy.Symbol("u")
    assert hp.expr(sympy.Rational(1, 2) * sympy.cos(sympy.pi * u)) == "0.5*math.cos(math.pi*u)"


def _compile(body_expr, pr):
    """A tiny kernel around one printed expression, as the templates lay it out."""
    src = (
        "import math\n"
        "def k(x, y, N, slope):\n"
        "    _F = y.dtype.type\n"
        "    for i in range(0, N):\n"
        "        y[i] = %s\n" % pr.expr(body_expr)
    )
    scope = {}
    exec(compile(src, "<printer-test>", "exec"), scope)  # test only; generated code is imported
    return njit(scope["k"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_is_not_promoted(pr, dtype):
    expr = sympy.Piecewise((x[i] / 3 + 1, x[i] > 0), (slope * x[i] ** 2 / N, True)) + sympy.exp(-x[i] / 2)
    k = _compile(expr, pr)
    xs = np.linspace(-2, 2, 7).astype(dtype)
    y = np.empty_like(xs)
    k(xs, y, xs.size, dtype(0.5))
    ref = np.where(xs > 0, xs / 3 + 1, 0.5 * xs**2 / xs.size) + np.exp(-xs / 2)
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    (sig,) = k.signatures
    annotated = k.overloads[sig].type_annotation.__str__()
    if dtype is np.float32:
        # float64 may only appear as the constant fed to an _F(...) cast
        for line in annotated.splitlines():
            if ":: float64" in line:
                assert "const(float" in line or "math.pi" in line or "attr=nan" in line, line
