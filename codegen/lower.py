"""Lowering: a sequence of :class:`derive.ir.Assign` statements to kernels.

Target independent. A :class:`Kernel` is one loop nest over shared free loops holding
one or more :class:`Item` statements (a fused group); the printers and templates turn
it into an ``@njit`` function (CPU) or a ``@cuda.jit`` kernel (CUDA).

What happens here, in order:

1. Dead statements are dropped (backward reruns forward; only what the gradients need
   is kept).
2. Statements are grouped. Consecutive statements over the same free loops (up to
   renaming of the loop indices) join one group when every read of a tensor the group
   already wrote is at the group's own free index, so one loop iteration computes one
   element of everything in the group. Reductions join too (each keeps its own inner
   loop). A statement of matrix-product shape (GEMM) starts a group of its own, which
   only elementwise statements (its epilogue) may join.
3. A tensor written and read only inside one group, and not returned, becomes a scalar
   local of the loop body (no array is allocated for it).
4. Loop-invariant float subexpressions (``lr / (1 - beta1**t)``) become constants
   ``_c0, _c1, ...`` computed once before the loops.
5. Each item's expression is CSE'd (``sympy.cse``, ``order='canonical'``, temporaries
   ``_t0, _t1, ...`` numbered per kernel in order). Inside a ``Piecewise`` CSE shares
   only what is safe to compute before it: float values that are evaluated anyway or
   can neither raise (the CUDA simulator runs plain Python) nor read what a guard
   protects (see Lowerer._speculable); a guard's branches are never looked into. A
   padded read that SymPy folded out of a condition (once per subset of such reads)
   becomes one temporary again (Lowerer._unfold).
6. A GEMM writes straight into an output array of its group when nothing reads that
   array's old content (no temporary; no loop at all without an epilogue).
7. With ``contract=True`` (the CPU), any other sum of a product of two operands
   (batched matrix products, convolutions through a gathered patch matrix, windowed
   gathers rewritten as scatters) becomes a :class:`codegen.contract.Contraction`:
   BLAS products per batch element; its group takes elementwise epilogue statements
   over the same loops in any order. See codegen/contract.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import sympy

from derive.ir import Assign, Loop, Program, TensorDecl

from . import contract as cn
from .printers import RESERVED_NAMES, CPUPrinter

DOT = sympy.Symbol("_dot")

#: Functions that return a finite or NaN value for every argument without raising, in
#: Numba and in plain Python (the CUDA simulator): see Lowerer._total.
TOTAL_FUNCTIONS = frozenset({"tanh", "atan", "asinh", "erf", "erfc", "sigmoid", "softplus"})


def _moved(cond):
    """``cond`` with every comparison written as ``difference < 0`` (``<=``, ``==``, ``!=``),
    the difference expanded: SymPy writes one comparison differently depending on how it
    was built (``t - 1 <= s`` against ``t <= s + 1``)."""
    rep = {}
    for r in cond.atoms(sympy.core.relational.Relational):
        if isinstance(r, (sympy.StrictGreaterThan, sympy.GreaterThan)):
            d, kind = sympy.expand(r.rhs - r.lhs), (sympy.StrictLessThan if r.rel_op == ">" else sympy.LessThan)
        else:
            d, kind = sympy.expand(r.lhs - r.rhs), type(r)
        if kind in (sympy.Eq, sympy.Ne) and d.could_extract_minus_sign():
            d = -d
        rep[r] = kind(d, 0, evaluate=False)
    return cond.xreplace(rep)


# --------------------------------------------------------------------------- plan types
@dataclass
class Temp:
    sym: sympy.Symbol
    expr: sympy.Expr


@dataclass
class Item:
    """One statement inside a kernel's loop body.

    The statement's value ends up in the scalar ``local``; ``store`` says whether it is
    also written to ``target[index]``. For reductions ``init`` starts the accumulator,
    the reduction loops ``over`` run ``inner`` temporaries and fold ``value`` into it,
    and ``finish`` (if any) is assigned to the local after the loops.
    """

    target: str
    index: tuple
    reduce: str
    value: sympy.Expr
    local: sympy.Symbol
    store: bool
    equation: str
    over: tuple = ()
    init: sympy.Expr | None = None
    finish: sympy.Expr | None = None
    pre: list = field(default_factory=list)
    inner: list = field(default_factory=list)
    argmax: list = field(default_factory=list)  # (tensor, over index, local, store)
    is_int: bool = False
    scatter: tuple = ()  # target[scatter] += local (where ``where`` holds)
    where: sympy.Expr = sympy.true


@dataclass
class Gemm:
    """``_dot[f0, f1] = sum_k left[.., ..] * right[.., ..]``; operands as 2-D arrays,
    transposed (``.T``) where the read's index order is (k, f0) or (f1, k)."""

    left: str
    left_t: bool
    right: str
    right_t: bool
    m: sympy.Expr
    n: sympy.Expr
    k: sympy.Expr
    out: str | None = None  # an output array np.dot may write directly (CPU)
    direct: bool = False  # the kernel is only that np.dot: no epilogue loop


@dataclass
class Kernel:
    name: str
    free: tuple  # Loops
    items: list
    gemm: Gemm | None
    arrays: list  # array argument names, in program order
    symbols: list  # size/attribute symbols, sorted by name
    float_source: str  # array whose dtype defines _F
    equations: list
    temps: int = 0
    consts: list = field(default_factory=list)  # loop-invariant values, kernel prologue
    contract: cn.Contraction | None = None  # CPU lowering of a contraction (else loops)
    # the free loops a target may run in parallel (one worker per point of them); the
    # others run in order inside each worker (:func:`parallel_nest`). None: any of them,
    # every iteration writes elements of its own. See :func:`exclusive_loops`.
    parallel: tuple | None = None


@dataclass
class Group:
    free: tuple
    statements: list  # renamed Assigns
    gemm: Gemm | None = None
    contract: cn.Match | None = None


# --------------------------------------------------------------------------- helpers
def tensor_decls(program: Program) -> list[TensorDecl]:
    """All tensors of a program, including optimizer state, in declaration order."""
    decls = list(program.all_tensors())
    names = {d.name for d in decls}
    extra = program.extra.get("state_decls", ()) if isinstance(program.extra, dict) else ()
    for d in extra:
        if d.name not in names:
            decls.append(d)
            names.add(d.name)
    if program.state:
        like = decls[0] if decls else None
        for s in program.state:
            if s not in names and like is not None:
                decls.append(TensorDecl(s, like.shape, "state", "float"))
                names.add(s)
    return decls


