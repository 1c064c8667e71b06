"""Module emission: Programs to the text of generated modules.

Python decides everything here (what kernels exist, their arguments, allocations,
checks, launch sizes) and hands plain dicts of printed strings to the templates in
``codegen/templates/``, which only lay them out.
"""

from __future__ import annotations

import contextlib

import sympy

from derive.errors import SpecError
from derive.ir import Program

from . import contract as cn
from .lower import DOT, Kernel, Lowerer, decl_of, parallel_nest, read_names, safe_index_names, tensor_decls, written_names
from .printers import RESERVED_NAMES, CPUPrinter, CUDAPrinter, HostPrinter
from .template_util import render

GROUPS = {
    "activation": "activations",
    "layer": "layers",
    "loss": "losses",
    "optimizer": "optimizers",
    "schedule": "schedules",
}
CPU_TEMPLATE = "cpu/module.py.jinja"
CUDA_TEMPLATE = "cuda/module.py.jinja"
PACKAGE_TEMPLATE = "package/__init__.py.jinja"
CUDA_THREADS = 128
CUDA_TILE = 16


def group_of(program: Program) -> str:
    try:
        return GROUPS[program.kind]
    except KeyError:
        raise ValueError("%s: unknown op kind %r" % (program.name, program.kind)) from None


def ident(name: str) -> str:
    """A Python identifier fragment for an op name."""
    return "".join(c if c.isalnum() else "_" for c in name)


# --------------------------------------------------------------------------- per op plan
def backward_variants(program: Program) -> list:
    """Backward entry points that compute a subset of the gradients, as (suffix,
    gradient names): ``params``, the gradients of the parameters only (what the first
    layer of a network needs: nobody uses the gradient of the data). Emitted as
    compiled cores ``_<op>_bwd_<suffix>_core`` when the subset is proper."""
    roles = {d.name: d.role for d in program.args}
    params = [g.name for g, arg in zip(program.grads, program.grad_of) if roles.get(arg) == "param"]
    if params and len(params) < len(program.grads):
        return [("params", params)]
    return []


def check_names(program: Program) -> Program:
    """``program``, when none of its tensors, dimensions, attributes or state takes a
    name the generated module binds for something else (a Python keyword or builtin,
    ``np``, ``math``, ...): those names become the module's parameters, keywords and
    locals, where they would shadow it. Raises SpecError naming the file otherwise.
    (Loop indices are renamed instead: see lower.safe_index_names.)"""
    named = [("tensor", d.name) for d in tensor_decls(program)]
    named += [("dimension", d.name) for d in program.dims] + [("dimension", s.name) for s, _ in program.derived_dims]
    named += [("attribute", a.name) for a, _ in program.attrs] + [("state", n) for n in program.state]
    for what, name in named:
        if name in RESERVED_NAMES:
            raise SpecError(
                program.source,
                f"the {what} name `{name}` is a Python keyword or builtin, or a module the generated "
                f"code imports (np, math, ...): it would shadow that in the generated module; rename it",
            )
    return program


def _reduces(stmt) -> bool:
    """Whether a statement sums, maximises or scatters over an index."""
    return stmt.reduce != "none" or bool(stmt.over) or stmt.accumulate


def _resting_on_reductions(program: Program) -> set[str]:
    """The forward's values written by a reduction or computed from one."""
    scalars = set(program.scalars)
    rests: set[str] = set()
    for s in program.forward:
        if _reduces(s) or read_names(s, scalars) & rests:
            rests |= set(written_names(s))
    return rests


def saved_for_backward(program: Program) -> tuple[list[str], list[str]]:
    """What a fused training step keeps from an op's forward for its backward instead
    of recomputing it, as (outputs, intermediates) in declaration order: the values
    the backward reads that rest on a reduction (a sum, a maximum and its argmax, a
    log-sum-exp), so that the backward recomputes no reduction. Values computed
    elementwise from the arguments are cheaper to recompute in the backward's own
    loops than to store and load again, so they are not kept; ops without reductions
    (activations, optimizers) keep nothing."""
    if program.elementwise or not program.backward:
        return [], []
    read = set()
    for s in program.backward:
        read |= read_names(s, set(program.scalars))
    frontier = _resting_on_reductions(program) & read
    outputs = [d.name for d in program.outputs if d.name in frontier]
    order = [d.name for d in tensor_decls(program)]
    kept = sorted((n for n in frontier if n not in outputs), key=order.index)
    return outputs, kept


def saving_variants(program: Program) -> list:
    """Entry points of the fused steps' forward-saving path, as (entry, statements,
    returned, inputs): ``fwd_saving`` returns the outputs and the kept intermediates
    (only when there are such intermediates: otherwise it is the plain forward);
    ``bwd_saved`` (and ``bwd_params_saved``) take the outputs they read and the kept
    intermediates after the arguments, and skip the forward's reductions. None when
    nothing is worth keeping (see saved_for_backward)."""
    outputs, kept = saved_for_backward(program)
    if not kept and not outputs:
        return []
    decls = {d.name: d for d in tensor_decls(program)}
    rests = _resting_on_reductions(program)
    # the backward recomputes only what does not rest on a reduction
    recomputed = tuple(s for s in program.forward if not set(written_names(s)) & rests)
    inputs = list(program.seeds) + list(program.args) + [decls[n] for n in outputs + kept]
    out = [("fwd_saving", program.forward, [d.name for d in program.outputs] + kept, list(program.args))] if kept else []
    out.append(("bwd_saved", recomputed + program.backward, [d.name for d in program.grads], inputs))
    for suffix, grads in backward_variants(program):
        out.append(("bwd_%s_saved" % suffix, recomputed + program.backward, grads, inputs))
    return out


