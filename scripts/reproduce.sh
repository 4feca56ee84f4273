#!/usr/bin/env bash
# Re-create every committed report under results/reports/ from scratch with dropbench itself.
#
#   bash scripts/reproduce.sh [NAME ...]      NAME: mnist1d_baselines d2l_dropout ablation_all ablation_cnn p_sweep
#
# Each experiment trains into results/sweeps/NAME (finished jobs are skipped on a re-run), then
# `dropbench report` writes results/reports/NAME/ and copies the runs it read into
# results/reports/NAME/runs/ so the report can be checked and re-rendered without training.
# Jobs run two at a time with one torch thread each (joblib launcher); about 45 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(mnist1d_baselines d2l_dropout ablation_all ablation_cnn p_sweep)
parallel=(hydra/launcher=joblib hydra.launcher.n_jobs=2)

for name in "${names[@]}"; do
  case "$name" in
    # d2l's FashionMNIST setup, run on the offline MNIST-1D data, with and without its dropout
    d2l_dropout) dropbench train -m experiment=d2l_dropout dataset=mnist1d regularizer=none,dropout \
                   parallel_seeds=3 hydra.sweep.dir=results/sweeps/d2l_dropout "${parallel[@]}" ;;
    # the p sweep plus its `none` baseline (the ablation's, copied if it already ran)
    p_sweep) dropbench train experiment=p_sweep "${parallel[@]}"
             dropbench train experiment=ablation_all hydra.sweeper.params.regularizer=none \
               hydra.sweep.dir=results/sweeps/p_sweep ;;
    *) dropbench train experiment="$name" "${parallel[@]}" ;;
  esac
  rm -rf "results/reports/$name"
  dropbench report "results/sweeps/$name" --out "results/reports/$name"
  # keep the runs' CSVs and configs beside the report (no checkpoints)
  (cd "results/sweeps/$name" && find . \( -name summary.csv -o -name metrics.csv -o -name config.yaml \) \
      -not -path './report/*' -print0 | xargs -0 -I{} install -D -m 644 {} "../../reports/$name/runs/{}")
done
