"""The Numba CPU target: ``@njit`` kernels in ``<stem>.py``.

Single-threaded loops compiled with ``@njit(cache=True)``; contractions lowered to
matrix products (codegen/contract.py) that call ``np.dot`` through the ``_gemm``
helper; column sums run with their reduction loops outside (``reduce_outer``). Its
module is the primary one: the op specs, ``op()``, and the extra compiled cores the
fused model steps call. Templates: codegen/templates/cpu/.
"""

from __future__ import annotations

import contextlib

import sympy

from .. import contract as cn
from ..lower import DOT, Kernel
from ..printers import CPUPrinter
from .base import Target
from .base import extent as _extent
from .base import loops as _loops


class NumbaCPU(Target):
    name = "cpu"
    printer = CPUPrinter
    templates = "cpu"
    suffix = ""
    contractions = True
    variants = True
    model_cells = True
    model_inputs = True
    model_outputs = True
    model_modes = True
    model_folds = True
    primary = True

    def scatter_store(self, pr, item) -> str:
        """``target[idx] += value``: one worker runs every iteration that adds to an
        element, in order (codegen/lower.py's exclusive_loops)."""
        idx = ", ".join(pr.index(e) for e in item.scatter)
        return "%s[%s] += %s" % (item.target, idx, pr.index(item.local))

    def layout(self, ctx: dict, k: Kernel, pr) -> None:
        """Loops nested in the order of the kernel's free indices; sums with their
        loops outside when that walks memory contiguously; contractions as products."""
        ctx["depth"] = len(k.free) + 1
        ctx["reduce_outer"] = reduce_outer(k)
        if k.contract is not None:
            ctx["contract"] = contract_context(k, ctx, pr)
            used = {"gemm"} | ({"span"} if ctx["contract"]["uses_span"] else set())
            # the gathered operands print through pr too (softplus(x[...]) in a patch)
            ctx["helpers"] = sorted(set(pr.helpers_used) | used)


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

