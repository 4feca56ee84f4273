"""Parallel sweeps: does dividing torch threads among joblib workers pay off?

Runs the same 4-job sweep (MNIST-1D MLP, dropout) three ways, interleaved, and reports wall time
as a ratio against the sequential sweep measured in the same run (docs/speed.md):

  sequential      basic launcher, one job at a time, threads=auto (all cores)
  joblib auto     hydra/launcher=joblib n_jobs=<cores>, threads=auto (= cores / n_jobs each)
  joblib all      hydra/launcher=joblib n_jobs=<cores>, threads=<cores> each (oversubscribed)

    python scripts/bench_sweep.py [--repeats 2] [--epochs 15] [--out results/bench]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from bench import BUSY, LOAD, REPO, cpu_model, dropbench_command, interleave, med, subprocess_env
from rich.console import Console
from rich.table import Table

from dropbench.results import write_csv


def sweep(extra: list[str], epochs: int, workdir: str) -> None:
    command = [*dropbench_command(), "train", "-m", "regularizer=dropout", "seed=0,1,2,3", f"epochs={epochs}",
               "force=true", "progress=false", f"results_dir={workdir}", f"hydra.sweep.dir={workdir}/sweep", *extra]
    subprocess.run(command, check=True, capture_output=True, env=subprocess_env())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default=str(REPO / "results" / "bench"), help="directory for parallel_sweep.csv")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    variants = {
        "sequential": [],
        "joblib, threads=auto": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={cores}"],
        f"joblib, threads={cores} each": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={cores}",
                                          f"threads={cores}"],
    }
    with tempfile.TemporaryDirectory() as workdir:
        sweep([], 1, workdir)  # warm the MNIST-1D cache and the page cache
        times = interleave({name: partial(sweep, extra, args.epochs, workdir) for name, extra in variants.items()},
                           args.repeats)

    base, cpu = med(times["sequential"]), cpu_model()
    rows = [{"variant": name, "cores": cores, "jobs": 4, "epochs": args.epochs, "median_seconds": round(med(t), 3),
             "ratio_vs_sequential": round(med(t) / base, 3), "all_seconds": " ".join(f"{x:.2f}" for x in t),
             "device": cpu} for name, t in times.items()]
    table = Table(title=f"4-job sweep on {cores} cores of {cpu} (median of {args.repeats})")
    for column in ("variant", "median_seconds", "ratio_vs_sequential"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["variant"], f"{row['median_seconds']:.2f}", f"{row['ratio_vs_sequential']:.2f}")
    console = Console()
    console.print(table)
    if LOAD.mean is not None and LOAD.mean > BUSY:
        console.print(f"[yellow]warning: other processes used {LOAD.mean:.2f} cores on average while timing; "
                      "the figures are not reliable[/]")
    write_csv(Path(args.out) / "parallel_sweep.csv", rows, list(rows[0]))


if __name__ == "__main__":
    sys.exit(main())
