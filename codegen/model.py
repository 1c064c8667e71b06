"""Model specs (``kind = "model"``) -> ``generated/models/<name>.py``.

A model spec composes library ops into a network, a loss and an optimizer::

    name = "cnn_digits"
    kind = "model"
    input = [1, 8, 8]
    layers = [
      { op = "conv2d", out = 8, KH = 3, KW = 3, P = 1 },
      { op = "relu" },
      { op = "max_pool2d" },
      { op = "flatten" },
      { op = "dense", out = 10 },
    ]
    loss = "softmax_cross_entropy"
    optimizer = { op = "adam", lr = 0.001 }

``input`` is the shape of one sample: a number (``input = 64``, features) or a list
(``input = [1, 8, 8]``, channels, height, width); the batch dimension is added in front.
``inputs = { token = { shape = [], dtype = "int64" }, feats = 4 }`` instead names several
inputs with their dtypes, which entries read by name (below); the module's batch ``x`` is
then a dict of arrays (CPU only for now: :func:`unsupported`).

**Shapes.** Each layer's op is read off its derived :class:`derive.ir.Program`, never
off its name. The op's (one) input binds its dimension names to the shape coming in:
the first to the batch, the others to the sizes of one sample (conv2d's ``x`` is
``N C H W``: C = 1, H = 8, W = 8 above). The dimensions it does not bind come from the
layer's entry:

* ``out`` sizes the output's new dimension, the one neither the input binds nor the op
  derives (dense's ``O``, conv2d's ``O``, a cell's ``H``);
* any other dimension is given by its name (``KH = 3, KW = 3``);
* the op's derived dimensions (conv2d's ``HO = floor((H + 2P - KH)/S) + 1``, flatten's
  ``F = C*H*W``) are evaluated with SymPy from those sizes and the attributes;
* attributes are given by name (``P = 1``); the others keep their defaults.

The output's shape (without the batch) is the next layer's input; the last layer's
must be what the loss takes. Elementwise ops (activations) keep the shape.

**Graphs.** An entry may name its output (``name = "h1"``) and the arrays it reads
(``inputs = ["h2", "h1"]``, in the order of the op's inputs: earlier entries' names, or
``"x"``, the model's input); without ``inputs`` it reads the previous entry's output::

    layers = [
      { op = "dense", out = 16, name = "h1" }, { op = "tanh" },
      { op = "dense", out = 16, name = "h2" }, { op = "add", inputs = ["h2", "h1"] },
      { op = "layer_norm" }, { op = "dense", out = 10 },
    ]

Each input binds the op's dimensions as a chain's one input does, so two inputs that
disagree on a dimension are a shape mismatch naming both. Names are checked in order
(unknown, used twice, a later entry's: no cycles), and every output but the last must
be read. Going back, an array several entries read gets the sum of their gradients:
the first reader's backward (the last entry, in the backward's order) writes its
gradient, each later one a part the library's ``add`` adds in place
(:class:`codegen.model_plan.Layer` ``accumulate``). A chain's plan, and module, is
the same as without graphs.

**Recurrence.** A *cell* is an op whose inputs are a step input and its states, one
shaped as each of its outputs, which are its next states, paired in order (rnn_cell,
gru_cell: h; lstm_cell: h, c -> h_new, c_new). ``unroll = true`` runs it over a
sequence::

    input = [12, 1]                                        # T = 12 steps of 1 feature
    layers = [{ op = "gru_cell", out = 16, unroll = true }, { op = "dense", out = 2 }]

The first axis of a sample is time: the cell's step input binds the others (``I = 1``),
``out`` sizes the state (``H = 16``). The states start at zero, the cell runs over the
T steps, and the layer passes on the last first state (batch, H), or with
``return_sequences = true`` every step's (batch, T, H), so recurrent layers stack. The
fused training step keeps every state, and backpropagates through time: the states'
gradients run back over the steps (the output's gradient at each step added to the
first state's) while each step's parameter gradients are summed.

**Several outputs.** An entry whose op has several outputs names each, in the op's
order (``name = ["h", "c"]``); their values are ``h<i+1>`` and ``h<i+1>_<output>``
(:func:`output_keys`), every one must be read, and the op's backward takes all their
gradients.

**Folding: an entry at every position.** An entry whose input has more leading axes
per sample than its op needs, all of them *position* axes, runs at every position (as
torch.nn.Linear, LayerNorm and Embedding apply to leading axes)::

    inputs = { tokens = { shape = [11], dtype = "int64" } }
    layers = [{ op = "embedding", V = 10, D = 32, inputs = ["tokens"] },   # (11,) -> (11, 32)
              { op = "dense", out = 10 }, { op = "log_softmax" }]          # (11, 10)
    loss = "categorical_nll"                                               # targets (B, 11)

Those axes join the batch, a free view of a contiguous array ((B, T, D) read as
(B*T, D)), and the output is unfolded back ((B*T, O) -> (B, T, O)): :func:`_fold`
decides it, :class:`codegen.model_plan.Layer` ``fold``/``in_views``/``out_view`` carry
it to the templates. Position axes are every axis of an integer input, the axes an
entry folded, and those an op keeps in place (:func:`_positions_out`); a float input has
none, so a rank mismatch on float features stays an error. The loss folds the same way
(:func:`_loss_fold`): its mean over the batch is then the mean over every position.

**Parameters** are initialised by the role they play in the op's forward equations
(read off the Program, so any op gets a suitable rule): a parameter multiplied with the
input inside a sum (a weight) is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in
being the size of the summed dimensions it spans (dense: I; conv2d: C*KH*KW; a cell's
recurrent weight: H), PyTorch's rule for weights; a parameter added to the result (a
bias) starts at zero (PyTorch draws biases like weights); one only multiplied (a scale,
layer_norm's weight) at one; any other (an embedding table) from N(0, 1). A cell's input
weight gets the fan-in of its own sum (I), where PyTorch's cells use 1/sqrt(H) for
every weight.

:func:`render_model` checks the spec against the library's ops and renders
``codegen/templates/model/model.py.jinja``. The emitted module has no kernels of its
own. ``forward``, ``loss`` and ``loss_and_grads`` call the library's ops through
``generated.op(...)``; ``train_step`` checks its arguments once and calls one
``@njit(cache=True)`` function that chains the library's compiled cores
(``_dense_fwd_core``, ``_dense_bwd_params_core``, ``_adam_step_core``, ...: the code the
ops' own wrappers call), so a training step is a single compiled call with no per-op
Python overhead and no unused gradients (no backward runs below the first layer with
parameters, and that layer uses its op's params-only backward core where it has one).
A layer or loss whose backward reads values resting on its forward's reductions (a
log-sum-exp, an argmax, a norm's statistics) runs its forward-saving core and hands
those values to its backward (``_fwd_saving_core`` / ``_bwd_saved_core``, see
:func:`codegen.emit.saved_for_backward`), so no reduction is computed twice; an
unrolled cell keeps them per time step. The step allocates nothing large: it writes
through the cores' ``_into`` forms (``_dense_fwd_into``: the core with its results
given) into arrays that ``_step_arrays`` allocates from the ``_alloc`` forms once per
batch shape and ``train_step`` keeps (per thread) while the shape stays the same.
Allocating and freeing megabyte arrays every step cost the MLP of the benchmark about
900 page faults and 1.5 ms per step at batch 1024 (glibc hands large freed blocks
back to the kernel). An unrolled cell's time loop still calls the allocating cores.

The spec is read with :mod:`tomllib` and nothing in it is evaluated: op names are
looked up in the library, sizes and attribute values must be TOML numbers, and derived
dimensions are the library's own SymPy expressions, evaluated at those numbers.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import sympy
import tomllib

from derive.errors import SpecError

from .emit import assumption_checks, backward_variants, op_module, saved_for_backward
from .emit import core_name
from .model_plan import TIME, Cell, Layer, ModelPlan, Param, Running, is_integer, tuple_literal, plan_step
from .template_util import COMMAND, render

TEMPLATE = "model/model.py.jinja"
REPO_ROOT = Path(__file__).resolve().parent.parent

REQUIRED_FIELDS = ("name", "kind", "input", "layers", "loss", "optimizer")
OPTIONAL_FIELDS = ("doc", "inputs")
LAYER_KINDS = ("activation", "layer")
LAYER_FIELDS = ("op", "out", "unroll", "return_sequences", "name", "inputs")  # besides the op's dimensions and attributes
# the model's input, as an entry's ``inputs`` names it
MODEL_INPUT = "x"

# How a parameter starts, by the role it plays in its op's forward equations.
INIT_RULES = ("fan_in", "zeros", "ones", "normal")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # no leading "_": not "__init__" of the package
_LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a layer entry's name for its output


class ModelSpecError(SpecError):
    """A model spec that cannot be built; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(path, problem)


