"""The spec language's constructs of issue 11, each checked on its own:

* an output read by a later equation (the minimal ``u``/``y`` pair, a matrix product of
  an output, an LSTM cell whose ``h_new`` reads ``c_new``) builds, and its forward and
  every gradient agree with PyTorch autograd (float64 oracle) and central finite
  differences, on the CPU and CUDA (simulator) targets, float32 and float64;
* every named function of the spec language, and every reduction, prints in LaTeX under
  any power;
* ``Eq``/``Ne`` (and SymPy's other relation and logic names) build the same program as
  ``==``/``!=``; unknown names get a near match, the common mistakes say what fixes them;
* ``mean(expr, i, ...)`` derives exactly as ``sum(expr, i, ...)`` over the product of the
  ranges, and its kernels match PyTorch;
* a float literal prints in the derivation as written (0.044715, not 8943/200000), in
  the kernels as a typed literal, and integral floats and exponents stay exact, so
  simplification does not suffer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sympy
import torch
import torch.nn.functional as F

import reference as ref

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def q(text: str) -> str:
    """A TOML basic string holding ``text`` verbatim (JSON escaping is valid TOML)."""
    return json.dumps(text)


def layer_toml(name, inputs, outputs, equations, params="", extra="", kind="layer"):
    lines = [f'name = "{name}"', f'kind = "{kind}"', f"inputs = {inputs}", f"outputs = {outputs}"]
    if params:
        lines.append(f"params = {params}")
    if extra:
        lines.append(extra)
    lines.append("equations = [" + ", ".join(q(e) for e in equations) + "]")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def spec_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("spec_language")


@pytest.fixture
def build(spec_dir, build_spec):
    """``build(name, toml_text)`` -> the module codegen.build makes of it (once per session)."""

    def _build(name, text):
        path = Path(spec_dir) / f"{name}.toml"
        if not path.exists():
            path.write_text(text)
        return build_spec(path)

    return _build


def derive_text(tmp_path, text, name="spec"):
    """The derive.Program of a spec text (no code generated, nothing compiled)."""
    import derive

    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return derive.from_file(str(path))


def statements(program):
    """What the kernels compute, without the spec text the docstrings quote."""
    return [(a.target, a.free, a.body, a.reduce, a.over, a.accumulate) for a in program.forward + program.backward]


# ------------------------------------------------------------------ outputs read later


def _outread(x):
    u = torch.exp(x)
    return u, u * x


def _outmat(x, w):
    u = torch.tanh(x)
    y = u @ w.T
    return u, y, (y**2).sum(1)


def _lstm_cell(x, h, c, wi, wh, bias):
    z = x @ wi.T + h @ wh.T + bias
    H = h.shape[1]
    i, f, g, o = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


@dataclass(frozen=True)
class ReadLater:
    id: str
    text: str
    oracle: object
    shapes: tuple


READ_LATER = [
    # the issue's minimal form: the reads' contribution to g_u is elementwise
    ReadLater("outread", layer_toml("outread", '{ x = "N" }', '{ u = "N", y = "N" }',
                                    ["u[i] = exp(x[i])", "y[i] = u[i] * x[i]"]), _outread, ((5,),)),
    # contributions through a matrix product and a reduction: gathered, not inlined
    ReadLater("outmat", layer_toml("outmat", '{ x = "B I" }', '{ u = "B I", y = "B O", s = "B" }',
                                   ["u[b,i] = tanh(x[b,i])", "y[b,o] = sum(w[o,i] * u[b,i], i)",
                                    "s[b] = sum(y[b,o]**2, o)"], params='{ w = "O I" }'),
              _outmat, ((3, 4), (2, 4))),
    # an LSTM cell: h_new reads the output c_new; the gates are offset slices of z
    ReadLater("lstm_cell", layer_toml(
        "lstm_cell", '{ x = "B I", h = "B H", c = "B H" }', '{ h_new = "B H", c_new = "B H" }',
        ["z[b,k] = sum(wi[k,i]*x[b,i], i) + sum(wh[k,j]*h[b,j], j) + bias[k]",
         "c_new[b,j] = sigmoid(z[b,H+j]) * c[b,j] + sigmoid(z[b,j]) * tanh(z[b,2*H+j])",
         "h_new[b,j] = sigmoid(z[b,3*H+j]) * tanh(c_new[b,j])"],
        params='{ wi = "G I", wh = "G H", bias = "G" }', extra='ranges = { j = "H" }'),
        _lstm_cell, ((2, 3), (2, 4), (2, 4), (16, 3), (16, 4), (16,))),
]
READ_LATER_PARAMS = [pytest.param(c, id=c.id) for c in READ_LATER]


def _torch_vjp(case, args, seeds):
    ts = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in args]
    outs = case.oracle(*ts)
    grads = torch.autograd.grad(outs, ts, [torch.tensor(np.asarray(s, np.float64)).reshape(o.shape) for s, o in zip(seeds, outs)])
    return [o.detach().numpy() for o in outs], [g.numpy() for g in grads]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", READ_LATER_PARAMS)
def test_output_read_later_matches_torch(build, case, dtype, target, rng):
    op = build(case.id, case.text).op(target=target)
    args = ref.cast([rng.normal(size=s) for s in case.shapes], dtype)
    outs = ref.as_tuple(op.forward(*args))
    seeds = ref.make_seeds(outs, rng, dtype)
    grads = ref.as_tuple(op.backward(*seeds, *args))
    expected_outs, expected_grads = _torch_vjp(case, args, seeds)
    assert len(outs) == len(expected_outs) and len(grads) == len(args)
    for k, (o, e) in enumerate(zip(outs, expected_outs)):
        ref.assert_close(o, e, dtype, f"{case.id} on {target}: output {k}")
    for k, (g, e) in enumerate(zip(grads, expected_grads)):
        assert np.asarray(g).dtype == np.dtype(dtype)
        ref.assert_close(g, e, dtype, f"{case.id} on {target}: gradient of argument {k}")


@pytest.mark.parametrize("case", READ_LATER_PARAMS)
def test_output_read_later_matches_finite_differences(build, case, rng):
    op = build(case.id, case.text).op()
    args = [rng.normal(size=s) for s in case.shapes]
    seeds = ref.make_seeds(ref.as_tuple(op.forward(*args)), rng, np.float64)
    grads = ref.as_tuple(op.backward(*seeds, *args))
    numeric = ref.numerical_vjp(op.forward, args, seeds, range(len(args)))
    for k, (g, e) in enumerate(zip(grads, numeric)):
        ref.assert_close(g, e, np.float64, f"{case.id}: gradient of argument {k}", ref.FD_TOL)


def test_output_read_later_counts_its_own_gradient_once(tmp_path):
    """The incoming gradient of u and the contribution through y's read of u both reach
    g_x, and g_u stays the caller's argument (the module once declared it twice)."""
    program = derive_text(tmp_path, READ_LATER[0].text)
    assert [s.name for s in program.seeds] == ["g_u", "g_y"]
    (gx,) = [a for a in program.backward if a.target == "g_x"]
    i = gx.free[0].index
    x, u, g_u, g_y = (sympy.IndexedBase(n, real=True)[i] for n in ("x", "u", "g_u", "g_y"))
    assert sympy.simplify(gx.body - ((g_u + g_y * x) * sympy.exp(x) + g_y * u)) == 0
    assert all(a.target != "g_u" for a in program.backward), "the seed g_u is never written"
    assert "Outputs that later statements read ($u$)" in program.latex


