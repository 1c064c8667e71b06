"""Attention and similarity, written as their definitions (softmax written out; the
stability pass turns it into log-sum-exp with the maximum subtracted)."""

import sympy
from sympy import Max, Piecewise, exp, sqrt

from ..dsl import FLAG, Attr, Sum, attr, dims, indices, layer, tensors

b, l, s, t, d, e = indices("b l s t d e")
(D,) = dims("D")
causal, eps = attr("causal", 0), attr("eps", 1e-8)
q, k, v, y, raw, score, prob, x1, x2 = tensors("q k v y raw score prob x1 x2")

OPS = [
    layer("scaled_dot_product_attention", inputs={"q": "B L D", "k": "B S D", "v": "B S E"},
          outputs={"y": "B L E"}, attrs={"causal": FLAG},
          equations=[(raw[b, l, s], Sum(q[b, l, d] * k[b, s, d], d) / sqrt(D)),
                     (score[b, l, s], Piecewise((-sympy.oo, (causal > 0) & (s > l)), (raw[b, l, s], True))),
                     (prob[b, l, s], exp(score[b, l, s]) / Sum(exp(score[b, l, t]), t)),
                     (y[b, l, e], Sum(prob[b, l, s] * v[b, s, e], s))],
          doc="softmax(Q K^T / sqrt(D)) V over the last axis, with an optional causal mask (causal=1), "
              "as torch.nn.functional.scaled_dot_product_attention."),
    layer("cosine_similarity", inputs={"x1": "B D", "x2": "B D"}, outputs={"y": "B"}, attrs={"eps": 1e-8},
          equations=[(y[b], Sum(x1[b, d] * x2[b, d], d)
                      / (Max(sqrt(Sum(x1[b, d] ** 2, d)), eps) * Max(sqrt(Sum(x2[b, d] ** 2, d)), eps)))],
          doc="Cosine similarity along the last axis, x1.x2 / (max(|x1|, eps) max(|x2|, eps)), as "
              "torch.nn.functional.cosine_similarity."),
]

# Multi-head self-attention, built from the same equations: heads are a split of the
# model dimension E into NH blocks of Dh = E / NH columns of the projections.
h, f = indices("h f")
(E,) = dims("E")
HEADS = Attr(2, min=1)  # the number of heads
NH = attr("heads", HEADS)
Dh = dims("Dh")[0]
x, wq, wk, wv, wo, bq, bk, bv, bo = tensors("x wq wk wv wo bq bk bv bo")
qh, kh, vh, oh = tensors("qh kh vh oh")


def _project(w, bias):
    return Sum(x[b, l, e] * w[e, h * Dh + d], e) + bias[h * Dh + d]


OPS.append(
    layer("multi_head_attention", inputs={"x": "B L E"},
          params={"wq": "E E", "wk": "E E", "wv": "E E", "bq": "E", "bk": "E", "bv": "E", "wo": "E E", "bo": "E"},
          outputs={"y": "B L E"}, attrs={"heads": HEADS, "causal": FLAG}, dims={"Dh": E / NH},
          ranges={"h": NH, "d": Dh, "s": sympy.Symbol("L", integer=True, positive=True),
                  "t": sympy.Symbol("L", integer=True, positive=True)},
          equations=[(qh[b, h, l, d], _project(wq, bq)),
                     (kh[b, h, l, d], _project(wk, bk)),
                     (vh[b, h, l, d], _project(wv, bv)),
                     (raw[b, h, l, s], Sum(qh[b, h, l, d] * kh[b, h, s, d], d) / sqrt(Dh)),
                     (score[b, h, l, s], Piecewise((-sympy.oo, (causal > 0) & (s > l)), (raw[b, h, l, s], True))),
                     (prob[b, h, l, s], exp(score[b, h, l, s]) / Sum(exp(score[b, h, l, t]), t)),
                     (oh[b, h, l, d], Sum(prob[b, h, l, s] * vh[b, h, s, d], s)),
                     (y[b, l, f], Sum(oh[b, h, l, d] * wo[h * Dh + d, f], h, d) + bo[f])],
          doc="Multi-head self-attention: projections x W + b (weights E x E, in x out), split into `heads` "
              "heads of E / heads columns, scaled dot-product attention per head (causal mask optional), "
              "heads concatenated and projected by wo, as torch.nn.MultiheadAttention with batch_first "
              "(its weights transposed)."))

# torch.nn.MultiheadAttention itself: distinct query, key and value (cross-attention), its
# parameter layout (in_proj_weight stacks W_q, W_k, W_v in rows of 3E x E, applied as
# x W^T; out_proj likewise), and its masks as float tensors added to the scores: attn_mask
# (L x S) and key_padding_mask (B x S), -inf where a position is masked (PyTorch's float
# masks; a boolean mask is the float mask with -inf where it is True).
query, key, value, attn_mask, key_padding_mask = tensors("query key value attn_mask key_padding_mask")
in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias = tensors(
    "in_proj_weight in_proj_bias out_proj_weight out_proj_bias")


def _in_proj(inp, block, pos):
    """Block ``block`` (0, 1, 2 for q, k, v) of the stacked projection applied to inp at position pos."""
    row = block * E + h * Dh + d
    return Sum(inp[b, pos, e] * in_proj_weight[row, e], e) + in_proj_bias[row]


OPS.append(
    layer("multihead_attention", inputs={"query": "B L E", "key": "B S E", "value": "B S E",
                                         "attn_mask": "L S", "key_padding_mask": "B S"},
          params={"in_proj_weight": "G E", "in_proj_bias": "G", "out_proj_weight": "E E", "out_proj_bias": "E"},
          outputs={"y": "B L E"}, attrs={"heads": HEADS, "causal": FLAG}, dims={"Dh": E / NH, "G": 3 * E},
          differentiate=["query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"],
          ranges={"h": NH, "d": Dh},
          equations=[(qh[b, h, l, d], _in_proj(query, 0, l)),
                     (kh[b, h, s, d], _in_proj(key, 1, s)),
                     (vh[b, h, s, d], _in_proj(value, 2, s)),
                     (raw[b, h, l, s], Sum(qh[b, h, l, d] * kh[b, h, s, d], d) / sqrt(Dh)
                      + attn_mask[l, s] + key_padding_mask[b, s]),
                     (score[b, h, l, s], Piecewise((-sympy.oo, (causal > 0) & (s > l)), (raw[b, h, l, s], True))),
                     (prob[b, h, l, s], exp(score[b, h, l, s]) / Sum(exp(score[b, h, l, t]), t)),
                     (oh[b, h, l, d], Sum(prob[b, h, l, s] * vh[b, h, s, d], s)),
                     (y[b, l, f], Sum(oh[b, h, l, d] * out_proj_weight[f, h * Dh + d], h, d) + out_proj_bias[f])],
          doc="Multi-head attention as torch.nn.MultiheadAttention(batch_first=True): distinct query (B, L, E), "
              "key and value (B, S, E); in_proj_weight (3E x E) stacks the q, k, v projections (x W^T + b), "
              "out_proj_weight (E x E) likewise; attn_mask (L x S) and key_padding_mask (B x S) are float masks "
              "added to the scores (-inf masks a position), causal = 1 masks s > l as well."))
