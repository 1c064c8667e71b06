"""codegen's lowering: GEMM detection, fusion of elementwise statements, scalar locals,
dead-code elimination, and CSE that never hoists a guarded read out of its guard."""

from __future__ import annotations

import dataclasses
import functools
import keyword
import re

import numpy as np
import pytest
import sympy

import reference as ref
from codegen.lower import Lowerer, match_gemm
from derive.ir import Assign, Loop, Program, TensorDecl, dim, index

B, I, O = dim("B"), dim("I"), dim("O")
b, i, o = index("b"), index("i"), index("o")
x, w, y, gy, bias = (sympy.IndexedBase(n) for n in ("x", "w", "y", "gy", "bias"))


def _program(forward, tensors, **kw):
    args = tuple(t for t in tensors if t.role in ("input", "param"))
    outs = tuple(t for t in tensors if t.role == "output")
    inter = tuple(t for t in tensors if t.role == "intermediate")
    return Program(
        name="t", kind="layer", source="test", dims=(B, I, O), derived_dims=(), attrs=(),
        args=args, outputs=outs, intermediates=inter, forward=tuple(forward), **kw,
    )


TENSORS = [
    TensorDecl("x", (B, I), "input"),
    TensorDecl("w", (I, O), "param"),
    TensorDecl("wt", (O, I), "param"),
    TensorDecl("bias", (O,), "param"),
    TensorDecl("y", (B, O), "output"),
    TensorDecl("z", (B, O), "intermediate"),
]
BO = (Loop(b, 0, B), Loop(o, 0, O))


def test_gemm_detected_in_any_read_order_with_transposes():
    p = _program([], TENSORS)
    g = match_gemm(p, Assign("y", BO, 2 * x[b, i] * w[i, o], "sum", (Loop(i, 0, I),)))
    assert g and (g.left, g.left_t, g.right, g.right_t) == ("x", False, "w", False)
    wt = sympy.IndexedBase("wt")
    g = match_gemm(p, Assign("y", BO, wt[o, i] * x[b, i], "sum", (Loop(i, 0, I),)))
    assert g and (g.left, g.left_t, g.right, g.right_t) == ("x", False, "wt", True)


def test_not_gemm():
    p = _program([], TENSORS)
    k = (Loop(i, 0, I),)
    assert match_gemm(p, Assign("y", BO, x[b, i] * w[i, o] * x[b, i], "sum", k)) is None  # three reads
    assert match_gemm(p, Assign("y", BO, x[b, i] + w[i, o], "sum", k)) is None  # not a product
    assert match_gemm(p, Assign("y", BO, x[b, i] * w[i, o], "sum", (Loop(i, 1, I),))) is None  # partial range
    assert match_gemm(p, Assign("y", BO, sympy.exp(x[b, i]) * w[i, o], "sum", k)) is None


def test_gemm_epilogue_fused_and_intermediate_local():
    fwd = [
        Assign("z", BO, x[b, i] * w[i, o], "sum", (Loop(i, 0, I),)),
        Assign("y", BO, sympy.tanh(sympy.IndexedBase("z")[b, o] + bias[o])),
    ]
    (k,) = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "_t_fwd")
    assert k.gemm is not None
    assert [it.target for it in k.items] == ["z", "y"]
    assert not k.items[0].store and k.items[1].store  # z lives in a register only
    assert "z" not in k.arrays


