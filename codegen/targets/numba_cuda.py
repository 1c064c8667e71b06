"""The Numba CUDA target: ``@cuda.jit`` kernels in ``<stem>_cuda.py``.

One thread per element of a kernel's leading free loops (``THREADS`` per block);
matrix products of GEMM shape run as a tiled shared-memory kernel (``TILE`` x
``TILE``); every other contraction keeps its loops. A scatter's writers run in one
thread each, in order (no atomics). Its
module is a companion of the CPU one (imported by ``op(..., target="cuda")``); it has
the fused-step variants (params-only backward, forward-saving and saved-backward
launchers, as the CPU's cores) and no schedules. Every launcher that writes into
given results (``_into``) also takes a workspace (``_work``), so that a model step
allocates nothing on the device after its first. Templates: codegen/templates/cuda/.
"""

from __future__ import annotations

import sympy

from ..lower import Kernel, parallel_nest
from ..printers import HELPER_FUNCTIONS, RANDOM_FUNCTIONS, CPUPrinter
from .base import Target
from .base import loops as _loops

THREADS = 128
TILE = 16


class CUDAPrinter(CPUPrinter):
    """Prints scalar expressions for ``@cuda.jit`` kernels and device functions.

    Numba's CUDA target accepts the same scalar Python as the CPU target (``math``
    functions map to libdevice, ``max``/``min``/``abs`` are supported), so the only
    differences are the names of the device-function helpers.
    """

    target = "cuda"
    helper_functions = {k: v + "_dev" for k, v in HELPER_FUNCTIONS.items()}
    random_functions = {k: v + "_dev" for k, v in RANDOM_FUNCTIONS.items()}


class NumbaCUDA(Target):
    name = "cuda"
    printer = CUDAPrinter
    templates = "cuda"
    suffix = "_cuda"
    contractions = False
    variants = True
    primary = False
    model_inputs = True
    skips_kinds = frozenset({"schedule"})
    threads = THREADS
    tile = TILE

    def scatter_store(self, pr, item) -> str:
        """``target[idx] += value``: several iterations may add to one element, but one
        thread runs all of them in order (codegen/lower.py's exclusive_loops and
        ``k.parallel``, which ``layout`` follows), so no atomic add is needed."""
        idx = ", ".join(pr.index(e) for e in item.scatter)
        return "%s[%s] += %s" % (item.target, idx, pr.index(item.local))

    def layout(self, ctx: dict, k: Kernel, pr) -> None:
        cuda_layout(ctx, k, pr)

    def launch(self, call: dict, k: Kernel, plan, hp) -> None:
        """The grid of a kernel call: the GEMM's output shape, or the number of
        threads of its parallel loops."""
        if k.gemm is not None:
            call["m"] = hp.index(k.gemm.m)
            call["n"] = hp.index(k.gemm.n)
        else:
            ctx = {}
            cuda_layout(ctx, k, self.make_printer(plan.lowerer))
            total = [hp.index(sympy.Max(l.hi - l.lo, 0)) for l in parallel_nest(k)[: len(ctx["parallel"])]]
            call["total"] = " * ".join(t if sympy.Symbol(t).is_Atom and t.isidentifier() else "(%s)" % t for t in total) if total else "1"

    def module_context(self, ops: list) -> dict:
        return {
            "threads": self.threads,
            "tile": self.tile,
            "has_gemm": any(k["gemm"] for o in ops for k in o["kernels"]),
        }


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

