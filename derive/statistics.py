"""Gradients of statistics, substituted into their consumer and re-expressed.

A *statistic* is a tensor with fewer indices than the tensors it is broadcast against
(a row's mean, its reciprocal standard deviation, a log-sum-exp). The chain rule makes
its gradient a reduction, ``g_S[o] = sum_r body``, which an elementwise gradient (the
*consumer*, e.g. ``g_x[o, r]``) then reads. When the consumer is the only reader,
materialising ``g_S`` is a detour of the chain rule: the pieces it split apart share
factors, and recombined they give the compact textbook backward (layer norm's
``rstd (ghat - mean(ghat) - xhat mean(ghat xhat))``). Per consumer, the pass

1. *substitutes* each such ``g_S`` read by its defining sum, over primed indices;
2. *pulls out* of each sum the factors free of its indices;
3. *reuses the forward across the sums*: a product of factors equal to the body of an
   elementwise forward statement becomes a read of its result, on either side of a sum,
   taking powers apart (``(x - mean) rstd^3 (x' - mean) -> xhat xhat' rstd``);
4. *collects* the consumer's common factors (``rstd``);
5. *names the remaining sums*: each becomes a reduction ``g_x_sum<k>[o]`` computed
   once (constant factors and signs stay in the consumer, equal sums are one sum, and
   a sum the backward already computes, such as batch norm's ``g_bias``, is read).

Every step is an identity. The result replaces what it came from only when it costs no
more operations, and every step is recorded (``Backward.rewrites``) for the derivation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import sympy

from .differentiate import Term, read_of
from .latex import tex, tex_name
from .normalize import Stmt
from .simplify import cost, powers, reuse_forward, reuse_in_product
from .terms import fresh_index, is_full_sum, split_factors


@dataclass
class Rewrite:
    """One recorded step: a caption and equations ``lhs[free] = expr`` (sums as ``sympy.Sum``)."""

    caption: str
    equations: list[tuple[str, tuple, sympy.Expr]] = field(default_factory=list)


@dataclass
class _Sum:
    """``sum_{loops} inner``, standing in the consumer as a placeholder symbol."""

    inner: sympy.Expr
    loops: tuple[tuple[sympy.Symbol, sympy.Expr], ...]  # (primed index, range)
    term: Term  # the statistic's gradient term it came from
    idx: tuple  # the statistic's indices where the consumer reads it

    def display(self):
        return sympy.Sum(self.inner, *[(i, 0, hi - 1) for i, hi in self.loops])


def _reads(expr, name):
    """Reads of tensor ``name`` in ``expr``: ``name[...]``, or the symbol of a scalar."""
    out = set()

    def visit(e):
        if isinstance(e, sympy.Indexed):
            if str(e.base) == name:
                out.add(e)
        elif isinstance(e, sympy.Symbol):
            if e.name == name:
                out.add(e)
        else:
            for a in e.args:
                visit(a)

    visit(expr)
    return sorted(out, key=sympy.default_sort_key)


def _statistics_of(consumer: Term, terms: list[Term], returned: set[str]) -> list[list[Term]]:
    """The gradients of statistics that ``consumer`` alone reads, as their terms."""
    groups: dict[str, list[Term]] = {}
    for t in terms:
        groups.setdefault(t.grad, []).append(t)
    found = []
    for g, group in groups.items():
        if g == consumer.grad or g in returned or not all(is_full_sum(t) for t in group):
            continue
        reads = _reads(consumer.expr, g)
        if not reads or len(group[0].free) >= len(consumer.free):
            continue
        if any(not all(isinstance(i, sympy.Symbol) for i in getattr(r, "indices", ()))
               or len(set(getattr(r, "indices", ()))) != len(getattr(r, "indices", ())) for r in reads):
            continue  # read at plain, distinct indices only
        if any(t is not consumer and _reads(t.expr, g) for t in terms):
            continue
        found.append(group)
    return found


# ---------------------------------------------------------------------------
# The pass


def substitute_statistics(backward, stmts: list[Stmt], shapes: dict, returned: set[str]) -> None:
    """Rewrite, in place, every consumer of statistics' gradients (see the module doc).
    ``returned``: the gradient names the op returns (never substituted away)."""
    for consumer in list(backward.terms):
        if not consumer.elementwise:
            continue
        groups = _statistics_of(consumer, backward.terms, returned)
        if groups:
            _Rewriter(consumer, groups, backward, stmts, shapes).run()


def _primed(loop_idx, taken):
    out = {}
    for i in loop_idx:
        name = f"{i}'"
        while name in taken:
            name += "'"
        out[i] = sympy.Symbol(name, integer=True)
    return out


class _Rewriter:
    def __init__(self, consumer: Term, groups: list[list[Term]], backward, stmts, shapes):
        self.consumer, self.groups, self.backward = consumer, groups, backward
        self.stmts, self.shapes = stmts, shapes
        self.sums: dict[sympy.Symbol, _Sum] = {}
        self.steps: list[Rewrite] = []

    def show(self, expr):
        """``expr`` with its placeholders written as the sums they stand for."""
        return expr.xreplace({p: s.display() for p, s in self.sums.items()})

    def record(self, caption, expr):
        """A step showing the consumer as ``expr``; none when it reads as the last one did."""
        c = self.consumer
        shown = self.show(expr)
        if self.steps and self.steps[-1].equations[-1][2] == shown:
            return
        self.steps.append(Rewrite(caption, [(c.grad, c.free, shown)]))

    def run(self) -> None:
        c = self.consumer
        expr = self.substitute()
        # the consumer is linear in the gradients it read, so in every placeholder
        rest = expr.xreplace({p: sympy.S.Zero for p in self.sums})  # a SymPy zero: xreplace of a bare placeholder returns the value itself
        coeffs = {p: sympy.factor_terms(sympy.diff(expr, p)) for p in self.sums}
        if any(coeffs[p].has(*self.sums) for p in coeffs):
            return  # not affine in the gradients read (cannot happen for a chain rule; kept as a guard)
        reused, split = self.reuse_across(coeffs)
        rest = reuse_forward(rest, self.stmts)
        if reused:
            what = ", ".join(f"${_tex_name(n)}$" for n in reused)
            how = ""
            if split:
                how = " (taking %s apart)" % ", ".join(f"${tex(p)} = {tex(p.base)}\\,{tex(p.base ** (p.exp - 1))}$"
                                                       for p in split)
            self.record(f"Reuse the forward's {what} on both sides of the sums{how}:",
                        rest + sum(coeffs[p] * p for p in self.sums))
        for p, s in self.sums.items():  # numbers and signs stay outside
            number, s.inner = s.inner.as_coeff_Mul()
            coeffs[p] *= number
        coeffs = self.merge_equal(coeffs)
        combined = rest + sum(coeffs[p] * p for p in coeffs)
        candidates = [combined, sympy.factor_terms(combined)]
        if sympy.count_ops(combined) < 80:
            candidates.append(sympy.factor_terms(sympy.expand(combined)))
        compact = min(candidates, key=cost)
        common = [f for f in sympy.Mul.make_args(compact) if not f.is_Add and not f.is_Number and not f.has(*self.sums)]
        if compact.is_Mul and common and any(f.is_Add for f in compact.args):
            self.record("Collect the common factor $%s$:" % tex(sympy.Mul(*common)), compact)
        reads, new_terms, shared, shapes = self.lift(list(coeffs))
        if reads is None:
            return
        new_expr = compact.xreplace(reads)
        after = sum(cost(t.expr)[0] for t in new_terms) + cost(new_expr)[0]
        before = sum(cost(t.expr)[0] for g in self.groups for t in g) + cost(c.expr)[0]
        if after > before:
            return
        if new_terms:
            naming = Rewrite("Name the remaining sum%s, computed once rather than per element:"
                             % ("s" if len(new_terms) > 1 else ""))
            for t in new_terms:
                naming.equations.append((t.grad, t.free, _sum_of(t)))
            self.steps.append(naming)
        if shared:
            known = ", ".join(f"${_tex_name(u.grad)}$" for _, u in shared)
            many = len(shared) > 1
            caption = (f"The {'other ' if new_terms else ''}remaining sum{'s are' if many else ' is'} {known}, "
                       f"which the backward already computes; {'they are' if many else 'it is'} read, "
                       "not computed again:")
            self.steps.append(Rewrite(caption, [(u.grad, u.free, _sum_of(u)) for _, u in shared]))
        self.steps.append(Rewrite("The compact form:", [(c.grad, c.free, new_expr)]))
        # commit
        for group in self.groups:
            for t in group:
                self.backward.terms.remove(t)
        at = self.backward.terms.index(c)
        self.backward.terms[at:at] = new_terms
        self.shapes.update(shapes)
        c.expr = new_expr
        self.backward.rewrites.extend(self.steps)
        self.backward.named_sums.extend(t.grad for t in new_terms)

    # --------------------------------------------------------------- steps
    def substitute(self):
        c = self.consumer
        taken = {str(s) for s in c.expr.free_symbols} | {str(i) for i in c.free}
        replaced, shown = {}, {}
        for group in self.groups:
            for read in _reads(c.expr, group[0].grad):
                idx = tuple(read.indices) if isinstance(read, sympy.Indexed) else ()
                total, display = sympy.S.Zero, sympy.S.Zero
                for t in group:
                    primes = _primed([i for i, _, _ in t.loops], taken)
                    body = t.expr.xreplace({**dict(zip(t.free, idx)), **primes})
                    loops = tuple((primes[i], hi) for i, _, hi in t.loops)
                    outside, inside = split_factors(body, list(primes.values()))
                    p = sympy.Symbol(f"_S{len(self.sums)}", real=True)
                    while p.name in taken:
                        p = sympy.Symbol(p.name + "_", real=True)
                    self.sums[p] = _Sum(inside, loops, t, idx)
                    display += sympy.Sum(body, *[(i, 0, hi - 1) for i, hi in loops])
                    total += outside * p
                replaced[read], shown[read] = total, display
        names = ", ".join(f"${_tex_name(g[0].of, bar=True)}$" for g in self.groups)
        what = ("the gradients of the statistics %s, reductions" if len(self.groups) > 1
                else "the gradient of the statistic %s, a reduction") % names
        self.steps.append(Rewrite(f"${_tex_name(c.grad)}$ reads {what} read nowhere else{self.powers_note(c.expr)}:",
                                  [(c.grad, c.free, c.expr)]))
        self.steps.append(Rewrite(f"Substitute {'them' if len(self.groups) > 1 else 'it'} as the sum"
                                  f"{'s' if len(self.groups) > 1 else ''} over primed indices:",
                                  [(c.grad, c.free, c.expr.xreplace(shown))]))
        expr = c.expr.xreplace(replaced)
        self.record("Move the factors free of the summation indices out of the sum%s:"
                    % ("s" if len(self.sums) > 1 else ""), expr)
        return expr

    def powers_note(self, expr) -> str:
        """Powers of a forward power statement's result in ``expr``, written out: the
        simplifier's power reuse (``(eps + var)^{-3/2} = rstd^3``) made them."""
        powers = {s.target: s for s in self.stmts if s.reduce == "none" and s.free and isinstance(s.body, sympy.Pow)}
        found = []
        for f in sorted(expr.atoms(sympy.Pow), key=sympy.default_sort_key):
            if isinstance(f.base, sympy.Indexed) and str(f.base.base) in powers and f.exp.is_Number and f.exp != 1:
                s = powers[str(f.base.base)]
                body = s.body.xreplace(dict(zip(s.free, f.base.indices)))
                found.append(f"${tex(f)} = {tex(body.base ** (body.exp * f.exp))}$")
        return " (with %s from the forward)" % ", ".join(found) if found else ""

    def reuse_across(self, coeffs):
        """Forward reuse in each ``coefficient * summand``, split again at the sum; returns
        the forward tensors reused and the powers taken apart to do it."""
        reused, split = set(), set()
        for p, s in self.sums.items():
            before = coeffs[p] * s.inner
            product = reuse_in_product(before, self.stmts)
            if product == before:
                continue
            reused |= {str(r.base) for r in product.atoms(sympy.Indexed)} - {
                str(r.base) for r in before.atoms(sympy.Indexed)}
            _, had = powers(before)
            _, has = powers(product)
            split |= {b ** e for b, e in had.items() if e.is_Number and abs(e) > 1 and has.get(b, 0) != e}
            coeffs[p], s.inner = split_factors(product, [i for i, _ in s.loops])
        return sorted(reused), sorted(split, key=sympy.default_sort_key)

    def merge_equal(self, coeffs):
        kept: dict = {}
        out = {}
        for p, s in self.sums.items():
            key = (s.inner, s.loops, s.idx)
            if key in kept:
                out[kept[key]] += coeffs[p]
            else:
                kept[key] = p
                out[p] = coeffs[p]
        self.sums = {p: self.sums[p] for p in out}
        return out

    def lift(self, placeholders):
        """Each sum as a reduction term, or a read of an equal one the backward computes."""
        c = self.consumer
        taken = set(self.shapes) | {s.target for s in self.stmts} | {t.grad for t in self.backward.terms}
        reads, new_terms, shared, shapes = {}, [], [], {}
        for p in placeholders:
            s = self.sums[p]
            if any(i in c.free and i not in s.idx for i in s.inner.free_symbols):
                return None, None, None, None  # the sum would depend on more than the statistic's indices
            names = {str(i) for i in s.idx}
            loops, rename = [], {}
            for (primed, hi), (orig, _, _) in zip(s.loops, s.term.loops):
                new = orig if str(orig) not in names else fresh_index(str(orig), names)
                names.add(str(new))
                rename[primed] = new
                loops.append((new, sympy.S.Zero, hi))
            body = s.inner.xreplace(rename)
            existing = self.existing_sum(body, loops, s)
            if existing is not None:
                u, read = existing
                reads[p] = read
                shared.append((p, u))
                continue
            k = len(self.backward.named_sums) + len(new_terms)
            while f"{c.grad}_sum{k}" in taken:
                k += 1
            name = f"{c.grad}_sum{k}"
            taken.add(name)
            new_terms.append(Term(name, name, s.idx, loops, [], body, s.term.stmt, read_of(name, s.idx)))
            shapes[name] = self.shapes[s.term.of]
            reads[p] = read_of(name, s.idx)
        return reads, new_terms, shared, shapes

    def existing_sum(self, body, loops, s):
        """A reduction term before the consumer that computes exactly this sum."""
        terms = self.backward.terms
        stop = terms.index(self.consumer)
        removed = {t.grad for g in self.groups for t in g}
        writers: dict[str, int] = {}
        for t in terms:
            writers[t.grad] = writers.get(t.grad, 0) + 1
        for u in terms[:stop]:
            if u.grad in removed or writers[u.grad] != 1 or not is_full_sum(u) or len(u.loops) != len(loops):
                continue
            if len(u.free) != len(s.idx) or tuple(self.shapes.get(u.of, ())) != tuple(self.shapes.get(s.term.of, ())):
                continue
            for perm in itertools.permutations(loops):
                if any(hi != uhi for (_, _, hi), (_, _, uhi) in zip(perm, u.loops)):
                    continue
                mapping = {**dict(zip(u.free, s.idx)), **{ui: i for (ui, _, _), (i, _, _) in zip(u.loops, perm)}}
                if u.expr.xreplace(mapping) == body:
                    return u, read_of(u.grad, s.idx)
        return None


def _sum_of(t: Term):
    return sympy.Sum(t.expr, *[(i, 0, hi - 1) for i, _, hi in t.loops])


def _tex_name(name, bar=False):
    return tex_name(("g_" + name) if bar else name)
