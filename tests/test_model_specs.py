"""Model specs (codegen/model.py): shapes flow through layers of any rank, sizes come
from the op's Programs (input dims, ``out``, dims by name, derived dims), parameters
are initialised by their role, and bad specs fail with messages naming the file, the
layer entry and the problem."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from model_check import assert_steps_follow_the_optimizer
from codegen.model import ModelSpecError, check_model, render_model

# the library ops these tests compose (derived once: gru_cell would be slow)
OPS = (
    "adam", "conv2d", "dense", "dropout", "dropout_mask", "flatten", "layer_norm", "log_softmax", "max_pool2d", "mse",
    "nll", "relu", "rnn_cell", "softmax", "softmax_cross_entropy",
)  # fmt: skip
# every library optimizer: a model's fused step must compile and run for each
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")


@pytest.fixture(scope="module")
def programs():
    import derive

    return [derive.build(d) for d in derive.library_defs() if d.name in OPS + OPTIMIZERS]


@pytest.fixture
def spec(tmp_path):
    """``spec(input, layers, loss=...)`` -> the path of a model spec with those fields."""

    def write(input, layers, loss='"softmax_cross_entropy"', name="m", optimizer='{ op = "adam", lr = 0.001 }'):
        text = f"""
            name = "{name}"
            kind = "model"
            input = {input}
            layers = [
            {textwrap.indent(layers.strip(), " " * 12).strip()}
            ]
            loss = {loss}
            optimizer = {optimizer}
        """
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


CNN = """
{ op = "conv2d", out = 8, KH = 3, KW = 3, P = 1 },
{ op = "relu" },
{ op = "max_pool2d" },
{ op = "flatten" },
{ op = "dense", out = 10 },
"""


def shapes(context):
    return [(layer.op, layer.shape_in, layer.shape_out) for layer in context["layers"]]


def params(context):
    return {p.key: p for p in context["params"]}


def fails(programs, path, *patterns):
    with pytest.raises(ModelSpecError) as info:
        check_model(path, programs)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in: {message}"
    return message


# ------------------------------------------------------------------ shapes and sizes


def test_shapes_flow_through_conv_pool_flatten_dense(programs, spec):
    context = check_model(spec("[1, 8, 8]", CNN), programs)
    assert shapes(context) == [
        ("conv2d", (1, 8, 8), (8, 8, 8)),
        ("relu", (8, 8, 8), (8, 8, 8)),
        ("max_pool2d", (8, 8, 8), (8, 4, 4)),
        ("flatten", (8, 4, 4), (128,)),
        ("dense", (128,), (10,)),
    ]


def test_an_integer_input_is_one_feature_axis(programs, spec):
    context = check_model(spec("64", '{ op = "dense", out = 10 }'), programs)
    assert shapes(context) == [("dense", (64,), (10,))]


def test_derived_dims_use_the_entry_attributes(programs, spec):
    layers = '{ op = "conv2d", out = 4, KH = 3, KW = 5, S = 2 }, { op = "flatten" }, { op = "dense", out = 2 }'
    context = check_model(spec("[3, 9, 11]", layers), programs)
    # HO = floor((9 - 3)/2) + 1 = 4, WO = floor((11 - 5)/2) + 1 = 4
    assert shapes(context)[0] == ("conv2d", (3, 9, 11), (4, 4, 4))
    assert params(context)["conv2d0.weight"].shape == (4, 3, 3, 5)


def test_parameters_are_sized_from_input_out_and_named_dims(programs, spec):
    ps = params(check_model(spec("[1, 8, 8]", CNN), programs))
    assert {k: p.shape for k, p in ps.items()} == {
        "conv2d0.weight": (8, 1, 3, 3),
        "conv2d0.bias": (8,),
        "dense4.weight": (128, 10),
        "dense4.bias": (10,),
    }


# ----------------------------------------------------------------- initialisation


def test_weights_are_drawn_with_the_fan_in_of_their_summed_dims(programs, spec):
    ps = params(check_model(spec("[2, 8, 8]", CNN), programs))
    assert (ps["conv2d0.weight"].init, ps["conv2d0.weight"].fan_in) == ("fan_in", 2 * 3 * 3)
    assert (ps["dense4.weight"].init, ps["dense4.weight"].fan_in) == ("fan_in", 8 * 4 * 4)


def test_biases_start_at_zero_and_scales_at_one(programs, spec):
    layers = '{ op = "dense", out = 6 }, { op = "layer_norm" }, { op = "dense", out = 3 }'
    ps = params(check_model(spec("5", layers), programs))
    assert ps["dense0.bias"].init == "zeros"
    assert ps["layer_norm1.weight"].init == "ones"
    assert ps["layer_norm1.bias"].init == "zeros"


def test_init_draws_weights_in_their_bound(programs, spec, tmp_path):
    import codegen

    model = codegen.load_module(_write_module(programs, spec("[1, 8, 8]", CNN), tmp_path))
    p = model.init(0, dtype=np.float64)
    assert np.abs(p["conv2d0.weight"]).max() <= 1 / 3 and np.abs(p["conv2d0.weight"]).max() > 0.2
    assert not p["conv2d0.bias"].any() and not p["dense4.bias"].any()


def _write_module(programs, path, out_dir):
    rel, text = render_model(path, programs)
    target = out_dir / rel.split("/")[-1]
    target.write_text(text)
    return target


# ------------------------------------------------------------------------- errors


def test_a_missing_kernel_size_is_an_unknown_dim(programs, spec):
    path = spec("[1, 8, 8]", '{ op = "conv2d", out = 8 }, { op = "flatten" }, { op = "dense", out = 10 }')
    fails(programs, path, r"layers\[0\] \{ op = \"conv2d\", out = 8 \}", r"unknown dimension KH", r"KH = <size>")


def test_a_missing_out_is_named(programs, spec):
    path = spec("[1, 8, 8]", '{ op = "conv2d", KH = 3, KW = 3 }, { op = "flatten" }, { op = "dense", out = 10 }')
    fails(programs, path, r"layers\[0\]", r"unknown dimension 'O'", r"out = <size>")


def test_dense_after_conv_without_flatten_is_a_shape_mismatch(programs, spec):
    path = spec("[1, 8, 8]", '{ op = "conv2d", out = 8, KH = 3, KW = 3 }, { op = "dense", out = 10 }')
    fails(
        programs, path, r"layers\[1\] \{ op = \"dense\", out = 10 \}", "shape mismatch",
        r"\(B, I\)", r"\(8, 6, 6\)", r'op = "flatten"',
    )  # fmt: skip


def test_a_kernel_larger_than_the_input_is_a_non_positive_derived_size(programs, spec):
    path = spec("[1, 8, 8]", '{ op = "conv2d", out = 8, KH = 9, KW = 3 }, { op = "flatten" }, { op = "dense", out = 10 }')
    fails(programs, path, r"layers\[0\]", r"derived dimension HO", r"is 0 at", "must be positive")


def test_pooling_a_too_small_map_is_a_non_positive_derived_size(programs, spec):
    layers = "{ op = \"max_pool2d\", K = 3, S = 3 }, { op = \"flatten\" }, { op = \"dense\", out = 2 }"
    # HC: the output size rounded (down, or up with ceil_mode), before PyTorch's last-window rule
    fails(programs, spec("[1, 2, 2]", layers), r"layers\[0\]", r"derived dimension HC", "must be positive")


def test_a_dim_the_input_sets_cannot_be_given(programs, spec):
    path = spec("[1, 8, 8]", '{ op = "conv2d", out = 8, KH = 3, KW = 3, C = 3 }, { op = "flatten" }, { op = "dense", out = 10 }')
    fails(programs, path, r"dimension 'C' is set by the layer's input \(C = 1\)")


def test_a_derived_dim_cannot_be_given(programs, spec):
    path = spec("[1, 8, 8]", '{ op = "conv2d", out = 8, KH = 3, KW = 3, HO = 4 }, { op = "flatten" }, { op = "dense", out = 10 }')
    fails(programs, path, r"dimension 'HO' is derived")


def test_out_and_its_dim_by_name_is_given_twice(programs, spec):
    fails(programs, spec("4", '{ op = "dense", out = 3, O = 3 }'), "given twice")


def test_an_unknown_field_lists_what_the_layer_takes(programs, spec):
    fails(programs, spec("4", '{ op = "dense", out = 3, width = 3 }'), r"unknown field 'width'", r"this layer takes: out")


def test_out_on_an_op_without_a_new_dim_is_refused(programs, spec):
    fails(programs, spec("[1, 8, 8]", '{ op = "flatten", out = 64 }, { op = "dense", out = 2 }'), "'out' is not used")


def test_an_integer_attribute_must_be_an_integer(programs, spec):
    path = spec("[1, 8, 8]", '{ op = "conv2d", out = 8, KH = 3, KW = 3, P = 0.5 }, { op = "flatten" }, { op = "dense", out = 2 }')
    fails(programs, path, r"attribute 'P' must be an integer")


def test_a_loss_after_an_image_is_a_shape_mismatch(programs, spec):
    fails(programs, spec("[1, 8, 8]", '{ op = "relu" }'), r"loss \(op 'softmax_cross_entropy'\)", "shape mismatch", r'op = "flatten"')


def test_an_op_with_two_inputs_is_not_a_feedforward_layer(programs, spec):
    fails(programs, spec("4", '{ op = "dropout_mask" }'), r"takes 2 inputs \(x \(B, N\), mask \(B, N\)\)")


def test_the_input_must_be_a_shape(programs, spec):
    fails(programs, spec("[1, 0]", '{ op = "dense", out = 2 }'), r"input: must be a positive integer")


def test_a_model_without_parameters_has_nothing_to_train(programs, spec):
    fails(programs, spec("10", '{ op = "relu" }'), r"layers: no layer has parameters, so there is nothing to train")


@pytest.mark.parametrize("name", ["__init__", "_private", "9lives", "class"])
def test_the_name_must_be_a_module_name_of_its_own(programs, spec, name):
    path = spec("4", '{ op = "dense", out = 2 }', name="m")
    path.write_text(path.read_text().replace('name = "m"', f'name = "{name}"'))
    fails(programs, path, r"name: must be a lower-case Python identifier starting with a letter")


def test_two_model_specs_cannot_share_a_name(programs, tmp_path):
    import codegen

    for stem in ("a", "b"):
        (tmp_path / f"{stem}.toml").write_text(
            'name = "same"\nkind = "model"\ninput = 4\nlayers = [{ op = "dense", out = 2 }]\n'
            'loss = "softmax_cross_entropy"\noptimizer = "adam"\n'
        )
    with pytest.raises(ModelSpecError, match=r"b\.toml: name: 'same' is also the name of .*a\.toml"):
        codegen.render_models(tmp_path, programs)


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_an_attribute_must_be_finite(programs, spec, value):
    path = spec("4", '{ op = "dense", out = 2 }', optimizer=f'{{ op = "adam", lr = {value} }}')
    fails(programs, path, r"optimizer \(op 'adam'\): hyperparameter 'lr' must be a finite number")


def test_a_layer_attribute_with_an_integer_default_refuses_a_fraction(programs, spec):
    path = spec("[1, 8, 8]", '{ op = "max_pool2d", K = 2.5 }, { op = "flatten" }, { op = "dense", out = 2 }')
    fails(programs, path, r"attribute 'K' must be an integer \(its default is 2\), got 2\.5")


# ------------------------------------------------------- the generated CNN module


@pytest.fixture(scope="module")
def cnn():
    from generated.models import cnn_digits

    return cnn_digits


def torch_cnn_loss(params: dict, x, y):
    """cnn_digits' layers with torch.nn.functional, from the module's layer table."""
    h = torch.tensor(x)
    w, b = params["conv2d0.weight"], params["conv2d0.bias"]
    h = F.max_pool2d(F.relu(F.conv2d(h, w, b, padding=1)), 2)
    h = torch.flatten(h, 1) @ params["dense4.weight"] + params["dense4.bias"]
    return F.cross_entropy(h, torch.tensor(y))


def test_cnn_module_loss_and_grads_match_torch(cnn, rng):
    params = cnn.init(0, dtype=np.float64)
    assert list(cnn.PARAM_SHAPES) == ["conv2d0.weight", "conv2d0.bias", "dense4.weight", "dense4.bias"]
    x = rng.normal(size=(5,) + cnn.INPUT_SHAPE)
    y = np.eye(10)[rng.integers(0, 10, size=5)]
    loss, grads = cnn.loss_and_grads(params, x, y)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    expected = torch_cnn_loss(tparams, x, y)
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, "loss")
    for k in cnn.PARAM_SHAPES:
        ref.assert_close(grads[k], tparams[k].grad.numpy(), np.float64, f"gradient of {k}")


def test_cnn_train_step_is_loss_and_grads_then_adam(cnn, rng):
    # the step's arrays are reused while the batch shape stays and replaced when it changes
    batches = [(rng.normal(size=(n,) + cnn.INPUT_SHAPE), np.eye(10)[rng.integers(0, 10, size=n)]) for n in (6, 6, 4, 6)]
    assert_steps_follow_the_optimizer(cnn, cnn.init(1, dtype=np.float64), batches)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_train_step_is_loss_and_grads_then_each_optimizer(programs, spec, tmp_path, rng, optimizer):
    """The fused step of every library optimizer, with or without state (sgd has
    none), equals the model's loss and gradients followed by the optimizer op."""
    import generated

    path = spec("6", '{ op = "dense", out = 5 }, { op = "relu" }, { op = "dense", out = 3 }', optimizer=f'"{optimizer}"')
    model = _load(programs, path, tmp_path)
    opt = generated.op(optimizer)
    params = model.init(2, dtype=np.float64)
    manual = {k: v.copy() for k, v in params.items()}
    state = model.init_state(params)
    slots = {k: opt.init_state(v) for k, v in manual.items()}
    for t in (1, 2, 3):
        x = rng.normal(size=(4, 6))
        y = np.eye(3)[rng.integers(0, 3, size=4)]
        loss_manual, grads = model.loss_and_grads(manual, x, y)
        for k in manual:
            opt.step(manual[k], grads[k], *slots[k], t=t, **opt.hyper)
        ref.assert_close(model.train_step(params, state, x, y), loss_manual, np.float64, f"{optimizer}: loss at step {t}")
        for k in params:
            ref.assert_close(params[k], manual[k], np.float64, f"{optimizer}: {k} after step {t}")


