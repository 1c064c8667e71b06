"""Assumptions (`assume`): facts about the data that a derivation may use, checked when
the op runs.

``assume = ["sum(target[b, c], c) == 1"]`` lets the chain rule replace the sum of a
target row by 1, which turns the cross-entropy gradient into the textbook
``(softmax(x) - target) / B``. The gradient so derived is wrong for data that breaks the
fact (an all-zero, masked target row), so the generated backward checks it before it
computes anything: the fact is a sum over axes of one input, cheap to recompute, and an
input that breaks it is an error naming the op and the assumption, never a silently
wrong gradient. This module checks that an assumption has that checkable form and
describes the check for the code generator (``ir.Program.assumptions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .errors import SpecError
from .functions import ReduceSum


@dataclass(frozen=True)
class Assumption:
    """``sum(tensor[...], reduced indices) == value`` at every value of the other indices."""

    tensor: str  # the input the fact is about
    axes: tuple[int, ...]  # its summed axes
    free: tuple[str, ...]  # the index names of its other axes, in order (for messages)
    value: float  # the assumed value of every sum
    text: str  # the assumption as the spec writes it


def checked_assumptions(op) -> tuple[Assumption, ...]:
    """The assumptions of ``op`` as run-time checks, or a SpecError for one the
    generated code cannot check (or the derivation cannot use)."""
    out = []
    for lhs, rhs, text in op.assumptions:
        def fail(problem):
            raise SpecError(op.source, f"assumption `{text}`: {problem}; an assumption must read "
                                       f"`sum(input[...], i, ...) == number`, a sum over axes of one "
                                       f"input, which the generated code checks when the op runs")

        if not isinstance(lhs, ReduceSum):
            fail("its left side is not a sum")
        body = lhs.body
        if not isinstance(body, sympy.Indexed):
            fail(f"it sums `{sympy.sstr(body)}`, not one tensor read")
        name = str(body.base)
        if name not in op.inputs:
            kind = "a parameter" if name in op.params else "not an input"
            fail(f"`{name}` is {kind}; only the op's input data can be assumed about")
        differentiated = op.differentiate if op.differentiate is not None else [
            a for a in list(op.inputs) + list(op.params) if op.dtypes.get(a) != "int"]
        if name in differentiated:
            fail(f"`{name}` is differentiated (list the others in `differentiate`); an assumption is about data")
        idx = list(body.indices)
        if not all(isinstance(i, sympy.Symbol) for i in idx) or len(set(idx)) != len(idx):
            fail(f"`{sympy.sstr(body)}` must read with distinct plain indices")
        summed = list(lhs.indices)
        if not all(i in idx for i in summed):
            fail("it sums over an index the read does not use")
        try:
            value = float(rhs)
        except TypeError:
            fail(f"its right side `{sympy.sstr(rhs)}` is not a number")
        axes = tuple(k for k, i in enumerate(idx) if i in summed)
        free = tuple(str(i) for i in idx if i not in summed)
        out.append(Assumption(name, axes, free, value, text))
    return tuple(out)