def core_name(op: str, entry: str) -> str:
    """The compiled entry point of an op (``_dense_fwd_core``): validated arrays in,
    results out; what the Python wrappers and the generated models call."""
    return "_%s_%s_core" % (ident(op), entry)


def alloc_name(op: str, entry: str) -> str:
    """The compiled function allocating an entry point's results (``_dense_fwd_alloc``):
    a fused model step calls it once per batch shape."""
    return "_%s_%s_alloc" % (ident(op), entry)


def into_name(op: str, entry: str) -> str:
    """The entry point writing into results it is given (``_dense_fwd_into``): what a
    fused model step calls every step, so that it allocates no large array."""
    return "_%s_%s_into" % (ident(op), entry)


# --------------------------------------------------------------------------- per op plan
class OpPlan:
    """Everything both targets need for one op: lowered kernels per entry point and
    target, and the host-side bookkeeping (binding, allocation, returns). The CPU
    lowering turns contractions into BLAS products (codegen/contract.py); the CUDA
    kernels keep their loops (GEMMs of matrix-product shape are tiled there)."""

    TARGETS = ("cpu", "cuda")

    def __init__(self, program: Program, contract: bool = True):
        program = self.p = safe_index_names(check_names(program))
        self.id = ident(program.name)
        self.lowerer = Lowerer(program)
        self.lowerers = {"cpu": Lowerer(program, contract=contract), "cuda": self.lowerer}
        self.attr_int = {
            a.name: isinstance(v, int) and not isinstance(v, bool) for a, v in program.attrs
        }
        self.entries = {t: [] for t in self.TARGETS}  # target -> [(entry, kernels, statements, returned)]
        self.variants = set()  # entries with a compiled core only (no Python wrapper)
        self.inputs = {}  # entry -> its arguments, where they are not the usual ones
        self.flat = program.elementwise or program.kind == "optimizer"
        if program.kind == "schedule":
            return
        if program.kind == "optimizer":
            returned = [d.name for d in program.args[:1]] + list(program.state)
            self._add("step", program.step, returned)
        else:
            self._add("fwd", program.forward, [d.name for d in program.outputs])
            if program.grads:
                self._add("bwd", program.forward + program.backward, [d.name for d in program.grads])
            for suffix, grads in backward_variants(program):
                # the same program asked for fewer gradients: lowering drops the rest
                self._add("bwd_" + suffix, program.forward + program.backward, grads, variant=True)
            for entry, statements, returned, inputs in saving_variants(program):
                self._add(entry, statements, returned, inputs, variant=True)
            if program.jvp:
                # forward mode and second order (derive/tangent.py): the tangents of the
                # differentiable arguments come after the usual arguments
                tangents = list(program.tangents)
                self._add("jvp", program.forward + program.jvp, [d.name for d in program.jvp_outputs],
                          list(program.args) + tangents)
                self._add("hvp", program.forward + program.backward + program.hvp,
                          [d.name for d in program.hvp_outputs], list(program.seeds) + list(program.args) + tangents)

    def _add(self, entry, statements, returned, inputs=None, variant=False):
        """Lower one entry point. ``inputs`` replaces its usual arguments; a ``variant``
        is a compiled CPU core for the fused model steps only (no Python wrapper, no
        CUDA kernels)."""
        if inputs is not None:
            self.inputs[entry] = inputs
        if variant:
            self.variants.add(entry)
        for target, lowerer in self.lowerers.items():
            if variant and target != "cpu":
                continue
            kernels = lowerer.lower(statements, returned, "_%s_%s" % (self.id, entry))
            live = lowerer.live(list(statements), set(returned))
            # identical kernels across entry points are emitted once (op_context)
            self.entries[target].append((entry, kernels, live, returned))

    # ----------------------------------------------------------------- host side
    def needs_zero(self, name, statements) -> bool:
        """Whether an array must start zeroed: unless its first writer overwrites
        every element."""
        d = decl_of(self.p, name)
        for s in statements:
            if name == s.target or name in s.argmax:
                if s.accumulate or len(s.free) != d.rank:
                    return True
                for l, extent in zip(s.free, d.shape):
                    if l.lo != 0 or sympy.sympify(l.hi) != sympy.sympify(extent):
                        return True
                return False
        return True


# --------------------------------------------------------------------------- printing
def _printers(plan: OpPlan, target: str):
    lw = plan.lowerer
    cls = CUDAPrinter if target == "cuda" else CPUPrinter
    return cls(int_symbols=lw.int_symbols, int_tensors=lw.int_tensors, scalars=lw.scalars)


def _loops(pr, loops):
    return [{"var": pr.index(l.index), "lo": pr.index(l.lo), "hi": pr.index(l.hi)} for l in loops]