# models whose layers or loss keep what rests on their reductions for the backward
# (codegen.emit.saved_for_backward): an output (softmax), intermediates (log_softmax's
# log-sum-exp, layer_norm's statistics, max-pooling's argmax, the loss's log-sum-exp)
KEEPING = {
    "softmax": ("6", '{ op = "dense", out = 5 }, { op = "softmax" }, { op = "dense", out = 3 }', '"mse"'),
    "log_softmax-nll": ("6", '{ op = "dense", out = 3 }, { op = "log_softmax" }', '"nll"'),
    "layer_norm": ("6", '{ op = "dense", out = 5 }, { op = "layer_norm" }, { op = "dense", out = 3 }', '"softmax_cross_entropy"'),
    "max_pool2d": ("[2, 4, 4]", '{ op = "conv2d", out = 2, KH = 3, KW = 3, P = 1 }, { op = "max_pool2d", K = 2, S = 2 }, { op = "flatten" }, { op = "dense", out = 3 }', '"softmax_cross_entropy"'),
}


@pytest.mark.parametrize("case", sorted(KEEPING))
def test_kept_reductions_give_the_train_step_of_loss_and_grads(programs, spec, tmp_path, rng, case):
    """Layers and losses whose forward keeps values for the backward: the fused step
    takes their saving cores and still equals loss_and_grads followed by the optimizer."""
    import generated

    input, layers, loss = KEEPING[case]
    path = spec(input, layers, loss=loss)
    _, text = render_model(path, programs)
    step = text[text.index("def _train_step"):]
    # every layer but softmax (which hands over its output) also keeps intermediates
    assert "_bwd_saved_into(" in step and ("_fwd_saving_into(" in step) == (case != "softmax")
    model = _load(programs, path, tmp_path)
    opt = generated.op(model.OPTIMIZER)
    params = model.init(2, dtype=np.float64)
    manual = {k: v.copy() for k, v in params.items()}
    state = model.init_state(params)
    slots = {k: opt.init_state(v) for k, v in manual.items()}
    for t in (1, 2):
        x = rng.normal(size=(4,) + model.INPUT_SHAPE)
        y = np.eye(3)[rng.integers(0, 3, size=4)]
        loss_manual, grads = model.loss_and_grads(manual, x, y)
        for k in manual:
            opt.step(manual[k], grads[k], *slots[k], t=t, **{**opt.hyper, **model.HYPER})
        ref.assert_close(model.train_step(params, state, x, y), loss_manual, np.float64, f"{case}: loss at step {t}")
        for k in params:
            ref.assert_close(params[k], manual[k], np.float64, f"{case}: {k} after step {t}")


