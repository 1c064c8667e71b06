"""PyTorch's own test inputs as an oracle suite.

``torch.testing._internal.common_methods_invocations.op_db`` holds, for each PyTorch
operator, an OpInfo whose ``reference_inputs`` (a superset of ``sample_inputs``) are the
inputs PyTorch tests itself with: 0-d and empty tensors, odd shapes, values of 1e20,
infinities and NaNs, keyword options. Each sample of an operator symgrad also has is
converted to symgrad's calling convention where the layouts match (a softmax over the
last axis of any shape is a row-wise softmax over the rows of its reshape; class-index
targets become one-hot rows; a class axis in second place moves last; a layer without
bias gets a zero bias), and compared with PyTorch calling the *sample itself*:

* float64: forward and every gradient against PyTorch's float64 (NaN where PyTorch has
  NaN, the same infinities, the same shapes, 0-d included);
* float32: the relative error of symgrad's float32 result against the float64 truth
  (elementwise, with a floor of eps times the tensor's largest magnitude) is at most
  FLOAT32_FACTOR times PyTorch's own float32 error on the same inputs, or times 16
  epsilons where PyTorch's is smaller (a sum of three terms that cancel is exact or
  not by luck).

A sample is skipped only when it uses an option the symgrad op does not have (a
``reduction`` other than the mean, ``weight``, ``inplace=True``, a ``dim`` other than
the last, padding='same' where it is not symmetric, max pooling's return_indices, ...); the skips are counted and the counts
are checked (COVERAGE), so a converter that silently skips everything fails. Samples
are bounded per op (the first MAX_SAMPLES in PyTorch's order among the first
MAX_EXAMINED, duplicates dropped, none over MAX_NUMEL elements) to keep the file near a
minute.

Where an input is NaN, symgrad's gradient is NaN: a derivative at an unknown point is
unknown. PyTorch's kernels return whichever branch their comparison happens to fall
to (relu and elu give 1, leaky_relu its slope, clamp 0), so at those elements the test
asks for NaN instead of PyTorch's value (``nan_in_nan_out``); the forward is compared
as usual (PyTorch propagates NaN there too).
"""

from __future__ import annotations

import functools
import random
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref

MAX_SAMPLES = 24  # converted samples per op at most (the first, in PyTorch's order)
MAX_EXAMINED = 400  # samples looked at per op (max_pool2d has 2,880)
MAX_NUMEL = 1 << 16  # larger samples (PyTorch's 1029 x 917 and 1024 x 1024) are left out
CUDA_SAMPLES = 3  # per op on the CUDA simulator (the smallest, up to CUDA_NUMEL elements)
CUDA_NUMEL = 64
FLOAT32_FACTOR = 8.0  # symgrad float32 error <= this times PyTorch's float32 error,
FLOAT32_ULPS = 16  # or this many float32 epsilons (PyTorch may be exact by luck on a few elements)


@functools.lru_cache(maxsize=None)
def _op_db() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.testing._internal.common_methods_invocations import op_db
    return {(o.name, o.variant_test_name): o for o in op_db}


@dataclass
class Case:
    """One PyTorch sample in symgrad's convention."""

    args: list  # NumPy arrays in the op's argument order (float64, or int64 index data)
    ref: object  # torch function of the same arguments: the sample's own call
    attrs: dict = field(default_factory=dict)
    wrt: tuple | None = None  # argument positions whose gradients are compared (None: all differentiable)
    backward_error: str | None = None  # the backward must raise ValueError matching this
    what: str = ""


class Skip(Exception):
    """The sample uses an option the symgrad op does not have."""


# ------------------------------------------------------------------ converting samples


def _np(t) -> np.ndarray:
    t = t.detach()
    return t.numpy().astype(np.int64) if not t.dtype.is_floating_point else t.numpy().astype(np.float64)


def _only(kwargs: dict, allowed: dict):
    """Keyword options must be absent or have the value symgrad implements."""
    for k, v in kwargs.items():
        shown = "a tensor" if isinstance(v, torch.Tensor) else repr(v)
        if k not in allowed:
            raise Skip(f"{k}={shown}")
        ok = allowed[k]
        if ok is not None and not (ok(v) if callable(ok) else v == ok):
            raise Skip(f"{k}={shown}")


MEAN = {"reduction": "mean"}
# The losses' reduction attribute (PyTorch's codes): "none" (the terms), "mean" and "sum".
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
MEAN_OR_SUM = {"reduction": lambda r: r in REDUCTIONS}


def _reduction(kwargs) -> dict:
    return {"reduction": REDUCTIONS[kwargs.get("reduction", "mean")]}


def _terms(fn, kwargs, shape):
    """``fn`` (PyTorch's loss), its per-term result with reduction="none" laid out as the
    library's: ``shape`` (rows of the flattened input, or one per sample)."""
    if kwargs.get("reduction") != "none":
        return fn
    return lambda *args: fn(*args).reshape(shape)


def _rows(shape) -> tuple:
    """A tensor's shape as (rows, last axis): 0-d -> (1, 1), (n,) -> (1, n)."""
    if len(shape) == 0:
        return (1, 1)
    last = shape[-1]
    lead = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return (lead, last)


def _last_dim(dim, ndim) -> bool:
    return ndim == 0 and dim in (0, -1) or ndim > 0 and dim % ndim == ndim - 1