def _subscript(pr, item, lw):
    if item.target in lw.scalars and not item.index:
        return "0"
    return ", ".join(pr.index(i) for i in item.index) or "0"


def _scatter_store(pr, item, target: str) -> str:
    """``target[idx] += value``: several iterations may add to one element, but one
    worker runs all of them in order (codegen/lower.py's exclusive_loops), so no target
    needs an atomic add."""
    idx = ", ".join(pr.index(e) for e in item.scatter)
    local = pr.index(item.local)
    return "%s[%s] += %s" % (item.target, idx, local)


def kernel_context(plan: OpPlan, k: Kernel, target: str) -> dict:
    pr = _printers(plan, target)
    lw = plan.lowerer
    items = []
    for it in k.items:
        over = list(it.over)
        over_syms = {l.index for l in over}
        argmax = []
        for name, idx, local, store in it.argmax:
            lo = next(l.lo for l in over if l.index == idx)
            init = pr.index(lo) if not (sympy.sympify(lo).free_symbols & over_syms) else "0"
            argmax.append(
                {"target": name, "index": pr.index(idx), "local": pr.index(local), "store": store, "init": init}
            )
        items.append(
            {
                "equation": it.equation,
                "pre": [{"sym": pr.index(t.sym), "expr": pr.auto(t.expr)} for t in it.pre],
                "inner": [{"sym": pr.index(t.sym), "expr": pr.auto(t.expr)} for t in it.inner],
                "reduce": it.reduce,
                "local": pr.index(it.local),
                "value": pr.expr(it.value, "int" if it.is_int else "float"),
                "init": pr.expr(it.init) if it.init is not None and it.init != it.local else "",
                "finish": pr.expr(it.finish) if it.finish is not None else "",
                "over": _loops(pr, over),
                "argmax": argmax,
                "store": it.store and not it.scatter,
                "target": it.target,
                "subscript": _subscript(pr, it, lw),
                "scatter": _scatter_store(pr, it, target) if it.scatter else "",
                "where": pr.index(it.where) if it.scatter and it.where is not sympy.true else "",
            }
        )
    for item in items:
        # what a sum run with its loops outside (reduce_outer) first stores in its
        # output: nothing when it accumulates onto the output's own value
        element = "%s[%s]" % (item["target"], item["subscript"])
        item["reset"] = "" if item["init"] == element else "%s = %s" % (element, item["init"])
    params = list(k.arrays) + [pr.index(s) for s in k.symbols]
    ctx = {
        "name": k.name,
        "params": params,
        "doc": k.equations,
        "float_source": k.float_source,
        "free": _loops(pr, k.free),
        "stmts": items,
        "temps": k.temps,
        "gemm": None,
        "consts": [{"sym": pr.index(c.sym), "expr": pr.expr(c.expr)} for c in k.consts],
        "resets": [it["reset"] for it in items if it["reset"]],
    }
    ctx["helpers"] = sorted(pr.helpers_used)
    if k.gemm is not None:
        g = k.gemm
        f0, f1 = (pr.index(l.index) for l in k.free)
        ctx["gemm"] = {
            "left": g.left + (".T" if g.left_t else ""),
            "right": g.right + (".T" if g.right_t else ""),
            "subscript": "%s, %s" % (f0, f1),
            "row": f0,
            "col": f1,
            "m": pr.index(g.m),
            "n": pr.index(g.n),
            "k": pr.index(g.k),
            "out": g.out,
            "direct": g.direct,
            "left_read": "%s[%s]" % (g.left, "_kk, %s" % f0 if g.left_t else "%s, _kk" % f0),
            "right_read": "%s[%s]" % (g.right, "%s, _kk" % f1 if g.right_t else "_kk, %s" % f1),
        }
    ctx["reduce_outer"] = False
    ctx["contract"] = None
    if target == "cuda":
        cuda_layout(ctx, k, pr)
    else:
        ctx["depth"] = len(k.free) + 1
        ctx["reduce_outer"] = reduce_outer(k)
        if k.contract is not None:
            ctx["contract"] = contract_context(k, ctx, pr)
            used = {"gemm"} | ({"span"} if ctx["contract"]["uses_span"] else set())
            # the gathered operands print through pr too (softplus(x[...]) in a patch)
            ctx["helpers"] = sorted(set(pr.helpers_used) | used)
    return ctx


def _extent(pr, loops) -> str:
    return pr.index(sympy.Mul(*[l.hi - l.lo for l in loops]))


def _matrix(pr, op) -> str:
    """A contraction operand as a 2-D matrix: a view of its array or its buffer."""
    base = op.name
    if op.view and op.outer:
        base = "%s[%s]" % (op.name, ", ".join(pr.index(v) for v in op.outer))
    text = "%s.reshape(%s, %s)" % (base, _extent(pr, op.rows), _extent(pr, op.cols))
    return text + (".T" if op.trans else "")