@pytest.mark.parametrize("task", ["classification", "binary", "regression", None])
def test_what_a_model_predicts_comes_from_its_loss_spec(programs, spec, tmp_path, task):
    """The loss spec's ``task`` (default regression) decides the model's TASK and its
    predict: a user's loss is treated like the library's, by what it declares."""
    import derive

    text = f'''
        name = "my_loss"
        kind = "loss"
        {f'task = "{task}"' if task else ""}
        inputs = {{ pred = "B C", target = "B C" }}
        differentiate = ["pred"]
        outputs = {{ loss = "" }}
        equations = ["loss = sum((pred[b,c] - target[b,c])**2, b, c) / B"]
    '''
    loss_path = tmp_path / "my_loss.toml"
    loss_path.write_text(textwrap.dedent(text))
    mine = derive.from_file(loss_path)
    context = check_model(spec("6", '{ op = "dense", out = 3 }', loss='"my_loss"'), [*programs, mine])
    assert context["task"] == (task or "regression")


def test_the_library_losses_declare_their_task(programs):
    by_name = {p.name: p.task for p in programs if p.kind == "loss"}
    assert by_name["softmax_cross_entropy"] == "classification" and by_name["mse"] == "regression"


def test_a_users_model_names_its_own_regenerate_command(spec, tmp_path):
    """A model spec built with ``--out`` says how to rebuild it, not how to
    regenerate the library."""
    import codegen

    path = spec("6", '{ op = "dense", out = 3 }')
    out = tmp_path / "out"
    (text,) = codegen.render_spec(path, out).values()
    assert f"# Regenerate: python -m codegen {path} --out {out}\n" in text


