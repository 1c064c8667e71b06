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

from dataclasses import replace

import sympy

from .functions import sigmoid
from .latex import tex, tex_name
from .normalize import WILD, Stmt, elementary_rewrites, replace_literal
from .terms import is_full_sum, split_factors


def cost(e):
    """What a rewrite must lower: operations, then the size of the tree."""
    return (sympy.count_ops(e), len(sympy.srepr(e)))


def _inverse_rules(stmts: list[Stmt], shapes):
    """Rules S[o] -> f^-1(L[o], ...) from elementwise statements L[o] = f(S[o], ...)."""
    sums = {s.target for s in stmts if s.reduce == "sum"}
    maxima = {s.target for s in stmts if s.reduce == "max"}
    rules = []
    for s in stmts:
        if s.reduce != "none" or not s.free or s.origin == "stability" or _reads_any(s.body, maxima):
            # not the stability pass's log(S), nor a log-sum-exp written with its maximum
            # (y = m + log S): S = exp(y - m) would bring exp(E - m - log S) back as
            # exp(E - y), with y rounded at the magnitude of m (a float32 gradient 100x
            # less precise at logits ~ 1e3)
            continue
        for read in sorted(s.body.atoms(sympy.Indexed), key=sympy.default_sort_key):
            if str(read.base) not in sums or sorted(read.indices, key=str) != sorted(s.free, key=str):
                continue
            if not _invertible_kind(s.body):
                continue
            x = sympy.Dummy("S", positive=True)
            lhs = sympy.IndexedBase(s.target, real=True)[tuple(s.free)]
            try:
                sol = sympy.solve(sympy.Eq(lhs, s.body.xreplace({read: x})), x)
            except (NotImplementedError, ValueError, TypeError):
                continue  # not invertible in closed form (e.g. through Max): no rule
            if len(sol) == 1:
                rules.append((read, s.free, sol[0]))
    return rules


def _reads_any(expr, names) -> bool:
    return any(str(r.base) in names for r in expr.atoms(sympy.Indexed)) or any(
        x.name in names for x in expr.atoms(sympy.Symbol))


def _invertible_kind(body) -> bool:
    """Only rational functions, exp and log are inverted: the inverses of sigmoid or tanh
    (logit, atanh) never shorten a gradient, and solving for them is slow."""
    return all(isinstance(f, (sympy.exp, sympy.log)) for f in body.atoms(sympy.Function))


def _apply_rule(expr, read, free, value):
    wild = {i: sympy.Wild(f"w_{i}") for i in free}
    pattern = read.xreplace(wild)
    return expr.replace(pattern, value.xreplace(wild))


def reuse_forward(expr, stmts: list[Stmt]):
    for s in stmts:
        if s.reduce != "none" or not s.free or sympy.count_ops(s.body) < 2:
            continue
        for mapping in index_instances(s, expr):
            concrete = s.body.xreplace(mapping)
            target = sympy.IndexedBase(s.target, real=True)[tuple(mapping[i] for i in s.free)]
            expr = replace_subexpression(expr, concrete, target)
        if isinstance(s.body, sympy.Pow) and s.body.exp.is_Rational:
            # T = B**p, so B**q = T**(q/p): (var + eps)**(-3/2) -> rstd**3
            expr = _power_reuse(expr, s, s.body.exp)
    return expr


def reuse_in_products(expr, stmts: list[Stmt]):
    """:func:`reuse_in_product` in every product of ``expr``: exp(x - m) S^-2 -> y S^-1."""
    if not any(s.reduce == "none" and s.free and s.body.is_Mul for s in stmts):
        return expr
    return expr.replace(lambda e: e.is_Mul, lambda e: reuse_in_product(e, stmts))