def _span(pr, sp, loops, store: str = "", fill: str = "") -> tuple[dict, list, list]:
    """The split innermost loop of a gather or scatter nested in ``loops``, and where
    its bounds are computed: (span, lines before the nest, lines after each loop's
    header). The bounds go right after the innermost loop whose index they use, so
    they are not recomputed (integer divisions) for every row."""
    var, lo, hi = pr.index(sp.var), pr.index(sp.lo), pr.index(sp.hi)
    calc = ["%s, %s = %s, %s" % ("{lo}", "{hi}", lo, hi)]
    calc += ["{lo}, {hi} = _span(%s, %s, {lo}, {hi})" % (pr.index(a), pr.index(b)) for a, b in sp.bounds]
    uses = set().union(*(sympy.sympify(e).free_symbols for ab in sp.bounds for e in ab)) if sp.bounds else set()
    level = max((k for k, l in enumerate(loops) if l.index in uses), default=-1)
    before, heads = [], [[] for _ in loops]
    if sp.bounds and level < len(loops) - 1:
        names = {"lo": "_lo_" + var, "hi": "_hi_" + var}
        (before if level < 0 else heads[level]).extend(line.format(**names) for line in calc)
        init = ["_lo, _hi = %s, %s" % (names["lo"], names["hi"])]
    else:
        init = [line.format(lo="_lo", hi="_hi") for line in calc]
    span = {
        "var": var,
        "lo": lo,
        "hi": hi,
        "split": bool(sp.bounds) or sp.row is not sympy.true,
        "init": init,
        "row": "" if sp.row is sympy.true else pr.index(sp.row),
        "rest": "" if sp.rest is sympy.true else pr.index(sp.rest),
        "store": store,
        "fill": fill,
    }
    return span, before, heads


def _nest(pr, loops, heads) -> list:
    out = _loops(pr, loops)
    for l, head in zip(out, heads):
        l["head"] = head
    return out


def _subscripted(pr, name: str, index) -> str:
    """``name[index]`` printed as a read (so ``CPUPrinter.unsigned`` applies)."""
    return pr.index(sympy.Indexed(sympy.IndexedBase(name), *index))


@contextlib.contextmanager
def _unsigned(pr, var, temps):
    """Print subscripts that move with a span's loop index ``var`` (directly or through
    the temporaries ``temps``) as unsigned: inside the span every guard holds, so they
    are in bounds (see ``CPUPrinter.unsigned``)."""
    moving = {var}
    for t in temps:
        if t.expr.free_symbols & moving:
            moving.add(t.sym)
    old, pr.unsigned = pr.unsigned, frozenset(moving)
    try:
        yield
    finally:
        pr.unsigned = old


def contract_context(k: Kernel, ctx: dict, pr) -> dict:
    """The CPU layout of a contraction kernel (codegen/contract.py): buffers, the
    gathers, the product, the epilogue or scatter."""
    c = k.contract
    gathers = []
    for op in (c.left, c.right):
        if op.view:
            continue
        layout = op.rows + op.cols
        plain = "%s[%s]" % (op.name, ", ".join(pr.index(l.index) for l in layout))
        # where the zeros fall does not change from one product to the next: the
        # buffer starts zeroed and only the span is written
        outer = {l.index for l in c.outer + c.kouter}
        sp = op.span
        moving = set().union(*(sympy.sympify(e).free_symbols for ab in sp.bounds for e in ab), sp.row.free_symbols)
        zeroed = not (moving & outer)
        with _unsigned(pr, op.span.var, op.pre):
            store = _subscripted(pr, op.name, [l.index for l in layout])
            span, before, heads = _span(pr, op.span, layout[:-1], store, "" if zeroed else pr.expr(0))
            span["pre"] = [{"sym": pr.index(t.sym), "expr": pr.auto(t.expr)} for t in op.pre]
            span["value"] = pr.expr(op.value)
        conds, value = cn.split_guards(op.expr)
        comment = "%s = %s" % (plain, value)
        if conds:
            comment += ", 0 where its guard fails"
        gathers.append(
            {
                "comment": comment,
                "buffer": op.name,
                "shape": ", ".join(pr.index(l.hi - l.lo) for l in layout),
                "zeroed": zeroed,
                "head": before,
                "loops": _nest(pr, layout[:-1], heads),
                "span": span,
            }
        )
    a, b = _matrix(pr, c.left), _matrix(pr, c.right)
    m, n = _extent(pr, c.m), _extent(pr, c.n)
    prod = view = None
    if c.out is not None:
        outer = [pr.index(l.index) for l in c.outer]
        target = "%s[%s]" % (c.out, ", ".join(outer)) if outer else c.out
        dot = "_gemm(%s, %s, %s.reshape(%s, %s), False)" % (a, b, target, m, n)
        read = "%s[%s]" % (c.out, ", ".join(pr.index(l.index) for l in c.outer + c.m + c.n))
    else:
        prod = "%s, %s" % (m, n)
        dot = "_gemm(%s, %s, _prod, %s)" % (a, b, bool(c.kouter))
        if len(c.m) == 1 and len(c.n) == 1:
            pv = "_prod"
        else:
            pv = "_pv"
            view = ", ".join(pr.index(l.hi - l.lo) for l in c.m + c.n)
        read = "%s[%s]" % (pv, ", ".join(pr.index(l.index) for l in c.m + c.n))
    direct = c.out is not None and len(k.items) == 1 and k.items[0].value == DOT and k.items[0].target == c.out
    epi = list(c.m + c.n) if not c.scatter else list(c.m + c.n[:-1])
    before, heads = [], [[] for _ in epi]
    spans = [g["span"] for g in gathers]
    scatter = None
    if c.scatter:
        (it,) = k.items
        with _unsigned(pr, c.span.var, it.pre):
            scatter, before, heads = _span(pr, c.span, epi)
            scatter["read"] = _subscripted(pr, pv, [l.index for l in c.m + c.n])
            scatter["pre"] = [{"sym": pr.index(t.sym), "expr": pr.auto(t.expr)} for t in it.pre]
            scatter["assign"] = "%s = %s" % (pr.index(it.local), pr.expr(it.value))
            scatter["store"] = "%s += %s" % (_subscripted(pr, it.target, it.scatter), pr.index(it.local))
        spans.append(scatter)
    lines = before + [x for h in heads for x in h] + [x for s_ in spans for x in s_["init"]]
    lines += [x for g in gathers for x in g["head"] + [y for l in g["loops"] for y in l["head"]]]
    return {
        "uses_span": any("_span(" in line for line in lines),
        "zero": [c.zero] if c.zero else [],
        "buffers": [{"name": g["buffer"], "shape": g["shape"], "zeroed": g["zeroed"]} for g in gathers],
        "prod": prod,
        "view": view,
        "outer": _loops(pr, c.outer),
        "kouter": _loops(pr, c.kouter),
        "gathers": gathers,
        "dot": dot,
        "read": read,
        "epilogue": not direct,
        "head": before,
        "loops": _nest(pr, epi, heads),
        "scatter": scatter,
        "spans": spans,
    }