def test_layers_below_the_first_trained_one_run_no_backward(programs, spec, tmp_path):
    """Nothing below the first layer with parameters needs a gradient: that layer
    takes its params-only core and the layers before it run no backward."""
    rel, text = render_model(spec("[1, 4, 4]", '{ op = "flatten" }, { op = "relu" }, { op = "dense", out = 3 }'), programs)
    step = text[text.index("def _train_step"):]
    assert "_dense_bwd_params_into(" in step
    assert "_relu_bwd_into(" not in step and "_dense_bwd_into(" not in step


def _load(programs, path, out_dir):
    import codegen

    return codegen.load_module(_write_module(programs, path, out_dir))


def test_train_step_allocates_its_arrays_once_per_batch_shape(cnn, rng):
    """The fused step writes into arrays kept between calls (allocating megabytes per
    step costs page faults), and takes new ones when the batch shape changes."""
    params = cnn.init(0)
    state = cnn.init_state(params)

    def step(batch):
        x = rng.normal(size=(batch,) + cnn.INPUT_SHAPE).astype(np.float32)
        cnn.train_step(params, state, x, np.eye(10, dtype=np.float32)[rng.integers(0, 10, size=batch)])
        return cnn._ARRAYS.arrays

    first = step(4)
    assert step(4) is first
    other = step(5)
    assert other is not first and other[0].shape[0] == 5