def elementwise(options=None, rename=None):
    rename = rename or {}

    def convert(o, s):
        if s.args:
            raise Skip("positional options")
        _only(s.kwargs, {"inplace": False, **(options or {})})
        attrs = {rename[k]: float(v) for k, v in s.kwargs.items() if k in rename}
        kw = dict(s.kwargs)
        return Case([_np(s.input)], lambda x: o.op(x, **kw), attrs)

    return convert


def rowwise_softmax(o, s):
    (dim,) = s.args
    _only(s.kwargs, {})
    shape = tuple(s.input.shape)
    if not _last_dim(dim, len(shape)):
        raise Skip(f"dim={dim} of a {len(shape)}-d input")
    x = _np(s.input).reshape(_rows(shape))
    return Case([x], lambda x2: o.op(x2.reshape(shape), dim).reshape(x2.shape))


def _pair_loss(extra=None, rename=None):
    """(input, target) of one shape, mean over all elements: any layout is the same mean."""
    rename = rename or {}

    def convert(o, s):
        (target,) = s.args
        _only(s.kwargs, {**MEAN_OR_SUM, **(extra or {})})
        if target.shape != s.input.shape:
            raise Skip("broadcast target")
        shape = tuple(s.input.shape)
        rows = _rows(shape)
        kw = dict(s.kwargs)
        attrs = {**{rename[k]: float(v) for k, v in kw.items() if k in rename}, **_reduction(kw)}
        return Case([_np(s.input).reshape(rows), _np(target).reshape(rows)],
                    _terms(lambda p, t: o.op(p.reshape(shape), t.reshape(shape), **kw), kw, rows), attrs, wrt=(0,))

    return convert


def _class_last(a: np.ndarray) -> np.ndarray:
    """(N, C, d1, ...) -> (N*d1*..., C); (C,) -> (1, C)."""
    if a.ndim == 1:
        return a.reshape(1, -1)
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def _class_back(t2, shape):
    """The inverse of _class_last on a torch tensor."""
    if len(shape) == 1:
        return t2.reshape(shape)
    moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return torch.movedim(t2.reshape(moved), -1, 1).contiguous()


def _one_hot_rows(target: torch.Tensor, classes: int) -> np.ndarray:
    idx = _np(target).reshape(-1)
    out = np.zeros((idx.size, classes))
    out[np.arange(idx.size), idx] = 1.0
    return out


def class_loss(o, s):
    """cross_entropy and nll_loss: logits (or log-probabilities) with class indices or
    probability rows, the class axis second (or the only axis), mean reduction."""
    (target,) = s.args
    _only(s.kwargs, MEAN_OR_SUM)
    shape = tuple(s.input.shape)
    C = shape[1] if len(shape) > 1 else shape[0]
    x = _class_last(_np(s.input))
    kw = dict(s.kwargs)
    if target.dtype.is_floating_point:  # probabilities, same layout as the input
        t = _class_last(_np(target))
        sums = t.sum(axis=1)
        ref_fn = lambda x2, t2: o.op(_class_back(x2, shape), _class_back(t2, shape), **kw)  # noqa: E731
        # the library's cross-entropy gradient assumes rows summing to 1 and says so
        error = None
        if o.name.endswith("cross_entropy") and np.any(np.abs(sums - 1) > 1e-6):
            error = r"sum\(target\[b, c\], c\) == 1"
        return Case([x, t], _terms(ref_fn, kw, x.shape[:1]), _reduction(kw), wrt=(0,), backward_error=error)
    fixed = target.clone()
    return Case([x, _one_hot_rows(target, C)],
                _terms(lambda x2, t2: o.op(_class_back(x2, shape), fixed, **kw), kw, x.shape[:1]), _reduction(kw), wrt=(0,))


def class_index_loss(o, s):
    """cross_entropy and nll_loss with integer class targets and their options (class
    weights, ignore_index, label_smoothing, reduction mean or sum), the class axis second
    (or the only axis), onto cross_entropy(logits, target, weight) or
    categorical_nll(logprobs, idx) (which has no weight or ignore_index)."""
    (target,) = s.args
    full = o.name.endswith("cross_entropy")
    options = {**MEAN_OR_SUM, "weight": None, "ignore_index": None, "label_smoothing": None} if full else MEAN_OR_SUM
    _only(s.kwargs, options)
    if target.dtype.is_floating_point:
        raise Skip("probability targets")
    shape = tuple(s.input.shape)
    C = shape[1] if len(shape) > 1 else shape[0]
    x = _class_last(_np(s.input))
    idx = _np(target).reshape(-1)
    kw = dict(s.kwargs)
    fixed = target.clone()
    attrs = _reduction(kw)
    if not full:
        return Case([x, idx], _terms(lambda x2, _t: o.op(_class_back(x2, shape), fixed, **kw), kw, x.shape[:1]), attrs,
                    wrt=(0,))
    weight = kw.get("weight")
    attrs.update(ignore_index=int(kw.get("ignore_index", -100)), label_smoothing=float(kw.get("label_smoothing", 0.0)))
    w = _np(weight) if weight is not None else np.ones(C)
    rest = {k: v for k, v in kw.items() if k != "weight"}

    def call(x2, _t, w2):  # the weight in the dtype of the run (PyTorch's None where the sample has none)
        return o.op(_class_back(x2, shape), fixed, weight=w2 if weight is not None else None, **rest)

    return Case([x, idx, w], _terms(call, kw, x.shape[:1]), attrs, wrt=(0,))


