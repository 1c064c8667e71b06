"""python -m codegen [--check] | python -m codegen SPEC.toml [--out DIR]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import GENERATED, check, regenerate, render_spec
from .writer import write_if_changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codegen",
        description="Regenerate generated/ from the library specs, or build a user's TOML spec.",
    )
    parser.add_argument("spec", nargs="?", help="a user's op spec (TOML); omit to regenerate generated/")
    parser.add_argument("--out", default=".", help="output directory for SPEC (default: .)")
    parser.add_argument("--check", action="store_true", help="exit 1 if generated/ is stale (writes nothing)")
    parser.add_argument("--root", default=str(GENERATED), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.spec:
        from derive import SpecError

        try:
            files = render_spec(args.spec, args.out)
        except SpecError as e:
            print("error: %s" % e, file=sys.stderr)
            return 2
        for name in sorted(files):
            path = Path(args.out) / name
            state = "wrote" if write_if_changed(path, files[name]) else "unchanged"
            print("%s %s" % (state, path))
        return 0
    if args.check:
        result = check(args.root)
        problems = [(kind, rel) for kind in ("stale", "missing", "extra") for rel in result[kind]]
        for kind, rel in problems:
            print("%s: %s" % (kind, Path(args.root) / rel))
        if problems:
            print("generated/ is out of date; run: python -m codegen", file=sys.stderr)
            return 1
        print("generated/ is up to date (%.1fs)" % (time.perf_counter() - start))
        return 0
    report = regenerate(args.root)
    for rel in report["written"]:
        print("wrote %s" % (Path(args.root) / rel))
    for rel in report["removed"]:
        print("removed %s" % (Path(args.root) / rel))
    print(
        "%d written, %d unchanged, %d removed (%.1fs)"
        % (len(report["written"]), len(report["unchanged"]), len(report["removed"]), time.perf_counter() - start)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