def test_the_fused_step_calls_the_cores_that_write_into_given_arrays(programs, spec):
    _, text = render_model(spec("[1, 4, 4]", '{ op = "conv2d", out = 2, KH = 3, KW = 3 }, { op = "relu" }, { op = "flatten" }, { op = "dense", out = 3 }'), programs)
    step = text[text.index("def _train_step"):text.index("def _step_arrays")]
    assert "_conv2d_fwd_into(h0" in step and "_dense_bwd_into(g4, h3" in step
    # only the optimizer's in-place step is a core: nothing in the step allocates a result
    assert [line for line in step.splitlines() if "_core(" in line and "_step_core(" not in line] == []


def test_train_step_refuses_parameters_of_the_wrong_shape(cnn):
    params = cnn.init(0)
    state = cnn.init_state(params)
    params["dense4.bias"] = np.zeros(11, np.float32)
    with pytest.raises(ValueError, match=r"'dense4.bias' must have shape \(10,\), got \(11,\)"):
        cnn.train_step(params, state, np.zeros((4, 1, 8, 8), np.float32), np.zeros((4, 10), np.float32))


def test_train_step_refuses_a_batch_of_the_wrong_sample_shape(cnn):
    params = cnn.init(0)
    with pytest.raises(ValueError, match=r"x must have shape \(B,\) \+ \(1, 8, 8\)"):
        cnn.train_step(params, cnn.init_state(params), np.zeros((4, 64), np.float32), np.zeros((4, 10), np.float32))


