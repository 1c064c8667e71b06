"""Losses with PyTorch's reductions; targets are data (not differentiated).

Each loss writes its terms under ``Reduce(terms, indices)``, the spec language's
``reduce(...)`` (derive/reductions.py): it declares the attribute ``reduction`` with
PyTorch's codes and names, 1 = "mean" (the default, PyTorch's), 2 = "sum", 0 = "none"
(the terms themselves, shaped as PyTorch returns them: (B, N) for an elementwise loss,
(B,) for one per sample). kl_div keeps its one reduction, "batchmean"; l2_penalty is a
penalty (lam/2 times a sum), not a mean."""

from sympy import Abs, Eq, Max, Piecewise, exp, log, pi, sqrt

from ..dsl import Attr, Reduce, Sum, attr, dims, indices, loss, scalar, tensors
from ..functions import sigmoid, stop_gradient


b, n, c, k, d_ = indices("b n c k d")
B, N = dims("B N")
pred, target, logits, logprobs, logq, logp = tensors("pred target logits logprobs logq logp")
L = scalar("loss")
delta, margin, eps = attr("delta", 1.0), attr("margin", 0.0), attr("eps", 1e-12)
x1, x2, label = tensors("x1 x2 label")
var, vc, idx = tensors("var vc idx")
SWITCH_ON, SWITCH_OFF = Attr(1.0, values=[0.0, 1.0]), Attr(0.0, values=[0.0, 1.0])  # a real 0/1 switch
log_input, full = attr("log_input", SWITCH_ON), attr("full", SWITCH_OFF)
lam = attr("lam", 1.0)
w = tensors("w")[0]
cos = tensors("cos")[0]
weight, coef, lse, wt = tensors("weight coef lse wt")
ignore_index, label_smoothing = attr("ignore_index", -100), attr("label_smoothing", 0.0)
(C,) = dims("C")
d = pred[b, n] - target[b, n]
POSITIVE = Attr(1e-12, above=0.0)  # an epsilon guarding a division or a log


