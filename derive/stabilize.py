"""Stability rewrites that look across statements and at products, after normalisation.

Each is a rule over expression shapes (never over an op's name), applied to the
normalised statements (derive/normalize.py) before differentiation:

* :func:`look_through`: a logarithm of an elementwise intermediate is rewritten with the
  intermediate's definition substituted when that resolves it. With ``p = sigmoid(z)``
  (focal loss as its paper writes it), ``log(p)`` becomes ``-softplus(-z)`` and
  ``log(1 - p)`` becomes ``-softplus(z)``: finite where ``p`` rounds to 0 or 1. With
  ``p = exp(s - m) / S`` (a softmax named on its own line), ``log(p)`` becomes
  ``s - m - log(S)``. The intermediate keeps its statement for its other reads.
* :func:`zero_times_log`: a product ``X^a F`` (a > 0) where F holds ``log(Y)`` with X a
  factor of Y, and X nowhere else (``p log p``, ``p log(p / q)``: an entropy or a KL
  divergence written from its definition), is 0 where X is 0, its limit, instead of
  ``0 * log(0) = NaN``.
* :func:`merge_exponentials`: ``exp(a) / exp(b)`` is ``exp(a - b)``, also where the
  numerator is a sum holding the exponential (``(exp(a) + c) / exp(b)``).
* :func:`idle_shifts`: the maxima of derive/normalize.py's shifted sums
  ``exp(m) * sum(exp(E - m) F)`` whose factor ``exp(m)`` is not absorbed anywhere (see
  there); the pipeline normalises again without them.
"""

from __future__ import annotations

import sympy
from sympy.codegen.cfunctions import log1p

from .normalize import Stmt, elementary_rewrites, statement_text

_LOGS = (sympy.log, log1p)


def _definitions(stmts: list[Stmt]) -> dict[str, Stmt]:
    """Elementwise statements whose body holds a function a logarithm can undo."""
    return {s.target: s for s in stmts
            if s.reduce == "none" and not s.stop_gradient and s.body.atoms(sympy.Function)}


def _substituted(arg, defs: dict[str, Stmt]):
    """``arg`` with every read of a definition in ``defs`` replaced by its body."""
    mapping = {}
    for r in arg.atoms(sympy.Indexed):
        s = defs.get(str(r.base))
        if s is not None and len(r.indices) == len(s.free):
            mapping[r] = s.body.xreplace(dict(zip(s.free, r.indices)))
    for sym in arg.atoms(sympy.Symbol):
        s = defs.get(sym.name)
        if s is not None and not s.free:
            mapping[sym] = s.body
    return arg.xreplace(mapping) if mapping else None


def _resolved(expr, functions) -> bool:
    """No logarithm in ``expr`` still takes one of ``functions`` (exp, sigmoid, ...)."""
    return not any(isinstance(n, _LOGS) and n.args[0].atoms(sympy.Function) & functions
                   for n in sympy.preorder_traversal(expr))


def look_through(stmts: list[Stmt]) -> None:
    """Rewrite, in place, logarithms of elementwise intermediates (see the module doc)."""
    defs = _definitions(stmts)
    if not defs:
        return
    for k, s in enumerate(stmts):
        earlier = {n: d for n, d in defs.items() if any(d is t for t in stmts[:k])}
        if not earlier or not s.body.has(*_LOGS):
            continue

        def rewrite(node):
            inner = _substituted(node.args[0], earlier)
            if inner is None:
                return node
            candidate = elementary_rewrites(sympy.log(1 + inner) if isinstance(node, log1p) else sympy.log(inner))
            functions = {f for f in inner.atoms(sympy.Function)} - set(node.args[0].atoms(sympy.Function))
            if functions and _resolved(candidate, functions):
                return candidate
            return node

        body = s.body.replace(lambda e: isinstance(e, _LOGS), rewrite)
        if body != s.body:
            s.body, s.text = body, ""


