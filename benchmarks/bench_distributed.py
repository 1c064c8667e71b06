"""Data-parallel scaling: one training step of the MLP and the CNN on 1 and 2 MPI ranks,
split into compute, allreduce and update (examples/distributed.py's step).

    .venv/bin/python benchmarks/bench_distributed.py                 # 1 and 2 ranks
    .venv/bin/python benchmarks/bench_distributed.py --ranks 1 2 4 --steps 50

Each configuration runs in its own ``mpiexec -n N`` job (TCP over loopback between the
ranks, or ``--btl sm`` shared memory; one BLAS and one Numba thread per rank), on random float32 data of the model's shapes
with one global batch size for every N (the work per rank shrinks as N grows). Per step,
each rank times: compute (``loss_and_grads`` of its shard and the scaling into the flat
buffer), allreduce (the one in-place ``Allreduce``: the wait for the slowest rank plus
the transfer) and update (the optimizer op per parameter). The ranks meet at a barrier
before each step (outside the timing), so a step starts together on all. The table
reports, for the rank whose steps took longest, the mean of each part (they add up to
the mean step; under load a rank that was descheduled makes the other wait in the
allreduce, so the parts' medians would not add up), the step's median, and the minima
of the step, the compute and the allreduce (the least disturbed steps). Alone: the same ``Allreduce`` timed
by itself after a barrier, the cost of the transfer without waiting. Fused: the model's
fused ``train_step`` on the whole batch in one process, for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
# loopback only; as root, Open MPI refuses to start without the two ALLOW variables
MPI_ENV = {
    "OMPI_MCA_btl": "self,tcp",
    "OMPI_MCA_btl_tcp_if_include": "lo",
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
}
MODELS = {"mlp_bench": 128, "cnn_digits": 128}  # model -> global batch size


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if found is None:
        sys.exit("error: no mpiexec; install mpi4py and Open MPI with pip install 'symgrad[mpi]'")
    return found


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if len(values) % 2 else 0.5 * (values[len(values) // 2 - 1] + values[len(values) // 2])


# --------------------------------------------------------------------------- worker


def worker(model_name: str, batch: int, steps: int) -> None:
    import importlib

    import numpy as np

    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(ROOT))
    import distributed

    group = distributed.Group.world()
    comm = group.comm
    model = importlib.import_module(f"generated.models.{model_name}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + tuple(model.INPUT_SHAPE)).astype(np.float32)
    y = np.eye(model.OUTPUT, dtype=np.float32)[rng.integers(0, model.OUTPUT, batch)]
    params = model.init(0, dtype=np.float32)
    state = model.init_state(params)
    dp = distributed.DataParallel(group, batch)
    dp.attach(model)
    for _ in range(5):  # compile, allocate
        dp.step(params, state, x, y, lr=1e-4)
    rows = []
    for _ in range(steps):
        comm.Barrier()
        before = dict(dp.timings)
        t0 = time.perf_counter()
        dp.step(params, state, x, y, lr=1e-4)
        total = time.perf_counter() - t0
        rows.append({k: dp.timings[k] - before[k] for k in ("compute", "allreduce", "update")} | {"step": total})
    alone = []
    buffer = np.zeros(dp.n_numbers, np.float32)
    for _ in range(steps):
        comm.Barrier()
        t0 = time.perf_counter()
        group.allreduce_sum(buffer)
        alone.append(time.perf_counter() - t0)
    fused = None
    if group.size == 1:
        p, s = model.init(0, dtype=np.float32), None
        s = model.init_state(p)
        for _ in range(5):
            model.train_step(p, s, x, y, lr=1e-4)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model.train_step(p, s, x, y, lr=1e-4)
            times.append(time.perf_counter() - t0)
        fused = median(times)
    # means of the parts (they add up to the mean step); the step's median and minimum
    mine = {k: sum(r[k] for r in rows) / len(rows) for k in ("compute", "allreduce", "update", "step")}
    mine["median"] = median([r["step"] for r in rows])
    mine["min"] = min(r["step"] for r in rows)
    for k in ("compute", "allreduce"):
        mine[f"{k}_min"] = min(r[k] for r in rows)
    mine["alone"] = median(alone)
    every = comm.gather(mine, root=0)
    if group.rank == 0:
        slowest = max(every, key=lambda m: m["step"])  # the rank whose steps took longest
        print(
            json.dumps(
                {
                    "model": model_name,
                    "ranks": group.size,
                    "batch": batch,
                    "numbers": dp.n_numbers,
                    "bytes": dp.n_numbers * 4,
                    "fused": fused,
                    **slowest,
                    "per_rank": every,
                }
            )
        )


# --------------------------------------------------------------------------- driver


def run(model: str, batch: int, ranks: int, steps: int, btl: str) -> dict:
    env = dict(os.environ, **MPI_ENV, **{v: "1" for v in THREAD_VARIABLES})
    env["OMPI_MCA_btl"] = f"self,{btl}"
    # --oversubscribe only where it must: it makes a waiting rank yield its core, which
    # cost 20 ms per small allreduce on the 2-core machine under load
    extra = ["--oversubscribe"] if ranks > (os.cpu_count() or 1) else []
    cmd = [mpiexec(), "-n", str(ranks), *extra, sys.executable, __file__, "--worker", model, str(batch), str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batch", type=int, default=None, help="global batch size (default: 128)")
    ap.add_argument("--btl", choices=("tcp", "sm"), default="tcp", help="transport: TCP over loopback (default) or shared memory")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), int(a.worker[2]))
        return
    print(f"transport {a.btl}; load average before: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores)")
    print(
        "| model | B | ranks | samples/rank | step ms: mean | = compute | + allreduce | + update | step median "
        "| min: step | compute | allreduce | allreduce alone | fused, 1 process | allreduce KiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in a.models:
        batch = a.batch or MODELS.get(model, 128)
        for n in a.ranks:
            r = run(model, batch, n, a.steps, a.btl)
            fused = f"{r['fused'] * 1e3:.3f}" if r["fused"] is not None else ""
            print(
                f"| {model} | {batch} | {n} | {batch // n} | {r['step'] * 1e3:.3f} | {r['compute'] * 1e3:.3f} | "
                f"{r['allreduce'] * 1e3:.3f} | {r['update'] * 1e3:.3f} | {r['median'] * 1e3:.3f} | {r['min'] * 1e3:.3f} | "
                f"{r['compute_min'] * 1e3:.3f} | {r['allreduce_min'] * 1e3:.3f} | "
                f"{r['alone'] * 1e3:.3f} | {fused} | {r['bytes'] / 1024:.1f} |",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        for var in THREAD_VARIABLES:  # before NumPy loads its BLAS
            os.environ.setdefault(var, "1")
    main()
