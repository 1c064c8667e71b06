"""Module emission: Programs to the text of generated modules.

Python decides everything here (what kernels exist, their arguments, allocations,
checks) and hands plain dicts of printed strings to the templates in
``codegen/templates/``, which only lay them out. What differs between targets
(printer, lowering, layout, launch sizes, scatter stores, templates, file names) it
asks the target objects of codegen/targets/.
"""

from __future__ import annotations

import ast
import hashlib
import keyword

import sympy

from derive.errors import SpecError
from derive.ir import Program

from . import contract as cn
from . import targets as tg
from .lower import Kernel, Lowerer, decl_of, read_names, safe_index_names, tensor_decls, written_names
from .printers import RESERVED_NAMES, HostPrinter
from .targets.base import loops as loops_context
from .targets.numba_cpu import reduce_outer  # noqa: F401 (tests import it from here)
from .template_util import render

GROUPS = {
    "activation": "activations",
    "layer": "layers",
    "loss": "losses",
    "optimizer": "optimizers",
    "schedule": "schedules",
}
PACKAGE_TEMPLATE = "package/__init__.py.jinja"
GROUP_TEMPLATE = "package/group.py.jinja"
DERIVATIONS_TEMPLATE = "package/derivations.py.jinja"


def group_of(program: Program) -> str:
    try:
        return GROUPS[program.kind]
    except KeyError:
        raise ValueError("%s: unknown op kind %r" % (program.name, program.kind)) from None


def ident(name: str) -> str:
    """A Python identifier fragment for an op name (a variant's ``mse[reduction=none]``:
    ``mse_reduction_none``)."""
    return "".join(c if c.isalnum() else "_" for c in name.replace("]", ""))


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


def work_name(op: str, entry: str) -> str:
    """The function allocating an entry point's intermediates, its workspace
    (``_softmax_fwd_work``), where a target's ``_into`` form would otherwise allocate
    them on every call (CUDA): a model step allocates it once per batch shape and
    passes it to the ``_into`` form."""
    return "_%s_%s_work" % (ident(op), entry)


# --------------------------------------------------------------------------- per op plan
class OpPlan:
    """Everything every target needs for one op: lowered kernels per entry point and
    target, and the host-side bookkeeping (binding, allocation, returns). Each target
    says how it lowers (codegen/targets/): a target with ``contractions`` turns them
    into BLAS products (codegen/contract.py), the others keep their loops."""

    def __init__(self, program: Program, contract: bool = True):
        program = self.p = safe_index_names(check_names(program))
        self.id = ident(program.name)
        self.lowerer = Lowerer(program)
        self.lowerers = {
            t.name: Lowerer(program, contract=contract) if t.contractions else self.lowerer for t in tg.all_targets()
        }
        self.attr_int = {
            a.name: isinstance(v, int) and not isinstance(v, bool) for a, v in program.attrs
        }
        self.entries = {t: [] for t in self.lowerers}  # target name -> [(entry, kernels, statements, returned)]
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
        is a compiled core for the fused model steps only (no Python wrapper), emitted
        by the targets whose ``variants`` say so."""
        if inputs is not None:
            self.inputs[entry] = inputs
        if variant:
            self.variants.add(entry)
        for target, lowerer in self.lowerers.items():
            if variant and not tg.get(target).variants:
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
def _loops(pr, loops):
    return loops_context(pr, loops)


def _subscript(pr, item, lw):
    if item.target in lw.scalars and not item.index:
        return "0"
    return ", ".join(pr.index(i) for i in item.index) or "0"


def kernel_context(plan: OpPlan, k: Kernel, target) -> dict:
    target = tg.get(target)
    pr = target.make_printer(plan.lowerer)
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
                "scatter": target.scatter_store(pr, it) if it.scatter else "",
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
    target.layout(ctx, k, pr)
    return ctx



def entry_context(plan: OpPlan, entry: str, kernels, statements, returned, target) -> dict:
    """The host wrapper of one entry point (forward, backward or step)."""
    target = tg.get(target)
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
        target.launch(call, k, plan, hp)
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
    result_shapes = [
        "()" if r["scalar"] else ("_shape" if plan.flat else next(a["shape"] for a in alloc if a["name"] == r["name"]))
        for r in result_kinds
    ]
    return {
        "signature": signature,
        "doc": doc,
        "core": core_name(p.name, entry),
        "alloc_fn": alloc_name(p.name, entry),
        "into_fn": into_name(p.name, entry),
        "work_fn": work_name(p.name, entry),
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
        # the shape of each result as the wrapper returns it, from the arguments' shapes
        # (``_shape``: that of the arguments of a flat op); what ``_shapes`` returns,
        # after the sizes those shapes need
        "result_shapes": result_shapes,
        "shape_sizes": [] if plan.flat else _sizes_needed(result_shapes, bind, derived),
    }


def _sizes_needed(shapes, bind, derived) -> list:
    """The assignments (``{"name", "expr"}``, in order: dimensions read from the
    arguments' shapes, then derived ones) that the expressions ``shapes`` need."""
    import re

    def names(text):
        return set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text))

    sizes = [{"name": a["dim"], "expr": "%s.shape[%d]" % (b["name"], a["axis"])} for b in bind for a in b["axes"]]
    sizes += [{"name": d["name"], "expr": d["expr"]} for d in derived]
    needed = set().union(*(names(t) for t in shapes)) if shapes else set()
    kept = []
    for size in reversed(sizes):
        if size["name"] in needed:
            needed |= names(size["expr"])
            kept.append(size)
    return kept[::-1]


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


