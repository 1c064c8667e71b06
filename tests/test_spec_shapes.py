"""Sizes a spec states or implies are facts the generated code checks and the
derivation uses (tests/specs/: glu*, lstm_cell, gqa*, shift, window, first_k):

* ``dims`` may state a relation (``G = "4*H"``, G also an input's dimension): the host
  wrappers check it against the actual shapes (an error naming the spec, the relation
  and the sizes), and lowering drops the bounds guards it proves true (an axis split
  into halves or four gates reads no guarded element);
* a dimension that must be an exact quotient (``H = "G / 2"``, H solved from
  ``G = "2*H"``, or ``H = "G // 2"`` used as the size of blocks of G, which implies
  G = 2*H) is an error when the size does not divide, never a truncation;
* a read whose index is built from attributes and loop indices, with no offset of its
  own and no loop over the axis's own size (``k[b, h // R, u, e]``, ``x[b, k]`` with k
  over an attribute K), must stay inside its tensor: where no relation proves it, the
  wrappers check it at run time (a mismatch between R and the shapes is an error, not a
  read of zeros); a read with an offset (``x[b, t + 1]``) or a window around a position
  of the same axis (``x[b, i + k]``) is the spec language's padding and reads zero
  outside, as before.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import SPECS

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def _t(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


def _gqa(q, k, v, R):
    return F.scaled_dot_product_attention(q, k.repeat_interleave(R, 1), v.repeat_interleave(R, 1))


def _lstm(x, h, c, w_ih, w_hh, bias):
    return torch.lstm_cell(x, (h, c), w_ih, w_hh, bias, torch.zeros_like(bias))


# spec -> (torch oracle returning a tuple of outputs, argument shapes, attributes)
CASES = {
    "glu": (lambda x: (F.glu(x, -1),), [(3, 6)], {}),
    "glu_quotient": (lambda x: (F.glu(x, -1),), [(3, 6)], {}),
    "glu_floor": (lambda x: (F.glu(x, -1),), [(3, 6)], {}),
    # B=2, I=3, H=2, G=8
    "lstm_cell": (_lstm, [(2, 3), (2, 2), (2, 2), (8, 3), (8, 2), (8,)], {}),
    # B=1, HQ=4, HK=2, T=3, S=4, D=2
    "gqa": (lambda q, k, v: (_gqa(q, k, v, 2),), [(1, 4, 3, 2), (1, 2, 4, 2), (1, 2, 4, 2)], {"R": 2}),
    "gqa_unrelated": (lambda q, k, v: (_gqa(q, k, v, 2),), [(1, 4, 3, 2), (1, 2, 4, 2), (1, 2, 4, 2)], {"R": 2}),
}


def _op(build_spec, name, target="cpu", **attrs):
    return build_spec(SPECS / f"{name}.toml").op(target=target, **attrs)


# Compiling the attention's CPU kernels takes ~25 s per float type: gqa runs on the CPU in
# float64 (float32 under the simulator, whose kernels are the same expressions), and
# gqa_unrelated (the same kernels with run-time read checks) under the simulator only.
RUNS = [
    (name, target, dtype)
    for name in sorted(CASES)
    for target in ("cpu", "cuda")
    for dtype in (np.float32, np.float64)
    if not (name == "gqa" and target == "cpu" and dtype == np.float32)
    and not (name == "gqa_unrelated" and target == "cpu")
]


@pytest.mark.parametrize(
    "name, target, dtype", [pytest.param(*r, id=f"{r[0]}-{r[1]}-{np.dtype(r[2]).name}") for r in RUNS]
)
def test_matches_torch(build_spec, name, target, dtype, rng):
    oracle, shapes, attrs = CASES[name]
    op = _op(build_spec, name, target, **attrs)
    args = ref.cast([rng.normal(size=s) for s in shapes], dtype)
    outputs = ref.as_tuple(op.forward(*args))
    ts = [_t(a, grad=True) for a in args]
    expected = oracle(*ts)
    assert len(outputs) == len(expected)
    for out, e in zip(outputs, expected):
        ref.assert_close(out, e.detach().numpy(), dtype, f"{name} forward on {target}")
    seeds = ref.make_seeds(outputs, rng, dtype)
    grads = ref.as_tuple(op.backward(*seeds, *args))
    torch_grads = torch.autograd.grad(expected, ts, [_t(s) for s in seeds])
    assert len(grads) == len(args)
    for i, (g, e) in enumerate(zip(grads, torch_grads)):
        ref.assert_close(g, e.numpy(), dtype, f"{name} on {target}: gradient of argument {i}")


# ---------------------------------------------------------------- run-time checks


@pytest.mark.parametrize("name", ["glu", "glu_quotient", "glu_floor"])
def test_a_size_that_does_not_divide_is_an_error_not_a_truncation(build_spec, name, target, rng):
    op = _op(build_spec, name, target)
    x = rng.normal(size=(3, 7))
    for call in (lambda: op.forward(x), lambda: op.backward(np.ones((3, 3)), x)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert f"{name} ({name}.toml)" in message
        assert "relation G = 2*H" in message and "G = 7 but 2*H = 6" in message
        if name == "glu_floor":
            assert "implied by H = G // 2 splitting G into parts" in message
        assert "not a truncation" in message


def test_a_relation_is_checked_against_the_shapes(build_spec, rng):
    op = _op(build_spec, "lstm_cell")
    args = [rng.normal(size=s) for s in [(2, 3), (2, 2), (2, 2), (12, 3), (12, 2), (12,)]]  # G = 12, H = 2
    with pytest.raises(ValueError, match=r"lstm_cell \(lstm_cell.toml\): .*relation G = 4\*H .*G = 12 but 4\*H = 8"):
        op.forward(*args)


def test_an_attribute_in_a_relation_is_checked(build_spec, target, rng):
    op = _op(build_spec, "gqa", target, R=1)  # 4 query heads, 2 key heads: R must be 2
    q, k, v = (rng.normal(size=s) for s in [(1, 4, 3, 2), (1, 2, 4, 2), (1, 2, 4, 2)])
    with pytest.raises(ValueError, match=r"gqa \(gqa.toml\): .*relation HQ = HK\*R .*HQ = 4 but HK\*R = 2"):
        op.forward(q, k, v)


def test_an_attribute_in_index_arithmetic_is_checked_without_a_relation(build_spec, target, rng):
    op = _op(build_spec, "gqa_unrelated", target, R=1)
    q, k, v = (rng.normal(size=s) for s in [(1, 4, 3, 2), (1, 2, 4, 2), (1, 2, 4, 2)])
    for call in (lambda: op.forward(q, k, v), lambda: op.backward(np.ones(q.shape), q, k, v)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "gqa_unrelated (gqa_unrelated.toml): the read k[b, (h // R), u, e] reaches index 3 on axis 1 of 'k'" in message
        assert "HK = 2" in message and "R = 1" in message


def test_a_padding_read_is_not_checked(build_spec, target, rng):
    """``x[b, t + 1]`` leaves x at the last t: zero there, by the padding rule."""
    module = build_spec(SPECS / "shift.toml")
    assert "_check_read(" not in inspect.getsource(module)
    x = rng.normal(size=(2, 5))
    expected = np.concatenate([x[:, 1:], np.zeros((2, 1))], axis=1) - x
    ref.assert_close(module.op(target=target).forward(x), expected, np.float64, "shift")


def test_a_window_around_a_position_is_padding(build_spec, rng):
    """``x[b, i + k]`` with i over x's own axis sticks out at the end for every size:
    the spec's padding (zeros), not a mismatch."""
    module = build_spec(SPECS / "window.toml")
    assert "_check_read(" not in inspect.getsource(module)
    x = rng.normal(size=(2, 5))
    padded = np.concatenate([x, np.zeros((2, 2))], axis=1)
    expected = padded[:, 0:5] + padded[:, 1:6] + padded[:, 2:7]
    ref.assert_close(module.op().forward(x), expected, np.float64, "window")


