"""Forward mode in index notation: the tangent of a program, statement by statement.

A statement ``T[o] = R_r body`` reads tensors ``X[a(o, r)]``. Given tangents ``tX`` of
the tensors it reads, the tangent of its target is

    tT[o] = R'_r  d/de body[X[a] -> X[a] + e tX[a]]  at e = 0

where R' is R for a sum (and for no reduction), and for a maximum the body's tangent at
the argmax the forward recorded (the element PyTorch routes a maximum's derivative to).
Each tangent read is put exactly where its read stands, inside the same bounds guard, so
the tangent needs no guard of its own and never reads outside a tensor. Kinks are
differentiated as in reverse mode (derive/differentiate.py's ``local_partial``: ``|u|``
has slope ``sign(u)``, floor and sign have slope 0, a tie of ``Max`` splits evenly), so
forward and reverse mode agree everywhere. A scatter or accumulating statement keeps
its form: its tangent adds into the tangent of its target.

Nothing is differentiated twice by hand: the Jacobian-vector product is the tangent of
the forward statements, and the Hessian-vector product (forward over reverse) is the
tangent of the forward *and* backward statements, with the output gradients (the seeds)
held fixed. A stability maximum (``m`` of a shifted sum of exponentials, marked
stop-gradient by derive/normalize.py) has tangent 0: the shifted form does not depend on
it, exactly as in reverse mode.
"""

from __future__ import annotations

import sympy

from . import ir
from .differentiate import NotDifferentiable, local_partial, read_of


def tangent_name(name: str, taken) -> str:
    """``t_<name>``, made unique against the program's other tensor names."""
    t = "t_" + name
    while t in taken:
        t = "t" + t
    return t


class Tangents:
    """Tangent statements of a list of :class:`ir.Assign`, in order.

    ``varying``: tensor name -> tangent name for the tensors that carry a tangent on entry
    (the differentiable arguments); ``constant``: targets whose tangent is 0 by
    construction (stop-gradient statements); ``scalars``: tensors of shape () (read as
    plain Symbols); ``shapes``: tensor name -> shape (for the zeroed start of a tangent
    that is first written by accumulation); ``taken``: names already used.
    """

    def __init__(self, varying: dict, constant, scalars, shapes: dict, taken):
        self.names = dict(varying)
        self.constant = set(constant)
        self.scalars = set(scalars)
        self.shapes = dict(shapes)
        self.taken = set(taken) | set(varying.values())
        self.written: set[str] = set()  # tangents already written by a statement
        self.statements: list[ir.Assign] = []
        self.created: list[str] = []  # tangent tensors introduced, in order

    def name(self, tensor: str) -> str:
        if tensor not in self.names:
            t = tangent_name(tensor, self.taken)
            self.taken.add(t)
            self.names[tensor] = t
            self.created.append(tensor)
        return self.names[tensor]

    def _reads(self, body):
        """The reads of ``body`` that carry a tangent, in a deterministic order."""
        found = {}
        for node in sympy.preorder_traversal(body):
            if isinstance(node, sympy.Indexed) and str(node.base) in self.names:
                found[(str(node.base), sympy.srepr(node))] = node
            elif isinstance(node, sympy.Symbol) and node.name in self.scalars and node.name in self.names:
                found[(node.name, "")] = node
        return [found[k] for k in sorted(found)]

    def _tangent_read(self, read):
        if isinstance(read, sympy.Indexed):
            return read_of(self.names[str(read.base)], read.indices)
        return read_of(self.names[read.name], ())

    def derivative(self, body, where: str = ""):
        """d/de body[X -> X + e tX] at e = 0."""
        reads = self._reads(body)
        if not reads:
            return sympy.S.Zero
        e = sympy.Symbol("_e", real=True)
        moved = body.xreplace({r: r + e * self._tangent_read(r) for r in reads})
        try:
            slope = local_partial(moved, e)
        except NotDifferentiable as exc:
            raise ValueError(f"{where}: {exc.function} has no derivative SymPy can evaluate") from None
        return self.tidy(sympy.sympify(slope).subs(e, 0))

    @staticmethod
    def tidy(body):
        """A small tangent in factored form when that is shorter: the second derivative
        of a sigmoid reads sigma (1 - sigma) (1 - 2 sigma), as in the textbooks, instead of
        the chain rule's two expanded products."""
        if body.has(sympy.Piecewise) or sympy.count_ops(body) > 40:
            return body
        # functions and powers with symbolic exponents are held whole: factoring must not
        # split the stabilised exp(x - m) into exp(x) exp(-m)
        held = {}

        def hold(e):
            if isinstance(e, sympy.Function) or (isinstance(e, sympy.Pow) and not e.exp.is_Number):
                held.setdefault(e, sympy.Dummy("h%d" % len(held)))
                return held[e]
            if e.is_Atom or isinstance(e, sympy.Indexed):
                return e
            return e.func(*[hold(a) for a in e.args])

        factored = sympy.factor(hold(body)).xreplace({v: k for k, v in held.items()})
        return factored if sympy.count_ops(factored) < sympy.count_ops(body) else body

    def add(self, a: ir.Assign) -> None:
        """The tangent statement(s) of ``a``."""
        if a.target in self.constant:
            return
        if a.reduce == "max":
            body = self.derivative(a.body, a.equation)
            if body == 0:
                return self._zero_if_overwritten(a)
            if not a.argmax:
                # reverse mode sends no gradient into this maximum (it is read only
                # where the derivative is 0: inside a condition), so no argmax was
                # recorded; its tangent is never used either
                self.constant.add(a.target)
                return
            at = {}
            for lp, am in zip(a.over, a.argmax):
                at[lp.index] = read_of(am, [l.index for l in a.free])
            body = body.xreplace(at)
            self._emit(a, body, reduce="none", over=())
            return
        body = self.derivative(a.body, a.equation)
        if body == 0:
            return self._zero_if_overwritten(a)
        self._emit(a, body, a.reduce, a.over)

    def _zero_if_overwritten(self, a: ir.Assign) -> None:
        """A statement that overwrites a tensor with a value of tangent 0 (the zeroed
        start of a gradient) zeroes its tangent too, if that tangent exists already."""
        if not a.accumulate and not a.scatter and a.target in self.names and self.names[a.target] in self.written:
            self._emit(a, sympy.S.Zero, "none", ())

    def _emit(self, a: ir.Assign, body, reduce: str, over) -> None:
        t = self.name(a.target)
        accumulate = a.accumulate
        if accumulate and t not in self.written:
            # the first contribution to this tangent adds into it: start from zero
            shape = self.shapes[a.target]
            idx = tuple(sympy.Symbol(f"i{k}", integer=True) for k in range(len(shape)))
            loops = tuple(ir.Loop(i, sympy.S.Zero, n) for i, n in zip(idx, shape))
            self.statements.append(ir.Assign(t, loops, sympy.S.Zero, equation=f"{t} = 0"))
            self.written.add(t)
        lhs = t + ("[%s]" % ", ".join(str(x) for x in a.scatter) if a.scatter else
                   "[%s]" % ", ".join(str(lp.index) for lp in a.free) if a.free else "")
        rhs = sympy.sstr(body)
        if reduce == "sum":
            rhs = "sum(%s, %s)" % (rhs, ", ".join(str(lp.index) for lp in over))
        text = "%s %s %s" % (lhs, "+=" if accumulate else "=", rhs)
        self.statements.append(ir.Assign(t, a.free, body, reduce, tuple(over), accumulate, (), text, a.scatter, a.where))
        self.written.add(t)


