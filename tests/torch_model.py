"""A model spec's network built again in PyTorch, entry by entry, from the oracle.

``TorchTwin(path, model)`` reads a model spec (``specs/models/*.toml`` or a test's) as
docs/models.md describes it, on its own: the ops' declarations (``derive.library_defs()``:
their inputs, parameters, outputs and attributes with their shapes, nothing derived) and
the spec's entries, not the planner that generated the module
(codegen/model.py), so a mistake in how the planner wires a graph shows as a
mismatch. ``twin.loss(params, x, y)`` computes the model's loss with PyTorch alone: each
entry is its library op's PyTorch reference (``reference.TORCH_ORACLE``: the op's
arguments in the op's order, its attributes as keywords, the op's defaults under the
spec's values), reading the arrays the entry names (``inputs``: the model's inputs,
earlier entries' names; by default the previous entry's output); a cell with
``unroll = true`` runs its reference over the first axis of each sample from zero
states (one per output, paired in order), giving its first state at the last step or,
with ``return_sequences``, at every step; an op with several outputs names them with a
list (``name = ["h", "c"]``); an op reading arrays with more axes than it declares runs
at every position (the leading axes folded into the batch, the loss's too). Parameters are the module's (``PARAM_SHAPES``: ``<op><index>.<param>``).
Nothing here knows a particular network: every model spec is checked against PyTorch
the moment it exists (tests/test_model_torch.py).

What the twin cannot build it refuses with a :class:`TwinError` naming the spec, the
entry and what is missing (an op without a PyTorch reference, an entry field whose
meaning it does not know, outputs it cannot name, a parameter of the module it did not
place): a spec is never passed over quietly. Extend the twin (or
the oracle) when a spec needs more.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import numpy as np
import tomllib
import torch

import reference as ref

# the entry fields whose meaning the twin knows, besides the op's attributes and dimensions
ENTRY_FIELDS = ("op", "out", "name", "inputs", "unroll")
CELL_FIELDS = ("return_sequences",)


class TwinError(AssertionError):
    """A model spec the PyTorch twin cannot build; the message says what is missing."""


@functools.cache
def op_defs() -> dict:
    """The library's op declarations by name (nothing derived)."""
    import derive

    return {d.name: d for d in derive.library_defs()}


@functools.cache
def _op_attrs(name: str) -> dict:
    """The generated op's attributes with their defaults."""
    import generated

    return dict(generated.op(name).attrs)


def _tensor(a) -> torch.Tensor:
    """An array as a float64 tensor (integer data, token ids, stays int64)."""
    a = np.asarray(a)
    return torch.tensor(a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64))


def _positional(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]


