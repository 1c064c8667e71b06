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
    softmax = sympy.exp(_t("logits")[b, k] - _t("loss_lse0")[b])
    assert assign.reduce == "none"
    assert sympy.simplify(assign.body - g * (softmax - _t("target")[b, k]) / B) == 0


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
