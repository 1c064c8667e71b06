"""Optimizers as sequential elementwise updates (torch.optim's algorithms and defaults)."""

from sympy import sqrt

from ..dsl import optimizer, scalar
import sympy

p, g, m, v, buf, s = (scalar(n) for n in "p g m v buf s".split())
lr, beta1, beta2, eps, momentum, alpha, weight_decay = (scalar(n) for n in "lr beta1 beta2 eps momentum alpha weight_decay".split())
t = sympy.Symbol("t", integer=True, positive=True)

OPS = [
    optimizer("sgd", [], {"lr": 0.001}, [("p", p - lr * g)], doc="Plain gradient descent."),
    optimizer("momentum", ["buf"], {"lr": 0.001, "momentum": 0.9},
              [("buf", momentum * buf + g), ("p", p - lr * buf)],
              doc="SGD with heavy-ball momentum (torch.optim.SGD(momentum=...), dampening 0; the buffer starts at 0, so the first step equals torch's buf = g)."),
    optimizer("nesterov", ["buf"], {"lr": 0.001, "momentum": 0.9},
              [("buf", momentum * buf + g), ("p", p - lr * (g + momentum * buf))],
              doc="SGD with Nesterov momentum (torch.optim.SGD(nesterov=True))."),
    optimizer("adagrad", ["s"], {"lr": 0.01, "eps": 1e-10},
              [("s", s + g**2), ("p", p - lr * g / (sqrt(s) + eps))], doc="Adagrad."),
    optimizer("rmsprop", ["v"], {"lr": 0.01, "alpha": 0.99, "eps": 1e-8},
              [("v", alpha * v + (1 - alpha) * g**2), ("p", p - lr * g / (sqrt(v) + eps))], doc="RMSprop."),
    optimizer("adam", ["m", "v"], {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
              [("m", beta1 * m + (1 - beta1) * g), ("v", beta2 * v + (1 - beta2) * g**2),
               ("p", p - lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps))], doc="Adam."),
    optimizer("adamw", ["m", "v"], {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
              [("p", p - lr * weight_decay * p), ("m", beta1 * m + (1 - beta1) * g), ("v", beta2 * v + (1 - beta2) * g**2),
               ("p", p - lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps))], doc="AdamW (decoupled weight decay)."),
]