def _factor_of(x, y) -> bool:
    """Whether ``x`` is a factor of ``y`` with a positive exponent (so y = 0 where x = 0)."""
    for f in sympy.Mul.make_args(y):
        base, exp = f.as_base_exp()
        if base == x and exp.is_positive:
            return True
    return False


def _vanishes_with(x, f) -> bool:
    """Whether ``x * f`` tends to 0 with x: f holds a log of a multiple of x, and x
    nowhere else (``log(x) + 2`` does; ``log(x) + 1/x`` does not)."""
    logs = [n for n in sympy.preorder_traversal(f) if isinstance(n, sympy.log) and _factor_of(x, n.args[0])]
    if not logs:
        return False
    rest = f.xreplace({n: sympy.Dummy() for n in logs})
    return not rest.has(x) and not rest.has(sympy.log)


def _zero_where_factor_vanishes(mul):
    for f in mul.args:
        base, exp = f.as_base_exp()
        if base.is_Number or not exp.is_positive or f.has(sympy.log):
            continue
        if any(_vanishes_with(base, g) for g in mul.args if g is not f):
            return sympy.Piecewise((0, sympy.Eq(base, 0)), (mul, True))
    return mul


def zero_times_log(stmts: list[Stmt]) -> None:
    """``X^a log(Y)`` with X a factor of Y is 0 where X is 0 (see the module doc)."""
    for s in stmts:
        if s.body.has(sympy.log):
            body = s.body.replace(lambda e: e.is_Mul and e.has(sympy.log), _zero_where_factor_vanishes)
            if body != s.body:
                s.body, s.text = body, ""


def _shifted_sums(stmts: list[Stmt]):
    """The stability pass's shifted sums ``S = sum(exp(E - m) ...)``: (S, m's statement, E)."""
    maxima = {s.target: s for s in stmts if s.reduce == "max" and s.stop_gradient}
    out = []
    for s in stmts:
        if s.reduce != "sum" or s.origin != "stability":
            continue
        for e in s.body.atoms(sympy.exp):
            indexed = e.args[0].atoms(sympy.Indexed)
            labels = {r.base.label for r in indexed}
            reads = [r for r in indexed | (e.args[0].atoms(sympy.Symbol) - labels)
                     if str(getattr(r, "base", r)) in maxima]
            if len(reads) == 1:
                out.append((s, maxima[str(getattr(reads[0], "base", reads[0]))], e.args[0] + reads[0], reads[0]))
                break
    return out


