"""Model specs as graphs (codegen/model.py, codegen/model_plan.py): an entry names its
output (``name = "h1"``) and the arrays it reads (``inputs = ["h2", "h1"]``, earlier
names or ``"x"``, the model's input). The residual block of DESIGN.md builds as written;
its loss and every parameter gradient match the same network in PyTorch (float64) and
central finite differences; an array read by several entries gets the sum of their
gradients (the library's add, in the backward's order); the fused step is
loss_and_grads followed by the optimizer; bad graphs fail naming the file and the entry.
The CUDA twin of a residual model is checked against the CPU step in
tests/test_model_cuda.py."""

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

OPS = ("adam", "add", "conv2d", "dense", "flatten", "layer_norm", "relu", "softmax_cross_entropy", "tanh")

# DESIGN.md's example, as written there
RESIDUAL = """
{ op = "dense", out = 16, name = "h1" }, { op = "tanh" },
{ op = "dense", out = 16, name = "h2" }, { op = "add", inputs = ["h2", "h1"] },
{ op = "layer_norm" }, { op = "dense", out = 10 },
"""


@pytest.fixture(scope="module")
def programs():
    import derive

    return [derive.build(d) for d in derive.library_defs() if d.name in OPS]


@pytest.fixture
def spec(tmp_path):
    """``spec(input, layers)`` -> the path of a model spec with those fields."""

    def write(input, layers, name="g"):
        text = f"""
            name = "{name}"
            kind = "model"
            input = {input}
            layers = [
            {textwrap.indent(layers.strip(), " " * 12).strip()}
            ]
            loss = "softmax_cross_entropy"
            optimizer = {{ op = "adam", lr = 0.01 }}
        """
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def _load(programs, path, out_dir):
    import codegen

    rel, text = render_model(path, programs)
    target = out_dir / rel.split("/")[-1]
    target.write_text(text)
    return codegen.load_module(target)


