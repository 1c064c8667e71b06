"""``python -m derive``: print or write derivations as LaTeX or Markdown.

    python -m derive softmax_cross_entropy          # one library op, LaTeX to stdout
    python -m derive my_spec.toml                   # a user's spec
    python -m derive --all --out derivations.tex    # the library as a document (.tex or .md)
"""

from __future__ import annotations

import argparse
import sys

from . import SpecError, library, library_defs
from .latex import TEX_PREAMBLE, render_md, render_tex
from .writer import write_atomic


def _blocks_for(program):
    return program.extra.get("blocks") or [("raw", program.latex)]


def document(programs, fmt: str, title: str = "derivations of the op library") -> str:
    """A whole document: Markdown with ``$$`` math, or a .tex file that compiles. An op's
    variants (a loss at reduction = "none") follow it."""
    programs = [q for p in programs for q in (p, *(v for _, v in p.variants))]
    if fmt == "md":
        parts = [f"# symgrad: {title}", "",
                 "Every gradient below was derived by SymPy from the forward definition; "
                 "$\\bar{t}$ is the gradient of the final scalar with respect to $t$.", ""]
        for p in programs:
            parts.append(render_md(_blocks_for(p)))
        return "\n".join(parts)
    parts = [TEX_PREAMBLE, "\\section*{symgrad: %s}" % title.replace("_", "\\_"),
             "Every gradient below was derived by SymPy from the forward definition; "
             "$\\bar{t}$ is the gradient of the final scalar with respect to $t$.", "",
             "\\tableofcontents", ""]
    for p in programs:
        parts.append(render_tex(_blocks_for(p), level="subsection", fit=True))
    parts.append("\\end{document}\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m derive", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", help="a library op name or a .toml spec file")
    parser.add_argument("--all", action="store_true", help="the whole library as one document")
    parser.add_argument("--out", help="write to this file (.tex or .md) instead of stdout")
    parser.add_argument("--format", choices=("tex", "md"), help="default: from --out's suffix, else tex")
    parser.add_argument("--list", action="store_true", help="list the library's ops")
    args = parser.parse_args(argv)
    fmt = args.format or ("md" if args.out and args.out.endswith(".md") else "tex")
    try:
        if args.list:
            for op in library_defs():
                print(f"{op.kind:<11} {op.name}")
            return 0
        if args.all:
            text = document(library(), fmt)
        elif args.target:
            if args.target.endswith(".toml"):
                from . import from_file

                program = from_file(args.target)
            else:
                found = [p for p in library() if p.name == args.target]
                if not found:
                    names = ", ".join(sorted(o.name for o in library_defs()))
                    print(f"error: no library op named {args.target!r}; known: {names}", file=sys.stderr)
                    return 2
                program = found[0]
            if args.out:  # a file is a whole document
                text = document([program], fmt, title=f"the derivation of {program.name}")
            else:
                text = render_md(_blocks_for(program)) if fmt == "md" else program.latex
        else:
            parser.print_usage(sys.stderr)
            return 2
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
