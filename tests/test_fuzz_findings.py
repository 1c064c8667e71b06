"""What the differential fuzzer found, kept as regression cases: each spec (minimised by
hand from the fuzzer's report) builds, and its gradients match central finite
differences on the CPU and its CUDA kernels match the CPU (simulator)."""

from __future__ import annotations

import numpy as np
import pytest

from spec_check import TextSpec, build, check_cuda_matches_cpu, check_gradients, make_args

FINDINGS = {
    # 1/x printed its gradient as -g/x * x: a negative coefficient over a square
    "reciprocal": TextSpec('name = "reciprocal"\nkind = "activation"\nexpr = "1 / x"\n'),
    "quotient": TextSpec(
        'name = "quotient"\nkind = "layer"\ninputs = { x = "N", s = "N" }\noutputs = { y = "N" }\n'
        'equations = ["y[i] = x[i] / s[i]"]\n', sizes={"N": 4}, positive={"s"}),
    # an output read by a later equation: the backward kernel had the argument g_u twice
    "output_read_later": TextSpec(
        'name = "output_read_later"\nkind = "layer"\ninputs = { x = "N" }\noutputs = { u = "N", y = "N" }\n'
        'equations = ["u[i] = exp(x[i])", "y[i] = u[i] * x[i]"]\n', sizes={"N": 4}),
    # a power of a library function crashed the LaTeX printer
    "sigmoid_squared": TextSpec('name = "sigmoid_squared"\nkind = "activation"\nexpr = "sigmoid(x)**2 + softplus(x)**3"\n'),
    # F1: a gradient that is one sum alone crashed the statistics pass (int 0 for SymPy's zero)
    "lone_sum": TextSpec(
        'name = "lone_sum"\nkind = "layer"\ninputs = { x = "N", s = "K" }\nparams = { v = "N K" }\n'
        'outputs = { y = "N" }\nequations = ["y[i] = sum(v[i, k], k) + sum(s[k], k) + x[i]"]\n',
        sizes={"N": 3, "K": 2}),
    # floor in a differentiated expression: SymPy left Derivative(floor(x), x), which no
    # printer prints; a piecewise-constant function's derivative is 0 (torch.floor/sign)
    "floor_sign_loss": TextSpec(
        'name = "floor_sign_loss"\nkind = "loss"\ninputs = { x = "B N" }\noutputs = { loss = "" }\n'
        'equations = ["loss = sum(floor(x[b,n]) * x[b,n] + sign(x[b,n])*x[b,n]**2, b, n) / B"]\n',
        sizes={"B": 2, "N": 3}),
    # F2: the only standalone reads of n (and b) cancel (w/w is 1, x - x is 0) before
    # binding; the index ranges come from the text as written
    "cancelled_reads": TextSpec(
        'name = "cancelled_reads"\nkind = "loss"\ninputs = { x = "B N", w = "B N" }\noutputs = { loss = "" }\n'
        'equations = ["loss = sum(x[b,n]**2, b, n)/B - sum(w[b, n] / w[b, n], b, n) / B"]\n',
        sizes={"B": 2, "N": 3}, positive={"w"}),
    "cancelled_difference": TextSpec(
        'name = "cancelled_difference"\nkind = "layer"\ninputs = { x = "B C L" }\noutputs = { y = "B" }\n'
        'equations = ["t[b, c] = sum(x[b,c,i] - x[b,c,i], i) + 2", "y[b] = sum(t[b, c] * x[b, c, 0], c)"]\n',
        sizes={"B": 2, "C": 3, "L": 4}),
    # F4: a computed exponent (sin(0.5)) became the exact rational 479425538604203/10**15,
    # and SymPy's factor built a polynomial of that degree: the build never finished
    "computed_exponent": TextSpec(
        'name = "computed_exponent"\nkind = "loss"\ninputs = { x = "B N", v = "B N" }\noutputs = { loss = "" }\n'
        'equations = ["loss = sum(v[b, n], b, n) * (sqrt(10)**sin(0.5) - sum(x[b, n], b, n))"]\n',
        sizes={"B": 2, "N": 3}),
    # a condition on constants that SymPy could not decide (softplus(2) had no numeric
    # value) inside relu's condition: SymPy's Piecewise raised KeyError while building
    "constant_condition": TextSpec(
        'name = "constant_condition"\nkind = "activation"\n'
        'expr = "relu(where(Le(softplus(2)**(1/2), 0), x - x, log1p(x**2))) + sigmoid(x) * where(sigmoid(0.25) > 0.5, x, 1)"\n'),
    # a max of a relu in a where's condition: SymPy folded the relu's condition w[j, n] > 0
    # out of the max that binds j (the kernel read an undefined j2), and under another relu
    # rewrote the max's body as a Boolean (TypeError)
    "reduction_in_condition": TextSpec(
        'name = "reduction_in_condition"\nkind = "loss"\ninputs = { x = "B N" }\nparams = { w = "B N" }\n'
        'outputs = { loss = "" }\n'
        'equations = ["loss = sum(where(x[b, n] <= max(relu(w[j2, n]), j2), x[b, n]**2, w[b, n]), b, n) / B"]\n',
        sizes={"B": 3, "N": 4}),
    "reductions_in_nested_conditions": TextSpec(
        'name = "reductions_in_nested_conditions"\nkind = "layer"\ninputs = { x = "B N" }\nparams = { w = "B N" }\n'
        'outputs = { y = "B N" }\n'
        'equations = ["y[b, n] = relu(where(x[b, n] <= max(relu(w[j, n]), j), x[b, n]**2 - 0.5, w[b, n]))'
        ' + leaky_relu(x[b, n] - sum(abs(where(w[k, n] > 0, w[k, n], x[k, n])), k))"]\n',
        sizes={"B": 3, "N": 4}),
    # forward reuse wrote tanh(t0)**2 as t1**(2/3) with t1 = tanh(t0)**3: NaN for a
    # negative tanh (a power of a power is reused only where it holds for every real base)
    "odd_power_reuse": TextSpec(
        'name = "odd_power_reuse"\nkind = "layer"\ninputs = { x = "B N" }\noutputs = { y = "B N" }\n'
        'equations = ["t[b] = tanh(sum(x[b, j], j))**3", "y[b, n] = t[b] * x[b, n]"]\n',
        sizes={"B": 4, "N": 3}),
    # F6: Max of an element with itself (the middle of a reversal) gave neither side the
    # gradient; a tie splits it half and half, as torch.maximum does
    "max_with_itself": TextSpec(
        'name = "max_with_itself"\nkind = "layer"\ninputs = { x = "N" }\noutputs = { y = "N" }\n'
        'equations = ["y[i] = Max(x[N - 1 - i], x[i]) + Min(x[i], x[N - 1 - i])"]\n', sizes={"N": 5}),
    # campaign 4 (fz_b0f4c48f69, tests/specs/fuzz_findings/, minimised): zero-padded reads
    # (u[n//2], x[b//2, n], u[N-1-n]) inside a where's condition inside another where's
    # condition. SymPy folds the padding out of the condition, writing it once for
    # every subset of the reads (2**3 times), the printer doubled that again (an
    # if-then-else printed with a NaN default, its complement through to_nnf), and
    # nothing inside a Piecewise was shared: the fuzzer's spec had a 49 KB kernel line
    # that Numba took minutes to compile (see Lowerer._unfold_chain, _speculable)
    "padded_reads_in_conditions": TextSpec(
        'name = "padded_reads_in_conditions"\nkind = "loss"\ninputs = { x = "B N", u = "N" }\n'
        'params = { w = "B N" }\noutputs = { loss = "" }\n'
        'equations = ["loss = sum(where(where(u[n//2] * x[b, n] > 1 / u[n], x[b//2, n], u[N - 1 - n])'
        ' + cosh(u[N - 1 - n]) <= w[b, n], x[b, n] * w[b, n]**2, exp(w[b, n]) * u[n//2]), b, n)"]\n',
        sizes={"B": 3, "N": 4}, positive={"u"}),
    # a factor shared by terms of a gradient was divided out with SymPy's division, which
    # inverts a Piecewise branch by branch (1/0 -> zoo) before the pair cancels: the
    # kernel computed zoo * 0 = NaN wherever the where() takes its 0 branch
    "shared_piecewise_factor": TextSpec(
        'name = "shared_piecewise_factor"\nkind = "layer"\ninputs = { x = "N" }\noutputs = { y = "N" }\n'
        'equations = ["y[i] = (2 - x[i]) * where(Eq(x[i], 1.5), x[i] + 1, 0) * sin(x[i])"]\n', sizes={"N": 4}),
    # reported by a campaign, not reproduced: an index (j // 2) % A printed as a float (an
    # array index Numba refuses); kept to hold the CPU and CUDA printers to integer indices
    "floor_division_mod_index": TextSpec(
        'name = "floor_division_mod_index"\nkind = "layer"\ninputs = { x = "A", u = "N" }\noutputs = { y = "N" }\n'
        'equations = ["y[j] = x[(j // 2) % A] * u[j] + sin(x[(j // 2) % A]) * u[(j // 2) % N]"]\n',
        sizes={"A": 3, "N": 7}),
}
PARAMS = [pytest.param(spec, id=name) for name, spec in FINDINGS.items()]


