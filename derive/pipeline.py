"""From an OpDef to a Program: bind, normalise, stabilise (derive/stabilize.py),
differentiate, simplify, substitute the gradients of statistics (derive/statistics.py),
lower.

This is the only place that knows the order of the passes. Lowering turns statements
and gradient terms into IR ``Assign``s: loops with ranges, out-of-bounds reads wrapped
as zeros (the spec language's padding rule), guards as ``Piecewise``.
"""

from __future__ import annotations

import re

import sympy

from . import ir, reductions
from .assumptions import checked_assumptions
from .differentiate import Guard, differentiate, grad_name, read_of
from .errors import SpecError
from .functions import Reduce
from .latex import derivation_blocks, optimizer_blocks, render_tex, schedule_blocks
from .normalize import Stmt, normalize
from .simplify import simplify_terms
from .spec import OpDef, bind
from .stabilize import idle_shifts, stabilize
from .statistics import substitute_statistics
from .tangent import forward_mode


def build(op: OpDef) -> ir.Program:
    if op.kind == "optimizer":
        return without_stop_gradient(_build_optimizer(op))
    if op.kind == "schedule":
        return _build_schedule(op)
    found = reductions.declare(op)
    variant = reductions.none_variant(op, found) if found else None
    program = _build_layer(op)
    if variant is None:
        return program
    none = _build_layer(variant)
    none = _replace(none, extra=dict(none.extra, variant_of=op.name))
    return _replace(program, variants=((((reductions.ATTR, reductions.NONE),), none),))


def _build_layer(op: OpDef) -> ir.Program:
    bind(op)
    stmts = _stabilised(op)
    shapes = {n: op.shape_of(n) for n in list(op.inputs) + list(op.params) + list(op.outputs)}
    shapes.update(op.intermediates)
    dim_names = _dim_names(op, stmts, shapes)
    args = list(op.inputs) + list(op.params)
    ints = {n for n, d in op.dtypes.items() if d == "int"}
    diff_args = op.differentiate if op.differentiate is not None else [a for a in args if a not in ints]
    for a in diff_args:
        if a in ints:
            raise SpecError(op.source, f"`{a}` holds integers (index data) and cannot be differentiated")
    # tensors whose value depends on a differentiable argument
    depends = set(diff_args)
    for s in stmts:
        if s.stop_gradient:
            continue
        if any(str(r.base) in depends for r in s.body.atoms(sympy.Indexed)) or any(
            sym.name in depends for sym in s.body.atoms(sympy.Symbol)
        ):
            depends.add(s.target)
    wrt = {n: shapes[n] for n in sorted(depends)}
    facts = _facts(op)
    backward = differentiate(stmts, wrt, dim_names, set(op.outputs), op.assumptions, path=op.source, equations=op.equations,
                             facts=facts)
    simplify_terms(backward, stmts, shapes)
    substitute_statistics(backward, stmts, shapes, {grad_name(a) for a in diff_args})
    program = lower(op, stmts, backward, shapes, diff_args)
    program = _replace(program, **forward_mode(program, {s.target for s in stmts if s.stop_gradient}))
    program = without_stop_gradient(program)
    blocks = derivation_blocks(op, stmts, backward, program)
    return _replace(program, latex=render_tex(blocks), extra={"blocks": blocks}, assumptions=checked_assumptions(op))


def without_stop_gradient(program: ir.Program) -> ir.Program:
    """Every ``stop_gradient(e)`` replaced by ``e`` once the derivatives are taken: the
    marker means "derivative 0" to differentiation and nothing to a kernel."""
    from dataclasses import replace

    from .functions import stop_gradient

    def strip(a: ir.Assign) -> ir.Assign:
        if not a.body.has(stop_gradient):
            return a
        return replace(a, body=a.body.replace(stop_gradient, lambda e: e))

    return _replace(program, **{k: tuple(strip(a) for a in getattr(program, k))
                                for k in ("forward", "backward", "jvp", "hvp", "step")})


