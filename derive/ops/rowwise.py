"""Row-wise normalisations over the last axis, written in their textbook forms.

The stability pass rewrites the sums of exponentials into log-sum-exp with the maximum
subtracted; nothing here is written in a 'stable' form by hand.
"""

from sympy import exp, log

from ..dsl import Sum, indices, layer, tensors

b, c, k = indices("b c k")
x, y = tensors("x y")

OPS = [
    layer("softmax", inputs={"x": "B C"}, outputs={"y": "B C"},
          equations=[(y[b, c], exp(x[b, c]) / Sum(exp(x[b, k]), k))],
          doc="softmax over the last axis."),
    layer("log_softmax", inputs={"x": "B C"}, outputs={"y": "B C"},
          equations=[(y[b, c], x[b, c] - log(Sum(exp(x[b, k]), k)))],
          doc="log-softmax over the last axis."),
]