@pytest.fixture
def built(tmp_path_factory, request):
    spec = request.param
    opdef, module = build(spec, tmp_path_factory.mktemp(spec.name))
    module.op().latex()  # the derivation prints
    return spec, opdef, module


@pytest.mark.parametrize("built", PARAMS, indirect=True)
def test_finding_has_correct_gradients(built, rng):
    spec, opdef, module = built
    check_gradients(module.op(), make_args(spec, opdef, rng), rng, spec.name)


@pytest.mark.cuda
@pytest.mark.parametrize("built", PARAMS, indirect=True)
def test_finding_cuda_matches_cpu(built, rng):
    spec, opdef, module = built
    check_cuda_matches_cpu(module, make_args(spec, opdef, rng), rng, spec.name)


# ---------------------------------------------------------------------------------------
# Large-input mode (tests/fuzz_specs.py, ``large``): inputs at |x| ~ 1e2-1e3 checked
# against the 50-digit mpmath evaluation of the same tree, in float64 and float32. Each
# case was non-finite or wrong before the general rewrite that fixed it
# (derive/normalize.py: elementary_rewrites, stabilise).

import fuzz_specs as fz  # noqa: E402

_X = fz.Read("x")


def _exp(a):
    return fz.Fn("exp", (a,))


def _one():
    return fz.Num("1", 1.0)