class TorchTwin:
    """The network of the model spec at ``path`` in PyTorch; ``model`` is its generated
    module (the twin takes its parameter names and sample shapes)."""

    def __init__(self, path, model):
        self.path = Path(path)
        self.model = model
        self.spec = tomllib.loads(self.path.read_text(encoding="utf-8"))
        inputs = self.spec.get("inputs")
        if inputs is None:
            self.inputs = {"x": (tuple(model.INPUT_SHAPE), False)}
        else:
            self.inputs = {}
            for name, value in inputs.items():
                shape = value.get("shape") if isinstance(value, dict) else value
                shape = (shape,) if isinstance(shape, int) else tuple(shape)
                is_int = isinstance(value, dict) and value.get("dtype", "float") != "float"
                self.inputs[name] = (shape, is_int)
        self.entries = self.spec["layers"]
        self.reads: list[list] = []  # per entry: the names of the arrays it reads
        placed = set()
        for i, entry in enumerate(self.entries):
            d = self.op(i)
            self._check_fields(i, entry, d)
            self.reads.append(self._sources(i, entry))
            placed |= {self.param_key(i, p) for p in d.params}
            self.oracle(i)
        unplaced = [k for k in model.PARAM_SHAPES if k not in placed]
        if unplaced:
            self.fail("layers", f"the module has parameters the twin placed in no entry: {', '.join(unplaced)}")
        self.loss_op = self.spec["loss"]["op"] if isinstance(self.spec["loss"], dict) else self.spec["loss"]
        self.oracle(None)

    # ------------------------------------------------------------------ reading the spec

    def fail(self, where: str, problem: str):
        raise TwinError(f"{self.path}: {where}: {problem}")

    def where(self, i) -> str:
        return f"loss (op {self.loss_op!r})" if i is None else f"layers[{i}] (op {self.entries[i]['op']!r})"

    def op(self, i):
        name = self.loss_op if i is None else self.entries[i]["op"]
        if name not in op_defs():
            self.fail(self.where(i), f"{name!r} is not a library op")
        return op_defs()[name]

    def oracle(self, i):
        name = self.op(i).name
        if name not in ref.TORCH_ORACLE:
            self.fail(self.where(i), f"the library op {name!r} has no PyTorch reference in tests/reference.py "
                      "(TORCH_ORACLE): add one, so that this model can be checked against PyTorch")
        fn = ref.TORCH_ORACLE[name]
        d = self.op(i)
        args = [*d.inputs, *d.params]
        if _positional(fn) != args:
            self.fail(self.where(i), f"the PyTorch reference takes ({', '.join(_positional(fn))}), the op "
                      f"({', '.join(args)}): the twin passes the op's arguments in the op's order")
        return fn

    def param_key(self, i: int, param: str) -> str:
        return f"{self.entries[i]['op']}{i}.{param}"

    def _check_fields(self, i: int, entry: dict, d):
        dims = {x for shape in [*d.inputs.values(), *d.params.values(), *d.outputs.values()] for x in shape}
        dims |= {str(x) for x in dict(d.derived_dims or {})}
        known = set(ENTRY_FIELDS) | {str(a) for a in dict(d.attrs or {})} | set(_op_attrs(d.name)) | dims
        known |= set(dict(d.shorthands or {}))  # conv2d's P for PH and PW
        if entry.get("unroll"):
            known |= set(CELL_FIELDS)
        for key in entry:
            if key not in known:
                self.fail(self.where(i), f"the PyTorch twin does not know the entry field {key!r}; "
                          "teach tests/torch_model.py what it means")

    def _sources(self, i: int, entry: dict) -> list:
        if "inputs" in entry:
            return list(entry["inputs"])
        if i > 0:
            return [i - 1]
        if len(self.inputs) != 1:
            self.fail(self.where(i), "the first entry of a model with several inputs names what it reads")
        return [next(iter(self.inputs))]

    def attrs(self, i) -> dict:
        """Every attribute of the op: the op's defaults under the spec's values."""
        d = self.op(i)
        values = {str(a): v for a, v in dict(d.attrs or {}).items()}
        values.update(_op_attrs(d.name))  # attributes the op gains when built (a loss's reduction)
        given = self.spec["loss"] if i is None else self.entries[i]
        if isinstance(given, dict):
            # a shorthand (conv2d's P) sets each of its attributes; one given by its own name wins
            for short, parts in dict(d.shorthands or {}).items():
                if short in given:
                    values.update({part: given[short] for part in parts})
            values.update({k: v for k, v in given.items() if k in values})
        return values

    # ---------------------------------------------------------------------- computing

    def forward(self, params: dict, x) -> torch.Tensor:
        """The model's output: ``params`` torch tensors keyed as the module's, ``x`` the
        batch as the module takes it (an array, or a dict of arrays by input name)."""
        values = {}
        if "inputs" in self.spec:
            values.update({name: _tensor(x[name]) for name in self.inputs})
        else:
            values["x"] = _tensor(x)
        out = None
        for i, entry in enumerate(self.entries):
            out = self._entry(i, entry, params, [values[s] for s in self.reads[i]])
            names = entry.get("name", [])
            if isinstance(out, tuple):  # several outputs: named in the op's order; the next entry reads the first
                if not isinstance(names, list) or len(names) != len(out):
                    self.fail(self.where(i), f"the op has {len(out)} outputs; the twin reads them by the names of a "
                              "list name = [...], one per output")
                values.update(zip(names, out))
                out = out[0]
            elif isinstance(names, str):
                values[names] = out
            values[i] = out
        return out

    def _entry(self, i: int, entry: dict, params: dict, reads: list) -> torch.Tensor:
        d = self.op(i)
        fn = self.oracle(i)
        by_param = {p: params[self.param_key(i, p)] for p in d.params}
        if entry.get("unroll"):
            return self._unrolled(i, entry, d, fn, by_param, reads)
        if len(reads) != len(d.inputs):
            self.fail(self.where(i), f"reads {len(reads)} array(s), the op takes {len(d.inputs)} input(s)")
        if d.kind == "activation":  # elementwise: any shape
            return fn(*reads, **self.attrs(i))
        reads, unfold = self._fold(i, d, reads)
        args = dict(zip(d.inputs, reads)) | by_param
        out = fn(*(args[n] for n in [*d.inputs, *d.params]), **self.attrs(i))
        return tuple(unfold(o) for o in out) if isinstance(out, tuple) else unfold(out)

    def _fold(self, i, d, reads: list):
        """An op applied at every position: arrays with more axes than the op declares
        have their leading axes (the batch and the positions) folded into one batch, and
        the op's outputs unfolded back (as torch.nn.Linear applies to leading axes)."""
        extra = {a.dim() - len(dims) for a, dims in zip(reads, d.inputs.values())}
        if extra == {0}:
            return reads, lambda out: out
        if len(extra) != 1 or min(extra) < 0:
            self.fail(self.where(i), "the arrays it reads have different numbers of axes beyond the op's: "
                      + ", ".join(f"{n} {tuple(a.shape)} for {dims}" for (n, dims), a in zip(d.inputs.items(), reads)))
        lead = tuple(reads[0].shape[: 1 + extra.pop()])
        folded = [a.reshape(-1, *a.shape[len(lead):]) for a in reads]
        return folded, lambda out: out.reshape(*lead, *out.shape[1:])

    def _unrolled(self, i: int, entry: dict, d, fn, by_param: dict, reads: list) -> torch.Tensor:
        """The cell over the first axis of each sample (time), from zero states (its
        inputs shaped as an output); its first state at the last step, or at every step
        (``return_sequences``, batch first)."""
        out_shapes = list(d.outputs.values())
        states = [n for n, s in d.inputs.items() if s in out_shapes]
        steps = [n for n in d.inputs if n not in states]
        if len(steps) != 1 or len(reads) != 1:
            self.fail(self.where(i), "unrolled, but the op's inputs are not one step input and its states")
        seq = reads[0]
        batch = seq.shape[0]

        def size(dim):
            if dim in entry:
                return entry[dim]
            if "out" in entry:
                return entry["out"]
            self.fail(self.where(i), f"the twin does not know the size of the state's dimension {dim}")

        state = {n: torch.zeros((batch, *(size(x) for x in d.inputs[n][1:])), dtype=seq.dtype) for n in states}
        outs = []
        for t in range(seq.shape[1]):
            args = {steps[0]: seq[:, t], **state, **by_param}
            new = fn(*(args[n] for n in [*d.inputs, *d.params]), **self.attrs(i))
            new = new if isinstance(new, tuple) else (new,)
            if len(new) != len(states):
                self.fail(self.where(i), f"the cell returns {len(new)} arrays for {len(states)} states")
            state = dict(zip(states, new))
            outs.append(new[0])
        return torch.stack(outs, dim=1) if entry.get("return_sequences") else outs[-1]

    def loss(self, params: dict, x, y) -> torch.Tensor:
        """The model's loss on the batch (x, y)."""
        d = self.op(None)
        if len(d.inputs) != 2 or d.params:
            self.fail(self.where(None), f"the twin passes a loss the prediction and the target; the op takes "
                      f"({', '.join([*d.inputs, *d.params])})")
        (pred, target), _ = self._fold(None, d, [self.forward(params, x), _tensor(y)])
        return self.oracle(None)(pred, target, **self.attrs(None))

    # ------------------------------------------------------------------------ a batch

    def batch_size(self, default: int = 3) -> int:
        """``default``, unless an entry ties the batch to a size: an op input whose shape
        repeats its batch dimension (a graph's adjacency ``A[V, V]``: the batch is the
        nodes) reading a model input, whose size along that axis is the batch's then."""
        for i, entry in enumerate(self.entries):
            d = self.op(i)
            for (name, dims), source in zip(d.inputs.items(), self.reads[i]):
                for axis, dim in enumerate(dims[1:]):
                    if dim == dims[0] and source in self.inputs:
                        return self.inputs[source][0][axis]
        return default

    def batch(self, rng: np.random.Generator, size: int | None = None):
        """A batch ``(x, y)`` for the model, in float64: normal features; integer inputs
        below the smallest leading size of the parameters of the entries that read them
        (an embedding's table rows); targets as the module's task takes them: one-hot
        along the last axis for a classifier, 0/1 for a binary one, normal values for a
        regression."""
        size = size or self.batch_size()
        x = {}
        for name, (shape, is_int) in self.inputs.items():
            if is_int:
                rows = [self.model.PARAM_SHAPES[self.param_key(i, p)][0]
                        for i in range(len(self.entries)) if name in self.reads[i] for p in self.op(i).params]
                if not rows:
                    self.fail("inputs", f"the integer input {name!r} is read by no entry with parameters; the twin "
                              "does not know which ids are valid")
                x[name] = rng.integers(0, min(rows), size=(size, *shape))
            else:
                x[name] = rng.normal(size=(size, *shape))
        if "inputs" not in self.spec:
            x = x["x"]
        out = tuple(self.model.OUTPUT_SHAPE)
        task = self.model.TASK
        loss = self.op(None)
        target = list(loss.inputs)[1]
        if (loss.dtypes or {}).get(target) == "int":  # class indices, one per position
            y = rng.integers(0, out[-1], (size, *out[:-1]))
        elif task == "classification":
            y = np.eye(out[-1])[rng.integers(0, out[-1], (size, *out[:-1]))]
        elif task == "binary":
            y = rng.integers(0, 2, size=(size, *out)).astype(np.float64)
        elif task == "regression":
            y = rng.normal(size=(size, *out))
        else:
            self.fail(self.where(None), f"the twin does not know the task {task!r}")
        return x, y