def reduce_outer(k: Kernel) -> bool:
    """Whether a CPU kernel's sums should run with their reduction loops outside the
    free loops (accumulating into the output arrays): when the reads walk memory along
    the innermost free index rather than the innermost reduction index (column sums).
    Several sums fused in one kernel qualify together when they reduce over the same
    loops (layer_norm's g_bias and g_weight, both over the batch)."""
    if k.gemm is not None or not k.items or not k.free:
        return False
    first = k.items[0]
    same_over = [(l.index, l.lo, l.hi) for l in first.over]
    for it in k.items:
        if it.reduce != "sum" or not it.store or it.argmax or it.finish is not None or it.init is None:
            return False
        if it.scatter or [(l.index, l.lo, l.hi) for l in it.over] != same_over:
            return False
    loops = list(k.free) + list(first.over)
    indices = {l.index for l in loops}
    for l in loops:
        if (sympy.sympify(l.lo).free_symbols | sympy.sympify(l.hi).free_symbols) & indices:
            return False
    inner_free, inner_over = k.free[-1].index, first.over[-1].index
    reads = []
    for it in k.items:
        reads += list(sympy.sympify(it.value).atoms(sympy.Indexed))
        for t in it.pre + it.inner:
            reads += list(sympy.sympify(t.expr).atoms(sympy.Indexed))
    along_free = sum(1 for r in reads if r.indices[-1] == inner_free)
    along_over = sum(1 for r in reads if r.indices[-1] == inner_over)
    return along_free > along_over


def cuda_layout(ctx: dict, k: Kernel, pr) -> None:
    """One thread per element of the leading free loops whose bounds do not depend on
    other free indices, of those ``k.parallel`` allows (a scatter's exclusive writers,
    codegen/lower.py's exclusive_loops); the remaining loops run inside the thread."""
    free_syms = {l.index for l in k.free}
    nest = parallel_nest(k)
    par = []
    for l in nest:
        if (sympy.sympify(l.lo).free_symbols | sympy.sympify(l.hi).free_symbols) & free_syms:
            break
        if k.parallel is not None and l.index not in k.parallel:
            break
        par.append(l)
    seq = nest[len(par):]
    ctx["parallel"] = [
        {"var": pr.index(l.index), "lo": pr.index(l.lo), "extent": pr.index(sympy.Max(l.hi - l.lo, 0))}
        for l in par
    ]
    lines = []
    rev = list(reversed(par))
    for n, l in enumerate(rev):
        var = pr.index(l.index)
        offset = "" if l.lo == 0 else "%s + " % pr.index(l.lo)
        if n == len(rev) - 1:
            lines.append("%s = %s_r" % (var, offset))
        else:
            extent = pr.expr(sympy.Max(l.hi - l.lo, 0), "int")
            lines.append("%s = %s_r %% %s" % (var, offset, extent if l.hi.is_Atom and l.lo == 0 else "(%s)" % extent))
            lines.append("_r //= %s" % (extent if l.hi.is_Atom and l.lo == 0 else "(%s)" % extent))
    ctx["decompose"] = [{"assign": a} for a in lines]
    ctx["sequential"] = _loops(pr, seq)
    ctx["total"] = [pr.index(sympy.Max(l.hi - l.lo, 0)) for l in par]
    if k.gemm is None:
        ctx["params"] = ctx.get("params", []) + ["_total"]
        ctx["depth"] = 2 + len(seq)
    else:
        ctx["depth"] = 2