def _large_activation(node):
    return fz.finish(fz.FuzzSpec("stable_act", "activation", inputs={"x": ()}, equations=[fz.Equation("y", (), node)],
                                 act_shape=(8,), sampling={"x": "large"}, large=True, seed=7))


_BN = (("b", "B"), ("n", "N"))


def _bn(name, i="n"):
    return fz.Read(name, (fz.IVar("b"), fz.IVar(i)))


_SIGMOID_RATIO = fz.Bin("/", _exp(_X), fz.Bin("+", _one(), _exp(_X)))
LARGE_FINDINGS = {
    # log1p(exp(x)) was computed as written: inf at x = 800, and its gradient
    # (1 - sigmoid(x)) * exp(x) lost every digit from x ~ 20 (0 at 300, NaN at 800)
    "log1p_of_exp": _large_activation(fz.Bin("*", fz.Num("3", 3.0), fz.Fn("log1p", (_exp(_X),)))),
    # tanh written as a ratio of exponentials: SymPy's expm1 rewriting made it
    # (sigmoid(2x) - 1)(exp(x) + 1) expm1(x): 0 at x = 30 (true -1), NaN at 800
    "tanh_as_a_ratio": _large_activation(fz.Bin("/", fz.Bin("-", _exp(fz.Neg(_X)), _exp(_X)),
                                                fz.Bin("+", _exp(fz.Neg(_X)), _exp(_X)))),
    # a sigmoid written out, times anything: 1/(1 + exp(x)) alone became 1 - sigmoid(x),
    # and exp(x) * (1 - sigmoid(x)) is inf * 0 (0 or NaN where the ratio is 1)
    "scaled_sigmoid_ratio": _large_activation(fz.Bin("*", fz.Num("0.5", 0.5), _SIGMOID_RATIO)),
    "log_times_sigmoid_ratio": _large_activation(
        fz.Bin("*", fz.Fn("log", (fz.Bin("+", _exp(_X), _exp(_X)),)), _SIGMOID_RATIO)),
    "sigmoid_ratio_times_input": fz.finish(fz.FuzzSpec(
        "stable_layer", "layer", inputs={"x": ("B", "N"), "v": ("B", "N")}, outputs={"y": ("B", "N")},
        sizes={"B": 3, "N": 3}, sampling={"x": "large"}, large=True, seed=1205059189,
        equations=[fz.Equation("y", _BN, fz.Bin("*", fz.Bin("/", _exp(_bn("x")), fz.Bin("+", _one(), _exp(_bn("x")))),
                                                      _bn("v")))])),
    # log(softplus(x)) at x ~ -800 (campaign seed 14): softplus underflows to 0 where it is
    # about exp(x), the log is -inf (true value about x) and its derivative
    # sigmoid/softplus is 0/0 (true value about 1)
    "log_of_softplus": _large_activation(fz.Bin("*", fz.Num("2", 2.0), fz.Fn("log", (fz.Fn("softplus", (_X,)),)))),
    # a log-sum-exp written with its maximum, max(x) + log(sum(exp(x - max(x)))) (campaign
    # seed 14): in float32 its gradient was 100-400x less precise than PyTorch's at
    # logits ~ 1e3, computed as exp(x - y) with y rounded at its own magnitude (an inverse
    # rule S = exp(y - m) through the log), and the maximum's gradient 1 - sum(softmax)
    # was left to rounding (a sum of exp(x - m) split as exp(x) exp(-m) was not seen as S)
    "logsumexp_with_its_max": fz.finish(fz.FuzzSpec(
        "stable_layer", "layer", inputs={"x": ("B", "N")}, outputs={"y": ("B",)}, sizes={"B": 3, "N": 5},
        sampling={"x": "offset"}, large=True, seed=1,
        equations=[fz.Equation("y", (("b", "B"),), fz.Bin("+", fz.Red("max", _bn("x", "k"), (("k", "N"),)), fz.Fn("log", (
            fz.Red("sum", _exp(fz.Bin("-", _bn("x", "j"), fz.Red("max", _bn("x", "k"), (("k", "N"),)))), (("j", "N"),)),))))])),
    # a softmax inside a sum over its own index (weighted by a target): the inner sum's
    # shift was undone as idle, since exp(E) * exp(-m) stayed two factors in the outer sum
    "softmax_inside_a_sum": fz.finish(fz.FuzzSpec(
        "stable_loss", "loss", inputs={"x": ("B", "N"), "target": ("B", "N")}, outputs={"loss": ()},
        sizes={"B": 3, "N": 3}, sampling={"x": "offset", "target": "prob"}, large=True, seed=487466105,
        differentiate=["x"],
        equations=[fz.Equation("loss", (), fz.Bin("/", fz.Neg(fz.Red("sum", fz.Bin("*", _bn("target"), fz.Bin(
            "/", _exp(fz.Bin("-", fz.Bin("*", fz.Num("2", 2.0), _bn("x")), _one())),
            fz.Red("sum", _exp(fz.Bin("-", fz.Bin("*", fz.Num("2", 2.0), _bn("x", "j")), _one())), (("j", "N"),)))),
            _BN)), fz.Sym("B")))])),
    # a ratio of exponentials whose exponent has a constant: SymPy holds exp(2x - 1) as
    # exp(-1) * exp(2x), which the shift did not recognise as one exponential (NaN)
    "ratio_with_affine_exponents": _large_activation(fz.Bin(
        "/", _exp(fz.Bin("-", fz.Bin("*", fz.Num("2", 2.0), _X), _one())),
        fz.Bin("+", _exp(fz.Bin("-", fz.Bin("*", fz.Num("2", 2.0), _X), _one())), _exp(_X)))),
    # the entropy of a softmax named on its own line: the gradient held exp(m - x) * q
    # (the chain rule through exp(x - m), divided by it again): inf * 0 where q underflows
    "entropy_of_a_named_softmax": fz.finish(fz.FuzzSpec(
        "stable_layer", "layer", inputs={"x": ("B", "N"), "u": ("B", "K")}, params={"w": ("K", "N")},
        outputs={"y": ("B",)}, sizes={"B": 2, "N": 4, "K": 2}, sampling={"x": "offset", "u": "large"}, large=True,
        seed=681062268,
        equations=[fz.Equation("t", _BN, fz.Bin("+", fz.Red("sum", fz.Bin("*", fz.Read("u", (fz.IVar("b"), fz.IVar("k"))),
                                                                           fz.Read("w", (fz.IVar("k"), fz.IVar("n")))),
                                                             (("k", "K"),)), _bn("x"))),
                   fz.Equation("q", _BN, fz.Bin("/", _exp(_bn("t")), fz.Red("sum", _exp(_bn("t", "j")), (("j", "N"),)))),
                   fz.Equation("y", (("b", "B"),), fz.Red("sum", fz.Bin("*", _bn("q"), fz.Fn("log", (_bn("q"),))),
                                                         (("n", "N"),)))])),
}


