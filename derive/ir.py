"""The kernel IR: the one interface between derive/ (which produces it) and codegen/
(which prints it).

derive/ turns a spec into a :class:`Program`: forward and backward as ordered lists of
:class:`Assign` statements in index notation, every gradient already derived,
contracted, simplified and stabilised. codegen/ knows nothing of any particular op; it
lowers each ``Assign`` to a loop nest (or a GEMM call when the statement has
matrix-product shape) for each target.

Conventions every producer guarantees and every consumer may rely on:

* Index symbols are ``sympy.Symbol(name, integer=True)``; dimensions are
  ``Symbol(name, integer=True, positive=True)``; attributes are Symbols too (their
  defaults live in ``Program.attrs``).
* Tensor reads in a body are ``sympy.Indexed(IndexedBase(name), *exprs)``. A tensor of
  shape ``()`` (a loss, its seed gradient) is read as the plain ``Symbol(name)`` and
  written by an ``Assign`` with empty ``free``; its name is in ``Program.scalars``.
* A read that may fall outside its tensor's bounds is already wrapped by derive in a
  ``Piecewise((read, inside), (0, True))``; codegen never adds bounds checks of its own.
* Guards (range conditions from delta contraction, the argmax routing of ``max``)
  appear as ``Piecewise`` in the body. Codegen prints them as scalar ternaries.
* Every order here (tensors, statements, loops) is deterministic: lists, never sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

ROLES = ("input", "param", "output", "intermediate", "seed", "grad", "state", "tangent")


def index(name: str) -> sympy.Symbol:
    """An index symbol: a loop variable in the generated code."""
    return sympy.Symbol(name, integer=True)


def dim(name: str) -> sympy.Symbol:
    """A dimension symbol: a size bound from an argument's shape or derived from attrs."""
    return sympy.Symbol(name, integer=True, positive=True)


@dataclass(frozen=True)
class TensorDecl:
    """A named array of the program.

    ``shape`` is a tuple of SymPy expressions over dimension and attribute symbols
    (``()`` for a scalar). ``dtype`` is ``"float"`` (the op's float type, float32 or
    float64 at run time) or ``"int"`` (int64 index data, never differentiated).
    """

    name: str
    shape: tuple[sympy.Expr, ...]
    role: str
    dtype: str = "float"

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Loop:
    """``for index in range(lo, hi)``: ``lo`` inclusive, ``hi`` exclusive.

    Bounds are SymPy integer expressions over dimensions, attributes and the indices
    of enclosing loops (tightened bounds of gather-form gradients depend on the free
    indices, e.g. the window of a transposed convolution). ``Max``/``Min`` and
    ``floor`` may appear in bounds.
    """

    index: sympy.Symbol
    lo: sympy.Expr
    hi: sympy.Expr


@dataclass(frozen=True)
class Assign:
    """``target[free] (= or +=) reduce_{over} body`` for every ``free`` in its range.

    * ``reduce == "none"``: ``over`` is empty; the body is computed per element.
    * ``reduce == "sum"``: the body is summed over the ``over`` loops (nested in order).
    * ``reduce == "max"``: the maximum of the body over ``over``; when ``argmax`` is not
      empty, ``argmax[k]`` names an int tensor (same shape as the target) that receives
      the value of ``over[k].index`` at the *first* maximal element in loop order.
    * ``accumulate``: add into the existing target instead of overwriting it (the
      target was written by an earlier statement).
    * ``scatter``: when not empty, the statement writes ``target[scatter]`` (index
      expressions over the loop indices) instead of ``target[free indices]``: ``free``
      is then the iteration space, not the target's shape, several iterations may hit
      the same element, and they add up (``accumulate`` is True; the target was zeroed
      by an earlier statement; codegen runs the iterations that may meet on one element
      in one worker, in loop order, so no target needs atomic adds). ``where`` is the
      condition under which an iteration writes at all (its position inside the
      target's bounds).
    * ``equation``: the statement in readable text, for the kernel's docstring.
    """

    target: str
    free: tuple[Loop, ...]
    body: sympy.Expr
    reduce: str = "none"
    over: tuple[Loop, ...] = ()
    accumulate: bool = False
    argmax: tuple[str, ...] = ()
    equation: str = ""
    scatter: tuple[sympy.Expr, ...] = ()
    where: sympy.Expr = sympy.true