def _stabilised(op: OpDef) -> list[Stmt]:
    """Normalised and stabilised statements. A shifted sum of exponentials whose factor
    exp(m) survives (derive/stabilize.py's idle_shifts) gains nothing from the shift: the
    op is normalised again with those sums as written, until every shift left pays."""
    shapes = dict(op.intermediates)
    unshifted = frozenset()
    while True:
        stmts = normalize(op, unshifted)
        stabilize(stmts, op.intermediates)
        idle = idle_shifts(stmts, op.outputs)
        if not idle:
            return stmts
        unshifted |= idle
        op.intermediates.clear()
        op.intermediates.update(shapes)


def _replace(program, **changes):
    from dataclasses import replace

    return replace(program, **changes)


def _dim_names(op: OpDef, stmts: list[Stmt], shapes) -> dict[str, tuple]:
    names = {}
    for n, shape in shapes.items():
        names[n] = tuple(str(d) if isinstance(d, sympy.Symbol) else f"d{k}" for k, d in enumerate(shape))
    return names


# ---------------------------------------------------------------------------
# Lowering


class Facts:
    """What lowering knows about sizes and loop indices: every dimension and positive
    attribute is positive, every loop index lies in its range, the relations of
    ``dims`` hold (``G = 2*H``: the wrappers check them at run time) and the derived
    dimensions are what ``dims`` computes them from (``F = C*H*W``). ``proves(cond)``
    says whether a guard or bounds condition holds for every value of the loops."""

    def __init__(self, relations=None, derived=None):
        self.relations = dict(relations or {})
        self.derived = dict(derived or {})  # derived dimensions, substituted when proving

    def _sizes(self, e):
        """``e`` with the relations and derived dimensions substituted (to a fixed point)."""
        for _ in range(4):
            e2 = sympy.sympify(e).xreplace(self.relations).xreplace(self.derived)
            if e2 == e:
                break
            e = e2
        return e

    def equal(self, a, b) -> bool:
        """Whether the size expressions ``a`` and ``b`` are equal for every size the
        relations allow (``W*H`` and ``H*W``; ``F`` and ``C*H*W`` for F derived so)."""
        return sympy.simplify(self._sizes(sympy.sympify(a) - sympy.sympify(b))) == 0

    def _nonnegative(self, e) -> bool:
        """Whether ``e`` (over sizes) is >= 0: with the relations and derived dimensions
        substituted, and each ``c * floor(a/q)`` bounded below (floor(x) <= x for c < 0,
        floor(a/q) >= (a - q + 1)/q for c > 0 and integers a, q > 0)."""
        e = sympy.expand(self._sizes(e))
        low = sympy.S.Zero
        for term in sympy.Add.make_args(e):
            floors = [f for f in term.atoms(sympy.floor)]
            if len(floors) == 1:
                coeff = term / floors[0]
                a, q = sympy.fraction(sympy.together(floors[0].args[0]))
                if coeff.is_nonpositive:
                    term = coeff * floors[0].args[0]
                elif coeff.is_positive and q.is_positive and a.is_integer and q.is_integer:
                    term = coeff * (a - q + 1) / q
            low += term
        return bool(sympy.expand(low).is_nonnegative)

    def _extreme(self, e, lowest: bool, loops: dict, depth: int = 0):
        """The least (``lowest``) or greatest value of ``e``, affine in the loop indices,
        over the loops' ranges; None where that is not known."""
        e = sympy.expand(sympy.sympify(e))
        inner = [i for i in e.free_symbols if i in loops]
        if not inner:
            return e
        if depth > 8:
            return None
        for i in sorted(inner, key=str):
            c = sympy.diff(e, i)
            if c.free_symbols & set(loops):
                return None  # not affine in the loop indices
            sign = c.xreplace(self.relations)
            if sign.is_nonnegative:
                up = not lowest
            elif sign.is_nonpositive:
                up = lowest
            else:
                return None
            lo, hi = loops[i]
            e = e.xreplace({i: (hi - 1) if up else lo})
        return self._extreme(e, lowest, loops, depth + 1)

    @staticmethod
    def tightened(loops: dict, guards) -> dict:
        """The loops' ranges where range guards ``lo <= i + c < hi`` (c free of the loop
        indices) narrow them: what a read under those guards may assume."""
        tight = dict(loops)
        for g in guards:
            if g.kind != "range":
                continue
            e = sympy.expand(sympy.sympify(g.expr))
            inner = [i for i in e.free_symbols if i in loops]
            if len(inner) == 1 and sympy.diff(e, inner[0]) == 1:
                i = inner[0]
                c = e - i
                tight[i] = (g.lo - c, g.hi - c)
        return tight

    def proves(self, cond, loops: dict) -> bool:
        if cond is sympy.true:
            return True
        if isinstance(cond, sympy.And):
            return all(self.proves(c, loops) for c in cond.args)
        if isinstance(cond, (sympy.Ge, sympy.Gt, sympy.Le, sympy.Lt)):
            # floor(p/q) < c  <=  p < q*c, and floor(p/q) >= 0  <=  p >= 0, for q > 0
            # and an integer c (grouped indices such as h // R)
            if isinstance(cond, (sympy.Gt, sympy.Le)):
                cond = cond.reversed
            if isinstance(cond.lhs, sympy.floor) and cond.rhs.is_integer:
                p_, q_ = sympy.fraction(sympy.together(cond.lhs.args[0]))
                if q_.xreplace(self.relations).is_positive:
                    if isinstance(cond, sympy.Lt):
                        return self.proves(sympy.Lt(p_, q_ * cond.rhs), loops)
                    if cond.rhs == 0:
                        return self.proves(sympy.Ge(p_, 0), loops)
            # a >= b  <=>  min(a - b) >= 0; integers: a > b  <=>  a - b - 1 >= 0
            if isinstance(cond, (sympy.Ge, sympy.Gt)):
                diff = cond.lhs - cond.rhs
            else:
                diff = cond.rhs - cond.lhs
            if isinstance(cond, (sympy.Gt, sympy.Lt)):
                diff = diff - 1
            if not all(s.is_integer for s in diff.free_symbols):
                return False
            low = self._extreme(diff, True, loops)
            if low is None:
                return False
            return self._nonnegative(low)
        return False


