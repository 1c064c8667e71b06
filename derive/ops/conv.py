"""Convolution in index notation (NCHW, PyTorch's cross-correlation convention).

Zero padding is not written as a condition: the read ``x[n, c, h*S + p - P, w*S + q - P]``
falls outside x at the border, and reads outside an input's bounds are zero. The input
gradient (a transposed convolution) and the weight gradient (the correlation of input
and output gradient) are derived, never written.
"""

from sympy import floor

from ..dsl import Sum, attr, dims, indices, layer, tensors

n, c, o, h, w, p, q = indices("n c o h w p q")
H, W, KH, KW = dims("H W KH KW")
S, P = attr("S", 1), attr("P", 0)
x, weight, bias, y = tensors("x weight bias y")

OPS = [
    layer("conv2d", inputs={"x": "N C H W"}, params={"weight": "O C KH KW", "bias": "O"},
          outputs={"y": "N O HO WO"}, attrs={"S": 1, "P": 0},
          dims={"HO": floor((H + 2 * P - KH) / S) + 1, "WO": floor((W + 2 * P - KW) / S) + 1},
          equations=[(y[n, o, h, w],
                      Sum(x[n, c, h * S + p - P, w * S + q - P] * weight[o, c, p, q], c, p, q) + bias[o])],
          doc="2-D convolution (cross-correlation) with stride S and zero padding P, as torch.nn.functional.conv2d."),
]
