"""Shared references for the tests: the PyTorch oracle, a finite-difference gradient
checker, input generators and tolerances.

Every test compares symgrad against these helpers instead of carrying its own copy.
PyTorch is a test dependency only; the oracle is always evaluated in float64.

Calling conventions (the generated-module contract, /work/shared/DESIGN.md):
``op.forward(*args)`` takes inputs then params; ``op.backward(*seeds, *args)`` returns
one gradient per differentiable argument (an array for one, a tuple for several).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.attention
import torch.nn.functional as F

KINDS_WITH_GRADIENTS = ("activation", "layer", "loss")

# ----------------------------------------------------------------------------------
# The oracle: library op name -> a torch callable with the op's argument order.
# Attributes are passed as keywords with the op's own attribute names.
# ----------------------------------------------------------------------------------


def _nll(logprobs, target, reduction=1):
    if reduction == 0:  # "none": one loss per sample
        return -(target * logprobs).sum(dim=1)
    total = -(target * logprobs).sum()
    return total if reduction == 2 else total / logprobs.shape[0]


# The losses' ``reduction`` attribute: PyTorch's own codes (torch.nn._reduction.get_enum).
REDUCTION = {0: "none", 1: "mean", 2: "sum"}


TORCH_ORACLE: dict[str, Callable] = {
    # activations
    "relu": lambda x: F.relu(x),
    "leaky_relu": lambda x, slope=0.01: F.leaky_relu(x, negative_slope=slope),
    "elu": lambda x, alpha=1.0: F.elu(x, alpha=alpha),
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "sigmoid": lambda x: torch.sigmoid(x),
    "tanh": lambda x: torch.tanh(x),
    "softplus": lambda x: F.softplus(x),
    "silu": lambda x: F.silu(x),
    "mish": lambda x: F.mish(x),
    "softmax": lambda x: F.softmax(x, dim=-1),
    "log_softmax": lambda x: F.log_softmax(x, dim=-1),
    # layers (dense's weight is I x O)
    "dense": lambda x, weight, bias: x @ weight + bias,
    # losses
    "mse": lambda pred, target, reduction=1: F.mse_loss(pred, target, reduction=REDUCTION[reduction]),
    "huber": lambda pred, target, delta=1.0, reduction=1: F.huber_loss(
        pred, target, delta=delta, reduction=REDUCTION[reduction]),
    "bce_with_logits": lambda pred, target, reduction=1: F.binary_cross_entropy_with_logits(
        pred, target, reduction=REDUCTION[reduction]),
    "softmax_cross_entropy": lambda logits, target, reduction=1: F.cross_entropy(
        logits, target, reduction=REDUCTION[reduction]),
    "nll": _nll,
    "kl_div": lambda logq, logp: F.kl_div(logq, logp, reduction="batchmean", log_target=True),
    "categorical_nll": lambda logprobs, idx, reduction=1: F.nll_loss(logprobs, idx, reduction=REDUCTION[reduction]),
    "gaussian_nll": lambda pred, target, var, eps=1e-6, full=0.0, reduction=1: F.gaussian_nll_loss(
        pred, target, var, full=bool(full), eps=eps, reduction=REDUCTION[reduction]),
    "poisson_nll": lambda pred, target, log_input=1.0, full=0.0, eps=1e-8, reduction=1: F.poisson_nll_loss(
        pred, target, log_input=bool(log_input), full=bool(full), eps=eps, reduction=REDUCTION[reduction]),
    "cosine_embedding_loss": lambda x1, x2, label, margin=0.0, eps=1e-12, reduction=1: F.cosine_embedding_loss(
        x1, x2, label, margin=margin, reduction=REDUCTION[reduction]),
    "cross_entropy": lambda logits, target, weight, ignore_index=-100, label_smoothing=0.0, reduction=1: F.cross_entropy(
        logits, target, weight=weight, ignore_index=int(ignore_index), label_smoothing=label_smoothing,
        reduction=REDUCTION[reduction]),
    "l2_penalty": lambda w, lam=1.0: lam * (w * w).sum() / 2,
}
def _multi_head_attention(x, w, b, wo, bo, heads, causal):
    """Projections, a split into heads, F.scaled_dot_product_attention, the heads joined and projected."""
    B_, L_, E_ = x.shape

    def split(t):
        return t.reshape(B_, L_, int(heads), E_ // int(heads)).transpose(1, 2)

    q, k, v = (split(x @ wi + bi) for wi, bi in zip(w, b))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
    return o.transpose(1, 2).reshape(B_, L_, E_) @ wo + bo


def _multihead_attention(query, key, value, attn_mask, key_padding_mask, in_proj_weight, in_proj_bias,
                         out_proj_weight, out_proj_bias, heads=2, causal=0):
    """torch.nn.MultiheadAttention's functional form, batch first, float masks added to the scores."""
    L_, S_, E_ = query.shape[1], key.shape[1], query.shape[2]
    mask = attn_mask
    if causal:
        mask = mask + torch.triu(torch.full((L_, S_), float("-inf"), dtype=mask.dtype), 1)
    y, _ = F.multi_head_attention_forward(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), E_, int(heads), in_proj_weight,
        in_proj_bias, None, None, False, 0.0, out_proj_weight, out_proj_bias, training=False,
        key_padding_mask=key_padding_mask, need_weights=False, attn_mask=mask)
    return y.transpose(0, 1)


# ----------------------------------------------------------------------------------
# The counter-based generator's NumPy twin (derive/functions.py uniform/normal): an
# independent, vectorised Philox-4x32-10, checked against Random123's known answers.
# ----------------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter_words, key_words, rounds: int = 10) -> tuple:
    """Philox-4x32 (Random123's philox4x32_R) of four counter words and two key words
    (arrays or numbers, each taken as uint32): the four output words, uint64 arrays."""
    c = [np.asarray(w, np.uint64) & _M32 for w in counter_words]
    k0, k1 = (np.asarray(w, np.uint64) & _M32 for w in key_words)
    for r in range(rounds):
        if r:
            k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
            k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
        p0 = np.uint64(0xD2511F53) * c[0]  # < 2**64: exact in uint64
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _M32]
    return tuple(c)


