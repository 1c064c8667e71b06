"""The derivation engine: textbook forms, delta contraction, stability, TOML/Python twins."""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy

import derive
from derive.functions import sigmoid, softplus
from derive.normalize import check_shift_invariance

ROOT = Path(__file__).resolve().parents[1]
LIB = {p.name: p for p in derive.library()}


def _idx(*names):
    return [sympy.Symbol(n, integer=True) for n in names]


def _t(name):
    return sympy.IndexedBase(name, real=True)


def _only_backward(name):
    (assign,) = LIB[name].backward
    return assign


@pytest.mark.parametrize("spec", sorted((ROOT / "specs" / "ops").glob("*.toml")), ids=lambda p: p.stem)
def test_toml_twin_produces_the_same_program_as_the_python_op(spec):
    from_toml = derive.from_file(spec)
    from_python = LIB[from_toml.name]
    assert [a.body for a in from_toml.forward] == [a.body for a in from_python.forward]
    assert [a.body for a in from_toml.backward] == [a.body for a in from_python.backward]
    assert from_toml.latex == from_python.latex


def test_sigmoid_derivative_is_sigma_times_one_minus_sigma():
    (n,) = _idx("n")
    s = sigmoid(_t("x")[n])
    assert _only_backward("sigmoid").body == _t("g_y")[n] * s * (1 - s)


def test_tanh_derivative_is_one_minus_tanh_squared():
    (n,) = _idx("n")
    expected = _t("g_y")[n] * (1 - sympy.tanh(_t("x")[n]) ** 2)
    assert _only_backward("tanh").body == expected


def test_softplus_derivative_is_sigmoid():
    (n,) = _idx("n")
    assert _only_backward("softplus").body == _t("g_y")[n] * sigmoid(_t("x")[n])


def test_softmax_cross_entropy_gradient_is_softmax_minus_target_over_batch():
    b, k = _idx("b", "k")
    (assign,) = LIB["softmax_cross_entropy"].backward
    g = sympy.Symbol("g_loss", real=True)
    B = sympy.Symbol("B", integer=True, positive=True)
    # softmax as exp(logits - max) / sum(exp(logits - max))
    softmax = sympy.exp(_t("logits")[b, k] - _t("loss_max0")[b]) / _t("loss_sumexp0")[b]
    assert assign.reduce == "none"
    # reduction = 1 (PyTorch's "mean", the default) and 2 ("sum")
    (reduction,) = [s for s in assign.body.free_symbols if s.name == "reduction"]
    mean, total = assign.body.subs(reduction, 1), assign.body.subs(reduction, 2)
    assert sympy.simplify(mean - g * (softmax - _t("target")[b, k]) / B) == 0
    assert sympy.simplify(total - g * (softmax - _t("target")[b, k])) == 0


def test_dense_weight_gradient_is_x_transpose_times_output_gradient():
    grads = {a.target: a for a in LIB["dense"].backward}
    gw = grads["g_weight"]
    b, i, o = _idx("b", "i", "o")
    assert gw.reduce == "sum" and [lp.index for lp in gw.over] == [b]
    assert gw.body == _t("x")[b, i] * _t("g_y")[b, o]
    gx = grads["g_x"]
    assert gx.body == _t("g_y")[b, o] * _t("weight")[i, o]


def test_softmax_backward_reuses_the_forward_output():
    grads = LIB["softmax"].backward
    text = " ".join(a.equation for a in grads)
    assert "exp" not in text, text


def test_shift_invariance_of_log_sum_exp_is_proved():
    assert check_shift_invariance()


NAIVE = [
    ("exp(a)/(exp(a)+1)", lambda e: any(
        isinstance(n, sympy.Pow) and n.exp == -1 and isinstance(n.base, sympy.Add) and n.base.has(sympy.exp)
        for n in sympy.preorder_traversal(e))),
    ("log(1+exp(a))", lambda e: any(
        isinstance(n, sympy.log) and n.args[0].has(sympy.exp) for n in sympy.preorder_traversal(e))),
]


