"""From spec equations to statements: stability rewrites, then reductions lifted out.

After this pass every statement has the form ``T[o] = R_{r} body`` with R one of
none/sum/max and a body free of reductions, which is what differentiation and lowering
work on. The passes, in order:

0. ``look_through_exponentials``: a sum of exponentials written in steps (the
   exponentials named, ``e = exp(x)`` then ``e / sum(e, k)``; or the sum named,
   ``z = sum(exp(x), k)`` then ``exp(x) / z``) is seen as written inline, so that
   stability does not depend on how the formula is split into equations.
1. ``stabilise``: every ``sum(exp(E) * F, k)`` (F = 1 for a plain sum of exponentials)
   becomes ``exp(m) * S`` with ``m = max(E, k)`` and ``S = sum(exp(E - m) * F, k)``; ``m``
   is marked stop-gradient because the shifted form does not depend on it (the derivative
   with respect to m is 0, which :func:`check_shift_invariance` verifies with SymPy when
   the pass runs). Sums over one exponent share their maximum, so in a ratio of them
   (softmax, attention written by hand) ``exp(m)`` cancels; a logarithm of one becomes
   ``m + log(S)``, with ``E - m`` computed on its own (a log-softmax is
   ``(E - m) - log(S)``, never ``E - (m + log S)``, which rounds at the magnitude of m).
   Where the factor ``exp(m)`` survives (a weighted sum of exponentials on its own, whose
   ``exp(m)`` overflows exactly where its unshifted terms do), the shift gains nothing:
   derive/stabilize.py's :func:`~derive.stabilize.idle_shifts` finds those maxima and the
   op is normalised again with them in ``unshifted``, so that sum keeps its written form.
   Then a quotient whose divisor is a sum of a few exponentials is divided by the
   largest of them, branch by branch (``_shift_exponential_quotient``: tanh or a sigmoid
   written out as a ratio, ``exp(a) / (exp(a) + exp(b))``), ``log(exp(a) * b) -> a + log(b)``,
   exponentials are combined (``exp(a)/exp(b) -> exp(a - b)``), and the elementary rewrites
   ``log(1 + exp(a))``, ``log1p(exp(a)) -> softplus(a)``, ``log(sigmoid(a)) -> -softplus(-a)``,
   ``exp(a)/(1 + exp(a)) -> sigmoid(a)``, ``log(1 + a) -> log1p(a)``,
   ``exp(a) - 1 -> expm1(a)``, ``sigmoid(-a) -> 1 - sigmoid(a)``,
   ``log(cosh(a)) -> a + softplus(-2a) - log 2`` apply, and ``log(softplus(a))`` is split
   where softplus underflows (``split_log_softplus``).
2. ``lift``: innermost-first, every reduction that is not the whole right-hand side
   becomes an intermediate indexed by the indices it leaves free.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import sympy
from sympy.codegen.cfunctions import log1p
from sympy.codegen.rewriting import expm1_opt, log1p_opt, optimize

from .functions import Reduce, ReduceMax, ReduceSum, sigmoid, softplus
from .spec import Equation, OpDef


@dataclass
class Stmt:
    """``target[free] = reduce_{over} body``, ``body`` free of reductions."""

    target: str
    free: tuple[sympy.Symbol, ...]
    body: sympy.Expr
    reduce: str = "none"
    over: tuple[sympy.Symbol, ...] = ()
    ranges: dict[sympy.Symbol, sympy.Expr] = field(default_factory=dict)
    text: str = ""
    stop_gradient: bool = False
    origin: str = "spec"  # spec | lifted | stability
    note: str = ""
    shift: tuple | None = None  # a stability maximum's key: (equation, exponent, indices), see stabilise


# ---------------------------------------------------------------------------
# Stability


@functools.lru_cache(maxsize=None)
def check_shift_invariance() -> bool:
    """SymPy proof that exp(m) sum_c exp(e_c - m) f_c and m + log(sum_c exp(e_c - m))
    do not depend on m."""
    m = sympy.Symbol("m", real=True)
    e = sympy.symbols("e0:3", real=True)
    f = sympy.symbols("f0:3", real=True)
    weighted = sympy.exp(m) * sum(sympy.exp(ei - m) * fi for ei, fi in zip(e, f))
    lse = m + sympy.log(sum(sympy.exp(ei - m) for ei in e))
    return sympy.simplify(sympy.diff(weighted, m)) == 0 and sympy.simplify(sympy.diff(lse, m)) == 0


# the wildcard of replace_literal's patterns
WILD = sympy.Wild("w")


def _positive_exp_sum(d) -> bool:
    terms = _exponential_terms(d) if d.is_Add and d.has(sympy.exp) else None
    return terms is not None and all(c.is_positive for c in terms.values())


def _literal_rules(expr, rules):
    # log(D**p) -> p*log(D) for D a sum of exponentials with positive coefficients (D > 0)
    expr = expr.replace(
        lambda e: isinstance(e, sympy.log) and e.args[0].is_Pow and _positive_exp_sum(e.args[0].base),
        lambda e: e.args[0].exp * sympy.log(e.args[0].base),
    )
    for pattern, build in rules:
        expr = replace_literal(expr, pattern, build)
    expr = expr.replace(
        lambda e: isinstance(e, sigmoid) and e.args[0].could_extract_minus_sign(),
        lambda e: 1 - sigmoid(-e.args[0]),
    )
    expr = expr.replace(
        lambda e: isinstance(e, sympy.log) and isinstance(e.args[0], sympy.exp),
        lambda e: e.args[0].args[0],
    )
    expr = expr.replace(
        lambda e: isinstance(e, sympy.log) and e.args[0].is_Mul and any(isinstance(f, sympy.exp) for f in e.args[0].args),
        _split_log_of_exp,
    )
    return expr.replace(
        lambda e: isinstance(e, sympy.log) and e.args[0].is_Add and len(e.args[0].args) == 2
        and all(isinstance(t, sympy.exp) for t in e.args[0].args),
        _log_add_exp,
    )


def elementary_rewrites(expr):
    """Rewrites towards overflow-free primitives (each an identity)."""
    if not isinstance(expr, sympy.Expr):
        return expr  # conditions (relations, booleans) hold no overflow-prone arithmetic of their own
    rules = [
        (sympy.log(sympy.exp(WILD) + 1), lambda w: softplus(w)),
        (sympy.log(1 + sympy.exp(-WILD)), lambda w: softplus(-w)),
        (sympy.log(sigmoid(WILD)), lambda w: -softplus(-w)),
        (sympy.log(1 - sigmoid(WILD)), lambda w: -softplus(w)),
        (sympy.exp(WILD) / (sympy.exp(WILD) + 1), lambda w: sigmoid(w)),
        (1 / (1 + sympy.exp(-WILD)), lambda w: sigmoid(w)),
        (sympy.log(sympy.cosh(WILD)), lambda w: w + softplus(-2 * w) - sympy.log(2)),
        (log1p(sympy.exp(WILD)), lambda w: softplus(w)),
    ]
    # a ratio of exponentials: its largest exponential divided out of numerator and divisor
    # (first: 1/(1 + exp(x)) alone would become 1 - sigmoid(x), and exp(x) * (1 - sigmoid(x))
    # is inf * 0 where the ratio is 1)
    shifted = expr.replace(lambda e: e.is_Mul and _exp_sum_divisor(e) is not None, _shift_exponential_quotient)
    if shifted != expr:  # a logarithm of a ratio: one per branch, for the rules below
        expr = shifted.replace(lambda e: isinstance(e, _LOGS) and isinstance(e.args[0], sympy.Piecewise),
                               lambda e: sympy.Piecewise(*[(e.func(b), c) for b, c in e.args[0].args]))
    for _ in range(3):  # to a fixed point: one rule's result can be another's pattern
        before, expr = expr, _literal_rules(expr, rules)
        if expr == before:
            break
    return optimize(split_log_softplus(expr), [log1p_opt, expm1_opt])


# log(softplus(a)) for a below -_LOG_SOFTPLUS_SPLIT is a + (a series in exp(a)), see split_log_softplus
_LOG_SOFTPLUS_SPLIT = 20
_LOG_SOFTPLUS_TERMS = 3  # the series to u**2: its error, about u**3 with u <= exp(-20), is below rounding


@functools.lru_cache(maxsize=None)
def _log_softplus_series():
    """SymPy's series of ``log(softplus(a)) - a = log(log1p(u) / u)`` in ``u = exp(a)``,
    as a polynomial in u (``-u/2 + 5 u**2/24``)."""
    u = sympy.Dummy("u", positive=True)
    return sympy.Lambda(u, sympy.series(sympy.log(sympy.log(1 + u) / u), u, 0, _LOG_SOFTPLUS_TERMS).removeO())


def _log_softplus_branches(a):
    return sympy.Piecewise((a + _log_softplus_series()(sympy.exp(a)), a < -_LOG_SOFTPLUS_SPLIT),
                           (sympy.log(softplus(a)), True))


def _is_split_log_softplus(e) -> bool:
    return (isinstance(e, sympy.Piecewise) and len(e.args) == 2 and isinstance(e.args[1].expr, sympy.log)
            and isinstance(e.args[1].expr.args[0], softplus)
            and e == _log_softplus_branches(e.args[1].expr.args[0].args[0]))


def split_log_softplus(expr):
    """``log(softplus(a))`` -> ``a + log(log1p(u)/u)`` (u = exp(a)) as its series in u where
    a < -20, and as written elsewhere. softplus(a) is about exp(a) for a << 0 and underflows
    to 0 (a < -745 in float64, -104 in float32), where the log is -inf and its derivative
    sigmoid(a)/softplus(a) is 0/0, while the true value is about a and the true derivative
    about 1. The series (SymPy's, to u**2) is exact to rounding there, and so are its
    derivatives, which SymPy derives from it like any other branch. A log of a softplus
    already split is left alone (the rewrites run more than once)."""
    if not isinstance(expr, sympy.Basic) or not expr.has(softplus) or not expr.has(sympy.log):
        return expr
    if _is_split_log_softplus(expr):
        return expr
    if isinstance(expr, sympy.log) and isinstance(expr.args[0], softplus):
        return _log_softplus_branches(split_log_softplus(expr.args[0].args[0]))
    args = [split_log_softplus(a) for a in expr.args]
    return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr


_LOGS = (sympy.log, log1p)
_MAX_EXPONENTS = 4  # a divisor with more distinct exponents keeps its written form (2**k conditions)


def _exponential_terms(d):
    """``d`` as ``sum(c_i * exp(e_i))`` (a term without an exponential has e = 0; several
    exponential factors are one): {e_i: c_i}, or None where a coefficient holds an
    exponential inside another function."""
    terms: dict = {}
    for t in sympy.Add.make_args(d):
        exps = [f for f in sympy.Mul.make_args(t) if isinstance(f, sympy.exp)]
        e = sympy.Add(*[f.args[0] for f in exps])  # exp(2*x - 1) is held as exp(-1) * exp(2*x)
        c = sympy.Mul(*[f for f in sympy.Mul.make_args(t) if not isinstance(f, sympy.exp)])
        if c.has(sympy.exp):
            return None
        terms[e] = terms.get(e, 0) + c
    return terms


def _exp_sum_divisor(mul):
    """The factor ``D**p`` (p < 0) of a product whose base ``D`` is a sum of at least two
    exponentials with different exponents (a constant counts as exp(0)), or None."""
    for f in mul.args:
        if f.is_Pow and f.exp.is_negative and f.base.is_Add and f.base.has(sympy.exp):
            terms = _exponential_terms(f.base)
            if terms is not None and 2 <= len(terms) <= _MAX_EXPONENTS and any(e != 0 for e in terms):
                return f
    return None


def _shift_exponential_quotient(mul):
    """``N * D**p`` with ``D = sum(c_i exp(e_i))`` and p < 0 (a ratio of exponentials:
    ``exp(a) / (exp(a) + exp(b))``, tanh written as ``(exp(x) - exp(-x)) / (exp(x) + exp(-x))``)
    -> on the branch where ``e_j`` is the largest exponent, numerator and divisor divided
    by ``exp(e_j)``: ``(N exp(p e_j)) * (sum(c_i exp(e_i - e_j)))**p``. Every exponential
    of the divisor is then at most 1 and the one of the largest is 1: nothing overflows
    and the divisor does not vanish (inf/inf and 0/0 become the true ratio). The
    branches are the same function, so the derivative is continuous across them."""
    f = _exp_sum_divisor(mul)
    terms = _exponential_terms(f.base)
    exponents = list(terms)
    n = mul / f
    branches = []
    for j, ej in enumerate(exponents):
        d = sympy.Add(*[c * sympy.exp(e - ej) for e, c in terms.items()])
        num = sympy.Add(*[sympy.powsimp(t * sympy.exp(f.exp * ej), combine="exp") for t in sympy.Add.make_args(n)])
        cond = sympy.And(*[ej >= e for e in exponents if e != ej]) if j < len(exponents) - 1 else sympy.true
        branches.append((num * d ** f.exp, cond))
    return sympy.Piecewise(*branches)


def _split_log_of_exp(e):
    """log(exp(a) * b) -> a + log(b): the exponential's argument never goes through exp."""
    factors = sympy.Mul.make_args(e.args[0])
    exps = [f.args[0] for f in factors if isinstance(f, sympy.exp)]
    rest = sympy.Mul(*[f for f in factors if not isinstance(f, sympy.exp)])
    if rest.is_Pow and rest.exp == -1:  # log(exp(a) / b) -> a - log(b)
        return sympy.Add(*exps) - sympy.log(rest.base)
    return sympy.Add(*exps) + (sympy.log(rest) if rest != 1 else 0)


def _log_add_exp(e):
    """log(exp(a) + exp(b)) -> the larger plus softplus(smaller - larger): neither
    exponential is formed. Each branch is smooth and the derivative at a tie is 1/2 from
    either side (max(a, b) + softplus(-|a - b|) would give 0 there)."""
    a, b = (t.args[0] for t in e.args[0].args)
    return sympy.Piecewise((a + softplus(b - a), a >= b), (b + softplus(a - b), True))


def replace_literal(expr, pattern, build):
    """Replace literal instances of ``pattern``, an expression in the wildcard
    :data:`WILD`, by ``build(w)`` (each match checked by rebuilding it).

    Wildcard matching of sums and products is combinatorial, so a node is only tried
    when it contains every function the pattern does (exp, log, sigmoid, ...)."""
    needed = {type(f) for f in pattern.atoms(sympy.Function)}
    if not needed <= {type(f) for f in expr.atoms(sympy.Function)}:
        return expr

    def matcher(e):
        if not isinstance(e, type(pattern)):
            return False
        if not needed <= {type(f) for f in e.atoms(sympy.Function)}:
            return False
        m = e.match(pattern)
        return bool(m) and WILD in m and pattern.xreplace({WILD: m[WILD]}) == e

    return expr.replace(matcher, lambda e: build(e.match(pattern)[WILD]))


class Namer:
    """Deterministic fresh names for intermediates: <target>_<what><k>."""

    def __init__(self, taken):
        self.taken = set(taken)

    def __call__(self, base):
        k = 0
        while f"{base}{k}" in self.taken:
            k += 1
        name = f"{base}{k}"
        self.taken.add(name)
        return name


def _free_indices(node, ranges):
    """Indices free in a reduction node, in a stable order (by name)."""
    own = set(node.indices) if isinstance(node, Reduce) else set()
    idx = {s for s in node.free_symbols if s in ranges and s not in own}
    return tuple(sorted(idx, key=str))


def _read(name, idx):
    base = sympy.IndexedBase(name, real=True)
    return base[idx] if idx else sympy.Symbol(name, real=True)


def _masked_exp_factor(body, over):
    """``body`` as ``exp(E) * F`` where a condition holds and 0 elsewhere (a masked sum,
    ``where(k != i, exp(s[i,k]), 0)``): (E, F, condition), or None. Without a mask the
    condition is True."""
    if isinstance(body, sympy.Piecewise) and len(body.args) == 2 and body.args[1] == (0, True):
        (value, cond), _ = body.args
        split = _exp_factor(value, over)
        return None if split is None else (*split, cond)
    split = _exp_factor(body, over)
    return None if split is None else (*split, sympy.true)


def _exp_factor(body, over):
    """``body`` as ``exp(E) * F`` with E depending on the summed indices ``over``, or None."""
    body = sympy.powsimp(body, combine="exp")
    exps = [f for f in sympy.Mul.make_args(body) if isinstance(f, sympy.exp)]
    if len(exps) != 1 or not set(over) & exps[0].args[0].free_symbols:
        return None
    rest = sympy.Mul(*[f for f in sympy.Mul.make_args(body) if f is not exps[0]])
    if rest.has(sympy.exp) and any(set(over) & e.args[0].free_symbols for e in rest.atoms(sympy.exp)):
        return None
    return exps[0].args[0], rest


def stabilise(eq: Equation, namer: Namer, extra: list[Stmt], shapes: dict,
              unshifted: frozenset = frozenset()) -> sympy.Expr:
    """Rewrite one equation's right-hand side; new statements go to ``extra``.

    Every ``sum(exp(E) * F, j)`` (F = 1 for a plain sum of exponentials) becomes
    ``exp(m) * S`` with ``m = max(E, j)`` (stop-gradient) and ``S = sum(exp(E - m) * F, j)``.
    Sums over the same exponent share one maximum, so in a ratio of such sums (softmax,
    attention written by hand) the factors ``exp(m)`` cancel, and a logarithm of one
    becomes ``m + log(S)``: nothing is computed at the magnitude of ``exp(E)``, and a
    probability is ``exp(E - m) / S``, accurate to the rounding of E - m (not of a
    log-sum-exp at the magnitude of E).

    A sum whose maximum's key ``(eq.target, exponent, indices)`` is in ``unshifted``
    keeps its written form (the factor exp(m) would survive, see normalize's doc)."""
    rhs = eq.rhs
    maxima: dict = {}
    sums: list = []
    exponents: dict = {}  # a compound exponent -> (the read of its statement, its statement)
    shifts: dict = {}  # (a named exponent's read, its maximum's read) -> (the read of E - m, its statement)

    def named_exponent(e, e_free, over):
        """A compound exponent as a read of a statement computing it once: the maximum,
        the shifted terms and the backward then subtract the same rounded value (the
        largest term is exp(0) = 1 exactly), where computed twice, in loops the compiler
        may round differently, ``E - m`` at the magnitude of E (a Gaussian density's
        exponent, ~1e5) would be ``E``'s rounding error away from 0."""
        if isinstance(e, (sympy.Indexed, sympy.Symbol)) or not any(isinstance(n, sympy.Indexed) for n in sympy.preorder_traversal(e)):
            return e
        if e not in exponents:
            idx = e_free + over
            name = namer(f"{eq.target}_exponent")
            stmt = Stmt(name, idx, e, "none", (), {i: eq.ranges[i] for i in idx}, origin="stability",
                        note="the exponent, computed once: the maximum and the shifted terms subtract the same rounded value")
            extra.append(stmt)
            shapes[name] = tuple(eq.ranges[i] for i in idx)
            exponents[e] = (_read(name, idx), stmt)
        return exponents[e][0]

    def shifted_exponent(e, m, e_free, over):
        """``E - m``; for a named (compound) exponent, a read of a statement computing it
        once, right after the maximum: what every exponential of the shifted exponent reads
        (the sum's terms, a softmax's numerator, the backward), so that a product with
        other exponentials (``exp(-2 s) * exp(E - m)``) cannot fold E - m into a longer
        sum rounded at the magnitude of E."""
        named = [v for v in exponents.values() if v[0] == e]
        if not named:
            return e - m
        if (e, m) not in shifts:
            idx = e_free + over
            name = namer(f"{eq.target}_shifted")
            m_name = str(m.base) if isinstance(m, sympy.Indexed) else str(m)
            at = next(k for k, t in enumerate(extra) if t.target == m_name) + 1
            stmt = Stmt(name, idx, e - m, "none", (), {i: eq.ranges[i] for i in idx}, origin="stability",
                        note="the exponent less its maximum, rounded once")
            extra.insert(at, stmt)
            shapes[name] = tuple(eq.ranges[i] for i in idx)
            shifts[(e, m)] = (_read(name, idx), stmt)
        return shifts[(e, m)][0]

    def shifted(node):
        if not isinstance(node, ReduceSum) or node.body.has(Reduce):
            return None
        split = _masked_exp_factor(node.body, node.indices)
        if split is None:
            return None
        assert check_shift_invariance()
        e, rest, cond = split
        over = tuple(node.indices)
        own = set(over)
        e_free = tuple(sorted((i for i in e.free_symbols if i in eq.ranges and i not in own), key=str))
        e = named_exponent(e, e_free, over)
        # the maximum over the terms the sum takes (a masked term is -inf for it)
        masked = e if cond == sympy.true else sympy.Piecewise((e, cond), (-sympy.oo, True))
        key = (masked, over)
        if (eq.target, *key) in unshifted:
            return None
        if key not in maxima:
            m_name = namer(f"{eq.target}_max")
            ranges = {i: eq.ranges[i] for i in e_free + over}
            extra.append(Stmt(m_name, e_free, masked, "max", over, ranges, origin="stability", stop_gradient=True,
                              note="the maximum subtracted for stability; the shifted sums do not depend on it",
                              shift=(eq.target, *key)))
            shapes[m_name] = tuple(eq.ranges[i] for i in e_free)
            maxima[key] = _read(m_name, e_free)
        m = maxima[key]
        free = _free_indices(node, eq.ranges)
        ranges = {i: eq.ranges[i] for i in free + over}
        s_name = namer(f"{eq.target}_sumexp")
        shifted_term = sympy.exp(shifted_exponent(e, m, e_free, over)) * rest
        if cond != sympy.true:
            shifted_term = sympy.Piecewise((shifted_term, cond), (0, True))
        extra.append(Stmt(s_name, free, shifted_term, "sum", over, ranges, origin="stability"))
        shapes[s_name] = tuple(eq.ranges[i] for i in free)
        sums.append((s_name, free, ranges, e, m, e_free, over))
        return sympy.exp(m) * _read(s_name, free)

    # innermost first: replace sum(exp(E) * F) nodes bottom-up
    def walk(expr):
        if not expr.args:
            return expr
        new_args = [walk(a) for a in expr.args]
        node = expr.func(*new_args) if new_args != list(expr.args) else expr
        if isinstance(node, ReduceSum):
            replaced = shifted(node)
            if replaced is not None:
                return replaced
            if any(node.body.has(m) for m in maxima.values()):
                # an inner sum's exp(m) in a sum kept as written (a softmax inside a sum over
                # its own index): exp(E) * exp(-m) -> exp(E - m), so that the shift pays
                node = node.func(sympy.powsimp(node.body, combine="exp"), *node.indices)
        return node

    rhs = walk(rhs)
    rhs = sympy.powsimp(_exponentials_into_masks(rhs), combine="exp")
    rhs = _read_named_exponents(rhs, exponents)
    rhs = _read_named_exponents(rhs, {e - m: v for (e, m), v in shifts.items()})
    rhs = _rewrite_outside_reductions(rhs)
    # log(S) of a shifted sum, computed once per row rather than per element
    for s_name, free, ranges, e, m, e_free, over in sums:
        log_s = sympy.log(_read(s_name, free))
        if rhs.has(log_s):
            l_name = namer(f"{eq.target}_logsumexp")
            extra.append(Stmt(l_name, free, log_s, "none", (), ranges, origin="stability",
                              note="the logarithm of the shifted sum; the log-sum-exp is the maximum plus it"))
            shapes[l_name] = tuple(eq.ranges[i] for i in free)
            rhs = rhs.xreplace({log_s: _read(l_name, free)})
            rhs = _name_shift(rhs, e, m, e_free, over, eq, namer, extra, shapes)
    return rhs


def _read_named_exponents(rhs, exponents: dict):
    """Each exponential of a named exponent outside its sums (a softmax's numerator,
    ``exp(E[b,k] - m[b])``) reads the statement too, at its own indices."""
    from .simplify import index_instances

    for e, (read, stmt) in exponents.items():
        for mapping in index_instances(stmt, rhs):
            concrete, target = e.xreplace(mapping), read.xreplace(mapping) if mapping else read
            rhs = rhs.replace(lambda n: isinstance(n, sympy.exp) and n.args[0].has(*concrete.free_symbols),
                              lambda n: sympy.exp(_replace_term(n.args[0], concrete, target)))
    return rhs


def _replace_term(arg, concrete, target):
    """``arg`` (a sum of terms) with the terms of ``concrete`` replaced by ``target``,
    when it holds all of them (``E - m`` -> ``x - m``)."""
    parts = sympy.Add.make_args(sympy.expand(concrete, power_exp=False, mul=True, multinomial=False, log=False))
    have = list(sympy.Add.make_args(sympy.expand(arg, power_exp=False, mul=True, multinomial=False, log=False)))
    if not all(p in have for p in parts):
        return arg
    for p in parts:
        have.remove(p)
    return sympy.Add(target, *have)


def _is_mask(f) -> bool:
    """``where(cond, value, 0)``: a term kept where a condition holds, 0 elsewhere."""
    return isinstance(f, sympy.Piecewise) and len(f.args) == 2 and f.args[1] == (0, True)


def _exponentials_into_masks(expr):
    """``where(c, exp(E), 0) * exp(-m)`` -> ``where(c, exp(E) * exp(-m), 0)``: a product's
    exponential factors move into the kept branch of a masked factor (a causal softmax
    written as ``where(s <= l, exp(score), 0) / sum(...)``), where they meet the
    exponential they shift; outside it, ``exp(E)`` alone overflows and the masked zero
    times the overflow is NaN. An identity: where the mask is 0 the product is 0 either way."""

    def move(mul):
        exps = [f for f in mul.args if isinstance(f, sympy.exp)]
        masks = [f for f in mul.args if _is_mask(f) and f.args[0][0].has(sympy.exp)]
        if not exps or len(masks) != 1:
            return mul
        (value, cond), _ = masks[0].args
        rest = [f for f in mul.args if f is not masks[0] and not isinstance(f, sympy.exp)]
        kept = sympy.powsimp(sympy.Mul(value, *exps), combine="exp")
        return sympy.Mul(sympy.Piecewise((kept, cond), (0, True)), *rest)

    return expr.replace(lambda e: e.is_Mul and not isinstance(e, Reduce), move)


def _name_shift(rhs, e, m, e_free, over, eq, namer, extra, shapes):
    """``E - m`` wherever the right-hand side holds it next to other terms (``E - m - log S``,
    a log-softmax) becomes a read of a statement computing it: the difference must be
    rounded before anything else is added, which the kernels' reassociating arithmetic
    would not keep within one expression (``E - (m + log S)`` rounds at the magnitude of m)."""
    from .simplify import index_instances, replace_subexpression

    idx = e_free + over
    shift = Stmt("", idx, e - m)
    found = index_instances(shift, rhs)
    if not found:
        return rhs
    name = namer(f"{eq.target}_shifted")
    new = rhs
    for mapping in found:
        new = replace_subexpression(new, (e - m).xreplace(mapping), _read(name, tuple(mapping[i] for i in idx)))
    if new == rhs:
        namer.taken.discard(name)
        return rhs
    # placed right after the maximum, not next to its reader: a statement over other loops
    # (the sum) stands between them, so the kernels do not fuse the two into one loop body,
    # where reassociating arithmetic could compute E - (m + log S) after all
    m_name = str(m.base) if isinstance(m, sympy.Indexed) else str(m)
    at = next(k for k, t in enumerate(extra) if t.target == m_name) + 1
    extra.insert(at, Stmt(name, idx, e - m, "none", (), {i: eq.ranges[i] for i in idx}, origin="stability",
                          note="the exponent less its maximum, rounded on its own"))
    shapes[name] = tuple(eq.ranges[i] for i in idx)
    return new


def _rewrite_outside_reductions(expr):
    if isinstance(expr, Reduce):
        return expr.func(_rewrite_outside_reductions(expr.body), *expr.indices)
    if any(isinstance(n, Reduce) for n in sympy.preorder_traversal(expr)):
        return expr.func(*[_rewrite_outside_reductions(a) for a in expr.args])
    return elementary_rewrites(expr)


# ---------------------------------------------------------------------------
# Lifting


def lift(eq: Equation, rhs, namer: Namer, shapes: dict) -> list[Stmt]:
    """Split one equation into statements with one reduction each at most."""
    out: list[Stmt] = []

    def innermost(expr):
        for node in sympy.postorder_traversal(expr):
            if isinstance(node, Reduce) and not any(isinstance(a, Reduce) for a in sympy.preorder_traversal(node.body)):
                return node
        return None

    while True:
        node = innermost(rhs)
        if node is None:
            break
        if node == rhs:
            break
        free = _free_indices(node, eq.ranges)
        name = namer(f"{eq.target}_{node.kind}")
        ranges = {i: eq.ranges[i] for i in free + tuple(node.indices)}
        out.append(Stmt(name, free, node.body, node.kind, tuple(node.indices), ranges, origin="lifted"))
        shapes[name] = tuple(eq.ranges[i] for i in free)
        rhs = rhs.xreplace({node: _read(name, free)})
    ranges = {i: s for i, s in eq.ranges.items() if i in rhs.free_symbols or i in eq.index}
    if isinstance(rhs, Reduce):
        out.append(Stmt(eq.target, eq.index, rhs.body, rhs.kind, tuple(rhs.indices), ranges))
    else:
        out.append(Stmt(eq.target, eq.index, rhs, "none", (), ranges))
    return out


def _has_exp_factor(expr) -> bool:
    """``expr`` is an exponential or a product with one."""
    return any(isinstance(f, sympy.exp) for f in sympy.Mul.make_args(expr))


def _reads(name: str, expr):
    indexed = [r for r in expr.atoms(sympy.Indexed) if str(r.base) == name]
    return indexed or [x for x in expr.atoms(sympy.Symbol) if x.name == name]


def _instance(d: Equation, rhs, read, reader: Equation):
    """``rhs`` (the definition ``d``'s right-hand side) at the indices of ``read``, its
    bound indices renamed away from the reader's (whose ranges get the new ones)."""
    idx = tuple(read.indices) if isinstance(read, sympy.Indexed) else ()
    if len(idx) != len(d.index):
        return None
    mapping = dict(zip(d.index, idx))
    taken = {str(i) for i in reader.ranges} | {str(i) for i in reader.rhs.free_symbols} \
        | {str(i) for x in idx for i in sympy.sympify(x).free_symbols}
    for node in sympy.preorder_traversal(rhs):
        if isinstance(node, Reduce):
            for j in node.indices:
                if j in mapping:
                    continue
                name, k = str(j), 0
                while name in taken:
                    name, k = f"{j}_{k}", k + 1
                new = sympy.Symbol(name, **j.assumptions0) if name != str(j) else j
                taken.add(name)
                mapping[j] = new
                reader.ranges[new] = d.ranges[j]
    return rhs.xreplace(mapping)


def _is_exp_ratio(rhs) -> bool:
    """``exp(E) * F / sum(exp(..), j)`` (a softmax written on one line): an exponential
    factor over sums of exponentials, no other reduction."""
    factors = sympy.Mul.make_args(rhs)
    divisors = [f for f in factors if f.is_Pow and f.exp == -1 and isinstance(f.base, ReduceSum)]
    rest = [f for f in factors if f not in divisors]
    return bool(divisors) and _has_exp_factor(sympy.Mul(*rest)) and not sympy.Mul(*rest).has(Reduce) \
        and all(not d.base.body.has(Reduce) and _masked_exp_factor(d.base.body, d.base.indices) is not None
                for d in divisors)


def look_through_exponentials(op: OpDef) -> list[Equation]:
    """The equations with sums of exponentials written in steps seen as written inline,
    so that :func:`stabilise` shifts them as it does a softmax written on one line:

    * an elementwise intermediate whose body is an exponential or a product with one
      (``e[b,c] = exp(x[b,c])``), read inside a sum that thereby becomes a sum of
      exponentials (``sum(e[b,k], k)``, ``sum(e[b,t,s] * v[b,s,d], s)``), is read through
      its definition there;
    * a named softmax (``w[b,k] = exp(x[b,k]) / sum(exp(x[b,j]), j)``) read inside a sum
      of exponentials (a mixture's ``log(sum(w[b,k] * exp(a[b,k]), k))``) is read through
      its definition there, so that its exponent joins the sum's: the weight alone
      underflows where the product does not;
    * a named sum of exponentials (``z[b] = sum(exp(x[b,k]), k)``) read as a divisor is
      read through its definition, and so are, in that quotient, the exponential
      intermediates of the numerator: the factors exp(m) of both then cancel.

    Each definition keeps its equation while anything else reads it (an output always);
    one no longer read is dropped. The op's own equations are not changed (copies are)."""
    from dataclasses import replace

    outputs = set(op.outputs)
    exps: dict = {}   # elementwise intermediates with an exponential factor: name -> (eq, rhs)
    sums: dict = {}   # named sums of exponentials: name -> (eq, rhs)
    ratios: dict = {}  # named softmaxes, exp(E) / sum(exp(..)): name -> (eq, rhs)
    out: list[Equation] = []
    for eq in op.equations:
        eq = replace(eq, ranges=dict(eq.ranges))
        rhs = eq.rhs

        def through(expr, names, pred=lambda r: True):
            for n in names:
                d, body = exps.get(n) or ratios.get(n) or sums[n]
                for r in _reads(n, expr):
                    if pred(r):
                        inst = _instance(d, body, r, eq)
                        if inst is not None:
                            expr = expr.xreplace({r: inst})
            return expr

        def in_sum(node):
            body = through(through(node.body, exps), ratios)
            if body == node.body or _masked_exp_factor(node.body, node.indices) is not None \
                    or _masked_exp_factor(body, node.indices) is None:
                return node
            return node.func(body, *node.indices)

        if exps:
            rhs = rhs.replace(lambda e: isinstance(e, ReduceSum) and not e.body.has(Reduce), in_sum)
        divisors = {n for n in sums for p in rhs.atoms(sympy.Pow)
                    if p.exp.is_negative and p.base in _reads(n, p.base)}
        if divisors:
            rhs = through(rhs, divisors, lambda r: any(p.base == r and p.exp.is_negative for p in rhs.atoms(sympy.Pow)))
        if rhs != eq.rhs:  # the exponentials beside a sum seen through, so that exp(m) cancels
            rhs = through(rhs, exps)
        if rhs != eq.rhs:
            eq = replace(eq, rhs=rhs)
        if not isinstance(rhs, Reduce) and not rhs.has(Reduce) and _has_exp_factor(rhs):
            exps[eq.target] = (eq, rhs)
        elif _is_exp_ratio(rhs):
            ratios[eq.target] = (eq, rhs)
        elif isinstance(rhs, ReduceSum) and not rhs.body.has(Reduce) \
                and _masked_exp_factor(rhs.body, rhs.indices) is not None:
            sums[eq.target] = (eq, rhs)
        out.append(eq)
    if len(out) == len(op.equations) and all(a is b or a.rhs == b.rhs for a, b in zip(out, op.equations)):
        return list(op.equations)
    kept: list[Equation] = []
    needed = set(outputs)
    for eq in reversed(out):
        if eq.target in needed or eq.target not in exps and eq.target not in sums and eq.target not in ratios:
            kept.append(eq)
            needed |= {str(r.base) for r in eq.rhs.atoms(sympy.Indexed)} | {x.name for x in eq.rhs.atoms(sympy.Symbol)}
    return kept[::-1]


def normalize(op: OpDef, unshifted: frozenset = frozenset()) -> list[Stmt]:
    """All statements of a bound op, in evaluation order; the stability maxima keyed in
    ``unshifted`` are not taken (see :func:`stabilise`). Sums of exponentials written in
    steps are first seen through (:func:`look_through_exponentials`)."""
    taken = {e.target for e in op.equations} | set(op.inputs) | set(op.params)
    namer = Namer(taken)
    stmts: list[Stmt] = []
    for eq in look_through_exponentials(op):
        extra: list[Stmt] = []
        rhs = stabilise(eq, namer, extra, op.intermediates, unshifted)
        stmts.extend(extra)
        stmts.extend(lift(eq, rhs, namer, op.intermediates))
    for s in stmts:
        s.body = elementary_rewrites(s.body)
        if not s.text:
            s.text = statement_text(s)
    return stmts


def statement_text(s: Stmt) -> str:
    lhs = f"{s.target}[{', '.join(map(str, s.free))}]" if s.free else s.target
    body = sympy.sstr(s.body)
    if s.reduce != "none":
        body = f"{s.reduce}({body}, {', '.join(map(str, s.over))})"
    return f"{lhs} = {body}"