def _words(v):
    v = np.asarray(v, np.int64).astype(np.uint64)  # two's complement, as the kernels' masks take it
    return v & _M32, v >> np.uint64(32)


def philox_draw(seed, step, counter) -> tuple:
    """The block the kernels draw for (seed, step, counter): key = seed's words, counter =
    counter's words then step's."""
    (s0, s1), (t0, t1), (c0, c1) = _words(seed), _words(step), _words(counter)
    return philox4x32((c0, c1, t0, t1), (s0, s1))


def _unit(word):
    return ((word >> np.uint64(9)) * np.uint64(2) + np.uint64(1)).astype(np.float64) * 2.0**-24


def uniform_twin(seed, step, counter) -> np.ndarray:
    """uniform(seed, step, counter) of the spec language, in float64 (exact in float32 too)."""
    return _unit(philox_draw(seed, step, counter)[0])


def normal_twin(seed, step, counter) -> np.ndarray:
    """normal(seed, step, counter): Box-Muller of the block's first two words."""
    r = philox_draw(seed, step, counter)
    return np.sqrt(-2.0 * np.log(_unit(r[0]))) * np.cos(2.0 * np.pi * _unit(r[1]))


def dropout_keep(shape, p, seed=0, step=0) -> np.ndarray:
    """The library dropout's mask (1.0 kept, 0.0 dropped) for an input of ``shape`` (B, N)."""
    counter = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return (uniform_twin(seed, step, counter) >= p).astype(np.float64)


def _dropout(x, p=0.5, seed=0, step=0):
    keep = torch.from_numpy(dropout_keep(tuple(x.shape), p, seed, step)).to(x.dtype)
    return x * keep / (1 - p)


# The layer library (issue 3); attributes keep the ops' own names.
LAYER_ORACLE: dict[str, Callable] = {
    "conv2d": lambda x, weight, bias, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, groups=1: F.conv2d(
        x, weight, bias, stride=(SH, SW), padding=(PH, PW), dilation=(DH, DW), groups=groups),
    "max_pool2d": lambda x, KH=2, KW=2, SH=2, SW=2, PH=0, PW=0, DH=1, DW=1, ceil_mode=0: F.max_pool2d(
        x, (KH, KW), (SH, SW), (PH, PW), (DH, DW), ceil_mode=bool(ceil_mode)),
    "avg_pool2d": lambda x, KH=2, KW=2, SH=2, SW=2, PH=0, PW=0, ceil_mode=0, count_include_pad=1: F.avg_pool2d(
        x, (KH, KW), (SH, SW), (PH, PW), ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad)),
    "flatten": lambda x: torch.flatten(x, 1),
    "layer_norm": lambda x, weight, bias, eps=1e-5: F.layer_norm(x, (x.shape[-1],), weight, bias, eps),
    "batch_norm2d": lambda x, weight, bias, eps=1e-5, momentum=0.1: F.batch_norm(
        x, None, None, weight, bias, training=True, momentum=momentum, eps=eps),
    "batch_norm2d_eval": lambda x, running_mean, running_var, weight, bias, eps=1e-5: F.batch_norm(
        x, running_mean, running_var, weight, bias, training=False, eps=eps),
    "dropout": _dropout,
    "dropout_mask": lambda x, mask, p=0.5: x * mask / (1 - p),
    "embedding": lambda idx, table: F.embedding(idx, table),
    "rnn_cell": lambda x, h, w_ih, w_hh, b_ih, b_hh: torch.rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh),
    "gru_cell": lambda x, h, w_ih, w_hh, b_ih, b_hh: torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh),
    "lstm_cell": lambda x, h, c, weight_ih, weight_hh, bias_ih, bias_hh: torch.lstm_cell(
        x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh),
    "add": lambda x1, x2: torch.add(x1, x2),
    "concat": lambda x1, x2: torch.cat((x1, x2), dim=1),
    "positional_embedding": lambda x, table: x + F.embedding(torch.arange(x.shape[1]), table),
    "scaled_dot_product_attention": lambda q, k, v, causal=0: F.scaled_dot_product_attention(
        q, k, v, is_causal=bool(causal)),
    "cosine_similarity": lambda x1, x2, eps=1e-8: F.cosine_similarity(x1, x2, dim=-1, eps=eps),
    "gcn_layer": lambda A, x, weight, bias: A @ x @ weight + bias,
    "multi_head_attention": lambda x, wq, wk, wv, bq, bk, bv, wo, bo, heads=2, causal=0: _multi_head_attention(
        x, (wq, wk, wv), (bq, bk, bv), wo, bo, heads, causal),
    "multihead_attention": _multihead_attention,
}
TORCH_ORACLE.update(LAYER_ORACLE)
# Default sizes of the layer library's inputs (small, odd, all different).
LAYER_SIZES = {
    "conv2d": {"N": 2, "C": 4, "H": 5, "W": 3, "O": 6, "KH": 3, "KW": 2},  # groups 2 divides C and O
    "max_pool2d": {"N": 2, "C": 3, "H": 7, "W": 6},
    "avg_pool2d": {"N": 2, "C": 3, "H": 7, "W": 6},
    "flatten": {"N": 2, "C": 3, "H": 4, "W": 5},
    "layer_norm": {"B": 3, "D": 7},
    "batch_norm2d": {"N": 3, "C": 2, "H": 3, "W": 5},
    "batch_norm2d_eval": {"N": 3, "C": 2, "H": 3, "W": 5},
    "batch_norm2d_stats": {"N": 3, "C": 2, "H": 3, "W": 5},
    "dropout": {"B": 3, "N": 7},
    "dropout_mask": {"B": 3, "N": 7},
    "embedding": {"B": 6, "V": 5, "D": 4},
    "rnn_cell": {"B": 3, "I": 5, "H": 4},
    "gru_cell": {"B": 3, "I": 5, "H": 4},
    "lstm_cell": {"B": 3, "I": 5, "H": 4},
    "add": {"B": 3, "N": 5},
    "concat": {"A": 2, "N1": 3, "N2": 4, "R": 2},
    "positional_embedding": {"B": 2, "T": 3, "P": 5, "D": 4},
    "scaled_dot_product_attention": {"B": 2, "L": 3, "S": 5, "D": 4, "E": 6},
    "cosine_similarity": {"B": 3, "D": 7},
    "gcn_layer": {"V": 6, "I": 5, "O": 3},
    "multi_head_attention": {"B": 2, "L": 3, "E": 4},
    "multihead_attention": {"B": 2, "L": 3, "S": 4, "E": 4},
}