def _facts(op: OpDef) -> Facts:
    """The facts of an op: its relations, and its derived dimensions computed from array
    sizes alone (``F = C*H*W``; the wrappers compute and check them). A dimension derived
    with attributes (``HO = (H - K)//S + 1``) is left out: the attributes' signs, which
    its bounds would rest on, are not checked at run time."""
    attrs = {op.symbols[a] for a in op.attrs}
    derived = {d: e for d, e in _sizes(op)[0] if not (sympy.sympify(e).free_symbols & attrs)}
    return Facts({op.symbols[d]: e for d, e in op.relations.items()}, derived)


def _provably_inside(e, size, loops: dict, guards: list[Guard], facts: Facts | None = None) -> bool:
    if e in loops:
        lo, hi = loops[e]
        lo_ok = lo == 0 or (isinstance(lo, sympy.Max) and 0 in lo.args)
        hi_ok = sympy.simplify(hi - size) == 0 or (isinstance(hi, sympy.Min) and any(sympy.simplify(a - size) == 0 for a in hi.args))
        if lo_ok and hi_ok:
            return True
    for g in guards:
        if g.kind == "range" and g.expr == e and g.lo == 0 and sympy.simplify(g.hi - size) == 0:
            return True
    if facts is not None and (facts.relations or facts.derived):
        inside = sympy.And(sympy.Ge(e, 0), sympy.Lt(e, size))
        if facts.proves(inside, loops):
            return True
        tight = facts.tightened(loops, guards)
        return tight != loops and facts.proves(inside, tight)
    return False


def wrap_reads(body, shapes, loops: dict, guards: list[Guard], facts: Facts | None = None):
    """Wrap every read that may fall outside its tensor in Piecewise((read, inside), (0, True))."""
    mapping = {}
    for read in sorted(body.atoms(sympy.Indexed), key=sympy.default_sort_key):
        shape = shapes.get(str(read.base))
        if shape is None:
            continue
        conds = []
        for e, size in zip(read.indices, shape):
            if not _provably_inside(e, size, loops, guards, facts):
                conds.append(sympy.And(sympy.Ge(e, 0), sympy.Lt(e, size)))
        if conds:
            mapping[read] = sympy.Piecewise((read, sympy.And(*conds)), (0, True))
    return body.xreplace(mapping) if mapping else body