def name_shifted_logs(stmts: list[Stmt], shapes: dict) -> None:
    """``log(S)`` of a shifted sum in a later statement (a softmax named on its own line,
    then its log: ``E - m - log(S)`` after :func:`look_through`) is computed once per row,
    and ``E - m`` as a statement of its own placed after the maximum, as derive/normalize.py
    does within one equation: the kernels' reassociating arithmetic would otherwise round
    ``E - (m + log S)`` at the magnitude of m."""
    from .normalize import Namer
    from .simplify import index_instances, replace_subexpression

    namer = Namer({s.target for s in stmts} | {str(r.base) for s in stmts for r in s.body.atoms(sympy.Indexed)})
    for S, m_stmt, e, m in _shifted_sums(stmts):
        log_name = shift_name = None
        base = m_stmt.target.rsplit("_max", 1)[0]  # the equation the stability pass shifted
        for u in stmts[stmts.index(S) + 1:]:
            logs = [n for n in u.body.atoms(sympy.log)
                    if (isinstance(n.args[0], sympy.Indexed) and str(n.args[0].base) == S.target)
                    or (isinstance(n.args[0], sympy.Symbol) and n.args[0].name == S.target)]
            if not logs:
                continue
            if u.reduce == "none" and tuple(u.free) == tuple(S.free) and u.body == logs[0] and len(logs) == 1 \
                    and (not S.free or tuple(logs[0].args[0].indices) == tuple(S.free)):
                log_name = u.target  # the log of the sum, computed already
                continue
            if log_name is None:
                log_name = namer(f"{base}_logsumexp")
                read = sympy.IndexedBase(S.target, real=True)[tuple(S.free)] if S.free else sympy.Symbol(S.target, real=True)
                stmts.insert(stmts.index(S) + 1, Stmt(
                    log_name, S.free, sympy.log(read), "none", (), {i: S.ranges[i] for i in S.free}, origin="stability",
                    note="the logarithm of the shifted sum; the log-sum-exp is the maximum plus it"))
                shapes[log_name] = tuple(S.ranges[i] for i in S.free)
            mapping = {}
            for n in logs:
                idx = tuple(n.args[0].indices) if isinstance(n.args[0], sympy.Indexed) else ()
                mapping[n] = (sympy.IndexedBase(log_name, real=True)[idx] if idx else sympy.Symbol(log_name, real=True))
            body = u.body.xreplace(mapping)
            idx = tuple(m_stmt.free) + tuple(m_stmt.over)
            renamed = dict(zip(tuple(m_stmt.free) + tuple(S.over), idx))
            e_m = (e - m).xreplace(renamed)
            for inst in index_instances(Stmt("", idx, e_m), body):
                if shift_name is None:
                    shift_name = namer(f"{base}_shifted")
                    stmts.insert(stmts.index(m_stmt) + 1, Stmt(
                        shift_name, idx, e_m, "none", (), dict(m_stmt.ranges), origin="stability",
                        note="the exponent less its maximum, rounded on its own"))
                    shapes[shift_name] = tuple(m_stmt.ranges[i] for i in idx)
                body = replace_subexpression(body, e_m.xreplace(inst),
                                             sympy.IndexedBase(shift_name, real=True)[tuple(inst[i] for i in idx)])
            u.body, u.text = body, ""


def _names_read(expr) -> set[str]:
    return {str(r.base) for r in expr.atoms(sympy.Indexed)} | {x.name for x in expr.atoms(sympy.Symbol)}


def _live(stmts: list[Stmt], outputs) -> list[Stmt]:
    """The statements an output depends on (an intermediate whose every read a rewrite
    replaced, a named sum of exponentials read only under a log, is not computed for them)."""
    live, needed = [], set(outputs)
    for s in reversed(stmts):
        if s.target in needed:
            live.append(s)
            needed |= _names_read(s.body)
    return live[::-1]


def _reads_of(name: str, expr):
    """The reads of ``name`` in ``expr``: ``name[...]``, or the scalar ``name``."""
    indexed = [r for r in expr.atoms(sympy.Indexed) if str(r.base) == name]
    return indexed or [x for x in expr.atoms(sympy.Symbol) if x.name == name]


def _absorbed(arg, read, m: Stmt, maxima: set[str]) -> bool:
    """Whether ``exp(arg)``, which holds the maximum ``read`` of ``m``, is the exponential of
    a difference ``c (m - X)`` (plus anything else), X an instance of the maximised exponent
    (``exp(E[c] - m)``: a softmax's numerator, a shifted sum's own terms) or another maximum
    (a ratio of sums over two exponents): only then did the shift take the magnitude of m
    out of an exponential. ``exp(m)`` itself, ``exp(2 m)``, ``exp(m + y)`` are not."""
    c = sympy.diff(arg, read)
    if c == 0 or c.has(read):
        return False
    rest = sympy.expand(-(arg - c * read) / c, deep=False)
    terms = set(sympy.Add.make_args(rest))
    if any(t in terms for n in maxima - {m.target} for t in _reads_of(n, rest)):
        return True
    e = m.body.args[0][0] if isinstance(m.body, sympy.Piecewise) else m.body  # a masked maximum's terms
    if isinstance(read, sympy.Indexed):
        e = e.xreplace(dict(zip(m.free, read.indices)))
    wild = {j: sympy.Wild(f"w_{j}") for j in m.over}
    pattern = e.xreplace(wild)
    for r in rest.atoms(sympy.Indexed):
        for p in pattern.atoms(sympy.Indexed):
            if r.base != p.base:
                continue
            match = r.match(p)
            if match is None:
                continue
            instance = pattern.xreplace(match)
            if not instance.has(sympy.Wild) and set(sympy.Add.make_args(sympy.expand(instance, deep=False))) <= terms:
                return True
    return False


