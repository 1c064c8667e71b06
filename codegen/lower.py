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
   ``_t0, _t1, ...`` numbered per kernel in order). ``Piecewise`` subtrees are kept
   whole, so nothing a guard protects is hoisted in front of its guard.
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

        ``Piecewise`` subtrees are opaque to CSE (a guarded read must stay behind its
        guard), except their first condition, which is evaluated whenever the
        ``Piecewise`` is. Temporaries already computed are then substituted back
        inside the ``Piecewise`` branches (using a value computed earlier is safe)."""
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
                if t.expr.free_symbols & (over | dep):
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
                t.expr = self._restore(t.expr, own_guards, avail)
                f = self._restore(t.expr, own_guards, {}).xreplace(full)
                full[t.sym] = f
                avail[f] = t.sym
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
                        t.expr = self._restore(t.expr, guards, avail)
                        f = self._restore(t.expr, guards, {}).xreplace(full)
                        full[t.sym] = f
                        avail[f] = t.sym
                it.value = self._restore(it.value, guards, avail)

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

    @staticmethod
    def _plain_reads(e) -> bool:
        return all(all(isinstance(i, sympy.Symbol) for i in r.indices) for r in e.atoms(sympy.Indexed))

    def _cse(self, exprs, symbols, guards):
        guarded = sympy.Function("_guarded", real=True)  # real: Max and Min accept it as an argument

        def hide(e):
            if isinstance(e, sympy.Piecewise):
                key = sympy.Symbol("_pw%d" % len(guards))
                c1 = e.args[0].cond
                if isinstance(c1, sympy.core.relational.Relational) and self._plain_reads(c1):
                    # the first condition is always evaluated: what it shares with
                    # the branches is passed alongside it, so CSE computes it once
                    shared = self._shared(c1, e)
                    guards[key] = (e, shared)
                    return guarded(c1, *shared, key)
                guards[key] = (e, ())
                return guarded(key)
            if not e.args or e.is_Atom or isinstance(e, sympy.Indexed):
                return e
            return e.func(*[hide(a) for a in e.args])

        hidden = [hide(sympy.sympify(e)) for e in exprs]
        repl, reduced = sympy.cse(hidden, symbols=symbols, order="canonical")
        # integer-valued temporaries get integer symbols (they index and bound)
        rename = {}
        temps = []
        for s, e in repl:
            e = e.xreplace(rename)
            if self.typer.is_int(self._restore(e, guards, {})):
                ns = sympy.Symbol(s.name, integer=True)
                rename[s] = ns
                s = ns
            temps.append(Temp(s, e))
        reduced = [e.xreplace(rename) for e in reduced]
        return temps, reduced

    @staticmethod
    def _restore(e, guards, avail):
        """Put the Piecewise subtrees back, substituting available temporaries."""
        calls = [c for c in e.atoms(sympy.Function) if type(c).__name__ == "_guarded"]
        if not calls:
            return e
        rep = {}
        for c in calls:
            pw, shared = guards[c.args[-1]]
            sub = dict(avail)
            if len(c.args) > 1:
                first = c.args[0]
                sub.update(zip(shared, c.args[1:-1]))
            else:
                first = pw.args[0].cond.xreplace(sub)
            pieces = [(pw.args[0].expr.xreplace(sub), first)]
            pieces += [(a.expr.xreplace(sub), a.cond.xreplace(sub)) for a in pw.args[1:]]
            rep[c] = sympy.Piecewise(*pieces, evaluate=False)
        return e.xreplace(rep)

    @staticmethod
    def _shared(cond, pw) -> tuple:
        """Subexpressions of ``cond`` that also occur in the rest of ``pw``, sorted."""
        rest = [pw.args[0].expr] + [x for a in pw.args[1:] for x in (a.expr, a.cond)]
        rest_subtrees = [set(sympy.preorder_traversal(r)) for r in rest]
        found = set()
        for sub in sympy.preorder_traversal(cond):
            if isinstance(sub, sympy.Indexed) or sub.is_Atom or not isinstance(sub, sympy.Expr):
                continue
            if isinstance(sub, sympy.Mul) and len(sub.args) == 2 and sub.args[0] == -1:
                continue  # a bare negation is not worth a temporary
            if any(sub in subtrees for subtrees in rest_subtrees):
                found.add(sub)
        return tuple(sorted(found, key=sympy.default_sort_key))

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