@dataclass(frozen=True)
class Program:
    """Everything codegen needs to emit one op's module section.

    ``forward`` computes the outputs (and the intermediates they need) from ``args``.
    ``backward`` runs after ``forward`` (which recomputes the intermediates) and
    computes ``grads`` from ``seeds`` (the output gradients, backward's first
    arguments). For optimizers ``forward``/``backward`` are empty and ``step`` holds
    the sequential in-place update statements.
    """

    name: str
    kind: str  # activation | layer | loss | optimizer
    source: str  # the spec it came from, as shown in the generated file's header
    dims: tuple[sympy.Symbol, ...]  # bound from argument shapes at run time
    derived_dims: tuple[tuple[sympy.Symbol, sympy.Expr], ...]  # computed in order
    attrs: tuple[tuple[sympy.Symbol, int | float], ...]  # run-time attributes, defaults
    args: tuple[TensorDecl, ...]  # forward arguments: inputs then params
    outputs: tuple[TensorDecl, ...]
    intermediates: tuple[TensorDecl, ...] = ()
    forward: tuple[Assign, ...] = ()
    seeds: tuple[TensorDecl, ...] = ()
    grads: tuple[TensorDecl, ...] = ()  # one per differentiable arg, in arg order
    grad_of: tuple[str, ...] = ()  # the arg name each grad belongs to
    grad_intermediates: tuple[TensorDecl, ...] = ()
    backward: tuple[Assign, ...] = ()
    scalars: tuple[str, ...] = ()  # tensors of shape () read as plain Symbols
    elementwise: bool = False  # activation: any input shape, computed on the flat array
    task: str = ""  # losses: what the model's output means (classification, binary, regression)
    # layers: how a model runs it outside training, as (key, value) pairs: "eval" names the
    # op it runs in eval mode instead ("identity": the input passes unchanged), "running"
    # the op updating running statistics in training (its inputs: the layer's, then the
    # statistics; its outputs: their new values, in the same order), "init.<statistic>"
    # a statistic's starting value (0 when not given); see docs/models.md
    modes: tuple[tuple[str, str | float], ...] = ()
    state: tuple[str, ...] = ()  # optimizer state names, in order (per-element, then scalar)
    state_init: tuple[tuple[str, float], ...] = ()  # scalar state (in ``scalars``): initial values
    # facts about the sizes checked by the host wrappers once dimensions are bound and
    # derived: (lhs, rhs, the relation as the spec states it), lhs == rhs
    relations: tuple[tuple[sympy.Expr, sympy.Expr, str], ...] = ()
    # reads of the spec that must stay inside their tensor (index arithmetic with
    # attributes, no padding offset) and that no relation proves inside: (the read as
    # written (an Indexed), tensor, axis, least index, greatest index, axis size, the loop extents);
    # the host wrappers check least >= 0 and greatest < size whenever no extent is 0
    read_checks: tuple = ()
    step: tuple[Assign, ...] = ()  # optimizer update statements, sequential, in place
    step_counter: sympy.Symbol | None = None  # optimizer step count t (from 1)
    latex: str = ""  # the derivation document for this op
    doc: str = ""  # one-line description
    # facts the derivation used (derive.assumptions.Assumption), checked by the backward
    assumptions: tuple = ()
    # names that set several attributes at once (``S`` -> (SH, SW)), in declaration order;
    # an attribute given by name overrides what a shorthand sets
    shorthands: tuple[tuple[str, tuple[str, ...]], ...] = ()
    extra: dict = field(default_factory=dict)
    # forward mode and second order (derive/tangent.py): the tangents of the
    # differentiable args (in ``grad_of`` order: the extra arguments of jvp and hvp);
    # ``jvp`` runs after ``forward`` and writes one tangent per output (``jvp_outputs``);
    # ``hvp`` runs after ``forward`` and ``backward`` and writes, per grad, its derivative
    # along the tangents with the seeds held fixed (``hvp_outputs``)
    tangents: tuple[TensorDecl, ...] = ()
    jvp: tuple[Assign, ...] = ()
    jvp_outputs: tuple[TensorDecl, ...] = ()
    hvp: tuple[Assign, ...] = ()
    hvp_outputs: tuple[TensorDecl, ...] = ()
    tangent_intermediates: tuple[TensorDecl, ...] = ()
    # the allowed values of attributes that declare them (derive.spec.AttrDomain), as
    # (name, the domain as plain data (AttrDomain.table), the values in words), checked
    # when the op is made
    attr_domains: tuple = ()
    # programs of the same op for attribute values that change its outputs' shapes
    # (a loss's reduction = 0, "none": the terms, not their mean): (((attr, value), ...),
    # Program) pairs; the variant's name is this one's with the values in brackets
    variants: tuple = ()

    def tensor(self, name: str) -> TensorDecl:
        for t in self.all_tensors():
            if t.name == name:
                return t
        raise KeyError(name)

    def all_tensors(self) -> tuple[TensorDecl, ...]:
        return (
            self.args
            + self.outputs
            + self.intermediates
            + self.seeds
            + self.grads
            + self.grad_intermediates
            + self.tangents
            + self.jvp_outputs
            + self.hvp_outputs
            + self.tangent_intermediates
        )
