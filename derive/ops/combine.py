"""Joining paths and position tables: what residual blocks and transformers need besides
their layers. Every op is rank-specific, as the library's layers are; a tensor of another
rank is viewed (a free reshape of a contiguous array) as the declared one:

* ``add`` is elementwise over (B, N): any two arrays of one shape are added as their
  (shape[0], rest) views;
* ``concat`` joins (A, N1, R) and (A, N2, R) along the middle axis: an axis ``k`` of
  arrays of any rank is the middle axis once the axes before it are viewed as one (A)
  and the axes after it as one (R), so ``torch.cat(xs, dim=k)`` is this op on views;
* ``positional_embedding`` adds rows 0..T-1 of a learned (P, D) table (P >= T, the
  longest sequence) to a batch of sequences (B, T, D).
"""

from sympy import Piecewise

from ..dsl import dims, indices, layer, tensors

a, b, n, r, t, d = indices("a b n r t d")
N, N1, N2, T = dims("N N1 N2 T")
x, x1, x2, y, table = tensors("x x1 x2 y table")

OPS = [
    layer("add", inputs={"x1": "B N", "x2": "B N"}, outputs={"y": "B N"},
          equations=[(y[b, n], x1[b, n] + x2[b, n])],
          doc="Elementwise sum of two arrays of one shape (a residual connection), as torch.add; "
              "arrays of another rank are added as their (shape[0], rest) views."),
    layer("concat", inputs={"x1": "A N1 R", "x2": "A N2 R"}, outputs={"y": "A N R"}, dims={"N": N1 + N2}, ranges={"n": N},
          equations=[(y[a, n, r], Piecewise((x1[a, n, r], n < N1), (x2[a, n - N1, r], True)))],
          doc="Concatenation along the middle axis of (A, N1, R) and (A, N2, R), as torch.cat(dim=1): "
              "torch.cat(dim=k) of arrays of any rank is this op on their views with the axes before k "
              "joined as A and the axes after k as R."),
    layer("positional_embedding", inputs={"x": "B T D"}, params={"table": "P D"}, outputs={"y": "B T D"}, ranges={"t": T},
          equations=[(y[b, t, d], x[b, t, d] + table[t, d])],
          doc="Learned absolute positions: row t of the (P, D) table added at position t of each sequence "
              "(P >= T), as x + nn.Embedding(P, D)(arange(T)) in a GPT-style model."),
]