def _statement_text(target, free, reduce, over, body):
    lhs = f"{target}[{', '.join(map(str, free))}]" if free else target
    text = sympy.sstr(body)
    if reduce != "none":
        text = f"{reduce}({text}, {', '.join(map(str, over))})"
    return f"{lhs} = {text}"


def lower(op: OpDef, stmts, backward, shapes, diff_args) -> ir.Program:
    shapes = dict(shapes)
    facts = _facts(op)
    forward = []
    intermediates = []
    for s in stmts:
        free = tuple(ir.Loop(i, sympy.S.Zero, s.ranges[i]) for i in s.free)
        over = tuple(ir.Loop(i, sympy.S.Zero, s.ranges[i]) for i in s.over)
        loops = {lp.index: (lp.lo, lp.hi) for lp in free + over}
        body = wrap_reads(s.body, shapes, loops, [], facts)
        argmax = backward.argmax.get(s.target, ())
        forward.append(ir.Assign(s.target, free, body, s.reduce, over, False, argmax, s.text))
        if s.target not in op.outputs:
            intermediates.append(ir.TensorDecl(s.target, shapes[s.target], "intermediate"))
        for name in argmax:
            intermediates.append(ir.TensorDecl(name, shapes[s.target], "intermediate", "int"))
            shapes[name] = shapes[s.target]
    seeds = tuple(ir.TensorDecl(grad_name(o), shapes[o], "seed") for o in op.outputs)
    for sd in seeds:
        shapes[sd.name] = sd.shape
    # gradient statements
    back = []
    written = set()
    grad_tensors = {}
    for t in backward.terms:
        shape = shapes[t.of]
        if t.scatter:
            if t.grad not in written:
                idx = tuple(sympy.Symbol(f"i{k}", integer=True) for k in range(len(shape)))
                back.append(ir.Assign(t.grad, tuple(ir.Loop(i, sympy.S.Zero, n) for i, n in zip(idx, shape)),
                                      sympy.S.Zero, equation=f"{t.grad} = 0"))
                written.add(t.grad)
            iter_loops = tuple(ir.Loop(i, lo, hi) for i, lo, hi in t.loops)
            over = tuple(ir.Loop(i, lo, hi) for i, lo, hi in t.scatter_over)
            loops = {lp.index: (lp.lo, lp.hi) for lp in iter_loops + over}
            body = wrap_reads(t.expr, shapes, loops, [], facts)
            inside = [sympy.And(sympy.Ge(a, 0), sympy.Lt(a, n)) for a, n in zip(t.scatter, shape)
                      if not _provably_inside(a, n, loops, [], facts)]
            where = sympy.And(*inside) if inside else sympy.true
            reduce = "sum" if over else "none"
            lhs = f"{t.grad}[{', '.join(map(str, t.scatter))}]"
            text = f"{lhs} += " + (f"sum({sympy.sstr(t.expr)}, {', '.join(str(lp.index) for lp in over)})" if over else sympy.sstr(t.expr))
            back.append(ir.Assign(t.grad, iter_loops, body, reduce, over, True, (), text + "  (scatter)",
                                  tuple(t.scatter), where))
            grad_tensors[t.grad] = shape
            continue
        free_loops = tuple(ir.Loop(i, sympy.S.Zero, size) for i, size in zip(t.free, shape))
        over = tuple(ir.Loop(i, lo, hi) for i, lo, hi in t.loops)
        loops = {lp.index: (lp.lo, lp.hi) for lp in free_loops + over}
        body = t.expr
        # guards the relations of `dims` prove true for every value of the loops are dropped
        conds = [c for g in t.guards for c in sympy.And.make_args(g.condition())]
        kept = [c for c in conds if not ((facts.relations or facts.derived) and facts.proves(c, loops))]
        if kept:
            body = sympy.Piecewise((body, sympy.And(*kept)), (0, True))
        body = wrap_reads(body, shapes, loops, t.guards, facts)
        reduce = "sum" if over else "none"
        accumulate = t.grad in written
        written.add(t.grad)
        text = _statement_text(t.grad, t.free, reduce, [lp.index for lp in over], t.expr)
        if accumulate:
            text = text.replace(" = ", " += ", 1)
        back.append(ir.Assign(t.grad, free_loops, body, reduce, over, accumulate, (), text))
        grad_tensors[t.grad] = shape
    grads = []
    for a in diff_args:
        g = grad_name(a)
        if g not in written:
            shape = shapes[a]
            idx = tuple(sympy.Symbol(f"i{k}", integer=True) for k in range(len(shape)))
            back.append(ir.Assign(g, tuple(ir.Loop(i, sympy.S.Zero, n) for i, n in zip(idx, shape)), sympy.S.Zero,
                                  equation=f"{g} = 0 (no path from {a} to an output)"))
        grads.append(ir.TensorDecl(g, shapes[a], "grad"))
    grad_names = {g.name for g in grads}
    grad_intermediates = tuple(
        ir.TensorDecl(n, s, "grad") for n, s in grad_tensors.items() if n not in grad_names
    )
    args = tuple(
        [ir.TensorDecl(n, shapes[n], "input", op.dtypes.get(n, "float")) for n in op.inputs]
        + [ir.TensorDecl(n, shapes[n], "param") for n in op.params]
    )
    outputs = tuple(ir.TensorDecl(n, shapes[n], "output") for n in op.outputs)
    dims = []
    for a in args:
        for d in a.shape:
            if isinstance(d, sympy.Symbol) and d not in dims and str(d) not in op.derived_dims:
                dims.append(d)
    derived, relations = _sizes(op)
    read_checks = _read_checks(op, Facts(facts.relations, dict(derived)))
    known = set(dims) | {d for d, _ in derived} | {op.symbols[a] for a in op.attrs}
    for t in outputs:
        for d in t.shape:
            missing = d.free_symbols - known
            if missing:
                raise SpecError(op.source, f"the size {sorted(map(str, missing))[0]} of output `{t.name}` is neither an argument's dimension nor given in `dims`")
    all_tensors = list(args) + list(outputs) + intermediates + list(seeds) + grads + list(grad_intermediates)
    scalars = tuple(t.name for t in all_tensors if t.rank == 0)
    attrs = tuple((op.symbols[a], v) for a, v in op.attrs.items())
    return ir.Program(
        name=op.name,
        kind=op.kind,
        source=op.source,
        dims=tuple(dims),
        derived_dims=derived,
        relations=relations,
        read_checks=read_checks,
        attrs=attrs,
        shorthands=tuple(op.shorthands.items()),
        args=args,
        outputs=outputs,
        intermediates=tuple(intermediates),
        forward=tuple(forward),
        seeds=seeds,
        grads=tuple(grads),
        grad_of=tuple(diff_args),
        grad_intermediates=grad_intermediates,
        backward=tuple(back),
        scalars=scalars,
        elementwise=op.kind == "activation",
        task=op.task if op.kind == "loss" else "",
        modes=tuple(sorted(op.modes.items())),
        doc=op.doc,
        attr_domains=attr_domains(op),
    )