def test_depthwise_conv_and_padded_pool_match_torch(programs, spec, tmp_path, rng):
    """A grouped weight (O, C/groups, KH, KW) is sized from the input; shorthands (P, K,
    S) set both axes; loss and gradients are torch's. Groups that do not divide the
    input's channels are an error naming the entry and the sizes."""
    layers = ('{ op = "conv2d", out = 8, KH = 3, KW = 3, P = 1, groups = 4 }, { op = "relu" }, '
              '{ op = "max_pool2d", K = 3, S = 2, P = 1, ceil_mode = 1 }, { op = "flatten" }, { op = "dense", out = 3 }')
    m = _load(programs, spec("[4, 6, 6]", layers), tmp_path)
    assert m.PARAM_SHAPES["conv2d0.weight"] == (8, 1, 3, 3) and m.PARAM_SHAPES["dense4.weight"] == (128, 3)
    p = m.init(0, np.float64)
    x, labels = rng.normal(size=(2, 4, 6, 6)), [0, 2]
    loss, grads = m.loss_and_grads(p, x, np.eye(3)[labels])
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    h = F.conv2d(torch.tensor(x), t["conv2d0.weight"], t["conv2d0.bias"], padding=1, groups=4).relu()
    h = F.max_pool2d(h, 3, 2, 1, ceil_mode=True).flatten(1) @ t["dense4.weight"] + t["dense4.bias"]
    expected = F.cross_entropy(h, torch.tensor(labels))
    expected.backward()
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-12)
    for k, g in grads.items():
        np.testing.assert_allclose(g, t[k].grad.numpy(), rtol=1e-10, atol=1e-12)
    fails(programs, spec("[4, 6, 6]", layers.replace("groups = 4", "groups = 3")), r"layers\[0\]",
          r"derived dimension CG = C/groups is 4/3 at C=4, groups=3, not an integer")