@pytest.fixture(scope="module")
def residual(programs, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    path = out / "residual.toml"
    path.write_text(
        'name = "residual"\nkind = "model"\ninput = 6\nlayers = [' + RESIDUAL + ']\n'
        'loss = "softmax_cross_entropy"\noptimizer = { op = "adam", lr = 0.01 }\n'
    )
    return _load(programs, path, out)


def torch_residual(p: dict, x, y):
    """The residual network of DESIGN.md in torch.nn.functional."""
    h1 = torch.tensor(x) @ p["dense0.weight"] + p["dense0.bias"]
    h3 = torch.tanh(h1) @ p["dense2.weight"] + p["dense2.bias"]
    h5 = F.layer_norm(h3 + h1, (16,), p["layer_norm4.weight"], p["layer_norm4.bias"], eps=1e-5)
    return F.cross_entropy(h5 @ p["dense5.weight"] + p["dense5.bias"], torch.tensor(y))


def _batch(rng, model, size=5):
    return rng.normal(size=(size,) + model.INPUT_SHAPE), np.eye(model.OUTPUT)[rng.integers(0, model.OUTPUT, size)]


def _params(model, seed):
    """Parameters with no entry at its special value (layer_norm's scale 1, biases 0)."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.3 * rng.normal(size=v.shape) for k, v in model.init(seed, np.float64).items()}


def test_the_residual_example_reads_named_outputs(residual):
    assert residual.PARAM_SHAPES == {
        "dense0.weight": (6, 16), "dense0.bias": (16,), "dense2.weight": (16, 16), "dense2.bias": (16,),
        "layer_norm4.weight": (16,), "layer_norm4.bias": (16,), "dense5.weight": (16, 10), "dense5.bias": (10,),
    }  # fmt: skip
    assert re.search(r"3 +add \(h2, h1\) +\(16,\) \+ \(16,\) -> \(16,\)", residual.__doc__)
    source = open(residual.__file__).read()
    step = source[source.index("def _train_step"):]
    # h1 is read by tanh and add: add's backward writes its gradient, tanh's a part added to it
    assert "_add_bwd_into(g4, h3, h1, g3, g1)\n" in step
    assert "_tanh_bwd_into(g2, h1, g1_1_x)\n    _add_fwd_into(g1, g1_1_x, g1)\n" in step


def test_residual_loss_and_grads_match_torch_and_finite_differences(residual, rng):
    params = _params(residual, 0)
    x, y = _batch(rng, residual)
    loss, grads = residual.loss_and_grads(params, x, y)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    expected = torch_residual(tparams, x, y)
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, "loss")
    np.testing.assert_allclose(residual.forward(params, x).argmax(1), residual.predict(params, x))
    for k in residual.PARAM_SHAPES:
        ref.assert_close(grads[k], tparams[k].grad.numpy(), np.float64, f"gradient of {k}")
    # central differences on a few entries of every parameter
    h = 1e-6
    for k, v in params.items():
        for flat in rng.choice(v.size, size=min(3, v.size), replace=False):
            idx = np.unravel_index(flat, v.shape)
            up, down = {**params, k: v.copy()}, {**params, k: v.copy()}
            up[k][idx] += h
            down[k][idx] -= h
            numeric = (residual.loss(up, x, y) - residual.loss(down, x, y)) / (2 * h)
            np.testing.assert_allclose(grads[k][idx], numeric, rtol=1e-6, atol=1e-8, err_msg=f"{k}{idx}")


def test_residual_train_step_is_loss_and_grads_then_adam(residual, rng):
    assert_steps_follow_the_optimizer(residual, _params(residual, 1), [_batch(rng, residual, 4) for _ in range(3)])


def test_residual_hvp_matches_torch(residual, rng):
    """Forward over reverse through a graph: tangents flow along every entry's inputs,
    and the gradient's tangent of an array read twice is the sum of both parts."""
    params = _params(residual, 3)
    v = {k: rng.normal(size=s) for k, s in residual.PARAM_SHAPES.items()}
    x, y = _batch(rng, residual)
    got = residual.hvp(params, x, y, v)
    tparams = {k: torch.tensor(p, requires_grad=True) for k, p in params.items()}
    grads = torch.autograd.grad(torch_residual(tparams, x, y), list(tparams.values()), create_graph=True)
    dot = sum((g * torch.tensor(v[k])).sum() for g, k in zip(grads, tparams))
    expected = torch.autograd.grad(dot, list(tparams.values()))
    for k, e in zip(tparams, expected):
        ref.assert_close(got[k], e.numpy(), np.float64, f"hvp of {k}")


def test_two_branches_of_an_image_sum_their_gradients(programs, spec, tmp_path, rng):
    """A convolution's (rank 4) output read by two branches, each from the model's
    input too: its gradient is the sum of the branches' (the add over (B, rest) views)."""
    layers = """
    { op = "conv2d", out = 2, KH = 3, KW = 3, P = 1, name = "c" },
    { op = "flatten" }, { op = "dense", out = 3, name = "a" },
    { op = "relu", inputs = ["c"] }, { op = "flatten" }, { op = "dense", out = 3, name = "b" },
    { op = "add", inputs = ["a", "b"] },
    """
    model = _load(programs, spec("[1, 3, 3]", layers), tmp_path)
    params = _params(model, 2)
    x, y = _batch(rng, model, 3)
    loss, grads = model.loss_and_grads(params, x, y)
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    c = F.conv2d(torch.tensor(x), p["conv2d0.weight"], p["conv2d0.bias"], padding=1)
    a = c.flatten(1) @ p["dense2.weight"] + p["dense2.bias"]
    b = F.relu(c).flatten(1) @ p["dense5.weight"] + p["dense5.bias"]
    expected = F.cross_entropy(a + b, torch.tensor(y))
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, "loss")
    for k in model.PARAM_SHAPES:
        ref.assert_close(grads[k], p[k].grad.numpy(), np.float64, f"gradient of {k}")
    # the fused step sums the same parts
    before = {k: v.copy() for k, v in params.items()}
    state = model.init_state(params)
    ref.assert_close(model.train_step(params, state, x, y), loss, np.float64, "fused loss")
    import generated

    adam = generated.op("adam")
    for k in before:
        slots = adam.init_state(before[k])
        adam.step(before[k], grads[k], *slots, t=1, **{**adam.hyper, **model.HYPER})
        ref.assert_close(params[k], before[k], np.float64, f"{k} after the fused step")