@pytest.mark.parametrize("name", list(LARGE_FINDINGS))
def test_large_input_finding_is_finite_and_accurate(name, tmp_path):
    spec = LARGE_FINDINGS[name]
    outcome = fz.check(spec, tmp_path, float32=True)
    assert outcome.status == "ok", outcome.report()


# ---------------------------------------------------------------------------------------
# Integer attributes given 0 where their default is positive. Such an attribute is
# nonnegative to the derivation, and positive only where it divides (derive/spec.py,
# positive_divisors): a flag with the default 1 was taken to be positive, so
# where(flag > 0, ...) was decided when the op was derived and flag=0 was ignored; a
# padding P=0 with the default 1 must work too.

ATTRIBUTE_FINDINGS = {
    "flag_default_one": (TextSpec(
        'name = "flag_default_one"\nkind = "layer"\nattrs = { flag = 1 }\ninputs = { x = "N" }\n'
        'outputs = { y = "N" }\nequations = ["y[i] = where(flag > 0, x[i]**2, sin(x[i]))"]\n', sizes={"N": 4}),
        lambda x, flag: x**2 if flag > 0 else np.sin(x), "flag"),
    "padding_zero": (TextSpec(
        'name = "padding_zero"\nkind = "layer"\nattrs = { P = 1, S = 2 }\ninputs = { x = "N L" }\nparams = { w = "K" }\n'
        'outputs = { y = "N LO" }\ndims = { LO = "(L + 2*P - K) // S + 1" }\nranges = { k = "K" }\n'
        'equations = ["y[n,l] = sum(x[n, l*S + k - P] * w[k], k)"]\n', sizes={"N": 2, "L": 7, "K": 3}),
        lambda x, w, P: np.stack([np.convolve(np.pad(r, P), w[::-1], "valid")[::2] for r in x]), "P"),
}


@pytest.mark.parametrize("name", list(ATTRIBUTE_FINDINGS))
def test_integer_attribute_may_be_zero(name, tmp_path, rng):
    spec, reference, attr = ATTRIBUTE_FINDINGS[name]
    opdef, module = build(spec, tmp_path)
    args = make_args(spec, opdef, rng)
    for value in (0, 1):
        op = module.op(**{attr: value})
        got = op.forward(*args)
        np.testing.assert_allclose(got, reference(*args, value), rtol=1e-12, atol=1e-12,
                                   err_msg=f"{name} with {attr}={value}")
        check_gradients(op, args, rng, f"{name} with {attr}={value}")
    with pytest.raises(ValueError, match=f"attribute {attr} must be a nonnegative integer"):
        module.op(**{attr: -1})