def test_an_attribute_used_as_a_size_is_checked(build_spec, target, rng):
    module = build_spec(SPECS / "first_k.toml")
    x = rng.normal(size=(2, 3))
    ref.assert_close(module.op(target=target, K=3).forward(x), x.sum(axis=1), np.float64, "first_k")
    with pytest.raises(ValueError, match=r"first_k \(first_k.toml\): the read x\[b, k\] reaches index 3 on axis 1 of 'x', whose size is 3"):
        module.op(target=target, K=4).forward(x)


# ---------------------------------------------------------------- guards


def _kernel_conditions(source: str) -> list[str]:
    """The conditional expressions of a module's kernels (``a if cond else b``)."""
    return re.findall(r" if (.+?) else ", source)


@pytest.mark.parametrize("name", ["glu", "glu_floor"])
def test_a_split_axis_reads_without_bounds_guards(build_spec, name):
    """GLU's forward reads x[b, j] and x[b, j + H] with j < H = G/2: no guard at all; its
    backward keeps only the halves' own conditions (j < H, j >= H), none against G."""
    source = inspect.getsource(build_spec(SPECS / f"{name}.toml"))
    forward = re.findall(r"\ndef _%s_fwd\d+\(.*?(?=\n\n\n)" % name, source, re.S)
    backward = re.findall(r"\ndef _%s_bwd\d+\(.*?(?=\n\n\n)" % name, source, re.S)
    assert forward and backward
    assert _kernel_conditions("".join(forward)) == []
    conditions = _kernel_conditions("".join(backward))
    assert conditions and not [c for c in conditions if "G" in c]


