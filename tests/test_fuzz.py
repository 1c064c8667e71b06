"""Differential fuzzing (issue 11), the bounded CI run: random specs over the whole spec
language (tests/fuzz_specs.py) built with ``codegen.build`` and compared with PyTorch
(float64) and central finite differences, on the CPU and, with fewer examples, on CUDA
(the simulator unless a GPU is lent). Derandomised: the same examples every run. A
failure prints the spec's TOML, its sizes and its input seed; replay a long campaign's
spec with ``scripts/fuzz_campaign.py --seed S --start K --n 1`` (same fuzzer version) or
``--replay OUT/K-NAME-cpu.pkl``. Runtime here: about 70 s (45 CPU, 10 CUDA examples),
plus about 40 s for 6 integer-input and `assume` specs and 8 large-input specs, and about
30 s for 12 specs whose jvp and hvp are checked too (second order, issue 14).
"""

from __future__ import annotations

import signal
import tempfile
import tomllib

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings

import fuzz_specs as fz

# No shrinking in CI (each example builds a module, ~1-3 s): the failing spec is printed as found.
CI = dict(derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
          print_blob=False)


TIMEOUT = 300  # seconds for one spec (build, compile, check): a derivation that hangs fails, naming the spec


class _Timeout(Exception):
    pass


def _run(spec, target, float32=False, second_order=False):
    def alarm(signum, frame):
        raise _Timeout(f"no result after {TIMEOUT} s\n{spec.describe()}")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIMEOUT)
    try:
        with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
            outcome = fz.check(spec, tmp, target=target, float32=float32, second_order=second_order)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not outcome.failed, outcome.report()
    return outcome


@settings(max_examples=45, **CI)
@given(spec=fz.specs())
def test_random_specs_match_torch_and_finite_differences_on_cpu(spec):
    _run(spec, "cpu")


# Second order (issue 14): op.jvp and op.hvp against PyTorch's forward-mode and second
# derivatives of the same tree, on other random specs.
@settings(max_examples=12, **CI)
@given(spec=fz.specs())
def test_random_specs_second_order_on_cpu(spec):
    _run(spec, "cpu", second_order=True)


@pytest.mark.cuda
@settings(max_examples=10, **CI)
@given(spec=fz.specs())
def test_random_specs_match_torch_on_cuda(spec):
    _run(spec, "cuda")


# Integer inputs (a gather with repeated indices, an index in comparisons) and `assume`
# (rows drawn to satisfy it; a broken row must raise the documented error): a few more
# of these families than the mix above draws.
@settings(max_examples=6, **CI)
@given(spec=fz.specs(families=("gather", "assume")))
def test_random_int_and_assume_specs(spec):
    _run(spec, "cpu")


# The large-input mode: stability-relevant shapes at |x| ~ 1e2-1e3, against the
# high-precision oracle, float64 and float32 (a non-finite result where the true value
# is finite fails; a float32 result less precise than PyTorch's is reported apart).
@settings(max_examples=8, **CI)
@given(spec=fz.specs(large=True))
def test_random_specs_are_finite_and_accurate_at_large_inputs(spec):
    _run(spec, "cpu", float32=True)


# ------------------------------------------------------------- the regressions of issue 11


def _activation(node, shape=(5,)):
    return fz.finish(fz.FuzzSpec("activation", "activation", inputs={"x": ()},
                                 equations=[fz.Equation("y", (), node)], act_shape=shape, seed=11))


X = fz.Read("x")
N_IDX = (("i", "N"),)


def _read(name):
    return fz.Read(name, (fz.IVar("i"),))