def entry_context(plan: OpPlan, entry: str, kernels, statements, returned, target: str) -> dict:
    """The host wrapper of one entry point (forward, backward or step)."""
    p = plan.p
    hp = HostPrinter(int_symbols=plan.lowerer.int_symbols)
    if entry in plan.inputs:
        inputs = plan.inputs[entry]
    elif entry == "step":
        params = [d.name for d in p.args]
        params += [n for n in p.state if n not in params]
        inputs = [decl_of(p, n) for n in params]
    elif entry == "fwd":
        inputs = list(p.args)
    else:  # bwd and its variants
        inputs = list(p.seeds) + list(p.args)
    params = [d.name for d in inputs]
    inplace = set(returned) if entry == "step" else set()
    convert = []
    for d in inputs:
        kind = "scalar" if (d.rank == 0 or d.name in p.scalars) else d.dtype
        convert.append({"name": d.name, "kind": kind, "inplace": d.name in inplace})
    # bind dimensions from shapes: the first axis that names a dimension binds it,
    # every other axis is checked once derived dimensions are known
    bound = {}
    bind = []
    checks = []
    derived_exprs = {s: str(e) for s, e in p.derived_dims}
    dims = {d.name for d in p.dims}
    for d in inputs:
        if d.rank == 0 or d.name in p.scalars:
            continue
        shape = d.shape
        if plan.flat and len(shape) != 1:
            shape = (sympy.Mul(*shape),)
        axes = []
        for ax, e in enumerate(shape):
            e = sympy.sympify(e)
            if isinstance(e, sympy.Symbol) and e.name in dims and e.name not in bound:
                axes.append({"axis": ax, "dim": e.name})
                bound[e.name] = "from %s axis %d" % (d.name, ax)
            else:
                if isinstance(e, sympy.Symbol) and e.name in bound:
                    why = bound[e.name]
                elif e in derived_exprs:
                    why = "derived: %s" % derived_exprs[e]
                else:
                    why = "expected"
                checks.append({"name": d.name, "axis": ax, "dim": str(e), "expr": hp.index(e), "why": why})
        bind.append({"name": d.name, "rank": len(shape), "axes": axes})
    missing = sorted(n for n in dims if n not in bound)
    if missing:
        raise ValueError("%s: dimensions %s are not bound by any argument" % (p.name, ", ".join(missing)))
    derived = [{"name": s.name, "expr": hp.index(e)} for s, e in p.derived_dims]
    import os

    derived_exprs = {s.name: str(e) for s, e in p.derived_dims}
    relations = []
    for lhs, rhs, text in p.relations:
        names = sorted({s.name for s in (lhs.free_symbols | rhs.free_symbols)})
        relations.append({
            "text": text,
            "lhs": hp.index(lhs),
            "rhs": hp.index(rhs),
            "lhs_text": sympy.sstr(lhs),
            "rhs_text": sympy.sstr(rhs),
            "sizes": _sizes_dict(names, bound, derived_exprs),
        })
    read_checks = []
    for read, tensor, axis, least, greatest, size, extents in p.read_checks:
        names = sorted({s.name for e in (least, greatest, size, *extents) for s in sympy.sympify(e).free_symbols})
        read_checks.append({
            "read": "%s[%s]" % (tensor, ", ".join(hp.index(i) for i in read.indices)),
            "tensor": tensor,
            "axis": axis,
            "least": hp.index(least),
            "greatest": hp.index(greatest),
            "size": hp.index(size),
            "extents": "(%s,)" % ", ".join(hp.index(x) for x in extents),
            "sizes": _sizes_dict(names, bound, derived_exprs),
        })
    # arrays the kernels use that are not arguments
    given = set(params)
    used = []
    for k in kernels:
        for a in k.arrays:
            if a not in given and a not in used:
                used.append(a)
    order = [d.name for d in tensor_decls(p)]
    used.sort(key=order.index)
    if entry == "step":
        results = []
    elif entry == "fwd":
        results = [d.name for d in p.outputs]
    else:
        results = list(returned)
    missing = [n for n in results if n not in used]
    if missing:  # a result the kernels do not write (an argument passed through)
        raise ValueError("%s %s: results %s are not computed by its kernels" % (p.name, entry, ", ".join(missing)))
    alloc = []
    for name in used:
        d = decl_of(p, name)
        if d.rank == 0 or name in p.scalars:
            shape = "(1,)"
        else:
            dims_ = [hp.index(s) for s in d.shape]
            shape = "(%s,)" % dims_[0] if len(dims_) == 1 else "(%s)" % ", ".join(dims_)
        alloc.append(
            {
                "name": name,
                "shape": shape,
                "dtype": "np.int64" if d.dtype == "int" else "_dtype",
                "zero": plan.needs_zero(name, statements),
                "result": name in results,
            }
        )
    # kernel calls
    float_attrs = {a.name for a, v in p.attrs if not plan.attr_int[a.name]}
    calls = []
    for k in kernels:
        args = []
        for a in k.arrays:
            args.append(a)
        for s in k.symbols:
            args.append(s.name)
        call = {"kernel": k.name, "args": args, "gemm": k.gemm is not None}
        if target == "cuda":
            pr = _printers(plan, "cuda")
            if k.gemm is not None:
                call["m"] = hp.index(k.gemm.m)
                call["n"] = hp.index(k.gemm.n)
            else:
                ctx = {}
                cuda_layout(ctx, k, pr)
                total = [hp.index(sympy.Max(l.hi - l.lo, 0)) for l in parallel_nest(k)[: len(ctx["parallel"])]]
                call["total"] = " * ".join(t if sympy.Symbol(t).is_Atom and t.isidentifier() else "(%s)" % t for t in total) if total else "1"
        calls.append(call)
    result_kinds = []
    for n in results:
        d = decl_of(p, n)
        result_kinds.append({"name": n, "scalar": d.rank == 0 or n in p.scalars})
    symbols_used = sorted({s.name for k in kernels for s in k.symbols})
    attrs = [a.name for a, _ in p.attrs]
    keywords = ([p.step_counter.name] if entry == "step" and p.step_counter is not None else []) + attrs
    signature = ", ".join(params + (["*"] + keywords if keywords else []))
    if entry == "fwd":
        doc = "Forward of %s: %s from %s." % (p.name, ", ".join(d.name for d in p.outputs), ", ".join(params))
    elif entry == "fwd_saving":
        doc = "Forward of %s: %s from %s, with what the backward reads of its reductions." % (
            p.name, ", ".join(results), ", ".join(params))
    elif entry.endswith("_saved"):
        doc = "Backward of %s: gradients %s from %s (the forward's reductions passed in)." % (
            p.name, ", ".join(results), ", ".join(params))
    elif entry == "step":
        doc = "One in-place %s step: updates %s." % (p.name, ", ".join(returned))
    elif entry == "jvp":
        doc = "Forward mode of %s: the tangents %s of the outputs from %s (forward recomputed)." % (
            p.name, ", ".join(results), ", ".join(params))
    elif entry == "hvp":
        doc = "Second order of %s: %s, the derivatives of the gradients along the tangents, from %s (forward and backward recomputed)." % (
            p.name, ", ".join(results), ", ".join(params))
    else:
        doc = "Backward of %s: gradients %s from %s (forward recomputed)." % (p.name, ", ".join(results), ", ".join(params))
    # the compiled core: arrays already checked and converted; dimensions from shapes,
    # float attributes cast to the arrays' float type, outputs allocated inside
    floats = [c["name"] for c in convert if c["kind"] != "int"]
    casts = [a for a in attrs if a in float_attrs and a in symbols_used]
    return {
        "signature": signature,
        "doc": doc,
        "core": core_name(p.name, entry),
        "alloc_fn": alloc_name(p.name, entry),
        "into_fn": into_name(p.name, entry),
        "core_args": params + keywords,
        "core_doc": "%s Compiled; the arguments are already checked (C-contiguous arrays of one float type)." % doc,
        "dtype_source": floats[0] if floats else None,
        "wrapper": entry not in plan.variants,
        "arrays": [c["name"] for c in convert if c["kind"] != "scalar"],
        "name": "_%s_%s" % (plan.id, entry),
        "entry": entry,
        "op": p.name,
        "params": params,
        "attrs": attrs,
        "float_attrs": casts,
        "int_attrs": [a for a in attrs if a not in float_attrs],
        "counter": p.step_counter.name if (entry == "step" and p.step_counter is not None) else None,
        "convert": convert,
        "bind": bind,
        "derived": derived,
        "relations": relations,
        "read_checks": read_checks,
        "spec_file": os.path.basename(p.source),
        "checks": checks,
        # the facts its gradients were derived from, checked before anything runs
        "assume": assumption_checks(p) if entry.startswith("bwd") or entry == "hvp" else [],
        "alloc": alloc,
        "calls": calls,
        "results": result_kinds,
        "result_names": [r["name"] for r in result_kinds],
        "array_results": [r["name"] for r in result_kinds if not r["scalar"]],
        # what the float type is needed for once the results are given
        "needs_dtype": bool(casts) or any(not a["result"] for a in alloc),
        # what the wrapper returns of the core's results: scalars as numbers (the core
        # returns them as one-element arrays), flat results in the arguments' shape
        "returns": [
            "%s[0]" % r["name"] if r["scalar"] else ("%s.reshape(_shape)" % r["name"] if plan.flat else r["name"])
            for r in result_kinds
        ],
        "flat": plan.flat,
    }