def _zero(name: str, shape) -> ir.Assign:
    idx = tuple(sympy.Symbol(f"i{k}", integer=True) for k in range(len(shape)))
    return ir.Assign(name, tuple(ir.Loop(i, sympy.S.Zero, n) for i, n in zip(idx, shape)), sympy.S.Zero,
                     equation=f"{name} = 0 (no path from a differentiable argument)")


def forward_mode(program: ir.Program, constant=()) -> dict:
    """The fields of :class:`ir.Program` for ``jvp`` and ``hvp`` (``dataclasses.replace``
    them in): the tangents of the differentiable arguments (the extra arguments of
    both), the JVP's statements and outputs (one tangent per output), the HVP's
    statements (the tangent of forward and backward, seeds held fixed) and outputs (one
    per gradient), and every tangent tensor in between."""
    if not program.grad_of:
        return {}
    shapes = {t.name: t.shape for t in program.all_tensors()}
    taken = set(shapes)
    varying = {}
    for a in program.grad_of:
        varying[a] = tangent_name(a, taken | set(varying.values()))
    tangents = tuple(ir.TensorDecl(varying[a], shapes[a], "tangent") for a in program.grad_of)

    tg = Tangents(varying, constant, program.scalars, shapes, taken)

    def results(statements, wanted):
        """The tangents of ``wanted``, each written (a tensor no tangent reaches gets
        an explicit zero, under a name of its own)."""
        outs = []
        for name in wanted:
            t = tg.names.get(name)
            if t is None or t not in tg.written:
                t = tangent_name(name, tg.taken)
                tg.taken.add(t)
                statements.append(_zero(t, shapes[name]))
            outs.append(ir.TensorDecl(t, shapes[name], "tangent"))
        return tuple(statements), tuple(outs)

    # one pass: the forward's tangents are the JVP, and the HVP goes on from them
    for a in program.forward:
        tg.add(a)
    jvp, jvp_out = results(list(tg.statements), [o.name for o in program.outputs])
    for a in program.backward:
        tg.add(a)
    hvp, hvp_out = results(list(tg.statements), [g.name for g in program.grads])
    outs = {d.name for d in jvp_out + hvp_out}
    inner = {tg.names[n]: ir.TensorDecl(tg.names[n], shapes[n], "tangent") for n in tg.created
             if tg.names[n] not in outs}
    scalars = tuple(program.scalars) + tuple(
        d.name for d in (*tangents, *jvp_out, *hvp_out, *inner.values()) if d.rank == 0 and d.name not in program.scalars)
    return dict(tangents=tangents, jvp=jvp, jvp_outputs=jvp_out, hvp=hvp, hvp_outputs=hvp_out,
                tangent_intermediates=tuple(inner.values()), scalars=tuple(dict.fromkeys(scalars)))
