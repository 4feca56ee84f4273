#!/usr/bin/env bash
# The tuned comparison of docs/tuning.md: every method at its own grid, selected on validation
# accuracy, then the selections measured again on fresh seeds.
#
#   bash scripts/tune.sh [--results DIR] [--methods "none dropout ..."] [--stage select|confirm|all] [--jobs N]
#                        [--fold] [OVERRIDE ...]
#
# select   each method's grid (conf/experiment/tune/METHOD.yaml: ablation_all's training, seeds 0-2)
#          trains into DIR/sweeps/tune, then `dropbench report` writes DIR/reports/tune, whose
#          tuned.csv names each method's setting with the best mean validation accuracy.
# confirm  each setting in that tuned.csv (the `none` baseline included) trains again on the fresh
#          seeds 100-104 into DIR/sweeps/tune_confirm; `dropbench report` writes DIR/reports/tune_confirm.
#          Selection and estimate thus use different seeds: the confirm numbers carry no selection bias.
#
# DIR defaults to results. Methods default to every file in conf/experiment/tune. --jobs N trains N
# jobs at a time in both stages (select: Hydra's joblib launcher; confirm: N processes), each with
# its share of the cores as torch threads. --fold trains each method's grid as one folded run
# (hydra/launcher=fold: its settings x seeds as the replicas of one run), one method at a time; --jobs
# then applies to the confirmation stage. OVERRIDEs go to every training command (a later one wins,
# e.g. threads=2). Finished jobs are skipped on a re-run, so an interrupted call can simply be repeated.
set -euo pipefail

grids="$(cd "$(dirname "$0")/../conf/experiment/tune" && pwd)"
results=results
methods=$(cd "$grids" && ls -- *.yaml | grep -v '^_' | sed 's/\.yaml$//' | tr '\n' ' ')
stage=all
confirm_seed=100  # seeds confirm_seed ... confirm_seed + confirm_seeds - 1, none of them used by select
confirm_seeds=5
jobs=1
fold=0

while [ $# -gt 0 ]; do
  case "$1" in
    --results) results=$2; shift 2 ;;
    --methods) methods=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --fold) fold=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    --*) echo "tune.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
case "$stage" in select|confirm|all) ;; *) echo "tune.sh: --stage $stage; choose select, confirm or all" >&2; exit 2 ;; esac
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "tune.sh: --jobs $jobs; give a positive number of jobs" >&2; exit 2; }
for method in $methods; do
  [ -f "$grids/$method.yaml" ] || { echo "tune.sh: no grid conf/experiment/tune/$method.yaml" >&2; exit 2; }
done

select_dir="$results/sweeps/tune"
cores=$(nproc 2>/dev/null || echo 1)
threads=$(( cores / jobs > 0 ? cores / jobs : 1 ))
launcher=(); [ "$jobs" -eq 1 ] || launcher=(hydra/launcher=joblib "hydra.launcher.n_jobs=$jobs")
[ "$fold" -eq 0 ] || launcher=(hydra/launcher=fold)
tuned="$results/reports/tune/tuned.csv"

if [ "$stage" != confirm ]; then
  for method in $methods; do
    dropbench train -m "experiment=tune/$method" "results_dir=$results" "hydra.sweep.dir=$select_dir" \
      ${launcher[@]+"${launcher[@]}"} "$@"
  done
  dropbench report "$select_dir" --out "$results/reports/tune"
fi

if [ "$stage" != select ]; then
  [ -f "$tuned" ] || { echo "tune.sh: $tuned not found; run --stage select first (it needs a method with" \
                            "several settings)" >&2; exit 1; }
  # Each selected group's job overrides (from the job's .hydra/overrides.yaml), one shell-quoted line per
  # method; the seeds and the results folder are left out: replaced by the fresh seeds and this call's folder.
  selected=$(python - "$tuned" "$select_dir" <<'EOF'
import csv
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dropbench.results import files_named, read_summary

tuned, sweep = Path(sys.argv[1]), Path(sys.argv[2])
overrides = {}  # group_key -> the overrides of a job that trained it
for path in files_named(sweep, "summary.csv"):
    row = read_summary(path)
    job = next((d for d in (path.parent, path.parent.parent) if (d / ".hydra" / "overrides.yaml").is_file()), None)
    if row and job:
        overrides.setdefault(row["group_key"], list(OmegaConf.load(job / ".hydra" / "overrides.yaml")))
with open(tuned, newline="") as f:
    for row in csv.DictReader(f):
        if not row["group_key"]:
            print(f"tune.sh: {row['method']}: {row['note']}; not re-run", file=sys.stderr)
        elif row["group_key"] not in overrides:
            sys.exit(f"tune.sh: no job folder with overrides for {row['label']} under {sweep}")
        else:
            replaced = ("seed", "parallel_seeds", "results_dir")  # fresh seeds; this call's results folder
            kept = [o for o in overrides[row["group_key"]] if o.split("=")[0].lstrip("+~") not in replaced]
            print(shlex.join(kept))
EOF
  )
  running=0 failed=0
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    eval "job=($line)"
    if [ "$running" -ge "$jobs" ]; then  # wait for one of the N running trainings to end
      wait -n || failed=$((failed + 1))
      running=$((running - 1))
    fi
    dropbench train -m "${job[@]}" "seed=$confirm_seed" "parallel_seeds=$confirm_seeds" "results_dir=$results" \
      "threads=$threads" "hydra.sweep.dir=$results/sweeps/tune_confirm" "$@" &
    running=$((running + 1))
  done <<< "$selected"
  for _ in $(seq "$running"); do wait -n || failed=$((failed + 1)); done
  [ "$failed" -eq 0 ] || { echo "tune.sh: $failed confirmation training(s) failed (see above); not reported" >&2
                           exit 1; }
  dropbench report "$results/sweeps/tune_confirm" --out "$results/reports/tune_confirm"
fi