@dataclass(frozen=True)
class OpInfo:
    """What a model needs to know about one library op (read off its Program)."""

    name: str
    kind: str
    args: tuple[tuple[str, str, tuple[str, ...]], ...]  # (name, role, shape as dim names)
    output_shape: tuple[str, ...]
    differentiable: tuple[str, ...]
    attrs: tuple[str, ...]
    hyper: tuple[str, ...]
    state: tuple[str, ...]
    elementwise: bool
    module: str = ""  # the generated module holding the op's compiled cores
    attr_defaults: tuple[tuple[str, int | float], ...] = ()  # attributes in core order
    counter: str = ""  # an optimizer's step counter, passed before its attributes
    variants: tuple[str, ...] = ()  # backward cores for a subset of the gradients
    int_args: tuple[str, ...] = ()  # arguments holding int64 data
    derived: tuple[tuple[str, sympy.Expr], ...] = ()  # derived dimensions, in order
    inits: tuple[tuple[str, str, sympy.Expr], ...] = ()  # (param, rule, fan-in expression)
    # what the forward keeps for the backward (emit.saved_for_backward): outputs the
    # backward reads, and intermediates its fwd_saving core returns after the outputs
    saved_outputs: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    task: str = ""  # a loss's: what the model's output means; decides what ``predict`` returns
    # the attributes' allowed values (Program.attr_domains) and the values that select a
    # variant of the op with other output shapes (a loss's reduction = "none")
    domains: tuple = ()
    variant_values: tuple = ()
    assume: tuple = ()  # the run-time checks of the assumptions its gradient was derived from
    outputs: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, shape as dim names) of each output
    rng: tuple[str, ...] = ()  # (seed attribute, step attribute) of an op drawing random numbers
    modes: tuple = ()  # how a model runs it outside training (derive.ir.Program.modes)
    output_names: tuple[str, ...] = ()
    shorthands: tuple = ()  # (name, attributes it sets), as op() takes them (S -> SH, SW)

    @property
    def inputs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return tuple((n, s) for n, r, s in self.args if r == "input")

    @property
    def params(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return tuple((n, s) for n, r, s in self.args if r == "param")


def _sized_by_relations(program) -> tuple:
    """The relations of `dims` that size a dimension for a model, as (name, expression):
    a relation naming a dimension (GRU's G = 3*H), or a multiple of one by attributes and
    numbers (a convolution's CG*groups = C sizes CG = C/groups; a size that does not
    divide is then an error naming it). A relation that only checks a dimension that a
    derived one divides (O = OG*groups, with OG = O/groups derived from O) sizes nothing:
    O is given, and the relation is checked when the op runs."""
    derived = {sym for sym, _ in program.derived_dims}
    dims = set(program.dims)
    out = []
    for lhs, rhs, _ in program.relations:
        if sympy.sympify(rhs).free_symbols & derived:
            continue
        if isinstance(lhs, sympy.Symbol):
            out.append((str(lhs), rhs))
            continue
        syms = [s for s in lhs.free_symbols if s in dims]
        if lhs.is_Mul and len(syms) == 1:
            out.append((str(syms[0]), rhs / (lhs / syms[0])))
    return tuple(out)


def op_info(program) -> OpInfo:
    """The model-relevant facts of a :class:`derive.ir.Program`."""
    args = tuple((a.name, a.role, tuple(str(d) for d in a.shape)) for a in program.args)
    output_shape = tuple(str(d) for d in program.outputs[0].shape) if program.outputs else ()
    attrs = tuple(str(sym) for sym, _ in program.attrs)
    extra = program.extra or {}
    hyper = extra.get("hyper")
    if hyper is not None:
        hyper_names = tuple(str(k) for k in hyper)
    elif program.kind in ("optimizer", "schedule"):
        hyper_names = attrs  # an optimizer's hyperparameters are its attributes
    else:
        hyper_names = ()
    saved_outputs, kept = saved_for_backward(program)
    return OpInfo(
        name=program.name,
        kind=program.kind,
        args=args,
        output_shape=output_shape,
        differentiable=tuple(program.grad_of),
        attrs=attrs,
        hyper=hyper_names,
        state=tuple(program.state),
        elementwise=bool(program.elementwise),
        module=op_module(program),
        attr_defaults=tuple((str(sym), v) for sym, v in program.attrs),
        shorthands=tuple(program.shorthands),
        counter=program.step_counter.name if program.step_counter is not None else "",
        variants=tuple(suffix for suffix, _ in backward_variants(program)),
        int_args=tuple(a.name for a in program.args if a.dtype == "int"),
        # a relation of `dims` naming a dimension (GRU's G = 3*H) sizes it as a derived one,
        # unless it only checks a dimension that a derived one divides (O = OG*groups, with
        # OG = O/groups derived from O): then O is given and the relation checks it
        derived=tuple((str(sym), expr) for sym, expr in program.derived_dims) + _sized_by_relations(program),
        inits=param_inits(program),
        saved_outputs=tuple(saved_outputs),
        kept=tuple(kept),
        task=program.task,
        assume=tuple(assumption_checks(program)),
        outputs=tuple((o.name, tuple(str(d) for d in o.shape)) for o in program.outputs),
        rng=draw_attrs(program),
        modes=tuple(program.modes),
        output_names=tuple(o.name for o in program.outputs),
        domains=tuple(program.attr_domains),
        variant_values=tuple(condition for condition, _ in program.variants),
    )


def draw_attrs(program) -> tuple[str, ...]:
    """(seed, step): the integer attributes an op's forward draws random numbers with
    (``uniform(seed, step, i)``: the first two arguments of every draw), so a model can
    pass its seed and step counter; () when it draws none, or not with attributes."""
    from derive.functions import RandomFunction

    ints = {str(sym) for sym, v in program.attrs if is_integer(v)}
    keys = set()
    for stmt in program.forward:
        for draw in sympy.sympify(stmt.body).atoms(RandomFunction):
            keys.add(tuple(str(a) for a in draw.args[:2]))
    if len(keys) != 1:
        return ()
    (key,) = keys
    return key if all(k in ints for k in key) else ()


# ------------------------------------------------------------------ initialisation


def _reads(expr) -> list:
    return sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key)


def _tensor(read) -> str:
    return str(read.base.label)


def _context(expr, read, ctx: str = "other"):
    """How ``read`` enters ``expr``: "add" (a term of a sum), "mul" (a factor of a
    product with another tensor read) or "other", from its nearest enclosing operation
    (a Piecewise bounds guard, or a product with constants only, is looked through);
    None when ``read`` is not in ``expr``."""
    if expr == read:
        return ctx
    if isinstance(expr, (sympy.Piecewise, sympy.functions.elementary.piecewise.ExprCondPair)):
        inner = ctx
    elif expr.is_Add:
        inner = "add"
    elif expr.is_Mul:
        others = [a for a in expr.args if read not in a.atoms(sympy.Indexed) and a.atoms(sympy.Indexed)]
        inner = "mul" if others else ctx
    else:
        inner = "other"
    for arg in expr.args:
        found = _context(arg, read, inner)
        if found is not None:
            return found
    return None


def param_inits(program) -> tuple[tuple[str, str, sympy.Expr], ...]:
    """(param, rule, fan-in) for each parameter of ``program``, from the forward
    statements that read it (see the module docstring); the fan-in is an expression
    over the op's dimensions (1 for rules that do not use it)."""
    out = []
    for arg in program.args:
        if arg.role != "param":
            continue
        rule, fan_in, contexts = None, sympy.Integer(1), []
        names = {arg.name}  # the param and its copies (a statement that only reads it, reindexed)
        for stmt in program.forward:
            reads = [r for r in _reads(stmt.body) if _tensor(r) in names]
            if not reads:
                continue
            body = stmt.body
            if isinstance(body, sympy.Piecewise) and len(body.args) == 2 and body.args[1].expr == 0:
                body = body.args[0].expr  # a read that is zero outside its tensor
            if stmt.reduce == "none" and isinstance(body, sympy.Indexed):
                names.add(stmt.target)
                continue
            others = [r for r in _reads(stmt.body) if _tensor(r) not in names]
            if stmt.reduce == "sum" and others:
                extent = {loop.index: loop.hi - loop.lo for loop in stmt.over}
                spanned = set()
                for r in reads:
                    for i in r.indices:
                        spanned |= sympy.sympify(i).free_symbols & set(extent)
                rule = "fan_in"
                fan_in = sympy.Mul(*(extent[i] for i in sorted(spanned, key=str)))
                break
            contexts.extend(_context(stmt.body, r) for r in reads)
        if rule is None:
            if contexts and all(c == "add" for c in contexts):
                rule = "zeros"
            elif "mul" in contexts:
                rule = "ones"
            else:
                rule = "normal"
        out.append((arg.name, rule, fan_in))
    return tuple(out)


def _library_infos(programs) -> dict[str, OpInfo]:
    if programs is None:
        import derive

        programs = derive.library()
    if isinstance(programs, Mapping):
        programs = programs.values()
    infos = {}
    for p in programs:
        info = p if isinstance(p, OpInfo) else op_info(p)
        infos[info.name] = info
    return infos


def _display_path(path: Path) -> str:
    """The spec's path as the header shows it: relative to the repository when inside it."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name


# ------------------------------------------------------------------------- layers


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)




def _literal(value) -> str:
    return repr(int(value)) if isinstance(value, int) else repr(float(value))


def _shape(sizes) -> str:
    """A shape as Python writes it: (8,), (1, 8, 8)."""
    return repr(tuple(sizes))


def _dims_text(names) -> str:
    return "(" + ", ".join(names) + ")"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return _entry_text(value)
    return repr(value)


def _entry_text(entry: dict) -> str:
    """A layer entry as the spec writes it: { op = "dense", out = 10 }."""
    return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in entry.items()) + " }"


def _expand_shorthands(entry: dict, info: OpInfo) -> dict:
    """``entry`` with each shorthand of the op replaced by the attributes it sets
    (``P = 1``: ``PH = 1, PW = 1``), as ``op()`` does; an attribute the entry gives by its
    own name wins, wherever it stands."""
    table = dict(info.shorthands)
    if not any(k in table for k in entry):
        return entry
    out = {}
    for key, value in entry.items():
        if key in table:
            for part in table[key]:
                if part not in entry:
                    out[part] = value
        else:
            out[key] = value
    return out


def _core_attrs(info: OpInfo, given: dict) -> tuple[str, ...]:
    """Every attribute of ``info`` as a literal of its default's type (what ``op()``
    converts to), the spec's value where it gives one."""
    out = []
    for name, default in info.attr_defaults:
        value = given.get(name, default)
        if is_integer(default):
            out.append(repr(int(value)))
        else:
            out.append(repr(float(value)))
    return tuple(out)