def test_four_gates_read_without_bounds_guards(build_spec):
    """The LSTM cell's gates split G = 4*H rows: the forward has no guard, and the
    backward's conditions pick a gate (H, 2*H, 3*H); none compares against G."""
    source = inspect.getsource(build_spec(SPECS / "lstm_cell.toml"))
    kernels = re.findall(r"\ndef (_lstm_cell_(?:fwd|bwd)\d+)\(.*?(?=\n\n\n)", source, re.S)
    forward = [k for k in re.findall(r"\ndef _lstm_cell_fwd\d+\(.*?(?=\n\n\n)", source, re.S)]
    assert len(kernels) > len(forward) > 0
    assert _kernel_conditions("".join(forward)) == []
    conditions = _kernel_conditions("".join(re.findall(r"\ndef _lstm_cell_bwd\d+\(.*?(?=\n\n\n)", source, re.S)))
    assert conditions and not [c for c in conditions if "G" in c]


def test_library_gru_cell_reads_without_bounds_guards():
    """The library's gru_cell states G = 3*H: its kernels compare nothing with G."""
    import generated.layers.gru_cell as module

    gru = inspect.getsource(module)  # the op's own module: its kernels and wrappers only
    assert "_check_relation(\"gru_cell\"" in gru
    assert not [c for c in _kernel_conditions(gru) if "G" in c]


# ---------------------------------------------------------------- bad specs

BAD_DIMS = [
    ('dims = { G = "H*K" }', "the relation G = H*K in `dims` has more than one dimension no argument binds (H, K)"),
    ('dims = { H = "sqrt(G)", K = "1" }', "the dimension H = sqrt(G) in `dims` is not a whole number"),
]


@pytest.mark.parametrize("line, message", BAD_DIMS, ids=["two-unknowns", "not-whole"])
def test_bad_dims_name_the_problem(tmp_path, line, message):
    import codegen
    from derive.errors import SpecError

    path = tmp_path / "bad_dims.toml"
    path.write_text(
        'name = "bad_dims"\nkind = "layer"\ninputs = { x = "B G" }\noutputs = { y = "B H K" }\n'
        f'{line}\nranges = {{ j = "H" }}\nequations = ["y[b, j, k] = x[b, j]"]\n'
    )
    with pytest.raises(SpecError) as info:
        codegen.build(str(path), str(tmp_path / "out"))
    assert message in str(info.value) and "bad_dims.toml" in str(info.value)


def test_library_attention_heads_must_divide_the_model_width(rng):
    """multi_head_attention's head width is the exact quotient Dh = E / heads: 3 heads of
    a width-4 model is an error (torch.nn.MultiheadAttention refuses it too), not heads of
    width 1 that ignore a column."""
    import generated

    op = generated.op("multi_head_attention", heads=3)
    E = 4
    args = [rng.normal(size=(2, 3, E))] + [rng.normal(size=(E, E)) for _ in range(3)]
    args += [rng.normal(size=E) for _ in range(3)] + [rng.normal(size=(E, E)), rng.normal(size=E)]
    with pytest.raises(ValueError, match=r"relation E = Dh\*heads .*E = 4 but Dh\*heads = 3"):
        op.forward(*args)


def test_a_padded_read_inside_a_contraction(build_spec, rng):
    """Found by the fuzzer: the CPU contraction's gathered operand printed _softplus, but
    the module did not define the helper (NameError when the kernel compiled)."""
    module = build_spec(SPECS / "softplus_conv.toml")
    assert "_check_read(" not in inspect.getsource(module)
    x, w, b = rng.normal(size=(2, 2, 7)), rng.normal(size=(3, 2, 2)), rng.normal(size=3)
    # the read outside x is zero, then softplus applies: softplus(0) = log 2 at the padding
    expected = F.conv1d(F.softplus(F.pad(_t(x), (1, 1))), _t(w), _t(b), stride=2).numpy()
    ref.assert_close(module.op().forward(x, w, b), expected, np.float64, "softplus_conv")
