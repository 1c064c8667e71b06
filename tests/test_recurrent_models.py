"""Recurrence in model specs: a cell op (a step input and its states, one shaped as each
output: rnn_cell, gru_cell, lstm_cell's h and c) with ``unroll = true`` runs over the
first axis of each sample from zero states and passes on its last (first) state, or
with ``return_sequences = true`` that state at every step (stacked layers); its
gradients are backpropagation through time, matching PyTorch's cells unrolled by hand
and central differences; the fused ``train_step`` equals loss-and-gradients followed by
the optimizer; the GRU and the stacked LSTM examples learn their tasks."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from model_check import assert_hvp_matches_gradient_differences, assert_steps_follow_the_optimizer
from codegen.model import ModelSpecError, check_model, render_model

REPO = Path(__file__).resolve().parent.parent
MAJORITY_ACCURACY = 0.95
# the stacked LSTM after 3 epochs (its example trains 10, to 100% on the main job's run)
TEMPORAL_ORDER_ACCURACY = 0.95

# the library ops these tests compose (derived once)
OPS = ("adam", "dense", "mse", "relu", "rnn_cell", "softmax_cross_entropy", "tanh")


@pytest.fixture(scope="module")
def programs():
    import derive

    return [derive.build(d) for d in derive.library_defs() if d.name in OPS]


@pytest.fixture
def spec(tmp_path):
    """``spec(input, layers)`` -> the path of a model spec (softmax cross-entropy, adam)."""

    def write(input, layers, name="seq"):
        path = tmp_path / f"{name}.toml"
        path.write_text(
            textwrap.dedent(f"""\
                name = "{name}"
                kind = "model"
                input = {input}
                layers = [{layers}]
                loss = "softmax_cross_entropy"
                optimizer = {{ op = "adam", lr = 0.01 }}
            """)
        )
        return path

    return write


def build(programs, path, tmp_path):
    import codegen

    rel, text = render_model(path, programs)
    target = tmp_path / Path(rel).name
    target.write_text(text)
    return codegen.load_module(target)


def batch(rng, model, n=4):
    x = rng.normal(size=(n,) + model.INPUT_SHAPE)
    y = np.eye(model.OUTPUT)[rng.integers(0, model.OUTPUT, size=n)]
    return x, y


def torch_unrolled(cell, x, params: dict, prefix: str, sequences: bool = False):
    """The last state of ``cell`` run over axis 1 of ``x`` from zeros, in torch (every
    state, (B, T, H), with ``sequences``)."""
    w_ih, w_hh, b_ih, b_hh = (params[f"{prefix}.{k}"] for k in ("w_ih", "w_hh", "b_ih", "b_hh"))
    h = torch.zeros(x.shape[0], w_hh.shape[1], dtype=x.dtype)
    states = []
    for step in range(x.shape[1]):
        h = cell(x[:, step], h, w_ih, w_hh, b_ih, b_hh)
        states.append(h)
    return torch.stack(states, dim=1) if sequences else h


def torch_lstm(x, params: dict, prefix: str, sequences: bool = False):
    """torch.lstm_cell run over axis 1 of ``x`` from zero h and c: the last h (every h with
    ``sequences``)."""
    w_ih, w_hh, b_ih, b_hh = (params[f"{prefix}.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    h = torch.zeros(x.shape[0], w_hh.shape[1], dtype=x.dtype)
    c = torch.zeros_like(h)
    states = []
    for step in range(x.shape[1]):
        h, c = torch.lstm_cell(x[:, step], (h, c), w_ih, w_hh, b_ih, b_hh)
        states.append(h)
    return torch.stack(states, dim=1) if sequences else h


def assert_grads_match_torch(model, params, x, y, torch_loss):
    loss, grads = model.loss_and_grads(params, x, y)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    expected = torch_loss(tparams)
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, "loss")
    assert sorted(grads) == sorted(params)
    for k in params:
        ref.assert_close(grads[k], tparams[k].grad.numpy(), np.float64, f"gradient of {k}")


def assert_train_step_is_loss_and_grads_then_adam(model, params, rng, steps=2):
    assert_steps_follow_the_optimizer(model, params, [batch(rng, model) for _ in range(steps)])


# ------------------------------------------------------------------------- specs


def test_an_unrolled_cell_maps_a_sequence_to_its_last_state(programs, spec):
    context = check_model(spec("[7, 3]", '{ op = "rnn_cell", out = 5, unroll = true }, { op = "dense", out = 2 }'), programs)
    layer = context["layers"][0]
    assert (layer.shape_in, layer.shape_out) == ((7, 3), (5,))
    assert {p.key: p.shape for p in layer.params} == {
        "rnn_cell0.w_ih": (5, 3),
        "rnn_cell0.w_hh": (5, 5),
        "rnn_cell0.b_ih": (5,),
        "rnn_cell0.b_hh": (5,),
    }


def test_a_cell_weights_fan_in_is_its_input_or_state_size(programs, spec):
    context = check_model(spec("[7, 3]", '{ op = "rnn_cell", out = 5, unroll = true }, { op = "dense", out = 2 }'), programs)
    inits = {p.arg: (p.init, p.fan_in) for p in context["layers"][0].params}
    assert inits == {"w_ih": ("fan_in", 3), "w_hh": ("fan_in", 5), "b_ih": ("zeros", 1), "b_hh": ("zeros", 1)}


def test_a_cell_without_unroll_is_told_to_unroll(programs, spec):
    with pytest.raises(ModelSpecError, match=r"layers\[0\] .*takes 2 inputs.*add unroll = true"):
        check_model(spec("[7, 3]", '{ op = "rnn_cell", out = 5 }, { op = "dense", out = 2 }'), programs)


def test_unroll_needs_a_cell(programs, spec):
    with pytest.raises(ModelSpecError, match=r"layers\[0\] .*'unroll' needs a cell.*this one has 1"):
        check_model(spec("[7, 3]", '{ op = "dense", out = 5, unroll = true }'), programs)


def test_return_sequences_passes_on_every_state(programs, spec):
    context = check_model(
        spec("[7, 3]", '{ op = "rnn_cell", out = 5, unroll = true, return_sequences = true }, '
             '{ op = "rnn_cell", out = 4, unroll = true }, { op = "dense", out = 2 }'),
        programs,
    )  # fmt: skip
    first, second = context["layers"][:2]
    assert (first.shape_in, first.shape_out, first.cell.sequences) == ((7, 3), (7, 5), True)
    assert (second.shape_in, second.shape_out, second.cell.sequences) == ((7, 5), (4,), False)
    assert {p.key: p.shape for p in second.params}["rnn_cell1.w_ih"] == (4, 5)


@pytest.mark.parametrize(
    "layers, message",
    [
        ('{ op = "rnn_cell", out = 5, return_sequences = true }', r"'return_sequences' is for a cell unrolled over time \(unroll = true\)"),
        ('{ op = "rnn_cell", out = 5, unroll = true, return_sequences = 1 }', r"'return_sequences' must be true or false, got 1"),
        ('{ op = "rnn_cell", out = 5, unroll = true }, { op = "rnn_cell", out = 5, unroll = true }',
         r"layers\[1\] .*shape mismatch: the cell runs over the first axis of layers\[0\] \(op 'rnn_cell'\)'s shape \(5,\)"),
    ],
)
def test_return_sequences_errors_name_the_entry(programs, spec, layers, message):
    with pytest.raises(ModelSpecError, match=r"seq\.toml: .*" + message):
        check_model(spec("[7, 3]", layers + ', { op = "dense", out = 2 }'), programs)


def test_unroll_needs_a_time_axis(programs, spec):
    with pytest.raises(ModelSpecError, match=r"layers\[0\] .*shape mismatch.*first axis of the input's shape \(3,\)"):
        check_model(spec("[3]", '{ op = "rnn_cell", out = 5, unroll = true }, { op = "dense", out = 2 }'), programs)


# ------------------------------------------------------------ gradients through time


@pytest.fixture(scope="module")
def rnn(programs, tmp_path_factory):
    """tanh -> rnn_cell unrolled over 4 steps of 2 features, returning every state ->
    rnn_cell over those states -> dense: the step gradient flows back through both cells
    to the layer before them, the first's at each step the sum of what reaches its output
    there and what its next state passes back."""
    tmp = tmp_path_factory.mktemp("rnn")
    path = tmp / "seq.toml"
    path.write_text(
        textwrap.dedent("""\
            name = "seq"
            kind = "model"
            input = [4, 2]
            layers = [
              { op = "tanh" }, { op = "rnn_cell", out = 3, unroll = true, return_sequences = true },
              { op = "rnn_cell", out = 3, unroll = true }, { op = "dense", out = 2 },
            ]
            loss = "softmax_cross_entropy"
            optimizer = { op = "adam", lr = 0.01 }
        """)
    )
    return build(programs, path, tmp)


def test_unrolled_rnn_gradients_match_torch(rnn, rng):
    params = rnn.init(0, dtype=np.float64)
    x, y = batch(rng, rnn)

    def torch_loss(p):
        hs = torch_unrolled(torch.rnn_tanh_cell, torch.tanh(torch.tensor(x)), p, "rnn_cell1", sequences=True)
        h = torch_unrolled(torch.rnn_tanh_cell, hs, p, "rnn_cell2")
        return F.cross_entropy(h @ p["dense3.weight"] + p["dense3.bias"], torch.tensor(y))

    assert_grads_match_torch(rnn, params, x, y, torch_loss)


def test_unrolled_train_step_is_loss_and_grads_then_adam(rnn, rng):
    assert_train_step_is_loss_and_grads_then_adam(rnn, rnn.init(1, dtype=np.float64), rng)


# ------------------------------------------------------------- the GRU example


@pytest.fixture(scope="module")
def gru():
    from generated.models import gru_majority

    return gru_majority


def test_gru_module_gradients_match_torch(gru, rng):
    params = gru.init(0, dtype=np.float64)
    x, y = batch(rng, gru)

    def torch_loss(p):
        h = torch_unrolled(torch.gru_cell, torch.tensor(x), p, "gru_cell0")
        return F.cross_entropy(h @ p["dense1.weight"] + p["dense1.bias"], torch.tensor(y))

    assert_grads_match_torch(gru, params, x, y, torch_loss)


def test_gru_train_step_is_loss_and_grads_then_adam(gru, rng):
    assert_train_step_is_loss_and_grads_then_adam(gru, gru.init(1, dtype=np.float64), rng)


# -------------------------------------------------------- the stacked LSTM example


@pytest.fixture(scope="module")
def lstm():
    from generated.models import lstm_temporal_order

    return lstm_temporal_order


def lstm_params(model, seed):
    """Parameters away from the initial zero biases (every gate's path is exercised)."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.2 * rng.normal(size=v.shape) for k, v in model.init(seed, dtype=np.float64).items()}


def test_stacked_lstm_gradients_match_torch(lstm, rng):
    """Both layers carry h and c; the first returns every h, which the second reads: the
    loss and every parameter's gradient are torch.lstm_cell's unrolled by hand."""
    params = lstm_params(lstm, 0)
    x, y = batch(rng, lstm, n=3)

    def torch_loss(p):
        hs = torch_lstm(torch.tensor(x), p, "lstm_cell0", sequences=True)
        h = torch_lstm(hs, p, "lstm_cell1")
        return F.cross_entropy(h @ p["dense2.weight"] + p["dense2.bias"], torch.tensor(y))

    assert_grads_match_torch(lstm, params, x, y, torch_loss)


def test_stacked_lstm_gradients_match_finite_differences(lstm, rng):
    """The directional derivative of the loss along a random direction of each parameter,
    by central differences, is the gradient's inner product with it."""
    params = lstm_params(lstm, 1)
    x, y = batch(rng, lstm, n=2)
    _, grads = lstm.loss_and_grads(params, x, y)
    h = 1e-6
    for key, value in params.items():
        direction = rng.normal(size=value.shape)
        shifted = [{**params, key: value + sign * h * direction} for sign in (1, -1)]
        numerical = (lstm.loss(shifted[0], x, y) - lstm.loss(shifted[1], x, y)) / (2 * h)
        ref.assert_close(np.sum(grads[key] * direction), numerical, np.float64, f"directional derivative along {key}",
                         ref.Tol(rtol=1e-6, atol=1e-8))


def test_stacked_lstm_train_step_is_loss_and_grads_then_adam(lstm, rng):
    assert_train_step_is_loss_and_grads_then_adam(lstm, lstm_params(lstm, 2), rng)


@pytest.mark.parametrize("model", ["rnn", "lstm"])
def test_hvp_through_time_matches_differences_of_the_gradient(model, request):
    """Forward over reverse through the time loop (rnn: tanh below two stacked cells, so
    the step input's tangent and gradient run too; lstm: h and c, return_sequences)."""
    module = request.getfixturevalue(model)
    rng = np.random.default_rng(5)
    params = lstm_params(module, 3) if model == "lstm" else module.init(3, dtype=np.float64)
    x, y = batch(rng, module, n=2)
    v = {k: rng.normal(size=p.shape) for k, p in params.items()}
    assert_hvp_matches_gradient_differences(module, params, x, y, v)


@pytest.mark.parametrize(
    "model, forward, kept",
    [("rnn", "_rnn_cell_fwd_core(", "hs3[step + 1]"), ("gru", "_gru_cell_fwd_saving_core(", "kept0_r[step]")],
)
def test_backpropagation_through_time_takes_what_each_step_kept(model, forward, kept, request):
    """The unrolled forward keeps, per time step, what its backward reads of the
    step's reductions (the GRU's gates in lists; the RNN's is its new state, which the
    states array holds anyway), and the backward at that step takes it instead of
    recomputing the step's forward (the train-step tests above check the numbers)."""
    import inspect

    module = request.getfixturevalue(model)
    step = inspect.getsource(module)
    step = step[step.index("def _train_step"):]
    assert forward in step
    backward = next(line for line in step.splitlines() if "_cell_bwd" in line)
    assert "_bwd_saved_core(" in backward and kept in backward, backward


@pytest.fixture(scope="module")
def trainer():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import trainer as module
    finally:
        sys.path.remove(str(REPO / "examples"))
    return module


@pytest.mark.slow
def test_gru_learns_the_majority_of_a_bit_sequence(trainer, tmp_path):
    example = trainer.EXAMPLES["gru_majority"]
    config = trainer.Config(
        spec=str(example.spec), out=str(tmp_path / "run"), dataset=example.dataset, epochs=example.epochs,
        batch_size=example.batch_size, seed=0, progress=False, plot=False,
    )  # fmt: skip
    result = trainer.train(config, log=lambda *a: None)
    assert result["test_accuracy"] >= MAJORITY_ACCURACY, result["history"][-1]


@pytest.mark.slow
def test_stacked_lstm_learns_the_temporal_order_problem(trainer, tmp_path):
    """Three epochs in float64 (the fused step the train-step test compiles): the example's
    own ten epochs reach 100% in the main job."""
    example = trainer.EXAMPLES["lstm_temporal_order"]
    config = trainer.Config(
        spec=str(example.spec), out=str(tmp_path / "run"), dataset=example.dataset, epochs=3,
        batch_size=example.batch_size, seed=0, dtype="float64", progress=False, plot=False,
    )  # fmt: skip
    result = trainer.train(config, log=lambda *a: None)
    assert result["test_accuracy"] >= TEMPORAL_ORDER_ACCURACY, result["history"][-1]