def kl_div(o, s):
    (target,) = s.args
    _only(s.kwargs, {"reduction": "batchmean", "log_target": True})
    shape = tuple(s.input.shape)
    rows = (shape[0], int(np.prod(shape[1:]))) if len(shape) else (1, 1)  # batchmean divides by shape[0]
    kw = dict(s.kwargs)
    return Case([_np(s.input).reshape(rows), _np(target).reshape(rows)],
                lambda q, p: o.op(q.reshape(shape), p.reshape(shape), **kw))


def cosine_embedding(o, s):
    x2, label = s.args
    _only(s.kwargs, {**MEAN_OR_SUM, "margin": None})
    shape = tuple(s.input.shape)
    if len(shape) == 1:
        a, b, lab = _np(s.input)[None], _np(x2)[None], _np(label).reshape(1)
    else:
        a, b, lab = _np(s.input), _np(x2), _np(label)
    kw = dict(s.kwargs)
    fixed = label.clone()
    return Case([a, b, lab], _terms(lambda u, v, _l: o.op(u.reshape(shape), v.reshape(shape), fixed, **kw), kw, a.shape[:1]),
                {"margin": float(kw.get("margin", 0.0)), **_reduction(kw)})


def cosine_similarity(o, s):
    (x2,) = s.args
    _only(s.kwargs, {"dim": None, "eps": None})
    shape = tuple(s.input.shape)
    dim = s.kwargs.get("dim", 1)
    if x2.shape != s.input.shape:
        raise Skip("broadcast")
    if len(shape) == 0 or not _last_dim(dim, len(shape)):
        raise Skip(f"dim={dim} of a {len(shape)}-d input")
    rows = _rows(shape)
    kw = dict(s.kwargs)
    attrs = {"eps": float(kw["eps"])} if "eps" in kw else {}
    return Case([_np(s.input).reshape(rows), _np(x2).reshape(rows)],
                lambda u, v: o.op(u.reshape(shape), v.reshape(shape), **kw).reshape(rows[:1]), attrs)


def layer_norm(o, s):
    normalized, *rest = s.args
    _only(s.kwargs, {"eps": None})
    shape = tuple(s.input.shape)
    if len(normalized) != 1:
        raise Skip(f"normalized_shape={tuple(normalized)}")
    D = shape[-1]
    rows = _rows(shape)
    w = rest[0] if len(rest) > 0 else None
    b = rest[1] if len(rest) > 1 else None
    kw = dict(s.kwargs)
    args = [_np(s.input).reshape(rows), _np(w) if w is not None else np.ones(D), _np(b) if b is not None else np.zeros(D)]
    wrt = (0,) + ((1,) if w is not None else ()) + ((2,) if b is not None else ())

    def call(x2, w2, b2):
        return o.op(x2.reshape(shape), normalized, w2 if w is not None else None, b2 if b is not None else None,
                    **kw).reshape(x2.shape)

    return Case(args, call, {"eps": float(kw.get("eps", 1e-5))}, wrt=wrt)


def linear(o, s):
    weight, *rest = s.args
    _only(s.kwargs, {})
    bias = rest[0] if rest else None
    shape = tuple(s.input.shape)
    O, I = weight.shape
    rows = _rows(shape)
    args = [_np(s.input).reshape(rows), _np(weight).T.copy(), _np(bias) if bias is not None else np.zeros(O)]
    wrt = (0, 1, 2) if bias is not None else (0, 1)

    def call(x2, wt, b2):
        return o.op(x2.reshape(shape), wt.T, b2 if bias is not None else None).reshape(rows[0], O)

    return Case(args, call, wrt=wrt)


def _batched(shape):
    """An unbatched (C, H, W) input gets a batch of one."""
    return shape if len(shape) == 4 else (1,) + shape


def _pair(v) -> tuple:
    """A size or a (height, width) pair, as PyTorch takes them."""
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        if len(v) != 2:
            raise Skip(f"a {len(v)}-tuple")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _conv_padding(padding, kernel, dilation) -> tuple:
    """PyTorch's conv2d padding: a size, a pair, "valid" (none) or "same" (the output keeps
    the input's size: d*(k - 1) in all, the left side the smaller; symgrad pads both sides
    alike, so an odd total is skipped)."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            raise Skip("padding='same' with an odd total padding")
        return total[0] // 2, total[1] // 2
    return _pair(padding)


def conv2d(o, s):
    """F.conv2d with every option: per-axis stride, padding (a size, a pair, "valid",
    "same" where it is symmetric), dilation, groups."""
    weight, *rest = s.args
    _only(s.kwargs, {"stride": None, "padding": None, "groups": None, "dilation": None})
    bias = rest[0] if rest else None
    SH, SW = _pair(s.kwargs.get("stride", 1))
    DH, DW = _pair(s.kwargs.get("dilation", 1))
    PH, PW = _conv_padding(s.kwargs.get("padding", 0), tuple(weight.shape[2:]), (DH, DW))
    shape = tuple(s.input.shape)
    O = weight.shape[0]
    args = [_np(s.input).reshape(_batched(shape)), _np(weight), _np(bias) if bias is not None else np.zeros(O)]
    wrt = (0, 1, 2) if bias is not None else (0, 1)
    kwargs = dict(s.kwargs)

    def call(x4, w, b):
        y = F.conv2d(x4.reshape(shape), w, b if bias is not None else None, **kwargs)
        return y.reshape((x4.shape[0],) + y.shape[-3:])

    attrs = {"SH": SH, "SW": SW, "PH": PH, "PW": PW, "DH": DH, "DW": DW, "groups": int(s.kwargs.get("groups", 1))}
    return Case(args, call, attrs, wrt=wrt)


POOL_ARGS = {
    "nn.functional.max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "nn.functional.avg_pool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override"),
}


def pool2d(o, s):
    """max_pool2d and avg_pool2d with PyTorch's options: non-square windows, strides
    (the window by default), padding, max pooling's dilation, ceil_mode, average
    pooling's count_include_pad (not divisor_override, not return_indices)."""
    given = dict(zip(POOL_ARGS[o.name], s.args), **s.kwargs)
    _only(given, {"kernel_size": None, "stride": None, "padding": None, "ceil_mode": None,
                  "count_include_pad": None, "divisor_override": lambda d: d is None,
                  "dilation": None, "return_indices": False})
    KH, KW = _pair(given["kernel_size"])
    stride = given.get("stride")
    SH, SW = (KH, KW) if stride is None or stride == () or stride == [] else _pair(stride)
    PH, PW = _pair(given.get("padding", 0))
    attrs = {"KH": KH, "KW": KW, "SH": SH, "SW": SW, "PH": PH, "PW": PW, "ceil_mode": int(bool(given.get("ceil_mode")))}
    if o.name == "nn.functional.max_pool2d":
        attrs["DH"], attrs["DW"] = _pair(given.get("dilation", 1))
    else:
        attrs["count_include_pad"] = int(bool(given.get("count_include_pad", True)))
    shape = tuple(s.input.shape)
    args, kwargs = list(s.args), dict(s.kwargs)

    def call(x4):
        y = o.op(x4.reshape(shape), *args, **kwargs)
        return y.reshape((x4.shape[0],) + y.shape[-3:])

    return Case([_np(s.input).reshape(_batched(shape))], call, attrs)


