"""docs/spec-language.md cannot drift: every TOML example in it is built with
``codegen.build`` and checked.

Layers, losses and activations: every gradient against central finite differences
(float64) on the CPU, and the CUDA kernels (simulator) against the CPU. Optimizers: a
few steps on CPU and CUDA agree and change the parameter. Schedules: the rate is finite
for the first steps. The HTML comments just before a block give what the test needs to
make inputs: ``<!-- sizes: B=3 N=4 -->`` (dimension sizes), ``<!-- ints: target < C -->``
(an integer input's bound), ``<!-- rows: target sum to 1 -->`` (an input whose rows are
probability distributions), ``<!-- attrs: reduction=none -->`` (attribute values whose
op is checked too, besides the defaults).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

import reference as ref
from derive.spec import load_toml
from spec_check import TextSpec, build, check_cuda_matches_cpu, check_gradients, make_args

DOC = Path(__file__).resolve().parent.parent / "docs" / "spec-language.md"


def examples() -> list[TextSpec]:
    found = []
    for m in re.finditer(r"((?:<!--[^\n]*-->\n)*)```toml\n(.*?)```", DOC.read_text(), re.S):
        notes, spec = m.group(1), TextSpec(m.group(2))
        for key, body in re.findall(r"<!-- (\w+): ([^>]*?) -->", notes):
            if key == "sizes":
                spec.sizes = {k: int(v) for k, v in (kv.split("=") for kv in body.split())}
            elif key == "ints":
                tensor, bound = (s.strip() for s in body.split("<"))
                spec.ints[tensor] = bound
            elif key == "rows":
                spec.rows.add(body.split()[0])
            elif key == "attrs":  # attribute values checked besides the defaults (a name or a number)
                spec.attr_sets.append({k: _value(v) for k, v in (kv.split("=") for kv in body.split())})
        found.append(spec)
    return found


def _value(text: str):
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def _kind(spec: TextSpec) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{spec.name}.toml"
        path.write_text(spec.text)
        return load_toml(path).kind


EXAMPLES = [(spec, _kind(spec)) for spec in examples()]


def _ids(kinds):
    return [pytest.param(spec, id=spec.name) for spec, kind in EXAMPLES if kind in kinds]


def test_the_document_has_an_example_of_every_kind():
    assert {kind for _, kind in EXAMPLES} == {"activation", "layer", "loss", "optimizer", "schedule"}
    assert len({spec.name for spec, _ in EXAMPLES}) == len(EXAMPLES), "every example needs a name of its own"


@pytest.fixture
def built(tmp_path_factory, request):
    spec = request.param
    return (spec, *build(spec, tmp_path_factory.mktemp(spec.name)))


@pytest.mark.parametrize("built", _ids({"activation", "layer", "loss"}), indirect=True)
def test_example_gradients_match_finite_differences(built, rng):
    spec, opdef, module = built
    for attrs in [{}, *spec.attr_sets]:
        check_gradients(module.op(**attrs), make_args(spec, opdef, rng), rng, f"{spec.name} {attrs}")


@pytest.mark.cuda
@pytest.mark.parametrize("built", _ids({"activation", "layer", "loss"}), indirect=True)
def test_example_cuda_kernels_match_the_cpu(built, rng):
    spec, opdef, module = built
    for attrs in [{}, *spec.attr_sets]:
        check_cuda_matches_cpu(module, make_args(spec, opdef, rng), rng, f"{spec.name} {attrs}", attrs)


@pytest.mark.parametrize("built", _ids({"optimizer"}), indirect=True)
def test_example_optimizer_steps_on_both_targets(built, rng):
    spec, opdef, module = built
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
    ref.assert_close(results[1], results[0], np.float64, f"{spec.name}: CUDA against CPU")


@pytest.mark.parametrize("built", _ids({"schedule"}), indirect=True)
def test_example_schedule_gives_finite_rates(built):
    spec, opdef, module = built
    rates = [module.op().lr(t) for t in range(5)]
    assert all(np.isfinite(rates)) and rates[0] > 0