def op_context(plan: OpPlan, target) -> dict:
    target = tg.get(target)
    p = plan.p
    hp = HostPrinter(int_symbols=plan.lowerer.int_symbols)
    kernels = []
    entries = {}
    seen = {}
    for entry, ks, statements, returned in plan.entries[target.name]:
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
        # the allowed values of the attributes that declare them, and the variants the
        # attribute values select (op() checks and picks: cpu/runtime.py.jinja)
        "domains": {name: dict(table, text=text) for name, table, text in p.attr_domains},
        "variants": tuple((condition, v.name) for condition, v in p.variants),
        "variant_of": p.extra.get("variant_of") if p.extra else None,
        "shorthands": [{"name": k, "parts": list(v)} for k, v in p.shorthands],
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
    out = [(names[entry], "_%s_%s" % (plan.id, entry)) for entry, *_ in plan.entries[tg.primary().name] if entry not in plan.variants]
    if "fwd" in [entry for entry, *_ in plan.entries[tg.primary().name]] and plan.p.outputs:
        out.append(("shapes", "_%s_fwd_shapes" % plan.id))
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
def with_variants(programs) -> list:
    """``programs`` with each one's variants (Program.variants) after it: a variant is
    emitted in its op's module as an op of its own that ``op()`` picks by the attribute
    values, never listed by ``ops()``."""
    out = []
    for p in programs:
        out.append(p)
        out.extend(v for _, v in p.variants)
    return out


def header_context(programs, template: str, command: str) -> dict:
    sources = []
    for p in programs:
        if p.source not in sources:
            sources.append(p.source)
    return {"sources": sources, "template": template, "command": command}


def render_targets(
    programs,
    module: str,
    command: str,
    single: str | None = None,
    contract: bool = True,
    runtime: dict | None = None,
    latex_module: dict | None = None,
) -> dict:
    """{target name: text of its module} for a group of ops (or one op); None for a
    target that renders none of them (schedules have no CUDA companion).

    ``module`` is the module's file stem; ``single`` names the op of a one-op module
    (its ``op()`` then needs no name). ``contract=False`` keeps the contractions of
    every target as loops (the reference the tests compare the BLAS lowering with).

    By default a module is self-contained: it holds its runtime helpers and its
    derivations. ``runtime`` ({target name: :func:`runtime_info`}) makes each module
    import the runtime names it uses from the shared runtime module instead, and
    ``latex_module`` ({"module", "file"}) makes ``op.latex()`` read the derivation from
    that module (the library's layout: see :func:`render_op_modules`)."""
    plans = [OpPlan(p, contract) for p in with_variants(programs)]
    flags = {
        "scalar_state": any(pl.p.state_init for pl in plans),
        "assumptions": any(pl.p.assumptions for pl in plans),
        "relations": any(pl.p.relations for pl in plans),
        "read_checks": any(pl.p.read_checks for pl in plans),
        # whether the module has kernels at all (a module of schedules has none)
        "has_kernels": any(pl.p.kind != "schedule" for pl in plans),
    }
    texts = {}
    for target in tg.all_targets():
        rendered = [pl for pl in plans if target.renders(pl.p)]
        if not rendered:
            texts[target.name] = None
            continue
        ops = [op_context(pl, target) for pl in rendered]
        context = dict(
            header=header_context(programs, target.module_template, command),
            module=module,
            ops=ops,
            helpers=sorted({h for o in ops for k in o["kernels"] for h in k["helpers"]}),
            single=single,
            runtime_import=None if runtime is None else dict(runtime[target.name], names=[]),
            latex_module=latex_module,
            **flags,
            **target.module_context(ops),
        )
        text = render(target.module_template, **context)
        if runtime is not None:
            # import exactly the runtime names the module uses: render once to find them
            names = sorted(loaded_names(text) & runtime[target.name]["names"])
            context["runtime_import"]["names"] = names
            text = render(target.module_template, **context)
        texts[target.name] = text
    return texts


