"""Small helpers on gradient terms shared by the passes after the chain rule.

differentiate names new indices, simplify's ``close_sums`` evaluates full sums in closed
form, statistics substitutes them into their consumer. The three must agree on what a
plain full sum is, on how a summand splits at its summation indices and on how a new
index is named, so these live in one place rather than one copy per pass.
"""

from __future__ import annotations

import sympy


def is_full_sum(t) -> bool:
    """Whether the term ``t`` (a :class:`derive.differentiate.Term`) is a gather-form
    reduction over the whole range of each summation index, without guards: only then
    is ``sum_i f`` the forward's own ``sum_i f`` (or ``range * f`` for ``f`` free of i)."""
    if not t.loops or t.guards or t.scatter:
        return False
    return all(lo == 0 and hi == t.stmt.ranges.get(i) for i, lo, hi in t.loops)


def split_factors(expr, indices):
    """``expr`` as (product of its factors free of ``indices``, product of the rest):
    the first comes out of a sum over ``indices``."""
    indices = set(indices)
    outside, inside = [], []
    for f in sympy.Mul.make_args(expr):
        (inside if f.free_symbols & indices else outside).append(f)
    return sympy.Mul(*outside), sympy.Mul(*inside)


def fresh_index(base: str, taken: set[str]) -> sympy.Symbol:
    """An integer index named ``base``, or ``base1``, ``base2``, ... when that is in
    ``taken``; the name is added to ``taken``."""
    k = 1
    name = base
    while name in taken:
        name = f"{base}{k}"
        k += 1
    taken.add(name)
    return sympy.Symbol(name, integer=True)
