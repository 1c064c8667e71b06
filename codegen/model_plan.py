"""The plan of a model's training step, independent of the target it runs on.

:mod:`codegen.model` checks a model spec against the library's ops and builds a
:class:`ModelPlan`: a plain data structure saying what one step computes (each
layer's forward entry point and, going back, its backward one; the loss's; the
optimizer's update of every parameter), in which order, what the forward keeps for the
backward (activations, and values resting on reductions: ``kept<i>_<name>``), and
which arrays the step writes (``buffers``: allocated once per batch shape and reused
while the shape stays the same). Names in the plan are the library's entry points
(:func:`codegen.emit.core_name`, ``into_name``, ``alloc_name``), which every target's
op modules define under the same names: the CPU's compiled cores, the CUDA target's
device-array launchers (codegen/templates/cuda/core.py.jinja).

A target renders the plan with its own template (``Target.model_template``:
``model/model.py.jinja`` for the CPU, ``model/model_cuda.py.jinja`` for CUDA), and
imports the cores from its op modules (``generated.<group>.<op><suffix>``). The one
thing a target decides before planning is whether its op modules have the fused-step
variants (``Target.variants``: params-only backward cores, forward-saving and
saved-backward cores); without them the plan uses the plain ``fwd``/``bwd`` entries,
and gradients nobody uses are still computed (and named ``_unused<i>_<arg>``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .emit import alloc_name, core_name, into_name


def is_integer(value) -> bool:
    """A spec value that is an integer (TOML's true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def tuple_literal(names) -> str:
    """The Python literal of a tuple of names, as emitted code writes it."""
    items = ", ".join(f'"{n}"' for n in names)
    return f"({items},)" if len(names) == 1 else f"({items})"


# the time loop's variable in the emitted code (not t: that is an optimizer's counter)
TIME = "step"


@dataclass(frozen=True)
class Param:
    arg: str  # the op's argument name
    key: str  # the params dict key, e.g. conv2d0.weight
    local: str  # the local variable name, e.g. conv2d0_weight
    shape: tuple[int, ...]
    init: str  # one of INIT_RULES
    fan_in: int


@dataclass(frozen=True)
class Running:
    """A running statistic a layer keeps in the model's state (batch norm's running mean):
    updated by the training step, read in eval mode."""

    key: str  # the state dict key, e.g. batch_norm2d1.running_mean
    local: str  # the local variable name, e.g. batch_norm2d1_running_mean
    shape: tuple[int, ...]
    init: float  # its starting value


@dataclass(frozen=True)
class Cell:
    """How the compiled and the Python code call a cell at step t (one line each)."""

    state_shape: tuple[int, ...]  # per sample
    axes: tuple[int, ...]  # batch-major (B, T, ...) <-> time-major (T, B, ...)
    py_fwd_args: str
    py_bwd_args: str
    py_bwd_unpack: str
    jit_fwd_args: str
    jit_bwd_args: str
    jit_bwd_unpack: str
    step_grad: bool  # whether the step input's gradient is needed (layers below)
    kept: tuple[str, ...] = ()  # lists of what the forward keeps, one entry per step
    new_state: str = ""  # the compiled forward's new (first) state at one step
    # (array of states, new state at one step, its gradient, its sizes after the batch) of
    # each state, the first (the entry's output) first: an LSTM's h and c
    states: tuple[tuple[str, str, str, str], ...] = ()
    sequences: bool = False  # the entry's output is every step's first state (B, T, ...), not the last
    # ``hvp`` (Python, forward over reverse through the time loop): the step's and the
    # states' argument names; (tangents of a state, the tangent of its gradient) of each
    # state, as the states; the tangents of the op's inputs at one step, in its order
    step_arg: str = ""
    state_args: tuple[str, ...] = ()
    tangent_states: tuple[tuple[str, str], ...] = ()
    py_tangent_args: str = ""

    @property
    def jit_fwd_targets(self) -> str:
        """The compiled forward's results at one step: the new states, then the kept values."""
        return ", ".join([*(new for _, new, _, _ in self.states), *(f"{name}_step" for name in self.kept)])

    @property
    def py_fwd_targets(self) -> str:
        """The Python forward's results at one step: the new states."""
        return ", ".join(new for _, new, _, _ in self.states)

    @property
    def out_axes(self) -> tuple[int, ...]:
        """Time-major (T, B, ...) <-> batch-major (B, T, ...) for the states' sequence."""
        return (1, 0) + tuple(range(2, len(self.state_shape) + 2))

    @property
    def state_dims(self) -> str:
        """The state's sizes after the batch, as a call writes them: "16"."""
        return ", ".join(str(d) for d in self.state_shape)


@dataclass(frozen=True)
class Layer:
    index: int
    var: str  # the module-level name of the op object, e.g. _dense0
    op: str
    kind: str
    attrs: tuple[tuple[str, str], ...]  # (name, Python literal) given in the spec
    params: tuple[_Param, ...]
    shape_in: tuple[int, ...]  # one sample's shape
    shape_out: tuple[int, ...]
    grads: tuple[str, ...]  # what backward returns, unpacked: g<index> or _ for the input
    param_grads: tuple[tuple[str, str, str], ...]  # (params key, local name, its grad's name)
    fwd_entry: str = ""  # the entry points the fused step calls (emit.core_name, into_name)
    bwd_entry: str = ""
    bwd_unpack: tuple[str, ...] = ()  # what the backward core returns, unpacked
    core_attrs: tuple[str, ...] = ()  # attribute values (literals), in core order
    cell: Cell | None = None  # set when the layer unrolls a cell over time
    kept: tuple[str, ...] = ()  # locals holding what the forward keeps for the backward
    given: tuple[str, ...] = ()  # what the backward core takes of it, after the parameters

    needs_backward: bool = True  # False below the first layer with parameters: no gradient is needed there
    # a graph's entry: the arrays it reads (h0 the model's input, h<k+1> entry k's output),
    # by default the previous entry's output
    inputs: tuple[str, ...] = ()
    # after its backward: (gradient, part, rank) for each array it reads that others read
    # too; the part is added to the gradient (in a fixed order: the backward's)
    accumulate: tuple[tuple[str, str, int], ...] = ()
    label: str = ""  # the entry's name for its output, when it gives one
    sources_text: str = ""  # how the summary shows the entry's inputs and name
    shapes_in: tuple[tuple[int, ...], ...] = ()  # one sample's shape of each array it reads
    # (argument, k, first) for each argument reading an array h<k> that needs a gradient:
    # whether its gradient is the first part of h<k>'s (the backward's order)
    hvp_reads: tuple[tuple[str, int, bool], ...] = ()
    # the keys of its other outputs, after the first (h<index+1>), when its op has several
    # (name = ["h", "c"]): "3_c_new" is entry 2's output c_new, held in h3_c_new
    more_outputs: tuple[str, ...] = ()
    shapes_out: tuple[tuple[int, ...], ...] = ()  # one sample's shape of each output
    # train and eval modes (docs/models.md, "Train and eval modes"): an op drawing random
    # numbers takes the model's seed and step counter in these attributes (seed, step)
    rng: tuple[str, ...] = ()
    draw_attrs: tuple[tuple[str, str], ...] = ()  # (attribute, expression) the Python functions pass
    # what forward runs instead in eval mode: "" the same op, "identity" nothing (the
    # input passes), else that op (its module-level object eval_var, called with eval_args)
    eval_op: str = ""
    eval_var: str = ""
    eval_attrs: tuple[tuple[str, str], ...] = ()
    eval_args: str = ""
    eval_core_attrs: str = ""  # the eval op's attributes as its entry points take them: ", 1e-05"
    # the running statistics it keeps, and the op updating them in training (the compiled
    # step calls running_call, whose results running_new are copied into the statistics)
    running: tuple[Running, ...] = ()
    running_op: str = ""
    running_call: str = ""
    running_new: tuple[str, ...] = ()
    # folding (codegen/model.py, _fold): the leading position axes of what it reads that
    # join the batch (0: none); each input's view as the op reads it ("(-1, 32)"), the
    # output's as the op writes it ("(-1, 65)") and as the model keeps it ("(-1, 16, 65)"),
    # and (gradient, view, array) of each input gradient it writes, folded as its array
    positions: int = 0  # how many leading axes of its output (one sample) are positions
    fold: int = 0
    in_views: tuple[str, ...] = ()
    out_view: str = ""
    out_shape_view: str = ""
    grad_views: tuple[tuple[str, str, str], ...] = ()

    @property
    def in_args(self) -> str:
        """The arrays it reads, as a call passes them: "h3" or "h2, h1" (folded:
        "h3.reshape((-1, 32))")."""
        names = self.inputs or (f"h{self.index}",)
        if self.fold:
            return ", ".join(f"{n}.reshape({v})" for n, v in zip(names, self.in_views))
        return ", ".join(names)

    @property
    def tangent_args(self) -> str:
        """The tangents of the arrays it reads (``hvp``): "t2, t1" (folded: "_view(t2, (-1, 32))")."""
        names = ["t" + name[1:] for name in self.inputs or (f"h{self.index}",)]
        if self.fold:
            return ", ".join(f"_view({n}, {v})" for n, v in zip(names, self.in_views))
        return ", ".join(names)

    @property
    def unfold(self) -> str:
        """What turns its op's output into the model's array: "" or ".reshape((-1, 16, 65))"."""
        return f".reshape({self.out_shape_view})" if self.fold else ""

    @property
    def g_out(self) -> str:
        """Its outputs' gradients, as its op's backward reads them (folded: viewed as the op wrote it)."""
        return f"g{self.index + 1}.reshape({self.out_view})" if self.fold else self.out_grads

    @property
    def gt_out(self) -> str:
        """The tangents of its outputs' gradients (``hvp``), as its op's backward reads them."""
        return f"gt{self.index + 1}.reshape({self.out_view})" if self.fold else self.out_grad_tangents

    @property
    def chain(self) -> bool:
        """Whether it reads the previous entry's output only (what a chain model's entries do)."""
        return self.inputs in ((), (f"h{self.index}",))

    @property
    def py_args(self) -> str:
        """The parameters, as the Python wrappers take them after the input."""
        return "".join(", " + p.local for p in self.params)

    @property
    def core_args(self) -> str:
        """The parameters and attributes, as the compiled forward takes them after the input."""
        return "".join(", " + a for a in [p.local for p in self.params] + list(self.core_attrs))

    @property
    def bwd_core_args(self) -> str:
        """The same for the compiled backward: the kept values come before the attributes."""
        return "".join(", " + a for a in [p.local for p in self.params] + list(self.given) + list(self.core_attrs))

    @property
    def fwd_core(self) -> str:
        return core_name(self.op, self.fwd_entry)

    @property
    def bwd_core(self) -> str:
        return core_name(self.op, self.bwd_entry)

    @property
    def fwd_into(self) -> str:
        return into_name(self.op, self.fwd_entry)

    @property
    def bwd_into(self) -> str:
        return into_name(self.op, self.bwd_entry)

    @property
    def fwd_alloc(self) -> str:
        return alloc_name(self.op, self.fwd_entry)

    @property
    def bwd_alloc(self) -> str:
        return alloc_name(self.op, self.bwd_entry)

    @property
    def out_values(self) -> tuple[str, ...]:
        """Its outputs: "h3", or "h3", "h3_c_new" for an op with several."""
        return (f"h{self.index + 1}", *(f"h{k}" for k in self.more_outputs))

    @property
    def out_grads(self) -> str:
        """The gradients of its outputs, as its backward takes them first: "g3, g3_c_new"."""
        return ", ".join("g" + name[1:] for name in self.out_values)

    @property
    def out_tangents(self) -> str:
        """The tangents of its outputs (``hvp``): "t3, t3_c_new"."""
        return ", ".join("t" + name[1:] for name in self.out_values)

    @property
    def out_grad_tangents(self) -> str:
        """The tangents of its outputs' gradients (``hvp``): "gt3, gt3_c_new"."""
        return ", ".join("gt" + name[1:] for name in self.out_values)

    @property
    def eval_fwd_into(self) -> str:
        return into_name(self.eval_op, "fwd")

    @property
    def eval_fwd_alloc(self) -> str:
        return alloc_name(self.eval_op, "fwd")

    @property
    def fwd_results(self) -> tuple[str, ...]:
        """The arrays the compiled forward writes: the outputs, then the kept values."""
        return (*self.out_values, *self.kept)

    @property
    def fwd_targets(self) -> str:
        return ", ".join(self.fwd_results)

    @property
    def fwd_into_targets(self) -> str:
        """The arrays the compiled forward writes, as its ``_into`` form takes them (folded:
        the output as the op writes it)."""
        if not self.fold:
            return self.fwd_targets
        return ", ".join([f"h{self.index + 1}.reshape({self.out_view})", *self.kept])

    @property
    def bwd_into_targets(self) -> str:
        """The gradients the compiled backward writes, as its ``_into`` form takes them
        (folded: each input's gradient as the op writes it)."""
        views = {grad: view for grad, view, _ in self.grad_views}
        return ", ".join(f"{g}.reshape({views[g]})" if g in views else g for g in self.bwd_unpack)



@dataclass(frozen=True)
class ModelPlan:
    """Everything a target's model template is rendered with (see the module docstring).

    ``layers`` hold each layer's shapes, parameters and entry points; ``buffers`` are
    the arrays the fused step writes, in the order it writes them; ``imports`` the
    entry points used, by op module (without the target's suffix)."""

    imports: list
    modules: list
    loss_fwd_into: str
    loss_bwd_into: str
    loss_fwd_alloc: str
    loss_bwd_alloc: str
    buffers: list
    step_inputs: list
    loss_core_attrs: tuple
    loss_fwd_targets: tuple
    loss_bwd_given: tuple
    target_int: bool
    loss_assume: tuple
    target_like_output: bool
    opt_core: str
    opt_counter: str
    opt_attrs: list
    param_locals: list
    slot_locals: list
    step_signature: list
    summary: list
    hyper_literal: str
    slots_literal: str
    name: str
    doc: str
    input_shape: str
    output_shape: str
    input_size: int
    output_size: int
    layers: list
    params: list
    loss: str
    loss_attrs: tuple
    task: str
    optimizer: str
    hyper: tuple
    slots: tuple
    n: int
    unrolled: bool
    time: str
    variants: bool
    graph: bool  # some entry reads other than the previous entry's output
    several_inputs: bool
    model_inputs: list
    accumulate_into: str  # the add op's entry point that sums a gradient's parts ("" when none are)
    draws: bool  # some layer draws random numbers (the state holds the seed)
    running: list  # every layer's running statistics (Running), in layer order
    modes: bool  # some layer runs differently in eval mode
    # the eval-mode ops' entry points, by module (a target whose forward calls them: CUDA's)
    eval_imports: list
    # the loss at every position (codegen/model.py, _loss_fold): the position axes folded
    # (0: none), the prediction's view as the loss reads it, the target's shape per sample
    # and its view
    loss_fold: int = 0
    loss_pred_view: str = ""
    target_shape: str = ""
    loss_target_view: str = ""

    @property
    def loss_pred(self) -> str:
        """The model's output as the loss reads it: "h9" or "h9.reshape((-1, 65))"."""
        return f"h{self.n}.reshape({self.loss_pred_view})" if self.loss_fold else f"h{self.n}"

    @property
    def loss_grad(self) -> str:
        """The output's gradient as the loss's backward writes it."""
        return f"g{self.n}.reshape({self.loss_pred_view})" if self.loss_fold else f"g{self.n}"

    @property
    def folded(self) -> bool:
        """Whether an entry or the loss runs at every position (folds axes into the batch)."""
        return bool(self.loss_fold) or any(layer.fold for layer in self.layers)

    def context(self) -> dict:
        """The plan as a template context (a shallow dict of its fields)."""
        context = {f.name: getattr(self, f.name) for f in fields(self)}
        context.update(loss_pred=self.loss_pred, loss_grad=self.loss_grad, folded=self.folded)
        return context


def plan_step(infos, layers, loss, loss_given_attrs, loss_core_attrs, loss_attrs, opt, hyper, params, summary, name, doc,
              input_shape, output_shape, task, variants: bool, model_inputs=None, loss_fold=(0, "", (), "")) -> ModelPlan:
    """The step of a checked model: the cores it calls, the loss's entries, the arrays
    it writes. ``variants``: whether the target's op modules have the fused-step
    variants (forward-saving and saved-backward cores)."""
    # the fused step: the compiled cores it calls, by module
    # (a layer writes into arrays allocated once per batch shape; an unrolled cell calls
    # the cores, which allocate per time step)
    cores: dict[str, set] = {}
    for layer in layers:
        module = infos[layer.op].module
        used = [layer.fwd_core] if layer.cell else [layer.fwd_into, layer.fwd_alloc]
        if layer.needs_backward:
            used += [layer.bwd_core] if layer.cell else [layer.bwd_into, layer.bwd_alloc]
        cores.setdefault(module, set()).update(used)
        if layer.running_op:
            cores.setdefault(infos[layer.running_op].module, set()).add(core_name(layer.running_op, "fwd"))
    # the loss keeps what its backward reads of its reductions (a log-sum-exp), as layers do
    saving = bool(loss.kept or loss.saved_outputs) and variants
    loss_entries = ("fwd_saving" if loss.kept and variants else "fwd", "bwd_saved" if saving else "bwd")
    loss_kept = tuple(f"kept_{n}" for n in loss.kept) if saving else ()
    loss_given = tuple("loss" for _ in loss.saved_outputs) + loss_kept if saving else ()
    opt_core = core_name(opt.name, "step")
    cores.setdefault(loss.module, set()).update(
        f(loss.name, e) for e in loss_entries for f in (into_name, alloc_name)
    )
    cores.setdefault(opt.module, set()).add(opt_core)
    # an array several entries read gets the sum of their gradients: the library's add, in place
    accumulate_into = ""
    if any(layer.accumulate for layer in layers):
        accumulate_into = into_name("add", "fwd")
        cores.setdefault(infos["add"].module, set()).add(accumulate_into)
    if loss.assume:  # checked on y before the fused step (the loss's backward wrapper is not called)
        cores[loss.module].add("_check_assumption")
    # the arrays the fused step writes, in the order it writes them
    buffers = [name for layer in layers if not layer.cell for name in layer.fwd_results]
    buffers += ["loss", *loss_kept, "seed", f"g{len(layers)}"]
    buffers += [
        name for layer in reversed(layers) if layer.needs_backward and not layer.cell for name in layer.bwd_unpack
    ]
    target = loss.args[1][0] if len(loss.args) > 1 else None
    target_dims = loss.args[1][2] if target else ()
    # the target's shape when it is the prediction's (checked before the fused step runs)
    target_like_output = target_dims == loss.args[0][2]
    slot_locals = [(f"{p.key}.{s}", f"{p.local}_{s}") for p in params for s in opt.state]
    # one list, so that an optimizer without state or counter (sgd) leaves no empty slot
    model_inputs = model_inputs or [("x", 0, "h0", tuple(input_shape), False)]
    several = model_inputs[0][1] != 0
    xs = [v for _, _, v, _, _ in model_inputs] if several else ["x"]
    running = [r for layer in layers for r in layer.running]
    eval_cores: dict[str, set] = {}
    for layer in layers:
        if layer.eval_op and layer.eval_op != "identity":
            eval_cores.setdefault(infos[layer.eval_op].module, set()).update((layer.eval_fwd_into, layer.eval_fwd_alloc))
    draws = any(layer.rng for layer in layers)
    step_signature = [*xs, "y", *(p.local for p in params), *(local for _, local in slot_locals)]
    step_signature += [r.local for r in running]
    step_signature += [opt.counter] if opt.counter else []
    step_signature += [a for a, _ in opt.attr_defaults]
    step_signature += ["draw_seed", "draw_step"] if draws else []
    step_signature += ["buffers"]
    step_inputs = [*xs, "y", *(p.local for p in params)]
    context = {
        "imports": [(m, sorted(cores[m])) for m in sorted(cores)],
        "modules": sorted(cores),
        "loss_fwd_into": into_name(loss.name, loss_entries[0]),
        "loss_bwd_into": into_name(loss.name, loss_entries[1]),
        "loss_fwd_alloc": alloc_name(loss.name, loss_entries[0]),
        "loss_bwd_alloc": alloc_name(loss.name, loss_entries[1]),
        "buffers": buffers,
        "step_inputs": step_inputs,
        "loss_core_attrs": loss_core_attrs,
        "loss_fwd_targets": ("loss",) + loss_kept,
        "loss_bwd_given": loss_given,
        "target_int": target in loss.int_args,
        "loss_assume": loss.assume,
        "target_like_output": target_like_output,
        "opt_core": opt_core,
        "opt_counter": opt.counter,
        "opt_attrs": [(a, "int" if is_integer(d) else "float") for a, d in opt.attr_defaults],
        "param_locals": [p.local for p in params],
        "slot_locals": slot_locals,
        "step_signature": step_signature,
        "summary": summary,
        "hyper_literal": "{" + ", ".join(f'"{k}": {v}' for k, v in hyper) + "}",
        "slots_literal": tuple_literal(opt.state),
        "name": name,
        "doc": doc.strip() or f"The {name} model.",
        "input_shape": repr(tuple(input_shape)),
        "output_shape": repr(tuple(output_shape)),
        "input_size": math.prod(input_shape),
        "output_size": math.prod(output_shape),
        "layers": layers,
        "params": params,
        "loss": loss.name,
        "loss_attrs": loss_attrs,
        "task": task,
        "optimizer": opt.name,
        "hyper": hyper,
        "slots": opt.state,
        "n": len(layers),
        "unrolled": any(layer.cell for layer in layers),
        "time": TIME,
        "variants": variants,
        "graph": any(not layer.chain for layer in layers),
        "accumulate_into": accumulate_into,
        "draws": draws,
        "running": running,
        "modes": any(layer.rng or layer.eval_op or layer.running for layer in layers),
        "eval_imports": [(m, sorted(eval_cores[m])) for m in sorted(eval_cores)],
        # several named inputs: (name, variable, one sample's shape, integer) of each
        "several_inputs": several,
        "model_inputs": [(n, v, repr(tuple(shape)), is_int) for n, _, v, shape, is_int in model_inputs],
        "loss_fold": loss_fold[0],
        "loss_pred_view": loss_fold[1],
        "target_shape": repr(tuple(loss_fold[2])),
        "loss_target_view": loss_fold[3],
    }
    return ModelPlan(**context)
