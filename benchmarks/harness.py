"""What the benchmark scripts share: timing a call, thread settings, running a section
in its own worker process, and the versions line of a report.

Each script runs itself as the worker (``python benchmarks/bench_x.py --worker ...``), so
every section gets a fresh process; the worker prints its result as one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_calls(fn, repeats: int, min_seconds: float) -> list[float]:
    """Seconds per call of ``fn``: ``repeats`` timings, each the mean over enough calls
    to last ``min_seconds``, after a warm-up (compilation, allocator, caches)."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(3, int(min_seconds / one))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n)
    return out


def set_threads(threads: int | None) -> None:
    """Thread counts for every library, in the environment the workers inherit."""
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(threads)


def run_worker(script, args: list[str], env=None) -> dict:
    """Run ``script`` with ``args`` in a new process; its last stdout line, parsed."""
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions(modules=("numba", "torch")) -> str:
    """"Python 3.11.7, NumPy 2.4.6, numba ..." for the installed ``modules``."""
    import numpy

    parts = [f"Python {platform.python_version()}", f"NumPy {numpy.__version__}"]
    for mod in modules:
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)
