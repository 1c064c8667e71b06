"""A user's own TOML spec becomes a working module: the four example specs of
DESIGN.md (tests/specs/*.toml, written exactly as there) build with ``codegen.build``
and ``python -m codegen SPEC --out DIR``, and their kernels agree with PyTorch and with
finite differences on the CPU and on CUDA (the simulator unless a GPU is lent)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref

SPECS = Path(__file__).resolve().parent / "specs"
REPO = SPECS.parent.parent
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def _logcosh(pred, target):
    return torch.log(torch.cosh(pred - target)).sum() / pred.shape[0]


USER_ORACLE = {
    "mish": lambda x: x * torch.tanh(F.softplus(x)),
    "bilinear": lambda x1, x2, weight, bias: F.bilinear(x1, x2, weight, bias),  # weight (K, I, J)
    "logcosh": _logcosh,
    "max_pool2d": lambda x, K=2, S=2: F.max_pool2d(x, K, S),
}


@dataclass(frozen=True)
class UserCase:
    spec: str
    shapes: tuple[tuple[int, ...], ...]
    attrs: tuple[tuple[str, int], ...] = ()
    differentiable: tuple[int, ...] = ()

    @property
    def id(self):
        return self.spec + "".join(f"-{k}={v}" for k, v in self.attrs)


CASES = [
    UserCase("mish", ((3, 5),), differentiable=(0,)),
    # B=3, I=5, J=4, K=2
    UserCase("bilinear", ((3, 5), (3, 4), (2, 5, 4), (2,)), differentiable=(0, 1, 2, 3)),
    UserCase("logcosh", ((3, 5), (3, 5)), differentiable=(0,)),
    # odd sizes: windows that do not tile the image; attrs default, and given at run time
    UserCase("max_pool2d", ((2, 2, 7, 5),), differentiable=(0,)),
    UserCase("max_pool2d", ((2, 2, 7, 5),), (("K", 2), ("S", 2)), differentiable=(0,)),
    UserCase("max_pool2d", ((1, 2, 7, 5),), (("K", 3), ("S", 1)), differentiable=(0,)),
]
PARAMS = [pytest.param(c, id=c.id) for c in CASES]


class _Built(dict):
    """spec name -> module, built on first use (once per session, see conftest)."""

    def __init__(self, build):
        super().__init__()
        self.build = build

    def __missing__(self, spec):
        self[spec] = self.build(SPECS / f"{spec}.toml")
        return self[spec]


@pytest.fixture
def modules(build_spec):
    return _Built(build_spec)


def user_op(modules, case: UserCase, target: str = "cpu"):
    return modules[case.spec].op(target=target, **dict(case.attrs))


def inputs(case: UserCase, rng, dtype=np.float64):
    args = [rng.normal(size=s) for s in case.shapes]
    return ref.cast(args, dtype)


def oracle_forward(case, args):
    with torch.no_grad():
        return USER_ORACLE[case.spec](*[torch.tensor(np.asarray(a, np.float64)) for a in args], **dict(case.attrs)).numpy()


def oracle_vjp(case, args, seed):
    ts = [torch.tensor(np.asarray(a, np.float64), requires_grad=i in case.differentiable) for i, a in enumerate(args)]
    out = USER_ORACLE[case.spec](*ts, **dict(case.attrs))
    seed_t = torch.tensor(np.asarray(seed, np.float64)).reshape(out.shape)
    return [g.numpy() for g in torch.autograd.grad(out, [ts[i] for i in case.differentiable], seed_t)]


# ---------------------------------------------------------------- building


@pytest.mark.parametrize("spec", ["mish", "bilinear", "logcosh", "max_pool2d"])
def test_spec_builds_to_a_module_following_the_contract(modules, spec):
    op = modules[spec].op()
    assert op.name == spec
    assert op.kind == {"mish": "activation", "logcosh": "loss"}.get(spec, "layer")
    assert isinstance(op.latex(), str) and op.latex()


def test_differentiate_key_limits_the_gradients(modules):
    op = modules["logcosh"].op()
    assert tuple(op.differentiable) == ("pred",)


def test_max_pool2d_attrs_default_and_given_at_run_time(modules):
    assert modules["max_pool2d"].op().attrs == {"K": 2, "S": 2}
    assert modules["max_pool2d"].op(K=3, S=1).attrs == {"K": 3, "S": 1}


def test_cli_writes_the_module(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "codegen", str(SPECS / "mish.toml"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    module = out / "mish.py"
    assert module.is_file(), sorted(p.name for p in out.iterdir()) if out.exists() else "no output dir"
    head = module.read_text()[:2000]
    assert "mish.toml" in head, "the header names the spec it came from"
    assert "do not edit" in head.lower()


def test_toml_twin_of_a_library_op_computes_the_same(modules, rng):
    """tests/specs/mish.toml is the TOML twin of the library's mish: same Op, same code."""
    import generated

    lib, user = generated.op("mish"), modules["mish"].op()
    x, gy = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    np.testing.assert_array_equal(user.forward(x), lib.forward(x))
    np.testing.assert_array_equal(user.backward(gy, x), lib.backward(gy, x))


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PARAMS)
def test_forward_matches_torch(modules, case, dtype, target, rng):
    op = user_op(modules, case, target)
    args = inputs(case, rng, dtype)
    out = op.forward(*args)
    expected = oracle_forward(case, args)
    assert np.shape(out) == expected.shape
    assert np.asarray(out).dtype == np.dtype(dtype)
    ref.assert_close(out, expected, dtype, f"{case.id} forward on {target}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PARAMS)
def test_backward_matches_torch(modules, case, dtype, target, rng):
    op = user_op(modules, case, target)
    args = inputs(case, rng, dtype)
    (seed,) = ref.make_seeds([op.forward(*args)], rng, dtype)
    grads = ref.as_tuple(op.backward(seed, *args))
    expected = oracle_vjp(case, args, seed)
    assert len(grads) == len(case.differentiable)
    for i, g, e in zip(case.differentiable, grads, expected):
        assert np.shape(g) == e.shape
        assert np.asarray(g).dtype == np.dtype(dtype)
        ref.assert_close(g, e, dtype, f"{case.id} on {target}: gradient of argument {i}")


@pytest.mark.parametrize("case", PARAMS)
def test_backward_matches_finite_differences(modules, case, rng):
    op = user_op(modules, case)
    args = inputs(case, rng)
    seeds = ref.make_seeds([op.forward(*args)], rng, np.float64)
    grads = ref.as_tuple(op.backward(*seeds, *args))
    numeric = ref.numerical_vjp(op.forward, args, seeds, case.differentiable)
    for i, g, e in zip(case.differentiable, grads, numeric):
        ref.assert_close(g, e, np.float64, f"{case.id}: gradient of argument {i}", ref.FD_TOL)