# ------------------------------------------------------------------ LaTeX under powers


def _function_call(name):
    from derive.functions import FUNCTIONS

    x, y = sympy.symbols("x y", real=True)
    s, t, i = sympy.symbols("seed step i", integer=True)
    args = {"Max": (x, y), "Min": (x, y), "where": (x > 0, x, y), "uniform": (s, t, i), "normal": (s, t, i)}.get(name, (x,))
    return FUNCTIONS[name](*args)


def _numeric_functions():
    from derive.functions import FUNCTIONS, RELATIONS

    return sorted(n for n in FUNCTIONS if n not in RELATIONS)


POWERS = [2, 3, -2, sympy.Rational(3, 2), sympy.Rational(1, 2), sympy.Symbol("k", positive=True)]


@pytest.mark.parametrize("power", POWERS, ids=str)
@pytest.mark.parametrize("name", _numeric_functions())
def test_every_function_prints_under_a_power(name, power):
    from derive.latex import tex

    call = _function_call(name)
    expr = call**power
    text = tex(expr)  # raised TypeError for sigmoid and softplus before
    assert isinstance(text, str) and text
    if isinstance(expr, sympy.Pow) and expr.base == call:  # not folded (sqrt(x)**2 is x)
        marker = r"\sqrt" if power == sympy.Rational(1, 2) else r"\frac{1}" if power == -2 else "^{%s}" % tex(power)
        assert marker in text, text


