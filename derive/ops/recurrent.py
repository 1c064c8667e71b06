"""Embedding and recurrent cells (torch.nn.Embedding, RNNCell with tanh, GRUCell)."""

from sympy import tanh

from ..dsl import Sum, dims, indices, layer, tensors
from ..functions import sigmoid

b, d, i, j, k = indices("b d i j k")
(H,) = dims("H")
x, h, w_ih, w_hh, b_ih, b_hh, y, idx, table = tensors("x h w_ih w_hh b_ih b_hh y idx table")
gi, gh = tensors("gi gh")


def _gates(g):
    """Row g*H + j of the stacked (3H) gate weights: torch's order is r, z, n."""
    return (Sum(x[b, i] * w_ih[g * H + j, i], i) + b_ih[g * H + j],
            Sum(h[b, k] * w_hh[g * H + j, k], k) + b_hh[g * H + j])


(xr, hr), (xz, hz), (xn, hn) = _gates(0), _gates(1), _gates(2)
r = sigmoid(xr + hr)
z = sigmoid(xz + hz)
nn = tanh(xn + r * hn)

OPS = [
    layer("embedding", inputs={"idx": "B", "table": "V D"}, outputs={"y": "B D"}, dtypes={"idx": "int"},
          equations=[(y[b, d], table[idx[b], d])],
          doc="Row lookup y[b] = table[idx[b]] (idx: integers, data); the table's gradient is a scatter-add."),
    layer("rnn_cell", inputs={"x": "B I", "h": "B H"},
          params={"w_ih": "H I", "w_hh": "H H", "b_ih": "H", "b_hh": "H"}, outputs={"y": "B H"},
          equations=[(y[b, j], tanh(Sum(x[b, i] * w_ih[j, i], i) + b_ih[j] + Sum(h[b, k] * w_hh[j, k], k) + b_hh[j]))],
          doc="One step of an Elman RNN with tanh, as torch.nn.RNNCell."),
    layer("gru_cell", inputs={"x": "B I", "h": "B H"},
          params={"w_ih": "G I", "w_hh": "G H", "b_ih": "G", "b_hh": "G"}, outputs={"y": "B H"},
          dims={"G": 3 * H},
          equations=[(y[b, j], (1 - z) * nn + z * h[b, j])],
          doc="One step of a GRU, as torch.nn.GRUCell (gates r, z, n stacked in rows of the 3H weights)."),
]