@pytest.mark.parametrize("program", [p for p in derive.library() if p.kind not in ("optimizer", "schedule")], ids=lambda p: p.name)
def test_no_kernel_computes_a_naive_unstable_form(program):
    for assign in program.forward + program.backward:
        for what, found in NAIVE:
            assert not found(assign.body), f"{program.name}: {what} in {assign.equation}"
    # every log-sum-exp is shifted by a stop-gradient maximum
    for assign in program.forward:
        if assign.reduce == "sum" and isinstance(assign.body, sympy.exp):
            assert any("_max" in str(r.base) for r in assign.body.atoms(sympy.Indexed)), assign.equation


CONV_SPEC = """
name = "conv1d"
kind = "layer"
attrs = { S = 2, P = 1 }
inputs = { x = "N C L" }
params = { weight = "O C K" }
outputs = { y = "N O LO" }
dims = { LO = "(L + 2*P - K) // S + 1" }
equations = ["y[n,o,l] = sum(x[n,c,l*S+k-P] * weight[o,c,k], c, k)"]
"""


def test_strided_padded_read_contracts_to_a_transposed_window(tmp_path):
    path = tmp_path / "conv1d.toml"
    path.write_text(CONV_SPEC)
    program = derive.from_file(path)
    gx = next(a for a in program.backward if a.target == "g_x")
    # k was solved from the read's delta; o and l remain, l with bounds tightened by the window
    assert [lp.index.name for lp in gx.over] == ["o", "l"]
    l_loop = gx.over[1]
    assert l_loop.lo != 0 and l_loop.hi != sympy.Symbol("LO", integer=True, positive=True)
    assert "k" not in {s.name for s in gx.body.free_symbols}


def test_library_derivation_is_deterministic():
    from derive.pipeline import build

    first = [build(op).latex for op in derive.library_defs()[:12]]
    second = [build(op).latex for op in derive.library_defs()[:12]]
    assert first == second


# ---------------------------------------------------------------- statistics' gradients
# (derive/statistics.py: a gradient of a statistic read by one elementwise gradient is
# substituted into it as a sum, re-expressed through the forward and lifted again)

INSTANCE_NORM_SPEC = """
name = "instance_norm"
kind = "layer"
inputs = { x = "N C L" }
outputs = { y = "N C L" }
attrs = { eps = 1e-5 }
equations = [
  "mean[n,c] = sum(x[n,c,l], l) / L",
  "var[n,c] = sum((x[n,c,l] - mean[n,c])**2, l) / L",
  "rstd[n,c] = 1 / sqrt(var[n,c] + eps)",
  "y[n,c,l] = (x[n,c,l] - mean[n,c]) * rstd[n,c]",
]
"""


def _spec(tmp_path, text, name):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _grads(program):
    return {a.target: a for a in program.backward}


def test_layer_norm_backward_is_the_textbook_form():
    b, d = _idx("b", "d")
    D = sympy.Symbol("D", integer=True, positive=True)
    grads = _grads(LIB["layer_norm"])
    gy, w, xhat, rstd = _t("g_y")[b, d], _t("weight")[d], _t("xhat")[b, d], _t("rstd")[b]
    s0, s1 = grads["g_x_sum0"], grads["g_x_sum1"]
    assert [lp.index for lp in s0.over] == [d] and s0.body == gy * w
    assert [lp.index for lp in s1.over] == [d] and s1.body == gy * w * xhat
    expected = rstd * (gy * w - _t("g_x_sum0")[b] / D - xhat * _t("g_x_sum1")[b] / D)
    assert sympy.expand(grads["g_x"].body - expected) == 0


def test_statistics_gradients_are_not_materialised():
    for name in ("layer_norm", "batch_norm2d"):
        targets = {a.target for a in LIB[name].backward}
        assert not targets & {"g_mean", "g_var", "g_rstd"}, (name, sorted(targets))