# Which argument of a layer extreme_inputs scales (the first float, differentiable one).
EXTREME_ARG = {"embedding": 1, "gcn_layer": 1}
# How many products of the scaled argument's magnitude a result sums (default 1): the
# gradients of attention through a nearly saturated softmax are differences of L*E
# such products (q_l times g.v_s), so they are only defined to eps * M * L * E, for
# PyTorch's kernels as for ours. Used by extreme_tol's callers.
EXTREME_TERMS = {"scaled_dot_product_attention": LAYER_SIZES["scaled_dot_product_attention"]["L"]
                 * LAYER_SIZES["scaled_dot_product_attention"]["E"]}


def batch_norm2d_stats_oracle(x, running_mean, running_var, momentum=0.1):
    """(new running mean, new running var) as torch.nn.BatchNorm2d updates them in training."""
    bn = torch.nn.BatchNorm2d(x.shape[1], momentum=momentum, dtype=torch.float64)
    bn.running_mean.copy_(_t(running_mean))
    bn.running_var.copy_(_t(running_var))
    bn.train()
    with torch.no_grad():
        bn(_t(x))
    return bn.running_mean.numpy(), bn.running_var.numpy()

# Elementwise activations accept any input shape; softmax/log_softmax are row-wise (B C).
ELEMENTWISE = ("relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh", "softplus", "silu", "mish")

# Documented kinds, attributes (defaults) and differentiable arguments of the library.
DOCUMENTED_KINDS = {
    **{n: "activation" for n in ELEMENTWISE},
    # row-wise over (B C): listed with the activations, but a row-wise op may be a layer
    **{n: ("activation", "layer") for n in ("softmax", "log_softmax")},
    "dense": "layer",
    **{
        n: "loss"
        for n in ("mse", "huber", "bce_with_logits", "softmax_cross_entropy", "nll", "kl_div", "cosine_embedding_loss",
                  "categorical_nll", "gaussian_nll", "poisson_nll", "l2_penalty", "cross_entropy")
    },
    **{n: "layer" for n in ("conv2d", "max_pool2d", "avg_pool2d", "flatten", "layer_norm", "batch_norm2d",
                            "batch_norm2d_eval", "batch_norm2d_stats", "dropout", "dropout_mask", "embedding", "rnn_cell",
                            "gru_cell", "lstm_cell", "scaled_dot_product_attention", "cosine_similarity",
                            "gcn_layer", "multi_head_attention", "multihead_attention", "add", "concat",
                            "positional_embedding")},
    **{
        n: "optimizer"
        for n in ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
    },
    **{n: "schedule" for n in ("step", "exponential", "cosine")},
}
DOCUMENTED_ATTRS = {
    "leaky_relu": {"slope": 0.01}, "elu": {"alpha": 1.0}, "huber": {"delta": 1.0, "reduction": 1},
    "cosine_embedding_loss": {"margin": 0.0, "eps": 1e-12, "reduction": 1},
    "gaussian_nll": {"eps": 1e-6, "full": 0.0, "reduction": 1},
    "poisson_nll": {"log_input": 1.0, "full": 0.0, "eps": 1e-8, "reduction": 1},
    **{n: {"reduction": 1} for n in ("mse", "bce_with_logits", "softmax_cross_entropy", "nll", "categorical_nll")},
    "cross_entropy": {"ignore_index": -100, "label_smoothing": 0.0, "reduction": 1},
    "l2_penalty": {"lam": 1.0},
    # the layer library's table (issue 3)
    "conv2d": {"SH": 1, "SW": 1, "PH": 0, "PW": 0, "DH": 1, "DW": 1, "groups": 1},
    "max_pool2d": {"KH": 2, "KW": 2, "SH": 2, "SW": 2, "PH": 0, "PW": 0, "DH": 1, "DW": 1, "ceil_mode": 0},
    "avg_pool2d": {"KH": 2, "KW": 2, "SH": 2, "SW": 2, "PH": 0, "PW": 0, "ceil_mode": 0, "count_include_pad": 1},
    "layer_norm": {"eps": 1e-5}, "batch_norm2d": {"eps": 1e-5, "momentum": 0.1},
    "dropout": {"p": 0.5, "seed": 0, "step": 0}, "dropout_mask": {"p": 0.5},
    "scaled_dot_product_attention": {"causal": 0}, "cosine_similarity": {"eps": 1e-8},
    "multi_head_attention": {"heads": 2, "causal": 0}, "multihead_attention": {"heads": 2, "causal": 0},
}
# Non-default attribute values the tests also run with (attributes are given at run time).
ATTR_VARIANTS = {
    "leaky_relu": [{"slope": 0.2}], "elu": [{"alpha": 0.5}], "huber": [{"delta": 0.5, "reduction": 2}],
    "cosine_embedding_loss": [{"margin": 0.3, "eps": 1e-12, "reduction": 2}],
    "gaussian_nll": [{"full": 1.0, "eps": 1e-3, "reduction": 2}],
    "poisson_nll": [{"log_input": 0.0, "full": 1.0, "eps": 1e-8, "reduction": 2}],
    # reduction = 2: PyTorch's "sum"
    **{n: [{"reduction": 2}] for n in ("mse", "bce_with_logits", "softmax_cross_entropy", "nll", "categorical_nll")},
    # class 1 ignored (the inputs hold it), smoothing; the weighted mean, then the sum
    "cross_entropy": [{"ignore_index": 1, "label_smoothing": 0.1},
                      {"ignore_index": 1, "label_smoothing": 0.2, "reduction": 2}],
    "l2_penalty": [{"lam": 0.03}],
    # PyTorch's options (issue 13): per-axis stride, padding and dilation, groups; pools with
    # non-square windows, padding, ceil_mode (the last H window starts in the right padding at
    # H = 7, K = 2, S = 3, P = 1: dropped), count_include_pad off
    "conv2d": [{"SH": 2, "SW": 2, "PH": 1, "PW": 1},
               {"SH": 2, "SW": 1, "PH": 1, "PW": 2, "DH": 2, "DW": 1, "groups": 2}],
    "max_pool2d": [{"KH": 3, "KW": 3, "SH": 1, "SW": 1},
                   {"KH": 3, "KW": 2, "SH": 2, "SW": 1, "PH": 1, "PW": 1, "DW": 2, "ceil_mode": 1},
                   {"SH": 3, "SW": 3, "PH": 1, "PW": 1, "ceil_mode": 1}],
    "avg_pool2d": [{"KH": 3, "KW": 3, "SH": 2, "SW": 2},
                   {"KH": 3, "KW": 2, "SH": 2, "SW": 1, "PH": 1, "PW": 1, "ceil_mode": 1, "count_include_pad": 0},
                   {"SH": 3, "SW": 3, "PH": 1, "PW": 1, "ceil_mode": 1}],
    "layer_norm": [{"eps": 1e-3}], "batch_norm2d": [{"eps": 1e-3, "momentum": 0.3}],
    "dropout": [{"p": 0.2, "seed": 7, "step": 3}], "dropout_mask": [{"p": 0.2}],
    "scaled_dot_product_attention": [{"causal": 1}], "cosine_similarity": [{"eps": 1e-3}],
    "multi_head_attention": [{"heads": 4, "causal": 1}], "multihead_attention": [{"heads": 1, "causal": 1}],
}
DOCUMENTED_DIFFERENTIABLE = {
    "dense": ("x", "weight", "bias"),
    "mse": ("pred",),
    "huber": ("pred",),
    "bce_with_logits": ("pred",),
    "softmax_cross_entropy": ("logits",),
    "nll": ("logprobs",),
    "kl_div": ("logq", "logp"),
    # layers with data inputs (masks, indices, adjacency, running statistics)
    "dropout": ("x",),
    "dropout_mask": ("x",),
    "embedding": ("table",),
    "gcn_layer": ("x", "weight", "bias"),
    "batch_norm2d_eval": ("x", "weight", "bias"),
    "batch_norm2d_stats": (),
    "multihead_attention": ("query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj_weight",
                            "out_proj_bias"),
    "cosine_embedding_loss": ("x1", "x2"),
    "categorical_nll": ("logprobs",),
    "cross_entropy": ("logits",),
    "gaussian_nll": ("pred", "var"),
    "poisson_nll": ("pred",),
    "l2_penalty": ("w",),
}

