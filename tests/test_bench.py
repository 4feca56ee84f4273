"""The speed benchmark runs end to end: scripts/bench.py --quick writes a sane summary.csv.

Run: pytest tests/test_bench.py
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import read_csv

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
RATIOS = ["speedup_textbook_over_dropbench", "fraction_of_peak", "parallel_8_over_single",
          "speedup_parallel_over_sequential_8"]


def test_quick_bench_writes_summary(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1", "--sections", "epoch,seeds,startup",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = {row["metric"]: row for row in read_csv(tmp_path / "summary.csv")}
    for metric in RATIOS:
        value = float(summary[metric]["value"])
        assert math.isfinite(value) and value > 0, (metric, value)
    assert float(summary["replica_vs_single_max_abs_diff"]["value"]) == 0
    assert float(summary["replica_vs_single_max_abs_diff_dropout"]["value"]) == 0
    for name in ("epoch", "seeds", "startup"):
        assert len(read_csv(tmp_path / f"{name}.csv")) > 0, name
    assert not (tmp_path / "ablation.csv").exists()
