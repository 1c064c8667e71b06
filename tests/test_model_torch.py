"""Every model spec against the same network built in PyTorch (issue 13, part 6).

For each model spec of the library (``specs/models/*.toml``, through its generated
module) and of the tests (``tests/specs/models/*.toml``: graphs, several inputs, a
graph convolution, attributes; rendered here), the network is built again in PyTorch
entry by entry from the ops' references (tests/torch_model.py), and the model's loss
and every parameter gradient on one batch (float64, ``loss_and_grads``) must match. A
spec whose op has no PyTorch reference, or whose entry has a field the twin does not
know, fails naming what is missing: no model spec is passed over.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as ref
import torch_model as tm

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted((ROOT / "specs" / "models").glob("*.toml"))
TESTS = sorted((Path(__file__).resolve().parent / "specs" / "models").glob("*.toml"))


def _module(path: Path, out_dir: Path):
    """The library's generated module, or a test spec's module rendered into ``out_dir``
    (with the library's ops that it names, derived here)."""
    import codegen
    import derive
    from codegen.model import load_spec, render_model

    spec = load_spec(path)
    if path.parent == ROOT / "specs" / "models":
        return importlib.import_module(f"generated.models.{spec['name']}")
    names = {e["op"] for e in spec["layers"]} | {"add"}
    names |= {v["op"] if isinstance(v, dict) else v for v in (spec["loss"], spec["optimizer"])}
    rel, text = render_model(path, [derive.build(d) for n, d in tm.op_defs().items() if n in names])
    target = out_dir / rel.split("/")[-1]
    target.write_text(text)
    return codegen.load_module(target)


def _params(model, seed: int) -> dict:
    """The module's initial parameters (float64), each entry moved a little at random, so
    that no bias sits at 0 and no scale at 1 (where a wrong term could vanish)."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.1 * rng.normal(size=v.shape) for k, v in model.init(seed, np.float64).items()}


@pytest.mark.parametrize("path", LIBRARY + TESTS, ids=lambda p: ("tests/" if p in TESTS else "") + p.stem)
def test_model_loss_and_gradients_match_the_network_in_torch(path, tmp_path):
    model = _module(path, tmp_path)
    twin = tm.TorchTwin(path, model)
    rng = np.random.default_rng(0)
    params = _params(model, 0)
    x, y = twin.batch(rng)
    loss, grads = model.loss_and_grads(params, x, y)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    expected = twin.loss(tparams, x, y)
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, f"{path.name}: loss")
    assert list(grads) == list(model.PARAM_SHAPES) == list(tparams)
    for k, t in tparams.items():
        assert t.grad is not None, f"{path.name}: {k} does not reach the loss in the torch network"
        ref.assert_close(grads[k], t.grad.numpy(), np.float64, f"{path.name}: gradient of {k}")


def test_the_library_and_the_tests_have_model_specs():
    assert len(LIBRARY) >= 7 and len(TESTS) >= 5


def _library_twin(name: str):
    path = ROOT / "specs" / "models" / f"{name}.toml"
    return tm.TorchTwin(path, _module(path, None))


def test_an_op_without_a_torch_reference_fails_naming_it(monkeypatch):
    monkeypatch.delitem(ref.TORCH_ORACLE, "add")
    with pytest.raises(tm.TwinError, match=r"resnet_digits\.toml: layers\[8\] \(op 'add'\): the library op 'add' has no "
                       r"PyTorch reference in tests/reference\.py"):
        _library_twin("resnet_digits")


def test_an_entry_field_the_twin_does_not_know_fails_naming_it(monkeypatch):
    monkeypatch.setattr(tm, "ENTRY_FIELDS", tuple(f for f in tm.ENTRY_FIELDS if f != "unroll"))
    with pytest.raises(tm.TwinError, match=r"gru_majority\.toml: layers\[0\] \(op 'gru_cell'\): the PyTorch twin does "
                       r"not know the entry field 'unroll'"):
        _library_twin("gru_majority")


def test_a_parameter_the_twin_does_not_place_fails_naming_it(monkeypatch):
    model = _module(ROOT / "specs" / "models" / "mlp_digits.toml", None)
    monkeypatch.setattr(model, "PARAM_SHAPES", {**model.PARAM_SHAPES, "dense9.weight": (2, 2)})
    with pytest.raises(tm.TwinError, match=r"mlp_digits\.toml: layers: the module has parameters the twin placed in no "
                       r"entry: dense9\.weight"):
        tm.TorchTwin(ROOT / "specs" / "models" / "mlp_digits.toml", model)
