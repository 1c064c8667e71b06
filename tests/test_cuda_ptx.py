"""Every CUDA kernel of the library compiles for a real GPU.

The simulator (tests/test_cuda.py) checks what the kernels compute but runs them as
Python, with no typing. Here each op runs its CUDA forward and backward (an
optimizer, its step) under the simulator in float32 and float64, every kernel launch
is recorded with the Numba types of its arguments, and tests/cuda_ptx.py compiles each
kernel for those types through Numba's CUDA compiler and NVVM to PTX for sm_90, in a
process without the simulator: what a GPU would compile at the first call. A float32
kernel must contain no float64 instruction.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference as ref
from conftest import REAL_GPU

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(REAL_GPU, reason="on a real GPU tests/test_cuda.py compiles every kernel for the device itself"),
]

TESTS = Path(__file__).resolve().parent
NAMES = sorted(name for name, kind in ref.library_kinds().items() if kind != "schedule")


def numba_type_name(value) -> str:
    """``str(numba.typeof(...))`` of a launch argument; a simulator device array is typed
    as the array it holds, as Numba types a device array."""
    import numba

    return str(numba.typeof(getattr(value, "_ary", value)))


@contextlib.contextmanager
def recorded_launches(into: list):
    """Record every kernel launch under the simulator as (module, kernel, argument types)."""
    from numba.cuda.simulator import kernel as simulator

    launch = simulator.FakeCUDAKernel.__call__

    def recording(self, *args):
        if not self._device:
            into.append((self.fn.__module__, self.fn.__name__, tuple(numba_type_name(a) for a in args)))
        return launch(self, *args)

    simulator.FakeCUDAKernel.__call__ = recording
    try:
        yield into
    finally:
        simulator.FakeCUDAKernel.__call__ = launch


def run_on_cuda(name: str, dtype, rng) -> None:
    """The op's CUDA forward and backward, or its optimizer step, on tiny inputs."""
    import generated

    op = generated.op(name, target="cuda")
    if op.kind == "optimizer":
        p = rng.normal(size=(3, 5)).astype(dtype)
        state = op.init_state(p)
        op.step(p, rng.normal(size=(3, 5)).astype(dtype), *state, t=1, **op.hyper)
        return
    args = ref.make_inputs(name, rng, dtype, {}, None)
    outputs = ref.run_forward(op, args)
    if op.differentiable:
        ref.run_backward(op, ref.make_seeds(outputs, rng, dtype), args)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, list[dict]]:
    """{op name: the compile result of each kernel it launched}."""
    rng = np.random.default_rng(0)
    by_op = collections.defaultdict(set)
    for name in NAMES:
        for dtype in (np.float32, np.float64):
            with recorded_launches([]) as launches:
                run_on_cuda(name, dtype, rng)
            by_op[name].update(launches)
    unique = sorted(set().union(*by_op.values()))
    work = tmp_path_factory.mktemp("ptx")
    (work / "launches.json").write_text(json.dumps([{"module": m, "kernel": k, "types": list(t)} for m, k, t in unique]))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, str(TESTS / "cuda_ptx.py"), str(work / "launches.json"), str(work / "results.json")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"tests/cuda_ptx.py failed (NVVM and NVRTC come with numba-cuda[cu13], the test extra):\n{proc.stderr[-4000:]}"
    results = {(r["module"], r["kernel"], tuple(r["types"])): r for r in json.loads((work / "results.json").read_text())}
    return {name: [results[key] for key in sorted(keys)] for name, keys in by_op.items()}


@pytest.mark.parametrize("name", NAMES)
def test_every_kernel_compiles_to_ptx_for_sm90(compiled, name):
    results = compiled[name]
    assert results, f"{name}: no CUDA kernel was launched"
    failed = [f"{r['kernel']}({', '.join(r['types'])}): {r['error']}" for r in results if r["error"]]
    assert not failed, f"{name}: kernels that do not compile for a GPU:\n" + "\n".join(failed)


@pytest.mark.parametrize("name", NAMES)
def test_float32_kernels_do_no_float64_arithmetic(compiled, name):
    promoted = [f"{r['kernel']}: {r['float64']}" for r in compiled[name] if r["float64"]]
    assert not promoted, f"{name}: float32 kernels with float64 instructions:\n" + "\n".join(promoted)


def test_both_float_types_are_compiled(compiled):
    """Each op's kernels were compiled for float32 and for float64 arguments."""
    for name, results in compiled.items():
        types = " ".join(" ".join(r["types"]) for r in results)
        assert "float32" in types and "float64" in types, name
