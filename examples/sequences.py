"""Sequence data for the transformer examples: integer tokens in, a class per position out.

Two datasets, both available offline and deterministic:

* ``chars``: a character-level language model's data, Python standard library source
  read from the running interpreter's own ``Lib/`` directory (a fixed list of modules,
  concatenated, the first ``CHAR_BUDGET`` characters), encoded over a fixed vocabulary of
  96 characters (newline and printable ASCII; anything else reads as ``?``). Samples are
  windows of ``CHAR_T + 1`` characters: the tokens are the first ``CHAR_T``, the targets
  the next character at each position. The last tenth of the text is the validation
  split. :func:`bigram_bits` is the baseline a language model must beat: the validation
  text's bits per character under the training text's character bigram (add-one
  smoothing), on the same (previous, next) pairs the model is scored on.
* ``sort``: ``SORT_N`` random digits followed by the same digits sorted; the tokens are
  the sequence but its last token, the targets the sequence shifted by one (next-token
  prediction, as a decoder-only model is trained). The digits' own next tokens are
  random and count in the loss only as a floor; a sample is sorted correctly when the
  predictions at the last ``SORT_N`` positions are the sorted digits. With a causal
  model that is exactly greedy decoding: each of those predictions sees the true
  earlier outputs, which greedy decoding reproduces as long as every one is right.

:func:`split` gives a :class:`trainer.Split` whose ``x_*`` are integer token arrays
(N, T) and ``y_*`` integer targets (N, T); the training loop feeds the tokens to the
model's named input (``{"tokens": x}``) and scores with :func:`metrics`.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------ characters

# newline, then printable ASCII (space .. ~): 96 symbols; the model's V
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = VOCAB.index("?")
CHAR_T = 32  # positions per window (the model's input shape)
CHAR_BUDGET = 300_000  # characters of source read
VALIDATION = 0.1  # the last tenth is the validation split
# standard library modules present in every CPython 3.10+ (read in this order)
STDLIB_FILES = (
    "argparse.py", "dataclasses.py", "difflib.py", "enum.py", "functools.py",
    "inspect.py", "random.py", "statistics.py", "textwrap.py", "calendar.py",
)  # fmt: skip


def stdlib_text(budget: int = CHAR_BUDGET) -> str:
    """The first ``budget`` characters of the concatenated ``STDLIB_FILES`` of the running
    interpreter (its version decides the text; the file list and budget are fixed)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for name in STDLIB_FILES:
        text = (root / name).read_text(encoding="utf-8")
        parts.append(text)
        size += len(text)
        if size >= budget:
            break
    text = "".join(parts)[:budget]
    if len(text) < budget:
        raise RuntimeError(f"the standard library files {STDLIB_FILES} hold {len(text)} characters, fewer than {budget}")
    return text


def encode(text: str) -> np.ndarray:
    """Characters as indices into ``VOCAB`` (int64); anything outside it as ``?``."""
    table = np.full(0x110000 if any(ord(c) > 0xFFFF for c in text) else 0x10000, UNKNOWN, np.int64)
    table[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))
    return table[np.frombuffer(text.encode("utf-32-le"), np.uint32)]


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def _windows(ids: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of T + 1 tokens: (tokens, next tokens), each (N, T)."""
    n = (len(ids) - 1) // T
    x = ids[: n * T].reshape(n, T)
    y = ids[1 : n * T + 1].reshape(n, T)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def char_data(budget: int = CHAR_BUDGET, T: int = CHAR_T):
    """(x_train, y_train, x_val, y_val): windows of the stdlib text's two splits."""
    ids = encode(stdlib_text(budget))
    cut = int(len(ids) * (1 - VALIDATION))
    return (*_windows(ids[:cut], T), *_windows(ids[cut:], T))


def bigram_bits(x_train, y_train, x_val, y_val, V: int = len(VOCAB)) -> float:
    """Bits per character of the validation targets under the character bigram of the
    training windows (each target given the token before it; add-one smoothing)."""
    counts = np.ones((V, V))
    np.add.at(counts, (x_train.reshape(-1), y_train.reshape(-1)), 1.0)
    logp = np.log2(counts / counts.sum(axis=1, keepdims=True))
    return float(-np.mean(logp[x_val.reshape(-1), y_val.reshape(-1)]))


def sample(model, params, prompt: str, length: int = 200, seed: int = 0, temperature: float = 0.8) -> str:
    """``length`` characters drawn from the model after ``prompt`` (seeded sampling at
    ``temperature``), each from its prediction at the last position of the window of
    the last T characters (the prompt is padded in front with spaces to T)."""
    (T,), _ = model.INPUTS["tokens"]
    rng = np.random.default_rng(seed)
    ids = list(encode(prompt.rjust(T)))
    out = []
    for _ in range(length):
        logp = model.forward(params, {"tokens": np.asarray([ids[-T:]], np.int64)})[0, -1].astype(np.float64)
        p = np.exp((logp - logp.max()) / temperature)
        nxt = int(rng.choice(len(p), p=p / p.sum()))
        ids.append(nxt)
        out.append(VOCAB[nxt])
    return "".join(out)


# ----------------------------------------------------------------------------- sort

SORT_N = 6  # digits per sequence
SORT_TRAIN, SORT_TEST = 10_000, 2_000


def sort_data(n: int = SORT_N, train: int = SORT_TRAIN, test: int = SORT_TEST, seed: int = 1234):
    """(x_train, y_train, x_test, y_test): digits then the digits sorted, as next-token
    pairs of length 2n - 1. Test sequences are drawn apart from the training ones (none
    of them is among the training digits)."""
    rng = np.random.default_rng(seed)
    digits = rng.integers(0, 10, size=(4 * (train + test), n))
    _, first = np.unique(digits, axis=0, return_index=True)
    digits = digits[np.sort(first)]  # distinct sequences, in the order drawn
    if len(digits) < train + test:
        raise RuntimeError("too few distinct digit sequences for the split")
    digits = digits[: train + test]
    seq = np.concatenate([digits, np.sort(digits, axis=1)], axis=1)
    x, y = np.ascontiguousarray(seq[:, :-1]), np.ascontiguousarray(seq[:, 1:])
    return x[:train], y[:train], x[train:], y[train:]


def sorted_correctly(pred, y, n: int = SORT_N) -> np.ndarray:
    """Per sample: whether the predictions at the last n positions are the sorted digits."""
    return np.all(pred[:, -n:] == y[:, -n:], axis=1)


# -------------------------------------------------------------------------- metrics


def metrics(dataset: str, model, params, x, y) -> dict:
    """The test metrics of a sequence dataset: the loss (nats per position) and
    ``test_accuracy`` (sort: whole sequences sorted correctly; chars: next character
    right), and for chars the bits per character."""
    feed = {"tokens": x}
    out = {"test_loss": float(model.loss(params, feed, y))}
    pred = model.predict(params, feed)
    if dataset == "sort":
        out["test_accuracy"] = float(np.mean(sorted_correctly(pred, y)))
    else:
        out["test_accuracy"] = float(np.mean(pred == y))
        out["test_bits_per_char"] = out["test_loss"] / math.log(2)
    return out
