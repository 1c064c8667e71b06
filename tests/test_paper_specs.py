"""Ops from well-known papers, written as a new user writes them: straight from the
paper's formula, as TOML specs in tests/specs/papers/ (activations, layers, losses and
optimizers the project's library does not have). Each is checked against PyTorch:
the forward and every gradient in float64 (torch autograd) and against central finite
differences; float32 results within a small factor of PyTorch's own float32 error;
inputs of magnitude 1e3 finite and correct wherever the true value is finite; and, for a
few, the CUDA kernels (the simulator unless a GPU is lent) equal to the CPU kernels.
Optimizers are run for many steps against torch.optim, or a NumPy transcription of the
paper's algorithm where torch has none (LAMB's trust ratio needs norms over the whole
parameter: ``sum(expr)`` without an index in an update line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from spec_check import check_cuda_matches_cpu, check_gradients
from test_optimizers import run_symgrad, sequence, torch_kwargs

PAPERS = Path(__file__).resolve().parent / "specs" / "papers"
M = 1e3
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


# ---------------------------------------------------------------- inputs


def normal(*shapes):
    """Inputs drawn normal, each multiplied by the scale (1, or M for large inputs)."""
    return lambda rng, s: [s * rng.normal(size=sh) for sh in shapes]


def signs(rng, shape):
    return rng.choice([-1.0, 1.0], size=shape)


def with_fixed(make, *fixed):
    """``make``'s inputs followed by inputs that do not scale (labels, class weights)."""
    return lambda rng, s: make(rng, s) + [f(rng) for f in fixed]


# ---------------------------------------------------------------- torch oracles


def _dice(logits, target, smooth=1.0):
    p = torch.sigmoid(logits)
    score = (2 * (p * target).sum(1) + smooth) / (p.sum(1) + target.sum(1) + smooth)
    return (1 - score).mean()