@pytest.mark.parametrize("power", [2, 3, sympy.Rational(3, 2), sympy.Symbol("k", positive=True)], ids=str)
def test_named_functions_print_their_power_on_the_name(power):
    """sigma^2(x), as LaTeX writes sin^2(x); every NamedFunction subclass, not a list."""
    from derive.functions import NamedFunction
    from derive.latex import tex

    x = sympy.Symbol("x", real=True)
    classes = NamedFunction.__subclasses__()
    assert {c.__name__ for c in classes} >= {"sigmoid", "softplus"}
    for cls in classes:
        alone = tex(cls(x)).split(r"\left(")[0]
        assert tex(cls(x) ** power) == r"%s^{%s}\left(x\right)" % (alone, tex(power))


@pytest.mark.parametrize("kind", ["sum", "max", "mean"])
def test_reductions_print_under_a_power(kind):
    from derive.functions import REDUCTIONS
    from derive.latex import tex

    i = sympy.Symbol("i", integer=True)
    text = tex(REDUCTIONS[kind](sympy.IndexedBase("x")[i], i) ** 2)
    assert text.startswith(r"\left(") and text.endswith(r"\right)^{2}")


def test_a_power_of_library_functions_builds_and_matches_torch(build, target, rng):
    text = layer_toml("powers", '{ x = "N" }', '{ y = "N" }',
                      ["y[i] = sigmoid(x[i])**2 + softplus(x[i])**3 - sqrt(sigmoid(x[i]))"])
    op = build("powers", text).op(target=target)
    assert r"\sigma^{2}\left(x_{i}\right)" in op.latex()
    assert r"\operatorname{softplus}^{3}\left(x_{i}\right)" in op.latex()
    x, gy = rng.normal(size=7), rng.normal(size=7)
    t = torch.tensor(x, requires_grad=True)
    y = torch.sigmoid(t) ** 2 + F.softplus(t) ** 3 - torch.sqrt(torch.sigmoid(t))
    ref.assert_close(op.forward(x), y.detach().numpy(), np.float64, "forward")
    ref.assert_close(op.backward(gy, x), torch.autograd.grad(y, t, torch.tensor(gy))[0].numpy(), np.float64, "backward")


# ------------------------------------------------------------------ relations in SymPy's spelling

RELATION_PAIRS = [("Eq({a}, {b})", "{a} == {b}"), ("Ne({a}, {b})", "{a} != {b}"), ("Lt({a}, {b})", "{a} < {b}"),
                  ("Le({a}, {b})", "{a} <= {b}"), ("Gt({a}, {b})", "{a} > {b}"), ("Ge({a}, {b})", "{a} >= {b}"),
                  ("And({a} > 0, {b} > 0)", "{a} > 0 and {b} > 0"), ("Or({a} > 0, {b} > 0)", "{a} > 0 or {b} > 0"),
                  ("Not({a} > {b})", "not {a} > {b}")]


@pytest.mark.parametrize("sympy_form, python_form", RELATION_PAIRS, ids=[p[0].split("(")[0] for p in RELATION_PAIRS])
def test_sympy_relations_build_what_operators_build(tmp_path, sympy_form, python_form):
    def program(form, name):
        cond = form.format(a="x[b,n]", b="m[b,n]")
        eq = f"y[b,n] = where({cond}, x[b,n]**2, 3*m[b,n])"
        return derive_text(tmp_path, layer_toml("rel", '{ x = "B N", m = "B N" }', '{ y = "B N" }', [eq]), name)

    assert statements(program(sympy_form, "sympy")) == statements(program(python_form, "python"))


