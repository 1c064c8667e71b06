"""Normalisation layers and dropout, written as their textbook forward definitions.

The statistics are intermediates (mean, the biased variance, rstd = 1/sqrt(var + eps)) and
so is the normalised input xhat = (x - mean) rstd, as the textbook writes the forward. The
compact backward, rstd (ghat - mean(ghat) - xhat mean(ghat xhat)) with ghat = weight g_y,
is derived from these equations (derive/statistics.py), not written.
"""

import sympy
from sympy import Piecewise, sqrt

from ..dsl import Attr, Mean, Sum, attr, dims, indices, layer, tensors
from ..functions import uniform

b, d, n, c, h, w = indices("b d n c h w")
N, H, W = dims("N H W")
eps, momentum, p = attr("eps", 1e-5), attr("momentum", 0.1), attr("p", 0.5)
seed, step = attr("seed", 0), attr("step", 0)
x, weight, bias, y, mask = tensors("x weight bias y mask")
mean, var, rstd, xhat = tensors("mean var rstd xhat")
count = sympy.Symbol("count", real=True)
running_mean, running_var, new_mean, new_var = tensors("running_mean running_var new_mean new_var")

M = N * H * W  # elements per channel

OPS = [
    layer("layer_norm", inputs={"x": "B D"}, params={"weight": "D", "bias": "D"}, outputs={"y": "B D"},
          attrs={"eps": 1e-5},
          equations=[(mean[b], Mean(x[b, d], d)),
                     (var[b], Mean((x[b, d] - mean[b]) ** 2, d)),
                     (rstd[b], 1 / sqrt(var[b] + eps)),
                     (xhat[b, d], (x[b, d] - mean[b]) * rstd[b]),
                     (y[b, d], xhat[b, d] * weight[d] + bias[d])],
          doc="Layer normalisation over the last axis with affine weight and bias, as torch.nn.functional.layer_norm."),
    layer("batch_norm2d", inputs={"x": "N C H W"}, params={"weight": "C", "bias": "C"}, outputs={"y": "N C H W"},
          attrs={"eps": 1e-5, "momentum": 0.1},
          equations=[(mean[c], Mean(x[n, c, h, w], n, h, w)),
                     (var[c], Mean((x[n, c, h, w] - mean[c]) ** 2, n, h, w)),
                     (rstd[c], 1 / sqrt(var[c] + eps)),
                     (xhat[n, c, h, w], (x[n, c, h, w] - mean[c]) * rstd[c]),
                     (y[n, c, h, w], xhat[n, c, h, w] * weight[c] + bias[c])],
          modes={"eval": "batch_norm2d_eval", "running": "batch_norm2d_stats", "init.running_var": 1.0},
          doc="Batch normalisation in training mode (batch statistics, biased variance), as "
              "torch.nn.functional.batch_norm(training=True); momentum is used by batch_norm2d_stats. In a "
              "model, training updates the running statistics (batch_norm2d_stats) and eval mode uses them "
              "(batch_norm2d_eval)."),
    layer("batch_norm2d_stats", inputs={"x": "N C H W", "running_mean": "C", "running_var": "C"},
          outputs={"new_mean": "C", "new_var": "C"}, attrs={"momentum": 0.1}, differentiate=[],
          ranges={"n": N, "h": H, "w": W},
          equations=[(count, Sum(1, n, h, w)),  # 0 for an empty batch (M > 0 would be true: dimensions are >= 1)
                     (mean[c], Mean(x[n, c, h, w], n, h, w)),
                     (new_mean[c], Piecewise(((1 - momentum) * running_mean[c] + momentum * mean[c], count > 0),
                                             (running_mean[c], True))),
                     (new_var[c], Piecewise(((1 - momentum) * running_var[c]
                                             + momentum * Sum((x[n, c, h, w] - mean[c]) ** 2, n, h, w) / (M - 1), count > 0),
                                            (running_var[c], True)))],
          doc="The running-statistics update of torch.nn.BatchNorm2d (unbiased batch variance); an empty batch "
              "leaves the statistics unchanged, as PyTorch does; nothing is differentiated."),
    layer("batch_norm2d_eval", inputs={"x": "N C H W", "running_mean": "C", "running_var": "C"},
          params={"weight": "C", "bias": "C"}, outputs={"y": "N C H W"}, attrs={"eps": 1e-5},
          differentiate=["x", "weight", "bias"],
          equations=[(y[n, c, h, w], (x[n, c, h, w] - running_mean[c]) / sqrt(running_var[c] + eps) * weight[c] + bias[c])],
          doc="Batch normalisation in inference mode (running statistics are data)."),
    layer("dropout", inputs={"x": "B N"}, outputs={"y": "B N"},
          attrs={"p": Attr(0.5, min=0.0, below=1.0), "seed": 0, "step": 0},
          modes={"eval": "identity"},
          equations=[(y[b, d], x[b, d] * Piecewise((1, uniform(seed, step, b * N + d) >= p), (0, True)) / (1 - p))],
          doc="Inverted dropout drawing its own mask: element (b, d) is kept, scaled by 1/(1 - p), where "
              "uniform(seed, step, b*N + d) >= p (the counter-based generator, derive/functions.py), so the "
              "forward and the backward draw the same mask and a (seed, step) reproduces it; a model passes "
              "its seed and step counter (docs/models.md)."),
    layer("dropout_mask", inputs={"x": "B N", "mask": "B N"}, outputs={"y": "B N"},
          attrs={"p": Attr(0.5, min=0.0, below=1.0)},
          differentiate=["x"], equations=[(y[b, d], x[b, d] * mask[b, d] / (1 - p))],
          doc="Inverted dropout with a given 0/1 mask (data), scaled by 1/(1 - p)."),
]
