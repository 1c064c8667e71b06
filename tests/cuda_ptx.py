"""Compile CUDA kernels to PTX with NVVM, as a real GPU would, without one.

    python tests/cuda_ptx.py LAUNCHES.json RESULTS.json

The CUDA simulator runs kernels as Python and checks no types, so a kernel that the
simulator runs may still fail to compile for a device. This script compiles, for each
launch recorded under the simulator (module, kernel, the Numba types of its
arguments), the kernel's Python function with those argument types through Numba's
CUDA compiler and NVVM to PTX for ``CC``, the compute capability of the GPU this
project is lent (an H200: sm_90), and reports what failed and which float32 kernels
contain float64 instructions (a silent promotion: float64 runs at a fraction of the
float32 rate on most GPUs).

It must run without ``NUMBA_ENABLE_CUDASIM`` (the simulator replaces the compiler),
so the tests start it as a subprocess. It needs no GPU and no driver: NVVM and NVRTC
come from the ``cuda-toolkit`` wheels of ``numba-cuda[cu13]`` (the test extra). Numba
asks the current device for its compute capability when it compiles a device
function a kernel calls; with no device, ``get_current_device`` is replaced here by
one that answers ``CC``.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

CC = (9, 0)
_ARRAY = re.compile(r"array\((\w+), (\d+)d, (\w)\)")


def numba_type(text: str):
    """The Numba type written as ``str(numba.typeof(value))``: arrays and scalars."""
    from numba import types

    m = _ARRAY.fullmatch(text)
    if m:
        return types.Array(getattr(types, m.group(1)), int(m.group(2)), m.group(3))
    return getattr(types, text)


def float64_lines(ptx: str) -> list[str]:
    """PTX instructions and registers of float64 type."""
    return [line.strip() for line in ptx.splitlines() if ".f64" in line and not line.strip().startswith("//")]


def compile_launches(launches: list[dict]) -> list[dict]:
    import numba.cuda.dispatcher
    from numba import cuda

    class _Device:
        compute_capability = CC

    numba.cuda.dispatcher.get_current_device = lambda: _Device()
    results = []
    for launch in launches:
        kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        sig = tuple(numba_type(t) for t in launch["types"])
        result = {**launch, "error": None, "float64": []}
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC, fastmath=kernel.targetoptions.get("fastmath", False))
        except Exception as exc:  # noqa: BLE001 - reported per kernel by the tests
            result["error"] = f"{type(exc).__name__}: {exc}"
        else:
            if "float32" in " ".join(launch["types"]) and "float64" not in " ".join(launch["types"]):
                result["float64"] = float64_lines(ptx)[:5]
        results.append(result)
    return results


def main(argv: list[str]) -> int:
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    launches = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(compile_launches(launches), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
