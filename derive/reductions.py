"""A loss's reduction, PyTorch's ``reduction`` attribute, as a construct of the spec
language: ``reduce(terms, i, ..., weight=w)`` in the equation of a scalar output.

The construct declares the integer attribute ``reduction`` with PyTorch's codes and
names (torch.nn._reduction.get_enum): 0 = "none", 1 = "mean" (the default), 2 = "sum".

* "mean" and "sum" are one program: the output is the sum of the terms times
  ``where(reduction == 2, 1, 1/count)``, where ``count`` is the number of terms, or the
  sum of ``weight`` over the same indices (PyTorch's weighted mean: cross-entropy's
  class weights); derive.functions.expand_terms writes it when the indices are bound.
* "none" changes the output's shape: the output keeps the reduced indices as its own
  (``loss[b, n] = terms``), so it is a variant of the op, derived like any other op
  (:func:`none_variant`) and picked by ``op(..., reduction=0)`` (or
  ``reduction="none"``) in the generated module.

The output may be any multiple of the reduction (``-reduce(...)``, ``lam*reduce(...)``):
"none" then keeps that multiple of each term. Anything that is not linear in it (a square
root of a mean) has no per-term form and is an error naming the equation.
"""

from __future__ import annotations

import copy

import sympy

from .errors import SpecError
from .functions import ReduceTerms
from .spec import AttrDomain, OpDef, attr_symbol

ATTR = "reduction"
CODES = (("none", 0), ("mean", 1), ("sum", 2))
DOMAIN = AttrDomain(values=tuple(v for _, v in CODES), names=CODES)
NONE = 0


def _nodes(expr) -> list:
    return [n for n in sympy.preorder_traversal(expr) if isinstance(n, ReduceTerms)]


def declare(op: OpDef):
    """The equation holding the op's ``reduce(...)`` and that node, or None; declares the
    ``reduction`` attribute (default 1, "mean", unless the spec gives another default)
    with its values. Errors name the file and the equation."""
    found = [(eq, n) for eq in op.equations for n in _nodes(eq.rhs)]
    if not found:
        return None
    if len(found) > 1:
        raise SpecError(op.source, "an op has one `reduce(...)` (PyTorch's `reduction` attribute applies to one output)",
                        found[1][0].text)
    eq, node = found[0]
    if eq.target not in op.outputs or op.outputs[eq.target] or eq.index:
        raise SpecError(op.source, f"`reduce(...)` reduces a loss to a scalar: it belongs in the equation of an output "
                                   f"declared with the shape \"\" (`{eq.target}` is not one)", eq.text)
    if _nodes(node.body) or _nodes(node.weight):
        raise SpecError(op.source, "`reduce(...)` cannot hold another `reduce(...)`", eq.text)
    r = sympy.Dummy("r")
    outer = eq.rhs.xreplace({node: r})
    slope = sympy.diff(outer, r)
    if outer.subs(r, 0) != 0 or slope.has(r):
        raise SpecError(op.source, "the output must be a multiple of `reduce(...)` (such as `-reduce(...)`): with "
                                   "reduction = \"none\" it keeps that multiple of each term", eq.text)
    default = op.attrs.get(ATTR, 1)
    if ATTR in op.attrs and not DOMAIN.allows(default):
        raise SpecError(op.source, f"the attribute `{ATTR}` of `reduce(...)` takes PyTorch's codes "
                                   f"({DOMAIN.describe()}); its default {default!r} is not one")
    op.attrs[ATTR] = int(default)
    op.attr_domains[ATTR] = DOMAIN
    op.symbols[ATTR] = attr_symbol(ATTR, int(default))
    return eq, node


def none_variant(op: OpDef, found) -> OpDef:
    """The op at reduction = 0 ("none"): the output of ``reduce(...)`` indexed by its
    reduced indices, each element its term (times the multiple the equation gives), a
    new OpDef derived like any other. ``op`` is unbound (:func:`declare` has run)."""
    from .spec import bind

    eq, node = found
    # the indices' sizes, as binding the op gives them
    bound = bind(copy.deepcopy(op))
    k = op.equations.index(eq)
    ranges = bound.equations[k].ranges
    names = []
    for i in node.indices:
        size = ranges[i]
        if not (isinstance(size, sympy.Symbol) and op.symbols.get(size.name) == size):
            raise SpecError(op.source, f"with reduction = \"none\" the output `{eq.target}` takes the reduced index `{i}` as "
                                       f"an axis, whose size {size} must be a dimension name; give it one in `dims`", eq.text)
        names.append(size.name)
    variant = copy.deepcopy(op)
    variant.name = f"{op.name}[{ATTR}=none]"
    variant.outputs[eq.target] = tuple(names)
    target = variant.equations[k]
    r = sympy.Dummy("r")
    rhs = target.rhs.xreplace({node: r}).subs(r, node.body)
    indices = tuple(node.indices)
    text = f"{eq.target}[{', '.join(map(str, indices))}] = {sympy.sstr(rhs)}"
    target.index, target.rhs, target.text = indices, rhs, text
    target.reads = tuple(x for x in target.reads if not isinstance(x, ReduceTerms))
    # what only the mean needed (the summed weights) is not computed
    needed = set(variant.outputs)
    kept = []
    for e in reversed(variant.equations):
        if e.target in needed:
            kept.append(e)
            needed |= {str(x.base) for x in e.rhs.atoms(sympy.Indexed)} | {x.name for x in e.rhs.free_symbols}
    variant.equations = kept[::-1]
    return variant
