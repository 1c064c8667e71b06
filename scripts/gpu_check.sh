#!/usr/bin/env bash
# The checks that need a real CUDA GPU, as short commands for a lent machine
# (the device tool allows 600 s a command, so run it in two halves:
#   run(command="bash scripts/gpu_check.sh tests bench", timeout_s=540)
#   run(command="bash scripts/gpu_check.sh train step", timeout_s=540)):
#   versions  the GPU, its driver, Python, NumPy, Numba, numba-cuda, PyTorch (always);
#   tests     tests/test_cuda.py and tests/test_model_cuda.py on the device
#             (SYMGRAD_REAL_GPU=1): every op's CUDA kernels against its CPU kernels,
#             the `gpu` tests' shapes that span many blocks, each model's CUDA step
#             against its CPU step (the fused-step variants, a two-input model with
#             int64 token ids), no device allocation in a step after its first, the
#             trainer's per-epoch loss read;
#   bench     benchmarks/bench_cuda.py: the generated CUDA kernels against PyTorch CUDA;
#   train     examples/train.py --device cuda for mlp_digits and cnn_digits (their
#             example settings; the data set on the device, each batch gathered there
#             by its rows, the epoch's loss summed on the device): test accuracy
#             recorded in $out/train_<model>.json;
#   step      benchmarks/bench_cuda_step.py: the fused CUDA step of the MLP 784-256-128-10
#             (batch 1024 and 8192) and of the digits CNN against PyTorch CUDA eager and
#             torch.compile, each in its own process.
# No stage named: all of them. Each stage has its own time limit so that a hang in one
# still leaves the others' results. Output goes to $OUT (the device tool's folder) or
# ./gpu_out. Figures come only from a real device (the benchmarks refuse the simulator).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench train step)
for s in "${stages[@]}"; do
  case "$s" in tests|bench|train|step) ;; *) echo "unknown stage $s (tests, bench, train, step)" >&2; exit 2;; esac
done
wants() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
status=0
summary=()

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" - <<'PY'
import platform, numpy, numba, torch
from importlib.metadata import version
print(f"Python {platform.python_version()}, NumPy {numpy.__version__}, numba {numba.__version__}, "
      f"numba-cuda {version('numba-cuda')}, torch {torch.__version__} (CUDA {torch.cuda.is_available()})")
PY
} 2>&1 | tee "$out/versions.txt"

if wants tests; then
  SYMGRAD_REAL_GPU=1 timeout 330 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_model_cuda.py "tests/test_interop_torch.py::test_cuda_tensors" 2>&1 | tee "$out/test_cuda.log"
  rc=${PIPESTATUS[0]}; summary+=("tests exit $rc"); [ "$rc" = 0 ] || status=1
fi
if wants bench; then
  timeout 150 "$PY" benchmarks/bench_cuda.py --rounds 3 2>&1 | tee "$out/bench_cuda.md"
  rc=${PIPESTATUS[0]}; summary+=("bench_cuda exit $rc"); [ "$rc" = 0 ] || status=1
fi
if wants train; then
  for model in mlp_digits cnn_digits; do
    timeout 150 "$PY" examples/train.py --model "$model" --device cuda --out "$out/run_$model" --no-progress 2>&1 | tee "$out/train_$model.log"
    rc=${PIPESTATUS[0]}; summary+=("train $model (cuda) exit $rc"); [ "$rc" = 0 ] || status=1
    if [ -f "$out/run_$model/metrics.json" ]; then
      "$PY" - "$out/run_$model/metrics.json" "$out/train_$model.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
keep = {k: m.get(k) for k in ("model", "dataset", "epochs", "test_accuracy", "test_loss", "seconds_per_epoch")}
keep["device"] = m["config"].get("device")
json.dump(keep, open(sys.argv[2], "w"), indent=2)
print("recorded:", json.dumps(keep))
PY
    fi
  done
fi
if wants step; then
  timeout 300 "$PY" benchmarks/bench_cuda_step.py --rounds 1 2>&1 | tee "$out/bench_cuda_step.md"
  rc=${PIPESTATUS[0]}; summary+=("bench_cuda_step exit $rc"); [ "$rc" = 0 ] || status=1
fi
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $status