def test_eq_mask_builds_and_matches_torch(build, target, rng):
    text = layer_toml("eq_mask", '{ x = "B N", mask = "B N" }', '{ y = "B N" }',
                      ["y[b,n] = where(Eq(mask[b,n], 0), 0, x[b,n]**2) + where(Ne(mask[b,n], 1), x[b,n], 0)"],
                      extra='differentiate = ["x"]')
    op = build("eq_mask", text).op(target=target)
    x = rng.normal(size=(3, 4))
    mask = rng.integers(0, 3, size=(3, 4)).astype(np.float64)
    gy = rng.normal(size=(3, 4))
    t, m = torch.tensor(x, requires_grad=True), torch.tensor(mask)
    y = torch.where(m == 0, 0.0, t**2) + torch.where(m != 1, t, 0.0)
    ref.assert_close(op.forward(x, mask), y.detach().numpy(), np.float64, "forward")
    (g,) = ref.as_tuple(op.backward(gy, x, mask))
    ref.assert_close(g, torch.autograd.grad(y, t, torch.tensor(gy))[0].numpy(), np.float64, "backward")


# ------------------------------------------------------------------ errors that say what fixes them


@dataclass(frozen=True)
class Hint:
    id: str
    equation: str
    says: str  # the message contains this


HINTS = [
    Hint("eq-lowercase", "y[b,i] = where(eq(x[b,i], 0), 1, x[b,i])", "did you mean `Eq`?"),
    Hint("ne-uppercase", "y[b,i] = where(NE(x[b,i], 0), 1, x[b,i])", "did you mean `Ne`?"),
    Hint("exp-capitalised", "y[b,i] = Exp(x[b,i])", "did you mean `exp`?"),
    Hint("sigmoid-typo", "y[b,i] = sigmod(x[b,i])", "did you mean `sigmoid`?"),
    Hint("mean-typo", "y[b,i] = x[b,i] - maen(x[b,j], j)", "did you mean `mean`?"),
    Hint("min-lowercase", "y[b,i] = min(x[b,i], 0)", "did you mean `Min`?"),
    Hint("ln", "y[b,i] = ln(x[b,i])", "did you mean `log`?"),
    Hint("tensor-typo", "y[b,i] = xs[b,i]", "did you mean `x`?"),
    Hint("dimension-typo", "y[b,i] = x[b,i] / BB", "did you mean `B`?"),
    Hint("caret-power", "y[b,i] = x[b,i]^2", "`**`"),
    Hint("max-of-two", "y[b,i] = max(x[b,i], 0)", "Max(a, b)"),
    Hint("tensor-called", "y[b,i] = x(b, i)", "x[...]"),
    Hint("numpy-prefix", "y[b,i] = np.exp(x[b,i])", "write `exp(...)`"),
    Hint("math-prefix-near", "y[b,i] = math.Tanh(x[b,i])", "write `tanh(...)`"),
    Hint("eq-one-argument", "y[b,i] = where(Eq(x[b,i]), 1, 0)", "two arguments"),
    Hint("two-dimensions", "y[b,i] = x[b,i] + w[b,i]", "`ranges`"),
]


@pytest.mark.parametrize("hint", HINTS, ids=[h.id for h in HINTS])
def test_a_common_mistake_names_its_fix(tmp_path, hint):
    import derive

    text = layer_toml("bad", '{ x = "B I", w = "I B" }', '{ y = "B I" }', [hint.equation])
    with pytest.raises(derive.SpecError) as info:
        derive_text(tmp_path, text, "bad")
    message = str(info.value)
    assert "bad.toml" in message and hint.equation in message, message
    assert hint.says in message, message


def test_no_hint_where_nothing_is_near(tmp_path):
    import derive

    with pytest.raises(derive.SpecError) as info:
        derive_text(tmp_path, layer_toml("bad", '{ x = "B I" }', '{ y = "B I" }', ["y[b,i] = quux(x[b,i])"]), "bad")
    assert "unknown function `quux`" in str(info.value) and "did you mean" not in str(info.value)


# ------------------------------------------------------------------ mean

