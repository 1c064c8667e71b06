"""Embedding and recurrent cells (torch.nn.Embedding, RNNCell with tanh, GRUCell, LSTMCell)."""

from sympy import tanh

from ..dsl import Sum, dims, indices, layer, tensors
from ..functions import sigmoid

b, d, i, j, k = indices("b d i j k")
(H,) = dims("H")
x, h, w_ih, w_hh, b_ih, b_hh, y, idx, table = tensors("x h w_ih w_hh b_ih b_hh y idx table")
r, z, hn, nn = tensors("r z hn nn")
c, weight_ih, weight_hh, bias_ih, bias_hh = tensors("c weight_ih weight_hh bias_ih bias_hh")
ig, fg, gg, og, h_new, c_new = tensors("ig fg gg og h_new c_new")


def _affine(w, inp, col, g):
    """Row g*H + j of a stacked (3H) weight applied to inp, torch's gate order r, z, n."""
    return Sum(inp[b, col] * w[g * H + j, col], col)


def _lstm_gate(g):
    """The pre-activation of LSTM gate g (0..3 for i, f, g, o) at row g*H + j of the 4H weights."""
    return (_affine(weight_ih, x, i, g) + bias_ih[g * H + j] + _affine(weight_hh, h, k, g) + bias_hh[g * H + j])


OPS = [
    layer("embedding", inputs={"idx": "B"}, params={"table": "V D"}, outputs={"y": "B D"}, dtypes={"idx": "int"},
          equations=[(y[b, d], table[idx[b], d])],
          doc="Row lookup y[b] = table[idx[b]] (idx: integers, data); the table's gradient is a scatter-add."),
    layer("rnn_cell", inputs={"x": "B I", "h": "B H"},
          params={"w_ih": "H I", "w_hh": "H H", "b_ih": "H", "b_hh": "H"}, outputs={"y": "B H"},
          equations=[(y[b, j], tanh(Sum(x[b, i] * w_ih[j, i], i) + b_ih[j] + Sum(h[b, k] * w_hh[j, k], k) + b_hh[j]))],
          doc="One step of an Elman RNN with tanh, as torch.nn.RNNCell."),
    layer("gru_cell", inputs={"x": "B I", "h": "B H"},
          params={"w_ih": "G I", "w_hh": "G H", "b_ih": "G", "b_hh": "G"}, outputs={"y": "B H"},
          dims={"G": 3 * H}, ranges={"j": H},
          equations=[(r[b, j], sigmoid(_affine(w_ih, x, i, 0) + b_ih[j] + _affine(w_hh, h, k, 0) + b_hh[j])),
                     (z[b, j], sigmoid(_affine(w_ih, x, i, 1) + b_ih[H + j] + _affine(w_hh, h, k, 1) + b_hh[H + j])),
                     (hn[b, j], _affine(w_hh, h, k, 2) + b_hh[2 * H + j]),
                     (nn[b, j], tanh(_affine(w_ih, x, i, 2) + b_ih[2 * H + j] + r[b, j] * hn[b, j])),
                     (y[b, j], (1 - z[b, j]) * nn[b, j] + z[b, j] * h[b, j])],
          doc="One step of a GRU, as torch.nn.GRUCell (gates r, z, n stacked in rows of the 3H weights)."),
    layer("lstm_cell", inputs={"x": "B I", "h": "B H", "c": "B H"},
          params={"weight_ih": "G I", "weight_hh": "G H", "bias_ih": "G", "bias_hh": "G"},
          outputs={"h_new": "B H", "c_new": "B H"}, dims={"G": 4 * H}, ranges={"j": H},
          equations=[(ig[b, j], sigmoid(_lstm_gate(0))),
                     (fg[b, j], sigmoid(_lstm_gate(1))),
                     (gg[b, j], tanh(_lstm_gate(2))),
                     (og[b, j], sigmoid(_lstm_gate(3))),
                     (c_new[b, j], fg[b, j] * c[b, j] + ig[b, j] * gg[b, j]),
                     (h_new[b, j], og[b, j] * tanh(c_new[b, j]))],
          doc="One step of an LSTM, as torch.nn.LSTMCell: gates i, f, g, o stacked in rows of the 4H weights "
              "(weight_ih is 4H x I), returns (h_new, c_new)."),
]