def test_fusion_requires_same_index_reads():
    z = sympy.IndexedBase("z")
    fwd = [
        Assign("z", BO, sympy.exp(x[b, o])),
        Assign("y", BO, z[b, o] * 2),
    ]
    assert len(Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")) == 1
    shifted = [
        Assign("z", BO, sympy.exp(x[b, o])),
        Assign("y", BO, z[b, O - 1 - o] * 2),  # reads another element of z
    ]
    assert len(Lowerer(_program(shifted, TENSORS)).lower(shifted, ["y"], "k")) == 2


def test_dead_statements_dropped():
    fwd = [
        Assign("z", BO, sympy.exp(x[b, o])),
        Assign("y", BO, x[b, o] * 2),
    ]
    (k,) = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")
    assert [it.target for it in k.items] == ["y"]


def test_cse_keeps_guarded_reads_behind_their_guard():
    n = index("n")
    guarded = sympy.Piecewise((x[b, n - 1], n - 1 >= 0), (0, True))
    fwd = [Assign("y", (Loop(b, 0, B), Loop(n, 0, O)), guarded * guarded + guarded * x[b, n - 1] ** 0)]
    (k,) = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")
    for t in k.items[0].pre:
        # any temporary holding the read must hold the whole ternary
        if t.expr.atoms(sympy.Indexed):
            assert isinstance(t.expr, sympy.Piecewise), t.expr


def test_temporaries_numbered_in_order():
    fwd = [Assign("y", BO, sympy.exp(x[b, o]) * sympy.sin(sympy.exp(x[b, o])) + sympy.sin(sympy.exp(x[b, o])))]
    (k,) = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")
    assert [t.sym.name for t in k.items[0].pre] == ["_t0", "_t1"]


def test_gemm_without_epilogue_writes_the_output_directly():
    fwd = [Assign("y", BO, x[b, i] * w[i, o], "sum", (Loop(i, 0, I),))]
    (k,) = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")
    assert k.gemm.out == "y" and k.gemm.direct


def test_gemm_output_not_reused_when_its_old_value_is_read():
    fwd = [
        Assign("y", BO, x[b, o]),
        Assign("y", BO, x[b, i] * w[i, o], "sum", (Loop(i, 0, I),), accumulate=True),
    ]
    kernels = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")
    assert kernels[-1].gemm is not None and kernels[-1].gemm.out is None


def test_column_sum_runs_reduction_loop_outside():
    from codegen.emit import reduce_outer

    tensors = TENSORS + [TensorDecl("gb", (O,), "output")]
    col = [Assign("gb", (Loop(o, 0, O),), x[b, o], "sum", (Loop(b, 0, B),))]
    (k,) = Lowerer(_program(col, tensors)).lower(col, ["gb"], "k")
    assert reduce_outer(k)
    row = [Assign("z", (Loop(b, 0, B),), x[b, o], "sum", (Loop(o, 0, O),))]
    tensors = TENSORS[:-1] + [TensorDecl("z", (B,), "output")]
    (k,) = Lowerer(_program(row, tensors)).lower(row, ["z"], "k")
    assert not reduce_outer(k)


def test_column_sums_fused_in_one_kernel_run_their_reduction_loop_outside_together():
    """Two sums over the batch (a norm's g_bias and g_weight) share one kernel; both
    accumulate in the order the arrays lie in memory."""
    from codegen.emit import reduce_outer

    tensors = TENSORS + [TensorDecl("gb", (O,), "output"), TensorDecl("gw", (O,), "output")]
    sums = [
        Assign("gb", (Loop(o, 0, O),), gy[b, o], "sum", (Loop(b, 0, B),)),
        Assign("gw", (Loop(o, 0, O),), gy[b, o] * x[b, o], "sum", (Loop(b, 0, B),)),
    ]
    tensors = [t for t in tensors if t.name != "gy"] + [TensorDecl("gy", (B, O), "input")]
    kernels = Lowerer(_program(sums, tensors)).lower(sums, ["gb", "gw"], "k")
    assert len(kernels) == 1 and len(kernels[0].items) == 2
    assert reduce_outer(kernels[0])


def test_layer_norm_parameter_gradients_walk_the_batch_outside():
    import generated.layers.layer_norm as layers

    src = layers._layer_norm_bwd1.py_func.__code__.co_filename
    text = open(src).read()
    body = text[text.index("def _layer_norm_bwd1("):].split("\n\n\n")[0]
    loops = [line.strip() for line in body.splitlines() if line.strip().startswith("for ")]
    assert loops == ["for d in range(0, D):", "for b in range(0, B):", "for d in range(0, D):"], body


# --------------------------------------------------------------------------- contractions (CPU)
# codegen/contract.py: sums of two operands become BLAS products per batch element.

N_, C_, H_, W_, KH, KW, HO, WO = (dim(n) for n in ("N", "C", "H", "W", "KH", "KW", "HO", "WO"))
L_, S_, D_ = dim("L"), dim("S"), dim("D")
n, c, h, w_, p, q, l, s, d = (index(v) for v in ("n", "c", "h", "w", "p", "q", "l", "s", "d"))
STRIDE, PAD = sympy.Symbol("Sd", integer=True, positive=True), sympy.Symbol("Pd", integer=True)
qt, kt, x4, w4, y4 = (sympy.IndexedBase(v) for v in ("q", "k", "x4", "w4", "y4"))

ATTN = [
    TensorDecl("q", (B, L_, D_), "input"),
    TensorDecl("k", (B, S_, D_), "input"),
    TensorDecl("r", (B, L_, S_), "output"),
]
RAW = Assign("r", (Loop(b, 0, B), Loop(l, 0, L_), Loop(s, 0, S_)), qt[b, l, d] * kt[b, s, d], "sum", (Loop(d, 0, D_),))

CONV = [
    TensorDecl("x4", (N_, C_, H_, W_), "input"),
    TensorDecl("w4", (O, C_, KH, KW), "param"),
    TensorDecl("y4", (N_, O, HO, WO), "output"),
]
HI, WI = STRIDE * h + p - PAD, STRIDE * w_ + q - PAD
PATCH = sympy.Piecewise((x4[n, c, HI, WI], (HI >= 0) & (WI >= 0) & (H_ > HI) & (W_ > WI)), (0, True))
CONV_FWD = Assign(
    "y4",
    (Loop(n, 0, N_), Loop(o, 0, O), Loop(h, 0, HO), Loop(w_, 0, WO)),
    PATCH * w4[o, c, p, q],
    "sum",
    (Loop(c, 0, C_), Loop(p, 0, KH), Loop(q, 0, KW)),
)


def _contract_kernel(stmt, tensors, contract=True):
    (k,) = Lowerer(_program([stmt], tensors), contract=contract).lower([stmt], [stmt.target], "k")
    return k


def test_batched_product_is_one_gemm_per_batch_element_on_views():
    plan = _contract_kernel(RAW, ATTN).contract
    assert [l.index for l in plan.outer] == [b] and not plan.kouter
    assert (plan.left.name, plan.left.view, plan.left.trans) == ("q", True, False)  # q[b] is (L, D)
    assert (plan.right.name, plan.right.view, plan.right.trans) == ("k", True, True)  # k[b].T is (D, S)
    assert plan.out == "r"  # written straight into r[b]


def test_contractions_stay_loops_without_contract():
    k = _contract_kernel(RAW, ATTN, contract=False)
    assert k.contract is None and k.gemm is None and k.items[0].over


def test_affine_reads_are_gathered_into_a_patch_matrix():
    plan = _contract_kernel(CONV_FWD, CONV).contract
    assert [l.index for l in plan.outer] == [n]
    assert (plan.left.name, plan.left.view, plan.left.trans) == ("w4", True, False)  # w4 as (O, C*KH*KW)
    patch = plan.right  # (C*KH*KW, HO*WO) per image: im2col
    assert not patch.view and [l.index for l in patch.rows + patch.cols] == [c, p, q, h, w_]
    assert plan.out == "y4"


def test_patch_gather_splits_its_innermost_loop_by_the_guard():
    span = _contract_kernel(CONV_FWD, CONV).contract.right.span
    assert span.var == w_
    # -Pd + Sd*w + q >= 0 and W > -Pd + Sd*w + q become the span; h's conditions a row test
    assert sorted(a for a, _ in span.bounds) == sorted([STRIDE, -STRIDE], key=str)
    assert span.row.has(h) and not span.row.has(w_) and span.rest is sympy.true


def test_unguarded_gather_keeps_no_ternary_inside_the_span():
    op = _contract_kernel(CONV_FWD, CONV).contract.right
    assert not op.value.atoms(sympy.Piecewise) and op.value.atoms(sympy.Indexed)


def test_epilogue_joins_a_contraction_in_another_index_order():
    z = sympy.IndexedBase("z")
    tensors = CONV + [TensorDecl("z", (HO, N_, O, WO), "intermediate"), TensorDecl("bias", (O,), "param")]
    z_stmt = Assign("z", (Loop(h, 0, HO), Loop(n, 0, N_), Loop(o, 0, O), Loop(w_, 0, WO)), CONV_FWD.body, "sum", CONV_FWD.over)
    y_stmt = Assign("y4", CONV_FWD.free, bias[o] + z[h, n, o, w_])
    (k,) = Lowerer(_program([z_stmt, y_stmt], tensors), contract=True).lower([z_stmt, y_stmt], ["y4"], "k")
    assert [it.target for it in k.items] == ["z", "y4"] and not k.items[0].store  # z is a register
    assert k.items[1].index == (n, o, h, w_) and k.contract.out == "y4"


def test_summation_index_outside_the_product_accumulates():
    tensors = CONV + [TensorDecl("gw", (O, C_, KH, KW), "output")]
    stmt = Assign(
        "gw",
        (Loop(o, 0, O), Loop(c, 0, C_), Loop(p, 0, KH), Loop(q, 0, KW)),
        PATCH * y4[n, o, h, w_],
        "sum",
        (Loop(h, 0, HO), Loop(n, 0, N_), Loop(w_, 0, WO)),
    )
    plan = _contract_kernel(stmt, tensors).contract
    # n leads both reads: looping over it outside makes y4[n] a view (O, HO*WO)
    assert [l.index for l in plan.kouter] == [n] and plan.left.view and plan.left.name == "y4"
    assert plan.out is None  # products accumulate in a buffer first


def test_three_operand_sum_stays_loops():
    v, u = index("v"), index("u")
    A, xx, ww = sympy.IndexedBase("A"), sympy.IndexedBase("xx"), sympy.IndexedBase("ww")
    tensors = [
        TensorDecl("A", (B, B), "input"),
        TensorDecl("xx", (B, I), "input"),
        TensorDecl("ww", (I, O), "param"),
        TensorDecl("y", (B, O), "output"),
    ]
    stmt = Assign("y", (Loop(v, 0, B), Loop(o, 0, O)), A[v, u] * xx[u, i] * ww[i, o], "sum", (Loop(u, 0, B), Loop(i, 0, I)))
    assert _contract_kernel(stmt, tensors).contract is None


def test_sum_of_one_operand_is_a_reduction_not_a_contraction():
    norm = Assign("z", (Loop(b, 0, B),), x[b, i] * x[b, i], "sum", (Loop(i, 0, I),))
    tensors = TENSORS[:-1] + [TensorDecl("z", (B,), "output")]
    assert _contract_kernel(norm, tensors).contract is None


# ------------------------------------------------------------------ gather to scatter
# A square-stride convolution without dilation or groups (the library's conv2d before it
# took them): derive writes its input gradient as a windowed gather, which these tests
# follow to the scatter of one BLAS product per image. The library's conv2d (per-axis
# stride and dilation) takes the strided form instead: test_strided_gather_... below.
PLAIN_CONV = """
name = "conv2d"
kind = "layer"
attrs = { S = 1, P = 0 }
inputs = { x = "N C H W" }
params = { weight = "O C KH KW", bias = "O" }
outputs = { y = "N O HO WO" }
dims = { HO = "(H + 2*P - KH) // S + 1", WO = "(W + 2*P - KW) // S + 1" }
equations = ["y[n,o,h,w] = sum(x[n, c, h*S + p - P, w*S + q - P] * weight[o,c,p,q], c, p, q) + bias[o]"]
"""


@functools.lru_cache(maxsize=None)
def _conv_program():
    import tomllib

    from derive import build
    from derive.spec import from_dict

    return build(from_dict(tomllib.loads(PLAIN_CONV), "plain_conv.toml"))


@functools.lru_cache(maxsize=None)
def _library_conv_program():
    from derive import build
    from derive.ops import conv

    (opdef,) = [o for o in conv.OPS if o.name == "conv2d"]
    return build(opdef)


def test_strided_gather_becomes_a_scatter_of_a_gemm_per_image_and_group():
    """The library's conv2d has a stride and a dilation per axis: derive writes the input
    gradient with the output position solved for, ``g_z[n, g, j, floor((h1 + PH - DH*p)/SH), ...]``
    under ``Mod(h1 + PH - DH*p, SH) == 0``. The CPU computes it as one np.dot per image and
    group added into g_xg (contract.floor_to_scatter), not as loops."""
    from codegen.emit import OpPlan

    (kernels,) = [ks for entry, ks, _, _ in OpPlan(_library_conv_program()).entries["cpu"] if entry == "bwd"]
    (k,) = [k for k in kernels if [it.target for it in k.items] == ["g_xg"]]
    c = k.contract
    assert c is not None and c.scatter and not k.items[0].over
    assert (c.left.view, c.right.view) == (True, True)  # wg[g] and g_z[n, g], no gather
    assert [l.index.name for l in c.outer] == ["n", "g"] and [l.index.name for l in c.k] == ["j"]
    # and the weight gradient: one product per image and group, accumulated
    (k,) = [k for k in kernels if [it.target for it in k.items] == ["g_wg"]]
    assert k.contract is not None and not k.items[0].over


def _conv_input_grad(program):
    (stmt,) = [s for s in program.backward if s.target == "g_x"]
    return stmt


def test_windowed_gather_becomes_a_scatter_of_a_gemm():
    from codegen import contract as cn

    program = _conv_program()
    stmt = _conv_input_grad(program)
    lw = Lowerer(program, contract=True)
    m = cn.match(stmt, lw.decls, lw.typer.is_int)
    assert m is not None and m.zero == "g_x" and m.stmt.scatter  # g_x[n, c, S*h + kh - P, ...] +=
    assert all(l.lo == 0 and not l.hi.free_symbols & {l2.index for l2 in m.stmt.free} for l in m.stmt.free)
    assert {l.index.name for l in m.stmt.over} == {"o"}  # the product's K; h, w are iterated


def test_window_not_implied_by_the_guard_is_not_rewritten():
    from codegen import contract as cn

    program = _conv_program()
    stmt = _conv_input_grad(program)
    (factor,) = [f for f in sympy.Mul.make_args(stmt.body) if isinstance(f, sympy.Piecewise)]
    unguarded = stmt.body.xreplace({factor: factor.args[0].expr})  # the read without its guard
    lw = Lowerer(program, contract=True)
    assert cn.to_scatter(dataclasses.replace(stmt, body=unguarded), lw.decls, lw.typer.is_int) is None


def _kernel_source(text, target):
    """The emitted CPU kernel whose docstring starts with ``target[``."""
    chunks = text.split("\n@njit")[1:]  # each: (options), def, docstring, body
    (source,) = [c for c in chunks if c.split("\n")[2].strip().startswith('"""%s[' % target)]
    return source


def test_conv2d_input_gradient_is_a_blas_product_per_image_not_loops():
    """The CPU backward of conv2d computes g_x (a transposed convolution) as one np.dot
    per image added into g_x (col2im). That takes the scatter rewrite, which accepts the
    windows only in the bound forms derive writes (contract._implied_bounds re-derives
    differentiate.tighten's): should the two drift apart, g_x falls back to loops
    without an error, and this test is what notices."""
    from codegen.emit import OpPlan

    (kernels,) = [ks for entry, ks, _, _ in OpPlan(_conv_program()).entries["cpu"] if entry == "bwd"]
    (k,) = [k for k in kernels if [it.target for it in k.items] == ["g_x"]]
    c = k.contract
    assert c is not None and c.scatter and not k.items[0].over  # no summation loop left
    # both operands are the arrays themselves (no gather): weight as (C*KH*KW, O), g_y[n] as (O, HO*WO)
    assert (c.left.name, c.left.view, c.right.name, c.right.view) == ("weight", True, "g_y", True)
    assert [l.index.name for l in c.outer] == ["n"] and [l.index.name for l in c.k] == ["o"]
    source = _kernel_source(_conv_text(), "g_x")
    assert "as a scatter" in source and source.count("_gemm(") == 1
    assert "for o in range" not in source and "for n in range(0, N):" in source


# ------------------------------------------------------------------ names and values
@pytest.mark.parametrize(
    "base, taken, name",
    [
        ("kh", set(), "kh"),
        ("kh", {"kh", "kh1"}, "kh2"),
        ("np", set(), "u"),  # a dimension NP: np.dot, np.uint64 in the kernel
        ("math", {"u"}, "u1"),
        ("njit", set(), "u"),
        ("range", set(), "u"),  # the kernels' loops call range
        ("if", set(), "u"),
        ("2d", {"u"}, "u1"),  # not an identifier: never "2d1"
        ("k-h", set(), "u"),
        ("_t", set(), "u"),  # codegen's own locals start with _
    ],
)
def test_fresh_index_is_an_identifier_the_generated_code_leaves_free(base, taken, name):
    from codegen import contract as cn
    from codegen.printers import RESERVED_NAMES

    taken = set(taken)
    u = cn.fresh_index(base, taken)
    assert u.name == name and u.name in taken and u.is_integer
    assert u.name.isidentifier() and not keyword.iskeyword(u.name) and u.name not in RESERVED_NAMES


def test_reserved_names_cover_what_the_generated_modules_import():
    import ast

    from codegen.emit import render_group
    from codegen.printers import RESERVED_NAMES

    assert {"range", "len", "min", "max", "abs", "int", "float"} <= RESERVED_NAMES  # called by kernels
    for text in render_group([_conv_program()], "m", "test", single="conv2d"):
        imported = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                imported |= {a.asname or a.name for a in node.names}
        assert {"np", "math", "njit"} & imported and imported <= RESERVED_NAMES, imported - RESERVED_NAMES


CONV_NP = """
name = "conv_np"
kind = "layer"
attrs = { S = 2, P = 1 }
inputs = { x = "N C H W" }
params = { weight = "O C NP MATH" }
outputs = { y = "N O HO WO" }
dims = { HO = "(H + 2*P - NP) // S + 1", WO = "(W + 2*P - MATH) // S + 1" }
equations = ["y[n,o,h,w] = sum(x[n,c,h*S+p-P, w*S+q-P] * weight[o,c,p,q], c, p, q)"]
"""


def test_scatter_over_axes_named_np_and_math_compiles_and_computes(tmp_path):
    """The scatter's new loops are named after the weight's axes: NP and MATH must not
    become loop variables ``np`` and ``math`` (the kernel calls np.uint64, np.empty)."""
    import generated
    from codegen import build

    (tmp_path / "conv_np.toml").write_text(CONV_NP)
    module = build(tmp_path / "conv_np.toml", tmp_path)
    source = _kernel_source((tmp_path / "conv_np.py").read_text(), "g_x")
    assert "as a scatter" in source
    assert "for np in" not in source and "for math in" not in source
    rng = np.random.default_rng(5)
    x_, w = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2))
    ours, ref = module.op(), generated.op("conv2d", S=2, P=1)
    y = ours.forward(x_, w)
    np.testing.assert_allclose(y, ref.forward(x_, w, np.zeros(4)), rtol=1e-12, atol=1e-12)
    gy = rng.standard_normal(y.shape)
    g_x, g_w = ours.backward(gy, x_, w)
    r_x, r_w, _ = ref.backward(gy, x_, w, np.zeros(4))
    np.testing.assert_allclose(g_x, r_x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g_w, r_w, rtol=1e-12, atol=1e-12)


