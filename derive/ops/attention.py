"""Attention and similarity, written as their definitions (softmax written out; the
stability pass turns it into log-sum-exp with the maximum subtracted)."""

import sympy
from sympy import Max, Piecewise, exp, sqrt

from ..dsl import Sum, attr, dims, indices, layer, tensors

b, l, s, t, d, e = indices("b l s t d e")
(D,) = dims("D")
causal, eps = attr("causal", 0), attr("eps", 1e-8)
q, k, v, y, raw, score, prob, x1, x2 = tensors("q k v y raw score prob x1 x2")

OPS = [
    layer("scaled_dot_product_attention", inputs={"q": "B L D", "k": "B S D", "v": "B S E"},
          outputs={"y": "B L E"}, attrs={"causal": 0},
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