def attr_domains(op: OpDef) -> tuple:
    """``Program.attr_domains`` of an op, in attribute order."""
    return tuple((a, d.table(), d.describe()) for a, d in op.attr_domains.items() if a in op.attrs)


def _index_extreme(e, lowest: bool, loops: dict):
    """The exact least or greatest value of an index expression over independent loops
    ``{i: extent}`` (each from 0), for sums of loop-free terms and terms ``c * i`` or
    ``c * floor(a / q)`` (a itself such a sum, q > 0), each loop index in one term only;
    None for anything else."""
    total = sympy.S.Zero
    seen = set()
    for term in sympy.Add.make_args(sympy.expand(e)):
        inner = term.free_symbols & set(loops)
        if not inner:
            total += term
            continue
        if inner & seen:
            return None
        seen |= inner
        coeff, rest = term.as_independent(*loops, as_Add=False)
        if coeff.is_positive:
            low = lowest
        elif coeff.is_negative:
            low = not lowest
        else:
            return None
        if rest in loops:
            value = sympy.S.Zero if low else loops[rest] - 1
        elif isinstance(rest, sympy.floor):
            p_, q_ = sympy.fraction(sympy.together(rest.args[0]))
            if not q_.is_positive or q_.free_symbols & set(loops):
                return None
            inner_value = _index_extreme(p_, low, loops)
            if inner_value is None:
                return None
            value = sympy.floor(inner_value / q_)
        else:
            return None
        total += coeff * value
    return total