OPS = [
    loss("mse", inputs={"pred": "B N", "target": "B N"}, outputs={"loss": ""}, differentiate=["pred"],
         equations=[(L, Reduce(d**2, b, n))], doc="Squared error, mean (or sum, or none) over all elements."),
    loss("huber", inputs={"pred": "B N", "target": "B N"}, outputs={"loss": ""}, differentiate=["pred"],
         attrs={"delta": Attr(1.0, above=0.0)},
         equations=[(L, Reduce(Piecewise((d**2 / 2, Abs(d) < delta), (delta * (Abs(d) - delta / 2), True)), b, n))],
         doc="Huber loss, mean (or sum, or none) over all elements."),
    loss("bce_with_logits", task="binary", inputs={"pred": "B N", "target": "B N"}, outputs={"loss": ""}, differentiate=["pred"],
         equations=[(L, -Reduce(target[b, n] * log(sigmoid(pred[b, n])) + (1 - target[b, n]) * log(1 - sigmoid(pred[b, n])), b, n))],
         doc="Binary cross-entropy of sigmoid(pred), written from its definition; the stability pass turns the logs into softplus."),
    loss("softmax_cross_entropy", task="classification", inputs={"logits": "B C", "target": "B C"}, outputs={"loss": ""}, differentiate=["logits"],
         equations=[(L, -Reduce(Sum(target[b, c] * (logits[b, c] - log(Sum(exp(logits[b, k]), k))), c), b))],
         assume=[(Sum(target[b, c], c), 1)],
         doc="Cross-entropy of softmax(logits) with one-hot or probability targets (rows sum to 1, which the derivation uses), mean (or sum, or none) over the batch."),
    loss("nll", task="classification", inputs={"logprobs": "B C", "target": "B C"}, outputs={"loss": ""}, differentiate=["logprobs"],
         equations=[(L, -Reduce(Sum(target[b, c] * logprobs[b, c], c), b))],
         doc="Negative log-likelihood of log-probabilities with one-hot or probability targets, mean (or sum, or none) over the batch."),
    loss("categorical_nll", task="classification", inputs={"logprobs": "B C", "idx": "B"}, outputs={"loss": ""},
         dtypes={"idx": "int"}, differentiate=["logprobs"],
         equations=[(L, -Reduce(logprobs[b, idx[b]], b))],
         doc="Negative log-likelihood of log-probabilities at integer class indices, mean (or sum, or none) over the batch "
             "(F.nll_loss); nll takes one-hot or probability rows instead."),
    loss("gaussian_nll", inputs={"pred": "B N", "target": "B N", "var": "B N"}, outputs={"loss": ""},
         differentiate=["pred", "var"], attrs={"eps": Attr(1e-6, above=0.0), "full": SWITCH_OFF},
         equations=[(vc[b, n], var[b, n] + stop_gradient(Max(var[b, n], eps) - var[b, n])),
                    (L, Reduce((log(vc[b, n]) + d**2 / vc[b, n]) / 2 + full * log(2 * pi) / 2, b, n))],
         doc="Gaussian negative log-likelihood with a predicted variance, mean (or sum, or none) over all elements, as "
             "F.gaussian_nll_loss: the variance is clamped at eps without blocking its gradient (PyTorch clamps "
             "under no_grad), full = 1 adds the constant log(2 pi)/2."),
    loss("poisson_nll", inputs={"pred": "B N", "target": "B N"}, outputs={"loss": ""}, differentiate=["pred"],
         attrs={"log_input": SWITCH_ON, "full": SWITCH_OFF, "eps": Attr(1e-8, above=0.0)},
         equations=[(L, Reduce(Piecewise((exp(pred[b, n]) - target[b, n] * pred[b, n], log_input > 0),
                                       (pred[b, n] - target[b, n] * log(pred[b, n] + eps), True))
                             + full * Piecewise((target[b, n] * log(target[b, n]) - target[b, n]
                                                 + log(2 * pi * target[b, n]) / 2, target[b, n] > 1), (0, True)),
                             b, n))],
         doc="Poisson negative log-likelihood, mean (or sum, or none) over all elements, as F.poisson_nll_loss: pred is the log of "
             "the rate (log_input = 1) or the rate (log_input = 0, log(rate + eps)); full = 1 adds Stirling's "
             "term for targets above 1."),
    loss("kl_div", inputs={"logq": "B C", "logp": "B C"}, outputs={"loss": ""},
         equations=[(L, Sum(exp(logp[b, c]) * (logp[b, c] - logq[b, c]), b, c) / B)],
         doc="KL(p || q) from log-probabilities, batchmean (F.kl_div(logq, logp, reduction='batchmean', log_target=True))."),
    loss("cosine_embedding_loss", inputs={"x1": "B D", "x2": "B D", "label": "B"}, outputs={"loss": ""},
         differentiate=["x1", "x2"], attrs={"margin": 0.0, "eps": POSITIVE},
         equations=[(cos[b], Sum(x1[b, d_] * x2[b, d_], d_)
                      / sqrt((Sum(x1[b, d_] ** 2, d_) + eps) * (Sum(x2[b, d_] ** 2, d_) + eps))),
                     (L, Reduce(Piecewise((1 - cos[b], label[b] > 0), (Max(0, cos[b] - margin), label[b] < 0), (0, True)), b))],
         doc="Cosine embedding loss with labels 1 (similar) and -1 (dissimilar), mean (or sum, or none) over the batch, as "
             "F.cosine_embedding_loss (eps guards the squared norms, as PyTorch's 1e-12)."),
    loss("l2_penalty", inputs={"w": "N"}, outputs={"loss": ""},
         attrs={"lam": 1.0},
         equations=[(L, lam * Sum(w[n] ** 2, n) / 2)],
         doc="L2 penalty (ridge, weight decay): lam/2 times the sum of squares of w, a parameter flattened to a "
             "vector. Added to a loss that is a mean over n samples, lam = 1/(C n) gives scikit-learn's "
             "LogisticRegression(C) objective (C times the summed loss plus half the squared norm) divided by C n."),
    loss("cross_entropy", task="classification", inputs={"logits": "B C", "target": "B", "weight": "C"},
         outputs={"loss": ""}, dtypes={"target": "int"}, differentiate=["logits"],
         attrs={"ignore_index": -100, "label_smoothing": Attr(0.0, min=0.0, max=1.0)},
         equations=[(lse[b], log(Sum(exp(logits[b, k]), k))),
                    (coef[b, c], Piecewise((0, Eq(target[b], ignore_index)),
                                           (weight[c] * ((1 - label_smoothing) * Piecewise((1, Eq(c, target[b])), (0, True))
                                                         + label_smoothing / C), True))),
                    (wt[b], Piecewise((0, Eq(target[b], ignore_index)),
                                      (Sum(Piecewise((weight[c], Eq(c, target[b])), (0, True)), c), True))),
                    (L, Reduce(Sum(coef[b, c] * (lse[b] - logits[b, c]), c), b, weight=wt[b]))],
         doc="Cross-entropy of softmax(logits) at integer class targets, as F.cross_entropy with its options: "
             "class weights (data; ones for PyTorch's None), targets equal to ignore_index count for nothing, "
             "label_smoothing mixes the target with the uniform distribution; the mean divides by the summed "
             "weights of the counted targets (reduction = 2: the sum; 0: each sample's weighted loss)."),
]