class _Checker:
    """Validates one spec; every error names the file (and the entry) it is about."""

    def __init__(self, path: Path, infos: dict[str, OpInfo]):
        self.path = path
        self.infos = infos

    def fail(self, where: str, problem: str):
        raise ModelSpecError(self.path, f"{where}: {problem}" if where else problem)

    def lookup(self, where: str, name, kinds: tuple[str, ...]) -> OpInfo:
        if not isinstance(name, str):
            self.fail(where, f"op must be a string naming a library op, got {name!r}")
        info = self.infos.get(name)
        if info is None:
            known = ", ".join(sorted(n for n, i in self.infos.items() if i.kind in kinds))
            self.fail(where, f"unknown op {name!r} (known {'/'.join(kinds)} ops: {known})")
        if info.kind not in kinds:
            self.fail(where, f"op {name!r} is {_a(info.kind)}, not {' or '.join(_a(k) for k in kinds)}")
        return info

    def named_values(self, where: str, table: dict, info: "OpInfo") -> dict:
        """``table`` (a layer entry, a loss table) with the named values of the op's
        attributes (``reduction = "sum"``) replaced by their numbers; checks each value
        against the attribute's allowed values, and refuses the values that select a
        variant of the op whose outputs have other shapes (a model's loss is a scalar)."""
        out = dict(table)
        for name, domain, text in info.domains:
            if name not in out:
                continue
            value = out[name]
            if isinstance(value, str):
                if value not in domain.get("names", {}):
                    self.fail(where, f"attribute {name!r} = {value!r} is not a name of its values ({text})")
                value = out[name] = domain["names"][value]
            if _number(value) and not _allowed(value, domain):
                self.fail(where, f"attribute {name!r} = {value!r} is not allowed; allowed values: {text}")
        for condition in info.variant_values:
            if all(out.get(k, dict(info.attr_defaults).get(k)) == v for k, v in condition):
                given = ", ".join(f"{k} = {v!r}" for k, v in condition)
                self.fail(where, f"{given} makes op {info.name!r} return one value per term instead of one "
                                 f"number (a model needs a scalar loss and whole-batch layers)")
        return out

    def attrs(self, where: str, table: dict, allowed: tuple[str, ...], what: str, defaults: dict):
        """The spec's values of an op's attributes, as literals. A value must be a finite
        number, and an integer where the op's default is one (a size, a stride): the
        compiled step and the ops' wrappers would otherwise read it differently."""
        out = []
        for key, value in table.items():
            if key not in allowed:
                have = ", ".join(allowed) if allowed else "none"
                self.fail(where, f"unknown {what} {key!r} (this op has: {have})")
            if not _number(value) or not math.isfinite(value):
                self.fail(where, f"{what} {key!r} must be a finite number, got {value!r}")
            if is_integer(defaults.get(key)) and not is_integer(value):
                self.fail(where, f"{what} {key!r} must be an integer (its default is {defaults[key]}), got {value!r}")
            out.append((key, _literal(value)))
        return tuple(out)


def _allowed(value, domain: dict) -> bool:
    """Whether ``value`` is in ``domain`` (AttrDomain.table: values and/or bounds)."""
    if "values" in domain and value not in domain["values"]:
        return False
    return not (("min" in domain and value < domain["min"]) or ("max" in domain and value > domain["max"])
                or ("above" in domain and value <= domain["above"]) or ("below" in domain and value >= domain["below"]))


def _positive_int(check: _Checker, where: str, field: str, value) -> int:
    if not is_integer(value) or value < 1:
        check.fail(where, f"{field!r} must be a positive integer, got {value!r}")
    return value


def _input_shape(check: _Checker, value) -> tuple[int, ...]:
    """The spec's ``input``: a number of features, or a list of sizes (one sample)."""
    if is_integer(value):
        return (_positive_int(check, "", "input", value),)
    if isinstance(value, list) and value and all(is_integer(v) and v >= 1 for v in value):
        return tuple(value)
    check.fail("input", f"must be a positive integer (features) or a non-empty list of them (one sample's shape, e.g. [1, 8, 8]), got {value!r}")


def _model_inputs(check: _Checker, spec: dict) -> list:
    """(name, key, variable, shape, integer) of each model input: ``input = 64`` is one,
    read as ``"x"``; ``inputs = { feats = 64, token = { shape = [], dtype = "int64" } }``
    names several (float by default), in the spec's order."""
    if "inputs" not in spec:
        return [(MODEL_INPUT, 0, "h0", _input_shape(check, spec["input"]), False)]
    if "input" in spec:
        check.fail("inputs", "a model has either 'input' (one input, read as \"x\") or 'inputs' (several, by name), not both")
    table = spec["inputs"]
    if not isinstance(table, dict) or not table:
        check.fail("inputs", f"must be a table of named inputs, e.g. {{ feats = 64, token = {{ shape = [], dtype = \"int64\" }} }}, got {table!r}")
    out = []
    for j, (in_name, value) in enumerate(table.items()):
        where = f"inputs.{in_name}"
        if not _LABEL_RE.match(in_name) or keyword.iskeyword(in_name):
            check.fail(where, "an input's name must be an identifier")
        dtype = "float"
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"shape", "dtype"})
            if unknown or "shape" not in value:
                check.fail(where, f"must be a shape, or a table {{ shape = [...], dtype = \"float\" or \"int64\" }}, got {value!r}")
            dtype = value.get("dtype", "float")
            if dtype not in ("float", "int64"):
                check.fail(where, f"dtype must be \"float\" or \"int64\", got {dtype!r}")
            value = value["shape"]
        if dtype == "int64" and value == []:
            shape = ()  # one integer per sample (a token id)
        else:
            shape = _input_shape(_Checker(check.path, check.infos), value) if is_integer(value) or (
                isinstance(value, list) and value and all(is_integer(v) and v >= 1 for v in value)) else None
            if shape is None:
                check.fail(where, f"shape must be a positive integer or a non-empty list of them, got {value!r}")
        out.append((in_name, -(j + 1), f"x_{in_name}", shape, dtype == "int64"))
    return out


def _evaluate(expr: sympy.Expr, values: dict) -> sympy.Expr:
    """``expr`` (a library op's SymPy expression) at the given sizes and attributes."""
    mapping = {s: values[s.name] for s in expr.free_symbols if s.name in values}
    return sympy.sympify(expr).xreplace({s: sympy.sympify(v) for s, v in mapping.items()})


class _Binder:
    """The sizes of one layer: its dimension names bound to numbers."""

    def __init__(self, check: _Checker, where: str, info: OpInfo, entry: dict):
        self.check = check
        self.where = where
        self.info = info
        self.entry = entry
        self.dims: dict[str, int] = {}
        self.new_out: list[str] = []  # the output's dimensions that 'out' may size
        self.source: dict[str, str] = {}  # where each size came from, for messages

    def fail(self, problem: str):
        self.check.fail(self.where, problem)

    def bind(self, name: str, value: int, source: str):
        if name in self.dims and self.dims[name] != value:
            self.fail(
                f"shape mismatch: dimension {name} is {self.dims[name]} ({self.source[name]}) "
                f"but {value} ({source})"
            )
        self.dims[name] = value
        self.source[name] = source

    def all_dims(self) -> list[str]:
        names = []
        for _, _, shape in self.info.args:
            names.extend(shape)
        names.extend(self.info.output_shape)
        names.extend(n for n, _ in self.info.derived)
        return sorted(set(names))

    def given(self, batch: str, bound_by_input: set[str], new_out: list[str]):
        """Sizes from the entry: ``out`` and dimensions by name."""
        derived = dict(self.info.derived)
        self.new_out = new_out
        for key, value in self.entry.items():
            if key in LAYER_FIELDS or key in self.info.attrs:
                continue
            if key not in self.all_dims():
                have = ["out"] if new_out else []
                have += ["unroll"] if "unroll" in self.entry else []
                have += [d for d in self.all_dims() if d not in (batch, *bound_by_input, *derived, *new_out)]
                have += list(self.info.attrs)
                self.fail(f"unknown field {key!r} (this layer takes: {', '.join(have) or 'nothing but op'})")
            if key == batch:
                self.fail(f"dimension {key!r} is the batch; it is not given in the spec")
            if key in derived:
                self.fail(f"dimension {key!r} is derived ({key} = {derived[key]}); it cannot be given")
            if key in bound_by_input:
                self.fail(f"dimension {key!r} is set by the layer's input ({key} = {self.dims[key]}); it cannot be given")
            self.bind(key, _positive_int(self.check, self.where, key, value), f"given as {key} = {value}")
        if "out" in self.entry:
            if not new_out:
                self.fail(
                    "'out' is not used: this op's output "
                    f"{_dims_text(self.info.output_shape)} has no dimension of its own to size"
                )
            if len(new_out) > 1:
                self.fail(f"'out' is ambiguous: this op's output has the new dimensions {', '.join(new_out)}; give each by name")
            if new_out[0] in self.entry:
                self.fail(f"dimension {new_out[0]} is given twice, as 'out' and as {new_out[0]!r}")
            self.bind(new_out[0], _positive_int(self.check, self.where, "out", self.entry["out"]), f"out = {self.entry['out']}")

    def derive(self, attrs: dict):
        """The op's derived dimensions, in order, at the bound sizes and ``attrs``."""
        for name, expr in self.info.derived:
            values = {**attrs, **self.dims}
            missing = sorted(s.name for s in expr.free_symbols if s.name not in values)
            if missing and missing == self.new_out:
                # the op's own output size, which 'out' gives (conv2d's OG = O/groups needs O)
                self.fail(f"unknown dimension {missing[0]!r}: the derived dimension {name} = {expr} needs it and "
                          "neither the input nor the entry gives it; add out = <size> to the entry")
            if missing:
                self.fail(
                    f"unknown dimension {', '.join(missing)}: the derived dimension {name} = {expr} needs it; "
                    f"give it in the entry (e.g. {missing[0]} = <size>)"
                )
            value = _evaluate(expr, values)
            at = ", ".join(f"{s.name}={values[s.name]}" for s in sorted(expr.free_symbols, key=str))
            if not value.is_Integer:
                self.fail(f"derived dimension {name} = {expr} is {value} at {at}, not an integer")
            if int(value) < 1:
                self.fail(
                    f"derived dimension {name} = {expr} is {int(value)} at {at}: it must be positive "
                    "(the input is too small for these sizes and attributes)"
                )
            self.bind(name, int(value), f"{name} = {expr} at {at}")

    def sizes(self, names, what: str, batch: str) -> tuple[int, ...]:
        """The sizes of ``names`` (a shape without its batch dimension)."""
        out = []
        for d in names:
            if d == batch:
                self.fail(f"{what} has the batch dimension {batch} after its first axis; a model layer cannot batch it")
            if d not in self.dims:
                hint = "out = <size>" if self.new_out == [d] else f"{d} = <size>"
                self.fail(f"unknown dimension {d!r}: {what} needs it and neither the input nor the entry gives it; add {hint} to the entry")
            out.append(self.dims[d])
        return tuple(out)