def test_a_sum_the_backward_already_computes_is_read():
    """batch norm's remaining sums over (n, h, w) are exactly g_bias and g_weight."""
    n, c, h, w = _idx("n", "c", "h", "w")
    M = sympy.Mul(*[sympy.Symbol(s, integer=True, positive=True) for s in "NHW"])
    grads = _grads(LIB["batch_norm2d"])
    assert set(grads) == {"g_bias", "g_weight", "g_x"}
    xhat = _t("xhat")[n, c, h, w]
    expected = _t("rstd")[c] * _t("weight")[c] * (
        _t("g_y")[n, c, h, w] - _t("g_bias")[c] / M - xhat * _t("g_weight")[c] / M)
    assert sympy.expand(grads["g_x"].body - expected) == 0


def test_forward_reuse_takes_a_power_apart_across_a_sum():
    from derive.normalize import Stmt
    from derive.statistics import reuse_in_product

    b, d, e = _idx("b", "d", "e")
    x, m, r = _t("x"), _t("mean"), _t("rstd")
    xhat = Stmt("xhat", (b, d), (x[b, d] - m[b]) * r[b])
    product = -(x[b, d] - m[b]) * r[b] ** 3 * (m[b] - x[b, e]) * _t("g_y")[b, e]
    assert reuse_in_product(product, [xhat]) == _t("xhat")[b, d] * _t("xhat")[b, e] * r[b] * _t("g_y")[b, e]


def test_forward_reuse_leaves_a_product_missing_a_factor():
    from derive.normalize import Stmt
    from derive.statistics import reuse_in_product

    b, d = _idx("b", "d")
    x, m, r = _t("x"), _t("mean"), _t("rstd")
    xhat = Stmt("xhat", (b, d), (x[b, d] - m[b]) * r[b])
    product = (x[b, d] - m[b]) / r[b]  # rstd with the opposite sign of exponent
    assert reuse_in_product(product, [xhat]) == product


def test_a_statistic_gradient_read_twice_is_kept():
    """attention's sum_s g_prob prob is read by g_q and g_k: substituting it would compute it twice.
    The factor -1/sum(exp) its chain rule carries cancels in the readers (simplify.factor_out_of_sums):
    the textbook (g_prob - sum_s g_prob prob) prob, as PyTorch computes it."""
    grads = {a.target: a for a in LIB["scaled_dot_product_attention"].backward}
    b, l, s = _idx("b", "l", "s")
    named = grads["g_prob_sumexp0_sum0"]
    assert named.body == _t("g_prob")[b, l, s] * _t("prob")[b, l, s]
    for g in ("g_q", "g_k"):
        assert (_t("g_prob")[b, l, s] - _t("g_prob_sumexp0_sum0")[b, l]) in grads[g].body.args, grads[g].equation


def test_softmax_backward_is_y_times_output_gradient_minus_its_weighted_sum():
    b, c, k = _idx("b", "c", "k")
    grads = _grads(LIB["softmax"])
    s = grads["g_x_sum0"]
    assert [lp.index for lp in s.over] == [c] and s.body == _t("g_y")[b, c] * _t("y")[b, c]
    expected = _t("y")[b, k] * (_t("g_y")[b, k] - _t("g_x_sum0")[b])
    assert sympy.expand(grads["g_x"].body - expected) == 0


def test_statistics_substitution_is_recorded_in_the_derivation():
    tex = LIB["layer_norm"].latex
    steps = ["reads the gradients of the statistics", "Substitute them as the sums over primed indices",
             "Move the factors free of the summation indices out of the sums",
             r"Reuse the forward's $\mathrm{xhat}$ on both sides of the sums",
             r"Collect the common factor $\mathrm{rstd}_{b}$", "Name the remaining sums", "The compact form"]
    positions = [tex.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), list(zip(steps, positions))
    assert r"\sum_{d'}" in tex and r"\Sigma^{(0)}_{b} = \sum_{d}" in tex