def _offset(e: sympy.Expr, loops: set) -> sympy.Expr:
    """The part of index ``e`` that no loop index multiplies, looking through a floor
    division (``(l + P - k) // S``, a transposed convolution's read, has the offset P of
    its numerator: padding, like ``l + k - P``)."""
    if isinstance(e, sympy.floor):
        e = sympy.fraction(sympy.together(e.args[0]))[0]
    return sum((t for t in sympy.Add.make_args(sympy.expand(e)) if not t.free_symbols & loops), sympy.S.Zero)


def _read_checks(op: OpDef, facts: Facts) -> tuple:
    """The spec's reads that must stay inside their tensor for every value of the loops:
    an index built from loop indices and attributes, with no offset of its own and no
    loop over the axis's own size (``h // R`` with h over HQ on an axis of HK, ``h*S + p``
    with h over HO on an axis of H, ``k`` over an attribute K on an axis of N). An offset
    (``- P``, ``+ 1``) or a window around a position of the same axis (``x[b, i + k]``
    with i over that axis) is the spec's padding, read as zero outside. Those the relations of ``dims`` prove inside need nothing; the others
    are checked by the host wrappers against the actual sizes (grouped-query attention's
    R against the number of heads: a mismatch is an error, not a read of zeros). A read
    under a ``where`` whose condition keeps the index inside (``where(n < N1, x1[a, n],
    ...)``, a concatenation) needs nothing either: the branch is taken only there."""
    shapes = {n: op.shape_of(n) for n in list(op.inputs) + list(op.params) + list(op.outputs)}
    shapes.update(op.intermediates)
    sizes = set(op.symbols.values())
    checks = []
    for eq in op.equations:
        loops = dict(eq.ranges)
        guards = _guards_of_reads(eq.rhs)
        for read in sorted(eq.rhs.atoms(sympy.Indexed), key=sympy.default_sort_key):
            name = str(read.base)
            if name not in shapes or op.dtypes.get(name) == "int":
                continue
            for axis, (e, size) in enumerate(zip(read.indices, shapes[name])):
                if e in loops and sympy.simplify(loops[e] - size) == 0:
                    continue
                inner = e.free_symbols & set(loops)
                if not inner or e.atoms(sympy.Indexed) or (e.free_symbols - inner - sizes):
                    continue
                if _offset(e, set(loops)) != 0:
                    continue  # padding: a read outside is zero by the spec's rule
                if any(sympy.simplify(loops[i] - size) == 0 for i in inner):
                    continue  # a window around a position of this axis (x[b, i + k]): padding too
                bounds = {i: (sympy.S.Zero, loops[i]) for i in loops}
                if facts.proves(sympy.And(sympy.Ge(e, 0), sympy.Lt(e, size)), bounds):
                    continue
                least = _index_extreme(e, True, {i: loops[i] for i in inner})
                greatest = _index_extreme(e, False, {i: loops[i] for i in inner})
                if least is None or greatest is None:
                    continue
                if guards.get(read) is not None and _guard_bounds(guards[read], e, size, least):
                    continue  # read only where a condition keeps it inside
                extents = tuple(loops[i] for i in sorted(inner, key=str))
                checks.append((read, name, axis, least, greatest, size, extents))
    return tuple(checks)


def _guards_of_reads(expr) -> dict:
    """{read: the conditions under which it is evaluated}, for reads that appear under
    Piecewise branches only (a branch's own condition and the negations of the earlier
    ones); a read that also appears unguarded, or under different guards, maps to None."""
    found: dict = {}

    def walk(e, conds):
        if isinstance(e, sympy.Indexed):
            key = tuple(conds)
            found[e] = key if found.get(e, key) == key else None
            return
        if isinstance(e, sympy.Piecewise):
            earlier = []
            for value, cond in e.args:
                walk(value, conds + [cond] + [sympy.Not(c) for c in earlier])
                earlier.append(cond)
            return
        for arg in e.args:
            walk(arg, conds)

    walk(expr, [])
    return {r: (c if c else None) for r, c in found.items()}


