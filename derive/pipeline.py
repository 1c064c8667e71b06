"""From an OpDef to a Program: bind, normalise, stabilise (derive/stabilize.py),
differentiate, simplify, substitute the gradients of statistics (derive/statistics.py),
lower.

This is the only place that knows the order of the passes. Lowering turns statements
and gradient terms into IR ``Assign``s: loops with ranges, out-of-bounds reads wrapped
as zeros (the spec language's padding rule), guards as ``Piecewise``.
"""

from __future__ import annotations

import sympy

from . import ir
from .assumptions import checked_assumptions
from .differentiate import Guard, differentiate, grad_name, read_of
from .errors import SpecError
from .latex import derivation_blocks, optimizer_blocks, render_tex, schedule_blocks
from .normalize import Stmt, normalize
from .simplify import simplify_terms
from .spec import OpDef, bind
from .stabilize import stabilize
from .statistics import substitute_statistics


def build(op: OpDef) -> ir.Program:
    if op.kind == "optimizer":
        return _build_optimizer(op)
    if op.kind == "schedule":
        return _build_schedule(op)
    bind(op)
    stmts = normalize(op)
    stabilize(stmts)
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
    backward = differentiate(stmts, wrt, dim_names, set(op.outputs), op.assumptions)
    simplify_terms(backward, stmts, shapes)
    substitute_statistics(backward, stmts, shapes, {grad_name(a) for a in diff_args})
    program = lower(op, stmts, backward, shapes, diff_args)
    blocks = derivation_blocks(op, stmts, backward, program)
    return _replace(program, latex=render_tex(blocks), extra={"blocks": blocks}, assumptions=checked_assumptions(op))


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


def _provably_inside(e, size, loops: dict, guards: list[Guard]) -> bool:
    if e in loops:
        lo, hi = loops[e]
        lo_ok = lo == 0 or (isinstance(lo, sympy.Max) and 0 in lo.args)
        hi_ok = sympy.simplify(hi - size) == 0 or (isinstance(hi, sympy.Min) and any(sympy.simplify(a - size) == 0 for a in hi.args))
        if lo_ok and hi_ok:
            return True
    for g in guards:
        if g.kind == "range" and g.expr == e and g.lo == 0 and sympy.simplify(g.hi - size) == 0:
            return True
    return False


def wrap_reads(body, shapes, loops: dict, guards: list[Guard]):
    """Wrap every read that may fall outside its tensor in Piecewise((read, inside), (0, True))."""
    mapping = {}
    for read in sorted(body.atoms(sympy.Indexed), key=sympy.default_sort_key):
        shape = shapes.get(str(read.base))
        if shape is None:
            continue
        conds = []
        for e, size in zip(read.indices, shape):
            if not _provably_inside(e, size, loops, guards):
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
    forward = []
    intermediates = []
    for s in stmts:
        free = tuple(ir.Loop(i, sympy.S.Zero, s.ranges[i]) for i in s.free)
        over = tuple(ir.Loop(i, sympy.S.Zero, s.ranges[i]) for i in s.over)
        loops = {lp.index: (lp.lo, lp.hi) for lp in free + over}
        body = wrap_reads(s.body, shapes, loops, [])
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
            body = wrap_reads(t.expr, shapes, loops, [])
            inside = [sympy.And(sympy.Ge(a, 0), sympy.Lt(a, n)) for a, n in zip(t.scatter, shape)
                      if not _provably_inside(a, n, loops, [])]
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
        if t.guards:
            body = sympy.Piecewise((body, sympy.And(*[g.condition() for g in t.guards])), (0, True))
        body = wrap_reads(body, shapes, loops, t.guards)
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
    derived = tuple((op.symbols[d], e) for d, e in op.derived_dims.items())
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
        attrs=attrs,
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
        doc=op.doc,
    )


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
        reads = {s.name for s in eq.rhs.free_symbols if isinstance(s, sympy.Symbol)}
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
            later = [e for e in op.equations[k + 1:]]
            if not any(target in {s.name for s in e.rhs.free_symbols} for e in later):
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
    steps = []
    for eq in op.equations:
        body = eq.rhs.xreplace(mapping)
        loops = (ir.Loop(n, sympy.S.Zero, N),) if eq.target in arrays else ()
        steps.append(ir.Assign(eq.target, loops, body, equation=eq.text))
    args = (ir.TensorDecl("p", (N,), "param"), ir.TensorDecl("g", (N,), "input"))
    state = tuple(ir.TensorDecl(s, (N,), "state") for s in op.state)
    state += tuple(ir.TensorDecl(s, (), "state") for s in op.scalar_state)
    locals_ = tuple(ir.TensorDecl(t, (N,) if e else (), "intermediate") for t, e in temps.items())
    scalars = tuple(op.scalar_state) + tuple(t for t, e in temps.items() if not e)
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
