"""One training step of an MLP 784-256-128-10, side by side.

    python benchmarks/bench_mlp.py [--batches 32 128 1024] [--rounds 5] [--threads N] [--load N]

Model: float32, dense-relu-dense-relu-dense, softmax cross-entropy on one-hot targets,
Adam (lr 0.001), the same for every section:

* ``symgrad``  the generated model module ``generated.models.mlp_bench`` (from
               ``specs/models/mlp_bench.toml``), whose layers, loss and optimizer are the
               generated Numba kernels;
* ``numpy``    the same step written by hand in NumPy;
* ``torch``    PyTorch eager (nn.Linear, F.cross_entropy, torch.optim.Adam);
* ``jax``      JAX, the whole step under ``jax.jit`` (skipped when JAX is not installed).

Each section runs in its own subprocess; the sections take turns in every round (the
order rotates), and each reports per-step times of several timed repeats after a
warm-up. The first table gives the median over all rounds and repeats as samples per
second and the ratio to PyTorch eager; the second, each section's least disturbed round
(the smallest of its per-round medians), which on a shared or virtual machine is the
better estimate of what the code itself costs. Per-step times are printed with the
range of the per-round medians, so that a difference smaller than the noise shows as
one.

``--load N`` keeps N busy-looping processes running while the sections are timed: the
situation of a machine whose cores are not all free (a second job, a noisy neighbour on
a virtual machine). It measures how each library's threading copes when one of its
threads runs on a core it has to share. Separately, the generated module's first-call time is
measured with an empty Numba cache (a fresh ``NUMBA_CACHE_DIR``: compilation) and again
in a second process with that cache (the cached import).

Thread settings are left at each library's defaults unless ``--threads`` is given,
which sets OMP/OpenBLAS/MKL/Numba thread counts and ``torch.set_num_threads`` in every
worker alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `generated` imports without an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import run_worker, set_threads, time_calls, versions  # noqa: E402
SIZES = (784, 256, 128, 10)
LR = 1e-3
SECTIONS = ("symgrad", "numpy", "torch", "jax")
LABELS = {"symgrad": "symgrad (generated)", "numpy": "NumPy (hand-written)", "torch": "PyTorch eager", "jax": "JAX jit"}


# --------------------------------------------------------------------------- workers


def _data(batch: int):
    import numpy as np

    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
    labels = rng.integers(0, SIZES[-1], batch)
    y = np.eye(SIZES[-1], dtype=np.float32)[labels]
    return x, y, labels


def _init(seed: int = 0):
    """PyTorch-style init, (in, out) weight layout, shared by the hand-written sections."""
    import numpy as np

    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        params.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32))
        params.append(rng.uniform(-bound, bound, (fan_out,)).astype(np.float32))
    return params


def make_symgrad(batch):
    import generated.models.mlp_bench as model

    params = model.init(0)
    state = model.init_state(params)
    x, y, _ = _data(batch)

    def step():
        model.train_step(params, state, x, y)

    return step


def make_numpy(batch):
    import numpy as np

    params = _init()
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    x, y, _ = _data(batch)
    b1, b2, eps = np.float32(0.9), np.float32(0.999), np.float32(1e-8)
    t = [0]

    def step():
        w1, c1, w2, c2, w3, c3 = params
        h1 = x @ w1 + c1
        a1 = np.maximum(h1, 0)
        h2 = a1 @ w2 + c2
        a2 = np.maximum(h2, 0)
        z = a2 @ w3 + c3
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e / e.sum(axis=1, keepdims=True)
        g3 = (s - y) / np.float32(batch)
        ga2 = g3 @ w3.T
        g2 = ga2 * (h2 > 0)
        ga1 = g2 @ w2.T
        g1 = ga1 * (h1 > 0)
        grads = (x.T @ g1, g1.sum(0), a1.T @ g2, g2.sum(0), a2.T @ g3, g3.sum(0))
        t[0] += 1
        c_1 = np.float32(1 - 0.9 ** t[0])
        c_2 = np.float32(1 - 0.999 ** t[0])
        for p, g, mi, vi in zip(params, grads, m, v):
            mi *= b1
            mi += (1 - b1) * g
            vi *= b2
            vi += (1 - b2) * g * g
            p -= np.float32(LR) * (mi / c_1) / (np.sqrt(vi / c_2) + eps)

    return step


def make_torch(batch):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    x, _, labels = _data(batch)
    x, labels = torch.from_numpy(x), torch.from_numpy(labels)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), labels)
        loss.backward()
        opt.step()

    return step


def make_jax(batch):
    import jax
    import jax.numpy as jnp

    params = [jnp.asarray(p) for p in _init()]
    m = [jnp.zeros_like(p) for p in params]
    v = [jnp.zeros_like(p) for p in params]
    x, y, _ = _data(batch)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(params, x, y):
        w1, c1, w2, c2, w3, c3 = params
        a1 = jax.nn.relu(x @ w1 + c1)
        a2 = jax.nn.relu(a1 @ w2 + c2)
        z = a2 @ w3 + c3
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(z), axis=1))

    @jax.jit
    def train_step(params, m, v, t, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        t = t + 1
        m = [0.9 * mi + 0.1 * g for mi, g in zip(m, grads)]
        v = [0.999 * vi + 0.001 * g * g for vi, g in zip(v, grads)]
        c1, c2 = 1 - 0.9**t, 1 - 0.999**t
        params = [p - LR * (mi / c1) / (jnp.sqrt(vi / c2) + 1e-8) for p, mi, vi in zip(params, m, v)]
        return params, m, v, t, loss

    carry = [params, m, v, jnp.asarray(0, jnp.int32)]

    def step():
        p, mm, vv, t, loss = train_step(*carry, x, y)
        carry[:] = [p, mm, vv, t]
        loss.block_until_ready()

    return step


MAKERS = {"symgrad": make_symgrad, "numpy": make_numpy, "torch": make_torch, "jax": make_jax}


def worker(section: str, batches: list[int], repeats: int, min_seconds: float, threads: int | None) -> dict:
    if section == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
    if section == "jax":
        try:
            import jax  # noqa: F401
        except ImportError:
            return {"skipped": "jax is not installed (pip install -e '.[bench]')"}
    return {str(b): time_calls(MAKERS[section](b), repeats, min_seconds) for b in batches}


def compile_worker(batch: int) -> dict:
    """Import the generated model module and run its first step (in a fresh process)."""
    t0 = time.perf_counter()
    import numpy as np

    import generated.models.mlp_bench as model

    t1 = time.perf_counter()
    params = model.init(0)
    state = model.init_state(params)
    x, y, _ = _data(batch)
    t2 = time.perf_counter()
    model.train_step(params, state, x, y)
    t3 = time.perf_counter()
    model.train_step(params, state, x, y)
    t4 = time.perf_counter()
    assert np.isfinite(model.loss(params, x, y))
    return {"import": t1 - t0, "first_step": t3 - t2, "second_step": t4 - t3}


# ---------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128, 1024])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one subprocess per section per round)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per batch size in each worker")
    p.add_argument("--min-seconds", type=float, default=0.1, help="least time of one timed repeat")
    p.add_argument("--threads", type=int, default=None, help="thread count for every library, set in the environment before each worker starts (default: their own; note that OpenBLAS started with 1 thread is about 3x slower than 1 thread chosen at run time, see RESULTS.md)")
    p.add_argument("--load", type=int, default=0, help="busy-looping processes to run alongside (default 0)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--no-compile", action="store_true", help="skip the compile-time measurement")
    p.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    set_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker, a.batches, a.repeats, a.min_seconds, a.threads)))
        return 0
    if a.compile_worker:
        print(json.dumps(compile_worker(a.batches[0])))
        return 0

    common = ["--batches", *map(str, a.batches), "--repeats", str(a.repeats), "--min-seconds", str(a.min_seconds)]
    if a.threads:
        common += ["--threads", str(a.threads)]

    compile_times = None
    if not a.no_compile and "symgrad" in a.sections:
        with tempfile.TemporaryDirectory(prefix="symgrad-numba-cache-") as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            cold = run_worker(__file__, ["--compile-worker", "--batches", "32"], env)
            warm = run_worker(__file__, ["--compile-worker", "--batches", "32"], env)
        compile_times = (cold, warm)
        print(f"compile: cold {cold}, cached {warm}", file=sys.stderr)

    # section -> batch -> one list of repeat times per round
    times: dict[str, dict[int, list[list[float]]]] = {s: {b: [] for b in a.batches} for s in a.sections}
    skipped: dict[str, str] = {}
    load = [_busy_loop() for _ in range(a.load)]
    try:
        _rounds(a, common, times, skipped)
    finally:
        for proc in load:
            proc.kill()
            proc.wait()
    _report(a, times, skipped, compile_times)
    return 0


def _busy_loop() -> subprocess.Popen:
    """A process that keeps one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _rounds(a, common, times, skipped) -> None:
    for r in range(a.rounds):
        order = a.sections[r % len(a.sections) :] + a.sections[: r % len(a.sections)]
        for section in order:
            if section in skipped:
                continue
            res = run_worker(__file__, ["--worker", section, *common])
            if "skipped" in res:
                skipped[section] = res["skipped"]
                continue
            for b in a.batches:
                times[section][b].append(res[str(b)])
            print(f"round {r + 1}/{a.rounds}: {section} done", file=sys.stderr)


