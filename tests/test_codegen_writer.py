"""codegen's output: byte-identical renders, atomic writes, and --check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import codegen
from codegen import writer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def library_files():
    return codegen.render_library()


def test_two_renders_are_byte_identical(library_files):
    from derive import library

    again = codegen.render_programs(library())
    for rel, text in again.items():
        assert library_files[rel] == text, rel


def test_every_file_has_the_header(library_files):
    for rel, text in library_files.items():
        if rel.startswith("models/"):
            continue
        lines = text.splitlines()
        head = lines[: lines.index("")]  # the leading comment block
        assert all(line.startswith("#") for line in head), rel
        assert head[0] == writer.MARKER, rel
        assert any(line.startswith("# Regenerate: python -m codegen") for line in head), rel
        assert any(line.startswith("# Template: codegen/templates/") for line in head), rel


def test_render_is_independent_of_hash_seed(tmp_path):
    code = (
        "import sys, hashlib, codegen\n"
        "files = codegen.render_library()\n"
        "h = hashlib.sha256()\n"
        "for k in sorted(files): h.update(k.encode()); h.update(files[k].encode())\n"
        "print(h.hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_write_if_changed(tmp_path):
    path = tmp_path / "m.py"
    assert writer.write_if_changed(path, "a = 1\n")
    mtime = path.stat().st_mtime_ns
    assert not writer.write_if_changed(path, "a = 1\n")
    assert path.stat().st_mtime_ns == mtime
    assert writer.write_if_changed(path, "a = 2\n")
    assert path.read_text() == "a = 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py"]  # no temporaries left


def test_interrupted_write_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.py"
    path.write_text("old = True\n")

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        writer.write_if_changed(path, "new = True\n")
    assert path.read_text() == "old = True\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py"]


def test_check_detects_stale_missing_and_extra(tmp_path, library_files):
    root = tmp_path / "generated"
    writer.sync_directory(root, library_files)
    assert writer.stale_files(root, library_files) == {"stale": [], "missing": [], "extra": []}
    (root / "activations/relu.py").write_text((root / "activations/relu.py").read_text() + "# edited\n")
    (root / "losses/mse.py").unlink()
    (root / "old_op.py").write_text(writer.MARKER + "\n")
    (root / "user_notes.py").write_text("# not generated\n")
    result = writer.stale_files(root, library_files)
    assert result == {"stale": ["activations/relu.py"], "missing": ["losses/mse.py"], "extra": ["old_op.py"]}
    cli = subprocess.run(
        [sys.executable, "-m", "codegen", "--check", "--root", str(root)], cwd=REPO, capture_output=True, text=True
    )
    assert cli.returncode == 1
    assert "activations/relu.py" in cli.stdout and "losses/mse.py" in cli.stdout and "old_op.py" in cli.stdout
    report = writer.sync_directory(root, library_files)
    assert report["removed"] == ["old_op.py"] and (root / "user_notes.py").exists()
    assert writer.stale_files(root, library_files) == {"stale": [], "missing": [], "extra": []}


def test_generated_is_up_to_date(library_files):
    assert writer.stale_files(codegen.GENERATED, library_files) == {"stale": [], "missing": [], "extra": []}