def _guard_bounds(conds, e, size, least) -> bool:
    """Whether the guard conditions ``conds`` (with the index's least value ``least``)
    keep ``e`` inside [0, size): a condition that states e < size, or a stronger one."""
    def below(c):  # the expression d such that c says d < 0 (integers), or None
        if isinstance(c, sympy.StrictLessThan):
            return c.lhs - c.rhs
        if isinstance(c, sympy.StrictGreaterThan):
            return c.rhs - c.lhs
        if isinstance(c, sympy.LessThan):
            return c.lhs - c.rhs - 1
        if isinstance(c, sympy.GreaterThan):
            return c.rhs - c.lhs - 1
        return None

    atoms = []
    for c in conds:
        atoms.extend(c.args if isinstance(c, sympy.And) else [c])
    upper = False
    for c in atoms:
        d = below(c)
        if d is None:
            continue
        gap = sympy.expand(d - (e - size))  # c: e - size + gap < 0, so e < size when gap >= 0
        if gap.is_number and gap >= 0:
            upper = True
    return upper and bool(sympy.Ge(least, 0) == sympy.true)


def _sizes(op: OpDef):
    """The derived dimensions, in order, and the relations the wrappers check. A derived
    dimension that is a quotient (``H = "G / 2"``, or solved from ``G = "2*H"``) must be
    exact: it is computed with floor division and checked (``G = 2*H``), so that a size
    that does not divide is an error naming the spec, never a silent truncation."""
    derived, relations = [], []
    for d, e in op.relations.items():
        lhs = op.symbols[d]
        if not e.is_integer:  # H = G/4 between two bound sizes: checked as 4*H = G, in integers
            num, den = sympy.fraction(sympy.together(e))
            lhs, e = den * lhs, num
        note = f" ({op.relation_notes[d]})" if d in op.relation_notes else ""
        relations.append((lhs, e, f"{d} = {sympy.sstr(op.relations[d])}{note}"))
    for d, e in op.derived_dims.items():
        sym = op.symbols[d]
        if e.is_integer:
            derived.append((sym, e))
            continue
        num, den = sympy.fraction(sympy.together(e))
        if not (num.is_integer and den.is_integer):
            raise SpecError(op.source, f"the dimension {d} = {sympy.sstr(e)} in `dims` is not a whole number; sizes are integers (use // to round down)")
        derived.append((sym, sympy.floor(e)))
        fact = sympy.expand(num - den * sym)
        if not any(sympy.expand((l - r) - fact) == 0 or sympy.expand((l - r) + fact) == 0 for l, r, _ in relations):
            relations.append((num, den * sym, f"{d} = {sympy.sstr(e)}, an exact quotient"))
    return tuple(derived), tuple(relations)