def idle_shifts(stmts: list[Stmt], outputs) -> frozenset:
    """The keys (:attr:`Stmt.shift`) of the stability maxima whose factor ``exp(m)`` survives:
    some statement an output depends on holds an exponential of m that is not a difference
    (:func:`_absorbed`). Where every read of m is additive (``m + log S``: a log-sum-exp,
    after :func:`look_through` also through a named sum) or inside such a difference (a
    ratio of sums sharing m cancels it outright), the shift keeps the computation at the
    magnitude of the result; where ``exp(m)`` survives (``exp(m) * S`` of a weighted sum
    of exponentials on its own, ``exp(2 m)`` of its square) it overflows exactly where the
    written terms do, and the sum keeps its written form (one pass less, the textbook
    derivation)."""
    maxima = {s.target: s for s in stmts if s.shift is not None}
    if not maxima:
        return frozenset()
    idle = set()
    for u in _live(stmts, outputs):
        for node in u.body.atoms(sympy.exp):
            for name in _names_read(node.args[0]) & set(maxima):
                m = maxima[name]
                if m.shift in idle:
                    continue
                if not all(_absorbed(node.args[0], r, m, set(maxima)) for r in _reads_of(name, node.args[0])):
                    idle.add(m.shift)
    return frozenset(idle)


def _has_exp_term(add) -> bool:
    return any(isinstance(f, sympy.exp) for t in add.args for f in sympy.Mul.make_args(t))


def _merged_exponentials(mul):
    """``exp(-b) * (exp(a) + c)`` as ``exp(a - b) + c exp(-b)``; ``exp(a) exp(-b)`` as ``exp(a - b)``."""
    sums = [f for f in mul.args if isinstance(f, sympy.Add) and _has_exp_term(f)]
    if sums and any(isinstance(f, sympy.exp) for f in mul.args):
        rest = sympy.Mul(*[f for f in mul.args if f is not sums[0]])
        return sympy.Add(*[_merged_exponentials(m) if m.is_Mul else m for m in (rest * t for t in sums[0].args)])
    if sum(isinstance(f, sympy.exp) for f in mul.args) > 1:
        return sympy.powsimp(mul, combine="exp")
    return mul


def merge_exponentials(stmts: list[Stmt]) -> None:
    """A quotient or product of exponentials is one exponential: ``exp(a) / exp(b)``
    (a ratio of variances given by their logarithms, as the KL divergence between two
    Gaussians is written) is ``inf / inf = NaN`` where a and b are large, while
    ``exp(a - b)`` is finite wherever the true value is. An exponential times a sum that
    holds an exponential is distributed over the sum for this."""
    for s in stmts:
        if s.body.has(sympy.exp):
            body = s.body.replace(lambda e: e.is_Mul and any(isinstance(f, sympy.exp) for f in e.args), _merged_exponentials)
            if body != s.body:
                s.body, s.text = body, ""


def stabilize(stmts: list[Stmt], shapes: dict | None = None) -> None:
    """The rewrites, in place; a rewritten statement's text is written again. ``shapes``
    (the op's intermediates) gets the shapes of the statements added."""
    merge_exponentials(stmts)
    look_through(stmts)
    zero_times_log(stmts)
    name_shifted_logs(stmts, shapes if shapes is not None else {})
    for s in stmts:
        if not s.text:
            s.text = statement_text(s)
