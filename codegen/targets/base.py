"""The interface every code-generation target implements.

A target is one object (a subclass of :class:`Target`, one module per target under
``codegen/targets/``) that codegen/emit.py asks everything that differs between
targets: which printer prints its kernels, how it lowers (contractions to BLAS or
loops), which entry points it compiles, how a kernel is laid out (threads, loops),
how a scatter stores, how the host launches a kernel, which templates render its
module and what its files are called. emit.py never compares target names.

See docs/targets.md for how a new target is added.
"""

from __future__ import annotations

import sympy


class Target:
    """One code-generation target. Subclasses set the class attributes and override
    the hooks whose default does not fit."""

    #: what ``generated.op(name, target=...)`` takes ("cpu", "cuda")
    name: str = ""
    #: the printer class of its kernels (codegen/printers.py holds the shared base)
    printer: type = None
    #: its template directory under codegen/templates/ (``<templates>/module.py.jinja``
    #: renders its modules; it may extend another target's module template)
    templates: str = ""
    #: the module file of an op group or user spec: ``<stem><suffix>.py``
    suffix: str = ""
    #: whether the lowering turns contractions into matrix products (codegen/contract.py)
    contractions: bool = False
    #: whether it compiles the fused model steps' extra cores (``bwd_params``,
    #: ``fwd_saving``, ``bwd_saved``: emit.backward_variants, emit.saving_variants)
    variants: bool = False
    #: whether it holds every op's specs and the ``op()`` entry point (exactly one
    #: target does; the others are companions it imports on first use)
    primary: bool = False
    #: whether its model template runs a cell unrolled over time (``unroll = true``);
    #: a model with one gets no module for a target without
    model_cells: bool = False
    #: whether its model template takes several named inputs (``inputs = {...}``, a batch
    #: a dict of arrays); a model with several gets no module for a target without
    model_inputs: bool = False
    #: whether its model template runs an entry whose op has several outputs (``name =
    #: ["h", "c"]``); a model with one gets no module for a target without
    model_outputs: bool = False
    #: whether its model template runs train and eval modes (a layer that draws random
    #: numbers, runs another op in eval mode or keeps running statistics: dropout, batch
    #: norm); a model with one gets no module for a target without
    model_modes: bool = False
    #: whether its model template folds the leading (position) axes of an entry's input
    #: into the batch (codegen/model.py, "Folding"); a model with one gets no module for a
    #: target without
    model_folds: bool = False
    #: the op kinds it emits no module text for (schedules run on the host)
    skips_kinds: frozenset = frozenset()

    # ----------------------------------------------------------------- naming
    @property
    def module_template(self) -> str:
        return "%s/module.py.jinja" % self.templates

    @property
    def model_template(self) -> str:
        """The template rendering a model's plan (codegen/model_plan.py) for this target:
        ``model/model.py.jinja`` (CPU), ``model/model_cuda.py.jinja`` (CUDA)."""
        return "model/model%s.py.jinja" % self.suffix

    @property
    def renders_models(self) -> bool:
        """Whether it has a model template (a new target may start with op modules only)."""
        from ..template_util import TEMPLATE_DIR

        return (TEMPLATE_DIR / self.model_template).is_file()

    @property
    def runtime_template(self) -> str:
        return "%s/runtime_module.py.jinja" % self.templates

    @property
    def runtime_module(self) -> str:
        """The stem of the runtime module the library's op modules import
        (``_runtime``, ``_runtime_cuda``)."""
        return "_runtime%s" % self.suffix

    def helpers(self) -> list:
        """The compiled helpers its runtime holds: ``<templates>/helper_<name>.py.jinja``."""
        from ..template_util import TEMPLATE_DIR

        return sorted(p.name[len("helper_"): -len(".py.jinja")] for p in (TEMPLATE_DIR / self.templates).glob("helper_*.py.jinja"))

    def module_file(self, stem: str) -> str:
        """The file name of a module with this stem (``layers.py``, ``layers_cuda.py``)."""
        return "%s%s.py" % (stem, self.suffix)

    def renders(self, program) -> bool:
        """Whether this target emits kernels or functions for ``program``."""
        return program.kind not in self.skips_kinds

    # ----------------------------------------------------------------- printing
    def make_printer(self, lowerer):
        """The kernel printer for an op lowered by ``lowerer``."""
        return self.printer(int_symbols=lowerer.int_symbols, int_tensors=lowerer.int_tensors, scalars=lowerer.scalars)

    def scatter_store(self, pr, item) -> str:
        """The statement adding a scatter item's local value to its target element
        (several iterations may add to one element)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- layout
    def layout(self, ctx: dict, kernel, pr) -> None:
        """Fill a kernel's template context with how it runs on this target
        (``depth``, and what its kernel templates need)."""
        raise NotImplementedError

    def launch(self, call: dict, kernel, plan, hp) -> None:
        """Fill a kernel call's host context with its launch sizes (nothing on a
        target that calls kernels as plain functions)."""

    def module_context(self, ops: list) -> dict:
        """Extra variables of this target's module template (launch configuration)."""
        return {}

    def __repr__(self):
        return "<target %s>" % self.name


def loops(pr, loops_) -> list:
    """Loop headers as the templates lay them out: {var, lo, hi}, printed by ``pr``."""
    return [{"var": pr.index(l.index), "lo": pr.index(l.lo), "hi": pr.index(l.hi)} for l in loops_]


def extent(pr, loops_) -> str:
    """The number of iterations of a loop nest, printed as an index expression."""
    return pr.index(sympy.Mul(*[l.hi - l.lo for l in loops_]))