def _tversky(logits, target, alpha=0.3, beta=0.7, smooth=1.0):
    p = torch.sigmoid(logits)
    tp, fp, fn = (p * target).sum(1), (p * (1 - target)).sum(1), ((1 - p) * target).sum(1)
    return (1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def _contrastive(x1, x2, y, margin=1.0):
    d = torch.sqrt(((x1 - x2) ** 2).sum(1))
    return (y * d**2 + (1 - y) * torch.clamp(margin - d, min=0) ** 2).sum() / (2 * x1.shape[0])


def _kl_gaussians(mu1, lv1, mu2, lv2):
    """In its stable form: the oracle's float64 value is the true value wherever it is finite."""
    kl = 0.5 * (lv2 - lv1 + torch.exp(lv1 - lv2) + (mu1 - mu2) ** 2 * torch.exp(-lv2) - 1)
    return kl.sum() / mu1.shape[0]


def _weight_norm_dense(x, v, g, bias):
    return F.linear(x, g[:, None] * v / v.norm(dim=1, keepdim=True), bias)


def _log_cosh(pred, target):
    d = pred - target  # log(cosh(d)) = |d| + log1p(exp(-2|d|)) - log(2): finite for every finite d
    return (d.abs() + torch.log1p(torch.exp(-2 * d.abs())) - np.log(2.0)).mean()


def _alibi_attention(q, k, v, m=0.5):
    """Causal attention with ALiBi's linear bias, through PyTorch's masked softmax."""
    L = q.shape[1]
    l, s = torch.arange(L)[:, None], torch.arange(L)[None]
    score = q @ k.transpose(1, 2) / np.sqrt(q.shape[-1]) - (m * (l - s)).to(q.dtype)
    return torch.softmax(score.masked_fill(s > l, -float("inf")), -1) @ v


def _mdn_nll(logit, mu, log_sigma, y):
    """The mixture's log-likelihood in log space (log-softmax plus log-density, log-sum-exp)."""
    log_density = -(y[:, None] - mu) ** 2 / (2 * torch.exp(2 * log_sigma)) - log_sigma - 0.5 * np.log(2 * np.pi)
    return -torch.logsumexp(F.log_softmax(logit, -1) + log_density, -1).mean()


def _rope(x):
    """Rotary embedding, pairs (2i, 2i+1) rotated by t * 10000^(-2i/D)."""
    T, D = x.shape[1], x.shape[2]
    theta = torch.arange(T, dtype=x.dtype)[:, None] * 10000.0 ** (-2 * (torch.arange(D) // 2) / D).to(x.dtype)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], -1).reshape(x.shape)
    return x * torch.cos(theta) + rotated * torch.sin(theta)


@dataclass(frozen=True)
class Paper:
    spec: str
    oracle: Callable  # torch function of the op's arguments, in declaration order
    inputs: Callable  # (rng, scale) -> arguments; scale 1, or M for large inputs
    terms: float = 1.0  # products of the magnitude a result sums (the large-input tolerance)
    large: bool = True  # whether the large-input check applies (see `inputs`)
    # whether float32 is checked too (precision against PyTorch's float32, large inputs):
    # for the formulas that can lose precision (cancellation, exponentials, logs, norms,
    # quotients); a piecewise-linear map, a data movement or a plain product rounds as
    # PyTorch's does, and every float32 compilation costs seconds of the suite's time
    f32: bool = True


ACT = normal((3, 5))
CASES = [
    # activations
    Paper("celu", lambda x: F.celu(x, 1.0), ACT),
    Paper("softsign", F.softsign, ACT),
    Paper("hardtanh", F.hardtanh, ACT, f32=False),
    Paper("logsigmoid", F.logsigmoid, ACT),
    Paper("tanhshrink", F.tanhshrink, ACT),
    Paper("softshrink", lambda x: F.softshrink(x, 0.5), ACT, f32=False),
    Paper("squared_relu", lambda x: F.relu(x) ** 2, ACT, f32=False),
    Paper("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), ACT),
    # layers
    Paper("prelu", F.prelu, normal((2, 3, 4), (3,)), f32=False),
    Paper("swish_beta", lambda x, beta: x * torch.sigmoid(beta * x),
          lambda rng, s: [s * rng.normal(size=(3, 4)), np.array(rng.uniform(0.5, 2.0))]),
    Paper("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b, eps=1e-5),
          lambda rng, s: [s * rng.normal(size=(2, 4, 3)), rng.normal(size=4), rng.normal(size=4)]),
    Paper("instance_norm", lambda x: F.instance_norm(x, eps=1e-5), normal((2, 3, 5))),
    Paper("pixel_shuffle", lambda x: F.pixel_shuffle(x, 2), normal((2, 8, 2, 3)), f32=False),
    Paper("conv_transpose1d", lambda x, w, b: F.conv_transpose1d(x, w, b, stride=2, padding=1),
          lambda rng, s: [s * rng.normal(size=(2, 3, 4)), rng.normal(size=(3, 2, 3)), rng.normal(size=2)],
          terms=3 * 3, f32=False),
    Paper("local_response_norm", lambda x: F.local_response_norm(x, 3, alpha=1e-4, beta=0.75, k=1.0),
          normal((2, 5, 3))),
    Paper("weight_norm_dense", _weight_norm_dense,
          lambda rng, s: [s * rng.normal(size=(3, 4)), rng.normal(size=(2, 4)), rng.normal(size=2),
                          rng.normal(size=2)], terms=4),
    Paper("cross_attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
          lambda rng, s: [s * rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 3))],
          terms=4 * 5 * 3, f32=False),
    # causal attention written with where(s <= l, exp(score), 0): at scores ~1e3 the masked
    # exponentials overflowed outside their mask (NaN) until the shift moved into the mask
    Paper("alibi_attention", _alibi_attention,
          lambda rng, s: [s * rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 2))],
          terms=4 * 3),
    Paper("rope", _rope, normal((2, 5, 4)), f32=False),
    # acos (with asin, asinh, acosh, atanh and erfc) joined the spec language for it; its
    # argument is a cosine (|c| < 1), so inputs are not scaled to 1e3
    Paper("arcface_logit", lambda c, onehot: 30.0 * torch.where(onehot > 0, torch.cos(torch.acos(c) + 0.5), c),
          lambda rng, s: [np.tanh(rng.normal(size=(3, 4))), rng.choice([0.0, 1.0], size=(3, 4))], large=False),
    Paper("bilinear_nobias", lambda x1, x2, w: F.bilinear(x1, x2, w), normal((3, 4), (3, 2), (2, 4, 2)),
          terms=M * 8, large=False, f32=False),  # a trilinear product: 1e3 in every factor is 1e9
    # losses
    Paper("margin_ranking", lambda x1, x2, y: F.margin_ranking_loss(x1, x2, y, margin=0.5),
          with_fixed(normal((6,), (6,)), lambda rng: signs(rng, 6)), f32=False),
    Paper("hinge", lambda p, y: torch.clamp(1 - y * p, min=0).mean(),
          with_fixed(normal((6,)), lambda rng: signs(rng, 6)), f32=False),
    Paper("squared_hinge", lambda p, y: (torch.clamp(1 - y * p, min=0) ** 2).mean(),
          with_fixed(normal((6,)), lambda rng: signs(rng, 6)), terms=M, f32=False),
    Paper("multi_margin", lambda x, t: F.multi_margin_loss(x, t, margin=1.0),
          with_fixed(normal((4, 3)), lambda rng: rng.integers(0, 3, size=4)), f32=False),
    Paper("quantile", lambda p, t: torch.maximum(0.9 * (t - p), -0.1 * (t - p)).mean(), normal((3, 4), (3, 4)), f32=False),
    Paper("dice", _dice, with_fixed(normal((3, 4)), lambda rng: rng.choice([0.0, 1.0], size=(3, 4)))),
    Paper("tversky", _tversky, with_fixed(normal((3, 4)), lambda rng: rng.choice([0.0, 1.0], size=(3, 4)))),
    Paper("contrastive", _contrastive,
          with_fixed(normal((4, 3), (4, 3)), lambda rng: rng.choice([0.0, 1.0], size=4)), terms=M),
    Paper("kl_gaussians", _kl_gaussians,
          lambda rng, s: [s * rng.normal(size=(3, 4)), s + rng.normal(size=(3, 4)),
                          s * rng.normal(size=(3, 4)), s + rng.normal(size=(3, 4))], terms=M),
    Paper("smooth_l1", lambda p, t: F.smooth_l1_loss(p, t, beta=1.0), normal((3, 4), (3, 4)), f32=False),
    Paper("weighted_cross_entropy", lambda x, t, w: F.cross_entropy(x, t, weight=w),
          with_fixed(normal((5, 3)), lambda rng: rng.integers(0, 3, size=5), lambda rng: rng.uniform(0.5, 2.0, 3))),
    Paper("log_cosh", _log_cosh, normal((3, 4), (3, 4))),
    # a mixture density network's likelihood written from its definition: a softmax weight
    # times a density inside log(sum(...)); at means ~1e3 every weight-density product
    # underflowed separately (log 0) until the weight's exponent joined the density's; its
    # float32 gradients were 100x less precise than PyTorch's until the exponent (~1e5) and
    # the exponent less its maximum were each computed once
    Paper("mdn_nll", _mdn_nll,
          with_fixed(lambda rng, s: [s * rng.normal(size=(3, 3)), s * rng.normal(size=(3, 3)),
                                     rng.normal(size=(3, 3)), s * rng.normal(size=3)])),
]
PARAMS = [pytest.param(c, id=c.spec) for c in CASES]
CUDA = ["gelu_tanh", "group_norm", "pixel_shuffle", "conv_transpose1d", "weighted_cross_entropy"]