def _sizes_dict(names, bound, derived_exprs) -> str:
    """Python source of {name: (value, where it comes from)} for a size check's message."""
    def origin(n):
        if n in bound:
            return bound[n]
        return "derived: %s" % derived_exprs[n] if n in derived_exprs else "attribute"

    return "{%s}" % ", ".join("%r: (%s, %r)" % (n, n, origin(n)) for n in names)


def assumption_checks(p: Program) -> list:
    """The run-time checks of an op's assumptions (derive/assumptions.py)."""
    return [{"name": a.tensor, "axes": "(%s,)" % ", ".join("%d" % k for k in a.axes), "value": repr(a.value),
             "free": a.free, "text": "%s (%s)" % (a.text, p.source)} for a in p.assumptions]


def op_context(plan: OpPlan, target: str) -> dict:
    p = plan.p
    hp = HostPrinter(int_symbols=plan.lowerer.int_symbols)
    kernels = []
    entries = {}
    seen = {}
    for entry, ks, statements, returned in plan.entries[target]:
        # a kernel identical to one of an earlier entry (backward recomputing the
        # forward) is emitted once; new ones are numbered per entry point
        number = 0
        for k in ks:
            ctx = kernel_context(plan, k, target)
            key = _kernel_key(ctx)
            if key in seen:
                k.name = seen[key]
            else:
                k.name = ctx["name"] = "_%s_%s%d" % (plan.id, entry, number)
                number += 1
                seen[key] = k.name
                kernels.append(ctx)
        entries[entry] = entry_context(plan, entry, ks, statements, returned, target)
    ctx = {
        "name": p.name,
        "id": plan.id,
        "kind": p.kind,
        "source": p.source,
        "doc": p.doc,
        "attrs": [{"name": a.name, "default": v} for a, v in p.attrs],
        "arg_names": [d.name for d in p.args],
        "differentiable": list(p.grad_of),
        "state": list(p.state),
        # per-step scalar state: (name, initial value) in state order, None for arrays
        "state_init": [dict(p.state_init).get(n) for n in p.state],
        "scalar_state": bool(p.state_init),
        "latex_lines": p.latex.splitlines(keepends=True),
        "kernels": kernels,
        "entries": entries,
        "schedule": None,
        "n_seeds": len(p.seeds),
        "funcs": _funcs(plan),
    }
    if p.kind == "schedule":
        ctx["schedule"] = schedule_context(p, hp)
    return ctx


