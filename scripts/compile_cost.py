"""What the library's kernels cost to compile: the number of compiled functions in
generated/ and the CPU time Numba spends compiling each op's jvp and hvp in float32 and
float64, in a fresh Numba cache (nothing loaded from disk).

    .venv/bin/python scripts/compile_cost.py                  # counts only
    .venv/bin/python scripts/compile_cost.py gru_cell dense   # and these ops' compile times

Times are process CPU time (time.process_time), which a loaded machine disturbs less than
wall-clock time; compare two trees by running this in each.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="symgrad-numba-")
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def counts() -> dict:
    """@njit functions, of them the kernels (``_<op>_<entry><n>``), and @cuda.jit kernels."""
    out = {"njit": 0, "kernels": 0, "cuda.jit": 0}
    for f in sorted((REPO / "generated").rglob("*.py")):
        text = f.read_text()
        out["njit"] += text.count("@njit")
        out["kernels"] += len(re.findall(r"@njit[^\n]*\ndef _\w+?_(?:fwd|bwd|jvp|hvp|step)\w*?\d+\(", text))
        out["cuda.jit"] += text.count("@cuda.jit")
    return out


def compile_times(names):
    import numpy as np

    import generated
    import reference as ref

    total = 0.0
    for case in (p.values[0] for p in ref.op_cases()):
        if case.name not in names or case.kw:
            continue
        op = generated.op(case.name)
        rng = np.random.default_rng(0)
        for dtype in (np.float32, np.float64):
            args = ref.make_inputs(case.name, rng, dtype, case.kw)
            tangents = [rng.normal(size=np.shape(args[i])).astype(dtype) for i in ref.differentiable_indices(op)]
            seeds = ref.make_seeds(ref.run_forward(op, args), rng, dtype)
            t0 = time.process_time()
            op.jvp(*args, tangents=tangents)
            t1 = time.process_time()
            op.hvp(*seeds, *args, tangents=tangents)
            t2 = time.process_time()
            total += t2 - t0
            print("%-30s %-8s jvp %6.2f s  hvp %6.2f s" % (case.name, np.dtype(dtype).name, t1 - t0, t2 - t1), flush=True)
    print("total %.2f s CPU" % total)


if __name__ == "__main__":
    print(counts())
    if sys.argv[1:]:
        compile_times(sys.argv[1:])
