"""A long differential-fuzzing campaign (issue 11): random specs over the whole spec
language, each built with ``codegen.build`` and compared with PyTorch (float64) and
central finite differences; see tests/fuzz_specs.py for the generator and the check.

    .venv/bin/python scripts/fuzz_campaign.py --n 2000 --out fuzz-out
    .venv/bin/python scripts/fuzz_campaign.py --large --n 200 --out fuzz-large  # |x| ~ 1e2-1e3

``--large`` is the large-input mode: stability-relevant shapes (log-sum-exp, softmax and
attention ratios, log of sigmoid, softplus, x*log(x), ...) with inputs at |v| ~ 1e2-1e3,
checked against a 50-digit mpmath evaluation of the same tree (the true value): results
must be finite and accurate wherever the true value is finite; a sample whose true value
overflows is discarded. With ``--float32`` too, float32 results are held to PyTorch's
float32 error on the same tree (or to the float32 sensitivity where PyTorch's float32 is
not finite): ``imprecise`` otherwise.

Spec ``k`` of a campaign depends only on ``--seed``, ``k`` and the fuzzer's version
(``--start`` resumes or replays one: ``--start 417 --n 1``). Every failing spec's TOML
and its mismatch are printed and saved under ``--out`` (``<k>-<name>-<target>.toml``,
``.txt``, and ``.pkl``, which ``--replay`` checks again); the summary
(checked, wrong, crashed, refused, discarded, and each distinct failure with the first
spec that showed it) is printed and written to ``--out/summary.json``.

The codegen/derive that run are the ones first on ``sys.path``: to fuzz another
checkout, ``cd OTHER && PYTHONPATH=OTHER python /path/to/scripts/fuzz_campaign.py``
(the modules' files are printed at the start).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before anything imports numba

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))  # fuzz_specs and reference
sys.path.append(str(HERE))  # derive, codegen: unless PYTHONPATH names another checkout


def _work(job):
    """One spec, checked in a worker process: (spec, target, float32, second_order)."""
    import fuzz_specs as fz

    import codegen

    spec, target, float32, second_order = job  # the parent's spec: a change to the generator mid-campaign cannot skew it
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        return fz.check(spec, tmp, target=target, float32=float32, second_order=second_order), codegen.__file__


def signature(outcome) -> str:
    """A failure's kind, without the numbers: groups the same bug across specs."""
    lines = [ln for ln in outcome.message.strip().splitlines() if ln.strip()]
    if outcome.status in ("crash", "oracle"):
        last = lines[-1] if lines else ""
        text = re.sub(r"'[^']*'", "'…'", last)
        text = re.sub(r"fz_[0-9a-f]+", "fz_…", text)
    else:
        text = lines[0] if lines else ""
        text = re.sub(r"gradient of \w+", "gradient of …", text)
        text = re.sub(r"(output|state) \w+", r"\1 …", text)
        text = text.split(";")[0]  # "what: shape (1,), expected ()" or "what: 3 of 6 differ"
        text = re.sub(r"\d+ of \d+ differ", "values differ", text)
    text = re.sub(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
    return f"{outcome.status}/{outcome.stage}/{outcome.target}: {text}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="how many specs (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    ap.add_argument("--start", type=int, default=0, help="index of the first spec (default 0)")
    ap.add_argument("--families", default="",
                    help="comma-separated subset of: activation,layer,window,split,loss,optimizer,gather,assume "
                         "(with --large: stable_act,stable_layer,stable_loss,activation,layer)")
    ap.add_argument("--cuda-every", type=int, default=0,
                    help="also check every K-th spec's CUDA kernels (simulator unless a GPU is lent); 0: never")
    ap.add_argument("--no-temporaries", action="store_true", help="no optimizer temporaries")
    ap.add_argument("--float32", action="store_true",
                    help="also compare float32 results' error with PyTorch float32's (status 'imprecise')")
    ap.add_argument("--no-second-order", action="store_true",
                    help="do not compare op.jvp and op.hvp with PyTorch's forward-mode and second derivatives")
    ap.add_argument("--max-depth", type=int, default=3)
    ap.add_argument("--large", action="store_true",
                    help="large-input mode: stability shapes at |x| ~ 1e2-1e3 against a high-precision oracle")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per spec before it counts as a crash")
    ap.add_argument("--minutes", type=float, default=0,
                    help="stop starting new specs after this many minutes (the summary counts those run); 0: no limit")
    ap.add_argument("--recycle", type=int, default=40, help="specs per worker process before a fresh one")
    ap.add_argument("--out", default="fuzz-out", help="directory for failing specs and summary.json")
    ap.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    ap.add_argument("--replay", default="", help="check one saved failing spec (a .pkl under --out) and exit")
    args = ap.parse_args(argv)

    import importlib.util

    import fuzz_specs as fz

    codegen_file = importlib.util.find_spec("codegen").origin  # what the workers will import
    derive_file = importlib.util.find_spec("derive").origin
    print(f"codegen: {codegen_file}\nderive:  {derive_file}\nfuzzer:  {fz.__file__}", flush=True)
    families = tuple(f for f in args.families.split(",") if f) or (fz.LARGE_FAMILIES if args.large else fz.FAMILIES)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replay:  # the spec exactly as the campaign that saved it generated it
        spec = pickle.loads(Path(args.replay).read_bytes())
        for target in ["cpu"] + (["cuda"] if args.cuda_every else []):
            with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
                outcome = fz.check(spec, tmp, target=target, float32=args.float32,
                                   second_order=not args.no_second_order)
            print(outcome.report())
        return 0 if outcome.status in ("ok", "refused", "discarded") else 1

    counts: Counter = Counter()
    by_family: dict = {}
    first: dict = {}  # signature -> {"index", "count", "spec", "message"}
    imprecise: dict = {}
    t0 = time.time()
    gen_kw = dict(families=families, temporaries=not args.no_temporaries, max_depth=args.max_depth, large=args.large)
    # each spec runs in a worker process, replaced every --recycle specs: the built modules
    # and their compiled kernels stay loaded (~25 MB a spec), and a hang or a crash of the
    # interpreter costs one spec, not the campaign
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(1, maxtasksperchild=args.recycle)
    run = 0
    for k in range(args.start, args.start + args.n):
        if args.minutes and time.time() - t0 > 60 * args.minutes:
            print(f"stopped after {args.minutes:g} minutes, at spec {k}", flush=True)
            break
        run += 1
        spec = fz.random_spec(args.seed, k, **gen_kw)
        targets = ["cpu"] + (["cuda"] if args.cuda_every and k % args.cuda_every == 0 else [])
        for target in targets:
            t1 = time.time()
            job = (spec, target, args.float32 and target == "cpu", not args.no_second_order)
            try:
                outcome, used = pool.apply_async(_work, (job,)).get(timeout=args.timeout)
                if used != codegen_file:
                    raise SystemExit(f"the worker imported {used}, not {codegen_file}")
            except mp.TimeoutError:
                outcome = fz.Outcome("crash", "timeout", f"no result after {args.timeout} s "
                                     "(or the worker died)", spec, target)
                pool.terminate()
                pool = ctx.Pool(1, maxtasksperchild=args.recycle)
            status = outcome.status
            counts[(status, target)] += 1
            by_family.setdefault(spec.family, Counter())[status] += 1
            line = f"[{k}] {spec.family:10s} {target:4s} {status:9s} {time.time() - t1:5.1f}s {spec.name}"
            if outcome.failed:
                sig = signature(outcome)
                entry = first.setdefault(sig, {"index": k, "count": 0, "spec": spec.toml,
                                               "message": outcome.message, "target": target})
                entry["count"] += 1
                stem = out / f"{k}-{spec.name}-{target}"
                stem.with_suffix(".toml").write_text(spec.toml)
                stem.with_suffix(".pkl").write_bytes(pickle.dumps(spec))
                stem.with_suffix(".txt").write_text(outcome.report() + "\n")
                print(f"{line}\n{outcome.report()}\n", flush=True)
            elif status == "imprecise":
                sig = signature(outcome)
                entry = imprecise.setdefault(sig, {"index": k, "count": 0, "spec": spec.toml, "message": outcome.message})
                entry["count"] += 1
                print(f"{line}\n{outcome.report()}\n", flush=True)
            elif status == "refused":
                sig = "refused: " + re.sub(r"`[^`]*`", "`…`", outcome.message.split(": ", 1)[-1])[:160]
                counts[("refused-reason", sig)] += 1
                if not args.quiet:
                    print(f"{line}  ({outcome.message[:200]})", flush=True)
            elif not args.quiet:
                print(line, flush=True)

    pool.terminate()
    elapsed = time.time() - t0
    cpu = {s: counts[(s, "cpu")] for s in ("ok", "wrong", "crash", "oracle", "refused", "discarded", "imprecise")}
    cuda = {s: counts[(s, "cuda")] for s in ("ok", "wrong", "crash", "oracle", "refused", "discarded")}
    summary = {
        "codegen": codegen_file,
        "seed": args.seed, "start": args.start, "specs": run, "families": sorted(set(families)),
        "large": args.large, "float32": args.float32,
        "seconds": round(elapsed, 1),
        "cpu": cpu, "cuda": cuda,
        "checked": cpu["ok"] + cpu["wrong"] + cpu["crash"],
        "failed": cpu["wrong"] + cpu["crash"] + cuda["wrong"] + cuda["crash"],
        "by_family": {f: dict(c) for f, c in sorted(by_family.items())},
        "refusals": {k[1]: v for k, v in counts.items() if k[0] == "refused-reason"},
        "imprecise": [{"signature": s, **v} for s, v in sorted(imprecise.items(), key=lambda kv: kv[1]["index"])],
        "distinct_failures": [{"signature": s, **v} for s, v in sorted(first.items(), key=lambda kv: kv[1]["index"])],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n==== summary ====")
    print(f"{run} specs (seed {args.seed}, from {args.start}) in {elapsed:.0f} s")
    print(f"CPU:  checked {summary['checked']} (ok {cpu['ok']}, wrong {cpu['wrong']}, crashed {cpu['crash']}); "
          f"refused {cpu['refused']}, discarded {cpu['discarded']}, oracle errors {cpu['oracle']}"
          + (f", float32 less precise than PyTorch's {cpu['imprecise']}" if args.float32 else ""))
    if args.cuda_every:
        print(f"CUDA: ok {cuda['ok']}, wrong {cuda['wrong']}, crashed {cuda['crash']}, "
              f"refused {cuda['refused']}, discarded {cuda['discarded']}")
    for f, c in sorted(by_family.items()):
        print(f"  {f:10s} {dict(c)}")
    if summary["refusals"]:
        print("refusals:")
        for r, c in sorted(summary["refusals"].items(), key=lambda kv: -kv[1]):
            print(f"  {c:4d}  {r}")
    if imprecise:
        print(f"float32 less precise than PyTorch's float32 (x{fz.F32_FACTOR:g}): {len(imprecise)} kinds")
        for s, v in sorted(imprecise.items(), key=lambda kv: kv[1]["index"]):
            print(f"  first at spec {v['index']} ({v['count']}x): {s}")
    print(f"distinct failures: {len(first)}")
    for s, v in sorted(first.items(), key=lambda kv: kv[1]["index"]):
        print(f"  first at spec {v['index']} ({v['count']}x): {s}")
    print(f"summary: {out / 'summary.json'}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
