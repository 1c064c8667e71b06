"""Entries whose op has several outputs (lstm_cell's h_new and c_new) name each, in the
op's order (``name = ["h", "c"]``); later entries read them by name, and the gradients
of both flow back into the op's one backward: checked against the same network in
PyTorch (loss and every parameter's gradient, float64), the fused step against
loss-and-gradients followed by the optimizer, ``hvp`` against central differences of
the gradient, and the mistakes a spec can make, each naming the file and the entry."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from model_check import assert_hvp_matches_gradient_differences, assert_steps_follow_the_optimizer
from codegen.model import ModelSpecError, check_model, render_model

OPS = ("adam", "add", "dense", "lstm_cell", "softmax_cross_entropy", "tanh")

# x -> dense (h0) -> tanh (c0); one LSTM step from (h0, c0) on x; its h and c added; dense
LAYERS = """
  { op = "dense", out = 3, name = "h0" },
  { op = "tanh", name = "c0" },
  { op = "lstm_cell", inputs = ["x", "h0", "c0"], name = ["h", "c"] },
  { op = "add", inputs = ["h", "c"] },
  { op = "dense", out = 2 },
"""


@pytest.fixture(scope="module")
def programs():
    import derive

    return [derive.build(d) for d in derive.library_defs() if d.name in OPS]


def write_spec(directory: Path, layers: str, name: str = "heads") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(
        textwrap.dedent("""\
            name = "{name}"
            kind = "model"
            input = 4
            layers = [{layers}]
            loss = "softmax_cross_entropy"
            optimizer = {{ op = "adam", lr = 0.01 }}
        """).format(name=name, layers=layers)
    )
    return path


@pytest.fixture(scope="module")
def model(programs, tmp_path_factory):
    import codegen

    tmp = tmp_path_factory.mktemp("outputs")
    rel, text = render_model(write_spec(tmp, LAYERS), programs)
    target = tmp / Path(rel).name
    target.write_text(text)
    return codegen.load_module(target)


def params_and_batch(model, seed: int, n: int = 3):
    rng = np.random.default_rng(seed)
    params = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in model.init(seed, dtype=np.float64).items()}
    x = rng.normal(size=(n, 4))
    y = np.eye(2)[rng.integers(0, 2, size=n)]
    return params, x, y


def torch_loss(p, x, y):
    h0 = x @ p["dense0.weight"] + p["dense0.bias"]
    h, c = torch.lstm_cell(x, (h0, torch.tanh(h0)), p["lstm_cell2.weight_ih"], p["lstm_cell2.weight_hh"],
                           p["lstm_cell2.bias_ih"], p["lstm_cell2.bias_hh"])  # fmt: skip
    return F.cross_entropy((h + c) @ p["dense4.weight"] + p["dense4.bias"], y)


def test_outputs_are_named_in_the_ops_order(programs, tmp_path):
    layers = check_model(write_spec(tmp_path, LAYERS), programs)["layers"]
    lstm, add = layers[2], layers[3]
    assert lstm.out_values == ("h3", "h3_c_new") and lstm.shapes_out == ((3,), (3,))
    assert add.inputs == ("h3", "h3_c_new")


def test_both_outputs_gradients_match_torch(model):
    params, x, y = params_and_batch(model, 0)
    loss, grads = model.loss_and_grads(params, x, y)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    expected = torch_loss(tparams, torch.tensor(x), torch.tensor(y))
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, "loss")
    for k in params:
        ref.assert_close(grads[k], tparams[k].grad.numpy(), np.float64, f"gradient of {k}")


def test_train_step_is_loss_and_grads_then_adam(model):
    params, x, y = params_and_batch(model, 1)
    assert_steps_follow_the_optimizer(model, params, [(x, y), (x, y)])


def test_hvp_through_both_outputs_matches_differences_of_the_gradient(model):
    params, x, y = params_and_batch(model, 2)
    rng = np.random.default_rng(3)
    v = {k: rng.normal(size=p.shape) for k, p in params.items()}
    assert_hvp_matches_gradient_differences(model, params, x, y, v)


@pytest.mark.parametrize(
    "layers, message",
    [
        (LAYERS.replace('name = ["h", "c"]', 'name = "h"'),
         r"layers\[2\] .*this op has 2 outputs \(h_new, c_new\): name each, in that order, with a list"),
        (LAYERS.replace('name = ["h", "c"]', 'name = ["h"]'), r"layers\[2\] .*'name' lists 1 names, but this op has 2 outputs \(h_new, c_new\)"),
        (LAYERS.replace(', name = ["h", "c"]', ""), r"layers\[2\] .*this op has 2 outputs \(h_new, c_new\): name each"),
        (LAYERS.replace('name = ["h", "c"]', 'name = ["h", "h"]'), r"layers\[2\] .*'name' lists a name twice"),
        (LAYERS.replace('name = ["h", "c"]', 'name = ["h", "h0"]'), r"layers\[2\] .*name 'h0' is already the name of layers\[0\]"),
        (LAYERS.replace('inputs = ["h", "c"]', 'inputs = ["h", "h"]'), r"layers\[2\] .*its output 'c' is read by no later entry"),
        (LAYERS.replace('{ op = "dense", out = 3, name = "h0" }', '{ op = "dense", out = 3, name = ["h0", "g0"] }'),
         r"layers\[0\] .*'name' lists 2 names, but this entry has one output"),
        ('{ op = "dense", out = 3, name = "h0" }, { op = "tanh", name = "c0" }, '
         '{ op = "lstm_cell", inputs = ["x", "h0", "c0"], name = ["h", "c"] }',
         r"layers\[2\] .*the last entry's output is the model's output.*2 outputs \(h_new, c_new\)"),
    ],
)
def test_mistakes_name_the_file_and_the_entry(programs, tmp_path, layers, message):
    with pytest.raises(ModelSpecError, match=r"heads\.toml: " + message):
        check_model(write_spec(tmp_path, layers), programs)


def test_the_cuda_twin_is_refused_naming_the_entry(programs, tmp_path):
    with pytest.raises(ModelSpecError, match=r"layers\[2\] \(op 'lstm_cell'\): an entry with several outputs has no cuda"):
        render_model(write_spec(tmp_path, LAYERS), programs, target="cuda")