def decl_of(program: Program, name: str) -> TensorDecl:
    for d in tensor_decls(program):
        if d.name == name:
            return d
    raise KeyError("%s: no tensor named %r" % (program.name, name))


def reads_of(expr) -> list:
    """Tensor reads (``Indexed``) in ``expr``, sorted deterministically."""
    return sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key)


def read_names(stmt: Assign, scalars) -> set:
    names = set()
    exprs = [stmt.body] + [l.lo for l in stmt.over + stmt.free] + [l.hi for l in stmt.over + stmt.free]
    exprs += list(stmt.scatter) + [stmt.where]
    for e in exprs:
        e = sympy.sympify(e)
        names.update(r.base.label.name for r in e.atoms(sympy.Indexed))
        names.update(s.name for s in e.free_symbols if isinstance(s, sympy.Symbol) and s.name in scalars)
    if stmt.accumulate:
        names.add(stmt.target)
    return names


def written_names(stmt: Assign) -> list:
    return [stmt.target] + list(stmt.argmax)


def target_index(stmt: Assign) -> tuple:
    return tuple(l.index for l in stmt.free)


def rename_assign(stmt: Assign, mapping: dict) -> Assign:
    if not mapping:
        return stmt

    def sub(e):
        return sympy.sympify(e).xreplace(mapping)

    return Assign(
        target=stmt.target,
        free=tuple(Loop(mapping.get(l.index, l.index), sub(l.lo), sub(l.hi)) for l in stmt.free),
        body=sub(stmt.body),
        reduce=stmt.reduce,
        over=tuple(Loop(l.index, sub(l.lo), sub(l.hi)) for l in stmt.over),
        accumulate=stmt.accumulate,
        argmax=stmt.argmax,
        equation=stmt.equation,
        scatter=tuple(sub(e) for e in stmt.scatter),
        where=sub(stmt.where),
    )


def safe_index_names(program: Program) -> Program:
    """``program`` with every loop index renamed whose name the generated module binds
    for something else (``np``, ``math``, a keyword or builtin: RESERVED_NAMES).
    Indices are the kernels' own loop variables, so renaming them changes nothing
    outside; they are named by the spec's author or by derive, which names a gradient's
    new index after its dimension in lower case (a dimension NP gives ``np``)."""
    statements = program.forward + program.backward + program.step
    indices = []
    for s in statements:
        for l in s.free + s.over:
            if l.index not in indices:
                indices.append(l.index)
    clashing = [i for i in indices if i.name in RESERVED_NAMES]
    if not clashing:
        return program
    taken = {str(s) for s in sympy.Tuple(*(s.body for s in statements)).free_symbols}
    taken |= {i.name for i in indices} | {d.name for d in tensor_decls(program)}
    mapping = {i: cn.fresh_index(i.name + "_", taken) for i in clashing}

    def rename(stmt: Assign) -> Assign:
        renamed = rename_assign(stmt, mapping)
        over = tuple(Loop(mapping.get(l.index, l.index), l.lo, l.hi) for l in renamed.over)
        return dataclasses.replace(renamed, over=over)

    return dataclasses.replace(
        program,
        forward=tuple(rename(s) for s in program.forward),
        backward=tuple(rename(s) for s in program.backward),
        step=tuple(rename(s) for s in program.step),
    )


def match_loops_any_order(group_free: tuple, free: tuple):
    """``{}`` when ``free`` is ``group_free`` in another order (same indices, same
    bounds), else None."""
    if len(group_free) != len(free) or {l.index for l in free} != {g.index for g in group_free}:
        return None
    by_index = {g.index: g for g in group_free}
    for l in free:
        g = by_index[l.index]
        if sympy.sympify(l.lo) != g.lo or sympy.sympify(l.hi) != g.hi:
            return None
    return {}


def match_loops(group_free: tuple, free: tuple):
    """Index renaming that makes ``free`` identical to ``group_free``, or None."""
    if len(group_free) != len(free):
        return None
    mapping = {}
    for g, f in zip(group_free, free):
        if f.index != g.index:
            mapping[f.index] = g.index
        if sympy.sympify(f.lo).xreplace(mapping) != g.lo or sympy.sympify(f.hi).xreplace(mapping) != g.hi:
            return None
    return mapping


def equation_text(stmt: Assign) -> str:
    if stmt.equation:
        return stmt.equation
    idx = ", ".join(str(l.index) for l in stmt.free)
    lhs = "%s[%s]" % (stmt.target, idx) if idx else stmt.target
    op = "+=" if stmt.accumulate else "="
    body = str(stmt.body)
    if stmt.reduce != "none":
        body = "%s(%s, %s)" % (stmt.reduce, body, ", ".join(str(l.index) for l in stmt.over))
    return "%s %s %s" % (lhs, op, body)


def exclusive_loops(stmt: Assign) -> tuple:
    """The free loops of a scatter ``target[a(o)] += value(o)`` that may run in parallel
    without an atomic add: those that index the destination as plain indices.

    Several iterations of a scatter may add to one element (``table[idx[b], d]`` with a
    repeated ``idx[b]``). Two iterations that differ in a loop ``d`` standing alone in
    the destination's index write different elements, so those loops may run in
    parallel; the loops reached only through other index expressions (``b`` through
    ``idx[b]``, a map the derivation could not invert into a gather) run in order
    inside each worker, in their loop order. Every element then has exactly one
    writer, which adds its contributions in a fixed order: the sum is the same, bit for
    bit, on every run, with plain ``+=`` and no atomics (floating-point atomics add in
    whatever order the threads arrive, so their results change from run to run).

    The price is parallelism: the scatter runs on as many workers as the plain
    destination loops have points (embedding's backward: D workers, each walking the
    whole batch), not one per iteration. A scatter with no plain destination index runs
    in one worker, sequentially: correct and deterministic, and slow on a GPU. Grouping
    the indices first (sort the batch by ``idx[b]``, then one worker per distinct row
    and column summing its group in order) would give a worker per written element; it
    needs a sort on the device per call and is not done here: embedding's backward is
    small beside the layers around it. A loop whose bounds depend on another free index
    is kept in order too. The CPU runs every loop in one worker anyway, in the
    statement's order (which keeps its memory walk: batch outer, row inner)."""
    indices = {l.index for l in stmt.free}
    plain = {e for e in stmt.scatter if isinstance(e, sympy.Symbol)}

    def independent(l):
        return not ((sympy.sympify(l.lo).free_symbols | sympy.sympify(l.hi).free_symbols) & indices)

    return tuple(l.index for l in stmt.free if l.index in plain and independent(l))


