"""Elementwise activations, as torch.nn.functional defines them."""

from sympy import Piecewise, erf, sqrt, tanh

from ..dsl import activation, attr, x
from ..functions import expm1, sigmoid as _sigmoid, softplus as _softplus

slope = attr("slope", 0.01)
alpha = attr("alpha", 1.0)

OPS = [
    activation("relu", Piecewise((x, x > 0), (0, True)), doc="max(x, 0); relu'(0) = 0 as in PyTorch."),
    activation("leaky_relu", Piecewise((x, x > 0), (slope * x, True)), attrs={"slope": 0.01},
               doc="x for x > 0, slope * x otherwise."),
    activation("elu", Piecewise((x, x > 0), (alpha * expm1(x), True)), attrs={"alpha": 1.0},
               doc="x for x > 0, alpha (exp(x) - 1) otherwise."),
    activation("gelu", x * (1 + erf(x / sqrt(2))) / 2, doc="The exact (erf) form of GELU."),
    activation("sigmoid", _sigmoid(x), doc="The logistic function 1 / (1 + exp(-x))."),
    activation("tanh", tanh(x), doc="The hyperbolic tangent."),
    activation("softplus", _softplus(x), doc="log(1 + exp(x))."),
    activation("silu", x * _sigmoid(x), doc="x sigmoid(x) (swish)."),
    activation("mish", x * tanh(_softplus(x)), doc="x tanh(softplus(x))."),
]
