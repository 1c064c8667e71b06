"""Every op's CUDA kernels against PyTorch directly, with non-default attributes, and
matrix products whose sizes cross the CUDA tile.

tests/test_cuda.py shows that the CUDA target computes what the CPU target computes
for the same derivation; a mistake shared by both (or an attribute that never reaches
the CUDA kernels) would pass there. Here the CUDA results meet the outside reference
(PyTorch autograd, float64) themselves, for every op PyTorch has, with every attribute
variant the CPU tests use. The tiled matrix-product kernels
(``codegen/templates/cuda/kernel_gemm.py.jinja``) are run on sizes above one tile and not
multiples of it, so the tile loop runs more than once and the edge tiles are partial.
Under the simulator (the default) every thread runs in Python: the shapes stay small.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

pytestmark = pytest.mark.cuda

ORACLE_CASES = ref.op_cases(oracle_only=True)
# Above one tile of the CUDA matrix product, not a multiple of it: with TILE = 16 the
# inner loop runs over three tiles, the last one partial, and the output's edge blocks
# are partial in both directions.
TILE = 16
CROSSING = {"B": TILE + 3, "I": 2 * TILE + 3, "O": TILE + 1}
CROSSING_RNN = {"B": TILE + 3, "I": TILE + 5, "H": TILE + 1}


def cuda_op(case: ref.OpCase):
    import generated

    return generated.op(case.name, target="cuda", **case.kw)


def check_against_torch(case: ref.OpCase, args, rng, dtype=np.float64):
    """Forward and every gradient of the CUDA op against PyTorch autograd."""
    op = cuda_op(case)
    outs = ref.run_forward(op, args)
    expected = ref.as_tuple(ref.torch_forward(case.name, args, case.kw))
    assert len(outs) == len(expected)
    for out, e in zip(outs, expected):
        ref.assert_close(out, e, dtype, f"{case.id} cuda forward vs torch")
    seeds = ref.make_seeds(outs, rng, dtype)
    wrt = ref.differentiable_indices(op)
    grads = ref.run_backward(op, seeds, args)
    expected = ref.torch_vjp(case.name, args, case.kw, seeds, wrt)
    assert len(grads) == len(expected) == len(wrt)
    for name, g, e in zip(op.differentiable, grads, expected):
        assert np.shape(g) == e.shape, f"{case.id}: gradient of {name}"
        ref.assert_close(g, e, dtype, f"{case.id}: gradient of {name}, cuda vs torch")


@pytest.mark.parametrize("case", ORACLE_CASES)
def test_cuda_matches_torch(case, rng):
    check_against_torch(case, ref.make_inputs(case.name, rng, np.float64, case.kw), rng)


def test_cuda_sees_every_attribute_variant():
    """The attribute variants of the CPU tests all run here too (none is left to the CPU)."""
    ids = {p.values[0].id for p in ORACLE_CASES}
    for name, variants in ref.ATTR_VARIANTS.items():
        if name in ref.TORCH_ORACLE:
            for attrs in variants:
                assert ref.OpCase(name, tuple(sorted(attrs.items()))).id in ids


@pytest.mark.parametrize("dtype", [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")])
def test_dense_across_gemm_tiles(dtype, rng):
    case = ref.OpCase("dense")
    check_against_torch(case, ref.make_inputs("dense", rng, dtype, sizes=CROSSING), rng, dtype)


def test_rnn_cell_across_gemm_tiles(rng):
    case = ref.OpCase("rnn_cell")
    check_against_torch(case, ref.make_inputs("rnn_cell", rng, np.float64, sizes=CROSSING_RNN), rng)


def test_crossing_sizes_really_cross_the_tile():
    """The sizes above are meaningful only for the tile the generator uses."""
    from codegen import targets

    assert targets.get("cuda").tile == TILE
    for sizes in (CROSSING, CROSSING_RNN):
        for v in sizes.values():
            assert v > TILE and v % TILE