def _reshapers(infos: dict[str, OpInfo], rank_in: int, rank_out: int) -> list[str]:
    """Ops without parameters that take one input of ``rank_in`` (batch included) to an
    output of ``rank_out``: what the error for a rank mismatch suggests."""
    out = []
    for info in infos.values():
        if info.kind != "layer" or info.params or len(info.inputs) != 1:
            continue
        if len(info.inputs[0][1]) == rank_in and len(info.output_shape) == rank_out:
            out.append(info.name)
    return sorted(out)


def _describe(i: int, entry: dict) -> str:
    return f"layers[{i}] {_entry_text(entry)}"


def _bind_layer(check: _Checker, i: int, entry: dict, info: OpInfo, sources: list, graph: bool):
    """Bind layer ``i``'s dimensions to sizes. ``sources``: (shape, description, integer) of each
    array the entry reads, in order (one, the previous entry's output, unless the entry
    names its ``inputs``: ``graph``). Returns (attr values, binder, output shape, cell,
    batch dimension): the cell is (step input, state input) names when the layer
    unrolls; elementwise layers have no dimensions (cell and batch are None)."""
    where = _describe(i, entry)
    shape, before = sources[0][:2]
    b = _Binder(check, where, info, entry)
    attrs_given = {k: v for k, v in entry.items() if k in info.attrs}
    attr_values = {**dict(info.attr_defaults), **attrs_given}  # values checked by _Checker.attrs
    unroll = entry.get("unroll", False)
    if not isinstance(unroll, bool):
        check.fail(where, f"'unroll' must be true or false, got {unroll!r}")
    sequences = entry.get("return_sequences", False)
    if not isinstance(sequences, bool):
        check.fail(where, f"'return_sequences' must be true or false, got {sequences!r}")
    if "return_sequences" in entry and not unroll:
        check.fail(where, "'return_sequences' is for a cell unrolled over time (unroll = true)")
    if graph and len(sources) == len(info.inputs) and not unroll:
        # an entry naming its inputs may read the model's integer inputs with the op's integer arguments
        for (n, _), (_, src_before, src_int) in zip(info.inputs, sources):
            if (n in info.int_args) != src_int:
                held = "integers" if src_int else "floats"
                check.fail(where, f"input {n!r} takes {'integer' if n in info.int_args else 'float'} data, but {src_before} holds {held}")
        float_inputs = list(info.inputs)
    else:
        float_inputs = [(n, s) for n, s in info.inputs if n not in info.int_args]
        if any(src[2] for src in sources):
            check.fail(where, f"{sources[0][1]} holds integers; an op reads them with an integer argument, named in inputs = [...]")
    if len(float_inputs) != len(info.inputs):
        ints = ", ".join(n for n, _ in info.inputs if n in info.int_args)
        check.fail(where, f"input {ints} holds integer data; a model layer passes float arrays from layer to layer")
    got = _shape(shape)
    if (info.elementwise or unroll) and len(sources) != 1:
        check.fail(where, f"'inputs' names {len(sources)} arrays, but this op takes one{' (the step input of the cell)' if unroll else ''}")
    if info.elementwise:
        if unroll:
            check.fail(where, "'unroll' is for cells (two inputs, a step and a state); this op is elementwise")
        for key in entry:
            if key not in ("op", "name", "inputs") and key not in info.attrs:
                check.fail(where, f"unknown field {key!r}: this op is elementwise (it keeps the shape); it takes only attributes ({', '.join(info.attrs) or 'none'})")
        return attr_values, b, shape, None, None

    if unroll:
        step_name, step_dims, pairs = _cell_states(check, where, info, float_inputs)
        state_dims = pairs[0][1]
        if len(step_dims) != len(shape):
            check.fail(
                where,
                f"shape mismatch: the cell runs over the first axis of {before}'s shape {got} (time) and takes steps "
                f"{step_name} {_dims_text(step_dims)} with {len(step_dims) - 1} dimension(s) per sample, "
                f"so it needs {len(step_dims)} dimension(s) per sample (time first)",
            )
        batch = step_dims[0]
        if state_dims[0] != batch or info.output_shape[0] != batch:
            check.fail(where, f"the cell's step, state and output must share the batch dimension {batch}")
        for d, size in zip(step_dims[1:], shape[1:]):
            b.bind(d, size, f"from {before}")
        cell = (step_name, tuple(state for state, _, _ in pairs), sequences)
    else:
        if len(float_inputs) != len(sources):
            names = ", ".join(f"{n} {_dims_text(s)}" for n, s in float_inputs)
            if graph:
                check.fail(where, f"this op takes {len(float_inputs)} input(s) ({names}), but 'inputs' names {len(sources)}")
            hint = ""
            if len(float_inputs) == 2 and sum(s == info.output_shape for _, s in float_inputs) == 1:
                hint = "; to run it as a recurrent cell over a sequence, add unroll = true"
            if len(float_inputs) > 1:
                hint += f"; name the arrays it reads with inputs = [{', '.join(chr(34) + '...' + chr(34) for _ in float_inputs)}]"
            check.fail(where, f"this op takes {len(float_inputs)} inputs ({names}); a model layer takes one, the output of the layer before{hint}")
        batch = float_inputs[0][1][0]
        for (in_name, in_dims), (src_shape, src_before, _) in zip(float_inputs, sources):
            if len(in_dims) != len(src_shape) + 1:
                hint = ""
                fix = _reshapers(check.infos, len(src_shape) + 1, len(in_dims))
                if fix:
                    hint = "; reshape it first, e.g. with " + " or ".join(f'{{ op = "{n}" }}' for n in fix)
                check.fail(
                    where,
                    f"shape mismatch: this op takes {in_name} {_dims_text(in_dims)}, {len(in_dims) - 1} dimension(s) "
                    f"per sample, but {src_before} gives {_shape(src_shape)} per sample{hint}",
                )
            if in_dims[0] != batch:
                check.fail(where, f"the op's inputs do not share the batch dimension {batch} first ({in_name} {_dims_text(in_dims)})")
        for _, out_dims in info.outputs or (("y", info.output_shape),):
            if out_dims[:1] != (batch,):
                check.fail(where, f"the op's output {_dims_text(out_dims)} does not keep the batch dimension {batch} first")
        for (in_name, in_dims), (src_shape, src_before, _) in zip(float_inputs, sources):
            for d, size in zip(in_dims[1:], src_shape):
                b.bind(d, size, f"{in_name} from {src_before}" if len(sources) > 1 else f"from {src_before}")
        cell = None

    bound = set(b.dims)
    derived = {n for n, _ in info.derived}
    out_dims = [d for _, dims in info.outputs or (("y", info.output_shape),) for d in dims[1:]]
    new_out = list(dict.fromkeys(d for d in out_dims if d not in bound and d not in derived))
    b.given(batch, bound, new_out)
    b.derive(attr_values)
    for pname, pshape in info.params:
        if batch in pshape:
            check.fail(where, f"parameter {pname!r} {_dims_text(pshape)} has the batch dimension {batch}")
    out_shape = b.sizes(info.output_shape[1:], f"output {_dims_text(info.output_shape)}", batch)
    # every output's shape (an op with several: name = [...]; an unrolled cell's are its states)
    b.out_shapes = [b.sizes(dims[1:], f"output {name} {_dims_text(dims)}", batch) for name, dims in info.outputs] or [out_shape]
    if cell is not None:
        # the states' shapes per sample; the entry's output is the first state's, last or every one
        state_shapes = tuple(b.sizes(dims[1:], f"state {state} {_dims_text(dims)}", batch) for state, dims, _ in pairs)
        cell = (*cell, state_shapes)
        out_shape = ((shape[0],) if sequences else ()) + state_shapes[0]
    return attr_values, b, out_shape, cell, batch


def _cell_states(check: _Checker, where: str, info: OpInfo, float_inputs):
    """A cell's step input and its states: (step name, step dims, ((state, dims, output),
    ...)). Its outputs are its next states: each output is paired, in order, with the
    input shaped as it (the states), and the one input left is the step."""
    outputs = info.outputs or (("y", info.output_shape),)
    shapes = {dims for _, dims in outputs}
    states = [(n, s) for n, s in float_inputs if s in shapes]
    steps = [(n, s) for n, s in float_inputs if s not in shapes]
    listing = ", ".join(f"{n} {_dims_text(s)}" for n, s in float_inputs)
    outs = ", ".join(f"{n} {_dims_text(s)}" for n, s in outputs)
    if len(steps) != 1 or len(states) != len(outputs):
        check.fail(
            where,
            f"'unroll' needs a cell: an op whose inputs are a step and its states, one state shaped as each of its "
            f"outputs (the next states: {outs}); this one has {len(float_inputs)} input(s): {listing}",
        )
    for (state, dims), (out, out_dims) in zip(states, outputs):
        if dims != out_dims:
            check.fail(
                where,
                f"'unroll' needs a cell whose outputs are its next states in the order of its state inputs: output "
                f"{out} {_dims_text(out_dims)} pairs with state {state} {_dims_text(dims)}",
            )
        if dims[0] != steps[0][1][0]:
            check.fail(where, f"the cell's step, states and outputs must share the batch dimension {steps[0][1][0]}")
    return steps[0][0], steps[0][1], tuple((state, dims, out) for (state, dims), (out, _) in zip(states, outputs))