def _case(spec):
    return next(c for c in CASES if c.spec == spec)


def _tensor(a, grad=False, dtype=np.float64):
    if np.issubdtype(np.asarray(a).dtype, np.integer):
        return torch.tensor(np.asarray(a, np.int64))  # index data stays integer
    return torch.tensor(np.asarray(a, dtype), requires_grad=grad)


def _torch(case, args, wrt, seed, dtype=np.float64):
    ts = [_tensor(a, i in wrt, dtype) for i, a in enumerate(args)]
    out = case.oracle(*ts)
    seed_t = torch.tensor(np.asarray(seed, dtype)).reshape(out.shape)
    grads = torch.autograd.grad(out, [ts[i] for i in wrt], seed_t)
    return out.detach().numpy(), [g.numpy() for g in grads]


def _run(build_spec, case, rng, dtype, scale=1.0, target="cpu"):
    op = build_spec(PAPERS / f"{case.spec}.toml").op(target=target)
    args = ref.cast(case.inputs(rng, scale), dtype)
    out = op.forward(*args)
    (seed,) = ref.make_seeds([out], rng, dtype)
    grads = ref.as_tuple(op.backward(seed, *args))
    return op, args, out, seed, grads


# ---------------------------------------------------------------- float64: torch, finite differences


@pytest.mark.parametrize("case", PARAMS)
def test_matches_torch_in_float64(build_spec, case, rng):
    op, args, out, seed, grads = _run(build_spec, case, rng, np.float64)
    wrt = ref.differentiable_indices(op)
    assert wrt, f"{case.spec}: no gradients"
    expected, expected_grads = _torch(case, args, wrt, seed)
    assert np.shape(out) == expected.shape
    ref.assert_close(out, expected, np.float64, f"{case.spec} forward")
    for i, g, e in zip(wrt, grads, expected_grads):
        assert np.shape(g) == e.shape
        ref.assert_close(g, e, np.float64, f"{case.spec}: gradient of {op.arg_names[i]}")