KNOWN = {
    # 1: a negative coefficient over a square printed as -g/x * x
    "reciprocal": _activation(fz.Bin("/", fz.Num("1", 1.0), X)),
    "quotient": fz.finish(fz.FuzzSpec(
        "layer", "layer", inputs={"x": ("N",), "s": ("N",)}, outputs={"y": ("N",)}, sizes={"N": 4}, seed=11,
        equations=[fz.Equation("y", N_IDX, fz.Bin("/", _read("x"), _read("s")))])),
    # 2: an output read by a later equation: SyntaxError, duplicate argument
    "output_read_later": fz.finish(fz.FuzzSpec(
        "layer", "layer", inputs={"x": ("N",)}, outputs={"u": ("N",), "y": ("N",)}, sizes={"N": 4}, seed=11,
        equations=[fz.Equation("u", N_IDX, fz.Fn("exp", (_read("x"),))),
                   fz.Equation("y", N_IDX, fz.Bin("*", _read("u"), _read("x")))])),
    # 3: a power of a library function crashed the LaTeX printer
    "sigmoid_squared": _activation(fz.Pow(fz.Fn("sigmoid", (X,)), fz.Num("2", 2.0))),
    "softplus_cubed": _activation(fz.Pow(fz.Fn("softplus", (X,)), fz.Num("3", 3.0))),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_issue_11_regressions(name):
    outcome = _run(KNOWN[name], "cpu")
    assert outcome.status == "ok", outcome.report()


# ------------------------------------------------------------- the fuzzer itself


def test_generator_covers_the_spec_language():
    """Every whitelisted function and every construct of issue 11's list shows up in a
    thousand generated specs, and every generated spec is valid TOML."""
    from derive.functions import FUNCTIONS, RANDOM

    texts = {f: [] for f in fz.FAMILIES}
    for k in range(1000):
        spec = fz.random_spec(2026, k)
        tomllib.loads(spec.toml)
        texts[spec.family].append(spec)
    every = "\n".join(s.toml for ss in texts.values() for s in ss)
    # the generator's draws (integer arguments, no oracle: data with derivative 0) are
    # checked against Random123's answers and a NumPy twin in tests/test_random.py instead
    missing = sorted(n for n in FUNCTIONS if f"{n}(" not in every and n not in RANDOM)
    assert not missing, f"the fuzzer never calls {missing}"
    assert all(texts.values()), {f: len(v) for f, v in texts.items()}
    layers = texts["layer"] + texts["window"] + texts["split"] + texts["loss"]
    constructs = {
        "sum": "sum(" in every, "max reduction": "max(" in every, "where": "where(" in every,
        "and/or": " and " in every or " or " in every, "1/x": "1 / x" in every,
        "negative power": "**(-" in every, "rational power": "**(1/2)" in every or "**(3/2)" in every,
        "power of sigmoid or softplus": "sigmoid(" in every and any(
            isinstance(n, fz.Pow) and isinstance(n.base, fz.Fn) and n.base.name in ("sigmoid", "softplus")
            for ss in texts.values() for s in ss for eq in s.equations for n in eq.rhs.walk()),
        "unary minus": "-(" in every,
        "strided padded read": "o*S + p" in every, "dilation": "p*D" in every, "ranges": "ranges =" in every,
        "dims": "dims =" in every, "differentiate": "differentiate =" in every,
        "relation between dims": any(s.relations for s in texts["split"]) and "j + 2*H" in every,
        "contraction": "sum(x[i0, j" in every or "sum(x[b, c, o*S + p - P] * w[f, c, p], c, p)" in every,
        "scalar state": any(s.scalar_state for s in texts["optimizer"]),
        "integer arithmetic in reads": "% N]" in every and "//2" in every and " - 1 - i" in every,
        "attributes at run time": any(s.run_attrs for s in layers),
        "output read later": any(
            eq.target != o and o in fz.Gen.reads_of(eq.rhs)
            for s in texts["layer"] for o in s.outputs for eq in s.equations[[e.target for e in s.equations].index(o):]),
        "intermediate": any(len(s.equations) > len(s.outputs) for s in texts["layer"]),
        "rank-0 intermediate": any(eq.lhs == () and eq.target not in s.outputs for s in layers for eq in s.equations),
        "optimizer temporary": any(s.temporaries for s in texts["optimizer"]),
        "optimizer t": "**t" in "\n".join(s.toml for s in texts["optimizer"]),
        "0-d activation input": any(s.act_shape == () for s in texts["activation"]),
        "integer input": 'dtypes = { idx = "int" }' in every, "gather": "table[idx[b], d]" in every,
        "gather by index arithmetic": "table[(idx[b] + 1) % V, d]" in every or "table[(idx[b] + 2) % V, d]" in every,
        "index compared": "Eq(v, idx[b])" in every and "where(idx[b] " in every,
        "assume": 'assume = ["sum(target[b' in every,
        "loss reduce, each reduction": {s.run_attrs.get("reduction", 1) for s in texts["loss"] if "reduce(" in s.toml}
        == {0, 1, 2},
    }
    assert all(constructs.values()), [k for k, v in constructs.items() if not v]


def test_large_mode_covers_the_stability_shapes():
    """The large-input mode draws the shapes issue 11 names (log of a sigmoid, softplus
    written out, ratios of sums of exponentials inline and over an index, log-sum-exp,
    x*log(x), a softmax or sigmoid named then logged) with large inputs."""
    specs = [fz.random_spec(2026, k, large=True) for k in range(300)]
    every = "\n".join(s.toml for s in specs)
    for s in specs:
        tomllib.loads(s.toml)
        assert s.large and any(v in ("large", "offset") for v in s.sampling.values()), s.describe()
    shapes = ["log(sigmoid(", "log(1 - sigmoid(", "log(1 + exp(", "log1p(exp(", ") / (exp(", "/ sum(exp(",
              "log(sum(exp(", "* log(p[b, n])", "log(q[b, n])", "log(cosh(", "q[b, n] = sigmoid(", "exp(x) / (1 + exp(x))"]
    missing = [m for m in shapes if m not in every]
    assert not missing, missing


def test_large_mode_draws_kinks():
    """The large-input mode's second sample (fuzz_specs.kink_inputs) holds exact 0, 1 and
    -1 among the large values, only 1 in a positive input, and leaves probabilities alone."""
    drawn = {}
    for k in range(40):
        spec = fz.random_spec(2026, k, large=True)
        for name, a in zip(spec.arg_names, fz.kink_inputs(spec, np.random.default_rng(k))):
            how = spec.sampling.get(name)
            if how in ("large", "offset"):
                kind = "positive" if name in spec.positive else "signed"
                drawn.setdefault(kind, set()).update(float(v) for v in np.ravel(a) if v in (0.0, 1.0, -1.0))
            elif how in ("prob", "rows"):
                assert np.all((a >= 0) & (a <= 1)), (spec.name, name)
    assert drawn["signed"] == {0.0, 1.0, -1.0}, drawn
    assert drawn.get("positive", {1.0}) == {1.0}, drawn


def test_high_precision_oracle_agrees_with_torch_on_ordinary_inputs():
    """The mpmath twin of the oracle (large mode's true value) equals the torch oracle
    where float64 is exact enough: ordinary inputs, every family but the optimizer."""
    rng = np.random.default_rng(0)
    checked = 0
    for k in range(60):
        spec = fz.random_spec(7, k, families=tuple(f for f in fz.FAMILIES if f != "optimizer"))
        args = fz.sample_inputs(spec, rng)
        try:
            torch_out = [o.numpy() for o in fz._torch_call(spec, args)[1]]
            true_out, _ = fz.mp_reference(spec, args, None, [])
        except (ZeroDivisionError, ValueError):
            continue
        for t, m in zip(torch_out, true_out):
            ok = np.isfinite(t) & (np.abs(t) < 1e6)
            np.testing.assert_allclose(m[ok], t[ok], rtol=1e-8, atol=1e-10, err_msg=spec.describe())
        checked += 1
    assert checked >= 50


def test_reference_interpreter_agrees_with_torch_functional():
    """The oracle's reads and reductions: a padded strided convolution (the window
    family's form) equals F.conv1d, a softmax written out equals F.softmax."""
    import torch
    import torch.nn.functional as F

    pos = fz.IOp("-", fz.IOp("+", fz.IOp("*", fz.IVar("o"), fz.IVar("S")), fz.IVar("p")), fz.IVar("P"))
    xr = fz.Read("x", (fz.IVar("b"), fz.IVar("c"), pos), padded=True)
    wr = fz.Read("w", (fz.IVar("f"), fz.IVar("c"), fz.IVar("p")))
    span = fz.IOp("-", fz.IOp("+", fz.IVar("N"), fz.IOp("*", fz.IConst(2), fz.IVar("P"))), fz.IVar("K"))
    conv = fz.FuzzSpec(
        "window", "layer", inputs={"x": ("B", "C", "N")}, params={"w": ("F", "C", "K")},
        outputs={"y": ("B", "F", "O")}, attrs={"S": 2, "P": 1}, derived={"O": fz.IOp("+", fz.IOp("//", span, fz.IVar("S")), fz.IConst(1))},
        sizes={"B": 2, "C": 3, "N": 7, "F": 2, "K": 3},
        equations=[fz.Equation("y", (("b", "B"), ("f", "F"), ("o", "O")),
                               fz.Red("sum", fz.Bin("*", xr, wr), (("c", "C"), ("p", "K"))))])
    rng = np.random.default_rng(0)
    x, w = torch.tensor(rng.normal(size=(2, 3, 7))), torch.tensor(rng.normal(size=(2, 3, 3)))
    (y,) = conv.reference({"x": x, "w": w})
    np.testing.assert_allclose(y.numpy(), F.conv1d(x, w, stride=2, padding=1).numpy(), rtol=1e-12, atol=1e-12)
    assert "x[b, c, o*S + p - P]" in fz.finish(conv).toml

    j = (("j", "N"),)
    e = fz.Fn("exp", (fz.Read("x", (fz.IVar("b"), fz.IVar("n"))),))
    denom = fz.Red("sum", fz.Fn("exp", (fz.Read("x", (fz.IVar("b"), fz.IVar("j"))),)), j)
    soft = fz.FuzzSpec("layer", "layer", inputs={"x": ("B", "N")}, outputs={"y": ("B", "N")}, sizes={"B": 2, "N": 5},
                       equations=[fz.Equation("y", (("b", "B"), ("n", "N")), fz.Bin("/", e, denom))])
    x = torch.tensor(rng.normal(size=(2, 5)))
    (y,) = soft.reference({"x": x})
    np.testing.assert_allclose(y.numpy(), F.softmax(x, dim=1).numpy(), rtol=1e-12)
    assert "exp(x[b, n]) / sum(exp(x[b, j]), j)" in fz.finish(soft).toml


def test_check_reports_wrong_gradients_crashes_and_refusals(monkeypatch):
    """The check can fail: a perturbed backward is wrong, a perturbed forward is wrong, a
    module that does not import is a crash, a SpecError is a refusal."""
    import codegen

    spec = KNOWN["quotient"]
    real_build = codegen.build

    def perturbed(which):
        def build(path, out_dir):
            module = real_build(path, out_dir)
            make = module.op

            class Wrapped:
                def __init__(self, op):
                    self._op = op

                def __getattr__(self, name):
                    return getattr(self._op, name)

                def forward(self, *a):
                    out = self._op.forward(*a)
                    if which == "nan":
                        out = out.copy()
                        out.reshape(-1)[0] = np.nan
                    return out * (1 + 1e-6) if which == "forward" else out

                def backward(self, *a):
                    if which == "no-check":  # an op that does not check its assumption
                        try:
                            return self._op.backward(*a)
                        except ValueError:
                            return np.zeros_like(a[1])
                    grads = self._op.backward(*a)
                    if which == "backward":
                        return (grads[0], grads[1] * 1.001)
                    return grads

            module.op = lambda **kw: Wrapped(make(**kw))
            return module
        return build

    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.setattr(codegen, "build", perturbed("backward"))
        out = fz.check(spec, tmp + "/a")
        assert out.status == "wrong" and "gradient of s" in out.message, out.report()
        monkeypatch.setattr(codegen, "build", perturbed("forward"))
        out = fz.check(spec, tmp + "/b")
        assert out.status == "wrong" and out.stage == "forward", out.report()

        def broken(path, out_dir):
            raise SyntaxError("duplicate argument 'g_u' in function definition")

        monkeypatch.setattr(codegen, "build", broken)
        out = fz.check(spec, tmp + "/c")
        assert out.status == "crash" and out.failed and "duplicate argument" in out.message
        monkeypatch.setattr(codegen, "build", real_build)
        # large-input mode: a NaN where the true value is finite is wrong, not discarded
        monkeypatch.setattr(codegen, "build", perturbed("nan"))
        big = fz.FuzzSpec(**{**spec.__dict__, "sampling": {"x": "large", "s": "large"}, "large": True})
        out = fz.check(big, tmp + "/e")
        assert out.status == "wrong" and "not finite where the true value is" in out.message, out.report()
        monkeypatch.setattr(codegen, "build", real_build)
        out = fz.check(big, tmp + "/f")
        assert out.status == "ok", out.report()
        # an assumption the backward ignores is wrong
        masked = fz.random_spec(0, 0, families=("assume",))
        monkeypatch.setattr(codegen, "build", perturbed("no-check"))
        out = fz.check(masked, tmp + "/g")
        assert out.status == "wrong" and out.stage == "assume", out.report()
        monkeypatch.setattr(codegen, "build", real_build)
        bad = fz.FuzzSpec(**{**spec.__dict__})
        bad.toml = spec.toml.replace("x[i] / s[i]", "x[i] / q[i]")
        out = fz.check(bad, tmp + "/d")
        assert out.status == "refused" and not out.failed and "q" in out.message, out.report()


def test_high_precision_oracle_takes_the_digits_its_intermediates_need():
    """cos(expm1(x) - x) at x ~ 350 reads the fractional part of a number of 152 digits:
    the oracle's precision grows with its intermediates' magnitude (50 digits gave a
    wrong "true value"), and its value and gradient match mpmath at 400 digits."""
    import mpmath

    x_ = fz.Read("x")
    expr = fz.Fn("cos", (fz.Bin("-", fz.Fn("expm1", (x_,)), x_),))
    spec = fz.FuzzSpec(family="activation", name="cos_expm1", kind="activation", inputs={"x": ("N",)},
                       equations=[fz.Equation("y", (), expr)], large=True)
    x = np.array([350.25, -3.5, 351.0])
    out, (grad,) = fz.mp_reference(spec, [x], [np.ones(3)], [0])
    with mpmath.workdps(400):
        true = [mpmath.cos(mpmath.expm1(mpmath.mpf(v)) - mpmath.mpf(v)) for v in x]
        slope = [-mpmath.sin(mpmath.expm1(mpmath.mpf(v)) - mpmath.mpf(v)) * mpmath.expm1(mpmath.mpf(v)) for v in x]
    np.testing.assert_allclose(out[0], [float(t) for t in true], rtol=1e-12)
    np.testing.assert_allclose(grad, [float(s) for s in slope], rtol=1e-9)
    with mpmath.workdps(fz.MP_DIGITS):  # what the fixed 50 digits gave: not the true value
        assert abs(float(mpmath.cos(mpmath.expm1(mpmath.mpf(350.25)) - mpmath.mpf(350.25))) - float(true[0])) > 1e-3