MEANS = [
    pytest.param("loss = mean((p[b,n] - t[b,n])**2, b, n)", "loss = sum((p[b,n] - t[b,n])**2, b, n) / (B*N)", id="loss-over-both"),
    pytest.param("y[b,n] = p[b,n] - mean(p[b,k], k)", "y[b,n] = p[b,n] - sum(p[b,k], k) / N", id="centre-rows"),
    pytest.param("y[b,n] = p[b,n] / sqrt(mean(p[b,k]**2, k) + 1)", "y[b,n] = p[b,n] / sqrt(sum(p[b,k]**2, k) / N + 1)", id="rms-norm"),
    pytest.param("loss = mean(log(mean(exp(p[b,n]), n)), b)", "loss = sum(log(sum(exp(p[b,n]), n) / N), b) / B", id="nested"),
]


@pytest.mark.parametrize("mean_form, sum_form", MEANS)
def test_mean_derives_as_the_sum_over_the_size(tmp_path, mean_form, sum_form):
    def program(eq, name):
        out = '{ loss = "" }' if eq.startswith("loss") else '{ y = "B N" }'
        return derive_text(tmp_path, layer_toml("m", '{ p = "B N", t = "B N" }', out, [eq]), name)

    mean, total = program(mean_form, "mean"), program(sum_form, "sum")
    assert statements(mean) == statements(total)
    assert mean.latex.replace("mean.toml", "") == total.latex.replace("sum.toml", "")


