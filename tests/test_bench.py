"""The speed benchmark: scripts/bench.py --quick writes a sane summary.csv with every section, and
the hand-written loop its gpu section measures as the ceiling trains what per-model
torch.optim.Adam trains.

Run: pytest tests/test_bench.py  (the end-to-end run is marked slow)
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_csv
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
SECTIONS = ["epoch", "seeds", "plain", "startup", "replicas", "gpu", "jobs", "fold"]
RATIOS = ["speedup_textbook_over_dropbench", "fraction_of_peak", "parallel_8_over_single",
          "speedup_fold_over_one_job_at_a_time", "speedup_parallel_over_sequential_8",
          "dropbench_3_seeds_over_plain_1_seed", "speedup_vmap_over_separate_k8", "parallel_8_over_single_training",
          "batched_loop_8_over_1_training", "batched_loop_3_seeds_over_plain_1_seed"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ceiling_trains_like_torch_adam(bench):
    """BatchedMLPs (eager here) = K separate nn.Linear MLPs, each with its own torch.optim.Adam."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 1, 6), torch.randint(0, 3, (20,))
    ceiling = bench.BatchedMLPs(x, y, 2, [6, 5, 3], batch_size=4, lr=0.01, capture=False)
    W1, b1, W2, b2 = ceiling.params
    start = W1.detach().clone()
    models = []
    for k in range(2):
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        with torch.no_grad():
            for layer, W, b in ((model[0], W1, b1), (model[2], W2, b2)):
                layer.weight.copy_(W[k].T)
                layer.bias.copy_(b[k, 0])
        models.append((model, torch.optim.Adam(model.parameters(), lr=0.01)))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randint(0, 20, (2, 4), generator=g)
        ceiling.step(idx)
        for k, (model, optimizer) in enumerate(models):
            loss = nn.functional.cross_entropy(model(x[idx[k]].flatten(1)), y[idx[k]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert not torch.equal(W1, start)  # it trained
    for k, (model, _) in enumerate(models):
        torch.testing.assert_close(model[0].weight, W1[k].T.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(model[2].bias, b2[k, 0].detach(), rtol=0, atol=1e-6)


def test_gpu_memory_is_the_peak_in_use_while_the_block_runs(bench, monkeypatch):
    """The jobs section's GPU memory figure, its CUDA calls replaced: the most memory in use (total -
    free) seen while the block runs, and what was in use when it began."""
    import time

    total, in_use = 100, [10]
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (total - in_use[0], total))
    with bench.gpu_memory_in_use("cuda") as memory:
        for level in (40, 70, 30):  # a sweep whose processes come and go
            in_use[0] = level
            time.sleep(0.35)
    assert memory == {"start": 10, "peak": 70}
    with bench.gpu_memory_in_use("cpu") as memory:
        pass
    assert memory == {"start": None, "peak": None}


def test_unknown_section_is_a_usage_error(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--sections", "epoch,ablation", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "ablation" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_a_failing_section_is_reported_and_the_others_still_written(bench, tmp_path, monkeypatch):
    def broken(args, summary, console):
        raise RuntimeError("bench run x ended 'failed': no such thing")

    def fine(args, summary, console):
        summary.append({"section": "gpu", "metric": "measured", "value": 1.0})
        return []

    monkeypatch.setitem(bench.SECTIONS, "startup", (broken, bench.SECTIONS["startup"][1]))
    monkeypatch.setitem(bench.SECTIONS, "gpu", (fine, bench.SECTIONS["gpu"][1]))
    assert bench.main(["--quick", "--sections", "startup,gpu", "--out", str(tmp_path)]) == 1
    assert not (tmp_path / "startup.csv").exists() and (tmp_path / "gpu.csv").exists()
    assert any(r["metric"] == "measured" for r in read_csv(tmp_path / "summary.csv"))
    failed = [r for r in read_csv(tmp_path / "summary.csv") if r["metric"] == "failed"]
    assert failed == [{**failed[0], "section": "startup",
                       "note": "RuntimeError: bench run x ended 'failed': no such thing"}]


@pytest.mark.slow
def test_quick_bench_writes_summary(tmp_path):
    # every section but `startup`, whose claim (no torch import) tests/test_cli.py checks in-process
    sections = ",".join(sorted(set(SECTIONS) - {"startup"}))
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1", "--out", str(tmp_path),
                           "--sections", sections],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = read_csv(tmp_path / "summary.csv")
    summary = {row["metric"]: row for row in rows}
    assert {row["section"] for row in rows} == {"epoch", "efficiency", "seeds", "plain", "replicas", "gpu",
                                                "jobs", "fold", "machine", "memory"}
    for metric in RATIOS:
        value = float(summary[metric]["value"])
        assert math.isfinite(value) and value > 0, (metric, value)
    assert float(summary["fraction_of_peak"]["value"]) < 2  # a fraction of peak, not a unit mistake
    # replica k reproduces the single run of seed k up to rounding
    assert float(summary["replica_vs_single_max_abs_loss_diff"]["value"]) < 1e-3
    assert float(summary["replica_vs_single_max_abs_loss_diff_dropout"]["value"]) < 1e-3
    assert float(summary["peak_rss_mib"]["value"]) > 50
    assert summary["cpu"]["value"]
    for name in set(SECTIONS) - {"startup"}:
        section_rows = read_csv(tmp_path / f"{name}.csv")
        if name == "gpu" and not torch.cuda.is_available():
            assert section_rows == [] and summary["skipped"]["section"] == "gpu"
            continue
        assert section_rows and all(row["device"] for row in section_rows), name
    # the same sweep one job at a time and several at once: 4 jobs x 3 seeds, the same numbers
    jobs = read_csv(tmp_path / "jobs.csv")
    compared = [r for r in jobs if r["identical_to_n_jobs_1"]]
    assert compared and all(r["runs"] == "12" and r["identical_to_n_jobs_1"] == "True" for r in compared), jobs
    # then the whole experiment with every job at once (2 epochs here), timed as the target's figure
    assert [r["runs"] for r in jobs if not r["identical_to_n_jobs_1"]] == ["12"], jobs
    assert float(summary["ablation_all_s"]["value"]) > 0
    # a sweep of 2 rates x 2 seeds job by job and folded: the same runs, accuracies equal up to rounding
    fold = read_csv(tmp_path / "fold.csv")
    assert [r["launcher"] for r in fold] == ["basic", "fold"] and all(r["runs"] == "4" for r in fold)
    assert all(r["same_run_keys"] == "True" for r in fold)
    assert float(summary["max_abs_test_acc_diff"]["value"]) <= 0.004
