"""One training step of a model on the GPU: the generated CUDA model against PyTorch.

    python benchmarks/bench_cuda_step.py [--rounds 3] [--cases mlp1024 mlp8192 cnn1024]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_cuda_step.py --smoke   # the script itself, no GPU

Cases (float32; parameters, optimizer state and the batch already on the device):

* ``mlp1024``, ``mlp8192``  the MLP 784-256-128-10 (``specs/models/mlp_bench.toml``:
  dense-relu-dense-relu-dense, softmax cross-entropy on one-hot targets, Adam lr 1e-3)
  at batch 1024 and 8192;
* ``cnn1024``  the digits CNN (``specs/models/cnn_digits.toml``: conv 3x3 with 32 maps
  and padding 1 over 1x8x8 images, ReLU, 2x2 max-pool, flatten, dense 10; Adam) at
  batch 1024.

Sections, each case of each in its own process (the order rotating every round):

* ``symgrad``  ``generated.models.<model>_cuda.train_step(params, state, x, y,
  read_loss=False)``: the op modules' CUDA kernels launched into arrays allocated once;
* ``eager``    PyTorch eager on its CUDA device (``nn.Linear``/``nn.Conv2d``,
  ``F.cross_entropy`` on probability targets, ``torch.optim.Adam(fused=True)``);
* ``compile``  the same with the model under ``torch.compile`` (the fused Adam step
  stays eager).

A timing synchronises the device after its calls. The table gives milliseconds per
step (median over rounds) and each section's time over PyTorch eager's (below 1 is
faster). The goal (issue 12): the MLP step at or above PyTorch eager at batch 1024.

``--smoke`` runs each section's step a few times on a tiny model of each case's
architecture and prints no figure: under ``NUMBA_ENABLE_CUDASIM=1`` (PyTorch on the
CPU) it checks the script, never a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `generated` imports without an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import run_worker, time_calls, versions  # noqa: E402

SECTIONS = ("symgrad", "eager", "compile")
LABELS = {"symgrad": "symgrad CUDA step", "eager": "PyTorch eager", "compile": "torch.compile"}
CASES = {  # case: (model, batch)
    "mlp1024": ("mlp_bench", 1024),
    "mlp8192": ("mlp_bench", 8192),
    "cnn1024": ("cnn_digits", 1024),
}
# the architectures, as (input shape, [layers]); the smoke sizes keep the layer kinds
ARCH = {
    "mlp_bench": ((784,), [("dense", 256), ("relu",), ("dense", 128), ("relu",), ("dense", 10)], 1e-3),
    "cnn_digits": ((1, 8, 8), [("conv", 32), ("relu",), ("pool",), ("flatten",), ("dense", 10)], 3e-3),
}
SMOKE_ARCH = {
    "mlp_bench": ((5,), [("dense", 4), ("relu",), ("dense", 4), ("relu",), ("dense", 3)], 1e-3),
    "cnn_digits": ((1, 4, 4), [("conv", 2), ("relu",), ("pool",), ("flatten",), ("dense", 3)], 3e-3),
}
SMOKE_BATCH = 2


def _spec_text(name: str, arch) -> str:
    """A model spec of ``arch`` (the smoke run's tiny twins of the library's models)."""
    shape, layers, lr = arch
    entries = []
    for layer in layers:
        if layer[0] == "dense":
            entries.append(f'{{ op = "dense", out = {layer[1]} }}')
        elif layer[0] == "conv":
            entries.append(f'{{ op = "conv2d", out = {layer[1]}, KH = 3, KW = 3, P = 1 }}')
        else:
            entries.append(f'{{ op = "{ {"pool": "max_pool2d"}.get(layer[0], layer[0]) }" }}')
    inp = shape[0] if len(shape) == 1 else list(shape)
    return (f'name = "{name}"\nkind = "model"\ninput = {inp}\nlayers = [{", ".join(entries)}]\n'
            f'loss = "softmax_cross_entropy"\noptimizer = {{ op = "adam", lr = {lr} }}\n')


def _batch(shape, n_out: int, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
    y = np.eye(n_out, dtype=np.float32)[rng.integers(0, n_out, batch)]
    return x, y


def _smoke_module(model: str):
    """The CUDA module of a tiny spec of ``model``'s architecture (only its ops derived)."""
    import derive
    from codegen import load_module
    from codegen.model import render_model

    ops = {"dense", "relu", "conv2d", "max_pool2d", "flatten", "softmax_cross_entropy", "adam"}
    programs = [derive.build(d) for d in derive.library_defs() if d.name in ops]
    out = Path(tempfile.mkdtemp(prefix="bench_cuda_step_"))
    spec = out / f"smoke_{model}.toml"
    spec.write_text(_spec_text(f"smoke_{model}", SMOKE_ARCH[model]))
    rel, text = render_model(spec, programs, target="cuda")
    path = out / Path(rel).name
    path.write_text(text)
    return load_module(path)


