"""A bad spec fails when it is built, with a ``derive.SpecError`` whose message names the
file, the offending name or equation, and the problem; spec text is never evaluated as
Python. Each case is checked through both entry points: ``derive.from_file`` and
``codegen.build`` (which must also leave no module behind)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest


def q(text: str) -> str:
    """A TOML basic string holding ``text`` verbatim (JSON escaping is valid TOML)."""
    return json.dumps(text)


def _layer(equation: str, inputs: str = '{ x = "B I" }', outputs: str = '{ y = "B I" }', extra: str = "") -> str:
    return f'name = "bad"\nkind = "layer"\ninputs = {inputs}\noutputs = {outputs}\n{extra}equations = [{q(equation)}]\n'


def _activation(expr: str) -> str:
    return f'name = "bad"\nkind = "activation"\nexpr = {q(expr)}\n'


@dataclass(frozen=True)
class Bad:
    id: str
    text: str
    names: tuple[str, ...]  # the message names at least one of these (the offender)
    equation: str | None = None  # the message quotes this equation/expression
    problem: str | None = None  # a regex the message's description of the problem matches


INJECTIONS = [
    "__import__('os').system('touch PWNED')",
    "eval(\"__import__('os').system('touch PWNED')\")",
    "exec(\"import os; os.system('touch PWNED')\")",
    "open('PWNED', 'w')",
    "x.__class__.__base__.__subclasses__()",
]

CASES = [
    Bad("toml-syntax", 'name = "bad"\nkind = "activation"\nexpr = "x * 2\n', ("line 3",), problem=r"(?i)toml|syntax|invalid|expected|illegal|unterminated"),
    Bad("unknown-function", _activation("foo(x)"), ("foo",), "foo(x)", r"(?i)unknown|not allowed|undefined|not a known|whitelist"),
    Bad("unknown-name", _activation("x * y"), ("y",), "x * y", r"(?i)unknown|not allowed|undefined|not a known|whitelist"),
    Bad("import", _activation(INJECTIONS[0]), ("__import__", "system"), INJECTIONS[0]),
    Bad("attribute-access", _activation("x.real"), ("real", "attribute"), "x.real"),
    Bad("lambda", _activation("(lambda z: z)(x)"), ("lambda",), "(lambda z: z)(x)"),
    Bad("dunder-name", _activation("x * __builtins__"), ("__builtins__",), "x * __builtins__"),
    Bad("dunder-attribute", _activation("x.__class__"), ("__class__", "attribute"), "x.__class__"),
    Bad("unbound-index", _layer("y[b] = x[b,i]", outputs='{ y = "B" }'), ("i",), "y[b] = x[b,i]", r"(?i)index"),
    Bad(
        "index-bound-to-two-dimensions",
        _layer("y[b,i] = x1[b,i] + x2[i,b]", inputs='{ x1 = "B I", x2 = "B I" }'),
        ("i",),
        "y[b,i] = x1[b,i] + x2[i,b]",
        r"\bB\b[\s\S]*\bI\b|\bI\b[\s\S]*\bB\b",
    ),
    Bad("index-without-range", _layer("y[b,i] = x[b,i] + sum(x[b,k+1], k)"), ("k",), "y[b,i] = x[b,i] + sum(x[b,k+1], k)", r"(?i)range"),
    Bad("undeclared-tensor", _layer("y[b,i] = x[b,i] * z[b,i]"), ("z",), "y[b,i] = x[b,i] * z[b,i]"),
    Bad("wrong-arity", _layer("y[b,i] = x[b]"), ("x",), "y[b,i] = x[b]", r"(?i)\b2\b|\b1\b|index|indices|arity|rank|dimension"),
    Bad("missing-equations", 'name = "bad"\nkind = "layer"\ninputs = { x = "B I" }\noutputs = { y = "B I" }\n', ("equations",), problem=r"(?i)missing|required"),
    Bad("missing-expr", 'name = "bad"\nkind = "activation"\n', ("expr",), problem=r"(?i)missing|required"),
    Bad("unknown-kind", 'name = "bad"\nkind = "activaton"\nexpr = "x"\n', ("activaton",), problem=r"(?i)kind"),
    Bad(
        "unknown-loss-task",
        'name = "bad"\nkind = "loss"\ntask = "ranking"\ninputs = { pred = "B N" }\noutputs = { loss = "" }\n'
        'equations = ["loss = sum(pred[b,n], b, n)"]\n',
        ("task", "ranking"),
        problem=r"(?i)classification.*binary.*regression",
    ),
]


def load_with_derive(path, tmp_path):
    import derive

    return derive.from_file(str(path))


def load_with_codegen(path, tmp_path):
    import codegen

    return codegen.build(str(path), str(tmp_path / "out"))


LOADERS = [pytest.param(load_with_derive, id="derive.from_file"), pytest.param(load_with_codegen, id="codegen.build")]


def _spec_error():
    import derive

    return derive.SpecError


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_spec_fails_with_a_clear_message(case, load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{case.id}.toml"
    path.write_text(case.text)
    with pytest.raises(_spec_error()) as info:
        load(path, tmp_path)
    message = str(info.value)
    assert path.name in message, f"the message names the file: {message}"
    assert any(n in message for n in case.names), f"the message names one of {case.names}: {message}"
    if case.equation:
        assert case.equation in message, f"the message quotes the equation: {message}"
    if case.problem:
        assert re.search(case.problem, message), f"the message says what is wrong: {message}"
    assert not (tmp_path / "out" / "bad.py").exists(), "no module is written for a bad spec"


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize(
    "spec",
    [pytest.param(_activation(e), id=f"expr-{i}") for i, e in enumerate(INJECTIONS)]
    + [
        pytest.param(_layer("y[b,i] = x[b,i]", extra=f"dims = {{ HO = {q(INJECTIONS[0])} }}\n"), id="in-dims"),
        pytest.param(_layer("y[b,i] = x[b,i] + sum(x[b,k+1], k)", extra=f"ranges = {{ k = {q(INJECTIONS[0])} }}\n"), id="in-ranges"),
        pytest.param(_layer("y[b,i] = x[b,i]", extra=f"attrs = {{ K = {q(INJECTIONS[0])} }}\n"), id="in-attrs"),
    ],
)
def test_spec_text_is_never_evaluated_as_python(spec, load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "injection.toml"
    path.write_text(spec)
    with pytest.raises(_spec_error()) as info:
        load(path, tmp_path)
    assert path.name in str(info.value)
    assert not (tmp_path / "PWNED").exists(), "spec text was executed"


@pytest.mark.parametrize(
    "spec, name",
    [
        pytest.param(_layer("y[b,i] = np[b,i]", inputs='{ np = "B I" }'), "np", id="tensor-np"),
        pytest.param(_layer("y[b,i] = x[b,i]", inputs='{ x = "B len" }', outputs='{ y = "B len" }'), "len", id="dimension-len"),
        pytest.param(_layer("y[b,i] = x[b,i] * min", extra="attrs = { min = 1.0 }\n"), "min", id="attribute-min"),
        pytest.param(_layer("y[b,i] = math[b,i]", extra="", inputs='{ x = "B I" }').replace(
            'equations = ["y[b,i] = math[b,i]"]', 'equations = ["math[b,i] = 2*x[b,i]", "y[b,i] = math[b,i]"]'), "math", id="intermediate-math"),
    ],
)
def test_a_name_the_generated_module_binds_is_refused(spec, name, tmp_path, monkeypatch):
    """A tensor, dimension or attribute keeps its name in the generated module (a
    parameter, keyword or local there), so one named like a module it imports or a
    Python builtin would shadow it: codegen refuses it with the file and the name."""
    import codegen

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "shadow.toml"
    path.write_text(spec)
    with pytest.raises(_spec_error()) as info:
        codegen.build(path, tmp_path / "out")
    message = str(info.value)
    assert path.name in message and f"`{name}`" in message and "rename" in message, message
    assert not (tmp_path / "out" / "bad.py").exists()


def test_spec_error_survives_pickling():
    """derive.library() derives in worker processes: an error must reach the caller whole
    (it used to arrive as a BrokenProcessPool, the message lost)."""
    import pickle

    from derive.errors import SpecError

    e = pickle.loads(pickle.dumps(SpecError("ops/x.py", "index `n` is bound to two dimensions", "y[n] = x[n]")))
    assert isinstance(e, SpecError) and (e.path, e.problem, e.equation) == ("ops/x.py", "index `n` is bound to two dimensions", "y[n] = x[n]")
    assert str(e) == "ops/x.py, in `y[n] = x[n]`: index `n` is bound to two dimensions"