def test_chain_entries_may_name_their_input_explicitly(programs, spec):
    """``inputs`` naming the previous output is the chain: the same plan as without it."""
    chain = check_model(spec("4", '{ op = "dense", out = 3 }, { op = "relu" }, { op = "dense", out = 2 }', name="a"), programs)
    named = check_model(
        spec("4", '{ op = "dense", out = 3, inputs = ["x"], name = "h" }, { op = "relu", inputs = ["h"] }, { op = "dense", out = 2 }', name="b"),
        programs,
    )
    for a, b in zip(chain["layers"], named["layers"]):
        assert (a.in_args, a.grads, a.bwd_entry, a.accumulate) == (b.in_args, b.grads, b.bwd_entry, b.accumulate)
    assert not named["graph"] and chain["buffers"] == named["buffers"]


# ------------------------------------------------------------------------- errors


def fails(programs, path, *patterns):
    with pytest.raises(ModelSpecError) as info:
        check_model(path, programs)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in: {message}"


def test_an_unknown_input_name_lists_the_known_ones(programs, spec):
    path = spec("4", '{ op = "dense", out = 3, name = "h1" }, { op = "relu", inputs = ["h9"] }, { op = "dense", out = 2 }')
    fails(programs, path, r'layers\[1\] \{ op = "relu", inputs = \["h9"\] \}', r"unknown input 'h9'", r"before this entry: x, h1")


def test_a_name_used_twice_is_refused(programs, spec):
    path = spec("4", '{ op = "dense", out = 3, name = "h" }, { op = "dense", out = 3, name = "h" }, { op = "dense", out = 2 }')
    fails(programs, path, r"layers\[1\]", r"name 'h' is already the name of layers\[0\]")


def test_the_model_input_cannot_be_renamed(programs, spec):
    fails(programs, spec("4", '{ op = "dense", out = 2, name = "x" }'), r"layers\[0\]", r"name 'x' is the model's input")


def test_a_forward_reference_is_refused(programs, spec):
    path = spec("4", '{ op = "dense", out = 3, inputs = ["h2"] }, { op = "relu", name = "h2" }, { op = "dense", out = 2 }')
    fails(programs, path, r"layers\[0\]", r"input 'h2' is the output of a later entry, layers\[1\]", "no cycles")


def test_an_entry_reading_its_own_output_is_a_cycle(programs, spec):
    path = spec("4", '{ op = "dense", out = 3, name = "h", inputs = ["h"] }, { op = "dense", out = 2 }')
    fails(programs, path, r"layers\[0\]", r"input 'h' is this entry's own output", "no cycles")


def test_add_of_different_shapes_is_a_shape_mismatch(programs, spec):
    path = spec(
        "4", '{ op = "dense", out = 3, name = "h1" }, { op = "dense", out = 5, name = "h2" }, { op = "add", inputs = ["h2", "h1"] }'
    )
    fails(
        programs, path, r'layers\[2\] \{ op = "add", inputs = \["h2", "h1"\] \}',
        r"shape mismatch: dimension N is 5 \(x1 from 'h2' \(layers\[1\], op 'dense'\)\) but 3 \(x2 from 'h1' \(layers\[0\], op 'dense'\)\)",
    )  # fmt: skip


def test_add_of_different_ranks_is_a_shape_mismatch(programs, spec):
    path = spec("[1, 3, 3]", '{ op = "flatten", name = "f" }, { op = "add", inputs = ["f", "x"] }, { op = "dense", out = 2 }')
    fails(programs, path, r"layers\[1\]", r"this op takes x2 \(B, N\), 1 dimension\(s\) per sample, but the input gives \(1, 3, 3\)")


def test_a_two_input_op_without_inputs_says_how_to_name_them(programs, spec):
    fails(programs, spec("4", '{ op = "dense", out = 2 }, { op = "add" }'), r"layers\[1\]", r"takes 2 inputs", r"inputs = \[")


def test_the_number_of_inputs_must_be_the_ops(programs, spec):
    path = spec("4", '{ op = "dense", out = 2, name = "h" }, { op = "add", inputs = ["h"] }')
    fails(programs, path, r"layers\[1\]", r"this op takes 2 input\(s\) \(x1 \(B, N\), x2 \(B, N\)\), but 'inputs' names 1")


def test_inputs_must_be_a_list_of_names(programs, spec):
    fails(programs, spec("4", '{ op = "dense", out = 2, inputs = "x" }'), r"layers\[0\]", r"'inputs' must be a non-empty list of names")