def embedding(o, s):
    (idx,) = s.args
    _only(s.kwargs, {})
    fixed = idx.clone()
    V, D = s.input.shape
    n = int(np.prod(idx.shape)) if idx.dim() else 1
    return Case([_np(idx).reshape(n), _np(s.input)], lambda _i, table: o.op(table, fixed).reshape(n, D))


def batch_norm(o, s):
    rm, rv, w, b = (list(s.args) + [None] * 4)[:4]
    _only(s.kwargs, {"training": None, "momentum": None, "eps": None})
    shape = tuple(s.input.shape)
    if len(shape) < 2:
        raise Skip(f"a {len(shape)}-d input")
    training = bool(s.kwargs.get("training", False))
    eps = float(s.kwargs.get("eps", 1e-5))
    C = shape[1]
    x4 = _np(s.input).reshape(shape + (1,) * (4 - len(shape)))
    ones, zeros = np.ones(C), np.zeros(C)
    wv = _np(w) if w is not None else ones
    bv = _np(b) if b is not None else zeros
    wrt = (0,) + ((1,) if w is not None else ()) + ((2,) if b is not None else ())
    if training:
        def call(x, w2, b2):
            return F.batch_norm(x.reshape(shape), None, None, w2 if w is not None else None,
                                b2 if b is not None else None, True, 0.1, eps).reshape(x.shape)

        return Case([x4, wv, bv], call, {"eps": eps, "momentum": 0.1}, wrt=wrt, what="batch_norm2d")

    def call_eval(x, m, v, w2, b2):
        return F.batch_norm(x.reshape(shape), m, v, w2 if w is not None else None,
                            b2 if b is not None else None, False, 0.1, eps).reshape(x.shape)

    return Case([x4, _np(rm), _np(rv), wv, bv], call_eval, {"eps": eps},
                wrt=(0,) + tuple(k + 2 for k in wrt[1:]), what="batch_norm2d_eval")


def batch_norm_stats(o, s):
    rm, rv = s.args[:2]
    _only(s.kwargs, {"training": True, "momentum": None, "eps": None})
    if rm is None or rv is None:
        raise Skip("no running statistics")
    shape = tuple(s.input.shape)
    if len(shape) < 2:
        raise Skip(f"a {len(shape)}-d input")
    momentum = float(s.kwargs.get("momentum", 0.1))
    x4 = _np(s.input).reshape(shape + (1,) * (4 - len(shape)))

    def call(x, m, v):
        m, v = m.clone(), v.clone()
        F.batch_norm(x.reshape(shape), m, v, None, None, True, momentum)
        return m, v

    return Case([x4, _np(rm), _np(rv)], call, {"momentum": momentum})


def sdpa(o, s):
    k, v = s.args
    _only(s.kwargs, {"is_causal": None, "dropout_p": 0.0})
    q = s.input
    if not (q.dim() == k.dim() == v.dim()) or q.dim() not in (3, 4):
        raise Skip("broadcast batch")
    qs, ks, vs = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    causal = bool(s.kwargs.get("is_causal", False))

    def flat(a):
        return a.reshape((-1,) + a.shape[-2:])

    def call(q3, k3, v3):
        y = F.scaled_dot_product_attention(q3.reshape(qs), k3.reshape(ks), v3.reshape(vs), is_causal=causal)
        return y.reshape((-1,) + y.shape[-2:])

    return Case([flat(_np(q)), flat(_np(k)), flat(_np(v))], call, {"causal": int(causal)})


def flatten(o, s):
    start, end = (list(s.args) + [s.kwargs.get("start_dim", 0), s.kwargs.get("end_dim", -1)])[:2] \
        if s.args else (s.kwargs.get("start_dim", 0), s.kwargs.get("end_dim", -1))
    shape = tuple(s.input.shape)
    if len(shape) != 4 or start != 1 or end % 4 != 3:
        raise Skip(f"flatten({start}, {end}) of a {len(shape)}-d input")
    return Case([_np(s.input)], lambda x: o.op(x, start, end))


