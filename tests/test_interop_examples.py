"""The PyTorch and JAX examples of user ops (issue 15): a user's activation and loss
(examples/specs/) built with codegen.build and trained on the digits, for two epochs;
and a user op rebuilt in the same process."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import REPO

import codegen


def _example(name):
    spec = importlib.util.spec_from_file_location("example_" + name, REPO / "examples" / (name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("user_ops")


@pytest.fixture
def torch_defaults():
    """PyTorch's own default dtype (float32), as a user's fresh process has it: some test
    modules (tests/fuzz_specs.py) switch the worker's default to float64 on import."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(default)


@pytest.mark.parametrize("example", ["torch_user_op", "jax_user_op"])
def test_example_trains(example, build_dir, capsys, torch_defaults):
    accuracy = _example(example).main(["--epochs", "2", "--build-dir", str(build_dir)])
    out = capsys.readouterr().out
    assert "epoch  2" in out
    assert accuracy > 0.75, out  # chance is 0.1


def test_user_op_rebuilt_in_the_same_process(build_dir):
    """codegen.build imports a fresh module each time; its torch function takes over the
    registration (PyTorch cannot replace a custom operator) and runs the new kernels,
    and gradcheck holds for the user's derived backward."""
    spec = REPO / "examples" / "specs" / "squareplus.toml"
    first = codegen.build(spec, build_dir).op(b=2.0)
    second = codegen.build(spec, build_dir).op(b=2.0)
    assert first._funcs["forward"] is not second._funcs["forward"]
    f = first.torch()
    assert second.torch() is f
    x = torch.linspace(-3.0, 3.0, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(f(x), (x + torch.sqrt(x * x + 2.0)) / 2, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(f, (x,))
    np.testing.assert_allclose(np.asarray(second.jax()(x.detach().numpy())), f(x).detach().numpy(), rtol=1e-6)
