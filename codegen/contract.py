"""Contractions on the CPU: sums of products lowered to BLAS, from their index structure.

Target independent planning for the CPU templates (the CUDA kernels keep their loops).
Nothing here knows any op: a statement qualifies by the shape of its indices alone.

A sum ``t[F] (+)= sum_K body`` is a *contraction* when the factors of its body that
depend on summation indices fall into exactly two groups by their index sets (a factor
joins a group whose indices contain its own, or the other way round): the *operands*.
Every index then has a role:

* batch: a free index of both operands (attention's ``b``), and any other index the
  plan chooses to loop over outside the product (a convolution's image ``n``);
* M / N: a free index of only the left / only the right operand;
* K: a summation index of both operands. Summation indices the plan loops over outside
  the product (``kouter``) make the products accumulate.

Per batch element the kernel computes one matrix product ``np.dot(A, B)`` with A of
shape (M, K) and B of shape (K, N). An operand that is one plain read of a contiguous
array whose index order is (batch..., then M and K as two blocks) is passed as a view
(``q[b].reshape(L, D)``, ``.T`` when K comes first); any other operand (a read with
affine index expressions such as ``x[n, c, h*S + p - P, w*S + q - P]``, a guarded read,
a product of several factors) is *gathered* into a contiguous buffer first: the
im2col patch matrix of a convolution, zero where its guard fails. The innermost gather
loop is split by the guard's conditions that are linear in its index (``_span``), so
the copy runs without a test per element and the zero borders are plain fills.

Among the possible plans (which indices to batch, which operand is left, whether the
product can be written straight into the output's slice) the one with the fewest
copies of plain reads, then direct output, then fewest outer loops is taken.

A *gather-form* sum whose summation loops are windows that depend on free indices
(the transposed convolution of a convolution's input gradient,
``g_x[n,c,h1,w1] = sum(weight[o,c,h1+P-S*h, w1+P-S*w] * g_y[n,o,h,w], h, o, w)``) is
first turned into a *scatter*: the read position ``u = h1 + P - S*h`` becomes a loop
index over the read's axis, the free index becomes ``h1 = S*h + u - P`` in the
target's subscript, and the windows become full ranges. That is valid only when the
guard of the read implies every window bound, which is checked. The product then has
plain operands (``weight``, ``g_y[n]``) and its result is added into the target under
the target's bounds (col2im), the innermost loop split the same way.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import sympy

from derive.ir import Assign, Loop

from .printers import RESERVED_NAMES

ZERO = sympy.Integer(0)


# --------------------------------------------------------------------------- plan types
@dataclass
class Span:
    """The innermost loop ``var in [lo, hi)`` of a gather or scatter, split by
    conditions: ``bounds`` are pairs (a, b) meaning ``a*var + b >= 0`` (integers),
    ``row`` the conditions free of ``var`` (tested once per row), ``rest`` those left
    to test per element. Outside the span a gather writes zeros, a scatter nothing."""

    var: sympy.Symbol
    lo: sympy.Expr
    hi: sympy.Expr
    bounds: list
    row: sympy.Basic = sympy.true
    rest: sympy.Basic = sympy.true


@dataclass
class Operand:
    """One side of the matrix product: the product of some factors of the body.

    ``read`` is set when the operand is one plain read of an array over full ranges
    (a view is possible). The plan fills in the layout: the operand is the matrix
    ``rows x cols`` (``trans``: its transpose) of the array ``name`` (a view,
    subscripted by its ``outer`` indices) or of a gathered buffer ``name``."""

    expr: sympy.Expr
    indices: frozenset
    read: sympy.Indexed | None = None
    view: bool = False
    outer: tuple = ()
    rows: tuple = ()  # loops
    cols: tuple = ()  # loops
    trans: bool = False
    name: str = ""
    span: Span | None = None
    value: sympy.Expr | None = None  # the gathered value inside the span
    pre: list = field(default_factory=list)  # CSE temporaries of the gather (Temp)


@dataclass
class Match:
    """A statement recognised as a contraction (possibly rewritten as a scatter)."""

    stmt: Assign
    left: Operand
    right: Operand
    scale: sympy.Expr  # factors free of summation indices, applied in the epilogue
    zero: str | None = None  # a scatter over a plain assignment zeroes its target first
    note: str = ""  # the rewritten statement, for the docstring


@dataclass
class Contraction:
    """The CPU lowering of a contraction kernel (see the module docstring)."""

    outer: tuple  # free loops outside the product
    kouter: tuple  # summation loops outside the product (the products accumulate)
    m: tuple
    n: tuple
    k: tuple
    left: Operand  # M x K
    right: Operand  # K x N
    out: str | None = None  # the product is written into this array's [outer] slice
    scatter: bool = False
    span: Span | None = None  # the scatter loop's split
    zero: str | None = None
    note: str = ""


# --------------------------------------------------------------------------- conditions
def conjuncts(cond) -> list:
    cond = sympy.sympify(cond)
    if cond is sympy.true:
        return []
    if isinstance(cond, sympy.And):
        return list(cond.args)
    return [cond]


def nonneg_form(rel, is_int):
    """An integer expression ``e`` with ``rel`` equivalent to ``e >= 0``, or None."""
    if not isinstance(rel, sympy.core.relational.Relational):
        return None
    lhs, rhs = rel.lhs, rel.rhs
    if not (is_int(lhs) and is_int(rhs)):
        return None
    if isinstance(rel, sympy.GreaterThan):
        return sympy.expand(lhs - rhs)
    if isinstance(rel, sympy.StrictGreaterThan):
        return sympy.expand(lhs - rhs - 1)
    if isinstance(rel, sympy.LessThan):
        return sympy.expand(rhs - lhs)
    if isinstance(rel, sympy.StrictLessThan):
        return sympy.expand(rhs - lhs - 1)
    return None


def linear_in(e, var):
    """(a, b) with ``e == a*var + b``, a and b free of ``var``, a != 0; else None."""
    a = sympy.expand(sympy.diff(e, var))
    if a == 0 or a.has(var):
        return None
    b = sympy.expand(e - a * var)
    if b.has(var):
        return None
    return a, b


def make_span(var, lo, hi, conds, is_int) -> Span:
    """Split ``conds`` (a list of conditions) for the innermost loop ``var``."""
    bounds, row, rest = [], [], []
    for c in conds:
        if not c.has(var):
            row.append(c)
            continue
        e = nonneg_form(c, is_int)
        lin = linear_in(e, var) if e is not None else None
        if lin is None:
            rest.append(c)
        else:
            bounds.append(lin)
    return Span(var, lo, hi, bounds, sympy.And(*row), sympy.And(*rest))


def is_zero_guard(f) -> bool:
    """``Piecewise((value, cond), (0, True))``: the factor is zero where cond fails."""
    return (
        isinstance(f, sympy.Piecewise)
        and len(f.args) == 2
        and f.args[1].cond is sympy.true
        and f.args[1].expr == 0
    )


def split_guards(expr):
    """(conditions, unguarded value) of a product: the conditions of its zero-guard
    factors, and the product with those factors replaced by their values."""
    conds, factors = [], []
    for f in sympy.Mul.make_args(expr):
        if is_zero_guard(f):
            conds.extend(conjuncts(f.args[0].cond))
            factors.append(f.args[0].expr)
        else:
            factors.append(f)
    return conds, sympy.Mul(*factors)


def guarded(value, cond):
    cond = sympy.sympify(cond)
    if cond is sympy.true:
        return value
    return sympy.Piecewise((value, cond), (ZERO, True))


# --------------------------------------------------------------------------- helpers
def _loop_syms(loops) -> set:
    return {l.index for l in loops}


def _bound_syms(l: Loop) -> set:
    return sympy.sympify(l.lo).free_symbols | sympy.sympify(l.hi).free_symbols


def same_value(a, b) -> bool:
    """Whether two index expressions (loop bounds, extents) are equal. Cheap tests
    first: structural equality, then the expanded difference (a nonzero polynomial is
    never zero); ``simplify`` only for what they leave (``floor``, ``Max``), as it is
    slow and this runs for every bound of every candidate statement."""
    a, b = sympy.sympify(a), sympy.sympify(b)
    if a == b:
        return True
    diff = sympy.expand(a - b)
    if diff == 0:
        return True
    if diff.is_polynomial():
        return False
    return sympy.simplify(diff) == 0


def _indices_of(expr, loopvars) -> frozenset:
    return frozenset(s for s in sympy.sympify(expr).free_symbols if s in loopvars)


def plain_read(expr, loops: dict, decls: dict):
    """``expr`` when it is one read of a float array at distinct loop indices covering
    each axis fully (lo 0, hi the axis length); else None."""
    if not isinstance(expr, sympy.Indexed):
        return None
    d = decls.get(expr.base.label.name)
    if d is None or d.dtype != "float" or d.rank != len(expr.indices):
        return None
    idx = list(expr.indices)
    if len(set(idx)) != len(idx):
        return None
    for i, extent in zip(idx, d.shape):
        l = loops.get(i)
        if l is None or l.lo != 0 or not same_value(l.hi, extent):
            return None
    return expr


# --------------------------------------------------------------------------- gather to scatter
def _implied_bounds(var, conds, is_int):
    """Lower and upper loop bounds of ``var`` that ``conds`` imply, in the forms a
    window tightened from those conditions is written in."""
    lows, highs = [], []
    for c in conds:
        e = nonneg_form(c, is_int)
        lin = linear_in(e, var) if e is not None else None
        if lin is None:
            continue
        a, b = lin
        if a.is_positive:
            lows.append(-sympy.floor(b / a))
            lows.append(sympy.floor(sympy.expand(-b - 1) / a) + 1)
        elif a.is_negative:
            highs.append(sympy.floor(b / -a) + 1)
    return lows, highs


def _window(l: Loop, free: set, conds, is_int):
    """The full range (lo, hi) of a window loop whose bounds depend on free indices:
    the arguments of its Max/Min free of them; None unless every other argument is a
    bound the guard implies (then the window only skips terms that are zero)."""
    lows, highs = _implied_bounds(l.index, conds, is_int)
    out = []
    for bound, kind, implied in ((l.lo, sympy.Max, lows), (l.hi, sympy.Min, highs)):
        args = bound.args if isinstance(bound, kind) else (bound,)
        full = [a for a in args if not (sympy.sympify(a).free_symbols & free)]
        if not full:
            return None
        for a in args:
            if not sympy.sympify(a).free_symbols & free:
                continue
            # derive writes the implied form itself: look for it before asking simplify
            if a not in implied and not any(same_value(a, b) for b in implied):
                return None
        out.append(kind(*full))
    return tuple(out)


def fresh_index(base: str, taken: set) -> sympy.Symbol:
    """An integer symbol named ``base`` (``base1``, ``base2``, ... when taken), added to
    ``taken``. The name ends up as a loop variable of a generated kernel, so it is a
    Python identifier that is none of :data:`RESERVED_NAMES` (a dimension ``NP`` must
    not shadow ``np``) and does not start with ``_`` (codegen's own locals): any other
    base becomes ``u``."""
    stem = base
    if not stem.isidentifier() or stem.startswith("_") or stem in RESERVED_NAMES:
        stem = "u"
    name, k = stem, 0
    while name in taken or name in RESERVED_NAMES:
        k += 1
        name = "%s%d" % (stem, k)
    taken.add(name)
    return sympy.Symbol(name, integer=True)


def to_scatter(stmt: Assign, decls: dict, is_int):
    """A windowed gather rewritten as a scatter (see the module docstring), as
    (statement, note); None when the statement has no window or the rewrite does not
    apply."""
    free = _loop_syms(stmt.free)
    windowed = [l for l in stmt.over if _bound_syms(l) & free]
    if not windowed or any(_bound_syms(l) & _loop_syms(stmt.over) for l in stmt.over):
        return None
    if any(l.lo != 0 or _bound_syms(l) & free for l in stmt.free):
        return None
    moved = set()  # the free indices the windows depend on
    for l in windowed:
        moved |= _bound_syms(l) & free
    factors = list(sympy.Mul.make_args(stmt.body))
    for fi, f in enumerate(factors):
        read, cond = (f.args[0].expr, f.args[0].cond) if is_zero_guard(f) else (f, sympy.true)
        if not isinstance(read, sympy.Indexed) or read.base.label.name not in decls:
            continue
        others = factors[:fi] + factors[fi + 1:]
        if any(o.has(m) for o in others for m in moved):
            continue
        conds = conjuncts(cond)
        # each moved index stands in exactly one position of the read, as +-index + rest
        where = {}
        for m in sorted(moved, key=lambda s: s.name):
            pos = [k for k, e in enumerate(read.indices) if sympy.sympify(e).has(m)]
            if len(pos) != 1:
                break
            e = sympy.expand(read.indices[pos[0]])
            lin = linear_in(e, m)
            if lin is None or lin[0] not in (1, -1) or lin[1].free_symbols & free:
                break
            where[m] = (pos[0], lin[0], lin[1])
        else:
            full = {}
            for l in windowed:
                w = _window(l, free, conds, is_int)
                if w is None:
                    break
                full[l.index] = w
            else:
                return _rewrite(stmt, read, fi, factors, conds, where, full, decls, is_int)
    return None


def _rewrite(stmt, read, fi, factors, conds, where, full, decls, is_int):
    d = decls[read.base.label.name]
    taken = {s.name for s in sympy.sympify(stmt.body).free_symbols} | {stmt.target}
    for l in stmt.free + stmt.over:
        taken |= {l.index.name} | {s.name for s in _bound_syms(l)}
    new_idx = list(read.indices)
    subst, new_of = {}, {}
    for m, (pos, a, rest) in sorted(where.items(), key=lambda kv: kv[1][0]):
        extent = d.shape[pos]
        base = str(extent).lower() if isinstance(extent, sympy.Symbol) else "u"
        u = fresh_index(base, taken)
        new_idx[pos] = u
        subst[m] = sympy.expand(a * (u - rest))  # read position u = a*m + rest
        new_of[m] = (u, extent)
    # the guard, in the new indices: the position's own range is the new loop's range
    kept = []
    covered = {u: [False, False] for u, _ in new_of.values()}
    for c in conds:
        c2 = c.xreplace(subst)
        e = nonneg_form(c2, is_int)
        hit = False
        for u, extent in new_of.values():
            if e is not None and sympy.expand(e - u) == 0:
                covered[u][0] = hit = True
            elif e is not None and sympy.expand(e - (extent - 1 - u)) == 0:
                covered[u][1] = hit = True
        if not hit:
            kept.append(c2)
    if not all(lo and hi for lo, hi in covered.values()):
        return None  # the guard does not keep the read inside the axis: terms would be lost
    new_read = sympy.Indexed(read.base, *new_idx)
    body = [f.xreplace(subst) for f in factors]
    body[fi] = guarded(new_read, sympy.And(*kept))
    free = []
    for l in stmt.free:
        if l.index in new_of:
            u, extent = new_of[l.index]
            free.append(Loop(u, ZERO, extent))
        else:
            free.append(l)
    over = []
    for l in stmt.over:
        if l.index in full:
            free.append(Loop(l.index, *full[l.index]))
        else:
            over.append(l)
    target_idx = tuple(subst.get(l.index, l.index) for l in stmt.free)
    inside = sympy.And(*[c for l in stmt.free if l.index in subst
                         for c in (subst[l.index] >= 0, subst[l.index] < l.hi)])
    new = Assign(
        target=stmt.target,
        free=tuple(free),
        body=sympy.Mul(*body),
        reduce="sum",
        over=tuple(over),
        accumulate=True,
        equation=stmt.equation,
        scatter=target_idx,
        where=inside,
    )
    lhs = "%s[%s]" % (stmt.target, ", ".join(str(e) for e in target_idx))
    note = "as a scatter: %s += sum(%s, %s)" % (lhs, new.body, ", ".join(str(l.index) for l in over))
    return new, note


def _floor_position(e, m, free):
    """(a, rest, s) with the read position ``e == floor((a*m + rest)/s)``, a = +-1,
    ``rest`` and the positive divisor ``s`` free of the free indices; None otherwise."""
    if not isinstance(e, sympy.floor):
        return None
    num, den = sympy.fraction(sympy.together(e.args[0]))
    if den == 1 or (den.free_symbols & free) or not den.is_positive:
        return None
    lin = linear_in(sympy.expand(num), m)
    if lin is None or lin[0] not in (1, -1) or lin[1].free_symbols & free:
        return None
    return lin[0], lin[1], den


def floor_to_scatter(stmt: Assign, decls: dict, is_int):
    """A strided gather rewritten as a scatter, as (statement, note); None when it does
    not apply.

    The input gradient of a strided, dilated convolution is derived in the form
    ``g_x[n,c,h1,w1] = sum(g_y[n,o, floor((h1 + P - D*p)/S), ...] * weight[o,c,p,q], o, p, q)``
    under the guard ``Mod(h1 + P - D*p, S) == 0`` and the read's bounds: a free index
    ``m`` is read, in one position of one read, as ``floor((a*m + rest)/s)`` (a = +-1)
    and only where ``s`` divides ``a*m + rest``. Then ``m = a*(s*u - rest)`` for the new
    index ``u`` over that axis: the read becomes plain (``g_y[n,o,u,v]``), the guard's
    divisibility and the read's bounds hold by construction (they are checked to be
    there), and the statement becomes ``g_x[n, c, S*u + D*p - P, ...] += sum(...)``: the
    summation indices of ``rest`` become free loops of the scatter (each writes its own
    element), the others stay summed. Every element of the target that no term reaches
    is zero, as before (the caller zeroes a plain assignment's target)."""
    if stmt.reduce != "sum" or stmt.scatter or not stmt.over:
        return None
    if any(l.lo != 0 or _bound_syms(l) & (_loop_syms(stmt.free) | _loop_syms(stmt.over)) for l in stmt.free + stmt.over):
        return None
    free = _loop_syms(stmt.free)
    body = sympy.sympify(stmt.body)
    outer_cond = sympy.true
    if is_zero_guard(body):
        outer_cond, body = body.args[0].cond, body.args[0].expr
    factors = list(sympy.Mul.make_args(body))
    conds = conjuncts(outer_cond)
    for fi, f in enumerate(factors):
        read, fcond = (f.args[0].expr, f.args[0].cond) if is_zero_guard(f) else (f, sympy.true)
        if not isinstance(read, sympy.Indexed) or read.base.label.name not in decls:
            continue
        moved = {m for m in free for e in read.indices if isinstance(e, sympy.floor) and e.has(m)}
        if not moved:
            continue
        others = factors[:fi] + factors[fi + 1:]
        if any(o.has(m) for o in others for m in moved):
            continue
        where, ok = {}, True
        for m in sorted(moved, key=lambda s: s.name):
            pos = [k for k, e in enumerate(read.indices) if sympy.sympify(e).has(m)]
            form = _floor_position(read.indices[pos[0]], m, free) if len(pos) == 1 else None
            if form is None:
                ok = False
                break
            where[m] = (pos[0],) + form
        if not ok:
            continue
        allconds = conds + conjuncts(fcond)
        d = decls[read.base.label.name]
        taken = {s.name for s in body.free_symbols} | {stmt.target}
        for l in stmt.free + stmt.over:
            taken.add(l.index.name)
        subst, new_of = {}, {}
        new_idx = list(read.indices)
        for m, (pos, a, rest, s) in sorted(where.items(), key=lambda kv: kv[1][0]):
            extent = d.shape[pos]
            base = str(extent).lower() if isinstance(extent, sympy.Symbol) else "u"
            u = fresh_index(base, taken)
            new_idx[pos] = u
            subst[m] = sympy.expand(a * (s * u - rest))
            new_of[m] = (u, extent, s)
        # the divisibility and the read's bounds must be among the conditions: each is
        # then true by construction; any other condition is kept
        kept, covered = [], {u: [False, False, s == 1] for u, _, s in new_of.values()}
        for c in allconds:
            divides = [m for m, (_, a, rest, s) in where.items()
                       if isinstance(c, sympy.Eq) and c.rhs == 0 and isinstance(c.lhs, sympy.Mod)
                       and c.lhs.args[1] == s and sympy.expand(c.lhs.args[0] - a * m - rest) == 0]
            if divides:
                covered[new_of[divides[0]][0]][2] = True
                continue
            c2 = c.xreplace(subst)
            e = nonneg_form(c2, is_int)
            hit = False
            for u, extent, _ in new_of.values():
                if e is not None and sympy.expand(e - u) == 0:
                    covered[u][0] = hit = True
                elif e is not None and sympy.expand(e - (extent - 1 - u)) == 0:
                    covered[u][1] = hit = True
            if not hit:
                kept.append(c2)
        if not all(all(v) for v in covered.values()):
            continue
        rest_free = [sympy.expand(subst[l.index]) for l in stmt.free if l.index in subst]
        to_free = {l.index for l in stmt.over if any(e.has(l.index) for e in rest_free)}
        # the new indices last: the scatter's innermost loop then walks the target's
        # axis with the stride s (the read's own last axis)
        new_free = [l for l in stmt.free if l.index not in new_of]
        new_free += [l for l in stmt.over if l.index in to_free]
        new_free += [Loop(new_of[l.index][0], ZERO, new_of[l.index][1]) for l in stmt.free if l.index in new_of]
        over = tuple(l for l in stmt.over if l.index not in to_free)
        if not over:
            return None
        new_body = [g.xreplace(subst) for g in others]
        new_body.append(sympy.Indexed(read.base, *new_idx))
        target_idx = tuple(subst.get(l.index, l.index) for l in stmt.free)
        inside = sympy.And(*[c for l in stmt.free if l.index in subst
                             for c in (subst[l.index] >= 0, subst[l.index] < l.hi)])
        new = Assign(
            target=stmt.target,
            free=tuple(new_free),
            body=guarded(sympy.Mul(*new_body), sympy.And(*kept)),
            reduce="sum",
            over=over,
            accumulate=True,
            equation=stmt.equation,
            scatter=target_idx,
            where=inside,
        )
        lhs = "%s[%s]" % (stmt.target, ", ".join(str(e) for e in target_idx))
        note = "as a scatter: %s += sum(%s, %s)" % (lhs, new.body, ", ".join(str(l.index) for l in over))
        return new, note
    return None


# --------------------------------------------------------------------------- matching
def match(stmt: Assign, decls: dict, is_int) -> Match | None:
    """The statement as a contraction of two operands, or None."""
    if stmt.reduce != "sum" or stmt.scatter or not stmt.over or not stmt.free:
        return None
    zero, note = None, ""
    free = _loop_syms(stmt.free)
    if any(_bound_syms(l) & free for l in stmt.over):
        res = to_scatter(stmt, decls, is_int)
        if res is None:
            return None
        zero = None if stmt.accumulate else stmt.target
        stmt, note = res
    else:
        res = floor_to_scatter(stmt, decls, is_int)
        if res is not None:
            zero = None if stmt.accumulate else stmt.target
            stmt, note = res
    loops = list(stmt.free) + list(stmt.over)
    syms = _loop_syms(loops)
    if any(l.lo != 0 or _bound_syms(l) & syms for l in loops):
        return None
    over = _loop_syms(stmt.over)
    factors = list(sympy.Mul.make_args(sympy.sympify(stmt.body)))
    groups: list = []  # [index set, factors]
    rest = []
    for f in factors:
        idx = _indices_of(f, syms)
        if idx & over:
            groups.append([idx, [f]])
        else:
            rest.append(f)
    merged = True
    while merged:
        merged = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            sa, sb = groups[a][0], groups[b][0]
            if sa <= sb or sb <= sa:
                groups[a] = [sa | sb, groups[a][1] + groups[b][1]]
                del groups[b]
                merged = True
                break
    if len(groups) != 2:
        return None
    (sl, fl), (sr, fr) = groups
    if (sl & over) != over or (sr & over) != over:
        return None  # a summation index of one operand only: not a product of two
    ld = {l.index: l for l in loops}
    operands = []
    for s, fs in ((sl, fl), (sr, fr)):
        read = plain_read(fs[0], ld, decls) if len(fs) == 1 else None
        operands.append([s, fs, read])
    scale = []
    for f in rest:
        idx = _indices_of(f, syms)
        home = [op for op in operands if op[2] is None and idx <= op[0]]
        if home:
            home[0][1].append(f)
        else:
            scale.append(f)
    left, right = (Operand(sympy.Mul(*fs), frozenset(s), read) for s, fs, read in operands)
    return Match(stmt, left, right, sympy.Mul(*scale), zero, note)


# --------------------------------------------------------------------------- planning
def _appearance(expr, candidates) -> list:
    """``candidates`` in the order they first appear in the reads of ``expr``."""
    order = []
    for node in sympy.preorder_traversal(sympy.sympify(expr)):
        if isinstance(node, sympy.Indexed):
            for e in node.indices:
                for s in sorted(sympy.sympify(e).free_symbols, key=lambda s: s.name):
                    if s in candidates and s not in order:
                        order.append(s)
    return order


def _order(vars_, expr, fallback) -> tuple:
    first = _appearance(expr, set(vars_))
    return tuple(first + [v for v in fallback if v in vars_ and v not in first])


def _inner_score(var, expr, is_free) -> float:
    """How much ``var`` wants to be a gather's innermost loop: reads whose last index
    moves with it (more if with a stride), a free index before a summed one."""
    score = 0.25 if is_free else 0.0
    for r in sympy.sympify(expr).atoms(sympy.Indexed):
        last = sympy.sympify(r.indices[-1])
        if last.has(var):
            score += 1
            if sympy.diff(last, var) not in (1, -1):
                score += 0.5
    return score


def _view_blocks(read, outer: set, mn: set, k: set):
    """(outer part, first block, second block) of a view's index order, or None."""
    idx = list(read.indices)
    n_out = sum(1 for i in idx if i in outer)
    if any(i in outer for i in idx[n_out:]):
        return None
    rest = idx[n_out:]
    if not rest:
        return None
    first_set = mn if rest[0] in mn else k
    second_set = k if first_set is mn else mn
    n1 = len(first_set)
    if set(rest[:n1]) != first_set or set(rest[n1:]) != second_set:
        return None
    return tuple(idx[:n_out]), tuple(rest[:n1]), tuple(rest[n1:])


@dataclass
class _Try:
    score: tuple
    plan: Contraction


def plan(m: Match, outs: list, is_int) -> Contraction | None:
    """The best lowering of a matched contraction. ``outs``: (array, index order) of
    the kernel's stored outputs the product may be written into directly."""
    stmt = m.stmt
    loops = {l.index: l for l in stmt.free + stmt.over}
    fv = [l.index for l in stmt.free]
    kv = [l.index for l in stmt.over]
    sources = [[()]]
    for op in (m.left, m.right):
        if op.read is not None:
            idx = tuple(op.read.indices)
            sources.append([idx[:i] for i in range(len(idx))])
    for _, order in outs:
        sources.append([tuple(order[:i]) for i in range(len(order))])
    both = {v for v in fv if v in m.left.indices and v in m.right.indices}
    candidates = set()
    for combo in itertools.product(*sources):
        omega = set(both)
        for prefix in combo:
            omega |= set(prefix)
        candidates.add(frozenset(omega))
    best = None
    for omega in sorted(candidates, key=lambda s: (len(s), sorted(v.name for v in s))):
        for out in [None] + list(outs):
            for swap in (False, True):
                t = _try(m, omega, out, swap, loops, fv, kv, bool(outs), is_int)
                if t is not None and (best is None or t.score < best.score):
                    best = t
    return best.plan if best is not None else None


def _try(m, omega, out, swap, loops, fv, kv, has_outs, is_int):
    left, right = (copy.copy(m.right), copy.copy(m.left)) if swap else (copy.copy(m.left), copy.copy(m.right))
    outer_f = [v for v in fv if v in omega]
    kouter = [v for v in kv if v in omega]
    rest_f = [v for v in fv if v not in omega]
    if any(v in left.indices and v in right.indices for v in rest_f):
        return None
    if any(v not in left.indices and v not in right.indices for v in rest_f):
        return None
    mv = [v for v in rest_f if v in left.indices]
    nv = [v for v in rest_f if v in right.indices]
    kr = [v for v in kv if v not in omega]
    if not mv or not nv or not kr:
        return None
    m_ord = n_ord = k_ord = None
    if out is not None:
        if kouter:
            return None
        order = list(out[1])
        p = len(outer_f)
        if set(order[:p]) != set(outer_f):
            return None
        rest = order[p:]
        if set(rest[: len(mv)]) != set(mv) or set(rest[len(mv):]) != set(nv):
            return None
        outer_f = order[:p]
        m_ord, n_ord = tuple(rest[: len(mv)]), tuple(rest[len(mv):])
    copies = 0
    for op, mn, is_left in ((left, mv, True), (right, nv, False)):
        op.view = False
        if op.read is None:
            continue
        blocks = _view_blocks(op.read, omega, set(mn), set(kr))
        if blocks is not None:
            out_part, b1, b2 = blocks
            mn_first = b1[0] in mn
            o_mn, o_k = (b1, b2) if mn_first else (b2, b1)
            fixed = m_ord if is_left else n_ord
            if (fixed is None or fixed == o_mn) and (k_ord is None or k_ord == o_k):
                op.view, op.outer = True, out_part
                op.rows, op.cols = tuple(loops[v] for v in b1), tuple(loops[v] for v in b2)
                op.trans = mn_first != is_left  # left wants (M, K), right (K, N)
                op.name = op.read.base.label.name
                k_ord = o_k
                if is_left:
                    m_ord = o_mn
                else:
                    n_ord = o_mn
                continue
        copies += 1
    gathered = [op for op in (left, right) if not op.view]
    ref = sympy.Mul(*[op.expr for op in gathered]) if gathered else sympy.Integer(1)
    if k_ord is None:
        k_ord = _order(kr, ref, kv)
    if m_ord is None:
        m_ord = _order(mv, left.expr, fv)
    if n_ord is None:
        n_ord = _order(nv, right.expr, fv)
    for op, mn, is_left, name in ((left, m_ord, True, "_a"), (right, n_ord, False, "_b")):
        if op.view:
            continue
        last_mn, last_k = mn[-1], k_ord[-1]
        k_inner = _inner_score(last_k, op.expr, False) > _inner_score(last_mn, op.expr, True)
        b1, b2 = (mn, k_ord) if k_inner else (k_ord, mn)
        op.rows, op.cols = tuple(loops[v] for v in b1), tuple(loops[v] for v in b2)
        op.trans = (b1 == mn) != is_left
        op.name = name
        op.outer = ()
        op.pre = []
        conds, value = split_guards(op.expr)
        inner = loops[b2[-1]]
        op.span = make_span(inner.index, inner.lo, inner.hi, conds, is_int)
        op.value = guarded(value, op.span.rest)
        op.span.rest = sympy.true
    direct = out is not None
    # a scatter runs its innermost loop over the statement's last index where it can
    scatter_inner = 0 if not m.stmt.scatter or n_ord[-1] == fv[-1] else 1
    score = (copies, 0 if (direct or not has_outs) else 1, len(omega), len(kouter), scatter_inner, swap)
    c = Contraction(
        outer=tuple(loops[v] for v in outer_f),
        kouter=tuple(loops[v] for v in kouter),
        m=tuple(loops[v] for v in m_ord),
        n=tuple(loops[v] for v in n_ord),
        k=tuple(loops[v] for v in k_ord),
        left=left,
        right=right,
        out=out[0] if direct else None,
        scatter=bool(m.stmt.scatter),
        zero=m.zero,
        note=m.note,
    )
    if c.scatter:
        inner = c.n[-1]
        c.span = make_span(inner.index, inner.lo, inner.hi, conjuncts(m.stmt.where), is_int)
    return _Try(score, c)