def multihead_attention(o, s):
    """F.multi_head_attention_forward, unbatched (L, E) or (L, B, E), onto multihead_attention
    (batch first, float masks): every PyTorch sample so far adds bias_k and bias_v (an extra
    key and value position), which the op has not."""
    key, value, E, heads, w_in, b_in, bias_k, bias_v, add_zero_attn, dropout_p, w_out, b_out = s.args[:12]
    _only(s.kwargs, {"q_proj_weight": lambda v: v is None, "k_proj_weight": lambda v: v is None,
                     "v_proj_weight": lambda v: v is None, "attn_mask": None, "training": None,
                     "use_separate_proj_weight": False, "key_padding_mask": None, "need_weights": None})
    if bias_k is not None or bias_v is not None:
        raise Skip("bias_k/bias_v")
    if add_zero_attn:
        raise Skip("add_zero_attn")
    if dropout_p and s.kwargs.get("training", True):
        raise Skip("dropout in training")
    q = s.input
    batched = q.dim() == 3

    def first(a):  # (L, B, E) or (L, E) -> (B, L, E)
        return _np(a).transpose(1, 0, 2) if batched else _np(a)[None]

    B_, L_, S_ = (q.shape[1] if batched else 1), q.shape[0], key.shape[0]

    def as_float(m, shape):
        if m is None:
            return np.zeros(shape)
        a = _np(m).reshape(shape) if m.dtype.is_floating_point else np.where(_np(m).reshape(shape) != 0, -np.inf, 0.0)
        return a.astype(np.float64)

    attn_mask, kpm = s.kwargs.get("attn_mask"), s.kwargs.get("key_padding_mask")
    if attn_mask is not None and attn_mask.dim() == 3:
        raise Skip("a mask per batch and head")
    args = [first(q), first(key), first(value), as_float(attn_mask, (L_, S_)), as_float(kpm, (B_, S_)),
            _np(w_in), _np(b_in), _np(w_out), _np(b_out)]

    def call(q3, k3, v3, _m, _p, wi, bi, wo, bo):
        def back(a):
            return a.transpose(0, 1) if batched else a[0]

        y, _ = F.multi_head_attention_forward(back(q3), back(k3), back(v3), E, heads, wi, bi, None, None, False,
                                              0.0, wo, bo, training=False, key_padding_mask=kpm, need_weights=False,
                                              attn_mask=attn_mask)
        return y.transpose(0, 1) if batched else y[None]

    return Case(args, call, {"heads": int(heads)}, wrt=(0, 1, 2, 5, 6, 7, 8))


# symgrad op -> (OpInfo name, converter)
OPINFO = {
    "relu": ("nn.functional.relu", elementwise()),
    "leaky_relu": ("nn.functional.leaky_relu", elementwise({"negative_slope": None}, {"negative_slope": "slope"})),
    "elu": ("nn.functional.elu", elementwise({"alpha": None}, {"alpha": "alpha"})),
    "gelu": ("nn.functional.gelu", elementwise({"approximate": "none"})),
    "sigmoid": ("sigmoid", elementwise()),
    "tanh": ("tanh", elementwise()),
    "softplus": ("nn.functional.softplus", elementwise({"beta": 1, "threshold": 20})),
    "silu": ("nn.functional.silu", elementwise()),
    "mish": ("nn.functional.mish", elementwise()),
    "softmax": ("softmax", rowwise_softmax),
    "log_softmax": ("log_softmax", rowwise_softmax),
    "mse": ("nn.functional.mse_loss", _pair_loss()),
    "huber": ("nn.functional.huber_loss", _pair_loss({"delta": None}, {"delta": "delta"})),
    "bce_with_logits": ("nn.functional.binary_cross_entropy_with_logits", _pair_loss()),
    "softmax_cross_entropy": ("nn.functional.cross_entropy", class_loss),
    "nll": ("nn.functional.nll_loss", class_loss),
    "cross_entropy": ("nn.functional.cross_entropy", class_index_loss),
    "categorical_nll": ("nn.functional.nll_loss", class_index_loss),
    "kl_div": ("nn.functional.kl_div", kl_div),
    "cosine_embedding_loss": ("nn.functional.cosine_embedding_loss", cosine_embedding),
    "cosine_similarity": ("nn.functional.cosine_similarity", cosine_similarity),
    "layer_norm": ("nn.functional.layer_norm", layer_norm),
    "dense": ("nn.functional.linear", linear),
    "conv2d": ("nn.functional.conv2d", conv2d),
    "max_pool2d": ("nn.functional.max_pool2d", pool2d),
    "avg_pool2d": ("nn.functional.avg_pool2d", pool2d),
    "embedding": ("nn.functional.embedding", embedding),
    "batch_norm2d": ("nn.functional.batch_norm", batch_norm),
    "batch_norm2d_eval": ("nn.functional.batch_norm", batch_norm),
    "batch_norm2d_stats": ("nn.functional.batch_norm", batch_norm_stats),
    "scaled_dot_product_attention": ("nn.functional.scaled_dot_product_attention", sdpa),
    "multihead_attention": ("nn.functional.multi_head_attention_forward", multihead_attention),
    "flatten": ("flatten", flatten),
}

