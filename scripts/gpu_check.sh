#!/usr/bin/env bash
# The checks that need a real CUDA GPU, as one short command for a lent machine
# (the device tool: run(command="bash scripts/gpu_check.sh", timeout_s=540)):
#   1. versions: the GPU, its driver, Python, NumPy, Numba, numba-cuda, PyTorch;
#   2. tests/test_cuda.py on the device (SYMGRAD_REAL_GPU=1): every op's CUDA kernels
#      against its CPU kernels, plus the `gpu` tests' shapes that span many blocks;
#   3. benchmarks/bench_cuda.py: the generated CUDA kernels against PyTorch CUDA.
# Each step has its own time limit so that a hang in one still leaves the others'
# results. Output goes to $OUT (the device tool's folder) or ./gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" - <<'PY'
import platform, numpy, numba, torch
from importlib.metadata import version
print(f"Python {platform.python_version()}, NumPy {numpy.__version__}, numba {numba.__version__}, "
      f"numba-cuda {version('numba-cuda')}, torch {torch.__version__} (CUDA {torch.cuda.is_available()})")
PY
} 2>&1 | tee "$out/versions.txt"

SYMGRAD_REAL_GPU=1 timeout 330 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
timeout 150 "$PY" benchmarks/bench_cuda.py --rounds 3 2>&1 | tee "$out/bench_cuda.md"
bench=${PIPESTATUS[0]}
echo "test_cuda exit $tests, bench_cuda exit $bench" | tee "$out/summary.txt"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
