"""The one Jinja environment codegen renders with: strict, cached, whitespace-exact."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# what every generated file's header says regenerates the library (a user's spec
# built with ``--out`` names its own command)
COMMAND = "python -m codegen"
# The decorator of every CPU kernel. fastmath where it is safe: contraction into FMA,
# reassociation (vectorised sums), reciprocal multiplies and unsigned zeros. Not nnan
# or ninf (the kernels compare with -inf, a training run detects NaN losses) and not
# afn (approximate exp/log would undo the accuracy the stability rewrites buy).
NJIT = '@njit(cache=True, error_model="numpy", fastmath={"arcp", "contract", "nsz", "reassoc"})'


def _pyrepr(value) -> str:
    """A Python literal for a str/int/float/bool/None value (strings double-quoted), or
    a dict, tuple or list of them."""
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % (_pyrepr(k), _pyrepr(v)) for k, v in value.items())
    if isinstance(value, tuple):
        return _pytuple(value)
    if isinstance(value, list):
        return "[%s]" % ", ".join(_pyrepr(v) for v in value)
    r = repr(value)
    if isinstance(value, str) and r.startswith("'"):
        body = r[1:-1].replace("\\'", "'").replace('"', '\\"')
        return '"%s"' % body
    return r


def _pytuple(values) -> str:
    """A tuple literal: ``()``, ``("a",)``, ``("a", "b")``."""
    items = [_pyrepr(v) for v in values]
    if len(items) == 1:
        return "(%s,)" % items[0]
    return "(%s)" % ", ".join(items)


def _docstring(text: str) -> str:
    """Text made safe for a triple-quoted docstring."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    env.filters["pyrepr"] = _pyrepr
    env.filters["docstring"] = _docstring
    env.filters["pytuple"] = _pytuple
    env.globals["njit"] = NJIT
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)