# Arguments holding discrete labels (+1/-1, classes, counts): not differentiable, not
# even for torch (PyTorch's Stirling term has a NaN gradient at a zero count).
DISCRETE_ARGS = {"cosine_embedding_loss": ("label",), "categorical_nll": ("idx",), "poisson_nll": ("target",),
                 "cross_entropy": ("target", "weight")}

# ----------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


TOLERANCES = {
    np.dtype(np.float64): Tol(rtol=1e-9, atol=1e-12),
    np.dtype(np.float32): Tol(rtol=1e-4, atol=1e-5),
}
# Central differences in float64: truncation ~h^2, round-off ~eps/h.
FD_TOL = Tol(rtol=1e-6, atol=1e-7)


def tol(dtype) -> Tol:
    return TOLERANCES[np.dtype(dtype)]


def extreme_tol(dtype, magnitude: float) -> Tol:
    """Tolerance for inputs of size ``magnitude``: such an input is only known to
    ``magnitude * eps``, so a result that subtracts inputs is only defined to that
    absolute accuracy (e.g. logsumexp(x) - x_target in cross-entropy)."""
    base = tol(dtype)
    eps = float(np.finfo(dtype).eps)
    return Tol(rtol=base.rtol, atol=max(base.atol, 8 * eps * magnitude))


def assert_close(actual, expected, dtype, what: str = "", t: Tol | None = None):
    t = t or tol(dtype)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=t.rtol,
        atol=t.atol,
        err_msg=what,
    )


# ----------------------------------------------------------------------------------
# Calling ops uniformly
# ----------------------------------------------------------------------------------


def as_tuple(result) -> tuple:
    """forward/backward return one array, or a tuple for several."""
    return tuple(result) if isinstance(result, tuple) else (result,)


def cast(args: Sequence, dtype) -> list:
    """Float arrays to ``dtype``; integer arrays (index data such as embedding ids) stay int64."""
    return [np.asarray(a, dtype=np.int64) if _is_int(a) else np.asarray(a, dtype=dtype) for a in args]


def _is_int(a) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.integer)


def make_seeds(outputs: Sequence, rng: np.random.Generator, dtype) -> list:
    """A random output gradient per output; a Python float for a scalar output (loss)."""
    seeds = []
    for out in outputs:
        if np.ndim(out) == 0:
            seeds.append(float(rng.uniform(0.5, 1.5)))
        else:
            seeds.append(rng.normal(size=np.shape(out)).astype(dtype))
    return seeds


