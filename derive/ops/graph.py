"""Graph layers."""

from ..dsl import Sum, indices, layer, tensors

v, u, i, o = indices("v u i o")
A, x, weight, bias, y = tensors("A x weight bias y")

OPS = [
    layer("gcn_layer", inputs={"A": "V V", "x": "V I"}, params={"weight": "I O", "bias": "O"}, outputs={"y": "V O"},
          differentiate=["x", "weight", "bias"],
          equations=[(y[v, o], Sum(A[v, u] * x[u, i] * weight[i, o], u, i) + bias[o])],
          doc="Graph convolution y = A x W + b with a normalised adjacency A (data)."),
]