def _funcs(plan: OpPlan):
    """(key, function name) pairs for the op's entry in ``_FUNCS``."""
    names = {"fwd": "forward", "bwd": "backward", "step": "step", "jvp": "jvp", "hvp": "hvp"}
    out = [(names[entry], "_%s_%s" % (plan.id, entry)) for entry, *_ in plan.entries["cpu"] if entry not in plan.variants]
    if plan.p.kind == "optimizer":
        out.append(("init_state", "_%s_init_state" % plan.id))
    if plan.p.kind == "schedule":
        out.append(("lr", "_%s_lr" % plan.id))
    return sorted(out)


def _kernel_key(ctx: dict):
    return repr({k: v for k, v in ctx.items() if k != "name"})


def schedule_context(p: Program, hp: HostPrinter) -> dict:
    if len(p.step) + len(p.forward) != 1:
        raise ValueError("%s: a schedule has exactly one statement (lr = ...)" % p.name)
    (stmt,) = p.step or p.forward
    t = p.step_counter if p.step_counter is not None else sympy.Symbol("t")
    return {
        "counter": t.name,
        "expr": hp.expr(stmt.body),
        "equation": stmt.equation or "lr = %s" % stmt.body,
    }


# --------------------------------------------------------------------------- modules
def header_context(programs, template: str, command: str) -> dict:
    sources = []
    for p in programs:
        if p.source not in sources:
            sources.append(p.source)
    return {"sources": sources, "template": template, "command": command}


def render_group(programs, module: str, command: str, single: str | None = None, contract: bool = True):
    """Text of the CPU module and (when any op has kernels) the CUDA companion.

    ``module`` is the module's file stem; ``single`` names the op of a one-op user
    module (its ``op()`` then needs no name). ``contract=False`` keeps the CPU's
    contractions as loops (the reference the tests compare the BLAS lowering with)."""
    plans = [OpPlan(p, contract) for p in programs]
    cpu_ops = [op_context(pl, "cpu") for pl in plans]
    helpers = sorted({h for o in cpu_ops for k in o["kernels"] for h in k["helpers"]})
    has_cuda = any(o["kind"] != "schedule" for o in cpu_ops)
    scalar_state = any(o["scalar_state"] for o in cpu_ops)
    assumptions = any(pl.p.assumptions for pl in plans)
    relations = any(pl.p.relations for pl in plans)
    read_checks = any(pl.p.read_checks for pl in plans)
    cpu = render(
        CPU_TEMPLATE,
        header=header_context(programs, CPU_TEMPLATE, command),
        scalar_state=scalar_state,
        assumptions=assumptions,
        relations=relations,
        read_checks=read_checks,
        module=module,
        ops=cpu_ops,
        helpers=helpers,
        single=single,
        has_kernels=has_cuda,
        threads=CUDA_THREADS,
        tile=CUDA_TILE,
    )
    if not has_cuda:
        return cpu, None
    cuda_ops = [op_context(pl, "cuda") for pl in plans if pl.p.kind != "schedule"]
    cuda_helpers = sorted({h for o in cuda_ops for k in o["kernels"] for h in k["helpers"]})
    text = render(
        CUDA_TEMPLATE,
        header=header_context(programs, CUDA_TEMPLATE, command),
        scalar_state=scalar_state,
        assumptions=assumptions,
        relations=relations,
        read_checks=read_checks,
        module=module,
        ops=cuda_ops,
        helpers=cuda_helpers,
        has_gemm=any(k["gemm"] for o in cuda_ops for k in o["kernels"]),
        single=single,
        has_kernels=True,
        threads=CUDA_THREADS,
        tile=CUDA_TILE,
    )
    return cpu, text


def render_package(groups: dict, command: str) -> str:
    """generated/__init__.py: ``ops()`` and ``op()`` over the group modules."""
    names = sorted((name, module) for module, names in groups.items() for name in names)
    return render(
        PACKAGE_TEMPLATE,
        header={"sources": ["derive.library()"], "template": PACKAGE_TEMPLATE, "command": command},
        ops=[{"name": n, "module": m} for n, m in names],
    )