def _report(a, times, skipped, compile_times) -> None:
    sections = [s for s in a.sections if s not in skipped]
    med = {s: {b: statistics.median([t for rnd in times[s][b] for t in rnd]) for b in a.batches} for s in sections}
    rounds = {s: {b: [statistics.median(rnd) for rnd in times[s][b]] for b in a.batches} for s in sections}
    best = {s: {b: min(rounds[s][b]) for b in a.batches} for s in sections}
    threads = a.threads if a.threads else f"library defaults ({os.cpu_count()} cores)"
    load = f"; {a.load} busy-looping process(es) running alongside" if a.load else ""
    print(f"### One training step, MLP {'-'.join(map(str, SIZES))}, float32, Adam\n")
    print(f"{versions(('numba', 'torch', 'jax'))}; {platform.machine()}, {os.cpu_count()} cores; threads: {threads}{load}.")
    print(f"{a.rounds} interleaved rounds x {a.repeats} repeats; samples/s (in brackets: speed relative to PyTorch eager, above 1 is faster).\n")
    print("Median over all rounds:\n")
    _table(a.batches, sections, med)
    print("\nLeast disturbed round (each section's smallest per-round median):\n")
    _table(a.batches, sections, best)
    print()
    print("Per-step time (ms): median [range of the per-round medians]: " + "; ".join(
        f"{LABELS[s]}: " + ", ".join(
            f"B={b} {1e3 * med[s][b]:.3f} [{1e3 * min(rounds[s][b]):.2f}-{1e3 * max(rounds[s][b]):.2f}]" for b in a.batches
        ) for s in sections
    ))
    for s, why in skipped.items():
        print(f"\n{LABELS[s]}: skipped ({why}).")
    if compile_times:
        cold, warm = compile_times
        print("\n### symgrad generated module: first call\n")
        print("| Numba cache | import | first train_step | second train_step |")
        print("|---|---:|---:|---:|")
        for label, t in (("empty (compiles)", cold), ("warm (second process)", warm)):
            print(f"| {label} | {t['import']:.2f} s | {t['first_step']:.2f} s | {1e3 * t['second_step']:.2f} ms |")


def _table(batches, sections, per_step) -> None:
    header = "| batch | " + " | ".join(LABELS[s] for s in sections) + " |"
    print(header)
    print("|" + "---:|" * (len(sections) + 1))
    for b in batches:
        cells = []
        for s in sections:
            cell = f"{b / per_step[s][b]:,.0f}"
            if "torch" in per_step:
                cell += f" ({per_step['torch'][b] / per_step[s][b]:.2f}x)"
            cells.append(cell)
        print(f"| {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
