"""codegen's lowering: GEMM detection, fusion of elementwise statements, scalar locals,
dead-code elimination, and CSE that never hoists a guarded read out of its guard."""

from __future__ import annotations

import sympy

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
