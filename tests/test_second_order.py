"""Forward mode and second order (issue 14): every differentiable op's ``jvp`` and
``hvp``, derived by derive/tangent.py from the same statements as its backward.

``op.jvp(*args, tangents=...)`` is checked against ``torch.autograd.functional.jvp``
and against a central difference of the forward along the tangents;
``op.hvp(*grad_outputs, *args, tangents=...)`` against PyTorch's second derivative
(reverse over reverse) and against a central difference of the op's own backward along
the tangents. float32 results are checked against float64, and the CUDA kernels
(simulator, tiny shapes) against the CPU's.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

CASES = ref.op_cases()
ORACLE_CASES = ref.op_cases(oracle_only=True)
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
# a directional central difference of a smooth function: truncation ~h^2, round-off ~eps/h
FD = ref.Tol(rtol=1e-6, atol=1e-6)


def make_op(case: ref.OpCase, target: str = "cpu"):
    import generated

    return generated.op(case.name, target=target, **case.kw)


def problem(case, rng, dtype=np.float64):
    """Arguments, one tangent per differentiable argument, and output gradients."""
    op = make_op(case)
    args = ref.make_inputs(case.name, rng, dtype, case.kw)
    wrt = ref.differentiable_indices(op)
    tangents = [rng.normal(size=np.shape(args[i])).astype(dtype) for i in wrt]
    seeds = ref.make_seeds(ref.run_forward(op, args), rng, dtype)
    return op, args, wrt, tangents, seeds


@pytest.mark.parametrize("case", ORACLE_CASES)
def test_jvp_matches_torch(case, rng):
    op, args, wrt, tangents, _ = problem(case, rng)
    got = ref.as_tuple(op.jvp(*args, tangents=tangents))
    expected = ref.as_tuple(ref.torch_jvp(case.name, args, case.kw, tangents, wrt))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert np.shape(g) == e.shape
        ref.assert_close(g, e, np.float64, f"{case.id} jvp vs torch")


@pytest.mark.parametrize("case", ORACLE_CASES)
def test_hvp_matches_torch(case, rng):
    op, args, wrt, tangents, seeds = problem(case, rng)
    got = ref.as_tuple(op.hvp(*seeds, *args, tangents=tangents))
    expected = ref.torch_hvp(case.name, args, case.kw, seeds, tangents, wrt)
    assert len(got) == len(expected) == len(wrt)
    scale = max(float(np.max(np.abs(e))) for e in expected if e.size) + 1.0
    for name, g, e in zip(op.differentiable, got, expected):
        assert np.shape(g) == e.shape, f"{case.id}: hvp of {name}"
        # an exact zero (a bias that softmax cannot see) comes out as round-off of the
        # other entries' size on both sides: the absolute tolerance scales with them
        ref.assert_close(g, e, np.float64, f"{case.id}: hvp of {name} vs torch",
                         ref.Tol(ref.tol(np.float64).rtol, ref.tol(np.float64).atol * scale))


@pytest.mark.parametrize("case", CASES)
def test_jvp_matches_finite_differences(case, rng):
    op, args, wrt, tangents, _ = problem(case, rng)
    got = ref.as_tuple(op.jvp(*args, tangents=tangents))
    expected = ref.numerical_directional(op.forward, args, tangents, wrt)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        ref.assert_close(g, e, np.float64, f"{case.id} jvp vs central differences", FD)


@pytest.mark.parametrize("case", CASES)
def test_hvp_matches_finite_differences_of_the_backward(case, rng):
    op, args, wrt, tangents, seeds = problem(case, rng)
    got = ref.as_tuple(op.hvp(*seeds, *args, tangents=tangents))
    n = len(seeds)
    expected = ref.numerical_directional(
        lambda *a: op.backward(*seeds, *a), args, tangents, wrt)
    assert len(got) == len(expected) == len(wrt)
    for name, g, e in zip(op.differentiable, got, expected):
        ref.assert_close(g, e, np.float64, f"{case.id}: hvp of {name} vs central differences of the backward", FD)
    assert n == op._seeds


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_float64(case, rng):
    op, args, wrt, tangents, seeds = problem(case, rng)
    f32 = lambda xs: [np.asarray(x, np.float32) if not ref._is_int(x) else x for x in xs]  # noqa: E731
    for name, run in (("jvp", lambda a, t, s: op.jvp(*a, tangents=t)),
                      ("hvp", lambda a, t, s: op.hvp(*s, *a, tangents=t))):
        want = ref.as_tuple(run(args, tangents, seeds))
        got = ref.as_tuple(run(f32(args), f32(tangents), f32(seeds)))
        for g, w in zip(got, want):
            assert np.asarray(g).dtype == np.float32, f"{case.id} {name}: float32 in, float32 out"
            scale = float(np.max(np.abs(w))) + 1.0 if np.size(w) else 1.0
            ref.assert_close(g, w, np.float32, f"{case.id} {name}: float32 vs float64",
                             ref.Tol(ref.tol(np.float32).rtol, ref.tol(np.float32).atol * scale))


@pytest.mark.cuda
@pytest.mark.parametrize("case", ref.op_cases(variants=False))
def test_cuda_equals_cpu(case, rng):
    op, args, wrt, tangents, seeds = problem(case, rng)
    gpu = make_op(case, "cuda")
    for name, run in (("jvp", lambda o: o.jvp(*args, tangents=tangents)),
                      ("hvp", lambda o: o.hvp(*seeds, *args, tangents=tangents))):
        for g, c in zip(ref.as_tuple(run(gpu)), ref.as_tuple(run(op))):
            ref.assert_close(g, c, np.float64, f"{case.id} {name}: cuda vs cpu")


def test_tangents_are_checked():
    import generated

    op = generated.op("dense")
    x, w, b = np.ones((2, 3)), np.ones((3, 4)), np.ones(4)
    with pytest.raises(TypeError, match="one tangent per differentiable argument"):
        op.jvp(x, w, b, tangents=(x, w))
    with pytest.raises(TypeError, match="hvp takes 4 arguments"):
        op.hvp(x, w, b, tangents=(x, w, b))


def test_sigmoid_second_derivative_is_printed_in_textbook_form():
    import generated

    tex = generated.op("sigmoid").latex()
    second = tex[tex.index("Second order"):]
    assert r"\left(2 \sigma\left(x_{n}\right) - 1\right)" in second