def test_same_value_decides_polynomials_without_simplify(monkeypatch):
    """Loop bounds and extents are compared for every candidate statement: structural
    equality and the expanded difference decide them; simplify (slow) is left for what
    those cannot (a quotient to cancel, floor, Max)."""
    from codegen import contract as cn

    a, bb = sympy.symbols("a bb", integer=True)
    calls = []
    real = sympy.simplify
    monkeypatch.setattr(sympy, "simplify", lambda e, *args, **kw: calls.append(e) or real(e, *args, **kw))
    assert cn.same_value(N_ * C_, C_ * N_)
    assert cn.same_value(a * (bb + 1), a * bb + a)
    assert cn.same_value(HO - 1 + a, a + HO - 1)
    assert not cn.same_value(HO, HO + 1)
    assert not cn.same_value(a * bb, a + bb)
    assert calls == []
    assert cn.same_value((a**2 - 1) / (a - 1), a + 1)  # not a polynomial: simplify decides
    assert len(calls) == 1


def test_contraction_that_stops_planning_is_an_error_not_a_kernel_without_its_product(monkeypatch):
    """group() plans a matched contraction once to keep it; build() plans it again with
    the outputs it may write. Were the second plan None, the kernel's item would read
    ``_dot`` with no product computing it: lowering raises instead."""
    from codegen import contract as cn

    real, calls = cn.plan, []

    def plan_once(m, outs, is_int):
        calls.append(outs)
        return real(m, outs, is_int) if len(calls) == 1 else None

    monkeypatch.setattr(cn, "plan", plan_once)
    with pytest.raises(AssertionError, match="contraction"):
        _contract_kernel(RAW, ATTN)
    assert len(calls) == 2


