"""Parallel sweeps: does dividing torch threads among joblib workers pay off?

Runs the same 4-job sweep (MNIST-1D MLP, dropout) three ways, interleaved, and reports wall time
as a ratio against the sequential sweep measured in the same run:

  sequential      basic launcher, one job at a time, threads=auto (all cores)
  joblib auto     hydra/launcher=joblib n_jobs=<cores>, threads=auto (= cores / n_jobs each)
  joblib all      hydra/launcher=joblib n_jobs=<cores>, threads=<cores> each (oversubscribed)

    python scripts/bench_sweep.py [--repeats 2] [--epochs 15]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def sweep_seconds(extra: list[str], epochs: int, workdir: str) -> float:
    cmd = [sys.executable, "-m", "dropbench.cli", "train", "-m", "regularizer=dropout", "seed=0,1,2,3",
           f"epochs={epochs}", "force=true", f"results_dir={workdir}", f"hydra.sweep.dir={workdir}/sweep", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    variants = {
        "sequential": [],
        "joblib, threads=auto": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={cores}"],
        f"joblib, threads={cores} each": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={cores}",
                                          f"threads={cores}"],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as workdir:
        sweep_seconds([], 1, workdir)  # warm the MNIST-1D cache and the page cache
        for _ in range(args.repeats):
            for name, extra in variants.items():  # interleaved: machine drift hits every variant
                times[name].append(sweep_seconds(extra, args.epochs, workdir))

    base = statistics.median(times["sequential"])
    rows = [{"variant": name, "cores": cores, "jobs": 4, "epochs": args.epochs,
             "median_seconds": round(statistics.median(t), 3), "ratio_vs_sequential": round(statistics.median(t) / base, 3),
             "all_seconds": " ".join(f"{x:.2f}" for x in t)} for name, t in times.items()]
    table = Table(title=f"4-job sweep on {cores} cores (median of {args.repeats})")
    for column in ("variant", "median_seconds", "ratio_vs_sequential"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["variant"], f"{row['median_seconds']:.2f}", f"{row['ratio_vs_sequential']:.2f}")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".parallel_sweep.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "parallel_sweep.csv")


if __name__ == "__main__":
    main()
