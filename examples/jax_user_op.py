"""The same as torch_user_op.py in JAX: the user's activation and loss as ``op.jax()``
functions (``jax.custom_vjp`` over the generated kernels) in a jitted training step.

    python examples/jax_user_op.py --epochs 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout: import codegen from it

import codegen  # noqa: E402


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-dir", default=str(HERE / "build"), help="where the generated modules go")
    args = p.parse_args(argv)

    squareplus = codegen.build(HERE / "specs" / "squareplus.toml", args.build_dir).op(b=4.0).jax()
    poly1 = codegen.build(HERE / "specs" / "poly1_cross_entropy.toml", args.build_dir).op(eps=1.0).jax()

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=args.seed, stratify=y)
    x_train, x_test = (jnp.asarray(a, jnp.float32) for a in (x_train, x_test))
    onehot = jax.nn.one_hot(y_train, 10)

    def model(params, x):
        return squareplus(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

    def loss(params, x, target):
        return poly1(model(params, x), target)

    k1, k2 = jax.random.split(jax.random.PRNGKey(args.seed))
    params = {"w1": jax.random.normal(k1, (64, 64)) / 8.0, "b1": jnp.zeros(64),
              "w2": jax.random.normal(k2, (64, 10)) / 8.0, "b2": jnp.zeros(10)}
    velocity = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def step(params, velocity, x, target):  # SGD with momentum
        value, grads = jax.value_and_grad(loss)(params, x, target)
        velocity = jax.tree.map(lambda v, g: 0.9 * v + g, velocity, grads)
        return jax.tree.map(lambda p, v: p - 0.05 * v, params, velocity), velocity, value

    rng = np.random.default_rng(args.seed)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        total = 0.0
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):  # whole batches: one compile
            batch = order[start:start + args.batch_size]
            params, velocity, value = step(params, velocity, x_train[batch], onehot[batch])
            total += float(value) * len(batch)
        accuracy = float((jnp.argmax(model(params, x_test), axis=1) == y_test).mean())
        print("epoch %2d  loss %.4f  test accuracy %.3f" % (epoch, total / len(order), accuracy))
    return accuracy


if __name__ == "__main__":
    main()