@pytest.mark.parametrize("case", PARAMS)
def test_gradients_match_finite_differences(build_spec, case, rng):
    op = build_spec(PAPERS / f"{case.spec}.toml").op()
    check_gradients(op, ref.cast(case.inputs(rng, 1.0), np.float64), rng, case.spec)


# ---------------------------------------------------------------- float32 precision


def _error(ours, exact):
    """Normwise relative error: the largest deviation over the largest value."""
    ours = np.asarray(ours, np.float64)
    return float(np.max(np.abs(ours - exact)) / max(float(np.max(np.abs(exact))), 1e-300))


FACTOR, FLOOR = 8.0, 1e-7  # as tests/test_stability_rewrites.py


@pytest.mark.parametrize("case", [p for p in PARAMS if p.values[0].f32])
def test_float32_is_as_accurate_as_torch_float32(build_spec, case, rng):
    op, args, out, seed, grads = _run(build_spec, case, rng, np.float32)
    wrt = ref.differentiable_indices(op)
    exact, exact_grads = _torch(case, args, wrt, seed)
    theirs_out, theirs_grads = _torch(case, args, wrt, seed, np.float32)
    ours, theirs = _error(out, exact), _error(theirs_out, exact)
    assert ours <= FACTOR * theirs + FLOOR, f"{case.spec} forward: relative error {ours:.2e}, PyTorch {theirs:.2e}"
    for i, g, e, t in zip(wrt, grads, exact_grads, theirs_grads):
        ours, theirs = _error(g, e), _error(t, e)
        assert ours <= FACTOR * theirs + FLOOR, (
            f"{case.spec}: gradient of {op.arg_names[i]}: relative error {ours:.2e}, PyTorch {theirs:.2e}")


# ---------------------------------------------------------------- large inputs


def _check_large(ours, expected, dtype, what, magnitude):
    ours = np.asarray(ours, np.float64)
    finite = np.isfinite(expected)
    assert np.all(np.isfinite(ours[finite])), f"{what}: not finite where the true value is: {ours}"
    ref.assert_close(ours[finite], expected[finite], dtype, what, ref.extreme_tol(dtype, magnitude))


LARGE = [pytest.param(c, dtype, id=f"{c.spec}-{np.dtype(dtype).name}")
         for c in CASES if c.large for dtype in ((np.float32, np.float64) if c.f32 else (np.float64,))]