# The fewest samples each op must convert (the rest are counted as skipped). softplus
# has none: every PyTorch sample sets beta=3, threshold=0.2, which symgrad's has not;
# nor multihead_attention: every sample adds bias_k and bias_v.
COVERAGE = {name: 1 for name in OPINFO} | {"softplus": 0, "multihead_attention": 0}


def _signature(s) -> str:
    def d(a):
        if isinstance(a, torch.Tensor):
            return f"T{tuple(a.shape)}{a.dtype}"
        if isinstance(a, (list, tuple)):
            return str(type(a)(d(x) for x in a))
        return repr(a)

    return f"{d(s.input)}{d(list(s.args))}{ {k: d(v) for k, v in s.kwargs.items()} }"


@functools.lru_cache(maxsize=None)
def samples(name: str) -> tuple[list, dict]:
    """(converted cases, {skip reason: count}) of op ``name``: PyTorch's float64
    reference inputs, generated from a fixed seed, duplicates dropped, bounded."""
    opinfo_name, convert = OPINFO[name]
    o = _op_db()[(opinfo_name, "")]
    torch.manual_seed(0)
    random.seed(0)
    cases, skipped, seen = [], {}, set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for examined, s in enumerate(o.reference_inputs("cpu", torch.float64, requires_grad=False)):
            if examined == MAX_EXAMINED:
                break
            key = _signature(s)
            if key in seen:
                continue
            seen.add(key)
            if s.input.numel() > MAX_NUMEL:
                skipped["bounded: over MAX_NUMEL elements"] = skipped.get("bounded: over MAX_NUMEL elements", 0) + 1
                continue
            try:
                case = convert(o, s)
            except Skip as e:
                reason = re.sub(r"[-\d.]+", "#", str(e))
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            if case.what and case.what != name:
                skipped["another op's sample"] = skipped.get("another op's sample", 0) + 1
                continue
            case.what = key
            cases.append(case)
            if len(cases) == MAX_SAMPLES:
                break
    return cases, skipped


# ------------------------------------------------------------------ running and comparing


def _torch_call(case: Case, args, dtype, grad_positions):
    ts = []
    for k, a in enumerate(args):
        if np.issubdtype(np.asarray(a).dtype, np.integer):
            ts.append(torch.tensor(a))
        else:
            ts.append(torch.tensor(np.asarray(a, dtype=dtype), requires_grad=k in grad_positions))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = case.ref(*ts)
    return ts, ref.as_tuple(out)


def torch_results(case: Case, args, dtype, wrt, seeds):
    """PyTorch's outputs and the gradients of sum(seed * output) for the arguments in wrt."""
    ts, outs = _torch_call(case, args, dtype, wrt)
    values = [o.detach().numpy() for o in outs]
    if not wrt:
        return values, []
    total = sum((o * torch.as_tensor(np.asarray(sd, dtype=dtype)).reshape(o.shape)).sum()
                for o, sd in zip(outs, seeds))
    if not total.requires_grad:  # an empty output: every gradient is zero
        return values, [np.zeros(np.shape(args[k])) for k in wrt]
    grads = torch.autograd.grad(total, [ts[k] for k in wrt], allow_unused=True)
    return values, [np.zeros(np.shape(args[k])) if g is None else g.numpy() for k, g in zip(wrt, grads)]


def _ours(op, case, args, seeds):
    outs = ref.as_tuple(op.forward(*args))
    if not op.differentiable:
        return outs, None
    if case.backward_error:
        with pytest.raises(ValueError, match=case.backward_error):
            op.backward(*seeds, *args)
        return outs, None
    return outs, ref.as_tuple(op.backward(*seeds, *args))


def _seeds(outs, rng, dtype):
    return [float(rng.uniform(0.5, 1.5)) if np.ndim(o) == 0 and not isinstance(o, np.ndarray)
            else rng.normal(size=np.shape(o)).astype(dtype) for o in outs]


def _nan_inputs(args, k, grad_shape) -> np.ndarray | None:
    """Elements of argument k's gradient whose own input is NaN (elementwise ops)."""
    a = np.asarray(args[k])
    if a.dtype.kind != "f" or a.shape != tuple(grad_shape):
        return None
    return np.isnan(a)


def check_close(what, ours, expected, dtype):
    ours = np.asarray(ours, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert ours.shape == expected.shape, f"{what}: shape {ours.shape}, PyTorch {expected.shape}"
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(ours[~finite], expected[~finite], err_msg=f"{what}: non-finite elements")
    if finite.any():
        scale = float(np.max(np.abs(expected[finite])))
        t = ref.tol(dtype)
        np.testing.assert_allclose(ours[finite], expected[finite], rtol=t.rtol,
                                   atol=max(t.atol, 8 * np.finfo(np.float64).eps * scale), err_msg=what)


def _rel_err(a, truth, floor):
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(a - truth) / (np.abs(truth) + floor))) if a.size else 0.0