def run_forward(op, args) -> tuple:
    return as_tuple(op.forward(*args))


def run_backward(op, seeds, args) -> tuple:
    return as_tuple(op.backward(*seeds, *args))


def differentiable_indices(op) -> list[int]:
    return [list(op.arg_names).index(n) for n in op.differentiable]


# ----------------------------------------------------------------------------------
# The torch oracle, in float64
# ----------------------------------------------------------------------------------


def _t(a, grad: bool = False) -> torch.Tensor:
    if _is_int(a):  # index data stays integer (and is never differentiated)
        return torch.tensor(np.asarray(a, dtype=np.int64))
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


# Names that set several attributes at once, as op() takes them (PyTorch's stride=2 for
# (2, 2)); written out here, not read from the library, so the oracle checks op()'s reading.
SHORTHANDS = {
    "conv2d": {"S": ("SH", "SW"), "P": ("PH", "PW"), "D": ("DH", "DW")},
    "max_pool2d": {"K": ("KH", "KW"), "S": ("SH", "SW"), "P": ("PH", "PW"), "D": ("DH", "DW")},
    "avg_pool2d": {"K": ("KH", "KW"), "S": ("SH", "SW"), "P": ("PH", "PW")},
}


def torch_attrs(name: str, attrs: dict) -> dict:
    """``attrs`` with shorthands spelled out (an attribute given by its own name wins)."""
    table = SHORTHANDS.get(name, {})
    out = {part: v for k, v in attrs.items() for part in table.get(k, ())}
    out.update((k, v) for k, v in attrs.items() if k not in table)
    return out


def torch_forward(name: str, args: Sequence, attrs: dict):
    """The oracle's output as an array, or a tuple of arrays for an op with several
    outputs (lstm_cell's h and c)."""
    with torch.no_grad():
        out = TORCH_ORACLE[name](*[_t(a) for a in args], **torch_attrs(name, attrs))
    return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()


def _seeded(out, seed) -> torch.Tensor:
    """sum over outputs of sum(seed_k * out_k): ``seed`` is one output gradient, or a
    list/tuple of one per output (ref.make_seeds's list)."""
    outs = out if isinstance(out, tuple) else (out,)
    seeds = seed if isinstance(seed, (list, tuple)) else (seed,)
    assert len(outs) == len(seeds), f"{len(outs)} outputs, {len(seeds)} output gradients"
    return sum((o * _t(s).reshape(o.shape)).sum() for o, s in zip(outs, seeds))


def oracle_wrt(name: str) -> list[int]:
    """Positions of the differentiable arguments of op ``name`` in its oracle's argument
    order (every argument unless DOCUMENTED_DIFFERENTIABLE says otherwise)."""
    import inspect

    params = [p for p in inspect.signature(TORCH_ORACLE[name]).parameters.values()
              if p.default is inspect.Parameter.empty]
    names = [p.name for p in params]
    documented = DOCUMENTED_DIFFERENTIABLE.get(name)
    if documented is None or DOCUMENTED_KINDS.get(name) == "loss":
        # a loss's targets are differentiable for torch too, discrete labels are not
        return [k for k, n in enumerate(names) if n not in DISCRETE_ARGS.get(name, ())]
    return [names.index(n) for n in documented]


def torch_vjp(name: str, args: Sequence, attrs: dict, seed, wrt: Sequence[int]) -> list[np.ndarray]:
    """Gradients of sum(seed * f(args)) with respect to args[i] for i in wrt (``seed``:
    one output gradient, or a list of one per output)."""
    ts = [_t(a, grad=i in wrt) for i, a in enumerate(args)]
    out = TORCH_ORACLE[name](*ts, **torch_attrs(name, attrs))
    grads = torch.autograd.grad(_seeded(out, seed), [ts[i] for i in wrt])
    return [g.numpy() for g in grads]


def _oracle_call(name: str, attrs: dict):
    """The oracle as a function of its differentiable arguments (the rest fixed)."""

    def call(args, wrt, *diff):
        full = [_t(a) for a in args]
        for i, d in zip(wrt, diff):
            full[i] = d
        # the math attention kernel: PyTorch's fused CPU kernel has no second derivative
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return TORCH_ORACLE[name](*full, **torch_attrs(name, attrs))

    return call


def torch_jvp(name: str, args: Sequence, attrs: dict, tangents: Sequence, wrt: Sequence[int]):
    """The derivative of the oracle's output along ``tangents`` (one per args[i], i in wrt):
    an array, or a tuple of one per output."""
    call = _oracle_call(name, attrs)
    primals = tuple(_t(args[i]) for i in wrt)
    _, out = torch.autograd.functional.jvp(lambda *d: call(args, wrt, *d), primals, tuple(_t(t) for t in tangents))
    return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()


def torch_hvp(name: str, args: Sequence, attrs: dict, seed, tangents: Sequence, wrt: Sequence[int]) -> list[np.ndarray]:
    """For each args[i], i in wrt: the derivative of its vector-Jacobian product with
    ``seed`` along ``tangents`` (reverse over reverse; the Hessian of sum(seed * f) is
    symmetric, so this is the forward-over-reverse product too)."""
    call = _oracle_call(name, attrs)
    ps = [_t(args[i], grad=True) for i in wrt]
    out = call(args, wrt, *ps)
    grads = torch.autograd.grad(_seeded(out, seed), ps, create_graph=True, allow_unused=True)
    dot = sum((g * _t(t)).sum() for g, t in zip(grads, tangents) if g is not None and g.requires_grad)
    if not (torch.is_tensor(dot) and dot.requires_grad):
        return [np.zeros(np.shape(args[i])) for i in wrt]
    second = torch.autograd.grad(dot, ps, allow_unused=True)
    return [np.zeros(np.shape(args[i])) if h is None else h.numpy() for h, i in zip(second, wrt)]


