"""Simplification of derived gradients towards their textbook forms.

Targeted rewrites instead of ``simplify()`` (slow and unpredictable on large
expressions). Every rewrite is an identity; a candidate replaces the expression only
when it has fewer operations:

* stability rewrites again (derivatives of stable forms can reintroduce patterns);
* ``factor_terms(expand(e))``: collects ``g (1 - y) sigma - g y (1 - sigma)`` into
  ``g (sigma - y)``;
* *inverse substitution*: a reduction intermediate S that a later elementwise
  statement maps invertibly to L (``L = m + log S``) is replaced by the inverse
  (``S = exp(L - m)``), and exponentials are combined;
* *forward reuse*: a subexpression equal to the body of an elementwise forward
  statement is replaced by a read of that statement's result (``exp(x - lse) -> y``
  for softmax), so the backward reads what the forward computed.
"""

from __future__ import annotations

import sympy

from .functions import sigmoid
from .normalize import Stmt, _elementary_rewrites


def _cost(e):
    return (sympy.count_ops(e), len(sympy.srepr(e)))


def _inverse_rules(stmts: list[Stmt], shapes):
    """Rules S[o] -> f^-1(L[o], ...) from elementwise statements L[o] = f(S[o], ...)."""
    sums = {s.target for s in stmts if s.reduce == "sum"}
    rules = []
    for s in stmts:
        if s.reduce != "none" or not s.free:
            continue
        for read in sorted(s.body.atoms(sympy.Indexed), key=sympy.default_sort_key):
            if str(read.base) not in sums or tuple(read.indices) != tuple(s.free):
                continue
            x = sympy.Dummy("S", positive=True)
            lhs = sympy.IndexedBase(s.target, real=True)[tuple(s.free)]
            sol = sympy.solve(sympy.Eq(lhs, s.body.xreplace({read: x})), x)
            if len(sol) == 1:
                rules.append((read, s.free, sol[0]))
    return rules


def _apply_rule(expr, read, free, value):
    wild = {i: sympy.Wild(f"w_{i}") for i in free}
    pattern = read.xreplace(wild)
    return expr.replace(pattern, value.xreplace(wild))


def reuse_forward(expr, stmts: list[Stmt]):
    for s in stmts:
        if s.reduce != "none" or not s.free or sympy.count_ops(s.body) < 2:
            continue
        wild = {i: sympy.Wild(f"w_{i}") for i in s.free}
        pattern = s.body.xreplace(wild)
        target = sympy.IndexedBase(s.target, real=True)[tuple(wild[i] for i in s.free)]
        expr = expr.replace(pattern, target)
    return expr


def _textbook_identities(expr):
    """Identities that shorten derivatives of stabilised forms: 2 sigma(2a) - 1 = tanh(a)."""
    from .normalize import _replace, _w

    return _replace(expr, 2 * sigmoid(2 * _w) - 1, lambda w: sympy.tanh(w))


def simplify_expr(expr, stmts: list[Stmt], rules) -> sympy.Expr:
    expr = _textbook_identities(_elementary_rewrites(expr))
    candidates = [expr]
    if sympy.count_ops(expr) < 80 and not expr.has(sympy.Piecewise):
        candidates.append(sympy.factor_terms(sympy.expand(expr)))
    candidates.append(sympy.factor_terms(expr))
    candidates = [sympy.powsimp(c, combine="exp") for c in candidates]
    candidates += [reuse_forward(c, stmts) for c in candidates]
    best = min(candidates, key=_cost)
    if rules:
        trial = best
        for read, free, value in rules:
            trial = _apply_rule(trial, read, free, value)
        trial = sympy.powsimp(trial, combine="exp")
        trial = reuse_forward(trial, stmts)
        trial = sympy.factor_terms(trial)
        if _cost(trial) < _cost(best):
            best = trial
    reused = reuse_forward(best, stmts)
    if _cost(reused) <= _cost(best):
        best = reused
    return best


def merge_elementwise(backward) -> None:
    """Several elementwise contributions to one gradient become one expression, placed
    where the last of them stood (everything it reads is computed by then)."""
    by_grad: dict[str, list] = {}
    for t in backward.terms:
        if t.elementwise:
            by_grad.setdefault(t.grad, []).append(t)
    for group in by_grad.values():
        if len(group) < 2:
            continue
        last = group[-1]
        total = sympy.Add(*[t.expr.xreplace(dict(zip(t.free, last.free))) for t in group])
        last.merged = [t for t in group]
        last.expr = total
        for t in group[:-1]:
            backward.terms.remove(t)


def simplify_terms(backward, stmts: list[Stmt], shapes) -> None:
    rules = _inverse_rules(stmts, shapes)
    merge_elementwise(backward)
    for t in backward.terms:
        t.expr = simplify_expr(t.expr, stmts, rules)
