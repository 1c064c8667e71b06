"""Your own activation and loss, written as math in TOML, inside an ordinary PyTorch model.

    python examples/torch_user_op.py               # digits, 20 epochs, a few seconds
    python examples/torch_user_op.py --epochs 3

The specs (examples/specs/squareplus.toml, examples/specs/poly1_cross_entropy.toml)
state the forward only; ``codegen.build`` derives the gradients with SymPy and generates
Numba kernels into --build-dir. ``op.torch()`` makes each a PyTorch function that
autograd differentiates through the derived backward (a ``torch.library`` custom
operator: it also works under ``torch.compile``). Everything else is plain PyTorch:
``nn.Linear``, ``torch.optim.Adam``, scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout: import codegen from it

import codegen  # noqa: E402


class SquareplusMLP(torch.nn.Module):
    """64 -> hidden -> 10, with the user's activation between two torch layers."""

    def __init__(self, activation, hidden: int = 64):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, 10)
        self.activation = activation

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-dir", default=str(HERE / "build"), help="where the generated modules go")
    args = p.parse_args(argv)

    # 1. the user's specs -> generated modules -> torch functions
    squareplus = codegen.build(HERE / "specs" / "squareplus.toml", args.build_dir).op(b=4.0).torch()
    poly1 = codegen.build(HERE / "specs" / "poly1_cross_entropy.toml", args.build_dir).op(eps=1.0).torch()

    # 2. data: scikit-learn's digits (8x8 images, 10 classes), scaled to [0, 1]
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=args.seed, stratify=y)
    x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
    onehot = torch.nn.functional.one_hot(y_train, 10).float()

    # 3. an ordinary training loop
    torch.manual_seed(args.seed)
    model = SquareplusMLP(squareplus)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train))
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = order[start:start + args.batch_size]
            loss = poly1(model(x_train[batch]), onehot[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        with torch.no_grad():
            accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
        print("epoch %2d  loss %.4f  test accuracy %.3f" % (epoch, total / len(x_train), accuracy))
    return accuracy


if __name__ == "__main__":
    main()