# ----------------------------------------------------------------------------------
# Central finite differences, float64
# ----------------------------------------------------------------------------------


def numerical_vjp(forward: Callable, args: Sequence, seeds: Sequence, wrt: Sequence[int], h: float = 1e-6) -> list:
    """Central-difference gradient of phi(args) = sum_k sum(seed_k * forward(args)_k)
    with respect to each args[i], i in wrt. Everything in float64."""
    args = [np.array(a) if _is_int(a) else np.array(a, dtype=np.float64) for a in args]
    seeds = [np.asarray(s, dtype=np.float64) for s in seeds]

    def phi(current):
        outs = as_tuple(forward(*current))
        return sum(float(np.sum(s * np.asarray(o, dtype=np.float64))) for s, o in zip(seeds, outs))

    grads = []
    for i in wrt:
        g = np.zeros_like(args[i])
        flat, gflat = args[i].reshape(-1), g.reshape(-1)
        for k in range(flat.size):
            x0 = flat[k]
            step = h * max(1.0, abs(x0))
            flat[k] = x0 + step
            up = phi(args)
            flat[k] = x0 - step
            down = phi(args)
            flat[k] = x0
            gflat[k] = (up - down) / (2 * step)
        grads.append(g)
    return grads


def numerical_directional(fn: Callable, args: Sequence, tangents: Sequence, wrt: Sequence[int], h: float = 1e-5) -> tuple:
    """Central difference of ``fn(*args)`` (each of its results) along ``tangents``:
    (fn(args + h t) - fn(args - h t)) / 2h, in float64."""
    args = [np.array(a) if _is_int(a) else np.array(a, dtype=np.float64) for a in args]

    def at(sign):
        moved = list(args)
        for i, t in zip(wrt, tangents):
            moved[i] = args[i] + sign * h * np.asarray(t, dtype=np.float64)
        return [np.asarray(r, dtype=np.float64) for r in as_tuple(fn(*moved))]

    return tuple((u - d) / (2 * h) for u, d in zip(at(1), at(-1)))


# ----------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------

B, I, O, C = 3, 5, 4, 5  # small, odd, all different: a transposed index shows up


def prob_rows(rng, shape) -> np.ndarray:
    """Rows of probabilities (positive, summing to one along the last axis)."""
    z = rng.normal(size=shape)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_prob_rows(rng, shape, scale: float = 1.0) -> np.ndarray:
    z = scale * rng.normal(size=shape)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _library_inputs(name: str, rng: np.random.Generator, B=B, I=I, O=O, C=C) -> list[np.ndarray] | None:
    n = rng.normal
    if name in ELEMENTWISE:
        return [2.0 * n(size=(B, I))]
    if name in ("softmax", "log_softmax"):
        return [2.0 * n(size=(B, C))]
    if name == "dense":
        return [n(size=(B, I)), n(size=(I, O)), n(size=(O,))]
    if name == "mse":
        return [n(size=(B, C)), n(size=(B, C))]
    if name == "huber":  # differences on both sides of delta
        return [2.0 * n(size=(B, C)), n(size=(B, C))]
    if name == "bce_with_logits":
        return [2.0 * n(size=(B, C)), rng.uniform(0.0, 1.0, size=(B, C))]
    if name == "softmax_cross_entropy":
        return [2.0 * n(size=(B, C)), prob_rows(rng, (B, C))]
    if name == "nll":
        return [log_prob_rows(rng, (B, C)), prob_rows(rng, (B, C))]
    if name == "kl_div":
        return [log_prob_rows(rng, (B, C)), log_prob_rows(rng, (B, C))]
    if name == "categorical_nll":  # class indices, some repeated
        idx = rng.integers(0, C, size=B)
        idx[: min(2, B)] = idx[0]
        return [log_prob_rows(rng, (B, C)), idx.astype(np.int64)]
    if name == "gaussian_nll":
        return [n(size=(B, C)), n(size=(B, C)), rng.uniform(0.5, 2.0, size=(B, C))]
    if name == "cross_entropy":  # class indices (class 1 among them: a variant ignores it), class weights
        return [2.0 * n(size=(B, C)), _class_targets(rng, B, C), rng.uniform(0.5, 2.0, size=C)]
    if name == "poisson_nll":  # positive predictions serve as log-rates and as rates; counts above 1 too
        return [rng.uniform(0.2, 2.0, size=(B, C)), _counts(rng, (B, C), 2.0)]
    if name == "l2_penalty":  # a parameter flattened to a vector
        return [n(size=(I,))]
    if name == "cosine_embedding_loss":  # labels 1 and -1, cosines on both sides of any margin
        return [n(size=(B, I)), n(size=(B, I)), rng.choice([-1.0, 1.0], size=B)]
    return None


def _class_targets(rng, B, C) -> np.ndarray:
    """Class indices, one of them 1 and one other, so that ignoring class 1 leaves some."""
    idx = rng.integers(0, C, size=B)
    idx[0] = 1
    if B > 1:
        idx[1] = 0
    return idx.astype(np.int64)


def _counts(rng, shape, rate: float) -> np.ndarray:
    """Poisson counts, none equal to 1: PyTorch's Stirling term (full=True) switches on
    above 1, so a count of 1 sits on its jump, where no finite difference holds."""
    counts = rng.poisson(rate, size=shape).astype(np.float64)
    counts[counts == 1] = 2
    return counts


