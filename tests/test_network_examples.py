"""The example networks of issue 13 that this file owns, trained with their generated
modules: a residual CNN on the digits (specs/models/resnet_digits.toml, by
examples/trainer.py like the other examples) and a graph convolutional network on
Zachary's karate club (specs/models/gcn_karate.toml, by examples/gcn_karate.py). Their
losses and gradients against PyTorch are in tests/test_model_torch.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
RESNET_DIGITS_ACCURACY = 0.985
GCN_KARATE_ACCURACY = 0.9  # on the 32 unlabelled members, with the two leaders labelled


def _example(name: str):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "examples"))


def test_karate_adjacency_is_the_renormalised_one():
    """D^-1/2 (A + I) D^-1/2: symmetric, with sqrt(degree + 1) as its eigenvector of 1."""
    gcn = _example("gcn_karate")
    adj, labels, graph = gcn.karate()
    assert adj.shape == (34, 34) and graph.number_of_edges() == 78
    np.testing.assert_allclose(adj, adj.T)
    root = np.sqrt(np.array([graph.degree(n) for n in range(34)]) + 1.0)
    np.testing.assert_allclose(adj @ root, root)
    assert np.bincount(labels).tolist() == [17, 17] and labels[0] == 0 and labels[33] == 1
    assert gcn.labelled_nodes(labels, 1, 0).tolist() == [0, 33]
    three = gcn.labelled_nodes(labels, 3, 0)
    assert len(three) == 6 and np.bincount(labels[three]).tolist() == [3, 3]


def test_gcn_classifies_the_unlabelled_members_of_the_karate_club(tmp_path, capsys):
    gcn = _example("gcn_karate")
    assert gcn.main(["--seeds", "1", "--out", str(tmp_path), "--no-plot"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["labelled"] == [0, 33] and metrics["unlabelled"] == 32
    assert metrics["test_accuracy"] >= GCN_KARATE_ACCURACY, metrics["history"][-1]
    assert metrics["history"][-1]["loss"] < 0.05 * metrics["history"][0]["loss"]
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_resnet_digits_reaches_stated_accuracy(tmp_path):
    trainer = _example("trainer")
    example = trainer.EXAMPLES["resnet_digits"]
    config = trainer.Config(spec=str(example.spec), out=str(tmp_path / "run"), dataset=example.dataset,
                            epochs=example.epochs, batch_size=example.batch_size, seed=0, progress=False, plot=False)
    result = trainer.train(config, log=lambda *a: None)
    assert result["test_accuracy"] >= RESNET_DIGITS_ACCURACY, result["history"][-1]