def parallel_nest(kernel: Kernel) -> tuple:
    """The kernel's free loops in the order a parallel target nests them: the loops it
    may run in parallel (``kernel.parallel``) first, then the others in their order."""
    if kernel.parallel is None:
        return tuple(kernel.free)
    lead = tuple(l for l in kernel.free if l.index in kernel.parallel)
    return lead + tuple(l for l in kernel.free if l.index not in kernel.parallel)


# --------------------------------------------------------------------------- GEMM
def match_gemm(program: Program, stmt: Assign) -> Gemm | None:
    """A GEMM-shaped sum: ``t[i,j] (+)= c * sum_k A[i,k] B[k,j]`` (any read order), full
    ranges, 2-D float operands; ``c`` free of ``k``."""
    if stmt.reduce != "sum" or len(stmt.over) != 1 or len(stmt.free) != 2 or stmt.scatter:
        return None
    (k,) = stmt.over
    f0, f1 = stmt.free
    if any(l.lo != 0 for l in (k, f0, f1)) or f0.index == f1.index:
        return None
    reads = []
    for factor in sympy.Mul.make_args(stmt.body):
        if isinstance(factor, sympy.Indexed) and k.index in factor.free_symbols:
            reads.append(factor)
        elif k.index in factor.free_symbols:
            return None
    if len(reads) != 2:
        return None
    ops = {}
    for r in reads:
        try:
            d = decl_of(program, r.base.label.name)
        except KeyError:
            return None
        if d.rank != 2 or d.dtype != "float" or len(r.indices) != 2:
            return None
        idx = tuple(r.indices)
        for f, pos_name in ((f0.index, "left"), (f1.index, "right")):
            if set(idx) == {f, k.index} and pos_name not in ops:
                ops[pos_name] = (r, d, idx)
                break
        else:
            return None
    if len(ops) != 2:
        return None
    (lr, ld, lidx), (rr, rd, ridx) = ops["left"], ops["right"]
    # full ranges: every loop covers the operand's dimension
    if ld.shape[lidx.index(f0.index)] != f0.hi or ld.shape[lidx.index(k.index)] != k.hi:
        return None
    if rd.shape[ridx.index(f1.index)] != f1.hi or rd.shape[ridx.index(k.index)] != k.hi:
        return None
    return Gemm(
        left=ld.name,
        left_t=lidx != (f0.index, k.index),
        right=rd.name,
        right_t=ridx != (k.index, f1.index),
        m=f0.hi,
        n=f1.hi,
        k=k.hi,
    )


def gemm_scale(stmt: Assign) -> sympy.Expr:
    (k,) = stmt.over
    return sympy.Mul(*[f for f in sympy.Mul.make_args(stmt.body) if k.index not in f.free_symbols])