def layer_inputs(name: str, rng: np.random.Generator, sizes: dict, attrs: dict | None = None) -> list[np.ndarray]:
    """Inputs of the layer library (issue 3) for the given sizes (float64; integer index
    data as int64). Size names follow the op's declared dimensions."""
    attrs = attrs or {}
    n = rng.normal
    z = sizes
    if name == "conv2d":  # weight (O, C / groups, KH, KW), as torch
        cg = z["C"] // int(attrs.get("groups", 1))
        return [n(size=(z["N"], z["C"], z["H"], z["W"])), n(size=(z["O"], cg, z["KH"], z["KW"])), n(size=(z["O"],))]
    if name in ("max_pool2d", "avg_pool2d", "flatten"):
        return [n(size=(z["N"], z["C"], z["H"], z["W"]))]
    if name == "layer_norm":
        return [2.0 * n(size=(z["B"], z["D"])) + 0.5, 1.0 + 0.3 * n(size=(z["D"],)), n(size=(z["D"],))]
    if name == "batch_norm2d":
        return [2.0 * n(size=(z["N"], z["C"], z["H"], z["W"])) + 0.5, 1.0 + 0.3 * n(size=(z["C"],)), n(size=(z["C"],))]
    if name in ("batch_norm2d_eval", "batch_norm2d_stats"):
        x = 2.0 * n(size=(z["N"], z["C"], z["H"], z["W"])) + 0.5
        stats = [n(size=(z["C"],)), rng.uniform(0.5, 2.0, size=(z["C"],))]
        if name == "batch_norm2d_stats":
            return [x, *stats]
        return [x, *stats, 1.0 + 0.3 * n(size=(z["C"],)), n(size=(z["C"],))]
    if name == "dropout":
        return [n(size=(z["B"], z["N"]))]
    if name == "dropout_mask":
        p = attrs.get("p", 0.5)
        return [n(size=(z["B"], z["N"])), (rng.uniform(size=(z["B"], z["N"])) >= p).astype(np.float64)]
    if name == "embedding":
        idx = rng.integers(0, z["V"], size=z["B"])
        idx[: min(3, z["B"])] = idx[0]  # repeated indices: their gradients must add up
        return [idx.astype(np.int64), n(size=(z["V"], z["D"]))]
    if name in ("rnn_cell", "gru_cell"):
        g = 3 if name == "gru_cell" else 1
        H, I, Bn = z["H"], z["I"], z["B"]
        return [n(size=(Bn, I)), n(size=(Bn, H)), 0.5 * n(size=(g * H, I)), 0.5 * n(size=(g * H, H)),
                0.5 * n(size=(g * H,)), 0.5 * n(size=(g * H,))]
    if name == "lstm_cell":  # x, h, c, then the 4H-row weights and biases (gates i, f, g, o)
        H, I, Bn = z["H"], z["I"], z["B"]
        return [n(size=(Bn, I)), n(size=(Bn, H)), n(size=(Bn, H)), 0.5 * n(size=(4 * H, I)),
                0.5 * n(size=(4 * H, H)), 0.5 * n(size=(4 * H,)), 0.5 * n(size=(4 * H,))]
    if name == "add":
        return [n(size=(z["B"], z["N"])), n(size=(z["B"], z["N"]))]
    if name == "concat":
        return [n(size=(z["A"], z["N1"], z["R"])), n(size=(z["A"], z["N2"], z["R"]))]
    if name == "positional_embedding":  # a table longer than the sequences (P > T)
        return [n(size=(z["B"], z["T"], z["D"])), n(size=(z["P"], z["D"]))]
    if name == "scaled_dot_product_attention":
        return [n(size=(z["B"], z["L"], z["D"])), n(size=(z["B"], z["S"], z["D"])), n(size=(z["B"], z["S"], z["E"]))]
    if name == "cosine_similarity":
        return [n(size=(z["B"], z["D"])), n(size=(z["B"], z["D"]))]
    if name == "gcn_layer":
        V = z["V"]
        adj = (rng.uniform(size=(V, V)) < 0.4).astype(np.float64)
        adj = np.maximum(adj, adj.T) + np.eye(V)
        dinv = 1.0 / np.sqrt(adj.sum(axis=1))
        return [adj * dinv[:, None] * dinv[None, :], n(size=(V, z["I"])), n(size=(z["I"], z["O"])), n(size=(z["O"],))]
    if name == "multi_head_attention":
        E_ = z["E"]
        return [n(size=(z["B"], z["L"], E_)), *(0.5 * n(size=(E_, E_)) for _ in range(3)),
                *(0.5 * n(size=(E_,)) for _ in range(3)), 0.5 * n(size=(E_, E_)), 0.5 * n(size=(E_,))]
    if name == "multihead_attention":  # float masks: small additive values and a few -inf (never a whole row)
        Bn, L_, S_, E_ = z["B"], z["L"], z["S"], z["E"]
        attn_mask = 0.3 * n(size=(L_, S_))
        attn_mask[0, S_ - 1] = -np.inf
        padding = np.zeros((Bn, S_))
        padding[0, S_ - 1] = padding[-1, 1 % S_] = -np.inf
        return [n(size=(Bn, L_, E_)), n(size=(Bn, S_, E_)), n(size=(Bn, S_, E_)), attn_mask, padding,
                0.5 * n(size=(3 * E_, E_)), 0.5 * n(size=(3 * E_,)), 0.5 * n(size=(E_, E_)), 0.5 * n(size=(E_,))]
    raise KeyError(f"no input recipe for layer {name}")


@functools.lru_cache(maxsize=None)
def _program(name: str):
    import derive

    for prog in derive.library():
        if prog.name == name:
            return prog
    raise KeyError(f"{name} is neither known to the tests nor in derive.library()")


def _generic_inputs(name: str, rng: np.random.Generator, attrs: dict) -> list[np.ndarray]:
    """Inputs for an op the tests do not know: shapes from its derive.Program, each
    dimension a different small size."""
    import sympy

    prog = _program(name)
    sizes = iter((3, 5, 4, 6, 7, 2, 8, 9))
    subs = {d: next(sizes) for d in prog.dims}
    for sym, default in prog.attrs:
        subs[sym] = attrs.get(str(sym), default)
    for sym, expr in prog.derived_dims:
        subs[sym] = int(sympy.sympify(expr).subs(subs))
    shapes = [tuple(int(sympy.sympify(s).subs(subs)) for s in t.shape) for t in prog.args]
    if prog.elementwise:
        shapes = [(B, I) for _ in shapes]
    return [rng.normal(size=s) for s in shapes]


