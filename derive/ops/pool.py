"""Pooling and reshaping in index notation.

A pooling window is an index used only inside arithmetic (``x[n, c, h*S + p, w*S + q]``),
so its range comes from ``ranges``. max routes the gradient to the first maximal element
of each window (PyTorch's rule) through the argmax the forward records.
"""

from sympy import floor

from ..dsl import Max, Sum, attr, dims, indices, layer, tensors

n, c, h, w, p, q, j = indices("n c h w p q j")
C, H, W = dims("C H W")
K, S = attr("K", 2), attr("S", 2)
x, y = tensors("x y")

_POOL = dict(inputs={"x": "N C H W"}, outputs={"y": "N C HO WO"}, attrs={"K": 2, "S": 2},
             dims={"HO": floor((H - K) / S) + 1, "WO": floor((W - K) / S) + 1}, ranges={"p": K, "q": K})

OPS = [
    layer("max_pool2d", equations=[(y[n, c, h, w], Max(x[n, c, h * S + p, w * S + q], p, q))], **_POOL,
          doc="Max pooling with a K x K window and stride S (no padding), as torch.nn.functional.max_pool2d."),
    layer("avg_pool2d", equations=[(y[n, c, h, w], Sum(x[n, c, h * S + p, w * S + q], p, q) / K**2)], **_POOL,
          doc="Average pooling with a K x K window and stride S (no padding), as torch.nn.functional.avg_pool2d."),
    layer("flatten", inputs={"x": "N C H W"}, outputs={"y": "N F"}, dims={"F": C * H * W},
          equations=[(y[n, j], x[n, floor(j / (H * W)), floor(j / W) % H, j % W])],
          doc="(N, C, H, W) -> (N, C*H*W) in row-major order, as torch.flatten(x, 1)."),
]