# --------------------------------------------------------------------------- lowering
class Lowerer:
    """Lowers statement sequences of one program."""

    def __init__(self, program: Program, contract: bool = False):
        self.program = program
        self.contract = contract
        self.decls = {d.name: d for d in tensor_decls(program)}
        self.scalars = set(program.scalars)
        int_syms = {d.name for d in program.dims}
        int_syms |= {d.name for d, _ in program.derived_dims}
        int_syms |= {a.name for a, v in program.attrs if isinstance(v, int) and not isinstance(v, bool)}
        if program.step_counter is not None:
            int_syms.add(program.step_counter.name)
        self.int_symbols = int_syms
        self.int_tensors = {d.name for d in self.decls.values() if d.dtype == "int"}
        self.pad_symbols: set = set()  # temporaries holding a padded read, see _unfold
        self.typer = CPUPrinter(int_symbols=int_syms, int_tensors=self.int_tensors, scalars=self.scalars)

    # ---------------------------------------------------------------- entry point
    def lower(self, statements, returned, prefix: str) -> list[Kernel]:
        statements = self.live(list(statements), set(returned))
        groups = self.group(statements)
        inputs = {d.name for d in self.program.args} | {d.name for d in self.program.seeds}
        inputs |= set(self.program.state)
        users: dict[str, set] = {}
        for gi, g in enumerate(groups):
            for s in g.statements:
                for n in read_names(s, self.scalars) | set(written_names(s)):
                    users.setdefault(n, set()).add(gi)
        kernels = []
        for gi, g in enumerate(groups):
            local_ok = {
                n
                for s in g.statements
                for n in written_names(s)
                if n not in returned and n not in inputs and users.get(n) == {gi}
            }
            kernels.append(self.build(g, local_ok, "%s%d" % (prefix, gi)))
        return kernels

    # ---------------------------------------------------------------- dead code
    def live(self, statements, returned):
        needed = set(returned)
        keep = []
        for s in reversed(statements):
            if set(written_names(s)) & needed:
                keep.append(s)
                needed |= read_names(s, self.scalars)
        keep.reverse()
        return keep

    # ---------------------------------------------------------------- grouping
    def group(self, statements) -> list[Group]:
        groups: list[Group] = []
        for s in statements:
            gemm = match_gemm(self.program, s)
            found = None
            if gemm is None and self.contract:
                found = cn.match(s, self.decls, self.typer.is_int)
                if found is not None and cn.plan(found, [], self.typer.is_int) is None:
                    found = None
                if found is not None and found.stmt is not s:
                    # rewritten as a scatter: the docstring keeps the equation as written
                    text = equation_text(s)
                    found.stmt = dataclasses.replace(found.stmt, equation=text)
                    s = found.stmt
            if gemm is None and found is None and groups:
                mapping = self.can_join(groups[-1], s)
                if mapping is not None:
                    groups[-1].statements.append(rename_assign(s, mapping))
                    continue
            groups.append(Group(free=s.free, statements=[s], gemm=gemm, contract=found))
        return groups

    def can_join(self, g: Group, s: Assign):
        if (g.gemm is not None or g.contract is not None) and s.reduce != "none":
            return None
        if s.scatter or any(t.scatter for t in g.statements):
            return None  # a scatter writes elsewhere than the group's free index
        mapping = match_loops(g.free, s.free)
        if mapping is None and g.contract is not None:
            # a contraction's epilogue may store in another index order
            mapping = match_loops_any_order(g.free, s.free)
        if mapping is None:
            return None
        free_syms = tuple(l.index for l in g.free)
        if any(l.index in free_syms for l in s.over):
            return None
        s2 = rename_assign(s, mapping)
        # where the group writes each tensor (its free index, in the writer's order)
        written = {}
        for t in g.statements:
            for n in written_names(t):
                written[n] = target_index(t)
        own = target_index(s2)
        if (set(written_names(s2)) & self.scalars) and g.free:
            return None
        # every read of a group-written tensor is at the index its writer wrote
        for r in self.all_reads(s2):
            name = r.base.label.name
            if name in written_names(s2) and tuple(r.indices) != own:
                return None
            if name in written and tuple(r.indices) != written[name]:
                return None
        # earlier statements never read what s writes at another index
        for t in g.statements:
            for r in self.all_reads(t):
                if r.base.label.name in written_names(s2) and tuple(r.indices) != own:
                    return None
        # a GEMM reads its operands across the whole group's range
        if g.gemm is not None and set(written_names(s2)) & {g.gemm.left, g.gemm.right}:
            return None
        if g.contract is not None:
            operands = g.contract.left.expr * g.contract.right.expr
            if set(written_names(s2)) & {r.base.label.name for r in operands.atoms(sympy.Indexed)}:
                return None
        return mapping

    @staticmethod
    def all_reads(s: Assign):
        exprs = [s.body] + [l.lo for l in s.over] + [l.hi for l in s.over]
        out = []
        for e in exprs:
            out.extend(sympy.sympify(e).atoms(sympy.Indexed))
        return sorted(set(out), key=sympy.default_sort_key)

    # ---------------------------------------------------------------- kernel build
    def build(self, g: Group, local_ok: set, name: str) -> Kernel:
        parallel = None
        if g.gemm is None and g.contract is None and any(s.scatter for s in g.statements):
            # a scatter is a group of its own (can_join): exclusive writers, no atomics
            (stmt,) = g.statements
            parallel = exclusive_loops(stmt)
        free_syms = tuple(l.index for l in g.free)
        locals_: dict[str, sympy.Symbol] = {}
        last_write = {}
        for si, s in enumerate(g.statements):
            for n in written_names(s):
                last_write[n] = si
        items: list[Item] = []
        windex: dict[str, tuple] = {}  # tensor -> the index the group writes it at
        for si, s in enumerate(g.statements):
            # reads of what the group already computed become its scalar locals
            # (matched by name: derive's IndexedBase/Symbol may carry assumptions)
            body = sympy.sympify(s.body)
            own = target_index(s)
            subs = {}
            for r in body.atoms(sympy.Indexed):
                name_r = r.base.label.name
                if name_r in locals_ and tuple(r.indices) == windex.get(name_r):
                    subs[r] = locals_[name_r]
            for sym in body.free_symbols:
                if isinstance(sym, sympy.Symbol) and sym.name in self.scalars and sym.name in locals_:
                    subs[sym] = locals_[sym.name]
            body = body.xreplace(subs)
            target_read = (
                sympy.Symbol(s.target)
                if s.target in self.scalars
                else sympy.Indexed(sympy.IndexedBase(s.target), *own)
            )
            prev = locals_.get(s.target, target_read) if s.accumulate and not s.scatter else None
            local = locals_.get(s.target) or sympy.Symbol("_v_" + s.target)
            store = s.scatter != () or (s.target not in local_ok and last_write[s.target] == si)
            is_int = self.decls[s.target].dtype == "int" if s.target in self.decls else False
            item = Item(
                target=s.target,
                index=own,
                reduce=s.reduce,
                value=body,
                local=local,
                store=store,
                equation=equation_text(s),
                is_int=is_int,
                scatter=tuple(s.scatter),
                where=s.where,
            )
            if si == 0 and g.gemm is not None:
                item.reduce = "none"
                item.value = gemm_scale(s).xreplace(subs) * DOT
                if prev is not None:
                    item.value = prev + item.value
            elif si == 0 and g.contract is not None:
                item.reduce = "none"
                item.value = g.contract.scale * DOT
                if prev is not None:
                    item.value = prev + item.value
            elif s.reduce == "none":
                if prev is not None:
                    item.value = prev + body
            elif s.reduce == "sum":
                item.over = s.over
                item.init = prev if prev is not None else sympy.Integer(0)
            elif s.reduce == "max":
                item.over = s.over
                item.init = sympy.S.NegativeInfinity
                if prev is not None:
                    item.finish = prev + local
                for k, amname in enumerate(s.argmax):
                    amlocal = sympy.Symbol("_v_" + amname, integer=True)
                    amstore = amname not in local_ok and last_write[amname] == si
                    item.argmax.append((amname, s.over[k].index, amlocal, amstore))
                    locals_[amname] = amlocal
                    windex[amname] = own
            else:
                raise ValueError("%s: unknown reduction %r in %s" % (self.program.name, s.reduce, item.equation))
            if not s.scatter:
                locals_[s.target] = local
                windex[s.target] = own
            items.append(item)
        if g.gemm is not None:
            g.gemm.out, g.gemm.direct = self.gemm_out(g, items)
        contract = None
        if g.contract is not None:
            contract = cn.plan(g.contract, self.contract_outs(g, items), self.typer.is_int)
            if contract is None:
                # group() kept the match only if it planned without outputs, and outputs
                # only add choices; were it None, the first item would read a _dot that
                # no product computes
                raise AssertionError("%s: kernel %s: the contraction of %s planned in group() but not here"
                                     % (self.program.name, name, items[0].equation))
        kernel = Kernel(
            name=name,
            free=g.free,
            items=items,
            gemm=g.gemm,
            arrays=[],
            symbols=[],
            float_source="",
            equations=[it.equation for it in items],
            contract=contract,
            parallel=parallel,
        )
        if contract is not None and contract.note:
            kernel.equations.append(contract.note)
        self.cse(kernel)
        self.signature(kernel, g)
        return kernel

    def gemm_out(self, g: Group, items):
        """An array of the group that ``np.dot`` can write in place of a temporary:
        a stored (m, n) float target whose old content nothing in the group reads,
        and which is not an operand. The epilogue then reads ``_dot`` from it before
        overwriting the same element."""
        gm = g.gemm
        for it in items:
            if not it.store or it.target in (gm.left, gm.right) or it.target not in self.decls:
                continue
            d = self.decls[it.target]
            if d.dtype != "float" or tuple(sympy.sympify(e) for e in d.shape) != (gm.m, gm.n):
                continue
            writes = [k for k, st in enumerate(g.statements) if st.target == it.target]
            if any(g.statements[k].accumulate for k in writes):
                continue
            if any(it.target in read_names(st, self.scalars) for st in g.statements[: writes[0] + 1]):
                continue
            first = items[0]
            direct = len(items) == 1 and first.value == DOT and first.target == it.target
            return it.target, direct
        return None, False

    def contract_outs(self, g: Group, items) -> list:
        """(array, index order) of the group's stored outputs a contraction's product
        may be written into (by slices): float, covering the group's loops exactly,
        not an operand, and no statement reads its old content."""
        m = g.contract
        if m.stmt.scatter:
            return []
        operands = {r.base.label.name for r in (m.left.expr * m.right.expr).atoms(sympy.Indexed)}
        loops = {l.index: l for l in g.free}
        outs = []
        for it in items:
            if not it.store or it.scatter or it.target in operands or it.target not in self.decls:
                continue
            d = self.decls[it.target]
            if d.dtype != "float" or d.rank != len(loops) or set(it.index) != set(loops):
                continue
            if not all(cn.same_value(loops[i].hi, e) for i, e in zip(it.index, d.shape)):
                continue
            writes = [k for k, st in enumerate(g.statements) if st.target == it.target]
            if any(g.statements[k].accumulate for k in writes):
                continue
            if any(it.target in read_names(st, self.scalars) for st in g.statements[: writes[0] + 1]):
                continue
            outs.append((it.target, tuple(it.index)))
        return outs

    # ---------------------------------------------------------------- CSE
    def cse(self, kernel: Kernel):
        """CSE of the kernel's items; temporaries ``_t0, _t1, ...`` in order.

        ``Piecewise`` subtrees are opaque to CSE but for the subexpressions that are
        safe to compute before them (see _cse, _speculable): a guarded read stays behind
        its guard, and a branch that may raise is not computed unless selected.
        Temporaries already computed are then substituted back inside the ``Piecewise``
        branches (using a value computed earlier is safe)."""
        counter = [0]

        def fresh_syms():
            while True:
                yield sympy.Symbol("_t%d" % counter[0])
                counter[0] += 1

        self.hoist(kernel)
        guards: dict = {}
        # elementwise items share one CSE
        ew = [it for it in kernel.items if not it.over]
        if ew:
            temps, values = self._cse([it.value for it in ew], fresh_syms(), guards)
            for it, v in zip(ew, values):
                it.value = v
            self._place(kernel.items, ew, temps)
        for it in kernel.items:
            if not it.over:
                continue
            temps, (value,) = self._cse([it.value], fresh_syms(), guards)
            it.value = value
            over = {l.index for l in it.over}
            dep = set()
            for t in temps:
                # the symbols of the whole temporary: a Piecewise CSE saw as one call
                if self._restore(t.expr, guards, {}).free_symbols & (over | dep):
                    dep.add(t.sym)
                    it.inner.append(t)
                else:
                    it.pre.append(t)
        # a contraction's gathered operands: one CSE each (their own loops)
        for op in self.gathered(kernel):
            own_guards: dict = {}
            temps, (value,) = self._cse([op.value], fresh_syms(), own_guards)
            avail: dict = {}
            full: dict = {}
            for t in temps:
                self._restore_temp(t, own_guards, avail, full)
            op.value = self._restore(value, own_guards, avail)
            op.pre = temps
        kernel.temps = counter[0]
        # restore the Piecewise subtrees, reusing temporaries already computed
        if guards:
            avail: dict = {}
            full: dict = {}
            for it in kernel.items:
                for group in (it.pre, it.inner):
                    for t in group:
                        self._restore_temp(t, guards, avail, full)
                it.value = self._restore(it.value, guards, avail)

    def _restore_temp(self, t: Temp, guards, avail: dict, full: dict):
        """Restore ``t``'s Piecewise subtrees; record its value (in terms of no other
        temporary but the padded reads, which stay symbols: put back into a condition,
        SymPy would fold them out again, see _unfold) as available for reuse."""
        t.expr = self._restore(t.expr, guards, avail)
        f = self._restore(t.expr, guards, {}).xreplace(full)
        if t.sym not in self.pad_symbols:
            full[t.sym] = f
        avail[f] = t.sym

    def hoist(self, kernel: Kernel):
        """Move loop-invariant float subexpressions (``1 - beta1**t``, ``g_loss/B``) to
        constants ``_c0, _c1, ...`` computed once before the loops. ``Piecewise``
        subtrees are hoisted whole or not at all (a ternary is safe to evaluate; its
        branches alone may not be)."""
        if not kernel.free and not any(it.over for it in kernel.items):
            return
        variant = {l.index for l in kernel.free} | {DOT}
        if kernel.contract is not None:
            c = kernel.contract
            variant |= {l.index for l in c.outer + c.kouter + c.m + c.n + c.k}
        written = set()
        for it in kernel.items:
            variant |= {l.index for l in it.over} | {it.local}
            variant |= {a[2] for a in it.argmax}
            written.add(it.target)
        consts: dict = {}

        def invariant(e):
            if e.atoms(sympy.Indexed):
                return False
            for sym in e.free_symbols:
                if sym in variant or sym.name in written or sym.name.startswith("_"):
                    return False
            return True

        def worth(e):
            if e.is_Atom or not isinstance(e, sympy.Expr) or self.typer.is_int(e):
                return False
            if isinstance(e, sympy.Mul) and len(e.args) == 2 and e.args[0].is_Number:
                return not (e.args[1].is_Atom and e.args[0] == -1)
            return True

        def const(e):
            if e not in consts:
                consts[e] = sympy.Symbol("_c%d" % len(consts))
            return consts[e]

        def walk(e):
            if invariant(e):
                return const(e) if worth(e) else e
            if e.is_Atom or isinstance(e, (sympy.Indexed, sympy.Piecewise)) or not isinstance(e, sympy.Expr):
                return e
            if isinstance(e, (sympy.Add, sympy.Mul)):
                # the invariant terms (factors) of a sum (product) form one constant
                inv = [a for a in e.args if not a.is_Number and invariant(a)]
                if inv:
                    grouped = e.func(*inv)
                    if worth(grouped):
                        rest = [walk(a) for a in e.args if a.is_Number or not invariant(a)]
                        return e.func(const(grouped), *rest)
            return e.func(*[walk(a) for a in e.args])

        for it in kernel.items:
            it.value = walk(it.value)
        for op in self.gathered(kernel):
            op.value = walk(op.value)
        kernel.consts = [Temp(sym, e) for e, sym in consts.items()]

    @staticmethod
    def gathered(kernel: Kernel) -> list:
        """The operands of the kernel's contraction that are gathered into buffers."""
        c = kernel.contract
        return [] if c is None else [op for op in (c.left, c.right) if not op.view]

    def _cse(self, exprs, symbols, guards):
        """``sympy.cse`` of ``exprs`` with every ``Piecewise`` hidden behind a call
        ``_guarded(*shared, key)`` (``guards[key]`` keeps it and its ``shared`` list; see
        _restore). Temporaries are computed unconditionally, before the expression, so a
        subexpression of a Piecewise is only shared (passed in ``shared``) where that is
        safe (see _speculable); the rest of the Piecewise stays as written.

        First, a Boolean if-then-else that SymPy built from a padded read inside a
        condition is undone (see _unfold): each padded read becomes one temporary."""
        guarded = sympy.Function("_guarded", real=True)  # real: Max and Min accept it as an argument
        exprs = [sympy.sympify(e) for e in exprs]
        pads: dict = {}
        exprs = [self._unfold(e, pads) for e in exprs]
        temps = []
        numbered = {}
        for pad, placeholder in pads.items():
            # a padded read, computed once: a ternary, never out of bounds, never raises
            key = sympy.Symbol("_pw%d" % len(guards))
            guards[key] = (pad, ())
            numbered[placeholder] = next(symbols)
            self.pad_symbols.add(numbered[placeholder])
            temps.append((numbered[placeholder], guarded(key)))
        exprs = [e.xreplace(numbered) for e in exprs]
        evaluated: set = set()
        for e in exprs:
            self._unconditional(e, evaluated)
        hidden_of: dict = {}

        def hide(e):
            if isinstance(e, sympy.Piecewise):
                if e not in hidden_of:
                    key = sympy.Symbol("_pw%d" % len(guards))
                    shared = self._speculable(e, evaluated)
                    guards[key] = (e, shared)
                    # a shared Piecewise is hidden too: CSE takes it whole or not at all
                    hidden_of[e] = guarded(*[hide(x) for x in shared], key)
                return hidden_of[e]
            if not e.args or e.is_Atom or isinstance(e, sympy.Indexed):
                return e
            return e.func(*[hide(a) for a in e.args])

        hidden = [hide(e) for e in exprs]
        repl, reduced = sympy.cse(hidden, symbols=symbols, order="canonical")
        repl = temps + list(repl)  # the padded reads first: they use no other temporary
        # integer-valued temporaries get integer symbols (they index and bound)
        rename = {}
        out = []
        for s, e in repl:
            e = e.xreplace(rename)
            if self.typer.is_int(self._restore(e, guards, {})):
                ns = sympy.Symbol(s.name, integer=True)
                rename[s] = ns
                s = ns
            out.append(Temp(s, e))
        reduced = [e.xreplace(rename) for e in reduced]
        return out, reduced

    def _unfold(self, e, pads: dict, outer=sympy.true):
        """``e`` with each ``ITE(c, a, b)`` whose ``b`` is ``a`` with one read set to zero
        written as ``a`` with that read padded: ``(read if c else 0)``, one symbol from
        ``pads`` ({padded Piecewise: symbol}).

        The two are equal for every ``c`` (where ``c`` holds both read the element,
        elsewhere both read 0). SymPy builds the ``ITE`` form itself: a Piecewise inside
        a condition (a read that may fall outside its tensor, zero-padded by derive, in
        a comparison) is folded out of the condition, which doubles the condition for
        every such read; nested, n padded reads write it 2**n times. A symbol keeps the
        padded read where it is, and SymPy cannot fold it again.

        ``outer``: the conditions under which ``e`` is evaluated at all (the branches of
        the bounds guards around it). A padded read becomes a temporary computed before
        everything, so its own guard takes them in: a read that a gradient's range guard
        keeps inside its tensor (``x[b // 2, n1 + 2 n2]`` under ``n1 + 2 n2 < N``) stays
        inside."""
        if e.is_Atom or not e.args or isinstance(e, sympy.Indexed):
            return e
        if isinstance(e, sympy.Piecewise) and self._is_guard(e):
            pairs, before = [], []
            for expr, cond in e.args:
                reached = sympy.And(outer, *[sympy.Not(c) for c in before])  # cond is evaluated
                unfolded = self._unfold(cond, pads, reached)
                pairs.append((self._unfold(expr, pads, sympy.And(reached, cond)), unfolded))
                before.append(cond)
            changed = any(p[0] is not a.expr or p[1] is not a.cond for p, a in zip(pairs, e.args))
            return sympy.Piecewise(*pairs) if changed else e
        if isinstance(e, sympy.logic.boolalg.ITE):
            chain = self._unfold_chain(e, pads, outer)
            if chain is not None:
                return self._unfold(chain, pads, outer)
        args = [self._unfold(a, pads, outer) for a in e.args]
        e = e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
        if not isinstance(e, sympy.logic.boolalg.ITE):
            return e
        c, a, b = e.args
        in_b = set(b.atoms(sympy.Indexed))
        for read in reads_of(a):
            if read in in_b:
                continue
            try:
                zeroed = a.xreplace({read: sympy.S.Zero})
            except Exception:  # noqa: BLE001 -- SymPy evaluating 1/0 (zoo) in a comparison
                continue
            if zeroed == b:
                return a.xreplace({read: self._pad(read, c, pads, outer)})
        return e

    @staticmethod
    def _pad(read, guard, pads: dict, outer=sympy.true):
        pad = sympy.Piecewise((read, sympy.And(guard, outer)), (sympy.S.Zero, True))
        if pad not in pads:
            pads[pad] = sympy.Dummy("pad")  # numbered in _cse
        return pads[pad]

    def _unfold_chain(self, e, pads: dict, outer=sympy.true):
        """SymPy's fold of several padded reads of one condition: a chain
        ``ITE(c1, a1, ITE(c2, a2, ... a0))`` over every subset K of the reads, each ``aj``
        the first ``a1`` with the reads outside K set to 0 and ``cj`` the conjunction of
        the guards of the reads in K, larger K first. Written back as ``a1`` with each
        read padded by its own guard (None where the chain is not of that form).

        The guards are the smallest nonempty sets of conjuncts of ``c1`` that a branch
        goes without (disjoint; every branch goes without a union of them, each union
        once, so there are 2**k branches), the read of a guard is the one whose zero
        turns ``a1`` into the branch that goes without that guard alone, and every
        branch is checked to be ``a1`` with its failing guards' reads 0 (up to how SymPy
        arranged the comparisons, see _moved). Equal at every point: the first branch
        whose condition holds is the one whose guards are exactly those that hold (all
        subsets are there, and none comes before a larger one), and its value is what
        the padded reads give."""
        branches = []
        rest = e
        while isinstance(rest, sympy.logic.boolalg.ITE) and not self._float_condition(rest.args[0]):
            c, a, rest = rest.args
            branches.append((c, a))
        branches.append((sympy.true, rest))
        full = set(sympy.And.make_args(branches[0][0]))
        conj = [set(sympy.And.make_args(c)) for c, _ in branches[:-1]] + [set()]
        if len(branches) < 2 or any(not cj <= full for cj in conj):
            return None
        missing = [frozenset(full - cj) for cj in conj]
        # the guards: the smallest nonempty sets of conjuncts a branch goes without
        groups = sorted({m for m in missing if m and not any(o and o < m for o in missing)},
                        key=lambda g: sorted(map(sympy.default_sort_key, g)))
        if len(branches) != 2 ** len(groups) or len(groups) > 8:
            return None
        if sum(len(g) for g in groups) != len(frozenset().union(*groups)):
            return None  # guards that share a conjunct
        dropped = []
        for m in missing:
            inside = [g for g in groups if g <= m]
            if frozenset().union(*inside) != m:
                return None
            dropped.append(frozenset(inside))
        if len(set(dropped)) != len(dropped):
            return None
        for i, d in enumerate(dropped):
            if any(earlier > d for earlier in dropped[:i]):
                return None  # a branch with more guards failing comes first
        first = branches[0][1]

        def zeroed(reads):
            try:
                return first.xreplace({r: sympy.S.Zero for r in reads})
            except Exception:  # noqa: BLE001 -- SymPy evaluating 1/0 (zoo) in a comparison
                return None

        def same(u, v):
            return u is not None and (u == v or _moved(u) == _moved(v))

        read_of = {}
        for g in groups:
            a = branches[dropped.index(frozenset([g]))][1]
            found = [r for r in reads_of(first) if r not in read_of.values() and same(zeroed([r]), a)]
            if not found:
                return None
            read_of[g] = found[0]
        for (_, a), d in zip(branches, dropped):
            if not same(zeroed([read_of[g] for g in d]), a):
                return None
        padded = {}
        for g in groups:
            guard = sympy.And(*sorted(g, key=sympy.default_sort_key))
            padded[read_of[g]] = self._pad(read_of[g], guard, pads, outer)
        return first.xreplace(padded)

    def _float_condition(self, cond) -> bool:
        return any(not (self.typer.is_int(r.lhs) and self.typer.is_int(r.rhs))
                   for r in sympy.sympify(cond).atoms(sympy.core.relational.Relational))

    @staticmethod
    def _unconditional(e, out: set):
        """Add to ``out`` the subexpressions of ``e`` that are evaluated whenever ``e`` is:
        everything outside a Piecewise, and of a Piecewise its first condition, as a
        whole (as CSE always treated it: derive pads each read of a condition by itself,
        so no read of a condition depends on another part of it being true)."""
        if isinstance(e, sympy.Piecewise):
            Lowerer._unconditional(e.args[0].cond, out)
            return
        if isinstance(e, sympy.logic.boolalg.ITE):
            Lowerer._unconditional(e.args[0], out)
            return
        if e.is_Atom or not e.args:
            return
        out.add(e)
        for a in e.args:
            Lowerer._unconditional(a, out)

    def _is_guard(self, pw) -> bool:
        """Whether a Piecewise tests an index (a comparison of integers in a condition):
        a bounds guard (derive's zero padding, a gradient's range) or a ``where`` on an
        index. What such a Piecewise selects may read outside a tensor elsewhere."""
        for a in pw.args:
            for r in sympy.sympify(a.cond).atoms(sympy.core.relational.Relational):
                if self.typer.is_int(r.lhs) and self.typer.is_int(r.rhs):
                    return True
        return False

    def _total(self, e) -> bool:
        """Whether ``e`` may be evaluated anywhere: it never raises, in Numba or as the
        plain Python the CUDA simulator runs (where ``math.log(-1)``, ``math.exp(1e3)`` and
        a Python float divided by 0 raise), and reads only what it reads through a
        ternary of its own. Reads are fine: derive pads every read that may fall outside
        its tensor, so a read not under a guard is inside for every value of the loops.

        Total: numbers, symbols, reads, sums, products (a quotient only with a NumPy
        scalar -- a number or an array element -- in the numerator, as NumPy divides by
        zero without raising), the powers that print as ``_F(1) / ...`` or ``x * x``,
        comparisons and Boolean operators, Max, Min, abs, sign, the bounded functions
        (tanh, atan, erf, erfc, sigmoid, softplus), integer index arithmetic, and
        ternaries of those."""
        if e.is_Atom:
            return True
        if isinstance(e, sympy.Indexed):
            return True
        if isinstance(e, sympy.Expr) and self.typer.is_int(e) and not e.atoms(sympy.Indexed):
            return True
        if not all(self._total(a) for a in e.args):
            return False
        if isinstance(e, sympy.Piecewise):
            return True
        if isinstance(e, sympy.Pow):
            if isinstance(e.exp, sympy.Integer) and e.exp < 0:
                return True  # _F(1) / base
            return e.exp == 2 and (e.base.is_Symbol or isinstance(e.base, sympy.Indexed))
        if isinstance(e, sympy.Mul):
            if any(isinstance(a, sympy.Pow) and a.exp.is_negative for a in e.args):
                return any(a.is_Number or isinstance(a, sympy.Indexed) for a in e.args)
            return True
        if isinstance(e, (sympy.Add, sympy.Max, sympy.Min, sympy.Abs, sympy.sign)):
            return True
        if isinstance(e, (sympy.core.relational.Relational, sympy.And, sympy.Or, sympy.Not,
                          sympy.logic.boolalg.ITE)):
            return True
        return type(e).__name__ in TOTAL_FUNCTIONS

    def _speculable(self, pw, evaluated: set) -> tuple:
        """The subexpressions of ``pw`` that CSE may compute before it (and share):
        largest first, one entry per occurrence (so CSE sees what repeats), sorted.

        A subexpression qualifies where it is a float value (not index arithmetic,
        not a condition: a condition
        replaced by a symbol would lose its NaN-ordered complement in the printer), not
        a bare read or negation, and either is evaluated whenever ``pw`` is anyway (in
        ``evaluated``) or is total (_total). Not looked into: what a guard (_is_guard)
        selects, whose reads may be outside their tensor where the guard fails."""
        found = []

        def walk(e, top=False):
            if isinstance(e, sympy.Piecewise):
                if not top and self._value_ok(e, evaluated):
                    found.append(e)
                    return
                walk(e.args[0].cond)
                if not self._is_guard(e):
                    walk(e.args[0].expr)
                    for a in e.args[1:]:
                        walk(a.expr)
                        walk(a.cond)
                return
            if e.is_Atom or not e.args or isinstance(e, sympy.Indexed):
                return
            if isinstance(e, sympy.Expr) and self.typer.is_int(e):
                return  # index arithmetic stays as written (j // W is no float j / W)
            if isinstance(e, sympy.Expr) and self._value_ok(e, evaluated):
                found.append(e)
                return
            for a in e.args:
                walk(a)

        walk(pw, top=True)
        return tuple(sorted(found, key=sympy.default_sort_key))

    def _value_ok(self, e, evaluated) -> bool:
        if not isinstance(e, sympy.Expr) or e.is_Atom or isinstance(e, sympy.Indexed):
            return False
        if isinstance(e, sympy.Mul) and len(e.args) == 2 and e.args[0] == -1 and e.args[1].is_Atom:
            return False  # a bare negation is not worth a temporary
        return e in evaluated or self._total(e)

    @staticmethod
    def _restore(e, guards, avail):
        """Put the Piecewise subtrees back, substituting available temporaries and the
        values CSE gave their shared subexpressions."""
        while True:  # the values of shared subexpressions may hold hidden Piecewise
            calls = [c for c in e.atoms(sympy.Function) if type(c).__name__ == "_guarded"]
            if not calls:
                return e
            rep = {}
            for c in calls:
                pw, shared = guards[c.args[-1]]
                sub = dict(avail)
                sub.update(zip(shared, c.args[:-1]))
                pieces = [(a.expr.xreplace(sub), a.cond.xreplace(sub)) for a in pw.args]
                rep[c] = sympy.Piecewise(*pieces, evaluate=False)
            e = e.xreplace(rep)

    @staticmethod
    def _place(items, ew, temps):
        """Put each shared temporary before the first item that uses it."""
        first = {}
        pos = {id(it): k for k, it in enumerate(items)}
        for it in ew:
            for s in it.value.free_symbols:
                first.setdefault(s, pos[id(it)])
        for t in reversed(temps):
            if t.sym in first:
                for s in t.expr.free_symbols:
                    if s not in first or first[s] > first[t.sym]:
                        first[s] = first[t.sym]
        for t in temps:
            items[first.get(t.sym, pos[id(ew[0])])].pre.append(t)

    # ---------------------------------------------------------------- signature
    def signature(self, kernel: Kernel, g: Group):
        exprs = []
        for l in kernel.free:
            exprs += [l.lo, l.hi]
        bound = {l.index for l in kernel.free}
        for c in kernel.consts:
            exprs.append(c.expr)
            bound.add(c.sym)
        arrays = set()
        stored_float = []
        for it in kernel.items:
            for t in it.pre + it.inner:
                exprs.append(t.expr)
                bound.add(t.sym)
            for l in it.over:
                exprs += [l.lo, l.hi]
                bound.add(l.index)
            exprs.append(it.value)
            exprs += list(it.scatter) + [it.where]
            for e in (it.init, it.finish):
                if e is not None:
                    exprs.append(e)
            bound.add(it.local)
            if it.store:
                arrays.add(it.target)
                if not it.is_int:
                    stored_float.append(it.target)
            for am, _, amlocal, amstore in it.argmax:
                bound.add(amlocal)
                if amstore:
                    arrays.add(am)
        if kernel.gemm is not None:
            arrays |= {kernel.gemm.left, kernel.gemm.right}
            exprs += [kernel.gemm.m, kernel.gemm.n, kernel.gemm.k]
        c = kernel.contract
        if c is not None:
            loops = c.outer + c.kouter + c.m + c.n + c.k
            bound |= {l.index for l in loops}
            exprs += [e for l in loops for e in (l.lo, l.hi)]
            spans = [c.span] if c.span is not None else []
            for op in (c.left, c.right):
                if op.view:
                    arrays.add(op.name)
                else:
                    exprs.append(op.value)
                    for t in op.pre:
                        exprs.append(t.expr)
                        bound.add(t.sym)
                    spans.append(op.span)
            for sp in spans:
                exprs += [sp.row, sp.rest] + [e for ab in sp.bounds for e in ab]
            if c.out is not None:
                arrays.add(c.out)
            if c.zero is not None:
                arrays.add(c.zero)
        symbols = set()
        for e in exprs:
            e = sympy.sympify(e)
            arrays.update(r.base.label.name for r in e.atoms(sympy.Indexed))
            for s in e.free_symbols:
                if isinstance(s, sympy.Indexed) or isinstance(s, sympy.IndexedBase):
                    continue
                if s in bound or s == DOT or s.name.startswith("_"):
                    continue
                if s.name in self.scalars:
                    arrays.add(s.name)
                elif s.name in self.decls:
                    arrays.add(s.name)
                else:
                    symbols.add(s)
        # IndexedBase labels show up in free_symbols of Indexed: drop tensor names
        symbols = {s for s in symbols if s.name not in self.decls}
        order = [d.name for d in tensor_decls(self.program)]
        kernel.arrays = [n for n in order if n in arrays]
        kernel.symbols = sorted(symbols, key=lambda s: s.name)
        floats = [n for n in kernel.arrays if self.decls[n].dtype == "float"]
        kernel.float_source = (stored_float or floats or [None])[0]
        if kernel.float_source is None:
            raise ValueError("%s: kernel %s has no float array" % (self.program.name, kernel.name))