def test_term_helpers_shared_by_the_passes():
    from types import SimpleNamespace

    from derive.terms import fresh_index, is_full_sum, split_factors

    i, j, o = _idx("i", "j", "o")
    N, M = (sympy.Symbol(n, integer=True, positive=True) for n in "NM")
    stmt = SimpleNamespace(ranges={i: N, j: M})

    def term(loops, guards=(), scatter=()):
        return SimpleNamespace(loops=loops, guards=list(guards), scatter=scatter, stmt=stmt)

    assert is_full_sum(term([(i, 0, N), (j, 0, M)]))
    assert not is_full_sum(term([]))  # elementwise
    assert not is_full_sum(term([(i, 1, N)]))  # part of the range
    assert not is_full_sum(term([(i, 0, M)]))
    assert not is_full_sum(term([(i, 0, N)], guards=["a guard"]))
    assert not is_full_sum(term([(i, 0, N)], scatter=(o,)))
    x, w = _t("x"), _t("w")
    body = 3 * w[o] * x[o, i] * sympy.exp(x[o, j])
    assert split_factors(body, [i, j]) == (3 * w[o], x[o, i] * sympy.exp(x[o, j]))
    taken = {"h"}
    assert [fresh_index(b, taken).name for b in ("c", "h", "h")] == ["c", "h1", "h2"]
    assert taken == {"c", "h", "h1", "h2"} and fresh_index("k", set()).is_integer


def test_statistics_and_simplify_share_one_copy_of_the_term_helpers():
    """What a plain full sum is, how a summand splits at its summation indices and how a
    new index is named are decided once (derive/terms.py), not once per pass."""
    import ast

    from derive import differentiate, simplify, statistics, terms

    assert simplify.is_full_sum is statistics.is_full_sum is terms.is_full_sum
    assert simplify.split_factors is statistics.split_factors is terms.split_factors
    assert differentiate.fresh_index is statistics.fresh_index is terms.fresh_index


@pytest.mark.parametrize("package", ["derive", "codegen"])
def test_no_module_imports_another_modules_private_names(package):
    """What one module uses of another is that module's public interface."""
    import ast

    private = []
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private += [(path.name, node.module, a.name) for a in node.names if a.name.startswith("_")]
    assert private == []


def test_statistics_of_a_new_spec_reach_the_compact_form(tmp_path):
    """The step is general: instance norm (statistics over the last axis of N C L, lifted
    with their indices in another order) comes out compact with no op-specific code."""
    program = derive.from_file(_spec(tmp_path, INSTANCE_NORM_SPEC, "instance_norm"))
    grads = _grads(program)
    assert set(grads) == {"g_x_sum0", "g_x_sum1", "g_x"}
    n, c, l = _idx("n", "c", "l")
    L = sympy.Symbol("L", integer=True, positive=True)
    y = _t("y")[n, c, l]
    expected = _t("rstd")[n, c] * (_t("g_y")[n, c, l] - _t("g_x_sum0")[n, c] / L - y * _t("g_x_sum1")[n, c] / L)
    assert sympy.expand(grads["g_x"].body - expected) == 0


def test_compact_instance_norm_backward_matches_pytorch(tmp_path):
    import numpy as np
    import torch

    import codegen

    module = codegen.build(_spec(tmp_path, INSTANCE_NORM_SPEC, "instance_norm"), tmp_path / "out")
    op = module.op("instance_norm")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5)) * 3 + 1
    gy = rng.normal(size=(2, 3, 5))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.instance_norm(xt, eps=1e-5)
    yt.backward(torch.tensor(gy))
    np.testing.assert_allclose(op.forward(x), yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    gx = op.backward(gy, x)  # one differentiable argument: one array
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-8, atol=1e-10)


def test_padding_guards_print_as_ranges():
    """A zero-padded read's four inequalities read as two ranges, 0 <= e < H."""
    from derive.latex import tex

    P, S, h, p, H, w, q, W, n = sympy.symbols("P S h p H w q W n")
    row, col = -P + S * h + p, -P + S * w + q
    guard = sympy.And(row >= 0, col >= 0, H > row, W > col, sympy.Eq(n, 1))
    text = tex(sympy.Piecewise((1, guard), (0, True)))
    assert rf"0 \le {tex(row)} < H" in text and rf"0 \le {tex(col)} < W" in text
    assert "n = 1" in text and r"\geq" not in text and ">" not in text


def test_conv2d_derivation_writes_its_padding_as_ranges():
    text = LIB["conv2d"].latex
    assert r"0 \le DH p - PH + SH h < H" in text and r"0 \le DW q - PW + SW w < W" in text
    assert r"\geq 0" not in text