@pytest.mark.parametrize("case, dtype", LARGE)
def test_large_inputs_are_finite_and_correct(build_spec, case, dtype, rng):
    op, args, out, seed, grads = _run(build_spec, case, rng, dtype, scale=M)
    wrt = ref.differentiable_indices(op)
    expected, expected_grads = _torch(case, args, wrt, seed)  # float64 on the same inputs
    _check_large(out, expected, dtype, f"{case.spec} forward", M * case.terms)
    for i, g, e in zip(wrt, grads, expected_grads):
        _check_large(g, e, dtype, f"{case.spec}: gradient of {op.arg_names[i]}", M * case.terms)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("spec", CUDA)
def test_cuda_equals_cpu(build_spec, spec, rng):
    module = build_spec(PAPERS / f"{spec}.toml")
    check_cuda_matches_cpu(module, ref.cast(_case(spec).inputs(rng, 1.0), np.float64), rng, spec)


# ---------------------------------------------------------------- optimizers


def _torch_optimizer(cls, **fixed):
    def run(p0, grads, hyper):
        p = torch.tensor(np.asarray(p0, np.float64), requires_grad=True)
        opt = cls([p], **torch_kwargs(hyper), **fixed)
        for g in grads:
            p.grad = torch.tensor(np.asarray(g, np.float64))
            opt.step()
        return p.detach().numpy()

    return run


def _yogi(p, grads, lr, beta1, beta2, eps):
    """Zaheer et al. 2018, Algorithm 2 (no bias correction, moments from zero)."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        m = beta1 * m + (1 - beta1) * g
        v = v - (1 - beta2) * np.sign(v - g * g) * g * g
        p = p - lr * m / (np.sqrt(v) + eps)
    return p


def _sgdw(p, grads, lr, momentum, weight_decay):
    buf = np.zeros_like(p)
    for g in grads:
        buf = momentum * buf + g
        p = p - lr * buf - lr * weight_decay * p
    return p


def _lamb(p, grads, lr, beta1, beta2, eps, weight_decay):
    """You et al. 2020, Algorithm 2, with the identity as the scaling function: the trust
    ratio ||p|| / ||u|| is over the whole parameter."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        u = m / (1 - beta1**t) / (np.sqrt(v / (1 - beta2**t)) + eps) + weight_decay * p
        p = p - lr * np.linalg.norm(p) / np.linalg.norm(u) * u
    return p


