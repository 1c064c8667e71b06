"""Non-smooth points: which (sub)gradient is used where the derivative is undefined.

relu'(0) = 0; leaky_relu and elu at 0 as PyTorch; ``max`` routes the gradient to the
first maximal element in loop order (here max_pool2d from DESIGN.md's example spec, and
a row maximum written in a user spec).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

import reference as ref

SPECS = Path(__file__).resolve().parent / "specs"
KINKS = np.array([0.0, -0.0, 1.0, -1.0])

ROWMAX_SPEC = """\
name = "rowmax"
kind = "layer"
inputs = { x = "B I" }
outputs = { y = "B" }
equations = ["y[b] = max(x[b,i], i)"]
"""


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_relu_derivative_at_zero_is_zero(dtype):
    import generated

    op = generated.op("relu")
    x = KINKS.astype(dtype)
    np.testing.assert_array_equal(op.forward(x), [0.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(op.backward(np.ones_like(x), x), [0.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "name, attrs",
    [("leaky_relu", {}), ("leaky_relu", {"slope": 0.2}), ("elu", {}), ("elu", {"alpha": 0.5})],
    ids=["leaky_relu", "leaky_relu-slope=0.2", "elu", "elu-alpha=0.5"],
)
def test_kinks_at_zero_as_torch(name, attrs):
    import generated

    op = generated.op(name, **attrs)
    gy = np.ones_like(KINKS)
    ref.assert_close(op.forward(KINKS), ref.torch_forward(name, [KINKS], attrs), np.float64, "forward")
    ref.assert_close(op.backward(gy, KINKS), ref.torch_vjp(name, [KINKS], attrs, gy, [0])[0], np.float64, "backward")


# ---------------------------------------------------------------- max: first maximal element


def max_pool_grad_first_argmax(x, gy, K, S):
    """The gradient of max_pool2d routed to the first maximal element of each window
    (p outer, q inner, as in ``max(x[n,c,h*S+p,w*S+q], p, q)``)."""
    gx = np.zeros_like(x, dtype=np.float64)
    N, C, HO, WO = gy.shape
    for n, c, h, w in itertools.product(range(N), range(C), range(HO), range(WO)):
        best = None
        for p, q in itertools.product(range(K), range(K)):
            v = x[n, c, h * S + p, w * S + q]
            if best is None or v > best[0]:
                best = (v, p, q)
        _, p, q = best
        gx[n, c, h * S + p, w * S + q] += gy[n, c, h, w]
    return gx


@pytest.mark.parametrize("K, S", [(2, 2), (3, 1)], ids=["K=2-S=2", "K=3-S=1"])
def test_max_pool2d_routes_ties_to_first_maximal_element(build_spec, K, S, target, rng):
    op = build_spec(SPECS / "max_pool2d.toml").op(target=target, K=K, S=S)
    x = rng.integers(0, 2, size=(1, 2, 7, 5)).astype(np.float64)  # many ties
    y = op.forward(x)
    gy = rng.normal(size=np.shape(y))
    ref.assert_close(op.backward(gy, x), max_pool_grad_first_argmax(x, gy, K, S), np.float64)


def test_max_pool2d_constant_input_routes_to_window_corners(build_spec):
    op = build_spec(SPECS / "max_pool2d.toml").op()
    x = np.zeros((1, 1, 5, 5))
    gy = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    expected = np.zeros_like(x)
    expected[0, 0, 0:4:2, 0:4:2] = gy[0, 0]
    np.testing.assert_array_equal(op.backward(gy, x), expected)


def test_max_over_an_index_routes_to_first_maximal_element(build_spec, tmp_path, target):
    spec = tmp_path / "rowmax.toml"
    spec.write_text(ROWMAX_SPEC)
    op = build_spec(spec).op(target=target)
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, 7.0]])
    np.testing.assert_array_equal(op.forward(x), [3.0, 2.0, 7.0])
    gy = np.array([10.0, 20.0, 30.0])
    expected = np.array([[0.0, 10.0, 0.0, 0.0], [20.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 30.0]])
    np.testing.assert_array_equal(op.backward(gy, x), expected)