def index_instances(s: Stmt, expr) -> list[dict]:
    """The index substitutions under which ``s.body`` could occur in ``expr``.

    Every free index of ``s`` appears bare in some read of ``s.body``; pairing those
    reads with the reads of the same tensor in ``expr`` fixes the substitution. This
    finds the instances directly instead of pattern-matching with wildcards, which is
    combinatorial in the number of terms of a sum."""
    free = set(s.free)
    expr_reads: dict[str, list] = {}
    for r in expr.atoms(sympy.Indexed):
        expr_reads.setdefault(str(r.base), []).append(r)
    partial: list[dict] = [{}]
    for read in sorted(s.body.atoms(sympy.Indexed), key=sympy.default_sort_key):
        slots = [(k, i) for k, i in enumerate(read.indices) if i in free]
        if not slots:
            continue
        options = []
        for other in expr_reads.get(str(read.base), ()):
            if len(other.indices) == len(read.indices):
                options.append({i: other.indices[k] for k, i in slots})
        if not options:
            return []
        merged = []
        for m in partial:
            for o in options:
                if all(m.get(i, v) == v for i, v in o.items()):
                    merged.append({**m, **o})
        partial = merged[:64]  # a bound on pathological inputs; real specs have a handful
    seen, out = set(), []
    for m in partial:
        if set(m) != free:
            continue
        key = tuple(m[i] for i in s.free)
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out


def replace_subexpression(expr, concrete, target):
    """``expr`` with ``concrete`` replaced by ``target``: as a whole subtree, or as a
    sub-sum / sub-product of a larger Add / Mul (``a + b + c`` with ``a + b`` known)."""
    if concrete.is_Add or concrete.is_Mul:
        parts = concrete.args
        op = type(concrete)

        def visit(e):
            if e == concrete:
                return target
            if not e.args:
                return e
            new = e.func(*[visit(a) for a in e.args]) if not isinstance(e, sympy.Indexed) else e
            if isinstance(new, op):
                args = list(new.args)
                if all(args.count(p) >= 1 for p in parts) and len(args) > len(parts):
                    for p in parts:
                        args.remove(p)
                    return op(target, *args)
            return new

        return visit(expr)
    return expr.xreplace({concrete: target})


def _power_reuse(expr, s, p):
    """B**q -> T**(q/p) where T = B**p, when that holds for every real B the forward
    computes: q/p an integer, or B >= 0 (provably, or because T = B**p with an even root
    is real only there). tanh**2 as (tanh**3)**(2/3) was NaN for a negative tanh."""

    def real_identity(e):
        ratio = e.exp / p
        if ratio.is_integer or p.q % 2 == 0:
            return True
        return bool(e.base.is_nonnegative)

    def matcher(e):
        if not (isinstance(e, sympy.Pow) and e.exp.is_Rational):
            return False
        m = _base_matches(e.base, s)
        return m is not None and real_identity(e)

    def build(e):
        m = _base_matches(e.base, s)
        return sympy.IndexedBase(s.target, real=True)[tuple(m[i] for i in s.free)] ** (e.exp / p)

    return expr.replace(matcher, build)


def _base_matches(base, s):
    wild = {i: sympy.Wild(f"w_{i}") for i in s.free}
    m = base.match(s.body.base.xreplace(wild))
    if m is None or any(w not in m for w in wild.values()) or s.body.base.xreplace(wild).xreplace(m) != base:
        return None
    return {i: m[wild[i]] for i in s.free}


def powers(expr):
    """A product as (numeric factor, {base: exponent}); sums as bases get a canonical sign."""
    number = sympy.S.One
    powers: dict = {}
    for f in sympy.Mul.make_args(expr):
        if f.is_Number:
            number *= f
            continue
        base, exp = (f, sympy.S.One) if isinstance(f, sympy.exp) else f.as_base_exp()
        if base.is_Add and exp.is_integer and base.could_extract_minus_sign():
            base = -base
            number *= (-1) ** exp
        powers[base] = powers.get(base, 0) + exp
    return number, powers


def _take_factors(expr, concrete, target):
    """``expr`` with the factors of ``concrete`` taken out and ``target`` put in, when
    every factor of ``concrete`` is there with an exponent of the same sign and at least
    its size: with ``xhat = (x - m) r``, ``(x - m) r^3 -> xhat r^2``."""
    number, have = powers(expr)
    c_number, need = powers(concrete)
    if not need:
        return expr
    for base, e in need.items():
        h = have.get(base)
        if h is None or not (e.is_Number and h.is_Number) or h * e <= 0 or abs(h) < abs(e):
            return expr
    rest = [base ** (h - need.get(base, 0)) for base, h in have.items()]
    return number / c_number * target * sympy.Mul(*rest)


def reuse_in_product(expr, stmts: list[Stmt]):
    """Forward reuse in a product of factors (each elementwise statement with a product
    body, at every index instance the product holds)."""
    for s in stmts:
        if s.reduce != "none" or not s.free or not s.body.is_Mul:
            continue
        for mapping in index_instances(s, expr):
            concrete = s.body.xreplace(mapping)
            target = sympy.IndexedBase(s.target, real=True)[tuple(mapping[i] for i in s.free)]
            expr = _take_factors(expr, concrete, target)
    return expr