def _is_model_input(key) -> bool:
    """Whether a value key is a model input's (0, or -1, -2, ... for several)."""
    return isinstance(key, int) and key <= 0


def _entry_of(key) -> int:
    """The index of the entry whose output a value key is (1 or "1_c_new": entry 0)."""
    return (key if isinstance(key, int) else int(key.split("_", 1)[0])) - 1


def output_keys(i: int, outputs) -> list:
    """The value keys of entry ``i``'s outputs: i + 1 for the first (held in h<i+1>), and
    "<i+1>_<output>" for the others of an op with several (held in h<i+1>_<output>)."""
    return [i + 1] + [f"{i + 1}_{out}" for out in outputs[1:]]


def _entry_names(check: _Checker, where: str, entry: dict, outputs) -> list[str]:
    """The names entry gives its outputs ([] when none): ``name = "h"`` names the only
    (or an unrolled cell's) output, ``name = ["h", "c"]`` each output of an op with
    several, in the op's order. ``outputs``: the op's output names (None: one output)."""
    if "name" not in entry:
        if outputs and len(outputs) > 1:
            listed = ", ".join(outputs)
            check.fail(
                where,
                f"this op has {len(outputs)} outputs ({listed}): name each, in that order, with "
                f"name = [{', '.join(chr(34) + o + chr(34) for o in outputs)}], and read them by name with inputs = [...]",
            )
        return []
    label = entry["name"]
    several = outputs is not None and len(outputs) > 1
    if isinstance(label, list):
        if not several:
            check.fail(where, f"'name' lists {len(label)} names, but this entry has one output (an unrolled cell's is its first state); name it with name = \"...\"")
        if len(label) != len(outputs):
            check.fail(where, f"'name' lists {len(label)} names, but this op has {len(outputs)} outputs ({', '.join(outputs)}); name each, in that order")
        labels = label
    else:
        if several:
            check.fail(
                where,
                f"this op has {len(outputs)} outputs ({', '.join(outputs)}): name each, in that order, with a list "
                f"(name = [{', '.join(chr(34) + o + chr(34) for o in outputs)}])",
            )
        labels = [label]
    for one in labels:
        if not isinstance(one, str) or not _LABEL_RE.match(one):
            check.fail(where, f"'name' must be an identifier naming the entry's output (e.g. \"h1\"), got {one!r}")
    if len(set(labels)) != len(labels):
        check.fail(where, f"'name' lists a name twice: {labels!r}; each output has a name of its own")
    return labels


# ------------------------------------------------------------------------ folding


def _fold(check: _Checker, where: str, info: OpInfo, entry: dict, sources: list, positions: list, graph: bool):
    """How entry ``where`` applies its op at every position of its input: ``(k, lead,
    sources)``, ``k`` the number of leading per-sample axes folded into the batch (0: none),
    ``lead`` their sizes, ``sources`` what the op then reads, those axes removed.

    An op's input is rank-specific (dense's ``x`` is (B, I)); a source with ``k`` more
    leading axes per sample than it needs, all of them *position* axes (``positions``:
    how many leading axes of each source are), is read as the batch of its positions, a
    free view of a contiguous array ((B, T, D) as (B*T, D)), and the output is unfolded
    back ((B*T, O) -> (B, T, O)), as torch.nn.Linear, LayerNorm and Embedding apply to
    leading axes. Every array the op reads must have the same ``k`` position axes of the
    same sizes. Any other rank mismatch is left to :func:`_bind_layer`, which names it."""
    if info.elementwise or entry.get("unroll", False) is True or not sources:
        return 0, (), sources
    if graph and len(sources) == len(info.inputs):
        dims = [d for _, d in info.inputs]
    else:
        dims = [d for n, d in info.inputs if n not in info.int_args]
    if len(dims) != len(sources):
        return 0, (), sources
    extra = [len(src[0]) + 1 - len(d) for src, d in zip(sources, dims)]
    if all(k <= 0 for k in extra):
        return 0, (), sources
    k = extra[0]
    if any(kk <= 0 or kk > pos for kk, pos in zip(extra, positions)):
        return 0, (), sources  # not position axes: _bind_layer names the rank mismatch
    for src, kk in zip(sources[1:], extra[1:]):
        if kk != k or tuple(src[0][:k]) != tuple(sources[0][0][:k]):
            check.fail(
                where,
                f"shape mismatch: the op runs at every position of {sources[0][1]} ({_shape(sources[0][0][:k])} "
                f"before {_dims_text(dims[0][1:])}), but {src[1]} gives {_shape(src[0])} per sample; the arrays "
                "it reads must share their position axes",
            )
    lead = tuple(sources[0][0][:k])
    return k, lead, [(tuple(src[0][k:]), *src[1:]) for src in sources]


def _positions_out(info: OpInfo, fold: int, sources: list, positions: list, cell) -> int:
    """How many leading axes of an entry's output are position axes (a later entry may
    fold them): those it folded, then those the op keeps in place (its first input and
    its output have the same dimension at that axis, as attention's L or a position
    table's T), up to as many as its input had; an elementwise op keeps its input's."""
    if info.elementwise:
        return positions[0] if positions else 0
    if cell is not None or not sources:
        return 0
    left = min(positions) - fold
    in_dims = info.inputs[0][1] if info.inputs else ()
    kept = 0
    for j in range(1, min(len(in_dims), len(info.output_shape))):
        if kept >= left or in_dims[j] != info.output_shape[j]:
            break
        kept += 1
    return fold + kept


def _fold_fields(fold: int, read: list, shape_out: tuple[int, ...], grad_views: list) -> dict:
    """The :class:`Layer` fields of an entry folding ``fold`` position axes (none when 0)."""
    if not fold:
        return {}
    return {
        "fold": fold,
        "in_views": tuple(_view(src[0]) for src in read),
        "out_view": _view(shape_out[fold:]),
        "out_shape_view": _view(shape_out),
        "grad_views": tuple(grad_views),
    }


def _view(sizes) -> str:
    """A batch of arrays of one sample's shape ``sizes``, as ``reshape`` takes it: (-1, 32)."""
    return repr((-1, *sizes))


def _loss_fold(check: _Checker, loss: OpInfo, shape: tuple[int, ...], positions: int):
    """The loss at every position: ``(k, pred view, target's shape per sample, target
    view)``, ``k`` the position axes of the last entry's output folded into the batch
    (0: the loss takes the output as it is). A loss over (B, C) reads logits (B, T, V)
    as (B*T, V) and its target (B, T) (integer classes) or (B, T, V) (rows) as (B*T) or
    (B*T, V): the mean over the batch is then the mean over every position, as
    F.cross_entropy(logits.view(-1, V), target.view(-1))."""
    pred_dims = loss.args[0][2]
    k = len(shape) + 1 - len(pred_dims)
    if k <= 0 or k > positions:
        _check_loss_input(check, loss, shape)
        return 0, "", (), ""
    sizes = dict(zip(pred_dims[1:], shape[k:]))
    target_dims = loss.args[1][2] if len(loss.args) > 1 else ()
    missing = [d for d in target_dims[1:] if d not in sizes]
    if missing:
        check.fail(
            f"loss (op {loss.name!r})",
            f"the loss runs at every position of the last layer's output {_shape(shape)}, but its target "
            f"{_dims_text(target_dims)} has the dimension(s) {', '.join(missing)} that the prediction does not size",
        )
    rest = tuple(sizes[d] for d in target_dims[1:])
    return k, _view(shape[k:]), tuple(shape[:k]) + rest, _view(rest)


def _entry_inputs(check: _Checker, i: int, entry: dict, names: dict, later: dict, outputs=None) -> tuple[list, str]:
    """The arrays entry ``i`` reads (value keys: 0 the model's input, :func:`output_keys`
    of entry k's outputs) and the name it gives its output ("" when none; "h, c" for
    several); registers those names in ``names``. ``later``: the names of all entries,
    for the message about a forward reference. ``outputs``: the op's output names, when
    the entry may have several (None: one)."""
    where = _describe(i, entry)
    labels = _entry_names(check, where, entry, outputs)
    for label in labels:
        if _is_model_input(names.get(label, 1)):
            check.fail(where, f"name {label!r} is the model's input; give the entry's output another name")
        if label in names:
            check.fail(where, f"name {label!r} is already the name of layers[{_entry_of(names[label])}]; each output has a name of its own")
    label = ", ".join(labels)
    if "inputs" not in entry:
        if i == 0 and 0 not in names.values():
            check.fail(where, f"the model has several inputs ({', '.join(n for n, k in names.items() if k < 0)}); name the ones this entry reads with inputs = [...]")
        sources = [i]
    else:
        given = entry["inputs"]
        if not isinstance(given, list) or not given or not all(isinstance(s, str) for s in given):
            check.fail(
                where,
                f"'inputs' must be a non-empty list of names (earlier entries' names, or \"{MODEL_INPUT}\", the model's "
                f"input), got {given!r}",
            )
        sources = []
        for s in given:
            if s in names:
                sources.append(names[s])
            elif s in labels:
                check.fail(where, f"input {s!r} is this entry's own output: an entry reads the model's input and earlier entries' outputs (no cycles)")
            elif s in later:
                check.fail(
                    where,
                    f"input {s!r} is the output of a later entry, layers[{later[s]}]: an entry reads the model's input "
                    "and earlier entries' outputs (no cycles, no forward references)",
                )
            else:
                known = ", ".join(names)
                check.fail(where, f"unknown input {s!r} (the names defined before this entry: {known})")
    for one, key in zip(labels, output_keys(i, outputs or (None,)) if len(labels) > 1 else [i + 1]):
        names[one] = key
    return sources, label


def _later_names(raw: list) -> dict:
    """Each name an entry gives its output(s) -> the index of the first entry giving it."""
    later = {}
    for i, entry in enumerate(raw):
        label = entry.get("name") if isinstance(entry, dict) else None
        for one in label if isinstance(label, list) else [label]:
            if isinstance(one, str):
                later.setdefault(one, i)
    return later


