"""docs/spec-language.md cannot drift: every TOML example in it is built with
``codegen.build`` and checked.

Layers and losses: every gradient against central finite differences (float64) on the
CPU, and the CUDA kernels (simulator) against the CPU. Activations likewise, on a 2-d
input. Optimizers: a few steps on CPU and CUDA agree and change the parameter.
Schedules: the rate is finite for the first steps. The HTML comments just before a
block give what the test needs to make inputs: ``<!-- sizes: B=3 N=4 -->`` (dimension
sizes), ``<!-- ints: target < C -->`` (an integer input's bound), ``<!-- rows: target
sum to 1 -->`` (an input whose rows are probability distributions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import reference as ref
from derive.spec import load_toml

DOC = Path(__file__).resolve().parent.parent / "docs" / "spec-language.md"


@dataclass
class Example:
    text: str
    name: str
    sizes: dict = field(default_factory=dict)
    ints: dict = field(default_factory=dict)  # input -> the dimension bounding its values
    rows: set = field(default_factory=set)  # inputs whose last axis sums to 1


def examples() -> list[Example]:
    doc = DOC.read_text()
    found = []
    for m in re.finditer(r"((?:<!--[^\n]*-->\n)*)```toml\n(.*?)```", doc, re.S):
        notes, text = m.group(1), m.group(2)
        name = re.search(r'^name = "(\w+)"', text, re.M).group(1)
        ex = Example(text, name)
        for key, body in re.findall(r"<!-- (\w+): ([^>]*?) -->", notes):
            if key == "sizes":
                ex.sizes = {k: int(v) for k, v in (kv.split("=") for kv in body.split())}
            elif key == "ints":
                tensor, bound = (s.strip() for s in body.split("<"))
                ex.ints[tensor] = bound
            elif key == "rows":
                ex.rows.add(body.split()[0])
        found.append(ex)
    return found


EXAMPLES = examples()


def test_the_document_has_its_examples():
    kinds = {load_toml_text(ex).kind for ex in EXAMPLES}
    assert kinds == {"activation", "layer", "loss", "optimizer", "schedule"}
    assert len({ex.name for ex in EXAMPLES}) == len(EXAMPLES), "every example needs a name of its own"


def load_toml_text(ex: Example, tmp=Path("/tmp")):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{ex.name}.toml"
        path.write_text(ex.text)
        return load_toml(path)


@pytest.fixture
def built(tmp_path_factory, request):
    import codegen

    ex = request.param
    folder = tmp_path_factory.mktemp(ex.name)
    path = folder / f"{ex.name}.toml"
    path.write_text(ex.text)
    return ex, load_toml(path), codegen.build(str(path), str(folder / "out"))


def _inputs(ex: Example, opdef, rng) -> list[np.ndarray]:
    if opdef.kind == "activation":
        return [rng.normal(size=(2, 3))]
    args = []
    for table in (opdef.inputs, opdef.params):
        for name, dims in table.items():
            shape = tuple(ex.sizes[d] for d in dims)
            if name in ex.ints:
                args.append(rng.integers(0, ex.sizes[ex.ints[name]], size=shape))
            elif name in ex.rows:
                args.append(ref.prob_rows(rng, shape))
            else:
                args.append(rng.normal(size=shape))
    return args


def _ids(kinds):
    return [pytest.param(ex, id=ex.name) for ex in EXAMPLES if load_toml_text(ex).kind in kinds]


@pytest.mark.parametrize("built", _ids({"activation", "layer", "loss"}), indirect=True)
def test_example_gradients_match_finite_differences(built, rng):
    ex, opdef, module = built
    op = module.op()
    args = _inputs(ex, opdef, rng)
    outs = ref.run_forward(op, args)
    assert all(np.all(np.isfinite(o)) for o in outs)
    seeds = ref.make_seeds(outs, rng, np.float64)
    grads = ref.run_backward(op, seeds, args)
    wrt = ref.differentiable_indices(op)
    expected = ref.numerical_vjp(op.forward, args, seeds, wrt)
    for name, got, want in zip(op.differentiable, grads, expected):
        ref.assert_close(got, want, np.float64, f"{ex.name}: gradient of {name}", ref.FD_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("built", _ids({"activation", "layer", "loss"}), indirect=True)
def test_example_cuda_kernels_match_the_cpu(built, rng):
    ex, opdef, module = built
    cpu, gpu = module.op(), module.op(target="cuda")
    args = _inputs(ex, opdef, rng)
    seeds = ref.make_seeds(ref.run_forward(cpu, args), rng, np.float64)
    for a, b in zip(ref.run_forward(gpu, args), ref.run_forward(cpu, args)):
        ref.assert_close(a, b, np.float64, f"{ex.name}: forward")
    for a, b in zip(ref.run_backward(gpu, seeds, args), ref.run_backward(cpu, seeds, args)):
        ref.assert_close(a, b, np.float64, f"{ex.name}: backward")


@pytest.mark.parametrize("built", _ids({"optimizer"}), indirect=True)
def test_example_optimizer_steps_on_both_targets(built, rng):
    ex, opdef, module = built
    p0, grads = rng.normal(size=7), [rng.normal(size=7) for _ in range(3)]
    results = []
    for target in ("cpu", "cuda"):
        op = module.op(target=target)
        p = p0.copy()
        state = op.init_state(p)
        for t, g in enumerate(grads, start=1):
            op.step(p, g, *state, t=t)
        results.append(p)
    assert np.all(np.isfinite(results[0])) and not np.allclose(results[0], p0)
    ref.assert_close(results[1], results[0], np.float64, f"{ex.name}: CUDA against CPU")


@pytest.mark.parametrize("built", _ids({"schedule"}), indirect=True)
def test_example_schedule_gives_finite_rates(built):
    ex, opdef, module = built
    rates = [module.op().lr(t) for t in range(5)]
    assert all(np.isfinite(rates)) and rates[0] > 0