def check_float32(what, ours32, torch32, truth):
    """symgrad's float32 error within FLOAT32_FACTOR of PyTorch's float32 error."""
    ours32 = np.asarray(ours32)
    assert ours32.dtype == np.float32, f"{what}: dtype {ours32.dtype}"
    truth = np.asarray(truth, dtype=np.float64)
    torch32 = np.asarray(torch32, dtype=np.float64)
    assert ours32.shape == truth.shape, f"{what}: shape {ours32.shape}, PyTorch {truth.shape}"
    comparable = np.isfinite(truth) & np.isfinite(torch32)
    same = ~np.isfinite(truth) & (np.isnan(truth) == np.isnan(torch32)) & ((truth == torch32) | np.isnan(truth))
    np.testing.assert_array_equal(ours32[same].astype(np.float64), truth[same], err_msg=f"{what}: non-finite elements")
    if not comparable.any():
        return
    eps = float(np.finfo(np.float32).eps)
    floor = eps * float(np.max(np.abs(truth[comparable])))
    floor = floor if floor > 0 else np.finfo(np.float32).tiny
    ours_err = _rel_err(ours32[comparable], truth[comparable], floor)
    torch_err = _rel_err(torch32[comparable], truth[comparable], floor)
    assert ours_err <= FLOAT32_FACTOR * max(torch_err, FLOAT32_ULPS * eps), (
        f"{what}: float32 relative error {ours_err:.2e}, PyTorch's float32 {torch_err:.2e}")


def _compare_grads(op, case, args, ours_grads, torch_grads, wrt, check):
    diff_idx = ref.differentiable_indices(op)
    for k, tg in zip(wrt, torch_grads):
        g = ours_grads[diff_idx.index(k)]
        name = op.arg_names[k]
        nan_in = _nan_inputs(args, k, np.shape(g)) if op.kind == "activation" else None
        if nan_in is not None and nan_in.any():  # nan_in_nan_out: see the module docstring
            assert np.all(np.isnan(np.asarray(g)[nan_in])), f"{case.what}: gradient at a NaN input is not NaN"
            tg = np.where(nan_in, np.nan, tg)
        check(f"{case.what}: gradient of {name}", g, tg)


NAMES = sorted(OPINFO)


@pytest.fixture(scope="module")
def library():
    import generated

    return generated


@pytest.mark.parametrize("name", NAMES)
def test_samples_convert(name):
    """Each op converts at least COVERAGE[name] of PyTorch's samples; the skipped ones
    are counted by reason (shown with -rA... or on failure)."""
    cases, skipped = samples(name)
    print(f"{name}: {len(cases)} samples compared; skipped {sum(skipped.values())}: {skipped}")
    assert len(cases) >= COVERAGE[name], f"{name}: {len(cases)} samples converted; skipped {skipped}"


def check_float64(library, name, case, rng):
    op = library.op(name, **case.attrs)
    args = ref.cast(case.args, np.float64)
    outs = ref.as_tuple(op.forward(*args))
    seeds = _seeds(outs, rng, np.float64)
    wrt = case.wrt if case.wrt is not None else tuple(ref.differentiable_indices(op))
    t_outs, t_grads = torch_results(case, args, np.float64, wrt if op.differentiable else (), seeds)
    for k, (o, t) in enumerate(zip(outs, t_outs)):
        check_close(f"{case.what}: output {k}", o, t, np.float64)
    _, grads = _ours(op, case, args, seeds)
    if grads is not None:
        _compare_grads(op, case, args, grads, t_grads, wrt,
                       lambda what, g, tg: check_close(what, g, tg, np.float64))


@pytest.mark.parametrize("name", NAMES)
def test_float64_matches_torch(library, name):
    cases, _ = samples(name)
    rng = np.random.default_rng(11)
    for case in cases:
        check_float64(library, name, case, rng)


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_multihead_attention_converter_without_bias_kv(library, batched):
    """PyTorch's samples all add bias_k and bias_v; the converter is checked on its first
    sample without them, with a boolean attention mask and key padding mask."""
    from torch.testing._internal.opinfo.core import SampleInput

    o = _op_db()[("nn.functional.multi_head_attention_forward", "")]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = next(iter(o.reference_inputs("cpu", torch.float64, requires_grad=False)))
    args = list(s.args)
    args[6] = args[7] = None  # no bias_k, bias_v
    args[9] = 0.0  # no dropout
    q, k, v = s.input, args[0], args[1]
    if batched:
        q, k, v = (t.unsqueeze(1).repeat(1, 2, 1) for t in (q, k, v))
    L_, S_ = q.shape[0], k.shape[0]
    mask = torch.zeros(L_, S_, dtype=torch.bool)
    mask[0, S_ - 1] = True
    kpm = torch.zeros(2 if batched else S_, S_, dtype=torch.bool)[: (2 if batched else 1)]
    kpm[0, 0] = True
    kwargs = {**s.kwargs, "attn_mask": mask, "key_padding_mask": kpm if batched else kpm[0], "training": False}
    case = multihead_attention(o, SampleInput(q, args=(k, v, *args[2:]), kwargs=kwargs))
    case.what = "multi_head_attention_forward without bias_k/bias_v"
    assert np.isneginf(case.args[3]).sum() == 1 and np.isneginf(case.args[4]).sum() == 1
    check_float64(library, "multihead_attention", case, np.random.default_rng(3))


