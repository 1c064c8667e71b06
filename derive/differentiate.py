"""Reverse-mode differentiation in index notation, with Kronecker-delta contraction.

For a statement ``T[o] = R_r body`` and a read ``X[a(o, r)]`` in its body, the chain
rule gives the contribution

    gX[j] += sum_{o, r} gT[o] * d body / d X[a] * prod_k delta(a_k(o, r), j_k)

The local partial ``d body / d X[a]`` is ordinary scalar SymPy differentiation (the read
is replaced by a real symbol). The deltas are then *contracted*: each ``a_k`` is affine in
the summation indices, so ``a_k = j_k`` is solved for one summation index (preferring a
unit coefficient), which is substituted everywhere and leaves a range guard
``0 <= solution < range``; a coefficient other than +-1 leaves a divisibility guard.
Remaining summation indices whose guards are linear in them get tightened loop bounds
(the window of a transposed convolution), so the gather form costs no more than the
forward. A read whose indices are the mixed-radix digits of a loop index
(``x[n, j // (H*W), (j // W) % H, j % W]``) is first rewritten over one index per digit,
``j = c H W + h W + w``, where the sizes prove that map a bijection (:func:`digit_change`),
so it contracts the same way; other non-affine reads (``table[idx[b], d]``) are scattered.
For ``max`` the partial is routed to the first maximal element through the
argmax recorded by the forward (PyTorch's rule). Every step is recorded for the LaTeX
derivation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from sympy.codegen.cfunctions import expm1

from .normalize import Stmt
from .terms import fresh_index


@dataclass
class Guard:
    """``lo <= expr < hi`` (kind "range"), ``expr == other`` ("eq") or ``expr % other == 0`` ("div")."""

    kind: str
    expr: sympy.Expr
    lo: sympy.Expr = sympy.S.Zero
    hi: sympy.Expr = sympy.S.Zero
    other: sympy.Expr = sympy.S.Zero

    def subs(self, mapping):
        return Guard(
            self.kind,
            sympy.sympify(self.expr).xreplace(mapping),
            sympy.sympify(self.lo).xreplace(mapping),
            sympy.sympify(self.hi).xreplace(mapping),
            sympy.sympify(self.other).xreplace(mapping),
        )

    def condition(self):
        if self.kind == "range":
            return sympy.And(sympy.Ge(self.expr, self.lo), sympy.Lt(self.expr, self.hi))
        if self.kind == "eq":
            return sympy.Eq(self.expr, self.other)
        return sympy.Eq(sympy.Mod(self.expr, self.other), 0)


@dataclass
class Term:
    """One gather-form contribution ``g[free] += sum_{loops} [guards] * expr``."""

    grad: str  # the gradient tensor written, e.g. g_x
    of: str  # the tensor differentiated, e.g. x
    free: tuple[sympy.Symbol, ...]
    loops: list[tuple[sympy.Symbol, sympy.Expr, sympy.Expr]]  # (index, lo, hi)
    guards: list[Guard]
    expr: sympy.Expr
    stmt: Stmt
    read: sympy.Expr
    local: sympy.Expr = sympy.S.Zero
    chain: sympy.Expr = sympy.S.Zero  # the uncontracted chain-rule summand (with deltas)
    chain_over: tuple = ()
    chain_free: tuple = ()
    steps: list = field(default_factory=list)
    # scatter form: for every point of ``loops`` (the forward's iteration space),
    # g[scatter] += sum_{over} expr, where the read's indices could not be solved for
    scatter: tuple = ()
    scatter_over: list = field(default_factory=list)

    @property
    def elementwise(self):
        return not self.loops and not self.guards and not self.scatter


def grad_name(name: str) -> str:
    return f"g_{name}"


def read_of(name: str, idx) -> sympy.Expr:
    idx = tuple(idx)
    if not idx:
        return sympy.Symbol(name, real=True)
    return sympy.IndexedBase(name, real=True)[idx]


def reads_in(expr, tensors: set[str]):
    """Reads of the given tensors in expr, grouped by (name, index tuple), stable order."""
    found = {}
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Indexed) and str(node.base) in tensors:
            found[(str(node.base), tuple(node.indices))] = node
        elif isinstance(node, sympy.Symbol) and node.name in tensors:
            found[(node.name, ())] = node
    return [found[k] for k in sorted(found, key=lambda k: (k[0], sympy.default_sort_key(sympy.Tuple(*k[1]))))]


class _RealAbs(sympy.Function):
    """|u| of a real u while differentiating: d|u| = sign(u) du (0 at u = 0, as PyTorch
    takes it). SymPy's own Abs assumes a complex argument unless it can prove it real,
    and |log x| came out as log(x/sign(x)) sign(x)**2 sign(log x)/(x log x), with re,
    im and atan2 under a square root."""

    def fdiff(self, argindex=1):
        return sympy.sign(self.args[0])


class _Flat(sympy.Function):
    """A piecewise-constant function (floor, ceiling, sign) of a real argument while
    differentiating: its derivative is 0 wherever it is defined, and PyTorch's at a
    jump is 0 too. SymPy leaves d floor(u)/du unevaluated (a Derivative no printer can
    print) and gives sign a DiracDelta, or an unevaluated Derivative when it cannot
    prove the argument real."""

    def fdiff(self, argindex=1):
        return sympy.S.Zero


# every piecewise-constant function a spec may reach (derive/functions.py, ``//``)
_FLAT = {cls: type(f"_flat_{cls.__name__}", (_Flat,), {}) for cls in (sympy.floor, sympy.ceiling, sympy.sign, sympy.Heaviside)}
_BACK = {v: k for k, v in _FLAT.items()}
_BACK[_RealAbs] = sympy.Abs

# what must never be left in a derivative: it has no value a kernel can compute
_UNDIFFERENTIATED = (sympy.Derivative, sympy.Subs, sympy.DiracDelta, sympy.re, sympy.im, sympy.arg,
                     sympy.atan2, sympy.conjugate)


class NotDifferentiable(Exception):
    """A local derivative SymPy left unevaluated; ``function`` is what it could not
    differentiate (turned into a SpecError naming the equation by :func:`differentiate`)."""

    def __init__(self, function):
        super().__init__(str(function))
        self.function = function


def as_real_kinks(expr, d):
    """``expr`` with the kinks that contain ``d`` in forms SymPy differentiates as real
    functions: |u| -> _RealAbs(u), floor/ceiling/sign -> flat functions (derivative 0), and
    a % b -> a - b floor(a/b) (derivative 1 in a and -floor(a/b) in b, as torch.remainder),
    frac(u) -> u - floor(u).
    Kinks without ``d`` (index arithmetic of other reads) are left as they are."""

    def real(e):
        if isinstance(e, sympy.Mod):
            a, b = e.args
            return a - b * _FLAT[sympy.floor](a / b)
        if isinstance(e, sympy.frac):
            return e.args[0] - _FLAT[sympy.floor](e.args[0])
        if isinstance(e, sympy.Abs):
            return _RealAbs(e.args[0])
        return _FLAT[type(e)](*e.args)

    kinds = (sympy.Mod, sympy.frac, sympy.Abs, *_FLAT)
    return expr.replace(lambda e: isinstance(e, kinds) and type(e) not in _BACK and e.has(d), real)


def from_real_kinks(expr):
    """The inverse of :func:`as_real_kinks` (a rewritten a % b stays a - b floor(a/b))."""
    for cls, back in _BACK.items():
        if expr.has(cls):
            expr = expr.replace(cls, back)
    return expr


def clean_derivative(expr):
    """Derivatives of step functions are zero almost everywhere (as PyTorch takes them).

    A Heaviside step is what SymPy gives for the derivative of Max/Min (d Max(a, b)/da =
    H(a - b)); at a tie it is 1/2 on each side, as torch.maximum splits it, so the
    gradient of Max(u, v) sums to one even where u and v are the same element."""
    expr = expr.replace(sympy.DiracDelta, lambda *a: sympy.S.Zero)
    expr = expr.replace(sympy.Heaviside, lambda x, *a: sympy.Piecewise((1, x > 0), (0, x < 0), (sympy.S.Half, True)))
    expr = expr.replace(sympy.Subs, lambda *a: sympy.Subs(*a).doit())
    return integral_floats(expr)


def integral_floats(expr):
    """Floats with integer values as the integers they are: d(0.5 x^2)/dx is x, not 1.0 x."""
    floats = {f: sympy.Integer(int(f)) for f in expr.atoms(sympy.Float) if float(f).is_integer()}
    return expr.xreplace(floats) if floats else expr


def local_partial(body, read):
    """d body / d read, every kink differentiated as PyTorch does; raises
    :class:`NotDifferentiable` where SymPy leaves anything unevaluated."""
    d = sympy.Dummy("d", real=True)
    replaced = as_real_kinks(body.xreplace({read: d}), d)
    partial = from_real_kinks(clean_derivative(sympy.diff(replaced, d)))
    left = [n for n in sympy.preorder_traversal(partial) if isinstance(n, _UNDIFFERENTIATED)]
    if left:
        inner = left[0]
        while isinstance(inner, (sympy.Derivative, sympy.Subs)):
            inner = inner.args[0]
        raise NotDifferentiable(from_real_kinks(inner).xreplace({d: read}))
    return guard_zero_branches(partial).xreplace({d: read})


def guard_zero_branches(expr):
    """A product of a step (a Piecewise of numbers with a 0 branch, as the derivative of
    ``Max``/``Min``/``where`` is) and a factor that may overflow (an exponential, a
    quotient by a tensor's value) takes that factor into the step's branches:
    ``Piecewise((1, u < 0), (0, True)) * exp(x)`` (the derivative of ``Min(0, expm1(x))``)
    becomes ``Piecewise((exp(x), u < 0), (0, True))``. Only the branch taken is computed,
    so the factor is never evaluated where the step is 0 (``0 * inf`` is NaN, the
    step's 0 is the true value). Other factors stay outside."""

    def step(f):
        return (isinstance(f, sympy.Piecewise) and all(v.is_number for v, _ in f.args)
                and any(v == 0 for v, _ in f.args))

    def may_overflow(f):
        if f.has(sympy.exp, expm1, sympy.sinh, sympy.cosh, sympy.tan):
            return True
        return any(p.exp.is_negative and p.base.has(sympy.Indexed, sympy.Dummy)
                   for p in sympy.preorder_traversal(f) if isinstance(p, sympy.Pow))

    def absorb(m):
        pw = next(f for f in m.args if step(f))
        inside = sympy.Mul(*[f for f in m.args if f is not pw and may_overflow(f)])
        outside = sympy.Mul(*[f for f in m.args if f is not pw and not may_overflow(f)])
        return outside * sympy.Piecewise(*[(v * inside, c) for v, c in pw.args])

    return expr.replace(
        lambda e: isinstance(e, sympy.Mul) and any(step(f) for f in e.args)
        and any(not step(f) and may_overflow(f) for f in e.args),
        absorb,
    )


def is_affine(a, indices) -> bool:
    """Whether ``a`` is affine in ``indices`` with coefficients free of them (so that
    ``a = j`` can be solved for one of them)."""
    a = sympy.sympify(a)
    present = [s for s in indices if a.has(s)]
    if not present:
        return True
    for node in sympy.preorder_traversal(a):
        if not isinstance(node, (sympy.Add, sympy.Mul, sympy.Symbol, sympy.Number)) and any(node.has(s) for s in present):
            return False
    try:
        poly = sympy.Poly(a, *present)
    except sympy.PolynomialError:
        return False
    return poly.total_degree() <= 1


def needs_scatter(stmt: Stmt, read) -> bool:
    """A read whose index expressions are not affine in the statement's indices
    (a data-dependent index such as ``table[idx[b], d]``, or ``//`` and ``%``) cannot be
    contracted into gather form as it stands; its gradient is scattered instead, unless
    those indices are the mixed-radix digits of loop indices (:func:`digit_change`)."""
    if not isinstance(read, sympy.Indexed):
        return False
    indices = list(stmt.free) + list(stmt.over)
    return not all(is_affine(a, indices) for a in read.indices)


def _digit(a, indices):
    """``(j, stride, radix)`` when the index expression ``a`` is one mixed-radix digit of
    a single loop index ``j``: ``floor(j/s)`` is ``(j, s, None)`` (a leading digit,
    unbounded above), ``Mod(j, r)`` is ``(j, 1, r)``, ``Mod(floor(j/s), r)`` is
    ``(j, s, r)`` and ``floor(Mod(j, m)/s)`` is ``(j, s, m/s)`` where ``m/s`` is a whole
    number. Stride and radix must be positive and free of the loop indices. None for
    anything else (an offset, a product, two indices, a data-dependent read)."""
    loop = set(indices)

    def size(e):
        e = sympy.sympify(e)
        return not (e.free_symbols & loop) and not e.atoms(sympy.Indexed) and bool(e.is_positive) and bool(e.is_integer)

    def quotient(e):
        """(numerator, stride) of floor(numerator / stride)."""
        num, den = sympy.fraction(sympy.together(e))
        return (num, den) if size(den) and den != 1 else (None, None)

    if isinstance(a, sympy.Mod):
        inner, radix = a.args
        if not size(radix):
            return None
        if inner in loop:
            return inner, sympy.S.One, radix
        if isinstance(inner, sympy.floor):
            num, stride = quotient(inner.args[0])
            if num in loop:
                return num, stride, radix
        return None
    if isinstance(a, sympy.floor):
        num, stride = quotient(a.args[0])
        if num in loop:
            return num, stride, None
        if isinstance(num, sympy.Mod) and num.args[0] in loop and size(num.args[1]):
            radix = sympy.cancel(num.args[1] / stride)
            if size(radix):
                return num.args[0], stride, radix
    return None


def _chain(first, digits, facts):
    """The digits ordered by stride from ``first``, each next stride the one before
    times its radix, and the stride past the last (``(None, None)`` where the digits do
    not form one such chain, or a digit without a radix is not the last)."""
    stride, left, chain = first[1], list(digits), []
    while left:
        nxt = [d for d in left if facts.equal(d[1], stride)]
        if len(nxt) != 1:
            return None, None
        d = nxt[0]
        left.remove(d)
        chain.append(d)
        if d[2] is None:
            return (chain, None) if not left else (None, None)
        stride = stride * d[2]
    return chain, stride


@dataclass
class DigitChange:
    """A read whose indices are the mixed-radix digits of loop indices, rewritten over
    one new index per digit (see :func:`digit_change`)."""

    stmt: Stmt  # the statement over the digits (j replaced)
    read: sympy.Expr  # the read, each digit a plain new index
    value: dict  # loop index -> its value from the digits, j = sum_k u_k s_k
    digits: dict  # digit expression of the read -> its new index
    guards: list  # what the digits must satisfy to come from some j of its range


def digit_change(stmt: Stmt, read, shape, dim_names, facts) -> DigitChange | None:
    """The gather form of a read whose non-affine indices are digits of loop indices.

    A loop index ``j`` over ``[0, R)`` read only through digits ``d_k = floor(j/s_k) mod r_k``
    (:func:`_digit`) is a bijection onto its digits when the digits form a mixed-radix
    system: ordered by stride, the first has stride 1 and each next stride is the one
    before times its radix (``s_{k+1} = s_k r_k``); the last digit has no radix
    (``floor(j/s)``, any j >= 0 has exactly one set of digits), or it has one and
    ``R <= s_top r_top`` (so that no two j of the range wrap onto the same digits). The
    equalities and the inequality are proven from the sizes, the relations of ``dims``
    and the derived dimensions (``facts``, e.g. F = C H W); where one cannot be proven the
    read stays a scatter. Then ``j = sum_k d_k s_k`` is the only j with these digits, so
    the deltas of the chain rule contract: ``g_x[.., d_k, ..] = g_y[.., sum_k d_k s_k, ..]``
    where ``0 <= d_k < r_k`` (the digits' ranges; the guard is dropped where the axis is
    that size) and ``sum_k d_k s_k < R`` (dropped where the facts prove it). The leading
    digit's index runs over its axis of the read tensor: a j whose leading digit falls
    outside the tensor reads zero (the padding rule) and has no gradient to receive.

    A lowest stride ``s_0`` other than 1 (``x[j // S]``, nearest upsampling) leaves the
    remainder: the j with given digits are ``t + sum_k d_k s_k`` for ``t`` in
    ``[0, s_0)``, a new summation index, so the gradient is a gather summed over a window
    of ``s_0`` (its bound tightened by ``< R``).

    Returns None (keep the scatter) when some non-affine index is not a digit, a loop
    index with digits also occurs elsewhere in the read, or a condition is not proven."""
    if not isinstance(read, sympy.Indexed):
        return None
    indices = list(stmt.free) + list(stmt.over)
    positions = [sympy.sympify(a) for a in read.indices]
    by_index: dict = {}
    for p, a in enumerate(positions):
        if is_affine(a, indices):
            continue
        found = _digit(a, indices)
        if found is None:
            return None
        j, stride, radix = found
        by_index.setdefault(j, []).append((p, stride, radix))
    if not by_index:
        return None
    if stmt.reduce == "max" and any(j in stmt.over for j in by_index):
        return None  # the argmax routing is over j itself: left to the scatter
    chains = {}
    for j, digits in by_index.items():
        own = {p for p, _, _ in digits}
        if any(a.has(j) for p, a in enumerate(positions) if p not in own):
            return None
        found = None
        for first in digits:  # the lowest digit: the one whose chain takes every digit
            chain, stride = _chain(first, digits, facts)
            if chain is not None:
                found = chain, stride
                break
        if found is None:
            return None
        chain, stride = found
        if chain[-1][2] is not None and not facts.proves(sympy.Ge(stride, stmt.ranges[j]), {}):
            return None
        chains[j] = chain
    taken = {str(s) for s in indices} | {str(s) for s in stmt.body.free_symbols}
    taken |= {str(s) for a in positions for s in a.free_symbols}
    ranges = dict(stmt.ranges)
    value, digits, guards, remainders = {}, {}, [], {}
    for j, chain in chains.items():
        del ranges[j]
        total = sympy.S.Zero
        low = chain[0][1]
        if not facts.equal(low, 1):
            # the lowest stride s_0 > 1: j = t + s_0 (...) with t in [0, s_0), summed
            t = fresh_index(str(j), taken)
            ranges[t] = low
            remainders[j] = t
            total = t
        for p, stride, radix in chain:
            u = fresh_index(str(dim_names[p]).lower(), taken)
            digits[positions[p]] = u
            ranges[u] = radix if radix is not None else shape[p]
            total += stride * u
        value[j] = total
        bounds = {digits[positions[p]]: (sympy.S.Zero, ranges[digits[positions[p]]]) for p, _, _ in chain}
        if j in remainders:
            bounds[remainders[j]] = (sympy.S.Zero, low)
        if not facts.proves(sympy.Lt(total, stmt.ranges[j]), bounds):
            guards.append(Guard("range", total, 0, stmt.ranges[j]))

    def over(e):
        return sympy.sympify(e).xreplace(digits).xreplace(value)

    def replaced(seq):
        out = []
        for i in seq:
            if i in chains:
                out.extend(digits[positions[p]] for p, _, _ in sorted(chains[i], key=lambda d: d[0]))
            else:
                out.append(i)
        return tuple(out)

    from dataclasses import replace

    over_idx = replaced(stmt.over) + tuple(remainders.values())
    new = replace(stmt, free=replaced(stmt.free), over=over_idx, ranges=ranges, body=over(stmt.body))
    return DigitChange(new, over(read), value, digits, guards)


def scatter_term(stmt: Stmt, read, name, seed, local, argmax_reads):
    """g[a(o, r)] += gT[o] * local for every point (o, r) of the forward's loops.

    Indices of the iteration space that do not occur in the written position become an
    inner sum, so the scattered value is itself a contraction (e.g. col2im of W^T g)."""
    indices = list(stmt.free) + list(stmt.over)
    target = tuple(read.indices)
    written = [i for i in indices if any(sympy.sympify(a).has(i) for a in target)]
    inner = [i for i in indices if i not in written]
    expr = seed * local
    for r, am in argmax_reads:
        expr = sympy.Piecewise((expr, sympy.Eq(r, am)), (0, True))
    loops = [(i, sympy.S.Zero, stmt.ranges[i]) for i in written]
    over = [(i, sympy.S.Zero, stmt.ranges[i]) for i in inner]
    return loops, over, target, expr


def contract(stmt: Stmt, read, shape, dim_names, argmax_reads, seed):
    """Contract the deltas of one read; returns (free, loops, guards, substitution)."""
    sum_idx = list(stmt.free) + list(stmt.over)
    ranges = dict(stmt.ranges)
    taken = {str(s) for s in sum_idx} | {str(s) for s in stmt.body.free_symbols}
    free = []
    subst: dict = {}
    guards: list[Guard] = []
    remaining = list(sum_idx)
    positions = list(read.indices) if isinstance(read, sympy.Indexed) else []
    # name the gradient's indices: reuse a plain forward index where it stands alone
    plain_used = set()
    for k, a in enumerate(positions):
        if isinstance(a, sympy.Symbol) and a in remaining and a not in plain_used:
            free.append(a)
            plain_used.add(a)
        else:
            free.append(fresh_index(str(dim_names[k]).lower(), taken))
    for k, a in enumerate(positions):
        j = free[k]
        a = sympy.sympify(a).xreplace(subst)
        if a == j and j in remaining:
            remaining.remove(j)
            if ranges.get(j) != shape[k]:
                guards.append(Guard("range", j, 0, ranges[j]))
            continue
        cands = [s for s in remaining if a.has(s)]
        choice = None
        for s in cands:
            c = sympy.diff(a, s)
            if c.free_symbols & set(remaining):
                continue
            if c in (1, -1):
                choice = (s, c)
                break
        if choice is None:
            for s in cands:
                c = sympy.diff(a, s)
                if not (c.free_symbols & set(remaining)) and c.is_positive:
                    choice = (s, c)
                    break
        if choice is None:
            guards.append(Guard("eq", a, other=j))
            continue
        s, c = choice
        rest = sympy.expand(a - c * s)
        if c == 1:
            sol = j - rest
        elif c == -1:
            sol = rest - j
        else:
            sol = sympy.floor((j - rest) / c)
            guards.append(Guard("div", j - rest, other=c))
        step = {s: sol}
        subst = {key: sympy.sympify(v).xreplace(step) for key, v in subst.items()}
        subst[s] = sol
        guards = [g.subs(step) for g in guards]
        remaining.remove(s)
        guards.append(Guard("range", sol, 0, ranges[s]))
    # argmax routing of a max reduction: over-index == recorded argmax
    for r, am in argmax_reads:
        r_val = sympy.sympify(r).xreplace(subst)
        am_val = am.xreplace(subst)
        guards.append(Guard("eq", r_val, other=am_val))
    loops, guards = tighten(remaining, ranges, guards)
    guards = [g for g in guards if not _trivial(g, free, shape)]
    return tuple(free), loops, guards, subst


def _trivial(g: Guard, free, shape):
    if g.kind == "range" and g.expr in free:
        k = list(free).index(g.expr)
        return g.lo == 0 and sympy.simplify(g.hi - shape[k]) == 0
    if g.kind == "range":
        lo_ok = sympy.simplify(g.expr - g.lo).is_nonnegative
        hi_ok = sympy.simplify(g.hi - g.expr).is_positive
        return bool(lo_ok and hi_ok)
    return False


def tighten(remaining, ranges, guards):
    """Turn range guards linear in a summation index into that index's loop bounds."""
    loops = []
    guards = list(guards)
    for pos, u in enumerate(remaining):
        inner = set(remaining[pos + 1 :])
        lo_bounds = [sympy.S.Zero]
        hi_bounds = [ranges[u]]
        keep = []
        for g in guards:
            if g.kind != "range" or not g.expr.has(u):
                keep.append(g)
                continue
            c = sympy.diff(g.expr, u)
            rest = sympy.expand(g.expr - c * u)
            if c.free_symbols & (set(remaining)) or rest.has(u) or (rest.free_symbols & inner):
                keep.append(g)
                continue
            if c.is_positive:
                lo_bounds.append(-sympy.floor((rest - g.lo) / c))
                hi_bounds.append(sympy.floor((g.hi - 1 - rest) / c) + 1)
            elif c.is_negative:
                cp = -c
                hi_bounds.append(sympy.floor((rest - g.lo) / cp) + 1)
                lo_bounds.append(sympy.floor((rest - g.hi) / cp) + 1)
            else:
                keep.append(g)
                continue
        guards = keep
        loops.append((u, sympy.Max(*lo_bounds), sympy.Min(*hi_bounds)))
    return loops, guards


@dataclass
class Backward:
    """The result of the reverse pass."""

    terms: list[Term]  # in evaluation order
    argmax: dict[str, tuple[str, ...]]  # max statement target -> argmax tensor names
    inlined: dict[str, tuple[tuple, sympy.Expr]]  # gradient name -> (free, expression)
    all_terms: list[Term] = field(default_factory=list)  # inlined ones too, for the derivation
    rewrites: list = field(default_factory=list)  # steps after the chain rule (statistics.Rewrite), in order
    named_sums: list[str] = field(default_factory=list)  # reductions those steps introduced, in order
    # outputs that later statements read: gradient name (the output's total, or the
    # reads' gathered contributions) -> the output
    read_outputs: dict[str, str] = field(default_factory=dict)


def apply_assumptions(expr, loops, guards, assumptions):
    """Use facts like ``sum(target[b, c], c) == 1``: a term summed over full ranges whose
    loop-dependent factor is exactly an assumed sum is replaced by the assumed value."""
    if not loops or guards or not assumptions:
        return expr, loops, None
    loop_idx = [u for u, _, _ in loops]
    inside, outside = [], []
    for f in sympy.Mul.make_args(expr):
        (inside if f.free_symbols & set(loop_idx) else outside).append(f)
    if len(inside) != 1 or not isinstance(inside[0], sympy.Indexed):
        return expr, loops, None
    read = inside[0]
    for lhs, rhs, text in assumptions:
        body = lhs.body
        if not isinstance(body, sympy.Indexed) or body.base != read.base or len(lhs.indices) != len(loops):
            continue
        mapping = {}
        ok = True
        for a, b in zip(body.indices, read.indices):
            if a in lhs.indices:
                ok = ok and b in loop_idx
            mapping[a] = b
        full = all(lo == 0 for _, lo, _ in loops)
        if ok and full and {mapping.get(i) for i in lhs.indices} == set(loop_idx):
            return sympy.Mul(*outside) * rhs, [], (lhs, rhs)
    return expr, loops, None


def _not_differentiable(path, equations, stmt, read, function):
    """The SpecError for a local derivative SymPy left unevaluated, naming the spec's
    equation that holds the function (or the statement, if none does)."""
    from .errors import SpecError

    text = next((eq.text for eq in equations if eq.rhs.has(function)), None)
    if text is None:
        text = next((eq.text for eq in equations if eq.target == stmt.target), None)
    if text is None:
        text = f"{stmt.target}[{', '.join(map(str, stmt.free))}] = {stmt.body}"
    name = type(function).__name__ if isinstance(function, sympy.Function) else "the expression"
    return SpecError(
        path,
        f"cannot differentiate `{function}` with respect to `{read}`: SymPy has no derivative for "
        f"{name} here; write it with functions that have one (derive/functions.py lists them)",
        text,
    )


def _fresh_grad(name: str, wrt, outputs) -> str:
    """``name``, or ``name`` with a number, that no tensor's gradient is called."""
    taken = {grad_name(n) for n in list(wrt) + list(outputs)}
    fresh, k = name, 1
    while fresh in taken:
        fresh, k = f"{name}{k}", k + 1
    return fresh


def _digit_term(stmt, read, name, shape, dim_names, seed, local, argmax_reads, change: DigitChange, assumptions):
    """The gather-form term of a read whose indices are digits of loop indices: the
    contraction of the statement rewritten over the digits (:func:`digit_change`); the
    derivation keeps the statement, the read and the chain rule as written."""

    def over(e):
        return sympy.sympify(e).xreplace(change.digits).xreplace(change.value)

    moved = [(over(r), over(am)) for r, am in argmax_reads]
    free, loops, guards, subst = contract(change.stmt, change.read, shape, dim_names, moved, over(seed))
    guards = [g.subs(subst) for g in change.guards] + guards
    expr = (over(seed) * over(local)).xreplace(subst)
    expr, loops, used = apply_assumptions(expr, loops, guards, assumptions)
    primed = tuple(sympy.Symbol(f"{j}'", integer=True) for j in free)
    deltas = sympy.Mul(*[sympy.KroneckerDelta(a, j, evaluate=False) for a, j in zip(read.indices, primed)])
    t = Term(grad_name(name), name, free, loops, guards, expr, stmt, read, local, seed * local * deltas,
             tuple(stmt.free) + tuple(stmt.over))
    t.chain_free = primed
    for j, v in change.value.items():
        t.steps.append(("digits", j, v.xreplace(subst)))
    if used:
        t.steps.append(("assume", *used))
    return t


def differentiate(stmts: list[Stmt], wrt: dict[str, tuple], dim_names: dict[str, tuple], outputs: set[str], assumptions=(),
                  path: str = "", equations=(), facts=None):
    """Reverse-mode pass. ``wrt``: tensor name -> shape for every tensor that needs a
    gradient (differentiable args and the intermediates between them and the outputs).
    ``path`` and ``equations`` (the spec's) name the file and the equation in the error
    for a function that cannot be differentiated. ``facts`` (derive.pipeline.Facts: the
    relations of ``dims`` and the derived dimensions) proves the conditions under which
    a read through mixed-radix digits is a bijection and its gradient a gather
    (:func:`digit_change`); without it only what holds for all sizes is proven.

    A gradient of an intermediate whose contributions are all elementwise is not
    materialised: its expression is substituted into the statements that read it.
    """
    if facts is None:
        from .pipeline import Facts

        facts = Facts()
    terms: dict[str, list[Term]] = {}
    order: list[Term] = []
    everything: list[Term] = []
    argmax: dict[str, tuple[str, ...]] = {}
    inlined: dict[str, tuple[tuple, sympy.Expr]] = {}
    read_outputs: dict[str, str] = {}
    for stmt in reversed(stmts):
        g_t = grad_name(stmt.target)
        if stmt.stop_gradient:
            continue
        if stmt.target in outputs:
            seed = read_of(g_t, stmt.free)
            if terms.get(g_t):
                # an output that later statements read: its gradient is the incoming
                # output gradient plus what flows back through those reads, which are
                # gathered under their own name (g_t is the caller's seed argument)
                own = terms.pop(g_t)
                if all(t.elementwise for t in own):
                    total = _fresh_grad(g_t + "_total", wrt, outputs)
                    seed = seed + sympy.Add(*[t.expr.xreplace(dict(zip(t.free, stmt.free))) for t in own])
                    for t in own:
                        order.remove(t)
                        t.grad = total
                    inlined[total] = (tuple(stmt.free), seed)
                    read_outputs[total] = stmt.target
                else:
                    via = _fresh_grad(g_t + "_reads", wrt, outputs)
                    for t in own:
                        t.grad = via
                    terms[via] = own
                    seed = seed + read_of(via, stmt.free)
                    read_outputs[via] = stmt.target
        elif terms.get(g_t):
            own = terms[g_t]
            if all(t.elementwise for t in own):
                seed = sympy.Add(*[t.expr.xreplace(dict(zip(t.free, stmt.free))) for t in own])
                inlined[g_t] = (tuple(stmt.free), seed)
                for t in own:
                    order.remove(t)
                del terms[g_t]
            else:
                seed = read_of(g_t, stmt.free)
        else:
            continue
        argmax_reads = []
        if stmt.reduce == "max":
            names = tuple(f"{stmt.target}_argmax_{r}" for r in stmt.over)
            argmax[stmt.target] = names
            argmax_reads = [(r, read_of(n, stmt.free)) for r, n in zip(stmt.over, names)]
        for read in reads_in(stmt.body, set(wrt)):
            name = str(read.base) if isinstance(read, sympy.Indexed) else read.name
            try:
                local = local_partial(stmt.body, read)
            except NotDifferentiable as exc:
                raise _not_differentiable(path, equations, stmt, read, exc.function) from None
            if local == 0:
                continue
            shape = wrt[name]
            change = digit_change(stmt, read, shape, dim_names[name], facts) if needs_scatter(stmt, read) else None
            if change is not None:
                t = _digit_term(stmt, read, name, shape, dim_names[name], seed, local, argmax_reads, change, assumptions)
                terms.setdefault(grad_name(name), []).append(t)
                order.append(t)
                everything.append(t)
                continue
            if needs_scatter(stmt, read):
                loops, over, target, expr = scatter_term(stmt, read, name, seed, local, argmax_reads)
                t = Term(grad_name(name), name, (), loops, [], expr, stmt, read, local, seed * local,
                         tuple(stmt.free) + tuple(stmt.over), scatter=target, scatter_over=over)
                t.chain_free = target
                terms.setdefault(grad_name(name), []).append(t)
                order.append(t)
                everything.append(t)
                continue
            free, loops, guards, subst = contract(stmt, read, shape, dim_names[name], argmax_reads, seed)
            expr = (seed * local).xreplace(subst)
            expr, loops, used = apply_assumptions(expr, loops, guards, assumptions)
            over = tuple(stmt.free) + tuple(stmt.over)
            primed = tuple(sympy.Symbol(f"{j}'", integer=True) for j in free)
            deltas = sympy.Mul(*[sympy.KroneckerDelta(a, j, evaluate=False) for a, j in zip(read.indices, primed)]) if isinstance(read, sympy.Indexed) else sympy.S.One
            t = Term(grad_name(name), name, free, loops, guards, expr, stmt, read, local, seed * local * deltas, over)
            t.chain_free = primed
            if used:
                t.steps.append(("assume", *used))
            terms.setdefault(grad_name(name), []).append(t)
            order.append(t)
            everything.append(t)
    return Backward(order, argmax, inlined, everything, read_outputs=read_outputs)