def _outputs_of(info, entry: dict):
    """The output names an entry of ``info`` may name (None: one output, or an unrolled
    cell, whose output is its first state)."""
    if info is None or entry.get("unroll") is True or len(info.outputs) < 2:
        return None
    return tuple(n for n, _ in info.outputs)


def _graph(check: _Checker, raw: list, inputs: dict):
    """A first pass over the entries: what each reads, and whether each array depends on
    a parameter (so needs a gradient). Entries that are not valid are reported by the
    main pass, in order; this pass stops at the first (``complete`` is then False)."""
    later = _later_names(raw)
    names = dict(inputs)
    sources, requires = [], {k: False for k in inputs.values()}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            return sources, requires, False
        info = check.infos.get(entry.get("op")) if isinstance(entry.get("op"), str) else None
        outputs = _outputs_of(info, entry)
        try:
            src, _ = _entry_inputs(check, i, entry, names, later, outputs)
        except ModelSpecError:
            return sources, requires, False
        sources.append(src)
        for key in output_keys(i, outputs or (None,)):
            requires[key] = bool(info is not None and info.params) or any(requires[k] for k in src)
    return sources, requires, True


def _layers(check: _Checker, spec: dict, model_inputs: list, variants: bool = True) -> list[Layer]:
    """The checked layers. ``model_inputs``: (name, key, variable, shape, integer) of each
    model input; a model with one input has the key 0 (``h0``, read as ``"x"``), one with
    several the keys -1, -2, ... (``x_<name>``); entry i's output has the key i + 1."""
    raw = spec["layers"]
    if not isinstance(raw, list) or not raw:
        check.fail("layers", "must be a non-empty list of tables like { op = \"dense\", out = 10 }")
    layers = []
    # value k: 0 the model's input, k + 1 entry k's output; each with its shape and how messages name it
    values = {}
    var = {}
    positions = {}  # value k: how many leading axes of one sample are positions (_fold)
    for in_name, k, v, in_shape, is_int in model_inputs:
        values[k] = (in_shape, "the input" if k == 0 else f"input {in_name!r}", is_int)
        var[k] = v
        positions[k] = len(in_shape) if is_int else 0  # token ids: every axis is a position
    shape = model_inputs[0][3]
    input_names = {in_name: k for in_name, k, *_ in model_inputs}
    all_sources, requires, complete = _graph(check, raw, input_names)
    # who reads each value, in the order the backward runs (later entries first): the first
    # writes the value's gradient, the others write parts that are added to it
    readers: dict[int, list] = {}
    for i in range(len(all_sources) - 1, -1, -1):
        for pos, k in enumerate(all_sources[i]):
            readers.setdefault(k, []).append((i, pos))
    names = dict(input_names)
    later = _later_names(raw)
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            check.fail(f"layers[{i}]", f"must be a table like {{ op = \"relu\" }}, got {entry!r}")
        if "op" not in entry:
            check.fail(_describe(i, entry), "missing field 'op' (the library op of this layer)")
        info = check.lookup(_describe(i, entry), entry["op"], LAYER_KINDS)
        where = _describe(i, entry)
        shorthands = dict(info.shorthands)
        if shorthands:  # checked as written (P = 0.5 names P), then spelled out
            defaults = dict(info.attr_defaults)
            check.attrs(where, {k: v for k, v in entry.items() if k in shorthands}, tuple(shorthands), "attribute",
                        {k: defaults[parts[0]] for k, parts in shorthands.items()})
        entry = _expand_shorthands(entry, info)
        entry = check.named_values(where, entry, info)
        outputs = _outputs_of(info, entry)
        sources, label = _entry_inputs(check, i, entry, names, later, outputs)
        graph = "inputs" in entry
        attrs = check.attrs(where, {k: v for k, v in entry.items() if k in info.attrs}, info.attrs, "attribute", dict(info.attr_defaults))
        read = [values[k] for k in sources]
        fold, lead, read = _fold(check, where, info, entry, read, [positions[k] for k in sources], graph)
        attr_values, binder, shape_out, cell, batch = _bind_layer(check, i, entry, info, read, graph)
        shape_out = (*lead, *shape_out) if fold else shape_out
        if fold and outputs:
            check.fail(where, f"an op with several outputs ({', '.join(outputs)}) at every position of a sequence is not supported yet")
        if cell and sources != [i]:
            check.fail(where, "an unrolled cell reads the previous entry's output (other 'inputs' are not supported yet)")
        if cell and requires[i] and len(readers.get(i, ())) > 1:
            check.fail(where, f"the cell's input, {values[i][1]}, is read by other entries too: not supported yet for an unrolled cell")

        values_at = {**attr_values, **binder.dims}
        inits = {p: (rule, fan) for p, rule, fan in info.inits}
        params = []
        for pname, pshape in info.params:
            sizes = binder.sizes(pshape, f"parameter {pname!r} {_dims_text(pshape)}", batch)
            key = f"{info.name}{i}.{pname}"
            rule, fan = inits.get(pname, ("fan_in", sympy.Mul(*(sympy.Symbol(d) for d in pshape[1:]))))
            fan_value = _evaluate(fan, values_at)
            if not fan_value.is_Integer or int(fan_value) < 1:
                check.fail(where, f"parameter {pname!r}: its fan-in {fan} is {fan_value}, not a positive integer")
            params.append(Param(pname, key, key.replace(".", "_"), sizes, rule, int(fan_value)))

        float_inputs = [n for n, _ in info.inputs if graph or n not in info.int_args] or [info.args[0][0]]
        reading = [(cell[0], i)] if cell else list(zip(float_inputs, sources))
        for arg, k in reading:
            if requires[k] and arg not in info.differentiable:
                reach = "the layers before it" if not graph else values[k][1]
                check.fail(where, f"input {arg!r} is not differentiable, so no gradient reaches {reach}")
        for state in cell[1] if cell else ():
            if state not in info.differentiable:
                check.fail(where, f"the state {state!r} is not differentiable, so the gradient cannot run back through time")
        for p in params:
            if p.arg not in info.differentiable:
                check.fail(where, f"parameter {p.arg!r} is not differentiable, so it cannot be trained")
        by_arg = {p.arg: p for p in params}
        reads = dict(reading)
        position = {arg: pos for pos, (arg, _) in enumerate(reading)}
        grads, param_grads, accumulate, hvp_reads, grad_views = [], [], [], [], []
        for arg in info.differentiable:
            if arg in by_arg:
                p = by_arg[arg]
                grads.append("g_" + p.local)
                param_grads.append((p.key, p.local, "g_" + p.local))
            elif arg in reads and requires[reads[arg]]:
                k = reads[arg]
                hvp_reads.append((arg, k, readers[k][0] == (i, position[arg])))
                if readers[k][0] == (i, position[arg]):
                    grads.append(f"g{k}")
                else:  # a part of the gradient of an array several entries read
                    grads.append(f"g{k}_{i}_{arg}")
                    accumulate.append((f"g{k}", f"g{k}_{i}_{arg}", len(values[k][0]) + 1))
                if fold:  # the op writes it folded, as it reads the array
                    grad_views.append((grads[-1], _view(read[position[arg]][0]), var[k]))
            else:
                grads.append("_")
        core_attrs = _core_attrs(info, {k: v for k, v in entry.items() if k in info.attrs})
        modes = _layer_modes(
            check, where, i, info, entry, params, attr_values, binder, batch, {arg: var[k] for arg, k in reading}, core_attrs,
        )
        core_attrs = modes.pop("core_attrs", core_attrs)
        if cell is not None and (modes.get("rng") or modes.get("running") or modes.get("eval_op")):
            check.fail(where, "an unrolled cell that draws random numbers or runs differently in eval mode is not supported yet")
        needs_backward = requires[i + 1]
        input_grads = any(requires[k] for _, k in reading)
        # below the first trained layer no gradient is used: that layer's params-only core
        # skips its input gradient, and the layers before it run no backward at all
        if variants and needs_backward and not input_grads and "params" in info.variants and cell is None:
            bwd_entry, bwd_unpack = "bwd_params", tuple(g for _, _, g in param_grads)
        else:
            # unused gradients get names of their own: Numba types each variable once
            bwd_entry = "bwd"
            bwd_unpack = tuple(_unused(i, arg) if g == "_" else g for arg, g in zip(info.differentiable, grads))
        # the forward keeps what rests on its reductions, so the backward does not redo them
        # (an unrolled cell keeps them per time step, in one list per value)
        fwd_entry, kept, given = "fwd", (), ()
        saving = variants and bool(info.kept or info.saved_outputs) and needs_backward
        if saving:
            fwd_entry, bwd_entry = "fwd_saving" if info.kept else "fwd", bwd_entry + "_saved"
            kept = tuple(f"kept{i}_{n}" for n in info.kept)
            held = dict(zip((n for n, _ in info.outputs), (f"h{k}" for k in output_keys(i, outputs or (None,)))))
            given = tuple(held.get(n, f"h{i + 1}") for n in info.saved_outputs) + kept
            if fold:  # the op's output as it wrote it
                given = tuple(f"h{i + 1}.reshape({_view(shape_out[fold:])})" for _ in info.saved_outputs) + kept
        layer_cell = None
        if cell is not None:
            layer_cell = _cell_calls(
                i, info, cell, params, core_attrs, len(values[i][0]), requires[i], kept if saving else None
            )
            given = ()  # a cell's backward takes them per step: Cell.jit_bwd_args
        keys = output_keys(i, outputs or (None,))
        shapes_out = getattr(binder, "out_shapes", None) if outputs else None
        shapes_out = tuple(shapes_out or [shape_out])
        if outputs and i == len(raw) - 1:
            check.fail(
                where,
                f"the last entry's output is the model's output, which the loss takes, but this op has {len(outputs)} "
                f"outputs ({', '.join(outputs)}); end with an entry that reads them",
            )
        for key, one in zip(keys, label.split(", ") if outputs else [label]):
            if complete and i < len(raw) - 1 and not readers.get(key):
                if outputs:
                    check.fail(where, f"its output {one!r} is read by no later entry; read it with inputs = [...] (an output nobody reads has no gradient)")
                check.fail(where, "its output is read by no later entry; name it (name = \"...\") and read it with inputs = [...], or remove the entry")
        layers.append(
            Layer(
                index=i,
                var=f"_{info.name}{i}",
                op=info.name,
                kind=info.kind,
                attrs=attrs,
                params=tuple(params),
                shape_in=values[sources[0]][0],
                shape_out=shape_out,
                grads=tuple(grads),
                param_grads=tuple(param_grads),
                fwd_entry=fwd_entry,
                bwd_entry=bwd_entry,
                bwd_unpack=bwd_unpack,
                core_attrs=core_attrs,
                cell=layer_cell,
                kept=kept,
                given=given,
                needs_backward=needs_backward,
                inputs=tuple(var[k] for k in sources),
                accumulate=tuple(accumulate),
                hvp_reads=tuple(hvp_reads),
                label=label,
                sources_text=(
                    " (" + ", ".join(entry["inputs"]) + ")" if graph else ""
                ) + (f" as {label}" if label else ""),
                shapes_in=tuple(values[k][0] for k in sources),
                more_outputs=tuple(keys[1:]),
                shapes_out=shapes_out,
                **modes,
                positions=_positions_out(info, fold, read, [positions[k] for k in sources], cell),
                **_fold_fields(fold, read, shape_out, grad_views),
            )
        )
        for key, one, one_shape in zip(keys, label.split(", ") if outputs else [label], shapes_out):
            values[key] = (one_shape, f"{one!r} (layers[{i}], op {info.name!r})" if one else f"layers[{i}] (op {info.name!r})", False)
            var[key] = f"h{key}"
            positions[key] = layers[-1].positions
        shape = shape_out
    return layers


