"""Checking a spec given as TOML text: build it, make inputs from dimension sizes, and
compare its gradients with central finite differences (float64) and its CUDA kernels
with its CPU kernels. Shared by the spec-language document's tests and the fuzzer's
regression cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import reference as ref


@dataclass
class TextSpec:
    """A spec's TOML text and what inputs it needs: ``sizes`` of its dimensions, ``ints``
    (integer input -> the dimension bounding its values), ``rows`` (inputs whose last axis
    is a probability distribution), ``positive`` (inputs drawn positive), ``attr_sets``
    (attribute values the op is checked with too, besides its defaults)."""

    text: str
    name: str = ""
    sizes: dict = field(default_factory=dict)
    ints: dict = field(default_factory=dict)
    rows: set = field(default_factory=set)
    positive: set = field(default_factory=set)
    attr_sets: list = field(default_factory=list)

    def __post_init__(self):
        if not self.name:
            import re

            self.name = re.search(r'^name = "(\w+)"', self.text, re.M).group(1)


def build(spec: TextSpec, folder: Path):
    """(OpDef, module) of ``spec``, written and built in ``folder``."""
    import codegen
    from derive.spec import load_toml

    path = Path(folder) / f"{spec.name}.toml"
    path.write_text(spec.text)
    return load_toml(path), codegen.build(str(path), str(Path(folder) / "out"))


def make_args(spec: TextSpec, opdef, rng) -> list[np.ndarray]:
    """Inputs then params, in declaration order, float64 (int64 for integer data)."""
    if opdef.kind == "activation":
        return [rng.normal(size=(2, 3))]
    args = []
    for table in (opdef.inputs, opdef.params):
        for name, dims in table.items():
            shape = tuple(spec.sizes[d] for d in dims)
            if name in spec.ints:
                args.append(rng.integers(0, spec.sizes[spec.ints[name]], size=shape))
            elif name in spec.rows:
                args.append(ref.prob_rows(rng, shape))
            elif name in spec.positive:
                args.append(rng.uniform(0.5, 2.0, size=shape))
            else:
                args.append(rng.normal(size=shape))
    return args


def check_gradients(op, args, rng, what: str):
    """Forward finite; every gradient equal to central finite differences (float64)."""
    outs = ref.run_forward(op, args)
    assert all(np.all(np.isfinite(o)) for o in outs), f"{what}: forward not finite"
    seeds = ref.make_seeds(outs, rng, np.float64)
    grads = ref.run_backward(op, seeds, args)
    expected = ref.numerical_vjp(op.forward, args, seeds, ref.differentiable_indices(op))
    for name, got, want in zip(op.differentiable, grads, expected):
        ref.assert_close(got, want, np.float64, f"{what}: gradient of {name}", ref.FD_TOL)


def check_cuda_matches_cpu(module, args, rng, what: str, attrs: dict | None = None):
    cpu, gpu = module.op(**(attrs or {})), module.op(target="cuda", **(attrs or {}))
    seeds = ref.make_seeds(ref.run_forward(cpu, args), rng, np.float64)
    for a, b in zip(ref.run_forward(gpu, args), ref.run_forward(cpu, args)):
        ref.assert_close(a, b, np.float64, f"{what}: CUDA forward")
    for a, b in zip(ref.run_backward(gpu, seeds, args), ref.run_backward(cpu, seeds, args)):
        ref.assert_close(a, b, np.float64, f"{what}: CUDA backward")
