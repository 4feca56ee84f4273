"""Tests for `dropbench report`: fake run directories in, tables, statistics and plots out."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dropbench import report

REPO = Path(__file__).resolve().parents[1]
SUMMARY_COLUMNS = [
    "format", "run_id", "run_key", "group_key", "status", "dataset", "model", "regularizer", "p", "seed",
    "epochs", "lr", "batch_size", "optimizer", "epochs_completed", "diverged_epoch", "train_acc", "test_acc",
    "best_test_acc", "best_epoch", "gap", "train_loss", "test_loss", "wall_seconds", "error", "started_at",
    "finished_at", "device",
]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def make_run(root: Path, rel: str, *, test_acc: float, seed: int = 0, regularizer: str = "dropout",
             p: str = "0.5", status: str = "ok", lr: str = "0.1", cfg: dict | None = None,
             finished_at: str = "2025-01-01T12:00:00+00:00", run_key: str | None = None,
             error: str = "", diverged_epoch: str = "", epochs: int = 3) -> Path:
    """A run dir like training writes it: summary.csv (one row) and metrics.csv (per epoch and split)."""
    cfg = {"cfg.model.hidden": "[64, 64]", "cfg.seed": str(seed), **(cfg or {})}
    group_key = f"{regularizer}-{p}-{lr}-" + "-".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k != "cfg.seed")
    train_acc = min(test_acc + 0.05, 1.0)
    summary = {
        "format": "1", "run_id": f"id{seed}{rel}", "run_key": run_key or f"{group_key}-s{seed}",
        "group_key": group_key, "status": status, "dataset": "mnist", "model": "mlp",
        "regularizer": regularizer, "p": p, "seed": str(seed), "epochs": str(epochs), "lr": lr,
        "batch_size": "128", "optimizer": "sgd", "epochs_completed": str(epochs),
        "diverged_epoch": diverged_epoch, "train_acc": str(train_acc), "test_acc": str(test_acc),
        "best_test_acc": str(test_acc + 0.01), "best_epoch": str(epochs), "gap": str(train_acc - test_acc),
        "train_loss": "0.2", "test_loss": str(1 - test_acc), "wall_seconds": "10.5", "error": error,
        "started_at": "2025-01-01T11:00:00+00:00", "finished_at": finished_at, "device": "cpu", **cfg,
    }
    run_dir = root / rel
    write_csv(run_dir / "summary.csv", [summary])
    write_metrics(run_dir, epochs, test_acc)
    return run_dir


def write_metrics(run_dir: Path, epochs: int, final_test_acc: float) -> None:
    rows = []
    for epoch in range(1, epochs + 1):
        for split, acc in (("train", final_test_acc + 0.05), ("test", final_test_acc)):
            rows.append({"epoch": epoch, "split": split, "loss": 1.0 / epoch,
                         "accuracy": acc * epoch / epochs, "entropy": 0.5, "seconds": 1.0})
    write_csv(run_dir / "metrics.csv", rows)


def make_sweep(root: Path) -> dict[str, list[float]]:
    """none and dropout p=0.2/0.5 with seeds 0-2; returns the test accuracies per group."""
    accs = {"none": [0.90, 0.91, 0.93], "0.2": [0.92, 0.925, 0.94], "0.5": [0.95, 0.94, 0.97]}
    for name, values in accs.items():
        for seed, acc in enumerate(values):
            if name == "none":
                make_run(root, f"sweeps/d1/none_{seed}", test_acc=acc, seed=seed, regularizer="none", p="")
            else:
                make_run(root, f"sweeps/d1/p{name}/seed_{seed}", test_acc=acc, seed=seed, p=name)
    return accs


def group_row(groups: pd.DataFrame, label_part: str) -> pd.Series:
    rows = groups[groups["label"].str.contains(label_part, regex=False)]
    assert len(rows) == 1, (label_part, list(groups["label"]))
    return rows.iloc[0]


def test_groups_combine_seeds_and_split_by_p(tmp_path):
    make_sweep(tmp_path)
    groups = report.build_report([tmp_path], tmp_path / "report").groups
    assert sorted(groups["label"]) == ["mnist/mlp dropout p=0.2", "mnist/mlp dropout p=0.5", "mnist/mlp none"]
    assert list(groups["n"]) == [3, 3, 3]
    assert group_row(groups, "p=0.5")["seeds"] == "0 1 2"
    # ranked by mean final test accuracy; p=0.5 is best
    assert group_row(groups, "p=0.5")["rank"] == 1 and group_row(groups, "p=0.5")["best"]
    assert group_row(groups, "none")["rank"] == 3


def test_mean_std_ci_match_scipy():
    values = np.array([0.81, 0.83, 0.86, 0.80])
    mean, std, ci = report.mean_std_ci(values)
    assert mean == pytest.approx(values.mean())
    assert std == pytest.approx(np.std(values, ddof=1))
    assert ci == pytest.approx(stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2)
    low, high = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values))
    assert ci == pytest.approx((high - low) / 2)
    mean, std, ci = report.mean_std_ci(np.array([0.7]))
    assert mean == 0.7 and math.isnan(std) and math.isnan(ci)


def test_paired_test_matches_ttest_rel(tmp_path):
    accs = make_sweep(tmp_path)
    groups = report.build_report([tmp_path], tmp_path / "report").groups
    row = group_row(groups, "p=0.5")
    group, baseline = np.array(accs["0.5"]), np.array(accs["none"])
    diffs = group - baseline
    assert row["test"] == "paired" and row["n_pairs"] == 3
    assert row["baseline_label"] == "mnist/mlp none"
    assert row["p_value"] == pytest.approx(stats.ttest_rel(group, baseline).pvalue)
    assert row["delta_test_acc"] == pytest.approx(diffs.mean())
    assert row["delta_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3))
    # the baseline is not compared with itself
    none = group_row(groups, "none")
    assert none["baseline_group_key"] == none["group_key"] and math.isnan(none["p_value"])


def test_welch_when_seeds_do_not_match():
    group = pd.Series([0.95, 0.94, 0.97], index=[10, 11, 12])
    baseline = pd.Series([0.90, 0.91, 0.93, 0.92], index=[0, 1, 2, 3])
    result = report.compare(group, baseline)
    a, b = group.to_numpy(), baseline.to_numpy()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert result.test == "welch"
    assert result.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert result.delta == pytest.approx(a.mean() - b.mean())
    assert result.ci95 == pytest.approx(stats.t.ppf(0.975, dof) * math.sqrt(va + vb))
    # one seed in common is too few to pair: still Welch
    assert report.compare(group, pd.Series([0.9, 0.91], index=[10, 20])).test == "welch"
    # n = 1 on one side: difference only
    only = report.compare(group, pd.Series([0.9], index=[0]))
    assert only.test == "" and only.delta == pytest.approx(a.mean() - 0.9) and math.isnan(only.p_value)


def test_baseline_prefers_matching_settings(tmp_path):
    for seed in range(3):  # the larger none group, but with another learning rate
        make_run(tmp_path, f"none_lr01_{seed}", test_acc=0.9, seed=seed, regularizer="none", p="", lr="0.1")
    for seed in range(2):
        make_run(tmp_path, f"none_lr001_{seed}", test_acc=0.8 + seed / 100, seed=seed, regularizer="none",
                 p="", lr="0.01")
        make_run(tmp_path, f"drop_lr001_{seed}", test_acc=0.85 + seed / 50, seed=seed, lr="0.01")
    groups = report.build_report([tmp_path], tmp_path / "report").groups
    dropout = group_row(groups, "dropout")
    assert dropout["baseline_label"] == "mnist/mlp none lr=0.01" and dropout["baseline_settings_match"]


def test_label_names_cfg_setting_that_varies(tmp_path):
    for alpha in ("0.5", "1.0"):
        for seed in range(2):
            make_run(tmp_path, f"a{alpha}_{seed}", test_acc=0.9, seed=seed, regularizer="rdrop",
                     cfg={"cfg.regularizer.alpha": alpha, "cfg.regularizer.p": "0.5"})
    labels = sorted(report.build_report([tmp_path], tmp_path / "report").groups["label"])
    # cfg.regularizer.p is the same everywhere and cfg.seed varies within a group: neither is named
    assert labels == ["mnist/mlp rdrop p=0.5 cfg.regularizer.alpha=0.5",
                      "mnist/mlp rdrop p=0.5 cfg.regularizer.alpha=1.0"]


def test_duplicate_run_key_keeps_latest(tmp_path):
    make_run(tmp_path, "old", test_acc=0.50, run_key="same", finished_at="2025-01-01T10:00:00+00:00")
    make_run(tmp_path, "new", test_acc=0.60, run_key="same", finished_at="2025-01-02T10:00:00+01:00")
    built = report.build_report([tmp_path], tmp_path / "report")
    assert list(built.groups["n"]) == [1]
    assert built.groups["test_acc_mean"].iloc[0] == pytest.approx(0.60)
    assert built.duplicates == [(tmp_path / "old", tmp_path / "new")]


def make_messy_folder(root: Path) -> None:
    """Good runs plus everything a real results/ folder collects."""
    make_sweep(root)
    write_metrics(root / "sweeps/d1/running", 2, 0.5)  # still running: metrics.csv only
    (root / "killed/.hydra").mkdir(parents=True)  # killed before the first epoch
    (root / "empty").mkdir()
    (root / "empty/summary.csv").write_text("")
    write_csv(root / "foreign/summary.csv", [{"name": "x", "value": "1"}])
    write_csv(root / "future/summary.csv", [{"format": "2", "run_key": "k", "status": "ok"}])
    make_run(root, "half", test_acc=0.9, seed=7)
    text = (root / "half/summary.csv").read_text()
    (root / "half/summary.csv").write_text(text[: len(text) - 40])
    make_run(root, "crashed", test_acc=0.0, seed=8, status="failed", error="CUDA error: out of memory\ntrace")
    make_run(root, "exploded", test_acc=0.1, seed=9, status="diverged", diverged_epoch="2")
    make_run(root, "report/old", test_acc=0.99, seed=5)  # inside the output dir: never read
    (root / "sweeps/d1/none_0/metrics.csv").unlink()  # counted, but has no learning curve


def test_messy_folder_reports_what_was_skipped(tmp_path, capsys):
    make_messy_folder(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "report/comparison.md").read_text()
    expected = [
        ("sweeps/d1/running", "incomplete"),
        ("killed", "incomplete"),
        ("empty/summary.csv", "empty file"),
        ("foreign/summary.csv", "no 'format' column"),
        ("future/summary.csv", "format '2'"),
        ("half/summary.csv", "half-written"),
        ("crashed", "failed: CUDA error: out of memory"),
        ("exploded", "diverged at epoch 2"),
        ("sweeps/d1/none_0/metrics.csv", "missing (run counted)"),
    ]
    for text, escape in ((out, str), (md, report.markdown_escape)):
        for path, reason in expected:
            line = next((l for l in text.splitlines() if escape(f"{path}:") in l), None)
            assert line is not None and escape(reason) in line, (path, reason)
        assert "report/old" not in text
    assert "Counted 9 runs in 3 groups" in out
    assert "2 failed/diverged/interrupted, 2 incomplete, 4 skipped files" in out
    # the seed dirs of a sweep job are runs; the job dir itself is not reported incomplete
    assert f"{tmp_path / 'sweeps'}: incomplete" not in out
    assert "\x1b[" not in out  # plain when not a terminal


def test_outputs_written_with_expected_numbers(tmp_path, capsys):
    accs = make_sweep(tmp_path)
    out_dir = tmp_path / "out"
    assert report.main([str(tmp_path), "--out", str(out_dir)]) == 0
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["accuracy_vs_p.png", "comparison.csv", "comparison.md", "comparison.tex",
                     "learning_curves.png"]  # and no temp files left behind
    for png in ("learning_curves.png", "accuracy_vs_p.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = pd.read_csv(out_dir / "comparison.csv", keep_default_na=False, na_values=[""])
    best = table[table["rank"] == 1].iloc[0]
    values = np.array(accs["0.5"])
    assert best["label"] == "mnist/mlp dropout p=0.5" and bool(best["best"])
    assert best["test_acc_mean"] == pytest.approx(values.mean(), rel=1e-12)  # unrounded fractions
    assert best["test_acc_std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
    assert best["test_acc_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3))
    assert best["p_value"] == pytest.approx(stats.ttest_rel(values, accs["none"]).pvalue)

    md = (out_dir / "comparison.md").read_text()
    ci = stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3) * 100
    assert f"**{values.mean() * 100:.1f} ± {ci:.1f}**" in md
    tex = (out_dir / "comparison.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"Test acc (\%)" in tex and r"$\pm$" in tex
    assert "±" not in tex and "−" not in tex
    assert f"Wrote comparison.csv, comparison.md, comparison.tex, learning_curves.png, accuracy_vs_p.png" \
           f" to {out_dir}/" in capsys.readouterr().out


def test_tex_and_markdown_escaping():
    assert report.tex_escape("cfg.max_norm=50% & {x}") == r"cfg.max\_norm=50\% \& \{x\}"
    assert report.tex_escape("−1.2 ± 0.3") == r"$-$1.2 $\pm$ 0.3"
    assert report.markdown_escape("a|b_c") == r"a\|b\_c"


def test_missing_dir_is_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("dropbench report: error: no such directory") and err.count("\n") == 1


def test_no_finished_runs_is_one_line_error(tmp_path, capsys):
    write_metrics(tmp_path / "running", 1, 0.5)
    make_run(tmp_path, "crashed", test_acc=0.0, status="failed", error="boom")
    assert report.main([str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("dropbench report: error: no finished runs with status ok") and err.count("\n") == 1
    assert "1 with another status, 1 incomplete" in err


def test_import_does_not_load_torch():
    code = "import sys, dropbench.report; assert 'torch' not in sys.modules and 'hydra' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_overlapping_dirs_count_each_run_once(tmp_path):
    make_sweep(tmp_path)
    built = report.build_report([tmp_path, tmp_path / "sweeps"], tmp_path / "report")
    assert len(built.runs) == 9 and not built.duplicates