def loaded_names(text: str) -> set:
    """The global names Python source reads (``ast.Name`` nodes)."""
    return {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}


def defined_names(text: str) -> set:
    """The top-level functions, classes and assigned names of Python source."""
    out = set()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return out


def digest(text: str) -> str:
    """The short sha256 a generated file records of a file it depends on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def render_runtime(target, command: str) -> str:
    """``generated/_runtime<suffix>.py``: every runtime helper of ``target``, once."""
    target = tg.get(target)
    return render(
        target.runtime_template,
        header={"sources": ["derive.library() (the runtime its op modules share)"], "template": target.runtime_template, "command": command},
        module=target.runtime_module,
        helpers=target.helpers(),
        scalar_state=True,
        assumptions=True,
        relations=True,
        read_checks=True,
        **target.module_context([]),
    )


def runtime_info(target, text: str) -> dict:
    """What an op module needs to import from a runtime module of the library."""
    target = tg.get(target)
    return {
        "module": ".." + target.runtime_module,
        "file": target.runtime_module + ".py",
        "digest": digest(text),
        "names": frozenset(n for n in defined_names(text) if n.startswith("_") or n == "Op"),
    }


def module_name(name: str) -> str:
    """The file stem of an op's module: its name as a Python identifier."""
    stem = ident(name)
    if not stem or stem[0].isdigit() or keyword.iskeyword(stem):
        stem = "op_" + stem
    return stem


def op_module(program: Program) -> str:
    """The library module of an op, relative to ``generated`` (``layers.conv2d``)."""
    return "%s.%s" % (group_of(program), module_name(program.name))


def render_op_modules(programs, command: str) -> dict:
    """{path under generated/: text} for the library's ops: per target a runtime
    module (``_runtime.py``, ``_runtime_cuda.py``); per op its modules
    (``layers/conv2d.py``, ``layers/conv2d_cuda.py``) importing that runtime; per
    group ``__init__.py`` and ``_derivations.py`` (the LaTeX, out of the kernel
    modules); and the package's ``__init__.py``."""
    files = {}
    runtime = {}
    for target in tg.all_targets():
        text = render_runtime(target, command)
        files[target.runtime_module + ".py"] = text
        runtime[target.name] = runtime_info(target, text)
    groups: dict[str, list] = {}
    for p in programs:
        groups.setdefault(group_of(p), []).append(p)
    latex = {"module": "._derivations", "file": "_derivations.py"}
    for group in sorted(groups):
        stems = {}
        for p in groups[group]:
            stem = module_name(p.name)
            if stem in stems:
                raise ValueError("%s: ops %s and %s share the module name %s" % (group, stems[stem], p.name, stem))
            stems[stem] = p.name
            texts = render_targets([p], stem, command, single=p.name, runtime=runtime, latex_module=latex)
            for target in tg.all_targets():
                if texts[target.name] is not None:
                    files["%s/%s" % (group, target.module_file(stem))] = texts[target.name]
        files[group + "/_derivations.py"] = render(
            DERIVATIONS_TEMPLATE,
            header=header_context(groups[group], DERIVATIONS_TEMPLATE, command),
            group=group,
            ops=[{"name": p.name, "latex_lines": p.latex.splitlines(keepends=True)} for p in with_variants(groups[group])],
        )
        files[group + "/__init__.py"] = render(
            GROUP_TEMPLATE,
            header=header_context(groups[group], GROUP_TEMPLATE, command),
            group=group,
            ops=[p.name for p in groups[group]],
        )
    files["__init__.py"] = render_package({op_module(p): [p.name] for p in programs}, command)
    return files


def render_group(programs, module: str, command: str, single: str | None = None, contract: bool = True):
    """The texts of :func:`render_targets` as a tuple in target order: (the CPU
    module, the CUDA companion or None)."""
    texts = render_targets(programs, module, command, single, contract)
    return tuple(texts[t.name] for t in tg.all_targets())


def render_package(groups: dict, command: str) -> str:
    """generated/__init__.py: ``ops()`` and ``op()`` over the op modules (``groups``: {module: [op names]})."""
    names = sorted((name, module) for module, names in groups.items() for name in names)
    return render(
        PACKAGE_TEMPLATE,
        header={"sources": ["derive.library()"], "template": PACKAGE_TEMPLATE, "command": command},
        ops=[{"name": n, "module": m} for n, m in names],
    )