def test_an_output_nobody_reads_is_refused(programs, spec):
    path = spec("4", '{ op = "dense", out = 3, name = "lost" }, { op = "dense", out = 2, inputs = ["x"] }')
    fails(programs, path, r"layers\[0\]", r"its output is read by no later entry")


# ------------------------------------------------------------- several inputs

MULTI = """
name = "two_inputs"
kind = "model"
inputs = { token = { shape = [], dtype = "int64" }, feats = 4 }
layers = [
  { op = "embedding", V = 7, D = 5, inputs = ["token"], name = "e" },
  { op = "dense", out = 5, inputs = ["feats"], name = "f" },
  { op = "add", inputs = ["e", "f"] }, { op = "tanh" },
  { op = "dense", out = 3 },
]
loss = "softmax_cross_entropy"
optimizer = { op = "adam", lr = 0.01 }
"""


@pytest.fixture(scope="module")
def multi_programs(programs):
    import derive

    return [*programs, *(derive.build(d) for d in derive.library_defs() if d.name == "embedding")]


def test_named_inputs_of_their_dtypes_train_as_in_torch(multi_programs, tmp_path, rng):
    """Integer token ids and float features, each read by name: loss and gradients as
    PyTorch's, and the fused step is loss_and_grads then adam. (Its CUDA twin is
    rendered too: tests/test_model_cuda.py trains one against the CPU.)"""
    path = tmp_path / "two_inputs.toml"
    path.write_text(MULTI)
    model = _load(multi_programs, path, tmp_path)
    assert model.INPUTS == {"token": ((), "int64"), "feats": ((4,), "float")}
    params = _params(model, 4)
    x = {"token": rng.integers(0, 7, size=6), "feats": rng.normal(size=(6, 4))}
    y = np.eye(3)[rng.integers(0, 3, size=6)]
    loss, grads = model.loss_and_grads(params, x, y)
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = p["embedding0.table"][torch.tensor(x["token"])] + torch.tensor(x["feats"]) @ p["dense1.weight"] + p["dense1.bias"]
    expected = F.cross_entropy(torch.tanh(h) @ p["dense4.weight"] + p["dense4.bias"], torch.tensor(y))
    expected.backward()
    ref.assert_close(loss, expected.item(), np.float64, "loss")
    for k in model.PARAM_SHAPES:
        ref.assert_close(grads[k], p[k].grad.numpy(), np.float64, f"gradient of {k}")
    assert_steps_follow_the_optimizer(model, params, [(x, y)])
    with pytest.raises(ValueError, match=r"x\['feats'\] must have shape \(B,\) \+ \(4,\)"):
        model.train_step(params, model.init_state(params), {"token": x["token"], "feats": x["feats"][:, :3]}, y)
    assert render_model(path, multi_programs, target="cuda")[0] == "models/two_inputs_cuda.py"


def test_several_inputs_errors(multi_programs, tmp_path):
    def spec(text):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        return path

    both = spec(MULTI.replace('inputs = { token', 'input = 4\ninputs = { token'))
    fails(multi_programs, both, r"inputs: a model has either 'input' .* or 'inputs'")
    unnamed = spec(MULTI.replace('{ op = "embedding", V = 7, D = 5, inputs = ["token"], name = "e" }', '{ op = "embedding", V = 7, D = 5, name = "e" }'))
    fails(multi_programs, unnamed, r"layers\[0\]", r"the model has several inputs \(token, feats\); name the ones this entry reads")
    float_op = spec(MULTI.replace('inputs = ["feats"], name = "f"', 'inputs = ["token"], name = "f"'))
    fails(multi_programs, float_op, r"layers\[1\]", r"input 'x' takes float data, but input 'token' holds integers")
    int_arg = spec(MULTI.replace('V = 7, D = 5, inputs = ["token"]', 'V = 7, D = 5, inputs = ["feats"]'))
    fails(multi_programs, int_arg, r"layers\[0\]", r"input 'idx' takes integer data, but input 'feats' holds floats")
    dtype = spec(MULTI.replace('"int64"', '"int32"'))
    fails(multi_programs, dtype, r"inputs\.token: dtype must be \"float\" or \"int64\"")
    renamed = spec(MULTI.replace('name = "f"', 'name = "token"'))
    fails(multi_programs, renamed, r"layers\[1\]", r"name 'token' is the model's input")