def test_python_ops_mean_is_the_spec_languages_mean(tmp_path):
    """derive.dsl.Mean, the Python twin of ``mean``: the library's layer_norm (written
    with it) derives what the same equations with the TOML ``mean`` derive."""
    import derive

    norm = next(op for op in derive.library_defs() if op.name == "layer_norm")
    text = layer_toml("layer_norm", '{ x = "B D" }', '{ y = "B D" }', [
        "mean[b] = mean(x[b,d], d)",
        "var[b] = mean((x[b,d] - mean[b])**2, d)",
        "rstd[b] = 1 / sqrt(var[b] + eps)",
        "xhat[b,d] = (x[b,d] - mean[b]) * rstd[b]",
        "y[b,d] = xhat[b,d] * weight[d] + bias[d]",
    ], params='{ weight = "D", bias = "D" }', extra="attrs = { eps = 1e-5 }")
    assert statements(derive.build(norm)) == statements(derive_text(tmp_path, text, "layer_norm"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_squared_error_matches_torch(build, dtype, target, rng):
    text = layer_toml("mse_mean", '{ pred = "B N", target = "B N" }', '{ loss = "" }',
                      ["loss = mean((pred[b,n] - target[b,n])**2, b, n)"], kind="loss",
                      extra='differentiate = ["pred"]')
    op = build("mse_mean", text).op(target=target)
    pred, tgt = ref.cast([rng.normal(size=(3, 5)), rng.normal(size=(3, 5))], dtype)
    p = torch.tensor(np.asarray(pred, np.float64), requires_grad=True)
    loss = F.mse_loss(p, torch.tensor(np.asarray(tgt, np.float64)))
    ref.assert_close(op.forward(pred, tgt), loss.item(), dtype, "forward")
    (g,) = ref.as_tuple(op.backward(0.7, pred, tgt))
    ref.assert_close(g, torch.autograd.grad(loss, p, torch.tensor(0.7, dtype=torch.float64))[0].numpy(), dtype, "backward")


# ------------------------------------------------------------------ floats as written

DECIMALS = [
    ("0.044715", "0.044715"), ("0.1", "0.1"), ("0.2", "0.2"), ("-0.05", "-0.05"), ("123.45", "123.45"),
    ("1e-8", "10^{-8}"), ("1.5e-8", r"1.5 \cdot 10^{-8}"), ("0.7978845608", "0.7978845608"),
]


@pytest.mark.parametrize("written, printed", DECIMALS, ids=[d[0] for d in DECIMALS])
def test_a_decimal_literal_prints_as_written(tmp_path, written, printed):
    program = derive_text(tmp_path, layer_toml("f", '{ x = "N" }', '{ y = "N" }', [f"y[i] = {written}*x[i]**2 + x[i]"]))
    assert f"y_{{i}} = {printed} x_{{i}}^{{2}} + x_{{i}}" in program.latex.replace("- ", "-")
    assert r"\frac" not in program.latex.split("Reverse mode")[0]


def test_an_activation_prints_its_constants_as_written(tmp_path):
    text = 'name = "gelu_tanh_act"\nkind = "activation"\nexpr = "0.5*x*(1 + tanh(0.7978845608028654*(x + 0.044715*x**3)))"\n'
    latex = derive_text(tmp_path, text).latex
    assert r"0.7978845608028654 \left(0.044715 x_{n}^{3} + x_{n}\right)" in latex.split("Reverse mode")[0], latex


def test_integer_arithmetic_still_distributes(tmp_path):
    """Only a decimal times a sum is kept as written; sizes and index arithmetic
    (2*(h + 1)) are SymPy's usual canonical sums."""
    program = derive_text(tmp_path, layer_toml("d", '{ x = "N" }', '{ y = "M" }', ["y[h] = x[2*(h + 1)] * 3*(h + 2)"],
                                               extra='dims = { M = "(N - 2)//2" }'))
    (fwd,) = program.forward
    (read,) = fwd.body.atoms(sympy.Indexed)
    h = fwd.free[0].index
    assert read.indices == (2 * h + 2,)


@pytest.mark.parametrize("value", ["1/2", "3/4", "1/3", "2/7"])
def test_other_fractions_stay_fractions(value):
    from derive.latex import tex

    x = sympy.Symbol("x", real=True)
    assert r"\frac" in tex(sympy.Rational(value) * x)


GELU_TANH = ["y[i] = 0.5*x[i]*(1 + tanh(sqrt(2/pi)*(x[i] + 0.044715*x[i]**3)))",
             "y[i] = 0.5*x[i]*(1 + tanh(0.7978845608028654*(x[i] + 0.044715*x[i]**3)))"]


@pytest.mark.parametrize("form", [0, 1], ids=["sqrt-2-over-pi", "numeric-constant"])
def test_gelu_tanh_prints_its_constants_as_written_and_matches_torch(build, rng, target, form):
    """GELU's tanh approximation as in its paper: the spec's constants print as written
    in the forward definition (a number times a sum is not distributed), what is computed
    from them prints as decimals (3 * 0.044715 = 0.134145), never as a fraction, and the
    kernels hold typed literals."""
    text = layer_toml(f"gelu_tanh{form}", '{ x = "N" }', '{ y = "N" }', [GELU_TANH[form]])
    module = build(f"gelu_tanh{form}", text)
    latex = module.op().latex()
    spec_line = latex.split("Reverse mode")[0]
    assert "0.5" in spec_line and "0.044715 x_{i}^{3}" in spec_line, spec_line
    if form == 1:
        assert r"0.7978845608028654 \left(0.044715 x_{i}^{3} + x_{i}\right)" in spec_line, spec_line
    else:
        assert "0.134145" in latex
    assert "8943" not in latex and "26829" not in latex and "00000000" not in latex
    source = Path(module.__file__).read_text()
    assert "_F(0.5)" in source and "8943" not in source
    if form == 1:  # the kernel's docstring quotes every digit written
        assert "0.7978845608028654*(0.044715*x[i]**3 + x[i])" in source
    op = module.op(target=target)
    x, gy = rng.normal(size=9) * 3, rng.normal(size=9)
    t = torch.tensor(x, requires_grad=True)
    y = F.gelu(t, approximate="tanh")
    ref.assert_close(op.forward(x), y.detach().numpy(), np.float64, "forward")
    ref.assert_close(op.backward(gy, x), torch.autograd.grad(y, t, torch.tensor(gy))[0].numpy(), np.float64, "backward")


@pytest.mark.parametrize("decimal, exact", [
    ("0.5*x[i]**2", "x[i]**2/2"),
    ("2.0*x[i]**3 / 6.0", "x[i]**3/3"),
    ("x[i]**0.5", "sqrt(x[i])"),
    ("x[i]**1.5 / 1.5", "2*x[i]**(3/2)/3"),
    ("0.25*(2*x[i] + 2.0)**2", "(2*x[i] + 2)**2/4"),
    ("exp(-0.5*x[i]**2)", "exp(-x[i]**2/2)"),
], ids=["half-square", "integral-floats", "square-root", "three-halves", "scaled-square", "gaussian"])
def test_decimal_arithmetic_simplifies_as_exact_arithmetic(tmp_path, decimal, exact):
    """Integral floats are integers and exponents are exact rationals, so a gradient
    written with decimals comes out as the one written with fractions (x, not 1.0*x;
    sqrt, not **0.5), up to the value of each remaining coefficient."""

    def gradient(rhs, name):
        program = derive_text(tmp_path, layer_toml("f", '{ x = "N" }', '{ y = "N" }', [f"y[i] = {rhs}"]), name)
        return [a.body for a in program.backward], program.latex

    (with_decimals,), latex = gradient(decimal, "decimal")
    (with_fractions,), _ = gradient(exact, "exact")
    as_exact = with_decimals.xreplace({f: sympy.Rational(repr(float(f))) for f in with_decimals.atoms(sympy.Float)})
    assert as_exact == with_fractions, (with_decimals, with_fractions)
    assert "1.0" not in latex and "^{0.5}" not in latex, latex


# ------------------------------------------------------------------ derivatives of kinks

# spec expression of x (any real) or p (positive) -> the same function in PyTorch; the
# points include the kinks (0 for abs and sign, integers for floor, p = 1 for |log p|)
KINKS = {
    "floor(x[i]) * x[i] + sign(x[i]) * x[i]**2": lambda x, p: torch.floor(x) * x + torch.sign(x) * x**2,
    "floor(log(p[i])) * p[i]": lambda x, p: torch.floor(torch.log(p)) * p,
    "(x[i] // 0.5) * x[i]": lambda x, p: torch.floor(x / 0.5) * x,
    "x[i] % (1 + x[i]**2)": lambda x, p: torch.remainder(x, 1 + x**2),
    "log(p[i]) % 1 + p[i]": lambda x, p: torch.remainder(torch.log(p), 1) + p,
    "abs(log(p[i]))": lambda x, p: torch.abs(torch.log(p)),
    "abs(sqrt(p[i])) * p[i]": lambda x, p: torch.abs(torch.sqrt(p)) * p,
    "abs(p[i]**1.5)": lambda x, p: torch.abs(p**1.5),
    "abs(log1p(p[i]))": lambda x, p: torch.abs(torch.log1p(p)),
    "sign(sqrt(p[i])) * p[i]**2": lambda x, p: torch.sign(torch.sqrt(p)) * p**2,
    "sign(sigmoid(x[i]) - 0.5) * x[i]": lambda x, p: torch.sign(torch.sigmoid(x) - 0.5) * x,
    "abs(x[i])": lambda x, p: torch.abs(x),
    "abs(atan(x[i])) * sign(x[i])": lambda x, p: torch.abs(torch.atan(x)) * torch.sign(x),
    "where(x[i] > 0, x[i]**2, -x[i])": lambda x, p: torch.where(x > 0, x**2, -x),
    "relu(x[i]) + abs(relu(x[i]) - 1)": lambda x, p: torch.relu(x) + torch.abs(torch.relu(x) - 1),
}


def test_kinks_differentiate_as_pytorch_does(build, rng, target):
    """Piecewise-constant functions (floor, sign, ``//``) have derivative 0, as
    torch.floor/sign; ``%`` has torch.remainder's; |u| has sign(u), 0 at u = 0, for any
    real u (SymPy's own Abs assumed a complex argument: |log p| came out as 0/0 at p = 1,
    other forms with re/im/atan2). Each output of one spec is one form, seeded alone."""
    forms = list(KINKS)
    text = layer_toml("kinks", '{ x = "N", p = "N" }', "{ " + ", ".join(f'y{k} = "N"' for k in range(len(forms))) + " }",
                      [f"y{k}[i] = {f}" for k, f in enumerate(forms)])
    op = build("kinks", text).op(target=target)
    x = np.array([-2.5, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0, 1.7])
    p = np.array([0.25, 0.5, 1.0, 1.0, 2.0, np.e, 3.0, 1.3])
    outs = ref.as_tuple(op.forward(x, p))
    xt, pt = torch.tensor(x, requires_grad=True), torch.tensor(p, requires_grad=True)
    for k, form in enumerate(forms):
        want = KINKS[form](xt, pt)
        ref.assert_close(outs[k], want.detach().numpy(), np.float64, f"forward of {form}")
        seeds = [np.zeros_like(x) for _ in forms]
        seeds[k] = rng.normal(size=x.shape)
        gx, gp = op.backward(*seeds, x, p)
        tx, tp = torch.autograd.grad(want, (xt, pt), torch.tensor(seeds[k]), allow_unused=True)
        for name, got, t in (("x", gx, tx), ("p", gp, tp)):
            expected = np.zeros_like(x) if t is None else t.numpy()
            ref.assert_close(got, expected, np.float64, f"gradient of {form} in {name}")


def test_a_function_without_a_derivative_is_an_error_naming_it():
    """Nothing SymPy leaves unevaluated (a Derivative, a DiracDelta) reaches the printers:
    a Python spec calling a function with no derivative is a SpecError naming the file,
    the equation and the function."""
    from derive import dsl
    from derive.errors import SpecError
    from derive.pipeline import build

    x, y = dsl.tensors("x y")
    (i,) = dsl.indices("i")
    f = sympy.Function("f", real=True)
    op = dsl.layer("opaque", inputs={"x": "N"}, outputs={"y": "N"}, equations=[(y[i], f(x[i]) * x[i] + 1)])
    with pytest.raises(SpecError) as err:
        build(op)
    message = str(err.value)
    assert "cannot differentiate `f(x[i])`" in message and "y[i] = f(x[i])*x[i] + 1" in message, message
    assert err.value.path == op.source


# ------------------------------------------------------------------ indices bound as written


@pytest.mark.parametrize("summand, each", [
    ("w[b,n] / w[b,n]", 1), ("(w[b,n] - w[b,n]) * x[b] + 1", 1), ("where(1 > 2, w[b,n], 3)", 3),
    ("1 + (x[b] - x[b]) * max(w[j,n], j)", 1),  # the max (which binds j) cancels too
], ids=["quotient", "difference", "constant-false-branch", "cancelled-reduction"])
def test_an_index_takes_its_range_from_the_text_as_written(tmp_path, summand, each, rng):
    """``n`` stands alone in ``w[b, n]`` as the spec is written; SymPy cancels the read
    (w/w is 1) before binding, so the range comes from the parser's reads: the sum of
    1 over n is N, not the error that n never stands alone in a read."""
    import codegen

    text = layer_toml("as_written", '{ w = "B N", x = "B" }', '{ y = "B" }', [f"y[b] = sum({summand}, n) + x[b]"])
    path = tmp_path / "as_written.toml"
    path.write_text(text)
    op = codegen.build(str(path), str(tmp_path / "out")).op()
    w, x = rng.uniform(0.5, 2, size=(3, 5)), rng.normal(size=3)
    np.testing.assert_allclose(op.forward(w, x), each * w.shape[1] + x, rtol=1e-14)


def test_an_index_bound_only_in_a_cancelled_read_must_still_be_summed(tmp_path):
    from derive.errors import SpecError

    text = layer_toml("unbound", '{ w = "B N", x = "B" }', '{ y = "B" }', ["y[b] = x[b] + w[b,n] - w[b,n]"])
    with pytest.raises(SpecError, match="index `n` is used but never bound"):
        derive_text(tmp_path, text)


@pytest.mark.parametrize("name", _numeric_functions())
def test_every_function_name_prints_whole(name):
    """A function's name is one word in LaTeX: SymPy read expm1's trailing digit as a
    subscript (\\operatorname{expm}_{1})."""
    from derive.latex import tex

    text = tex(_function_call(name))
    assert "_{" not in text, text
    if name in ("expm1", "log1p"):
        assert r"\operatorname{%s}" % name in text, text


@pytest.mark.parametrize("written, parsed", [
    ("x**0.5", "sqrt(x)"), ("x**1.5", "x**(3/2)"), ("x**-0.25", "x**(-1/4)"), ("x**0.333", "x**(333/1000)"),
    ("x**0.3333333", "x**0.3333333"), ("x**(479425538604203/1000000000000000)", "x**0.479425538604203"),
])
def test_an_exponent_is_exact_unless_its_denominator_is_huge(written, parsed):
    """An exponent as written is exact (sqrt, x**(3/2)); a computed one (sin(0.5)) or a long
    decimal stays a float: SymPy's factor wrote x**(p/q) as a polynomial of degree p in
    x**(1/q), and a build with sqrt(10)**sin(0.5) never finished."""
    from derive.parse import Scope, parse_expression

    scope = Scope("t.toml", symbols={"x": sympy.Symbol("x", real=True)})
    assert str(parse_expression(written, scope)) == parsed