def _layer_modes(
    check: _Checker, where: str, i: int, info: OpInfo, entry: dict, params, attr_values: dict, binder, batch,
    arrays: dict, core_attrs: tuple,
) -> dict:
    """The :class:`Layer` fields of layer ``i``'s train and eval modes (docs/models.md),
    read off the op (:attr:`OpInfo.rng`, :attr:`OpInfo.modes`): an op that draws takes
    the model's seed (plus ``i << 32``: each layer draws a stream of its own) and step
    counter in its seed and step attributes (``core_attrs`` gets their expressions); the
    op it runs in eval mode, with its arguments (``arrays``: the arrays the layer reads,
    by the op's input names); its running statistics and the op updating them."""
    out: dict = {}
    modes = dict(info.modes)
    if info.rng:
        for a in info.rng:
            if a in entry:
                check.fail(where, f"attribute {a!r} is the model's: a layer draws with the model's seed (init_state(params, seed=...)) and step counter")
        seed = f"draw_seed + {i << 32}" if i else "draw_seed"
        by_attr = dict(zip(info.rng, (seed, "draw_step")))
        names = [n for n, _ in info.attr_defaults]
        out["rng"] = info.rng
        out["draw_attrs"] = tuple((a, by_attr[a]) for a in info.rng)
        out["core_attrs"] = tuple(by_attr.get(n, v) for n, v in zip(names, core_attrs))
    running_name = modes.get("running", "")
    if running_name:
        run = check.lookup(where, running_name, LAYER_KINDS)
        stats = [(n, s) for n, _, s in run.args if n not in arrays]
        if not stats or len(stats) != len(run.output_names):
            check.fail(where, f"the running-statistics op {running_name!r} must take the layer's inputs, then the statistics, and give their new values")
        running = []
        for n, dims in stats:
            key = f"{info.name}{i}.{n}"
            init = float(modes.get(f"init.{n}", 0.0))
            running.append(Running(key, key.replace(".", "_"), binder.sizes(dims, f"running statistic {n!r} {_dims_text(dims)}", batch), init))
        by_name = {**arrays, **{n: r.local for (n, _), r in zip(stats, running)}}
        run_attrs = _core_attrs(run, {a: attr_values[a] for a in run.attrs if a in attr_values})
        args = ", ".join([by_name[n] for n, _, _ in run.args] + list(run_attrs))
        out["running"] = tuple(running)
        out["running_op"] = running_name
        out["running_call"] = f"{core_name(running_name, 'fwd')}({args})"
        out["running_new"] = tuple(f"new{i}_{n}" for n, _ in stats)
    eval_name = modes.get("eval", "")
    if eval_name == "identity":
        if len(arrays) != 1:
            check.fail(where, "an op that passes its input in eval mode must read one array")
        out["eval_op"] = "identity"
        out["eval_args"] = next(iter(arrays.values()))
    elif eval_name:
        ev = check.lookup(where, eval_name, LAYER_KINDS)
        by_name = {**arrays, **{p.arg: p.local for p in params}, **{r.key.split(".", 1)[1]: r.local for r in out.get("running", ())}}
        missing = [n for n, _, _ in ev.args if n not in by_name]
        if missing:
            check.fail(where, f"its eval-mode op {eval_name!r} takes {', '.join(missing)}, which the layer neither reads nor keeps")
        out["eval_op"] = eval_name
        out["eval_var"] = f"_{eval_name}{i}"
        out["eval_attrs"] = tuple((a, _literal(attr_values[a])) for a in ev.attrs if a in attr_values and a in entry)
        out["eval_args"] = ", ".join(by_name[n] for n, _, _ in ev.args)
        out["eval_core_attrs"] = "".join(", " + v for v in _core_attrs(ev, {a: attr_values[a] for a in ev.attrs if a in attr_values}))
    return out


def _unused(i: int, arg: str) -> str:
    """The compiled step's name for a gradient nobody uses (layer i's ``arg``)."""
    return f"_unused{i}_{arg}"




def _cell_calls(
    i: int, info: OpInfo, cell: tuple, params, core_attrs, rank: int, step_grad: bool,
    kept: tuple[str, ...] | None = None,
) -> Cell:
    """The one-line calls of a cell at time ``step``, in the op's argument order.

    ``cell``: (step input, state inputs, return_sequences, the states' shapes). The first
    state is ``hs<i+1>``, any other ``hs<i+1>_<state>`` (its gradient ``gh<i+1>...``, the
    compiled forward's new value ``state<i+1>...``). Python (``forward``,
    ``loss_and_grads``): the step is ``h<i>[:, step]``, a state ``hs<i+1>[step]`` (a list
    of states). Compiled: the steps are ``xs<i+1>[step]`` (the input made time-major), a
    state ``hs<i+1>[step]`` (an array of T + 1 states). ``kept`` (the names of lists, one
    entry per step) when the compiled forward saves what rests on its reductions: the
    backward at ``step`` then reads the entries of that step, and the step's new states
    where the op keeps its outputs."""
    step, states, sequences, state_shapes = cell
    n = i + 1
    k = TIME
    locals_ = [p.local for p in params]
    suffix = {state: "" if j == 0 else f"_{state}" for j, state in enumerate(states)}

    def args(step_expr, tail):
        by_name = {step: step_expr, **{state: f"hs{n}{suffix[state]}[{k}]" for state in states}}
        return ", ".join([by_name[name] for name, _ in info.inputs] + tail)

    by_arg = {p.arg: p for p in params}

    def unpack(unused):
        out = []
        for arg in info.differentiable:
            if arg in by_arg:
                out.append("d_" + by_arg[arg].local)
            elif arg in suffix:
                out.append(f"gh{n}{suffix[arg]}")
            elif arg == step and step_grad:
                out.append("gx")
            else:
                out.append(unused(arg))
        return ", ".join(out)

    axes = (1, 0) + tuple(range(2, rank + 1))
    # a saved output is the new value of the state it pairs with (outputs in the states' order)
    out_state = {out: state for (out, _), state in zip(info.outputs or (("y", ()),), states)}
    given = []
    if kept is not None:
        given = [f"hs{n}{suffix[out_state[o]]}[{k} + 1]" for o in info.saved_outputs] + [f"{name}[{k}]" for name in kept]
    grads_in = ", ".join(f"gh{n}{suffix[state]}" for state in states)
    return Cell(
        state_shape=tuple(state_shapes[0]),
        axes=axes,
        py_fwd_args=args(f"h{i}[:, {k}]", locals_),
        py_bwd_args=f"{grads_in}, " + args(f"h{i}[:, {k}]", locals_),
        py_bwd_unpack=unpack(lambda arg: "_"),
        jit_fwd_args=args(f"xs{n}[{k}]", locals_ + list(core_attrs)),
        jit_bwd_args=f"{grads_in}, " + args(f"xs{n}[{k}]", locals_ + given + list(core_attrs)),
        kept=tuple(kept or ()),
        new_state=f"state{n}",
        jit_bwd_unpack=unpack(lambda arg: _unused(i, arg)),
        step_grad=step_grad,
        states=tuple(
            (f"hs{n}{suffix[state]}", f"state{n}{suffix[state]}", f"gh{n}{suffix[state]}", ", ".join(str(d) for d in shape))
            for state, shape in zip(states, state_shapes)
        ),
        sequences=sequences,
        step_arg=step,
        state_args=tuple(states),
        tangent_states=tuple((f"ts{n}{suffix[state]}", f"gth{n}{suffix[state]}") for state in states),
        py_tangent_args=", ".join(
            f"_at_step(t{i}, {k})" if name == step else f"ts{n}{suffix[name]}[{k}]" for name, _ in info.inputs
        ),
    )


def _check_loss_input(check: _Checker, loss: OpInfo, shape: tuple[int, ...]):
    """The last layer's output must have the rank the loss's prediction has."""
    pred_name, pred_dims = loss.args[0][0], loss.args[0][2]
    if len(pred_dims) != len(shape) + 1:
        fix = _reshapers(check.infos, len(shape) + 1, len(pred_dims))
        hint = (", e.g. with " + " or ".join(f'{{ op = "{n}" }}' for n in fix)) if fix else ""
        check.fail(
            f"loss (op {loss.name!r})",
            f"shape mismatch: the loss takes {pred_name} {_dims_text(pred_dims)}, {len(pred_dims) - 1} dimension(s) "
            f"per sample, but the last layer gives {_shape(shape)} per sample; end the layers with a layer of that rank{hint}",
        )


