#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, for a machine where dropbench is installed:
# tests/test_cuda.py, then the benchmark's GPU-side sections (gpu, fold, jobs).
#
#   bash scripts/gpu_checks.sh [OUT] [PARTS]   # OUT: default results/bench/gpu
#
# PARTS is a comma-separated subset of tests,gpu,fold,jobs (default: all four), so that the checks
# can be split over several commands where one command may only run for so long; each part
# prints its wall time. The tests' log goes to OUT/test_cuda.txt, the benchmark's CSVs and log to
# OUT/bench-SECTIONS (OUT/bench-gpu-fold-jobs for all), so that split runs keep every summary. It imports the installed dropbench (python -P: not the checkout's folder).
# A failing test does not stop the benchmark; the exit status is the tests' or else the benchmark's.
set -uo pipefail
out=${1:-results/bench/gpu}
parts=${2:-tests,gpu,fold,jobs}
for part in ${parts//,/ }; do
  case $part in tests|gpu|fold|jobs) ;; *) echo "gpu_checks.sh: unknown part '$part'; choose from tests,gpu,fold,jobs" >&2; exit 2 ;; esac
done
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { echo "gpu_checks.sh: python3 finds no PyTorch with a CUDA GPU here" >&2; exit 2; }
mkdir -p "$out"
tests=0 bench=0
if [[ ",$parts," == *,tests,* ]]; then
  start=$SECONDS
  python3 -P -m pytest -q -o addopts="" -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
  tests=${PIPESTATUS[0]}
  echo "gpu_checks.sh: tests took $((SECONDS - start)) s"
fi
sections=$(echo ",$parts," | sed 's/,tests,/,/; s/^,//; s/,$//')
if [ -n "$sections" ]; then
  start=$SECONDS
  dir="$out/bench-${sections//,/-}"
  mkdir -p "$dir"
  python3 -P scripts/bench.py --sections "$sections" --out "$dir" 2>&1 | tee "$dir/bench.txt"
  bench=${PIPESTATUS[0]}
  echo "gpu_checks.sh: bench sections $sections took $((SECONDS - start)) s"
fi
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"
