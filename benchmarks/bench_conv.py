"""Convolution and attention on the CPU, side by side.

    python benchmarks/bench_conv.py [--rounds 3] [--threads N] [--cases ...]

Cases (float32):

* ``conv_s1``  conv2d, input 32x16x28x28, weight 32x16x3x3, stride 1, padding 1;
* ``conv_s2``  the same with stride 2;
* ``attn``     scaled_dot_product_attention, q 32x64x32, k 32x64x32, v 32x64x32;

each timed as ``fwd`` (forward only) and ``fwd+bwd`` (forward, then the gradients of
every input and parameter for an output gradient of ones-like random data). Sections:

* ``symgrad``  the generated op (``generated.op(name, **attrs)``: ``forward`` then
               ``backward``, which recomputes what it needs of the forward);
* ``numpy``    the same written by hand in NumPy: im2col through
               ``sliding_window_view`` and one matrix product for the convolution,
               col2im for its input gradient; batched ``@`` for attention;
* ``torch``    PyTorch eager (``torch.nn.functional.conv2d`` and
               ``scaled_dot_product_attention``, autograd for the gradients).

Each section runs in its own subprocess; the sections take turns in every round (the
order rotates), and each reports per-call times of several timed repeats after a
warm-up. The table gives the median over all rounds and repeats in milliseconds and
the ratio to PyTorch (time / PyTorch's time: below 1 is faster than PyTorch).

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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `generated` imports without an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import run_worker, set_threads, time_calls, versions  # noqa: E402
SECTIONS = ("symgrad", "numpy", "torch")
LABELS = {"symgrad": "symgrad (generated)", "numpy": "NumPy im2col (hand-written)", "torch": "PyTorch eager"}
CONV = {"N": 32, "C": 16, "H": 28, "W": 28, "O": 32, "K": 3, "P": 1}
ATTN = {"B": 32, "L": 64, "S": 64, "D": 32, "E": 32}
CASES = {
    "conv_s1": ("conv2d", {"S": 1, "P": CONV["P"]}),
    "conv_s2": ("conv2d", {"S": 2, "P": CONV["P"]}),
    "attn": ("scaled_dot_product_attention", {"causal": 0}),
}
MODES = ("fwd", "fwd+bwd")
CASE_TEXT = {
    "conv_s1": "conv2d 32x16x28x28, 3x3, 32 out, S=1, P=1",
    "conv_s2": "conv2d 32x16x28x28, 3x3, 32 out, S=2, P=1",
    "attn": "attention B=32, L=S=64, D=E=32",
}


# --------------------------------------------------------------------------- data


def _data(case: str):
    """The arguments (inputs then params) and an output gradient, as float32 arrays."""
    import numpy as np

    rng = np.random.default_rng(0)
    if case.startswith("conv"):
        c = CONV
        S = CASES[case][1]["S"]
        x = rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(np.float32)
        bound = 1.0 / np.sqrt(c["C"] * c["K"] * c["K"])
        w = rng.uniform(-bound, bound, (c["O"], c["C"], c["K"], c["K"])).astype(np.float32)
        b = rng.uniform(-bound, bound, (c["O"],)).astype(np.float32)
        ho = (c["H"] + 2 * c["P"] - c["K"]) // S + 1
        wo = (c["W"] + 2 * c["P"] - c["K"]) // S + 1
        gy = rng.standard_normal((c["N"], c["O"], ho, wo)).astype(np.float32)
        return (x, w, b), gy
    a = ATTN
    q = rng.standard_normal((a["B"], a["L"], a["D"])).astype(np.float32)
    k = rng.standard_normal((a["B"], a["S"], a["D"])).astype(np.float32)
    v = rng.standard_normal((a["B"], a["S"], a["E"])).astype(np.float32)
    gy = rng.standard_normal((a["B"], a["L"], a["E"])).astype(np.float32)
    return (q, k, v), gy


# --------------------------------------------------------------------------- sections


def make_symgrad(case: str, mode: str):
    import generated

    name, attrs = CASES[case]
    op = generated.op(name, **attrs)
    args, gy = _data(case)

    def fwd():
        return op.forward(*args)

    def fwd_bwd():
        op.forward(*args)
        return op.backward(gy, *args)

    return fwd if mode == "fwd" else fwd_bwd


def _np_conv(x, w, b, S, P):
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    N, C, H, W = x.shape
    O, _, KH, KW = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (P, P), (P, P)))
    win = sliding_window_view(xp, (KH, KW), axis=(2, 3))[:, :, ::S, ::S]  # N C HO WO KH KW
    HO, WO = win.shape[2], win.shape[3]
    cols = np.ascontiguousarray(win.transpose(1, 4, 5, 0, 2, 3)).reshape(C * KH * KW, N * HO * WO)
    y = (w.reshape(O, -1) @ cols).reshape(O, N, HO, WO).transpose(1, 0, 2, 3) + b[None, :, None, None]
    return np.ascontiguousarray(y), cols


def _np_conv_bwd(gy, x, w, cols, S, P):
    import numpy as np

    N, C, H, W = x.shape
    O, _, KH, KW = w.shape
    HO, WO = gy.shape[2], gy.shape[3]
    gy2 = np.ascontiguousarray(gy.transpose(1, 0, 2, 3)).reshape(O, -1)
    gw = (gy2 @ cols.T).reshape(w.shape)
    gb = gy.sum(axis=(0, 2, 3))
    dcols = (w.reshape(O, -1).T @ gy2).reshape(C, KH, KW, N, HO, WO)
    gxp = np.zeros((N, C, H + 2 * P, W + 2 * P), x.dtype)
    for p in range(KH):
        for q in range(KW):
            gxp[:, :, p : p + S * HO : S, q : q + S * WO : S] += dcols[:, p, q].transpose(1, 0, 2, 3)
    return gxp[:, :, P : P + H, P : P + W], gw, gb


def _np_attn(q, k, v):
    import numpy as np

    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    s = (q @ k.transpose(0, 2, 1)) * scale
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v, p


def _np_attn_bwd(gy, q, k, v, p):
    scale = q.dtype.type(1.0 / q.shape[-1] ** 0.5)
    gv = p.transpose(0, 2, 1) @ gy
    gp = gy @ v.transpose(0, 2, 1)
    gs = p * (gp - (gp * p).sum(axis=-1, keepdims=True)) * scale
    return gs @ k, gs.transpose(0, 2, 1) @ q, gv


def make_numpy(case: str, mode: str):
    args, gy = _data(case)
    if case.startswith("conv"):
        S, P = CASES[case][1]["S"], CASES[case][1]["P"]
        x, w, b = args

        def fwd():
            return _np_conv(x, w, b, S, P)[0]

        def fwd_bwd():
            _, cols = _np_conv(x, w, b, S, P)
            return _np_conv_bwd(gy, x, w, cols, S, P)
    else:

        def fwd():
            return _np_attn(*args)[0]

        def fwd_bwd():
            _, p = _np_attn(*args)
            return _np_attn_bwd(gy, *args, p)

    return fwd if mode == "fwd" else fwd_bwd


def make_torch(case: str, mode: str):
    import torch
    import torch.nn.functional as F

    args, gy = _data(case)
    leaves = [torch.from_numpy(a).requires_grad_(mode != "fwd") for a in args]
    g = torch.from_numpy(gy)
    if case.startswith("conv"):
        S, P = CASES[case][1]["S"], CASES[case][1]["P"]

        def f():
            return F.conv2d(*leaves, stride=S, padding=P)
    else:

        def f():
            return F.scaled_dot_product_attention(*leaves)

    def fwd():
        with torch.no_grad():
            return f()

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        f().backward(g)

    return fwd if mode == "fwd" else fwd_bwd


MAKERS = {"symgrad": make_symgrad, "numpy": make_numpy, "torch": make_torch}


# --------------------------------------------------------------------------- checks


def check() -> dict:
    """Largest relative difference of symgrad and NumPy to PyTorch, per case (the
    benchmark times the same computation everywhere)."""
    import numpy as np

    out = {}
    for case in CASES:
        ref = _results(make_torch, case)
        for section, maker in (("symgrad", make_symgrad), ("numpy", make_numpy)):
            got = _results(maker, case)
            err = max(float(np.abs(a - r).max() / (np.abs(r).max() + 1e-30)) for a, r in zip(got, ref))
            out[f"{case} {section}"] = err
    return out


def _results(maker, case):
    import numpy as np

    if maker is make_torch:
        import torch
        import torch.nn.functional as F

        args, gy = _data(case)
        leaves = [torch.from_numpy(a).requires_grad_() for a in args]
        if case.startswith("conv"):
            S, P = CASES[case][1]["S"], CASES[case][1]["P"]
            y = F.conv2d(*leaves, stride=S, padding=P)
        else:
            y = F.scaled_dot_product_attention(*leaves)
        y.backward(torch.from_numpy(gy))
        return [y.detach().numpy()] + [t.grad.numpy() for t in leaves]
    y = maker(case, "fwd")()
    grads = maker(case, "fwd+bwd")()
    return [np.asarray(y)] + [np.asarray(g) for g in grads]


# --------------------------------------------------------------------------- timing


def worker(section: str, cases: list[str], repeats: int, min_seconds: float, threads: int | None) -> dict:
    if section == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
    return {
        f"{case} {mode}": time_calls(MAKERS[section](case, mode), repeats, min_seconds) for case in cases for mode in MODES
    }


# ---------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one subprocess per section per round)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per case in each worker")
    p.add_argument("--min-seconds", type=float, default=0.2, help="least time of one timed repeat")
    p.add_argument("--threads", type=int, default=None, help="thread count for every library (default: their own)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--no-check", action="store_true", help="skip comparing the results with PyTorch")
    p.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--check-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    set_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker, a.cases, a.repeats, a.min_seconds, a.threads)))
        return 0
    if a.check_worker:
        print(json.dumps(check()))
        return 0

    common = ["--cases", *a.cases, "--repeats", str(a.repeats), "--min-seconds", str(a.min_seconds)]
    if a.threads:
        common += ["--threads", str(a.threads)]
    errors = None if a.no_check else run_worker(__file__, ["--check-worker"] + (["--threads", str(a.threads)] if a.threads else []))
    keys = [f"{case} {mode}" for case in a.cases for mode in MODES]
    times: dict[str, dict[str, list[float]]] = {s: {k: [] for k in keys} for s in a.sections}
    for r in range(a.rounds):
        order = a.sections[r % len(a.sections) :] + a.sections[: r % len(a.sections)]
        for section in order:
            res = run_worker(__file__, ["--worker", section, *common])
            for k in keys:
                times[section][k].extend(res[k])
            print(f"round {r + 1}/{a.rounds}: {section} done", file=sys.stderr)

    med = {s: {k: statistics.median(times[s][k]) for k in keys} for s in a.sections}
    threads = a.threads if a.threads else f"library defaults ({os.cpu_count()} cores)"
    print("### Convolution and attention, float32, CPU\n")
    print(f"{versions()}; {platform.machine()}, {os.cpu_count()} cores; threads: {threads}.")
    print(
        f"Median of {a.rounds} interleaved rounds x {a.repeats} repeats; milliseconds per call "
        "(in brackets: time relative to PyTorch eager, below 1 is faster).\n"
    )
    print("| case | " + " | ".join(LABELS[s] for s in a.sections) + " |")
    print("|---|" + "---:|" * len(a.sections))
    for case in a.cases:
        for mode in MODES:
            k = f"{case} {mode}"
            cells = []
            for s in a.sections:
                cell = f"{1e3 * med[s][k]:.2f}"
                if "torch" in med:
                    cell += f" ({med[s][k] / med['torch'][k]:.2f}x)"
                cells.append(cell)
            print(f"| {CASE_TEXT[case]}, {mode} | " + " | ".join(cells) + " |")
    if errors:
        print("\nLargest difference to PyTorch (relative to the largest magnitude, output and every gradient): "
              + "; ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