def make_symgrad(case: str, smoke: bool):
    import importlib

    import numpy as np
    from numba import cuda

    model, batch = CASES[case]
    module = _smoke_module(model) if smoke else importlib.import_module(f"generated.models.{model}_cuda")
    params = module.init(0, np.float32)
    state = module.init_state(params)
    x, y = _batch(module.INPUT_SHAPE, module.OUTPUT, SMOKE_BATCH if smoke else batch)
    x, y = module.to_device(x), module.to_device(y)

    def step():
        module.train_step(params, state, x, y, read_loss=False)
        cuda.synchronize()

    return step


def _torch_model(arch):
    import torch.nn as nn

    shape, layers, _ = arch
    mods, size, channels = [], shape, None
    for layer in layers:
        if layer[0] == "dense":
            mods.append(nn.Linear(size[0], layer[1]))
            size = (layer[1],)
        elif layer[0] == "conv":
            mods.append(nn.Conv2d(size[0], layer[1], 3, padding=1))
            size = (layer[1],) + size[1:]
        elif layer[0] == "relu":
            mods.append(nn.ReLU())
        elif layer[0] == "pool":
            mods.append(nn.MaxPool2d(2))
            size = (size[0], size[1] // 2, size[2] // 2)
        elif layer[0] == "flatten":
            mods.append(nn.Flatten())
            channels = size
            size = (channels[0] * channels[1] * channels[2],)
    return nn.Sequential(*mods)


def make_torch(case: str, smoke: bool, compiled: bool):
    import torch
    import torch.nn.functional as F

    if not (torch.cuda.is_available() or smoke):
        raise SystemExit("PyTorch sees no CUDA device: its figures would be CPU figures")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_name, batch = CASES[case]
    arch = SMOKE_ARCH[model_name] if smoke else ARCH[model_name]
    torch.manual_seed(0)
    model = _torch_model(arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=arch[2], fused=device == "cuda")
    n_out = arch[1][-1][1]
    x, y = (torch.from_numpy(a).to(device) for a in _batch(arch[0], n_out, SMOKE_BATCH if smoke else batch))
    run = torch.compile(model) if compiled and not smoke else model  # the smoke run checks eager code only
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        opt.step()
        sync()

    return step


def worker(args) -> None:
    (case,) = args.cases
    if args.worker == "symgrad":
        fn = make_symgrad(case, args.smoke)
    else:
        fn = make_torch(case, args.smoke, args.worker == "compile")
    if args.smoke:
        for _ in range(2):
            fn()
        print(json.dumps({}))
        return
    print(json.dumps({case: statistics.median(time_calls(fn, args.repeats, args.min_seconds))}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.2)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--smoke", action="store_true", help="tiny models, a few steps, no figures (checks the script)")
    p.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and not args.smoke:
        print("error: NUMBA_ENABLE_CUDASIM=1 is the simulator, not a GPU: figures need a GPU (--smoke checks the script)", file=sys.stderr)
        return 2
    common = ["--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds)] + (["--smoke"] if args.smoke else [])
    sections = list(args.sections)
    if args.smoke:
        for case in args.cases:
            for section in sections:
                run_worker(__file__, ["--worker", section, "--cases", case, *common])
                print(f"smoke: {section} {case} ran", file=sys.stderr)
        print("smoke run: every section's step ran on a tiny model of each case (no figures)")
        return 0
    times = {s: {c: [] for c in args.cases} for s in sections}
    failed = {}
    for r in range(args.rounds):
        for case in args.cases:
            order = sections[r % len(sections):] + sections[: r % len(sections)]
            for section in order:
                try:
                    times[section][case].append(run_worker(__file__, ["--worker", section, "--cases", case, *common])[case])
                except RuntimeError as exc:  # one section failing (torch.compile without a compiler) leaves the others
                    failed[(section, case)] = str(exc).splitlines()[-1]
                print(f"round {r + 1}/{args.rounds}: {section} {case} done", file=sys.stderr)
    print("### One training step on the GPU: generated CUDA model against PyTorch (float32, device arrays)\n")
    print(versions(("numba", "numba_cuda", "torch")) + f"; {args.rounds} interleaved rounds x {args.repeats} repeats.\n")
    print("| case | " + " | ".join(f"{LABELS[s]} (ms)" for s in sections) + " | symgrad / eager | symgrad / compile |")
    print("|---|" + "---:|" * (len(sections) + 2))
    for case in args.cases:
        med = {s: statistics.median(times[s][case]) * 1e3 if times[s][case] else float("nan") for s in sections}
        ratios = [med["symgrad"] / med[s] if s in med and "symgrad" in med else float("nan") for s in ("eager", "compile")]
        model, batch = CASES[case]
        print(f"| {model}, batch {batch} | " + " | ".join(f"{med[s]:.3f}" for s in sections)
              + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    for (section, case), why in sorted(failed.items()):
        print(f"\n{section} {case} failed: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
