"""Every library loss with PyTorch's ``reduction`` (the spec language's ``reduce(...)``,
derive/reductions.py): ``reduction = 0`` ("none") returns the terms shaped as PyTorch
returns them, forward and backward (a random output gradient) against PyTorch in
float64; the attribute takes PyTorch's names, refuses other values naming the allowed
ones, and a model spec refuses "none" for its loss. A user's own loss written with
``reduce(...)`` gets the same variants (tests/test_spec_language_doc.py builds the
document's example)."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

LOSSES = ["bce_with_logits", "categorical_nll", "cosine_embedding_loss", "cross_entropy", "gaussian_nll", "huber",
          "mse", "nll", "poisson_nll", "softmax_cross_entropy"]
# what PyTorch returns with reduction="none", by the inputs' batch B and features N
SHAPES = {"categorical_nll": "B", "cosine_embedding_loss": "B", "cross_entropy": "B", "nll": "B",
          "softmax_cross_entropy": "B"}
CASES = [(name, {}) for name in LOSSES] + [("cross_entropy", {"ignore_index": 1, "label_smoothing": 0.1})]


@pytest.fixture(scope="module")
def generated():
    import generated

    return generated


def test_every_library_loss_with_a_reduction_is_covered(generated):
    have = sorted(n for n in generated.ops() if "reduction" in generated.op(n).attrs)
    assert have == LOSSES


@pytest.mark.parametrize("name, attrs", CASES, ids=[n + ("-options" if a else "") for n, a in CASES])
def test_none_matches_torch(generated, name, attrs, rng):
    op = generated.op(name, reduction="none", **attrs)
    args = ref.make_inputs(name, rng, np.float64, attrs)
    if name == "cross_entropy" and attrs:
        args[1][0] = attrs["ignore_index"]  # an ignored sample: its loss and gradient are 0
    (out,) = ref.run_forward(op, args)
    expected = ref.torch_forward(name, args, {**attrs, "reduction": 0})
    B = np.shape(args[0])[0]
    assert out.shape == ((B,) if SHAPES.get(name) == "B" else np.shape(args[0])), out.shape
    ref.assert_close(out, expected, np.float64, f"{name} forward, reduction none")
    seeds = ref.make_seeds([out], rng, np.float64)
    grads = ref.run_backward(op, seeds, args)
    wrt = ref.differentiable_indices(op)
    expected_grads = ref.torch_vjp(name, args, {**attrs, "reduction": 0}, seeds[0], wrt)
    for k, g, e in zip(wrt, grads, expected_grads):
        ref.assert_close(g, e, np.float64, f"{name} gradient of {op.arg_names[k]}, reduction none")


def test_reduction_takes_pytorchs_names_and_refuses_other_values(generated):
    assert generated.op("mse", reduction="sum").attrs["reduction"] == 2
    assert generated.op("mse").attrs["reduction"] == 1
    with pytest.raises(ValueError, match=r"mse: attribute reduction = 3 is not allowed; allowed values: "
                                         r"0 \(none\), 1 \(mean\), 2 \(sum\)"):
        generated.op("mse", reduction=3)
    with pytest.raises(ValueError, match=r"reduction = 'avg' is not a name of its values \(names: 'none', 'mean', 'sum'\)"):
        generated.op("huber", reduction="avg")
    with pytest.raises(ValueError, match=r"scaled_dot_product_attention: attribute causal = 2 is not allowed; "
                                         r"allowed values: 0, 1"):
        generated.op("scaled_dot_product_attention", causal=2)
    with pytest.raises(ValueError, match=r"dropout: attribute p = 1.0 is not allowed; allowed values: 0.0 <= value < 1.0"):
        generated.op("dropout", p=1)
    assert "mse[reduction=none]" not in generated.ops()
    with pytest.raises(ValueError, match="unknown op"):
        generated.op("mse[reduction=none]")


def test_a_model_refuses_a_loss_without_reduction_and_takes_the_names(tmp_path):
    import derive
    from codegen.model import ModelSpecError, check_model

    programs = [derive.build(d) for d in derive.library_defs() if d.name in ("dense", "sgd", "softmax_cross_entropy")]

    base = ('name = "m"\nkind = "model"\ninput = 4\nlayers = [{ op = "dense", out = 3 }]\n'
            'optimizer = { op = "sgd", lr = 0.1 }\n')
    path = tmp_path / "m.toml"
    path.write_text(base + 'loss = { op = "softmax_cross_entropy", reduction = "none" }\n')
    with pytest.raises(ModelSpecError, match=r"reduction = 0 makes op 'softmax_cross_entropy' return one value per term"):
        check_model(path, programs)
    path.write_text(base + 'loss = { op = "softmax_cross_entropy", reduction = "median" }\n')
    with pytest.raises(ModelSpecError, match=r"'median' is not a name of its values \(0 \(none\), 1 \(mean\), 2 \(sum\)\)"):
        check_model(path, programs)
    path.write_text(base + 'loss = { op = "softmax_cross_entropy", reduction = "sum" }\n')
    check_model(path, programs)


BAD = {
    'attrs = { mode = { default = 3, values = [0, 1] } }': r"attribute `mode`: the default 3 is not an allowed value \(0, 1\)",
    'attrs = { mode = { default = "fast", values = { slow = 0 } } }': r"the default 'fast' is not one of the names",
    'attrs = { mode = { values = [0, 1] } }': r"attribute `mode`: a table declares `default`",
    'attrs = { mode = { default = 0, choices = [0, 1] } }': r"unknown key `choices`",
    'attrs = { mode = { default = 1, values = [0, 1.5] } }': r"is an integer .* but its allowed values are not",
}


@pytest.mark.parametrize("attrs", list(BAD), ids=range(len(BAD)))
def test_bad_attribute_domains_name_the_file_and_the_attribute(tmp_path, attrs):
    from derive.errors import SpecError
    from derive.spec import load_toml

    path = tmp_path / "act.toml"
    path.write_text(f'name = "act"\nkind = "activation"\n{attrs}\nexpr = "x * mode"\n')
    with pytest.raises(SpecError, match=BAD[attrs]) as err:
        load_toml(path)
    assert "act.toml" in str(err.value)


LOSS = 'name = "l"\nkind = "loss"\ninputs = { x = "B N" }\noutputs = { loss = "" }\n'
BAD_REDUCE = {
    'equations = ["loss = sqrt(reduce(x[b,n]**2, b, n))"]': r"must be a multiple of `reduce\(...\)`",
    'equations = ["loss = reduce(x[b,n], b, n) + reduce(x[b,n]**2, b, n)"]': r"an op has one `reduce\(...\)`",
    'equations = ["loss = reduce(x[b,n], b, n, scale = 2)"]': r"positional arguments only and `weight=`",
    'attrs = { reduction = 4 }\nequations = ["loss = reduce(x[b,n], b, n)"]': r"PyTorch's codes .* its default 4 is not one",
}


@pytest.mark.parametrize("text", list(BAD_REDUCE), ids=range(len(BAD_REDUCE)))
def test_misused_reduce_names_the_equation(tmp_path, text):
    import derive
    from derive.errors import SpecError

    path = tmp_path / "l.toml"
    path.write_text(LOSS + text + "\n")
    with pytest.raises(SpecError, match=BAD_REDUCE[text]):
        derive.from_file(path)


def test_a_user_loss_with_a_weighted_reduce_matches_its_definition(tmp_path, rng):
    """``reduce(terms, b, weight=w[b])``: the mean divides by the summed weights; "none"
    keeps each sample's weighted term, "sum" their sum (a user's spec, as the library's
    cross_entropy writes it)."""
    import codegen

    path = tmp_path / "wsq.toml"
    path.write_text('name = "wsq"\nkind = "loss"\ninputs = { x = "B N", w = "B" }\ndifferentiate = ["x"]\n'
                    'outputs = { out = "" }\nequations = ["out = 3 * reduce(w[b] * sum(x[b,n]**2, n), b, weight = w[b])"]\n')
    module = codegen.build(path, tmp_path / "out")
    x, w = rng.normal(size=(4, 3)), rng.uniform(0.5, 2.0, size=4)
    terms = 3 * w * (x**2).sum(axis=1)
    ref.assert_close(module.op(reduction="none").forward(x, w), terms, np.float64, "none")
    ref.assert_close(module.op(reduction="sum").forward(x, w), terms.sum(), np.float64, "sum")
    ref.assert_close(module.op().forward(x, w), terms.sum() / w.sum(), np.float64, "mean")
    g = rng.normal(size=4)
    ref.assert_close(module.op(reduction="none").backward(g, x, w), 6 * (g * w)[:, None] * x, np.float64, "none grad")