def _textbook_identities(expr):
    """Identities that shorten derivatives of stabilised forms: 2 sigma(2a) - 1 = tanh(a)."""
    return replace_literal(expr, 2 * sigmoid(2 * WILD) - 1, lambda w: sympy.tanh(w))


def _collect_shared(add):
    """Terms of a sum that share a factor, collected: ``x - x s + 1 -> x (1 - s) + 1``.

    A precision rule, not a size one: written out, ``x - x s`` subtracts two nearly
    equal products where s is near 1 (and forward reuse would make it ``x - y``, which
    a reassociating compiler may evaluate as ``(x + 1) - y = 0`` for a large x);
    collected, the small difference ``1 - s`` is formed first."""
    terms = list(add.args)
    if len(terms) < 3:
        return add
    counts: dict = {}
    for t in terms:
        for f in set(sympy.Mul.make_args(t)):
            if not f.is_Number:
                counts[f] = counts.get(f, 0) + 1
    shared = [f for f, n in counts.items() if 1 < n < len(terms) and not f.is_Add]
    if not shared:
        return add
    f = min(shared, key=sympy.default_sort_key)
    inside = [t for t in terms if f in sympy.Mul.make_args(t)]
    rest = [t for t in terms if f not in sympy.Mul.make_args(t)]
    return f * sympy.Add(*[_without(t, f) for t in inside]) + sympy.Add(*rest)


def _without(term, f):
    """``term / f`` for a factor ``f`` of ``term``, by removing it: SymPy's own division
    would invert a Piecewise factor branch by branch (``1/0 -> zoo`` on a zero branch)
    before the pair cancels, leaving ``zoo * 0 = NaN`` in the kernel."""
    args = list(sympy.Mul.make_args(term))
    args.remove(f)
    return sympy.Mul(*args)


def collect_shared(expr):
    """:func:`_collect_shared` in every sum of ``expr``."""
    return expr.replace(lambda e: e.is_Add, _collect_shared)


def simplify_expr(expr, stmts: list[Stmt], rules) -> sympy.Expr:
    expr = _textbook_identities(elementary_rewrites(expr))
    candidates = [expr]
    if sympy.count_ops(expr) < 80 and not expr.has(sympy.Piecewise):
        candidates.append(sympy.factor_terms(sympy.expand(expr)))
    candidates.append(sympy.factor_terms(expr))
    candidates = [collect_shared(sympy.powsimp(c, combine="exp")) for c in candidates]
    candidates += [reuse_forward(c, stmts) for c in candidates]
    best = min(candidates, key=cost)
    if rules:
        trial = best
        for read, free, value in rules:
            trial = _apply_rule(trial, read, free, value)
        trial = sympy.powsimp(trial, combine="exp")
        trial = reuse_forward(trial, stmts)
        trial = sympy.factor_terms(trial)
        if cost(trial) < cost(best):
            best = trial
    reused = reuse_forward(best, stmts)
    if cost(reused) <= cost(best):
        best = reused
    return cancel_exponential_pairs(best)


def _exp_count(e) -> int:
    return sum(1 for n in sympy.preorder_traversal(e) if isinstance(n, sympy.exp))


def _distribute_exp(mul):
    """``exp(u) * (A exp(-u) + B) -> A + B exp(u)`` in a product, where distributing the
    exponential over a sum factor leaves fewer exponentials (a pair cancels)."""
    exps = [f for f in mul.args if isinstance(f, sympy.exp)]
    for e in exps:
        for a in (f for f in mul.args if f.is_Add and f.has(sympy.exp)):
            spread = sympy.Add(*[sympy.powsimp(t * e, combine="exp") for t in a.args])
            if _exp_count(spread) < _exp_count(a) + 1:
                rest = [f for f in mul.args if f is not e and f is not a]
                return sympy.Mul(*rest, spread)
    return mul


def combine_exponentials(expr):
    """``exp(a) * exp(b) -> exp(a + b)``, in the branches of a ``where`` too (SymPy's
    ``powsimp`` stops at a Piecewise): a masked softmax's derivative holds
    ``where(s <= l, exp(-m) * exp(score), 0)``, where ``exp(score)`` alone overflows."""
    expr = expr.replace(
        lambda e: isinstance(e, sympy.Piecewise) and e.has(sympy.exp),
        lambda e: sympy.Piecewise(*[(sympy.powsimp(v, combine="exp"), c) for v, c in e.args]),
    )
    return sympy.powsimp(expr, combine="exp")


