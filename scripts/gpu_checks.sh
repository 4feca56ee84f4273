#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, for a machine where dropbench is installed:
# tests/test_cuda.py, then the benchmark's GPU-side sections (gpu, fold, jobs).
#
#   bash scripts/gpu_checks.sh [OUT]      # OUT (default results/bench/gpu) gets the CSVs and both logs
#
# It imports the installed dropbench (python -P: not the checkout's folder). A failing test does
# not stop the benchmark; the exit status is the tests' or else the benchmark's.
set -uo pipefail
out=${1:-results/bench/gpu}
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { echo "gpu_checks.sh: python3 finds no PyTorch with a CUDA GPU here" >&2; exit 2; }
mkdir -p "$out"
python3 -P -m pytest -q -o addopts="" -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
tests=${PIPESTATUS[0]}
python3 -P scripts/bench.py --sections gpu,fold,jobs --out "$out" 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"