def make_inputs(
    name: str, rng: np.random.Generator, dtype=np.float64, attrs: dict | None = None, sizes: dict | None = None
) -> list[np.ndarray]:
    """Valid inputs for op ``name`` (probability rows for cross-entropy, nll and kl
    targets, [0, 1] targets for BCE), generated in float64 then cast to ``dtype``.
    ``sizes`` overrides the dimensions B, I, O, C of library ops."""
    if name in LAYER_SIZES:
        return cast(layer_inputs(name, rng, {**LAYER_SIZES[name], **(sizes or {})}, attrs), dtype)
    args = _library_inputs(name, rng, **(sizes or {}))
    if args is None:
        args = _generic_inputs(name, rng, attrs or {})
    return cast(args, dtype)


def extreme_inputs(name: str, rng: np.random.Generator, magnitude: float = 1e3,
                   attrs: dict | None = None) -> list[np.ndarray] | None:
    """Inputs of magnitude ``magnitude`` of both signs (float64, exactly representable
    in float32), with valid targets; None for ops without an extreme-input recipe.
    ``attrs``: the op's attributes where they change what a valid input is."""
    attrs = attrs or {}

    def big(shape):
        signs = rng.choice([-1.0, 1.0], size=shape)
        offsets = rng.choice([0.0, 0.5, 1.0, 3.0], size=shape)
        x = signs * (magnitude - offsets)
        flat = x.reshape(-1)
        flat[0], flat[1] = magnitude, -magnitude  # both extremes always present
        return x

    if name in ELEMENTWISE:
        return [big((B, I))]
    if name in ("softmax", "log_softmax"):
        return [big((B, C))]
    if name == "dense":
        return [big((B, I)), rng.normal(size=(I, O)), rng.normal(size=(O,))]
    if name in ("mse", "huber"):
        return [big((B, C)), rng.normal(size=(B, C))]
    if name == "bce_with_logits":
        t = rng.uniform(0.0, 1.0, size=(B, C))
        t[0, :2] = (1.0, 0.0)  # confident and wrong in both directions
        return [big((B, C)), t]
    if name == "softmax_cross_entropy":
        return [big((B, C)), prob_rows(rng, (B, C))]
    if name == "nll":
        return [log_prob_rows(rng, (B, C), scale=magnitude), prob_rows(rng, (B, C))]
    if name == "kl_div":
        return [log_prob_rows(rng, (B, C), scale=magnitude), log_prob_rows(rng, (B, C), scale=magnitude)]
    if name == "cosine_embedding_loss":
        return [big((B, I)), big((B, I)), rng.choice([-1.0, 1.0], size=B)]
    if name == "l2_penalty":
        return [big((I,))]
    if name == "categorical_nll":
        return [log_prob_rows(rng, (B, C), scale=magnitude), rng.integers(0, C, size=B).astype(np.int64)]
    if name == "cross_entropy":
        return [big((B, C)), _class_targets(rng, B, C), rng.uniform(0.5, 2.0, size=C)]
    if name == "gaussian_nll":  # far predictions; a variance below the clamp, one at zero
        var = rng.uniform(0.5, 2.0, size=(B, C))
        var[0, :2] = (1e-9, 0.0)
        return [big((B, C)), rng.normal(size=(B, C)), var]
    if name == "poisson_nll":
        counts = _counts(rng, (B, C), 50.0)
        if attrs.get("log_input", 1.0) > 0:  # log-rates: far below 0, and as high as a rate stays finite
            return [np.minimum(big((B, C)), 80.0), counts]
        return [np.abs(big((B, C))), counts]  # rates
    if name in LAYER_SIZES:  # the layer's main float argument at the magnitude, the rest as usual
        args = layer_inputs(name, rng, LAYER_SIZES[name], attrs)  # conv2d's weight follows its groups
        k = EXTREME_ARG.get(name, 0)
        args[k] = big(args[k].shape)
        return args
    return None


# ----------------------------------------------------------------------------------
# Discovering the library
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    """One op with the attribute values it is tested with."""

    name: str
    attrs: tuple[tuple[str, float], ...] = ()

    @property
    def kw(self) -> dict:
        return dict(self.attrs)

    @property
    def id(self) -> str:
        return self.name + "".join(f"-{k}={v}" for k, v in self.attrs)


@functools.lru_cache(maxsize=None)
def library_kinds() -> dict[str, str]:
    """{op name: kind} for every op of the generated library ({} when it cannot be
    imported: then the tests that check the library itself fail)."""
    try:
        import generated

        names = generated.ops()
    except Exception:  # noqa: BLE001 - reported by test_library_lists_every_documented_op
        return {}
    kinds = {}
    for name in names:
        try:
            kinds[name] = generated.op(name).kind
        except Exception:  # noqa: BLE001 - reported by test_every_op_constructs
            kinds[name] = "?"
    return kinds


def op_cases(kinds: Sequence[str] = KINDS_WITH_GRADIENTS, variants: bool = True, oracle_only: bool = False) -> list:
    """pytest params: every library op of the given kinds (plus attribute variants)."""
    import pytest

    cases = []
    for name, kind in sorted(library_kinds().items()):
        if kind not in kinds or (oracle_only and name not in TORCH_ORACLE):
            continue
        if DOCUMENTED_DIFFERENTIABLE.get(name) == ():
            continue  # nothing to differentiate (batch_norm2d_stats): tested on its own
        cases.append(OpCase(name))
        if variants:
            for attrs in ATTR_VARIANTS.get(name, []):
                cases.append(OpCase(name, tuple(sorted(attrs.items()))))
    return [pytest.param(c, id=c.id) for c in cases]