def cancel_exponential_pairs(expr):
    """A product that holds ``exp(u)`` and, inside a sum factor, ``exp(-u)`` (the chain
    rule through ``exp(E - m)`` divided by it again) has the exponentials cancelled: each
    alone overflows where ``E`` is far below ``m`` (``exp(m - E) * q`` is inf * 0 where
    the softmax ``q`` underflows), their product is 1."""
    if not expr.has(sympy.exp):
        return expr
    expr = combine_exponentials(expr)
    for _ in range(4):
        new = expr.replace(lambda e: e.is_Mul and any(isinstance(f, sympy.exp) for f in e.args), _distribute_exp)
        new = sympy.powsimp(new, combine="exp")
        if new == expr:
            break
        expr = new
    return expr


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


def _match_forward_sum(core, loop_idx, stmts):
    """If ``core`` (summed over ``loop_idx``) is the body of a forward sum statement,
    return that statement's result read; else None."""
    for s in stmts:
        if s.reduce != "sum" or len(s.over) != len(loop_idx):
            continue
        wild = {i: sympy.Wild(f"w_{i}") for i in s.free}
        renamed = s.body.xreplace(dict(zip(s.over, loop_idx))).xreplace(wild)
        m = core.match(renamed)
        if m is None or any(w not in m for w in wild.values()):
            continue
        if renamed.xreplace(m) != core:
            continue
        return _read_at(s.target, [m[wild[i]] for i in s.free])
    return None


def _read_at(name, idx):
    if not idx:
        return sympy.Symbol(name, real=True)
    return sympy.IndexedBase(name, real=True)[tuple(idx)]


def _pieces(inside, loop_idx, stmts):
    """The terms of a summand, by linearity: expanded with its exponentials kept whole
    first (``exp(x[b,j] - m[b])``, the body of a forward sum, is not split into
    ``exp(x[b,j]) exp(-m[b])``, which no forward sum matches), and a term that matches no
    forward sum so is expanded further."""
    out = []
    for piece in sympy.Add.make_args(sympy.expand(inside, power_exp=False)):
        coeff, core = split_factors(piece, loop_idx)
        if core == 1 or _match_forward_sum(core, loop_idx, stmts) is not None:
            out.append(piece)
        else:
            out.extend(sympy.Add.make_args(sympy.expand(piece)))
    return out


def close_sums(backward, stmts: list[Stmt], rules) -> None:
    """Evaluate sums of gradient terms in closed form where the forward already did.

    By linearity, a summand splits into pieces; a piece free of the summation indices
    sums to itself times the range, and a piece equal to the body of a forward sum is
    that sum's result. With the inverse rules (mu_sum = D mu) this proves, e.g., that
    sum_d (x[b,d] - mu[b]) = 0, which removes a whole reduction from layer norm's
    backward and leaves its compact textbook form."""
    for t in list(backward.terms):
        if not is_full_sum(t):
            continue
        loop_idx = [i for i, _, _ in t.loops]
        outside, inside = split_factors(t.expr, loop_idx)
        closed, open_ = [], []
        for piece in _pieces(inside, loop_idx, stmts):
            coeff, core = split_factors(piece, loop_idx)
            if core == 1:
                closed.append(coeff * sympy.Mul(*[hi for _, _, hi in t.loops]))
                continue
            found = _match_forward_sum(core, loop_idx, stmts)
            if found is None:
                open_.append(piece)
            else:
                closed.append(coeff * found)
        if not closed:
            continue
        value = sympy.Add(*closed)
        for read, free, inverse in rules:
            value = _apply_rule(value, read, free, inverse)
        value = sympy.simplify(value) if sympy.count_ops(value) < 40 else value
        t.steps.append(("closed", sympy.Add(*closed), value))
        if open_:
            t.expr = outside * sympy.Add(*open_)
            if value != 0:
                extra = _copy_term(t, outside * value)
                backward.terms.insert(backward.terms.index(t) + 1, extra)
        elif value == 0:
            backward.terms.remove(t)
        else:
            t.expr = outside * value
            t.loops = []


