"""Layers in index notation."""

from ..dsl import Sum, indices, layer, tensors

b, i, o = indices("b i o")
x, weight, bias, y = tensors("x weight bias y")

OPS = [
    layer("dense", inputs={"x": "B I"}, params={"weight": "I O", "bias": "O"}, outputs={"y": "B O"},
          equations=[(y[b, o], Sum(x[b, i] * weight[i, o], i) + bias[o])],
          doc="Affine map y = x W + b with W stored in x out."),
]
