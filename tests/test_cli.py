"""The command lines: ``python -m derive`` prints derivations; ``python -m codegen``
regenerates ``generated/`` byte for byte and ``--check`` catches a stale tree.

The committed ``generated/`` is only read here: everything that alters or regenerates
works on a temporary copy of the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "generated"
SPECS = Path(__file__).resolve().parent / "specs"
# what a copy of the repository leaves out: environments, caches, run outputs
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", "*.nbi", "*.nbc", "runs", ".pytest_cache", "*.egg-info")


def run(args, cwd=REPO, env=None, timeout=900):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def normalized_latex(text: str) -> str:
    """LaTeX with spacing, sizing and grouping removed, for loose pattern matching."""
    for token in ("\\left", "\\right", "\\,", "\\!", "\\;", "{", "}", " ", "\n"):
        text = text.replace(token, "")
    return text


def repo_copy(tmp_path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=IGNORE, symlinks=True)
    return copy


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".nbi", ".nbc")
    }


# ---------------------------------------------------------------- python -m derive


def test_derive_prints_the_derivation_of_sigmoid():
    proc = run(["-m", "derive", "sigmoid"])
    assert proc.returncode == 0, proc.stderr
    text = normalized_latex(proc.stdout)
    assert "\\" in text, "LaTeX on stdout"
    # sigma(x), with the argument possibly indexed (x_n) or in roman type
    sigma = r"(\\sigma|\\operatorname(name)?sigmoid|\\mathrmsigmoid|sigmoid|σ)\((\\mathrm)?x(_\w+)?\)"
    # the textbook form sigma(x) (1 - sigma(x)), in either order
    pattern = rf"{sigma}\(1-{sigma}\)|\(1-{sigma}\){sigma}"
    assert re.search(pattern, text), f"no sigma(x)(1 - sigma(x)) in:\n{proc.stdout}"


def test_derive_accepts_a_spec_file():
    proc = run(["-m", "derive", str(SPECS / "logcosh.toml")])
    assert proc.returncode == 0, proc.stderr
    assert "logcosh" in proc.stdout and "\\" in proc.stdout


def test_derivation_of_logcosh_ends_in_the_textbook_form():
    """d/du log(cosh(u)) = tanh(u): the gradient reads (tanh(pred - target)) / B."""
    proc = run(["-m", "derive", str(SPECS / "logcosh.toml")])
    assert proc.returncode == 0, proc.stderr
    result = proc.stdout.split("Result")[-1]
    assert "tanh" in result, f"the final VJP is not in textbook form:\n{result}"


def test_derive_unknown_op_fails_naming_it():
    proc = run(["-m", "derive", "no_such_op"])
    assert proc.returncode != 0
    assert "no_such_op" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def library_documents(tmp_path_factory) -> dict[str, Path]:
    """``python -m derive --all --out`` as .md and as .tex, written once for these tests."""
    out = tmp_path_factory.mktemp("derivations")
    documents = {}
    for suffix in (".md", ".tex"):
        path = out / f"derivations{suffix}"
        proc = run(["-m", "derive", "--all", "--out", str(path)])
        assert proc.returncode == 0, proc.stderr
        documents[suffix] = path
    return documents


@pytest.mark.parametrize("suffix", [".md", ".tex"])
def test_derive_all_writes_a_document(library_documents, suffix):
    import generated

    text = library_documents[suffix].read_text()
    missing = [n for n in generated.ops() if n.replace("_", "\\_") not in text and n not in text]
    assert not missing, f"ops missing from the document: {missing}"
    if suffix == ".tex":
        assert "\\documentclass" in text and "\\begin{document}" in text and "\\end{document}" in text
    else:
        assert "$$" in text or "\\[" in text or "```math" in text, "display math in the Markdown"


@pytest.mark.parametrize("suffix", [".md", ".tex"])
def test_committed_derivations_are_up_to_date(library_documents, suffix):
    committed = REPO / "docs" / f"derivations{suffix}"
    assert committed.read_text() == library_documents[suffix].read_text(), (
        f"{committed.relative_to(REPO)} is stale: run python -m derive --all --out {committed.relative_to(REPO)}")


def pdflatex_overfull_lines(tex: Path) -> list[str]:
    """Compile ``tex`` twice (the table of contents); the log's overfull-line warnings."""
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed (.ci/run installs texlive-latex-base where it can)")
    for _ in range(2):
        proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name],
                              cwd=tex.parent, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{tex.name} does not compile:\n{proc.stdout[-3000:]}"
    assert tex.with_suffix(".pdf").stat().st_size > 0
    log = tex.with_suffix(".log").read_text(errors="replace")
    return [line for line in log.splitlines() if line.startswith("Overfull \\hbox")]


def test_library_tex_compiles_and_every_line_fits_the_page(library_documents):
    overfull = pdflatex_overfull_lines(library_documents[".tex"])
    assert not overfull, f"{len(overfull)} lines run into the margin, e.g. {overfull[:3]}"


def test_derive_out_writes_a_whole_document_for_one_op(tmp_path):
    out = tmp_path / "conv2d.tex"
    proc = run(["-m", "derive", "conv2d", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("\\documentclass") and "conv2d" in text
    overfull = pdflatex_overfull_lines(out)
    assert not overfull, overfull[:3]


# ---------------------------------------------------------------- python -m codegen


def test_generated_files_carry_the_fixed_header():
    files = sorted(p for p in GENERATED.rglob("*.py") if "__pycache__" not in p.parts)
    assert files, "generated/ holds the emitted modules"
    for path in files:
        head = "\n".join(path.read_text().splitlines()[:40])
        where = path.relative_to(REPO)
        assert "do not edit" in head.lower(), f"{where}: says it is not edited by hand"
        assert "python -m codegen" in head, f"{where}: says how to regenerate it"
        assert re.search(r"(?i)spec|derive/ops|\.toml", head), f"{where}: names the spec it came from"
        assert not re.search(r"\b(19|20)\d\d-\d\d-\d\d\b|\d\d:\d\d:\d\d", head), f"{where}: no timestamp"


def test_check_passes_on_the_committed_tree():
    proc = run(["-m", "codegen", "--check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("change", ["edit", "delete"])
def test_check_fails_naming_a_stale_file(tmp_path, change):
    copy = repo_copy(tmp_path)
    stale = copy / "generated" / "activations" / "relu.py"
    if change == "edit":
        stale.write_text(stale.read_text().replace("def ", "def  ", 1))
    else:
        stale.unlink()
    before = tree(copy / "generated")
    proc = run(["-m", "codegen", "--check"], cwd=copy, env={"PYTHONPATH": str(copy)})
    assert proc.returncode != 0, "--check must fail on a stale tree"
    assert "activations/relu.py" in proc.stdout + proc.stderr
    assert tree(copy / "generated") == before, "--check only checks; it writes nothing"


def test_regeneration_is_byte_identical(tmp_path):
    """Two regenerations (different hash seeds, run side by side) into two copies give
    the same bytes as each other and as the committed tree."""
    copies = [repo_copy(tmp_path / f"c{i}") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "codegen"],
            cwd=c,
            env={**os.environ, "PYTHONPATH": str(c), "PYTHONHASHSEED": str(seed)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c, seed in zip(copies, (1, 2))
    ]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, out + err
    first, second = (tree(c / "generated") for c in copies)
    assert sorted(first) == sorted(second)
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"regeneration is not deterministic: {differ}"
    committed = tree(GENERATED)
    assert sorted(first) == sorted(committed), "regeneration makes exactly the committed files"
    differ = [name for name in first if first[name] != committed[name]]
    assert not differ, f"the committed tree is stale: {differ}"