def _copy_term(t, expr):
    from dataclasses import replace

    return replace(t, expr=expr, loops=[], steps=list(t.steps))


def simplify_terms(backward, stmts: list[Stmt], shapes) -> None:
    rules = _inverse_rules(stmts, shapes)
    close_sums(backward, stmts, rules)
    merge_elementwise(backward)
    for t in backward.terms:
        t.expr = simplify_expr(t.expr, stmts, rules)
        if t.loops:
            # a reduction's summand (an elementwise term is left to derive/statistics.py,
            # which records its forward reuse as a step of the derivation)
            reused = reuse_in_products(t.expr, stmts)
            if cost(reused) <= cost(t.expr):
                t.expr = reused
    factor_out_of_sums(backward, stmts)


def _reads_of(expr, name):
    return [r for r in expr.atoms(sympy.Indexed) if str(r.base) == name] + [
        r for r in expr.atoms(sympy.Symbol) if r.name == name]


def factor_out_of_sums(backward, stmts: list[Stmt]) -> None:
    """A named gradient sum ``g_S[o] = sum_r c[o] f`` keeps only ``sum_r f``; its readers
    take the factor ``c[o]`` (where it often cancels: attention's
    ``g_S = -sum_s g_p p / S`` is read as ``g_S S``, now ``-g_S`` with
    ``g_S = sum_s g_p p``). Fewer operations, and no rounding through ``/S`` and ``*S``
    on the difference ``g_p - sum_s g_p p`` that a nearly saturated softmax makes small.
    Only for the gradient of an intermediate, written by one term and read by several
    terms or by a reduction (one elementwise reader is derive/statistics.py's case), when
    the operations of it and its readers do not grow."""
    targets = {s.target for s in stmts}
    writers: dict[str, int] = {}
    for t in backward.terms:
        writers[t.grad] = writers.get(t.grad, 0) + 1
    for t in list(backward.terms):
        if not is_full_sum(t) or writers[t.grad] != 1 or t.of not in targets:
            continue
        outside, inside = split_factors(t.expr, [i for i, _, _ in t.loops])
        if outside == 1 or not outside.free_symbols.isdisjoint({i for i, _, _ in t.loops}):
            continue
        readers = [u for u in backward.terms if u is not t and _reads_of(u.expr, t.grad)]
        if not readers or any(backward.terms.index(u) < backward.terms.index(t) for u in readers):
            continue
        if len(readers) == 1 and readers[0].elementwise:
            continue  # derive/statistics.py substitutes the sum into its one consumer
        new = {}
        for u in readers:
            mapping = {}
            for r in _reads_of(u.expr, t.grad):
                idx = tuple(r.indices) if isinstance(r, sympy.Indexed) else ()
                mapping[r] = outside.xreplace(dict(zip(t.free, idx))) * r
            new[id(u)] = sympy.factor_terms(u.expr.xreplace(mapping))
        before = cost(t.expr)[0] + sum(cost(u.expr)[0] for u in readers)
        after = cost(inside)[0] + sum(cost(e)[0] for e in new.values())
        if after > before:
            continue
        # the sum is no longer the gradient of t.of: it gets a name of its own (a Sigma in
        # the derivation), and the derivation records the step
        from .statistics import Rewrite

        taken = {u.grad for u in backward.terms} | targets | set(backward.named_sums)
        k = len(backward.named_sums)
        while f"{t.grad}_sum{k}" in taken:
            k += 1
        name = f"{t.grad}_sum{k}"
        read = sympy.IndexedBase(name, real=True)[tuple(t.free)] if t.free else sympy.Symbol(name, real=True)
        named = replace(t, grad=name, expr=inside, steps=list(t.steps))
        backward.terms[backward.terms.index(t)] = named
        step = Rewrite(f"Take the factor ${tex(outside)}$ out of the sum of ${tex_name(t.grad)}$ and into its "
                       "readers, where it cancels or is applied once:",
                       [(name, t.free, sympy.Sum(inside, *[(i, 0, hi - 1) for i, _, hi in t.loops]))])
        for u in readers:
            u.expr = new[id(u)].xreplace({r: r.func(sympy.IndexedBase(name, real=True), *r.indices)
                                          if isinstance(r, sympy.Indexed) else read
                                          for r in _reads_of(new[id(u)], t.grad)})
            step.equations.append((u.grad, u.free, u.expr))
        backward.named_sums.append(name)
        backward.rewrites.append(step)
