"""Targets are objects the code generator asks (codegen/targets/), and the library is
one module per op (generated/<group>/<op>.py and <op>_cuda.py) importing a runtime
emitted once, its derivations kept apart; a model's cache digest covers exactly the
op modules it compiles in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import codegen
from codegen import targets as tg
from codegen.emit import module_name, op_module, render_targets
from codegen.targets.numba_cpu import NumbaCPU

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "generated"


@pytest.fixture(scope="module")
def programs():
    import derive

    return {p.name: p for p in derive.library()}


# ---------------------------------------------------------------- targets


def test_the_registry_rejects_an_unknown_target_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown code-generation target 'opencl'; known targets: cpu, cuda"):
        tg.get("opencl")
    assert tg.get("cuda").suffix == "_cuda" and tg.primary() is tg.get("cpu")


def test_each_target_declares_what_it_supports():
    cpu, cuda = tg.get("cpu"), tg.get("cuda")
    assert (cpu.contractions, cpu.variants, cpu.primary) == (True, True, True)
    assert (cuda.contractions, cuda.variants, cuda.primary) == (False, True, False)
    assert cpu.module_file("conv2d") == "conv2d.py" and cuda.module_file("conv2d") == "conv2d_cuda.py"
    assert cuda.module_context([])["threads"] == 128


def test_the_emitter_compares_no_target_names():
    """emit.py and lower.py ask the target object; only codegen/targets/ knows names."""
    for name in ("emit.py", "lower.py", "__init__.py"):
        text = (REPO / "codegen" / name).read_text()
        assert not re.search(r"""[!=]= *["'](cpu|cuda)["']|["'](cpu|cuda)["'] *[!=]=""", text), name


class PlainLoops(NumbaCPU):
    """A third target for the test: CPU loops without BLAS or fused-step cores."""

    name = "plain"
    suffix = "_plain"
    contractions = False
    variants = False
    primary = False

    def scatter_store(self, pr, item) -> str:
        idx = ", ".join(pr.index(e) for e in item.scatter)
        return "%s[%s] = %s[%s] + %s  # plain" % (item.target, idx, item.target, idx, pr.index(item.local))


def test_a_third_target_renders_what_it_declares(programs, monkeypatch):
    monkeypatch.setitem(tg._REGISTRY, "plain", PlainLoops())
    texts = render_targets([programs["conv2d"]], "conv2d", "test", single="conv2d")
    assert set(texts) == {"cpu", "cuda", "plain"}
    cpu, plain = texts["cpu"], texts["plain"]
    # the CPU target contracts to BLAS and has the fused step's cores; the third does not
    assert "_gemm(" in cpu and "_conv2d_bwd_params_core" in cpu
    assert "_gemm(" not in plain and "_conv2d_bwd_params_core" not in plain
    assert "def _conv2d_fwd(" in plain and "def _conv2d_bwd(" in plain
    compile(plain, "conv2d_plain.py", "exec")
    # its scatter store is its own (embedding's backward scatters)
    scatter = render_targets([programs["embedding"]], "embedding", "test", single="embedding")
    assert "# plain" in scatter["plain"] and "# plain" not in scatter["cuda"] and "# plain" not in scatter["cpu"]


# ---------------------------------------------------------------- one module per op


def test_every_library_op_has_its_own_modules_without_latex(programs):
    import generated

    assert generated.ops() == sorted(programs)
    for name, p in programs.items():
        path = GENERATED / (op_module(p).replace(".", "/") + ".py")
        modules = [path] + ([] if p.kind == "schedule" else [path.with_name(module_name(name) + "_cuda.py")])
        for m in modules:
            text = m.read_text()
            assert "\\frac" not in text and "\\begin" not in text and "_LATEX" not in text, m
            assert "def _float_dtype(" not in text, f"{m}: imports the runtime instead of holding it"
        assert generated.op(name).latex() == p.latex


def test_no_group_module_is_left():
    for group in ("activations", "layers", "losses", "optimizers", "schedules"):
        assert not (GENERATED / (group + ".py")).exists() and (GENERATED / group / "__init__.py").exists()


def test_a_user_spec_module_is_self_contained(tmp_path):
    files = codegen.render_spec(REPO / "tests" / "specs" / "glu.toml", tmp_path)
    assert sorted(files) == ["glu.py", "glu_cuda.py"]
    for text in files.values():
        assert "from .." not in text and "import generated" not in text and "from generated" not in text
        assert "def _float_dtype(" in text


# ---------------------------------------------------------------- model cache digests


def test_a_model_digest_follows_exactly_the_op_modules_it_uses(programs):
    from codegen.model import render_model

    files = {p.relative_to(GENERATED).as_posix(): p.read_text() for p in GENERATED.rglob("*.py") if "__pycache__" not in p.parts}
    spec = REPO / "specs" / "models" / "mlp_digits.toml"  # dense, relu, a loss, adam
    _, base = render_model(spec, programs, files)
    assert "generated/layers/dense.py" in base and "generated/_runtime.py" in base
    assert "generated/activations/gelu.py" not in base
    assert "from generated.layers.dense import" in base

    def edited(rel):
        return dict(files, **{rel: files[rel] + "# edited\n"})

    assert render_model(spec, programs, edited("activations/gelu.py"))[1] == base
    assert render_model(spec, programs, edited("layers/conv2d.py"))[1] == base
    for rel in ("layers/dense.py", "activations/relu.py", "_runtime.py"):
        assert render_model(spec, programs, edited(rel))[1] != base, rel