def _build_optimizer(op: OpDef) -> ir.Program:
    """An optimizer's update lines as in-place statements, in order. ``p``, ``g``, the
    state and every temporary computed from a per-element value are arrays read at the
    element ``n`` (a temporary read only inside the step's loop becomes a local of the
    kernel, never an array); the scalar state and every temporary computed from
    hyperparameters, ``t`` and scalar state only are per-step scalars, updated once per
    step by a statement without loops."""
    n = ir.index("n")
    N = ir.dim("N")
    path = op.source
    elementwise = {"p", "g", *op.state}
    scalar = set(op.scalar_state)
    given = elementwise | scalar
    temps: dict[str, bool] = {}  # temporary -> per-element
    assigned = set()
    for k, eq in enumerate(op.equations):
        # a reduction over the whole parameter (``sum(p**2)``) is one number per step
        outside = eq.rhs.xreplace({r: sympy.Dummy() for r in eq.rhs.atoms(Reduce)})
        reads = {s.name for s in outside.free_symbols if isinstance(s, sympy.Symbol)}
        per_element = bool(reads & (elementwise | {t for t, e in temps.items() if e}))
        target = eq.target
        if target == "g":
            raise SpecError(path, "the gradient `g` cannot be assigned", eq.text)
        if target in scalar and per_element:
            raise SpecError(
                path,
                f"scalar state `{target}` is updated once per step, but this line reads per-element "
                f"values ({', '.join(sorted(reads & (elementwise | set(temps))))}); declare it in `state` "
                f"to keep one value per element",
                eq.text,
            )
        if target not in given:
            if target in temps and temps[target] != per_element:
                raise SpecError(path, f"temporary `{target}` was a per-step scalar and is now assigned a per-element value: use another name", eq.text)
            temps[target] = temps.get(target, per_element)
            # read as written (SymPy may have simplified a read away: where(1 > 2, c, 0))
            word = re.compile(r"\b%s\b" % re.escape(target))
            later = op.equations[k + 1:]
            if not any(target in {s.name for s in e.rhs.free_symbols} or word.search(e.text.split("=", 1)[-1])
                       for e in later):
                raise SpecError(
                    path,
                    f"`{target}` is assigned but no later line reads it: a temporary of the step must be "
                    f"used; if `{target}` is meant to be state, declare it in `state` (or `scalar_state`)",
                    eq.text,
                )
        assigned.add(target)
    never = [s for s in [*op.state, *op.scalar_state] if s not in assigned]
    if never:
        raise SpecError(path, f"state `{never[0]}` is declared but no update line assigns it")
    arrays = elementwise | {t for t, e in temps.items() if e}
    mapping = {sympy.Symbol(k, real=True): sympy.IndexedBase(k, real=True)[n] for k in sorted(arrays)}
    steps, reduced = [], []
    taken = set(arrays) | set(scalar) | set(temps) | {str(h) for h in op.symbols}
    for eq in op.equations:
        rhs = eq.rhs
        for r in sorted(rhs.atoms(Reduce), key=sympy.default_sort_key):
            # lifted into a per-step scalar computed by its own loop over every element
            name = next(f"{eq.target}_{r.kind}{j}" for j in range(len(taken) + 1) if f"{eq.target}_{r.kind}{j}" not in taken)
            taken.add(name)
            reduce = "sum" if r.kind == "mean" else r.kind
            total = sympy.Symbol(name, real=True)
            steps.append(ir.Assign(name, (), r.body.xreplace(mapping), reduce=reduce, over=(ir.Loop(n, sympy.S.Zero, N),),
                                   equation=f"{name} = {r.kind}({sympy.sstr(r.body)}) over every element (in `{eq.text}`)"))
            rhs = rhs.xreplace({r: total / N if r.kind == "mean" else total})
            reduced.append(name)
        body = rhs.xreplace(mapping)
        loops = (ir.Loop(n, sympy.S.Zero, N),) if eq.target in arrays else ()
        steps.append(ir.Assign(eq.target, loops, body, equation=eq.text))
    args = (ir.TensorDecl("p", (N,), "param"), ir.TensorDecl("g", (N,), "input"))
    state = tuple(ir.TensorDecl(s, (N,), "state") for s in op.state)
    state += tuple(ir.TensorDecl(s, (), "state") for s in op.scalar_state)
    locals_ = tuple(ir.TensorDecl(t, (N,) if e else (), "intermediate") for t, e in temps.items())
    locals_ += tuple(ir.TensorDecl(t, (), "intermediate") for t in reduced)
    scalars = tuple(op.scalar_state) + tuple(t for t, e in temps.items() if not e) + tuple(reduced)
    attrs = tuple((op.symbols[h], v) for h, v in op.hyper.items())
    program = ir.Program(
        name=op.name, kind="optimizer", source=op.source, dims=(N,), derived_dims=(), attrs=attrs,
        args=args, outputs=(), intermediates=state + locals_, scalars=scalars,
        state=tuple(op.state) + tuple(op.scalar_state), state_init=tuple(op.scalar_state.items()),
        step=tuple(steps), step_counter=op.symbols["t"], doc=op.doc,
    )
    blocks = optimizer_blocks(op)
    return _replace(program, latex=render_tex(blocks), extra={"blocks": blocks})


def _build_schedule(op: OpDef) -> ir.Program:
    attrs = tuple((op.symbols[h], v) for h, v in op.hyper.items())
    step = (ir.Assign("lr", (), op.expr, equation=f"lr_t = {op.expr_text}"),)
    program = ir.Program(
        name=op.name, kind="schedule", source=op.source, dims=(), derived_dims=(), attrs=attrs,
        args=(), outputs=(), step=step, step_counter=op.symbols["t"], doc=op.doc,
    )
    blocks = schedule_blocks(op)
    return _replace(program, latex=render_tex(blocks), extra={"blocks": blocks})
