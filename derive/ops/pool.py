"""Pooling and reshaping in index notation.

A pooling window is an index used only inside arithmetic (``x[n, c, h*SH + p - PH, ...]``),
so its range comes from ``ranges``. max routes the gradient to the first maximal element
of each window (PyTorch's rule) through the argmax the forward records.

The options are PyTorch's (torch.nn.functional.max_pool2d / avg_pool2d): a KH x KW
window, strides SH, SW, padding PH, PW (max pooling pads with -inf: a padded element is
never the maximum; average pooling pads with zeros), max pooling's dilation DH, DW,
``ceil_mode`` and average pooling's ``count_include_pad``. K, S, P and D set both axes.
The output size is PyTorch's: with ceil_mode the size is rounded up, but the last
window must start inside the input or its left padding (``HC`` is the rounded size,
and one window less is taken where ``(HC - 1)*SH >= H + PH``). Average pooling divides
by the window's size clipped to the padded input (count_include_pad, the default) or by
the number of the input's own elements in it.
"""

from sympy import And, Min, Piecewise, floor, oo
from sympy import Max as ElemMax

from ..dsl import Max, Sum, attr, dims, indices, layer, tensors

n, c, h, w, p, q, j = indices("n c h w p q j")
C, H, W, HC, WC = dims("C H W HC WC")
KH, KW, SH, SW, PH, PW, DH, DW = (attr(s, v) for s, v in (("KH", 2), ("KW", 2), ("SH", 2), ("SW", 2), ("PH", 0), ("PW", 0),
                                                          ("DH", 1), ("DW", 1)))
ceil_mode, count_include_pad = attr("ceil_mode", 0), attr("count_include_pad", 1)
x, y = tensors("x y")


def _size(extent, pad, span, stride, rounded, inp):
    """PyTorch's pooling output size along one axis (pooling_output_shape): ``rounded``
    is the size rounded down, or up with ceil_mode; then one window less where the last
    would start past the input and its left padding."""
    first = floor((extent + 2 * pad - span + ceil_mode * (stride - 1)) / stride) + 1
    last = rounded - ceil_mode * Min(1, ElemMax(0, (rounded - 1) * stride - inp - pad + 1))
    return first, last


_HC, _HO = _size(H, PH, DH * (KH - 1) + 1, SH, HC, H)
_WC, _WO = _size(W, PW, DW * (KW - 1) + 1, SW, WC, W)
_AVG_HC, _ = _size(H, PH, KH, SH, HC, H)
_AVG_WC, _ = _size(W, PW, KW, SW, WC, W)

_SHORT = {"K": ("KH", "KW"), "S": ("SH", "SW"), "P": ("PH", "PW")}
_IO = dict(inputs={"x": "N C H W"}, outputs={"y": "N C HO WO"}, ranges={"p": KH, "q": KW})

row, col = h * SH + p * DH - PH, w * SW + q * DW - PW
inside = And(row >= 0, row < H, col >= 0, col < W)

# average pooling: the window's first row and column, and its size as PyTorch counts it
r0, c0 = h * SH - PH, w * SW - PW
padded = (Min(r0 + KH, H + PH) - r0) * (Min(c0 + KW, W + PW) - c0)
own = (Min(r0 + KH, H) - ElemMax(r0, 0)) * (Min(c0 + KW, W) - ElemMax(c0, 0))

OPS = [
    layer("max_pool2d", **_IO,
          attrs={"KH": 2, "KW": 2, "SH": 2, "SW": 2, "PH": 0, "PW": 0, "DH": 1, "DW": 1, "ceil_mode": 0},
          shorthands={**_SHORT, "D": ("DH", "DW")},
          dims={"HC": _HC, "WC": _WC, "HO": _HO, "WO": _WO},
          equations=[(y[n, c, h, w], Max(Piecewise((x[n, c, row, col], inside), (-oo, True)), p, q))],
          doc="Max pooling as torch.nn.functional.max_pool2d: a KH x KW window, stride (SH, SW), padding "
              "(PH, PW) with -inf, dilation (DH, DW), ceil_mode; K, S, P and D set both axes."),
    layer("avg_pool2d", **_IO,
          attrs={"KH": 2, "KW": 2, "SH": 2, "SW": 2, "PH": 0, "PW": 0, "ceil_mode": 0, "count_include_pad": 1},
          shorthands=_SHORT,
          dims={"HC": _AVG_HC, "WC": _AVG_WC, "HO": _HO, "WO": _WO},
          equations=[(y[n, c, h, w], Sum(x[n, c, h * SH + p - PH, w * SW + q - PW], p, q)
                      / (count_include_pad * padded + (1 - count_include_pad) * own))],
          doc="Average pooling as torch.nn.functional.avg_pool2d: a KH x KW window, stride (SH, SW), zero "
              "padding (PH, PW), ceil_mode, count_include_pad; K, S and P set both axes."),
    layer("flatten", inputs={"x": "N C H W"}, outputs={"y": "N F"}, dims={"F": C * H * W},
          equations=[(y[n, j], x[n, floor(j / (H * W)), floor(j / W) % H, j % W])],
          doc="(N, C, H, W) -> (N, C*H*W) in row-major order, as torch.flatten(x, 1)."),
]
