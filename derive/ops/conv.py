"""Convolution in index notation (NCHW, PyTorch's cross-correlation convention).

Zero padding is not written as a condition: the read
``xg[n, g, c, h*SH + p*DH - PH, w*SW + q*DW - PW]`` falls outside the input at the border,
and reads outside an input's bounds are zero. The input gradient (a transposed
convolution) and the weight gradient (the correlation of input and output gradient)
are derived, never written.

Groups (PyTorch's ``groups``): the C input channels and the O output channels split
into ``groups`` equal blocks, and output block g sees only input block g, through a
weight of shape (O, C/groups, KH, KW). The equations name the blocks: ``xg`` and ``wg``
read the input and the weight as (group, channel within the group) and ``z`` is one
convolution per group (a batched matrix product on the CPU); ``groups = C = O`` is a
depthwise convolution. ``CG = C / groups`` is a relation between the input's channels
and the weight's second axis, checked when the op runs: C not divisible by groups, or
a weight whose second axis is not C / groups, is an error naming the sizes.
"""

from sympy import floor

from ..dsl import Sum, attr, dims, indices, layer, tensors

n, o, g, j, c, h, w, a, b, p, q = indices("n o g j c h w a b p q")
C, O, H, W, KH, KW, CG, OG, G, HO, WO = dims("C O H W KH KW CG OG G HO WO")
SH, SW, PH, PW, DH, DW = (attr(s, v) for s, v in (("SH", 1), ("SW", 1), ("PH", 0), ("PW", 0), ("DH", 1), ("DW", 1)))
groups = attr("groups", 1)
x, weight, bias, y, xg, wg, z = tensors("x weight bias y xg wg z")

OPS = [
    layer("conv2d", inputs={"x": "N C H W"}, params={"weight": "O CG KH KW", "bias": "O"},
          outputs={"y": "N O HO WO"},
          attrs={"SH": 1, "SW": 1, "PH": 0, "PW": 0, "DH": 1, "DW": 1, "groups": 1},
          shorthands={"S": ("SH", "SW"), "P": ("PH", "PW"), "D": ("DH", "DW")},
          dims={"CG": C / groups, "OG": O / groups, "G": groups,
                "HO": floor((H + 2 * PH - DH * (KH - 1) - 1) / SH) + 1,
                "WO": floor((W + 2 * PW - DW * (KW - 1) - 1) / SW) + 1},
          ranges={"g": G, "j": OG, "c": CG, "h": HO, "w": WO},
          equations=[
              (xg[n, g, c, a, b], x[n, g * CG + c, a, b]),
              (wg[g, j, c, p, q], weight[g * OG + j, c, p, q]),
              (z[n, g, j, h, w],
               Sum(xg[n, g, c, h * SH + p * DH - PH, w * SW + q * DW - PW] * wg[g, j, c, p, q], c, p, q)),
              (y[n, o, h, w], z[n, floor(o / OG), o % OG, h, w] + bias[o]),
          ],
          doc="2-D convolution (cross-correlation) as torch.nn.functional.conv2d: stride (SH, SW), zero "
              "padding (PH, PW), dilation (DH, DW) and groups; S, P and D set both axes."),
]