OPTIMIZERS = {
    "amsgrad": _torch_optimizer(torch.optim.Adam, amsgrad=True),
    "adadelta": _torch_optimizer(torch.optim.Adadelta),
    "yogi": lambda p0, grads, hyper: _yogi(np.asarray(p0, np.float64), np.asarray(grads, np.float64), **hyper),
    "sgdw": lambda p0, grads, hyper: _sgdw(np.asarray(p0, np.float64), np.asarray(grads, np.float64), **hyper),
    "lamb": lambda p0, grads, hyper: _lamb(np.asarray(p0, np.float64), np.asarray(grads, np.float64), **hyper),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_matches_its_reference_over_many_steps(build_spec, name, dtype, rng):
    op = build_spec(PAPERS / f"{name}.toml").op()
    p0, grads = sequence(rng, dtype)
    p, _ = run_symgrad(op, p0, grads, dtype, dict(op.hyper))
    assert p.dtype == np.dtype(dtype)
    expected = OPTIMIZERS[name](p0, grads, dict(op.hyper))
    assert not np.allclose(expected, p0, atol=1e-3), "the parameters moved"
    ref.assert_close(p, expected, dtype, f"{name} after {len(grads)} steps")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_is_finite_and_correct_for_large_gradients(build_spec, name, rng):
    op = build_spec(PAPERS / f"{name}.toml").op()
    p0, grads = sequence(rng, np.float64)
    grads = M * grads
    p, _ = run_symgrad(op, p0, grads, np.float64, dict(op.hyper))
    expected = OPTIMIZERS[name](p0, grads, dict(op.hyper))
    assert np.all(np.isfinite(p))
    ref.assert_close(p, expected, np.float64, f"{name} with gradients of size {M}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["amsgrad", "lamb"])
def test_optimizer_on_cuda_equals_cpu(build_spec, name, rng):
    module = build_spec(PAPERS / f"{name}.toml")
    p0, grads = sequence(rng, np.float64)
    p_cpu, _ = run_symgrad(module.op(), p0, grads[:5], np.float64, dict(module.op().hyper))
    p_gpu, _ = run_symgrad(module.op(target="cuda"), p0, grads[:5], np.float64, dict(module.op().hyper))
    ref.assert_close(p_gpu, p_cpu, np.float64, f"{name} on CUDA")


# ---------------------------------------------------------------- the engine's rules these specs found


def test_a_zero_branch_guards_the_factors_it_multiplies():
    """d Min(0, expm1(x))/dx is exp(x) only where expm1(x) < 0: a product
    ``Piecewise((1, c), (0, True)) * exp(x)`` would be 0 * inf = NaN at x = 1000 (CELU)."""
    import sympy

    from sympy.codegen.cfunctions import expm1

    from derive.differentiate import local_partial

    x = sympy.Symbol("x", real=True)
    d = local_partial(sympy.Min(0, expm1(x)), x)
    for m in sympy.preorder_traversal(d):
        if isinstance(m, sympy.Mul):
            assert not (m.has(sympy.exp) and any(isinstance(f, sympy.Piecewise) for f in m.args)), d
    assert d.subs(x, -1.0) == sympy.exp(-1.0) and d.subs(x, 1.0) == 0


def test_a_quotient_of_exponentials_is_one_exponential():
    """(exp(a) + c) / exp(b) becomes exp(a - b) + c exp(-b): finite where a and b are both
    large (the KL divergence between Gaussians given by log-variances)."""
    import sympy

    from derive.normalize import Stmt
    from derive.stabilize import merge_exponentials

    a, b, c = sympy.symbols("a b c", real=True)
    s = Stmt("y", (), (sympy.exp(a) + c**2) / sympy.exp(b), text="y = (exp(a) + c**2) / exp(b)")
    merge_exponentials([s])
    assert s.body == sympy.exp(a - b) + c**2 * sympy.exp(-b), s.body


def test_whole_parameter_reductions_in_an_update(tmp_path, rng):
    """``sum``, ``mean`` and ``max`` without an index reduce over every element of the
    parameter, once per step, from the values the earlier lines left."""
    import codegen

    path = tmp_path / "centred.toml"
    path.write_text('name = "centred"\nkind = "optimizer"\nstate = ["m"]\nhyper = { lr = 0.1 }\nupdate = [\n'
                    '  "m = 0.5*m + g",\n  "c = m - mean(m)",\n  "p = p - lr*c/max(abs(c)) + sum(p)*0.01",\n]\n')
    module = codegen.build(str(path), str(tmp_path / "out"))
    for target in ("cpu", "cuda"):
        op = module.op(target=target)
        p0, grads = rng.normal(size=(2, 3)), rng.normal(size=(3, 2, 3))
        p, (m,) = p0.copy(), op.init_state(p0)
        p_ref, m_ref = p0.copy(), np.zeros_like(p0)
        for t, g in enumerate(grads, start=1):
            op.step(p, g, m, t=t)
            m_ref = 0.5 * m_ref + g
            c = m_ref - m_ref.mean()
            p_ref = p_ref - 0.1 * c / np.abs(c).max() + p_ref.sum() * 0.01
        ref.assert_close(p, p_ref, np.float64, f"centred on {target}")
        ref.assert_close(m, m_ref, np.float64, f"centred's m on {target}")


@pytest.mark.parametrize("spec, attrs, shapes, message", [
    ("pixel_shuffle", {"r": 2}, [(1, 6, 2, 2)], "break the relation C = CO*r**2"),
    ("group_norm", {"G": 3}, [(2, 4, 3), (4,), (4,)], "break the relation C = CG*G"),
])
def test_a_size_the_attributes_do_not_divide_is_an_error(build_spec, spec, attrs, shapes, message):
    """A user's attribute that does not fit the shapes (3 groups of 4 channels, a
    channel count that is not a multiple of r*r) is an error naming the relation."""
    op = build_spec(PAPERS / f"{spec}.toml").op(**attrs)
    with pytest.raises(ValueError) as info:
        op.forward(*[np.ones(s) for s in shapes])
    assert message in str(info.value) and f"{spec}.toml" in str(info.value)