@pytest.mark.parametrize("name", NAMES)
def test_float32_as_accurate_as_torch(library, name):
    cases, _ = samples(name)
    rng = np.random.default_rng(12)
    for case in cases:
        op = library.op(name, **case.attrs)
        args32 = ref.cast(case.args, np.float32)
        args64 = [a if a.dtype.kind != "f" else a.astype(np.float64) for a in args32]  # the same values
        outs = ref.as_tuple(op.forward(*args32))
        seeds = _seeds(outs, rng, np.float32)
        wrt = case.wrt if case.wrt is not None else tuple(ref.differentiable_indices(op))
        wrt = wrt if op.differentiable else ()
        t32, g32 = torch_results(case, args32, np.float32, wrt, seeds)
        t64, g64 = torch_results(case, args64, np.float64, wrt, seeds)
        for k, o in enumerate(outs):
            check_float32(f"{case.what}: output {k}", o, t32[k], t64[k])
        _, grads = _ours(op, case, args32, seeds)
        if grads is not None:
            truth = dict(zip(wrt, g64))
            diff_idx = ref.differentiable_indices(op)
            for k, tg32 in zip(wrt, g32):
                g = grads[diff_idx.index(k)]
                t = truth[k]
                nan_in = _nan_inputs(args32, k, np.shape(g)) if op.kind == "activation" else None
                if nan_in is not None and nan_in.any():
                    assert np.all(np.isnan(np.asarray(g)[nan_in])), f"{case.what}: gradient at a NaN input is not NaN"
                    t, tg32 = np.where(nan_in, np.nan, t), np.where(nan_in, np.nan, tg32)
                check_float32(f"{case.what}: gradient of {op.arg_names[k]}", g, tg32, t)


def _small(cases):
    """A 0-d sample, an empty one and the smallest other one (those there are)."""
    small = sorted((c for c in cases if sum(np.size(a) for a in c.args) <= CUDA_NUMEL),
                   key=lambda c: sum(np.size(a) for a in c.args))
    kinds = {}
    for c in small:
        a = np.asarray(c.args[0])
        kinds.setdefault("0-d" if a.ndim == 0 else "empty" if a.size == 0 else "other", c)
    return list(kinds.values())[:CUDA_SAMPLES]


CUDA_NAMES = [n for n in NAMES if n not in ("conv2d", "scaled_dot_product_attention", "batch_norm2d_stats")]


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars warn on inf * 0
@pytest.mark.parametrize("name", CUDA_NAMES)
def test_cuda_matches_torch_on_small_samples(library, name):
    """Small samples on the CUDA target: a 0-d one, an empty one, the smallest other."""
    cases, _ = samples(name)
    rng = np.random.default_rng(13)
    for case in _small(cases):
        op = library.op(name, target="cuda", **case.attrs)
        args = ref.cast(case.args, np.float64)
        outs = ref.as_tuple(op.forward(*args))
        seeds = _seeds(outs, rng, np.float64)
        wrt = case.wrt if case.wrt is not None else tuple(ref.differentiable_indices(op))
        t_outs, t_grads = torch_results(case, args, np.float64, wrt if op.differentiable else (), seeds)
        for k, (o, t) in enumerate(zip(outs, t_outs)):
            check_close(f"{case.what}: output {k} (cuda)", o, t, np.float64)
        _, grads = _ours(op, case, args, seeds)
        if grads is not None:
            _compare_grads(op, case, args, grads, t_grads, wrt,
                           lambda what, g, tg: check_close(what + " (cuda)", g, tg, np.float64))


# ------------------------------------------------------------------ found by the samples, checked directly


@pytest.mark.parametrize("target_", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_batch_norm_stats_of_an_empty_batch_leave_them_unchanged(library, target_):
    """PyTorch's BatchNorm leaves its running statistics alone on an empty batch (the
    batch mean would be 0/0); the OpInfo sample of this is 1-d, so it is checked here."""
    op = library.op("batch_norm2d_stats", target=target_, momentum=0.3)
    rm, rv = np.array([0.5, -1.0]), np.array([2.0, 3.0])
    x = np.zeros((0, 2, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the simulator evaluates the unused 0/0 mean in Python
        new_mean, new_var = op.forward(x, rm, rv)
    m, v = torch.tensor(rm), torch.tensor(rv)
    F.batch_norm(torch.tensor(x), m, v, None, None, True, 0.3)
    np.testing.assert_array_equal(new_mean, m.numpy())
    np.testing.assert_array_equal(new_var, v.numpy())


NAN_FORMS = {  # spec expression -> the same function in PyTorch (where NaN propagates or not)
    "Max(x, 0)": lambda x: torch.clamp(x, min=0),
    "Min(x, -1)": lambda x: torch.clamp(x, max=-1),
    "Max(0, -x)": lambda x: torch.clamp(-x, min=0),
    "where(x > 1, x**2, 3)": lambda x: torch.where(x > 1, x**2, 3.0),
    "where(x <= 1, 3, x**2)": lambda x: torch.where(x <= 1, 3.0, x**2),
    "abs(x) + sign(x - 1)": lambda x: x.abs() + torch.sign(x - 1),
}


@pytest.mark.parametrize("expr", sorted(NAN_FORMS))
def test_nan_in_nan_out_through_where_max_min(tmp_path, expr):
    """A comparison with a NaN is false: where, Max and Min must not turn a NaN input
    into a number (forward or gradient); other inputs, infinities included, match PyTorch."""
    import codegen

    name = "nan_form"
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\nkind = "activation"\nexpr = "{expr}"\n')
    op = codegen.build(str(path), str(tmp_path / "out")).op()
    x = np.array([np.nan, -3.0, -0.5, 0.5, 2.0, np.inf, -np.inf])
    y, g = op.forward(x), op.backward(np.ones_like(x), x)
    assert np.isnan(y[0]) and np.isnan(g[0]), f"{expr} at NaN: {y[0]}, gradient {g[0]}"
    xt = torch.tensor(x[1:], requires_grad=True)
    yt = NAN_FORMS[expr](xt)
    yt.sum().backward()
    np.testing.assert_allclose(y[1:], yt.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(g[1:5], xt.grad.numpy()[:4], rtol=1e-12)
