"""The layer library of issue 3 (derive/ops/conv.py, pool.py, norm.py, recurrent.py,
attention.py, graph.py): every layer built from its forward equations alone, against
PyTorch (forward and every gradient, float64 and float32), against central finite
differences, on several shapes (odd sizes, batch 1, non-square images, conv2d with
every stride in {1, 2, 3} and padding in {0, 1, 2}), and its CUDA kernels against its
CPU kernels under the simulator.

The ops are the library's: their Programs from derive.library(), their kernels from
generated/ (test_ops.py also runs them at one default size with every other op).

``KNOWN_GAPS`` lists what the engine cannot do yet, with the reason; those cases are
strict xfails, so a fix shows up as an XPASS that asks for the entry to be removed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import pytest
import sympy

import reference as ref

LAYER_MODULES = ("conv", "pool", "norm", "recurrent", "attention", "graph", "combine")
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]

# What the engine or codegen cannot do yet (see the report): op name -> {part: reason},
# part being "build" (derive.build fails: every test of the op), "forward" or
# "backward". Strict xfails, so a fix shows up as an XPASS asking for the entry to go.
KNOWN_GAPS: dict[str, dict[str, str]] = {}


def _opdefs() -> dict:
    defs = {}
    for m in LAYER_MODULES:
        for opdef in importlib.import_module("derive.ops." + m).OPS:
            defs[opdef.name] = opdef
    return defs


OPDEFS = _opdefs()


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class LayerCase:
    name: str
    sizes: tuple[tuple[str, int], ...]
    attrs: tuple[tuple[str, float], ...] = ()

    @property
    def kw(self) -> dict:
        return dict(self.attrs)

    @property
    def id(self) -> str:
        return "%s-%s%s" % (self.name, "x".join(str(v) for _, v in self.sizes),
                            "".join(f"-{k}={v}" for k, v in self.attrs))


def case(name, attrs=(), **sizes):
    return LayerCase(name, tuple(sizes.items()), tuple(sorted(dict(attrs).items())))


def _conv_cases():
    out = []
    for S in (1, 2, 3):
        for P in (0, 1, 2):
            # non-square input, square kernel
            out.append(case("conv2d", {"S": S, "P": P}, N=2, C=3, H=7, W=6, O=4, KH=3, KW=3))
            # batch 1, non-square kernel, wide input
            out.append(case("conv2d", {"S": S, "P": P}, N=1, C=2, H=5, W=8, O=3, KH=2, KW=3))
    # PyTorch's options: per-axis stride, padding and dilation; groups (3 = C: depthwise,
    # two filters per channel); a per-axis value wins over its shorthand
    out.append(case("conv2d", {"SH": 2, "SW": 1, "PH": 2, "PW": 1, "DH": 1, "DW": 2}, N=1, C=2, H=6, W=7, O=3, KH=3, KW=2))
    out.append(case("conv2d", {"groups": 3, "D": 2, "P": 2}, N=2, C=3, H=7, W=6, O=6, KH=3, KW=3))
    out.append(case("conv2d", {"groups": 2, "S": 2, "SW": 1}, N=1, C=4, H=5, W=6, O=2, KH=2, KW=3))
    return out


CASES = _conv_cases() + [
    case("max_pool2d", N=2, C=3, H=7, W=6),
    case("max_pool2d", {"K": 3, "S": 1}, N=1, C=2, H=5, W=7),
    case("max_pool2d", {"K": 3, "S": 2}, N=2, C=1, H=8, W=9),
    case("max_pool2d", {"K": 2, "S": 3}, N=1, C=2, H=7, W=8),
    case("max_pool2d", {"K": 3, "S": 2, "P": 1, "D": 2, "ceil_mode": 1}, N=1, C=2, H=8, W=7),
    case("max_pool2d", {"KH": 3, "KW": 2, "SH": 1, "SW": 3, "PH": 1, "ceil_mode": 1}, N=2, C=1, H=5, W=7),
    case("avg_pool2d", N=2, C=3, H=7, W=6),
    case("avg_pool2d", {"K": 3, "S": 1}, N=1, C=2, H=5, W=7),
    case("avg_pool2d", {"K": 3, "S": 2}, N=2, C=1, H=8, W=9),
    case("avg_pool2d", {"K": 2, "S": 3}, N=1, C=2, H=7, W=8),
    case("avg_pool2d", {"K": 3, "S": 2, "P": 1, "ceil_mode": 1}, N=1, C=2, H=8, W=7),
    case("avg_pool2d", {"KH": 3, "KW": 2, "SH": 1, "SW": 3, "P": 1, "ceil_mode": 1, "count_include_pad": 0},
         N=2, C=1, H=5, W=7),
    case("flatten", N=2, C=3, H=4, W=5),
    case("flatten", N=1, C=2, H=3, W=2),
    case("layer_norm", B=3, D=7),
    case("layer_norm", {"eps": 1e-3}, B=1, D=4),
    case("batch_norm2d", N=3, C=2, H=3, W=5),
    case("batch_norm2d", {"eps": 1e-3}, N=1, C=3, H=2, W=3),
    case("batch_norm2d_eval", N=3, C=2, H=3, W=5),
    case("dropout", B=3, N=7),
    case("dropout", {"p": 0.2, "seed": 11, "step": 4}, B=1, N=5),
    case("dropout_mask", B=3, N=7),
    case("dropout_mask", {"p": 0.2}, B=1, N=5),
    case("embedding", B=6, V=5, D=4),
    case("embedding", B=1, V=3, D=2),
    case("rnn_cell", B=3, I=5, H=4),
    case("rnn_cell", B=1, I=2, H=3),
    case("gru_cell", B=3, I=5, H=4),
    case("gru_cell", B=1, I=2, H=3),
    case("lstm_cell", B=3, I=5, H=4),
    case("lstm_cell", B=1, I=2, H=3),
    case("add", B=3, N=5),
    case("add", B=1, N=2),
    case("concat", A=2, N1=3, N2=4, R=2),
    case("concat", A=1, N1=1, N2=2, R=3),
    case("positional_embedding", B=2, T=3, P=5, D=4),
    case("positional_embedding", B=1, T=4, P=4, D=2),
    case("scaled_dot_product_attention", B=2, L=3, S=5, D=4, E=6),
    case("scaled_dot_product_attention", {"causal": 1}, B=2, L=3, S=5, D=4, E=6),
    case("scaled_dot_product_attention", {"causal": 1}, B=1, L=4, S=4, D=3, E=2),
    case("cosine_similarity", B=3, D=7),
    case("cosine_similarity", B=1, D=2),
    case("gcn_layer", V=6, I=5, O=3),
    case("gcn_layer", V=1, I=2, O=2),
    case("multi_head_attention", B=2, L=3, E=4),
    case("multi_head_attention", {"heads": 3, "causal": 1}, B=1, L=4, E=6),
    case("multi_head_attention", {"heads": 1}, B=2, L=2, E=3),
    case("multihead_attention", B=2, L=3, S=4, E=4),
    case("multihead_attention", {"heads": 3, "causal": 1}, B=1, L=4, S=4, E=6),
]
# Tiny shapes for the CUDA simulator (every thread runs in Python).
CUDA_CASES = [
    case("conv2d", {"S": 2, "P": 1}, N=1, C=2, H=4, W=5, O=2, KH=3, KW=2),
    case("conv2d", {"S": 1, "P": 0}, N=2, C=1, H=3, W=4, O=2, KH=2, KW=2),
    case("conv2d", {"groups": 2, "SH": 2, "PW": 1, "DW": 2}, N=1, C=2, H=4, W=5, O=4, KH=2, KW=2),
    case("max_pool2d", N=1, C=2, H=5, W=4),
    case("max_pool2d", {"K": 3, "S": 2, "P": 1, "DW": 2, "ceil_mode": 1}, N=1, C=1, H=5, W=6),
    case("avg_pool2d", {"K": 3, "S": 1}, N=1, C=2, H=4, W=3),
    case("avg_pool2d", {"K": 3, "S": 2, "P": 1, "ceil_mode": 1, "count_include_pad": 0}, N=1, C=1, H=5, W=6),
    case("flatten", N=2, C=2, H=2, W=3),
    case("layer_norm", B=2, D=5),
    case("batch_norm2d", N=2, C=2, H=2, W=3),
    case("batch_norm2d_eval", N=2, C=2, H=2, W=3),
    case("dropout", {"seed": 3, "step": 2}, B=2, N=5),
    case("dropout_mask", B=2, N=5),
    case("embedding", B=5, V=3, D=2),
    case("rnn_cell", B=2, I=3, H=2),
    case("gru_cell", B=2, I=3, H=2),
    case("lstm_cell", B=2, I=3, H=2),
    case("add", B=2, N=3),
    case("concat", A=2, N1=2, N2=1, R=2),
    case("positional_embedding", B=2, T=2, P=3, D=2),
    case("scaled_dot_product_attention", {"causal": 1}, B=1, L=3, S=4, D=2, E=3),
    case("cosine_similarity", B=2, D=3),
    case("gcn_layer", V=3, I=2, O=2),
    case("multi_head_attention", {"causal": 1}, B=1, L=2, E=4),
    case("multihead_attention", {"causal": 1}, B=1, L=2, S=2, E=2),
]


def gap_marks(name: str, parts=("build",)) -> list:
    gaps = KNOWN_GAPS.get(name, {})
    if "build" in gaps:
        return [pytest.mark.xfail(strict=True, reason=gaps["build"])]
    if "backward" in parts and "backward" in gaps:
        return [pytest.mark.xfail(run=False, reason=gaps["backward"])]
    if "forward" in parts and "forward" in gaps:
        return [pytest.mark.xfail(strict=True, reason=gaps["forward"])]
    return []


def params(cases, *parts):
    return [pytest.param(c, id=c.id, marks=gap_marks(c.name, parts or ("build",))) for c in cases]


# ---------------------------------------------------------------- building


class _Library:
    """What the tests need of one op: its derived Program and the generated module's
    ``op()`` (the layers are part of the library, built by ``python -m codegen``)."""

    def __getitem__(self, name):
        import derive
        import generated

        program = {p.name: p for p in derive.library()}[name]
        return program, generated


@pytest.fixture(scope="module")
def built():
    return _Library()


def make_op(built, c: LayerCase, target: str = "cpu"):
    return built[c.name][1].op(c.name, target=target, **c.kw)


def inputs(c: LayerCase, rng, dtype=np.float64):
    return ref.cast(ref.layer_inputs(c.name, rng, dict(c.sizes), c.kw), dtype)


# ---------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", [pytest.param(n, marks=gap_marks(n)) for n in sorted(OPDEFS)])
def test_layer_builds_with_its_documented_arguments(built, name):
    program, module = built[name]
    op = module.op(name)
    assert op.name == name and op.kind == "layer"
    assert isinstance(op.latex(), str) and op.latex()
    opdef = OPDEFS[name]
    assert tuple(op.arg_names) == tuple(opdef.inputs) + tuple(opdef.params)
    assert op.attrs == pytest.approx(opdef.attrs)


EXPECTED_ARGS = {
    "conv2d": (("x", "weight", "bias"), ("x", "weight", "bias"),
               {"SH": 1, "SW": 1, "PH": 0, "PW": 0, "DH": 1, "DW": 1, "groups": 1}),
    "max_pool2d": (("x",), ("x",), {"KH": 2, "KW": 2, "SH": 2, "SW": 2, "PH": 0, "PW": 0, "DH": 1, "DW": 1, "ceil_mode": 0}),
    "avg_pool2d": (("x",), ("x",), {"KH": 2, "KW": 2, "SH": 2, "SW": 2, "PH": 0, "PW": 0, "ceil_mode": 0,
                                    "count_include_pad": 1}),
    "flatten": (("x",), ("x",), {}),
    "layer_norm": (("x", "weight", "bias"), ("x", "weight", "bias"), {"eps": 1e-5}),
    "batch_norm2d": (("x", "weight", "bias"), ("x", "weight", "bias"), {"eps": 1e-5, "momentum": 0.1}),
    "dropout": (("x",), ("x",), {"p": 0.5, "seed": 0, "step": 0}),
    "dropout_mask": (("x", "mask"), ("x",), {"p": 0.5}),
    "embedding": (("idx", "table"), ("table",), {}),
    "rnn_cell": (("x", "h", "w_ih", "w_hh", "b_ih", "b_hh"),) * 2 + ({},),
    "gru_cell": (("x", "h", "w_ih", "w_hh", "b_ih", "b_hh"),) * 2 + ({},),
    "lstm_cell": (("x", "h", "c", "weight_ih", "weight_hh", "bias_ih", "bias_hh"),) * 2 + ({},),
    "add": (("x1", "x2"), ("x1", "x2"), {}),
    "concat": (("x1", "x2"), ("x1", "x2"), {}),
    "positional_embedding": (("x", "table"), ("x", "table"), {}),
    "scaled_dot_product_attention": (("q", "k", "v"), ("q", "k", "v"), {"causal": 0}),
    "cosine_similarity": (("x1", "x2"), ("x1", "x2"), {"eps": 1e-8}),
    "gcn_layer": (("A", "x", "weight", "bias"), ("x", "weight", "bias"), {}),
    "multi_head_attention": (("x", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo"),) * 2 + ({"heads": 2, "causal": 0},),
    "multihead_attention": (("query", "key", "value", "attn_mask", "key_padding_mask", "in_proj_weight", "in_proj_bias",
                             "out_proj_weight", "out_proj_bias"),
                            ("query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj_weight",
                             "out_proj_bias"), {"heads": 2, "causal": 0}),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=gap_marks(n)) for n in sorted(EXPECTED_ARGS)])
def test_issue_table_names_arguments_and_attrs(built, name):
    args, differentiable, attrs = EXPECTED_ARGS[name]
    op = built[name][1].op(name)
    assert tuple(op.arg_names) == args
    assert tuple(op.differentiable) == differentiable
    assert op.attrs == pytest.approx(attrs)


# ---------------------------------------------------------------- against PyTorch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", params([c for c in CASES if c.name in ref.LAYER_ORACLE], "forward"))
def test_forward_matches_torch(built, c, dtype, rng):
    op = make_op(built, c)
    args = inputs(c, rng, dtype)
    outs = ref.run_forward(op, args)
    expected = ref.as_tuple(ref.torch_forward(c.name, args, c.kw))
    assert len(outs) == len(expected)
    for out, e in zip(outs, expected):
        assert np.shape(out) == e.shape
        assert np.asarray(out).dtype == np.dtype(dtype)
        ref.assert_close(out, e, dtype, f"{c.id} forward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", params([c for c in CASES if c.name in ref.LAYER_ORACLE], "backward"))
def test_backward_matches_torch(built, c, dtype, rng):
    op = make_op(built, c)
    args = inputs(c, rng, dtype)
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, dtype)
    wrt = ref.differentiable_indices(op)
    grads = ref.run_backward(op, seeds, args)
    expected = ref.torch_vjp(c.name, args, c.kw, seeds, wrt)
    assert len(grads) == len(wrt)
    for name, g, e in zip(op.differentiable, grads, expected):
        assert np.shape(g) == e.shape, f"gradient of {name}"
        assert np.asarray(g).dtype == np.dtype(dtype), f"gradient of {name}"
        ref.assert_close(g, e, dtype, f"{c.id}: gradient of {name}")


@pytest.mark.parametrize("c", params(CASES, "forward", "backward"))
def test_backward_matches_finite_differences(built, c, rng):
    op = make_op(built, c)
    args = inputs(c, rng)
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, np.float64)
    wrt = ref.differentiable_indices(op)
    grads = ref.run_backward(op, seeds, args)
    numeric = ref.numerical_vjp(op.forward, args, seeds, wrt)
    assert len(grads) == len(wrt)
    for name, g, e in zip(op.differentiable, grads, numeric):
        ref.assert_close(g, e, np.float64, f"{c.id}: gradient of {name}", ref.FD_TOL)


@pytest.mark.parametrize("c", params(CASES, "backward"))
def test_arguments_are_not_modified(built, c, rng):
    op = make_op(built, c)
    args = inputs(c, rng)
    before = [a.copy() for a in args]
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, np.float64)
    ref.run_backward(op, seeds, args)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- CUDA (simulator)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", params(CUDA_CASES, "forward", "backward"))
def test_cuda_matches_cpu(built, c, dtype, rng):
    cpu, gpu = make_op(built, c), make_op(built, c, "cuda")
    args = inputs(c, rng, dtype)
    expected = ref.run_forward(cpu, args)
    got = ref.run_forward(gpu, args)
    for g, e in zip(got, expected):
        assert np.shape(g) == np.shape(e) and np.asarray(g).dtype == np.dtype(dtype)
        ref.assert_close(g, e, dtype, f"{c.id} forward, cuda vs cpu")
    seeds = ref.make_seeds(expected, rng, dtype)
    g_cpu = ref.run_backward(cpu, seeds, args)
    g_gpu = ref.run_backward(gpu, seeds, args)
    assert len(g_gpu) == len(g_cpu)
    for name, g, e in zip(cpu.differentiable, g_gpu, g_cpu):
        assert g.shape == e.shape and g.dtype == np.dtype(dtype)
        ref.assert_close(g, e, dtype, f"{c.id}: gradient of {name}, cuda vs cpu")


# ---------------------------------------------------------------- particular layers


@pytest.mark.parametrize("target", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_embedding_repeated_indices_accumulate(built, target, rng):
    op = built["embedding"][1].op("embedding", target=target)
    idx = np.array([2, 0, 2, 2, 1], dtype=np.int64)
    table = rng.normal(size=(4, 3))
    np.testing.assert_array_equal(op.forward(idx, table), table[idx])
    gy = rng.normal(size=(5, 3))
    g = op.backward(gy, idx, table)
    expected = np.zeros_like(table)
    np.add.at(expected, idx, gy)
    ref.assert_close(g, expected, np.float64, "scatter-add of repeated rows")
    assert not g[3].any(), "an unused row gets no gradient"


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_batch_norm_running_statistics_match_torch(built, momentum, rng):
    op = built["batch_norm2d_stats"][1].op("batch_norm2d_stats", momentum=momentum)
    x, rm, rv = ref.layer_inputs("batch_norm2d_stats", rng, {"N": 3, "C": 4, "H": 2, "W": 5})
    new_mean, new_var = ref.as_tuple(op.forward(x, rm, rv))
    e_mean, e_var = ref.batch_norm2d_stats_oracle(x, rm, rv, momentum)
    ref.assert_close(new_mean, e_mean, np.float64, "running mean")
    ref.assert_close(new_var, e_var, np.float64, "running var (unbiased batch variance)")


def test_attention_is_stable_for_large_scores(built, rng):
    op = built["scaled_dot_product_attention"][1].op("scaled_dot_product_attention", causal=1)
    q, k, v = ref.layer_inputs("scaled_dot_product_attention", rng, {"B": 1, "L": 3, "S": 4, "D": 2, "E": 3})
    q, k = 30.0 * q, 30.0 * k  # scores of magnitude ~1e3
    for dtype in (np.float32, np.float64):
        args = ref.cast([q, k, v], dtype)
        y = op.forward(*args)
        assert np.all(np.isfinite(y))
        ref.assert_close(y, ref.torch_forward("scaled_dot_product_attention", args, {"causal": 1}), dtype,
                         t=ref.extreme_tol(dtype, 1e3))
        assert all(np.all(np.isfinite(g)) for g in op.backward(np.ones_like(y), *args))


# ---------------------------------------------------------------- derived forms


def _backward(program, grad):
    return [a for a in program.backward if a.target == grad]


def _reads(expr, name):
    return [r for r in expr.atoms(sympy.Indexed) if str(r.base) == name]


def test_conv2d_input_gradient_is_a_transposed_convolution(built):
    """Per group, g_xg[n,g,c,h1,w1] = sum_{j,p,q} g_z[n,g,j,(h1 + PH - DH p)/SH, ...] wg[g,j,c,p,q]
    where SH divides h1 + PH - DH p: the output gradient read back at the positions the
    kernel tap p reached from h1 (a transposed convolution), no read of the input."""
    program = built["conv2d"][0]
    (gx,) = _backward(program, "g_xg")
    assert {str(lp.index) for lp in gx.over} == {"j", "p", "q"}
    assert not _reads(gx.body, "xg") and not _reads(gx.body, "x"), "the input gradient does not read the input"
    (wread,) = _reads(gx.body, "wg")
    (gzread,) = _reads(gx.body, "g_z")
    row = gzread.indices[3]
    assert isinstance(row, sympy.floor) and {str(s) for s in row.free_symbols} == {"h1", "PH", "DH", "p", "SH"}
    assert str(gx.free[3].index) == "h1" and sympy.fraction(row.args[0])[1] == sympy.Symbol("SH", integer=True, positive=True)
    assert [str(e) for e in wread.indices] == ["g", "j", "c", "p", "q"]
    (gw,) = _backward(program, "g_x")  # the channels of each group back in place
    assert {str(lp.index) for lp in gw.over} == {"g"}


def test_conv2d_weight_gradient_is_a_correlation_of_input_and_output_gradient(built):
    program = built["conv2d"][0]
    (gw,) = _backward(program, "g_wg")
    assert {str(lp.index) for lp in gw.over} == {"n", "h", "w"}
    (xread,) = _reads(gw.body, "xg")
    assert {str(s) for s in xread.free_symbols} >= {"n", "g", "c", "h", "w", "p", "q", "SH", "PH", "DH"}
    assert _reads(gw.body, "g_z") and not _reads(gw.body, "wg")


def test_conv2d_groups_that_do_not_divide_are_an_error(built):
    op = built["conv2d"][1].op("conv2d", groups=2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 5, 5))
    with pytest.raises(ValueError, match="CG"):
        op.forward(x, rng.normal(size=(4, 1, 3, 3)), np.zeros(4))  # C = 3, groups 2
    x = rng.normal(size=(1, 4, 5, 5))
    with pytest.raises(ValueError, match="O"):
        op.forward(x, rng.normal(size=(3, 2, 3, 3)), np.zeros(3))  # O = 3, groups 2
    with pytest.raises(ValueError, match="CG"):
        op.forward(x, rng.normal(size=(4, 4, 3, 3)), np.zeros(4))  # weight (O, C, ...), not (O, C/groups, ...)


def test_shorthands_set_both_axes_and_lose_to_a_named_axis(built):
    module = built["conv2d"][1]
    attrs = module.op("conv2d", S=2, P=1, SW=3).attrs
    assert (attrs["SH"], attrs["SW"], attrs["PH"], attrs["PW"]) == (2, 3, 1, 1)
    pool = built["max_pool2d"][1].op("max_pool2d", K=3, P=1).attrs
    assert (pool["KH"], pool["KW"], pool["PH"], pool["PW"], pool["SH"]) == (3, 3, 1, 1, 2)
    with pytest.raises(ValueError, match="unknown attribute"):
        module.op("conv2d", stride=2)


@pytest.mark.parametrize("name", ["layer_norm", "batch_norm2d"])
def test_normalisation_backward_is_compact(built, name):
    """The textbook form: g_x = (ghat - mean(ghat) - xhat mean(ghat xhat)) / sqrt(var + eps)
    with ghat = weight g_y: no gradient of the mean, the variance or rstd is materialised and
    neither (var + eps)^(3/2) nor rstd^3 appears."""
    program = built[name][0]
    targets = {a.target for a in program.backward}
    assert not targets & {"g_mean", "g_var", "g_rstd"}, sorted(targets)
    for a in program.backward:
        assert not any(isinstance(p, sympy.Pow) and abs(p.exp) in (sympy.Rational(3, 2), 3)
                       for p in sympy.preorder_traversal(a.body)), a.equation

