"""The generated CUDA kernels on a GPU, side by side with PyTorch's.

    python benchmarks/bench_cuda.py [--rounds 3] [--cases ...]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_cuda.py --smoke   # the script itself, no GPU

Cases (float32, arrays already on the device, so that no host copy is timed):

* ``dense``    dense, x 1024x784, weight 784x256: forward, and forward + backward;
* ``sce``      softmax_cross_entropy, logits 1024x10 (one-hot targets);
* ``relu``     relu over 4M elements;
* ``conv``     conv2d, 32x16x28x28, 3x3, 32 out, S=1, P=1;
* ``adam``     one Adam step over 1M parameters (in place).

Sections: ``symgrad`` (``generated.op(name, target="cuda")`` called with Numba device
arrays) and ``torch`` (PyTorch on its CUDA device, autograd for the gradients, the
fused ``torch.optim.Adam`` step). Each section runs in its own subprocess, the order
rotating each round; a timing synchronises the device before and after its calls.
The table gives milliseconds per call (median over rounds) and symgrad's time over
PyTorch's (below 1 is faster).

``--smoke`` runs every case once at tiny sizes and prints no figure: under
``NUMBA_ENABLE_CUDASIM=1`` (PyTorch on the CPU) it checks the script, never a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `generated` imports without an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import run_worker, time_calls, versions  # noqa: E402

SECTIONS = ("symgrad", "torch")
MODES = ("fwd", "fwd+bwd")
SIZES = {
    "dense": {"B": 1024, "I": 784, "O": 256},
    "sce": {"B": 1024, "C": 10},
    "relu": {"N": 4 * 1024 * 1024},
    "conv": {"N": 32, "C": 16, "H": 28, "W": 28, "O": 32, "K": 3},
    "adam": {"N": 1024 * 1024},
}
SMOKE = {
    "dense": {"B": 3, "I": 5, "O": 4},
    "sce": {"B": 3, "C": 4},
    "relu": {"N": 7},
    "conv": {"N": 1, "C": 2, "H": 4, "W": 4, "O": 2, "K": 3},
    "adam": {"N": 6},
}
OPS = {  # case: (library op, attributes)
    "dense": ("dense", {}),
    "sce": ("softmax_cross_entropy", {}),
    "relu": ("relu", {}),
    "conv": ("conv2d", {"S": 1, "P": 1}),
    "adam": ("adam", {}),
}
CASE_TEXT = {
    "dense": "dense 1024x784 @ 784x256",
    "sce": "softmax_cross_entropy 1024x10",
    "relu": "relu 4M",
    "conv": "conv2d 32x16x28x28, 3x3, 32 out",
    "adam": "adam step, 1M parameters",
}


def _data(case: str, s: dict) -> list:
    """The case's float32 host arrays: the op's arguments, then an output gradient."""
    import numpy as np

    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    if case == "dense":
        return [normal(s["B"], s["I"]), normal(s["I"], s["O"]), normal(s["O"]), normal(s["B"], s["O"])]
    if case == "sce":
        return [normal(s["B"], s["C"]), np.eye(s["C"], dtype=np.float32)[rng.integers(0, s["C"], s["B"])]]
    if case == "relu":
        return [normal(s["N"]), normal(s["N"])]
    if case == "conv":
        S, P = OPS["conv"][1]["S"], OPS["conv"][1]["P"]
        ho = (s["H"] + 2 * P - s["K"]) // S + 1
        return [normal(s["N"], s["C"], s["H"], s["W"]), normal(s["O"], s["C"], s["K"], s["K"]), normal(s["O"]),
                normal(s["N"], s["O"], ho, ho)]
    return [normal(s["N"]), normal(s["N"])]  # adam: parameter, gradient


def make_symgrad(case: str, mode: str, s: dict, smoke: bool = False):  # smoke: as make_torch's
    from numba import cuda

    import generated

    host = _data(case, s)
    arrays = [cuda.to_device(a) for a in host]
    if case == "adam":
        op = generated.op("adam", target="cuda")
        p, g = arrays
        state = [cuda.to_device(z) for z in generated.op("adam").init_state(host[0])]
        step = [0]

        def run():
            step[0] += 1
            op.step(p, g, *state, t=step[0])
    else:
        name, attrs = OPS[case]
        op = generated.op(name, target="cuda", **attrs)
        args, seed = (arrays, 1.0) if case == "sce" else (arrays[:-1], arrays[-1])

        def run():
            op.forward(*args)
            if mode == "fwd+bwd":
                op.backward(seed, *args)

    def timed():
        run()
        cuda.synchronize()

    return timed


def make_torch(case: str, mode: str, s: dict, smoke: bool = False):
    import torch
    import torch.nn.functional as F

    if not (torch.cuda.is_available() or smoke):
        raise SystemExit("PyTorch sees no CUDA device: its figures would be CPU figures")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    data = [torch.from_numpy(a).to(device) for a in _data(case, s)]
    if case == "adam":
        p = data[0].requires_grad_()
        p.grad = data[1]
        opt = torch.optim.Adam([p], lr=1e-3, fused=device == "cuda")

        def run():
            opt.step()
    else:
        grad = mode == "fwd+bwd"
        if case == "sce":
            logits, target = data
            leaves = [logits.requires_grad_(grad)]

            def f():
                return F.cross_entropy(leaves[0], target)
            seed = None
        else:
            *args, seed = data
            leaves = [a.requires_grad_(grad) for a in args]
            f = {"dense": lambda: F.linear(leaves[0], leaves[1].T, leaves[2]),
                 "relu": lambda: F.relu(leaves[0]),
                 "conv": lambda: F.conv2d(*leaves, padding=1)}[case]

        def run():
            out = f()
            if grad:
                torch.autograd.grad(out, leaves, seed)

    def timed():
        run()
        sync()

    return timed


def worker(args) -> None:
    sizes = SMOKE if args.smoke else SIZES
    make = {"symgrad": make_symgrad, "torch": make_torch}[args.worker]
    out = {}
    for case in args.cases:
        for mode in (("fwd",) if case == "adam" else MODES):
            fn = make(case, mode, sizes[case], args.smoke)
            if args.smoke:
                fn()
                continue
            out[f"{case}/{mode}"] = statistics.median(time_calls(fn, args.repeats, args.min_seconds))
    print(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.05)
    p.add_argument("--cases", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--smoke", action="store_true", help="each case once, tiny sizes, no figures (checks the script)")
    p.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and not args.smoke:
        print("error: NUMBA_ENABLE_CUDASIM=1 is the simulator, not a GPU: figures need a GPU (--smoke checks the script)", file=sys.stderr)
        return 2
    common = ["--cases", *args.cases, "--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds)]
    if args.smoke:
        for section in SECTIONS:
            run_worker(__file__, ["--worker", section, "--smoke", *common])
        print("smoke run: every case ran once in each section (no figures)")
        return 0
    times = {s: [] for s in SECTIONS}
    for r in range(args.rounds):
        order = SECTIONS[r % 2:] + SECTIONS[:r % 2]
        for section in order:
            times[section].append(run_worker(__file__, ["--worker", section, *common]))
            print(f"round {r + 1}/{args.rounds}: {section} done", file=sys.stderr)
    print("### Generated CUDA kernels against PyTorch CUDA (float32, device arrays)\n")
    print(versions(("numba", "numba_cuda", "torch")) + f"; {args.rounds} interleaved rounds x {args.repeats} repeats.\n")
    print("| case | mode | symgrad (ms) | PyTorch (ms) | symgrad / PyTorch |")
    print("|---|---|---:|---:|---:|")
    for key in times["symgrad"][0]:
        sym = statistics.median(t[key] for t in times["symgrad"]) * 1e3
        tor = statistics.median(t[key] for t in times["torch"]) * 1e3
        case, mode = key.split("/")
        print(f"| {CASE_TEXT[case]} | {mode} | {sym:.3f} | {tor:.3f} | {sym / tor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
