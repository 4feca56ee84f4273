#!/usr/bin/env bash
# Re-create every committed report under results/reports/ from scratch with dropbench itself.
#
#   bash scripts/reproduce.sh [NAME ...]      NAME: mnist1d_baselines d2l_dropout ablation_all ablation_cnn p_sweep
#                                                   tuned_mlp tuned_cnn tuned_both
#
# Each experiment trains into results/sweeps/NAME (finished jobs are skipped on a re-run), then
# `dropbench report` writes results/reports/NAME/ and copies the runs it read into
# results/reports/NAME/runs/ so the report can be checked and re-rendered without training.
# tuned_mlp and tuned_cnn run scripts/tune.sh (docs/tuning.md) for the MLP and the CNN: the
# selection report goes to results/reports/NAME/select (its runs' summaries and configs only: the
# learning curves of a few hundred runs are left out), the confirmation on fresh seeds to
# results/reports/NAME/confirm (with every curve). tuned_both reports both confirmations together
# (the interquartile mean across the two tasks); it reads the runs the other two committed.
# Jobs run two at a time with one torch thread each (joblib launcher): the first five reports take
# about 45 minutes on 2 cores, each tuned one a few hours (docs/tuning.md says how long).
set -euo pipefail
cd "$(dirname "$0")/.."

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(mnist1d_baselines d2l_dropout ablation_all ablation_cnn p_sweep tuned_mlp tuned_cnn tuned_both)
parallel=(hydra/launcher=joblib hydra.launcher.n_jobs=2)

copy_runs() {  # copy_runs SWEEP_DIR REPORT_DIR FILE...: the runs' files (no checkpoints) beside a report
  local sweep=$1 report=$2; shift 2
  local patterns=(); for f in "$@"; do patterns+=(-o -name "$f"); done
  (cd "$sweep" && find . \( "${patterns[@]:1}" \) -not -path './report/*' -print0 |
     xargs -0 -I{} install -D -m 644 {} "$report/runs/{}")
}

for name in "${names[@]}"; do
  case "$name" in
    tuned_mlp|tuned_cnn)
      # the CNN has no hidden Linear layer for DropConnect and Standout to act on
      cnn_methods="none dropout dropout_scaled rdrop multisample gaussian l1 l2 maxnorm batchnorm mc_dropout dropout_maxnorm"
      tuned=(); [ "$name" = tuned_mlp ] || tuned=(--methods "$cnn_methods" model=cnn)
      bash scripts/tune.sh --results "results/sweeps/$name" --jobs 2 ${tuned[@]+"${tuned[@]}"}
      rm -rf "results/reports/$name"
      mkdir -p "results/reports/$name"
      cp -r "results/sweeps/$name/reports/tune" "results/reports/$name/select"
      cp -r "results/sweeps/$name/reports/tune_confirm" "results/reports/$name/confirm"
      copy_runs "results/sweeps/$name/sweeps/tune" "$PWD/results/reports/$name/select" summary.csv config.yaml \
        overrides.yaml
      copy_runs "results/sweeps/$name/sweeps/tune_confirm" "$PWD/results/reports/$name/confirm" summary.csv \
        metrics.csv config.yaml overrides.yaml
      continue ;;
    tuned_both)
      rm -rf results/reports/tuned_both
      dropbench report results/reports/tuned_mlp/confirm/runs results/reports/tuned_cnn/confirm/runs \
        --out results/reports/tuned_both
      continue ;;
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
  copy_runs "results/sweeps/$name" "$PWD/results/reports/$name" summary.csv metrics.csv config.yaml
done
