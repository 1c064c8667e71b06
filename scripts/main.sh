#!/usr/bin/env bash
# The main job, from a fresh clone: set up the environment, write the derivations of
# the whole op library, regenerate the kernels from the specs, train the digits MLP
# with the generated modules (prints its test accuracy), then the other examples
# (examples/trainer.py's EXAMPLES: a CNN and a residual CNN on the digits, a
# breast-cancer classifier, a linear regression on diabetes against least squares, a
# GRU on bit sequences, two stacked LSTMs on the temporal order problem, a transformer
# sorting digits and one as a character-level language model on Python standard
# library source), each with its own settings, and a graph convolutional network on
# Zachary's karate club (examples/gcn_karate.py). Everything it trains goes under runs/
# (checkpoints, metrics, the training curves): the tracked files of a fresh clone stay
# as they are (derivations and generated/ are rewritten byte for byte the same;
# docs/figures/ holds committed copies of runs' plots, copied by hand), and the job
# says so at the end.
#
#   bash scripts/main.sh
#
# EPOCHS, BATCH_SIZE and SEED override the digits MLP's settings; EXAMPLES (names,
# space-separated) chooses the other examples to train ("" for none); GCN=0 skips the
# karate-club GCN.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
echo "== installing symgrad (pip install -e .)"
.venv/bin/python -m pip install --quiet -e .
PY=.venv/bin/python

now() { "$PY" -c 'import time; print(time.perf_counter())'; }
elapsed() { "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$(now)"; }

echo "== deriving the op library -> docs/derivations.md, docs/derivations.tex"
t0=$(now)
"$PY" -m derive --all --out docs/derivations.md
"$PY" -m derive --all --out docs/derivations.tex
echo "   derivations written in $(elapsed "$t0")"

echo "== regenerating generated/ from the specs (python -m codegen)"
t0=$(now)
"$PY" -m codegen
echo "   regeneration took $(elapsed "$t0")"

echo "== training the digits MLP with the generated kernels"
t0=$(now)
"$PY" examples/train.py specs/models/mlp_digits.toml \
  --epochs "${EPOCHS:-20}" --batch-size "${BATCH_SIZE:-32}" --seed "${SEED:-0}" \
  --out runs/mlp_digits
echo "   training (with first-call compilation) took $(elapsed "$t0")"

for model in ${EXAMPLES-cnn_digits resnet_digits logreg_breast_cancer linear_diabetes gru_majority lstm_temporal_order transformer_sort transformer_chars}; do
  echo "== training the example $model (python examples/train.py --model $model)"
  t0=$(now)
  "$PY" examples/train.py --model "$model" --seed "${SEED:-0}" --out "runs/$model"
  echo "   training took $(elapsed "$t0")"
done

if [ "${GCN:-1}" != 0 ]; then
  echo "== training the GCN on Zachary's karate club (python examples/gcn_karate.py)"
  t0=$(now)
  "$PY" examples/gcn_karate.py --out runs/gcn_karate
  echo "   training took $(elapsed "$t0")"
fi
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  changed=$(git status --porcelain --untracked-files=no)
  if [ -n "$changed" ]; then
    printf '== tracked files that differ from the commit:\n%s\n' "$changed"
  else
    echo "== tracked files as committed (git status)"
  fi
fi
echo "== done: docs/derivations.md, docs/derivations.tex, runs/*/training.png (the curves), runs/"
