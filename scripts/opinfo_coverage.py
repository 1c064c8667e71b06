"""How much of PyTorch's own test inputs the library represents and passes (issue 13).

For every PyTorch operator that tests/test_opinfo.py maps onto a library op, every
distinct float64 reference sample (``OpInfo.reference_inputs``; no bound on the number,
as the test file has) is converted by the test file's converters; a sample is
*representable* when some library op converts it (the others are counted by the reason
their converter gives), and *passes* when every op that converts it matches PyTorch in
float64, forward and every gradient (tests/test_opinfo.py's float64 check).

    python scripts/opinfo_coverage.py            # a table per operator and the totals
    python scripts/opinfo_coverage.py --max-numel 65536

The README quotes the totals.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's generated/ and tests/

import reference as ref  # noqa: E402
import test_opinfo as oi  # noqa: E402


def check_case(generated, name, case, rng) -> str | None:
    """None when the sample matches PyTorch in float64, else the first mismatch."""
    try:
        op = generated.op(name, **case.attrs)
        args = ref.cast(case.args, np.float64)
        outs = ref.as_tuple(op.forward(*args))
        seeds = oi._seeds(outs, rng, np.float64)
        wrt = case.wrt if case.wrt is not None else tuple(ref.differentiable_indices(op))
        t_outs, t_grads = oi.torch_results(case, args, np.float64, wrt if op.differentiable else (), seeds)
        for k, (o, t) in enumerate(zip(outs, t_outs)):
            oi.check_close(f"output {k}", o, t, np.float64)
        if op.differentiable:
            if case.backward_error:
                try:
                    op.backward(*seeds, *args)
                except ValueError as e:
                    if not re.search(case.backward_error, str(e)):
                        return f"backward error {e}"
                    return None
                return "backward did not refuse"
            grads = ref.as_tuple(op.backward(*seeds, *args))
            oi._compare_grads(op, case, args, grads, t_grads, wrt,
                              lambda what, g, tg: oi.check_close(what, g, tg, np.float64))
    except Exception as e:  # noqa: BLE001 - a failing sample is counted, with its reason
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-numel", type=int, default=oi.MAX_NUMEL,
                        help="leave out samples with more elements (default: the test file's)")
    parser.add_argument("--verbose", action="store_true", help="print each failing sample")
    args = parser.parse_args(argv)

    import generated

    by_opinfo: dict[str, list[str]] = {}
    for name, (opinfo_name, _) in sorted(oi.OPINFO.items()):
        by_opinfo.setdefault(opinfo_name, []).append(name)
    db = oi._op_db()
    rng = np.random.default_rng(11)
    totals = {"samples": 0, "representable": 0, "passing": 0}
    print(f"{'PyTorch operator':<48} {'samples':>8} {'represented':>12} {'passing':>8}")
    for opinfo_name, names in sorted(by_opinfo.items()):
        o = db[(opinfo_name, "")]
        torch.manual_seed(0)
        random.seed(0)
        seen, n_samples, n_repr, n_pass, reasons = set(), 0, 0, 0, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s in o.reference_inputs("cpu", torch.float64, requires_grad=False):
                key = oi._signature(s)
                if key in seen:
                    continue
                seen.add(key)
                n_samples += 1
                if s.input.numel() > args.max_numel:
                    reasons["over --max-numel elements"] = reasons.get("over --max-numel elements", 0) + 1
                    continue
                converted = []
                for name in names:
                    try:
                        case = oi.OPINFO[name][1](o, s)
                    except oi.Skip as e:
                        reason = re.sub(r"[-\d.]+", "#", str(e))
                        reasons[reason] = reasons.get(reason, 0) + 1
                        continue
                    if case.what and case.what != name:
                        continue
                    case.what = key
                    converted.append((name, case))
                if not converted:
                    continue
                n_repr += 1
                failures = [f for f in (check_case(generated, n, c, rng) for n, c in converted) if f]
                if not failures:
                    n_pass += 1
                elif args.verbose:
                    print(f"  FAIL {opinfo_name} {key[:100]}: {failures[0]}")
        print(f"{opinfo_name:<48} {n_samples:>8} {n_repr:>12} {n_pass:>8}")
        totals["samples"] += n_samples
        totals["representable"] += n_repr
        totals["passing"] += n_pass
    print(f"{'total':<48} {totals['samples']:>8} {totals['representable']:>12} {totals['passing']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