def _check_spec(path: Path, spec: dict, infos: dict[str, OpInfo], variants: bool = True) -> ModelPlan:
    """Validate ``spec``; return the plan of its step (``variants``: whether the target
    has the fused-step variant cores, :mod:`codegen.model_plan`)."""
    check = _Checker(path, infos)
    for field in REQUIRED_FIELDS:
        if field not in spec and not (field == "input" and "inputs" in spec):
            check.fail("", f"missing field {field!r} (a model spec has {', '.join(REQUIRED_FIELDS)})")
    for field in spec:
        if field not in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            check.fail("", f"unknown field {field!r} (a model spec has {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})")
    if spec["kind"] != "model":
        check.fail("kind", f"must be \"model\" for a model spec, got {spec['kind']!r}")
    name = spec["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name) or keyword.iskeyword(name):
        check.fail("name", f"must be a lower-case Python identifier starting with a letter (it names the module), got {name!r}")
    doc = spec.get("doc", "")
    if not isinstance(doc, str):
        check.fail("doc", f"must be a string, got {doc!r}")
    model_inputs = _model_inputs(check, spec)
    input_shape = model_inputs[0][3]
    layers = _layers(check, spec, model_inputs, variants)
    output_shape = layers[-1].shape_out

    loss_name = spec["loss"]
    loss_attrs: tuple = ()
    loss_given_attrs: dict = {}
    if isinstance(loss_name, dict):
        if "op" not in loss_name:
            check.fail("loss", "missing field 'op' (the library loss)")
        loss = check.lookup("loss", loss_name["op"], ("loss",))
        rest = check.named_values(f"loss (op {loss.name!r})", {k: v for k, v in loss_name.items() if k != "op"}, loss)
        loss_attrs = check.attrs(f"loss (op {loss.name!r})", rest, loss.attrs, "attribute", dict(loss.attr_defaults))
        loss_given_attrs = rest
    else:
        loss = check.lookup("loss", loss_name, ("loss",))
    if len(loss.differentiable) != 1 or loss.differentiable[0] != loss.args[0][0]:
        check.fail(f"loss (op {loss.name!r})", "a model loss must be differentiable in its first argument only")
    loss_fold = _loss_fold(check, loss, output_shape, layers[-1].positions)

    opt_spec = spec["optimizer"]
    if isinstance(opt_spec, str):
        opt_spec = {"op": opt_spec}
    if not isinstance(opt_spec, dict) or "op" not in opt_spec:
        check.fail("optimizer", "must be an op name or a table like { op = \"adam\", lr = 0.001 }")
    opt = check.lookup("optimizer", opt_spec["op"], ("optimizer",))
    if any(layer.cell for layer in layers) and TIME in (opt.counter, *(a for a, _ in opt.attr_defaults)):
        check.fail(f"optimizer (op {opt.name!r})", f"its argument {TIME!r} is the name of the unrolled layers' time loop")
    rest = {k: v for k, v in opt_spec.items() if k != "op"}
    hyper = check.attrs(f"optimizer (op {opt.name!r})", rest, opt.hyper, "hyperparameter", dict(opt.attr_defaults))

    task = loss.task or "regression"

    if any(layer.accumulate for layer in layers) and "add" not in infos:
        check.fail("layers", "an array read by several entries sums their gradients with the library op 'add', which is missing")
    params = [p for layer in layers for p in layer.params]
    if not params:
        check.fail("layers", "no layer has parameters, so there is nothing to train; add a layer with weights (dense, conv2d, ...)")
    summary = []
    for layer in layers:
        shapes = f"{' + '.join(_shape(s) for s in layer.shapes_in)} -> {', '.join(_shape(s) for s in layer.shapes_out or (layer.shape_out,))}"
        op = layer.op + (" (unrolled, sequences)" if layer.cell and layer.cell.sequences else " (unrolled)" if layer.cell else "")
        op += layer.sources_text
        pshapes = ", ".join(f"{p.key} {_shape(p.shape)}" for p in layer.params)
        summary.append(f"{layer.index:<5}  {op:<22}  {shapes:<24}  {pshapes}".rstrip())
    return plan_step(
        infos, layers, loss, loss_given_attrs, _core_attrs(loss, loss_given_attrs), loss_attrs, opt, hyper, params, summary,
        name, doc, input_shape, output_shape, task, variants, model_inputs, loss_fold,
    )


def load_spec(spec_path) -> dict:
    """Parse a model spec's TOML (nothing is evaluated)."""
    path = Path(spec_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelSpecError(path, f"cannot read the model spec: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelSpecError(path, f"invalid TOML: {exc}") from None


def check_model(spec_path, programs: Iterable | Mapping | None = None) -> dict:
    """Validate a model spec; return what the CPU template is rendered with (its layers,
    with their shapes and parameters, among it). Raises :class:`ModelSpecError`."""
    return plan_model(spec_path, programs).context()


def plan_model(spec_path, programs: Iterable | Mapping | None = None, target: str = "cpu") -> ModelPlan:
    """Validate a model spec; return the plan of its step for ``target`` (the plan is the
    same for every target whose op modules have the same entry points)."""
    from . import targets

    path = Path(spec_path)
    return _check_spec(path, load_spec(path), _library_infos(programs), targets.get(target).variants)


def unsupported(plan: ModelPlan, target) -> str | None:
    """Why ``target`` cannot run the plan's step (None when it can): a cell unrolled over
    time needs a target whose model template has the time loop (``Target.model_cells``)."""
    if plan.modes and not target.model_modes:
        layer = next(layer for layer in plan.layers if layer.rng or layer.eval_op or layer.running)
        return (
            f"layers[{layer.index}] (op {layer.op!r}): train and eval modes (dropout's draws, batch norm's running "
            f"statistics) have no {target.name} model step yet; train this model on the CPU"
        )
    if not target.model_folds:
        for layer in plan.layers:
            if layer.fold:
                return (
                    f"layers[{layer.index}] (op {layer.op!r}): an entry applied at every position of a sequence "
                    f"(folded into the batch) has no {target.name} training step yet; train this model on the CPU"
                )
        if plan.loss_fold:
            return f"loss (op {plan.loss!r}): a loss at every position has no {target.name} training step yet; train this model on the CPU"
    if plan.several_inputs and not target.model_inputs:
        return f"inputs: a model with several inputs has no {target.name} training step yet; train this model on the CPU"
    if not target.model_outputs:
        for layer in plan.layers:
            if layer.more_outputs:
                return (
                    f"layers[{layer.index}] (op {layer.op!r}): an entry with several outputs has no {target.name} "
                    "training step yet; train this model on the CPU"
                )
    if not target.model_cells:
        for layer in plan.layers:
            if layer.cell:
                return (
                    f"layers[{layer.index}] (op {layer.op!r}, unrolled): a cell unrolled over time has no "
                    f"{target.name} training step yet; train this model on the CPU"
                )
    return None


def render_model(
    spec_path,
    programs: Iterable | Mapping | None = None,
    modules: Mapping[str, str] | None = None,
    command: str = COMMAND,
    target: str = "cpu",
) -> tuple[str, str]:
    """Render one model spec for ``target``; return ``("models/<name><suffix>.py", text)``.

    ``programs`` are the library's :class:`derive.ir.Program` objects (a list, or a dict
    by name); by default :func:`derive.library` is asked. The filename is relative to
    the ``generated/`` package. ``modules`` ({"layers.py": text, ...}) are the library
    modules the model's fused step compiles in, as they will be written; by default
    they are read from ``generated/``. Their digests go into the model's text, so the
    fused step's Numba cache (keyed on the model file) is invalidated whenever a
    kernel it was compiled from changes (the CUDA model compiles nothing of its own:
    its kernels are cached with the op modules). ``command`` is the regenerate command
    its header names (a user's model built with ``--out`` names its own).
    """
    from . import targets

    tgt = targets.get(target)
    path = Path(spec_path)
    plan = plan_model(path, programs, target)
    problem = unsupported(plan, tgt)
    if problem:
        raise ModelSpecError(path, problem + f" (the {tgt.name} model module is not built)")
    context = plan.context()
    template = tgt.model_template
    context["header"] = {"sources": [_display_path(path)], "template": template, "command": command}
    context["digests"] = [(f, _digest(f + ".py", modules)) for f in _compiled_in(context["modules"])]
    context["suffix"] = tgt.suffix
    text = render(template, **context)
    return f"models/{context['name']}{tgt.suffix}.py", text


def _compiled_in(op_modules) -> list:
    """The files (under generated/, without ``.py``) whose compiled code a model's fused
    step compiles in: the op modules it imports cores from (``layers.dense`` ->
    ``layers/dense``) and the CPU runtime their cores call. Only these: editing any
    other op leaves the model's Numba cache valid."""
    return [m.replace(".", "/") for m in op_modules] + ["_runtime"]


def _digest(filename: str, modules: Mapping[str, str] | None) -> str:
    if modules is not None and filename in modules:
        data = modules[filename].encode("utf-8")
    else:
        try:
            data = (REPO_ROOT / "generated" / filename).read_bytes()
        except OSError:
            return "missing"
    return hashlib.sha256(data).hexdigest()[:16]


def render_models_init(names: Iterable[str]) -> tuple[str, str]:
    """``generated/models/__init__.py``: the package of generated models, listing them."""
    context = {
        "names": sorted(names),
        "names_literal": tuple_literal(sorted(names)),
        "header": {"sources": ["specs/models/*.toml"], "template": "model/__init__.py.jinja", "command": COMMAND},
    }
    text = render("model/__init__.py.jinja", **context)
    return "models/__init__.py", text
