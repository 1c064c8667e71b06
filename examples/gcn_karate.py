"""Semi-supervised node classification with a graph convolutional network (Kipf &
Welling, 2017) on Zachary's karate club, with the generated model module
``generated.models.gcn_karate`` (specs/models/gcn_karate.toml).

    python examples/gcn_karate.py                     # one labelled member per club
    python examples/gcn_karate.py --per-class 3 --seeds 20 --out runs/gcn_karate

The club (networkx's copy of Zachary's 1977 data: 34 members, 78 friendships) split in
two after a dispute between the instructor (member 0, "Mr. Hi") and the administrator
(member 33, "Officer"); each member's side is the label. The network sees the whole
graph, as the normalised adjacency D^-1/2 (A + I) D^-1/2 (the model's input ``adj``, one
row per member) and featureless members (``feats``: the identity), but the labels of
only ``--per-class`` members per side: the two leaders, and others drawn at random (by
``--split-seed``) when more than one. The loss sums the cross-entropy over the labelled
members (every other member's target row is zero), trained full batch with Adam for
``--steps`` steps; the accuracy is measured on the unlabelled members. ``--seeds N``
trains from N initialisations (seeds 0..N-1) and reports each one's accuracy; the first
one's curves go to OUT/training.png and its predictions to OUT/graph.png, and
everything to OUT/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import trainer

LEADERS = (0, 33)  # the instructor (Mr. Hi) and the administrator (Officer)


def karate():
    """(normalised adjacency (34, 34), labels (34,): 0 Mr. Hi's side, 1 the Officer's, the graph)."""
    import networkx as nx

    graph = nx.karate_club_graph()
    a = nx.to_numpy_array(graph, nodelist=range(graph.number_of_nodes()), weight=None) + np.eye(graph.number_of_nodes())
    d = 1.0 / np.sqrt(a.sum(axis=1))
    labels = np.array([0 if graph.nodes[n]["club"] == "Mr. Hi" else 1 for n in range(graph.number_of_nodes())])
    return d[:, None] * a * d[None, :], labels, graph


def labelled_nodes(labels: np.ndarray, per_class: int, split_seed: int) -> np.ndarray:
    """The leaders, and ``per_class - 1`` more members of each side drawn at random."""
    rng = np.random.default_rng(split_seed)
    chosen = list(LEADERS)
    for c, leader in enumerate(LEADERS):
        others = [n for n in np.flatnonzero(labels == c) if n != leader]
        chosen += list(rng.choice(others, size=per_class - 1, replace=False))
    return np.array(sorted(int(n) for n in chosen))


def train_once(model, x, labels, labelled, steps: int, seed: int, lr: float | None) -> dict:
    """Train from ``model.init(seed)``; the history (per step: the loss per labelled member,
    the loss and the accuracy on the unlabelled ones) and the final predictions."""
    n = len(labels)
    unlabelled = np.setdiff1d(np.arange(n), labelled)
    onehot = np.eye(2)[labels]
    y_train = np.zeros_like(onehot)
    y_train[labelled] = onehot[labelled]
    y_test = np.zeros_like(onehot)
    y_test[unlabelled] = onehot[unlabelled]
    params = model.init(seed, dtype=np.float64)
    state = model.init_state(params)
    hyper = {} if lr is None else {"lr": lr}
    history = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = float(model.train_step(params, state, x, y_train, **hyper))
        pred = model.predict(params, x)
        history.append({
            "epoch": step,
            "loss": loss / len(labelled),
            "test_loss": float(model.loss(params, x, y_test)) / len(unlabelled),
            "test_accuracy": float(np.mean(pred[unlabelled] == labels[unlabelled])),
        })
    return {"history": history, "predictions": pred, "seconds": time.perf_counter() - t0, "params": params}


def draw(graph, labels, pred, labelled, path, title: str) -> None:
    """The club with each member coloured by its predicted side; labelled members as
    squares, wrong predictions ringed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    pos = nx.spring_layout(graph, seed=3)
    fig, ax = plt.subplots(figsize=(6, 5))
    nx.draw_networkx_edges(graph, pos, ax=ax, alpha=0.3)
    colours = np.array(["C0", "C1"])
    unl = [n for n in graph if n not in set(labelled)]
    wrong = [n for n in unl if pred[n] != labels[n]]
    nx.draw_networkx_nodes(graph, pos, nodelist=unl, node_color=list(colours[pred[unl]]), node_size=220, ax=ax)
    nx.draw_networkx_nodes(graph, pos, nodelist=list(labelled), node_color=list(colours[labels[labelled]]),
                           node_shape="s", node_size=320, edgecolors="black", linewidths=1.5, ax=ax)
    if wrong:
        nx.draw_networkx_nodes(graph, pos, nodelist=wrong, node_color="none", node_size=420, edgecolors="red",
                               linewidths=2, ax=ax)
    nx.draw_networkx_labels(graph, pos, font_size=7, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    try:
        with trainer.atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python examples/gcn_karate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=1, help="labelled members per side (default 1: the two leaders)")
    p.add_argument("--split-seed", type=int, default=0, help="which members are labelled beyond the leaders")
    p.add_argument("--steps", type=int, default=200, help="full-batch Adam steps (default 200)")
    p.add_argument("--seeds", type=int, default=10, help="initialisations to train, seeds 0..N-1 (default 10)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the spec's)")
    p.add_argument("--out", default="runs/gcn_karate", help="run directory (default runs/gcn_karate)")
    p.add_argument("--no-plot", action="store_true", help="do not write training.png and graph.png")
    a = p.parse_args(argv)
    if not 1 <= a.per_class <= 16 or a.steps < 1 or a.seeds < 1:
        p.error("--per-class must be 1..16, --steps and --seeds at least 1")
    import generated.models.gcn_karate as model

    adj, labels, graph = karate()
    x = {"adj": adj, "feats": np.eye(len(labels))}
    labelled = labelled_nodes(labels, a.per_class, a.split_seed)
    runs = [train_once(model, x, labels, labelled, a.steps, seed, a.lr) for seed in range(a.seeds)]
    accuracies = [r["history"][-1]["test_accuracy"] for r in runs]
    wrong = [[int(n) for n in np.flatnonzero(r["predictions"] != labels)] for r in runs]
    n_unlabelled = len(labels) - len(labelled)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "model": model.NAME,
        "dataset": "karate_club (networkx: Zachary 1977, 34 members, 78 edges, 2 sides)",
        "labelled": [int(n) for n in labelled],
        "unlabelled": n_unlabelled,
        "steps": a.steps,
        "test_accuracy": accuracies[0],
        "test_accuracy_per_seed": accuracies,
        "test_accuracy_mean": float(np.mean(accuracies)),
        "wrong_per_seed": wrong,
        "seconds_per_run": [r["seconds"] for r in runs],
        "history": runs[0]["history"],
    }
    trainer._write_atomic(out / trainer.METRICS, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    if not a.no_plot:
        title = f"gcn_karate: {len(labelled)} labelled members (squares)"
        trainer.plot_history(runs[0]["history"], out / trainer.PLOT, title=title, xlabel="step")
        correct = round(accuracies[0] * n_unlabelled)
        draw(graph, labels, runs[0]["predictions"], labelled, out / "graph.png",
             f"{title}\npredicted sides: {correct} of {n_unlabelled} unlabelled members right (wrong ones ringed in red)")
    print(f"labelled members: {', '.join(str(n) for n in labelled)}; {n_unlabelled} unlabelled")
    for seed, acc, r, w in zip(range(a.seeds), accuracies, runs, wrong):
        print(f"seed {seed:2d}: accuracy on the unlabelled members {acc:.4f} "
              f"({round(acc * n_unlabelled)}/{n_unlabelled}; wrong: {', '.join(map(str, w)) or 'none'}), "
              f"{a.steps} steps in {r['seconds']:.2f} s")
    print(f"test accuracy: {accuracies[0]:.4f} (seed 0); mean over {a.seeds} seeds {np.mean(accuracies):.4f}, "
          f"min {min(accuracies):.4f}, max {max(accuracies):.4f}")
    print(f"metrics and plots in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