# ------------------------------------------------------------------ numbers
NUMERIC = {
    "conv2d-S2-P1": ("conv", "conv2d", {"S": 2, "P": 1}, ((2, 3, 7, 6), (4, 3, 3, 2), (4,))),
    "conv2d-S1-P2": ("conv", "conv2d", {"S": 1, "P": 2}, ((2, 3, 7, 6), (4, 3, 3, 2), (4,))),
    "attention-causal": ("attention", "scaled_dot_product_attention", {"causal": 1}, ((2, 5, 3), (2, 6, 3), (2, 6, 4))),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """case -> (op with BLAS contractions, the same op with loops), built once."""
    import importlib

    from codegen import load_module
    from codegen.emit import render_group
    from derive import build

    folder = tmp_path_factory.mktemp("contract")
    cache = {}

    def get(case):
        if case not in cache:
            module, name, attrs, _ = NUMERIC[case]
            (opdef,) = [o for o in importlib.import_module("derive.ops." + module).OPS if o.name == name]
            program = build(opdef)
            ops = []
            for contract in (True, False):
                stem = "m_%s_%s" % ("blas" if contract else "loops", case.replace("-", "_"))
                cpu, _ = render_group([program], stem, "test", single=program.name, contract=contract)
                (folder / (stem + ".py")).write_text(cpu)
                ops.append(load_module(folder / (stem + ".py")).op(**attrs))
            cache[case] = ops
        return cache[case]

    return get


@pytest.mark.parametrize(
    "case, dtype",
    [("conv2d-S2-P1", np.float64), ("conv2d-S1-P2", np.float64), ("attention-causal", np.float64),
     ("conv2d-S2-P1", np.float32)],
)
def test_contractions_compute_what_the_loops_compute(rendered, case, dtype):
    rng = np.random.default_rng(3)
    args = [rng.standard_normal(shape).astype(dtype) for shape in NUMERIC[case][3]]
    results = []
    for op in rendered(case):
        y = op.forward(*args)
        gy = np.random.default_rng(4).standard_normal(y.shape).astype(dtype)
        results.append([y, *op.backward(gy, *args)])
    tol = 1e-4 if dtype == np.float32 else 1e-11
    for fast, slow in zip(*results):
        assert fast.dtype == dtype
        np.testing.assert_allclose(fast, slow, rtol=tol, atol=tol)


# ------------------------------------------------------------------ printing of spans
def test_span_subscripts_print_unsigned():
    from codegen.printers import CPUPrinter

    pr = CPUPrinter(int_symbols={"Sd", "Pd"})
    read = x4[n, c, HI, WI]
    assert pr.expr(read) == "x4[n, c, -Pd + Sd*h + p, -Pd + Sd*w + q]"
    pr.unsigned = frozenset({w_})  # inside the span of w every subscript moving with w is in bounds
    assert pr.expr(read) == "x4[n, c, -Pd + Sd*h + p, np.uint64(-Pd + Sd*w + q)]"


def _conv_text():
    from codegen.emit import render_group

    cpu, _ = render_group([_conv_program()], "m", "test", single="conv2d")
    return cpu


def test_span_bounds_are_computed_outside_the_rows():
    text = _conv_text()
    fwd = text[text.index("def _conv2d_fwd0"):text.index("def _conv2d_bwd0")]
    # the bounds of w use q only: computed in q's loop, not once per row h
    assert fwd.index("_lo_w, _hi_w = _span(") < fwd.index("for h in range(0, HO):")
    assert "_lo, _hi = _lo_w, _hi_w" in fwd


def test_patch_buffer_zeroed_once_when_its_zeros_do_not_move():
    fwd = _conv_text().split("def _conv2d_fwd0", 1)[1].split("def _conv2d_bwd0", 1)[0]
    assert "_b = np.zeros((C, KH, KW, HO, WO)" in fwd
    assert "_F(0)" not in fwd.split("for n in range(0, N):", 1)[1]  # no fill loops per image


@pytest.mark.parametrize("shape", [(3, 40, 5), (40, 30, 5), (3, 2, 5), (6, 6, 6)])
@pytest.mark.parametrize("add", [False, True])
def test_gemm_helper_matches_np_dot_in_both_orientations(tmp_path, shape, add):
    from codegen import load_module

    text = _conv_text()
    (tmp_path / "m_gemm.py").write_text(text)
    module = load_module(tmp_path / "m_gemm.py", "m_gemm_%d_%d_%d_%d" % (*shape, add))
    m, nn, k = shape
    rng = np.random.default_rng(0)
    a, bb = rng.standard_normal((m, k)), rng.standard_normal((nn, k)).T  # b is a transposed view
    out = np.full((m, nn), 2.0)
    module._gemm(a, bb, out, add)
    np.testing.assert_allclose(out, a @ bb + (2.0 if add else 0.0), rtol=1e-12)


POOL_NP = """
name = "pool_np"
kind = "layer"
attrs = { S = 2 }
inputs = { x = "B NP" }
outputs = { y = "B OUT" }
dims = { OUT = "(NP - 2) // S + 1" }
ranges = { p = "2" }
equations = ["y[b,o] = sum(x[b,o*S+p], p)"]
"""


def test_a_gradient_index_named_after_dimension_np_is_renamed(tmp_path):
    """derive names the input gradient's new index after its dimension in lower case
    (NP gives np); codegen renames a loop index that would shadow a module name, and
    the kernel still computes the gradient."""
    from codegen import build

    (tmp_path / "pool_np.toml").write_text(POOL_NP)
    module = build(tmp_path / "pool_np.toml", tmp_path)
    for name in ("pool_np.py", "pool_np_cuda.py"):
        text = (tmp_path / name).read_text()
        assert not re.search(r"\bfor np\b|\bnp = ", text), name
    op = module.op(S=2)
    rng = np.random.default_rng(3)
    x_ = rng.standard_normal((3, 9))
    gy = rng.standard_normal(op.forward(x_).shape)
    (g_x,) = ref.as_tuple(op.backward(gy, x_))
    num = ref.numerical_vjp(lambda a: op.forward(a), [x_], [gy], [0])[0]
    np.testing.assert_allclose(g_x, num, rtol=1e-6, atol=1e-8)


MAX_OF_GUARDED = """
name = "max_of_guarded"
kind = "layer"
inputs = { w = "B" }
outputs = { y = "B" }
equations = ["y[i] = Max(w[i], log1p((w[i] - w[(i + 1) % B])**2))"]
"""


def test_a_guarded_read_inside_max(tmp_path):
    """CSE hides each guarded read (Piecewise) behind a placeholder function; inside Max
    the placeholder must be real, or SymPy refuses the argument ("not comparable").
    Found by the fuzzer."""
    from codegen import build

    (tmp_path / "max_of_guarded.toml").write_text(MAX_OF_GUARDED)
    op = build(tmp_path / "max_of_guarded.toml", tmp_path).op()
    w = np.random.default_rng(5).standard_normal(6)
    ref.assert_close(op.forward(w), np.maximum(w, np.log1p((w - np.roll(w, -1)) ** 2)), np.float64, "forward")
    gy = np.ones(6)
    (g_w,) = ref.as_tuple(op.backward(gy, w))
    num = ref.numerical_vjp(lambda a: op.forward(a), [w], [gy], [0])[0]
    np.testing.assert_allclose(g_w, num, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- CSE through Piecewise
def _lowered(value):
    fwd = [Assign("y", BO, value)]
    (k,) = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")
    return k.items[0]


def _uses(item, sub) -> int:
    """How often ``sub`` is written in the item's temporaries and value."""
    exprs = [t.expr for t in item.pre] + [item.value]
    return sum(1 for e in exprs for s in sympy.preorder_traversal(e) if s == sub)


def test_padded_reads_in_a_condition_are_one_temporary_each():
    # a read that may fall outside, zero-padded inside a where's condition: SymPy folds
    # the padding out of the condition into ITE(guard, cond, cond with the read 0)
    pad1 = sympy.Piecewise((x[b, o - 1], o - 1 >= 0), (0, True))
    cond = (sympy.tanh(x[b, o]) <= pad1 * bias[o]) | (sympy.exp(x[b, o]) > pad1 + 1)
    value = sympy.Piecewise((x[b, o] ** 3, cond), (x[b, o], True))
    assert value.atoms(sympy.logic.boolalg.ITE)  # what SymPy makes of it
    item = _lowered(value)
    assert not item.value.atoms(sympy.logic.boolalg.ITE)
    pads = [t.expr for t in item.pre if isinstance(t.expr, sympy.Piecewise)]
    assert pads == [pad1]
    # the same value: substitute the temporaries back
    full = item.value
    for t in reversed(item.pre):
        full = full.xreplace({t.sym: t.expr})
    for xv in (-1.0, 0.5, 2.0):
        for ov in (0, 1, 3):
            pt = {x[b, ov]: xv, x[b, ov - 1]: 0.3, bias[ov]: 1.5, O: 4}
            assert full.xreplace({o: ov}).xreplace(pt) == value.xreplace({o: ov}).xreplace(pt), (xv, ov)


def test_padded_reads_folded_for_every_subset_are_one_temporary_each():
    # two padded reads in one condition: SymPy writes the condition once per subset of
    # the reads whose guards hold (a chain of four ITE branches)
    pad1 = sympy.Piecewise((x[b, o - 1], o - 1 >= 0), (0, True))
    pad2 = sympy.Piecewise((x[b, o + 1], O > o + 1), (0, True))
    cond = (sympy.tanh(x[b, o]) <= pad1 * bias[o]) | (sympy.exp(x[b, o]) > pad2 + pad1)
    value = sympy.Piecewise((x[b, o] ** 3, cond), (x[b, o], True))
    assert value.atoms(sympy.logic.boolalg.ITE)
    item = _lowered(value)
    assert not item.value.atoms(sympy.logic.boolalg.ITE)
    pads = [t.expr for t in item.pre if isinstance(t.expr, sympy.Piecewise)]
    assert sorted(pads, key=str) == sorted([pad1, pad2], key=str)
    full = item.value
    for t in reversed(item.pre):
        full = full.xreplace({t.sym: t.expr})
    for xv in (-1.0, 0.1, 2.0):
        for ov in (0, 1, 3):
            pt = {x[b, ov]: xv, x[b, ov - 1]: 0.3, x[b, ov + 1]: -0.7, bias[ov]: 1.5, O: 4}
            assert full.xreplace({o: ov}).xreplace(pt) == value.xreplace({o: ov}).xreplace(pt), (xv, ov)


def test_cse_shares_what_is_safe_inside_where_branches_and_conditions():
    # tanh(x + bias) in both branches and the second condition: computed once
    shared = sympy.tanh(x[b, o] + bias[o])
    value = sympy.Piecewise((2 * shared, x[b, o] > 0), (3 * shared, shared > sympy.Rational(1, 3)), (shared, True))
    item = _lowered(value + sympy.Piecewise((shared ** 2, x[b, o] < -1), (0, True)))
    assert _uses(item, shared) == 1
    assert [t.expr for t in item.pre].count(shared) == 1


def test_cse_keeps_a_branch_that_may_raise_behind_its_condition():
    # log raises on a negative number in the CUDA simulator (plain Python): log(x) is
    # written twice in the branch but never computed before x > 0 is known
    value = sympy.Piecewise((sympy.log(x[b, o]) * (1 + sympy.log(x[b, o])), x[b, o] > 0), (0, True))
    item = _lowered(value)
    assert not any(t.expr.atoms(sympy.log) for t in item.pre)


def test_cse_keeps_guarded_reads_behind_a_guard_inside_a_where():
    n = index("n")
    read = x[b, n - 1]
    guarded = sympy.Piecewise((read * w[n, o], n - 1 >= 0), (0, True))
    value = sympy.Piecewise((guarded + read * w[n, o], x[b, n] > 0), (guarded, True))
    fwd = [Assign("y", (Loop(b, 0, B), Loop(n, 0, I), Loop(o, 0, O)), value)]
    (k,) = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")
    for t in k.items[0].pre:
        if read in t.expr.atoms(sympy.Indexed):
            assert isinstance(t.expr, sympy.Piecewise), t.expr


@pytest.mark.cuda
def test_cuda_simulator_does_not_evaluate_a_raising_unselected_branch(tmp_path, rng):
    from spec_check import TextSpec, build, check_cuda_matches_cpu

    spec = TextSpec(
        'name = "log_where"\nkind = "layer"\ninputs = { x = "N" }\noutputs = { y = "N" }\n'
        'equations = ["y[i] = where(x[i] > 0, log(x[i]) * (1 + log(x[i])) + sqrt(x[i]),'
        ' exp(x[i]) * (2 + exp(x[i])))"]\n',
        sizes={"N": 6})
    _, module = build(spec, tmp_path)
    args = [np.array([-3.0, -0.5, 0.25, 1.0, -1.5, 2.0])]  # log and sqrt raise on the negatives
    check_cuda_matches_cpu(module, args, rng, spec.name)


def test_a_shared_ternary_keeps_its_guarded_read_inside():
    # the guarded ternary is total (safe anywhere) and shared with a where's branch;
    # what it selects (x[b, o - 1] * 2, also in the branch) must stay behind its guard
    n = index("n")
    read2 = 2 * x[b, n - 1]
    guarded = sympy.Piecewise((read2, n - 1 >= 0), (0, True))
    value = sympy.Piecewise((guarded * w[n, o], x[b, n] > 0), (guarded + 1, True)) + guarded ** 2
    fwd = [Assign("y", (Loop(b, 0, B), Loop(n, 0, I), Loop(o, 0, O)), value)]
    (k,) = Lowerer(_program(fwd, TENSORS)).lower(fwd, ["y"], "k")
    for t in k.items[0].pre:
        if t.expr.atoms(sympy.Indexed) & {x[b, n - 1]}:
            assert isinstance(t.expr, sympy.Piecewise), t.expr
