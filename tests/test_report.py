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
from dropbench.results import METRICS_COLUMNS, SUMMARY_COLUMNS

REPO = Path(__file__).resolve().parents[1]
# summary.csv of dropbench 0.1 (format 1): no validation split; best_test_acc was picked on the test set
FORMAT1_COLUMNS = [
    "format", "run_id", "run_key", "group_key", "status", "dataset", "model", "regularizer", "p", "seed",
    "epochs", "lr", "batch_size", "optimizer", "epochs_completed", "diverged_epoch", "train_acc", "test_acc",
    "best_test_acc", "best_epoch", "gap", "train_loss", "test_loss", "test_entropy", "wall_seconds",
    "parallel_seeds", "error", "started_at", "finished_at", "device", "dropbench_version", "threads",
    "resumed_from_epoch",
]


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def make_run(root: Path, rel: str, *, test_acc: float, seed: int = 0, regularizer: str = "dropout",
             p: str = "0.5", status: str = "ok", lr: str = "0.1", cfg: dict | None = None,
             finished_at: str = "2025-01-01T12:00:00+00:00", run_key: str | None = None,
             error: str = "", diverged_epoch: str = "", epochs: int = 3, fmt: str = "2",
             val_fraction: str = "0.1", val_acc: float | None = None, test_at_best: float | None = None,
             dataset: str = "mnist", model: str = "mlp", replace: dict | None = None) -> Path:
    """A run dir like training writes it: summary.csv (one row, in summary format `fmt`) and metrics.csv
    (per epoch and split). Validation accuracy defaults to test_acc + 0.01, the test accuracy at the
    selected epoch to test_acc; `replace` overrides summary values."""
    cfg = {"cfg.model.hidden": "[64, 64]", "cfg.seed": str(seed), **(cfg or {})}
    group_key = f"{dataset}-{model}-{regularizer}-{p}-{lr}-{fmt}-{val_fraction}-" + "-".join(
        f"{k}={v}" for k, v in sorted(cfg.items()) if k != "cfg.seed")
    train_acc = min(test_acc + 0.05, 1.0)
    has_val = fmt == "2" and float(val_fraction) > 0
    val_acc = test_acc + 0.01 if val_acc is None else val_acc
    test_at_best = test_acc if test_at_best is None else test_at_best
    summary = {
        "format": fmt, "run_id": f"id{seed}{rel}", "run_key": run_key or f"{group_key}-s{seed}",
        "group_key": group_key, "status": status, "dataset": dataset, "model": model,
        "regularizer": regularizer, "p": p, "seed": str(seed), "epochs": str(epochs), "lr": lr,
        "batch_size": "128", "optimizer": "sgd", "epochs_completed": str(epochs),
        "diverged_epoch": diverged_epoch, "train_acc": str(train_acc), "test_acc": str(test_acc),
        "gap": str(train_acc - test_acc), "train_loss": "0.2", "test_loss": str(1 - test_acc),
        "wall_seconds": "99.5", "error": error, "started_at": "2025-01-01T11:00:00+00:00",
        "finished_at": finished_at, "device": "cpu", **cfg,
    }
    if fmt == "1":  # picked on the test set: the report must not use these
        summary.update(best_test_acc="0.999", best_epoch="1", test_entropy="0.5")
    else:
        summary.update(val_fraction=val_fraction, test_ece=str(0.02 + test_acc / 10), train_seconds=str(3.0 * epochs),
                       seconds_per_epoch="3.0")
        if has_val:
            summary.update(val_acc=str(val_acc), val_loss=str(1 - val_acc), best_epoch=str(epochs),
                           best_val_acc=str(val_acc), test_acc_at_best=str(test_at_best))
    summary.update(replace or {})
    columns = FORMAT1_COLUMNS if fmt == "1" else SUMMARY_COLUMNS
    run_dir = root / rel
    write_csv(run_dir / "summary.csv", [summary], columns + list(cfg))
    write_metrics(run_dir, epochs, test_acc, val=has_val)
    return run_dir


def write_metrics(run_dir: Path, epochs: int, final_test_acc: float, val: bool = False) -> None:
    rows = []
    splits = {"train": final_test_acc + 0.05, "test": final_test_acc, **({"val": final_test_acc + 0.01} if val else {})}
    for epoch in range(1, epochs + 1):
        for split, acc in splits.items():
            rows.append({"epoch": epoch, "split": split, "loss": 1.0 / epoch, "accuracy": acc * epoch / epochs,
                         "entropy": 0.5, "ece": 0.05, "seconds": 1.0})
    write_csv(run_dir / "metrics.csv", rows, METRICS_COLUMNS)


SWEEP = {"none": [0.90, 0.91, 0.93], "0.2": [0.92, 0.925, 0.94], "0.5": [0.95, 0.94, 0.97]}


def make_sweep(root: Path, fmt: str = "2") -> dict[str, list[float]]:
    """none and dropout p=0.2/0.5 with seeds 0-2; returns the test accuracies per group."""
    for name, values in SWEEP.items():
        for seed, acc in enumerate(values):
            if name == "none":
                make_run(root, f"sweeps/d1/none_{seed}", test_acc=acc, seed=seed, regularizer="none", p="", fmt=fmt)
            else:
                make_run(root, f"sweeps/d1/p{name}/seed_{seed}", test_acc=acc, seed=seed, p=name, fmt=fmt)
    return SWEEP


def group_row(groups: pd.DataFrame, label_part: str) -> pd.Series:
    rows = groups[groups["label"].str.contains(label_part, regex=False)]
    assert len(rows) == 1, (label_part, list(groups["label"]))
    return rows.iloc[0]


def build(root: Path) -> report.Report:
    return report.build_report([root], root / "report")


def report_texts(root: Path, capsys) -> tuple[str, str]:
    """(console output, comparison.md) of the runs under `root`, without drawing the plots."""
    built = build(root)
    report.print_report(built, [root / "report/comparison.md"])
    return capsys.readouterr().out, report.markdown_report(built, [])


# -- grouping and the per-group statistics ----------------------------------------------------------

def test_groups_combine_seeds_and_split_by_p(tmp_path):
    make_sweep(tmp_path)
    groups = build(tmp_path).groups
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
    # a metric some runs did not record is summarized over those that did
    assert report.mean_std_ci(np.append(values, np.nan))[0] == pytest.approx(values.mean())
    assert all(math.isnan(x) for x in report.mean_std_ci(np.array([np.nan])))


def test_group_columns_are_the_summary_values(tmp_path):
    seconds = [2.0, 4.0]
    for seed in range(2):
        make_run(tmp_path, f"r{seed}", test_acc=0.8 + seed / 10, seed=seed, val_acc=0.7 + seed / 10,
                 test_at_best=0.75 + seed / 10,
                 replace={"seconds_per_epoch": str(seconds[seed]), "test_ece": str(0.1 * (seed + 1)),
                          "test_loss": str(0.5 + seed)})
    row = build(tmp_path).groups.iloc[0]
    expected = {"test_acc": [0.8, 0.9], "test_acc_at_best": [0.75, 0.85], "val_acc": [0.7, 0.8],
                "train_acc": [0.85, 0.95], "gap": [0.05, 0.05], "test_loss": [0.5, 1.5], "test_ece": [0.1, 0.2],
                "seconds_per_epoch": seconds}  # training seconds per epoch, not wall_seconds (99.5)
    for col, values in expected.items():
        mean, _, ci = report.mean_std_ci(np.array(values))
        assert row[f"{col}_mean"] == pytest.approx(mean) and row[f"{col}_ci95"] == pytest.approx(ci), col
    assert set(report.READ_COLUMNS + report.FORMAT2_COLUMNS) <= set(SUMMARY_COLUMNS)


# -- tests against the baseline ---------------------------------------------------------------------

def test_paired_test_matches_ttest_rel(tmp_path):
    accs = make_sweep(tmp_path)
    groups = build(tmp_path).groups
    row = group_row(groups, "p=0.5")
    group, baseline = np.array(accs["0.5"]), np.array(accs["none"])
    diffs = group - baseline
    assert row["test"] == "paired" and row["n_pairs"] == 3
    assert row["baseline_label"] == "mnist/mlp none"
    assert row["p_value"] == pytest.approx(stats.ttest_rel(group, baseline).pvalue)
    assert row["delta"] == pytest.approx(diffs.mean())
    assert row["delta_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3))
    # the baseline is not compared with itself
    none = group_row(groups, "none")
    assert none["baseline_group_key"] == none["group_key"] and math.isnan(none["p_value"])
    assert none["note"] == "baseline"


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


def test_holm_matches_statsmodels(tmp_path):
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, 0.04, 0.9])
    assert report.holm(p) == pytest.approx(multitest.multipletests(p, method="holm")[1])
    # by hand for three: sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04)
    assert report.holm([0.02, 0.01, 0.04]) == pytest.approx([0.04, 0.03, 0.04])
    # nan is no test: it stays nan and does not count in K
    with_nan = report.holm([0.02, np.nan, 0.01])
    assert math.isnan(with_nan[1]) and with_nan[[0, 2]] == pytest.approx([0.02, 0.02])
    # in the report: adjusted over every comparison of the table
    make_sweep(tmp_path)
    groups = build(tmp_path).groups
    tested = groups["p_value"].notna()
    assert tested.sum() == 2
    assert groups.loc[tested, "p_holm"].to_numpy() == pytest.approx(
        multitest.multipletests(groups.loc[tested, "p_value"], method="holm")[1])


def test_probability_of_improvement_direct():
    x, y = np.array([0.9, 0.8, 0.85, 0.8]), np.array([0.8, 0.7, 0.82])
    point, low, high = report.probability_of_improvement(x, y, resamples=500, seed=3)
    wins = sum((a > b) + 0.5 * (a == b) for a in x for b in y) / (len(x) * len(y))
    assert point == pytest.approx(wins)
    assert point == pytest.approx(stats.mannwhitneyu(x, y).statistic / (len(x) * len(y)))
    # the documented bootstrap, one resample at a time: x's draws, then y's, from default_rng(seed)
    rng = np.random.default_rng(3)
    ix, iy = rng.integers(0, len(x), (500, len(x))), rng.integers(0, len(y), (500, len(y)))
    boot = [np.mean([(a > b) + 0.5 * (a == b) for a in x[i] for b in y[j]]) for i, j in zip(ix, iy)]
    assert (low, high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    # every run better: 1 with no spread; a side with one run: no interval
    assert report.probability_of_improvement(x + 1, y) == (1.0, 1.0, 1.0)
    single = report.probability_of_improvement(x, np.array([0.85]))
    assert single[0] == pytest.approx(1.5 / 4) and math.isnan(single[1]) and math.isnan(single[2])


def test_iqm_and_stratified_bootstrap_direct():
    x = np.array([0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 5.0])
    assert report.iqm(x) == pytest.approx(stats.trim_mean(x, 0.25))
    assert report.iqm(x) == pytest.approx(np.mean([0.6, 0.7, 0.8, 0.9]))  # the middle half of 8
    tasks = [np.array([0.6, 0.7, 0.65]), np.array([0.9, 0.95, 0.92, 0.91])]
    point, low, high = report.iqm_with_ci(tasks, resamples=400, seed=1)
    assert point == pytest.approx(stats.trim_mean(np.concatenate(tasks), 0.25))
    rng = np.random.default_rng(1)
    draws = [t[rng.integers(0, len(t), (400, len(t)))] for t in tasks]
    boot = [stats.trim_mean(np.concatenate([d[b] for d in draws]), 0.25) for b in range(400)]
    assert (low, high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    # stratified: resamples never move runs between tasks, so constant tasks give no spread at all
    assert report.iqm_with_ci([np.full(3, 0.5), np.full(3, 0.9)]) == pytest.approx((0.7, 0.7, 0.7))
    assert math.isnan(report.iqm_with_ci([np.array([0.5]), np.array([0.9, 0.8])])[1])


def test_baseline_prefers_matching_settings(tmp_path):
    for seed in range(3):  # the larger none group, but with another learning rate
        make_run(tmp_path, f"none_lr01_{seed}", test_acc=0.9, seed=seed, regularizer="none", p="", lr="0.1")
    for seed in range(2):
        make_run(tmp_path, f"none_lr001_{seed}", test_acc=0.8 + seed / 100, seed=seed, regularizer="none",
                 p="", lr="0.01")
        make_run(tmp_path, f"drop_lr001_{seed}", test_acc=0.85 + seed / 50, seed=seed, lr="0.01")
    groups = build(tmp_path).groups
    dropout = group_row(groups, "dropout")
    assert dropout["baseline_label"] == "mnist/mlp none lr=0.01" and dropout["baseline_settings_match"]


def test_no_baseline_says_why(tmp_path, capsys):
    for seed in range(2):
        make_run(tmp_path, f"a{seed}", test_acc=0.9, seed=seed, p="0.2")
        make_run(tmp_path, f"b{seed}", test_acc=0.8, seed=seed, p="0.5")
    out, md = report_texts(tmp_path, capsys)
    note = "mnist/mlp: no Δ, p or P(>none): no 'none' group among these runs."
    for text, escape in ((out, str), (md, report.markdown_escape)):
        assert escape(note) in text
        assert "too few runs |" not in text and "│ too few runs" not in text
    assert "K = 0 comparisons" in md


def test_label_names_cfg_setting_that_varies(tmp_path):
    for alpha in ("0.5", "1.0"):
        for seed in range(2):
            make_run(tmp_path, f"a{alpha}_{seed}", test_acc=0.9, seed=seed, regularizer="rdrop",
                     cfg={"cfg.regularizer.alpha": alpha, "cfg.regularizer.p": "0.5"})
    labels = sorted(build(tmp_path).groups["label"])
    # cfg.regularizer.p is the same everywhere and cfg.seed varies within a group: neither is named
    assert labels == ["mnist/mlp rdrop p=0.5 alpha=0.5",
                      "mnist/mlp rdrop p=0.5 alpha=1.0"]


# -- tuned comparison: settings selected on validation ----------------------------------------------

# (val, test @val-best) per seed: the validation ranking (p=0.8 > p=0.5 > p=0.2) differs from the test one
GRID = {
    "dropout p=0.2": ([0.80, 0.81, 0.79], [0.95, 0.96, 0.94]),
    "dropout p=0.5": ([0.86, 0.85, 0.87], [0.90, 0.89, 0.91]),
    "dropout p=0.8": ([0.88, 0.89, 0.90], [0.86, 0.88, 0.85]),
    "none lr=0.1": ([0.84, 0.83, 0.85], [0.84, 0.85, 0.83]),
    "none lr=0.01": ([0.70, 0.71, 0.69], [0.99, 0.98, 0.97]),
}


def make_grid(root: Path, flip_test: bool = False) -> None:
    """The GRID as runs; flip_test replaces every test number by its mirror image (1 - x)."""
    for name, (vals, tests) in GRID.items():
        regularizer, setting = name.split()
        p, lr = (setting[2:], "0.1") if regularizer == "dropout" else ("", setting[3:])
        for seed, (val, test) in enumerate(zip(vals, tests)):
            test = 1 - test if flip_test else test
            make_run(root, f"{name.replace(' ', '_')}/s{seed}", test_acc=test, test_at_best=test, val_acc=val,
                     seed=seed, regularizer=regularizer, p=p, lr=lr)


def test_selection_uses_validation_only(tmp_path):
    make_grid(tmp_path / "a")
    make_grid(tmp_path / "b", flip_test=True)
    first, flipped = build(tmp_path / "a"), build(tmp_path / "b")
    for built in (first, flipped):
        selected = sorted(built.groups.loc[built.groups["selected"], "name"])
        assert selected == ["dropout p=0.8", "none lr=0.1"]  # the best mean validation accuracy
        assert built.groups["selectable"].all()
    tuned = first.tuned.set_index("method")
    test, base = np.array(GRID["dropout p=0.8"][1]), np.array(GRID["none lr=0.1"][1])
    assert tuned.loc["dropout", "name"] == "dropout p=0.8"
    assert tuned.loc["dropout", "settings"] == 3 and tuned.loc["dropout", "selectable"] == 3
    assert tuned.loc["dropout", "test_acc_at_best_mean"] == pytest.approx(test.mean())
    assert tuned.loc["dropout", "best_val_acc_mean"] == pytest.approx(np.mean(GRID["dropout p=0.8"][0]))
    assert tuned.loc["dropout", "p_value"] == pytest.approx(stats.ttest_rel(test, base).pvalue)
    assert tuned.loc["dropout", "delta"] == pytest.approx((test - base).mean())
    assert tuned.loc["dropout", "p_improve"] == pytest.approx(stats.mannwhitneyu(test, base).statistic / 9)
    assert tuned.loc["none", "note"] == "baseline"
    # the test numbers changed, the choice did not
    assert flipped.tuned.set_index("method").loc["dropout", "test_acc_at_best_mean"] == pytest.approx(1 - test.mean())
    # the selection function is handed no test column at all
    assert not any("test" in c for c in report.SELECTION_COLUMNS)


def test_tuned_section_shows_grid_and_choice(tmp_path, capsys):
    make_grid(tmp_path)
    out, md = report_texts(tmp_path, capsys)
    tuned_part = md.split("## Tuned comparison")[1].split("## Tuning grid")[0]
    assert "| mnist/mlp | dropout | dropout p=0.8 | 3 (3) | 3 |" in tuned_part
    assert "K = 1 comparisons" in tuned_part  # dropout against none
    grid_part = md.split("## Tuning grid")[1]
    assert grid_part.count("selected") >= 2 and "none lr=0.01" in grid_part and "dropout p=0.2" in grid_part
    assert "Test numbers play no part in the choice" in out
    tuned_csv = report.tuned_csv(build(tmp_path).tuned)
    assert sorted(tuned_csv["label"]) == ["mnist/mlp dropout p=0.8", "mnist/mlp none lr=0.1"]


# -- formats ------------------------------------------------------------------------------------------

def test_format1_and_format2_in_one_report(tmp_path, capsys):
    for seed in range(2):  # dropbench 0.1 runs: no validation; best_test_acc (0.999) must not be used
        make_run(tmp_path, f"old/none_{seed}", test_acc=0.90 + seed / 100, seed=seed, regularizer="none", p="",
                 fmt="1")
        make_run(tmp_path, f"old/p05_{seed}", test_acc=0.92, seed=seed, fmt="1")
        make_run(tmp_path, f"new/p05_{seed}", test_acc=0.93, seed=seed, val_acc=0.94)
        make_run(tmp_path, f"new/p02_{seed}", test_acc=0.91, seed=seed, p="0.2", val_acc=0.95)
    built = build(tmp_path)
    groups = built.groups
    assert len(built.runs) == 8 and not built.skipped
    old = groups[groups["format"] == "1"]
    new = groups[groups["format"] == "2"]
    assert len(old) == 2 and len(new) == 2
    assert old[["val_acc_mean", "best_val_acc_mean", "test_acc_at_best_mean", "test_ece_mean",
                "seconds_per_epoch_mean"]].isna().all().all()
    assert not (groups.filter(like="_mean") == 0.999).any().any()
    assert not old["selectable"].any() and new["selectable"].all()
    # the format-1 dropout group cannot be chosen; among the new ones validation picks p=0.2
    dropout = groups[groups["regularizer"] == "dropout"]
    assert list(dropout.loc[dropout["selected"], "name"]) == ["dropout p=0.2 val_fraction=0.1"]
    none_tuned = built.tuned.set_index("method").loc["none"]
    assert none_tuned["note"] == "no setting with a validation split"
    assert built.tuned.set_index("method").loc["dropout", "note"] == "no selectable 'none' setting"
    # the format-2 dropout groups are still compared with the format-1 none group on final test accuracy
    assert (new["baseline_label"] == "mnist/mlp none").all() and not new["baseline_settings_match"].any()
    out, md = report_texts(tmp_path, capsys)
    for text in (out, md):
        assert "4 runs are in summary format 1" in text and "not used" in text
        assert "no validation split" in text


def test_old_format_columns_hidden_when_no_group_has_them(tmp_path):
    make_sweep(tmp_path, fmt="1")
    built = build(tmp_path)
    headers = report.main_section(built).headers
    assert "Val acc (%)" not in headers and "Test ECE (%)" not in headers and "Test acc (%)" in headers
    assert built.tuned.empty  # several p values, but nothing can be selected on validation
    assert any(note.startswith("No tuned comparison: ") for note in report.main_notes(built))


# -- reading runs ---------------------------------------------------------------------------------------

def test_duplicate_run_key_keeps_latest(tmp_path):
    make_run(tmp_path, "old", test_acc=0.50, run_key="same", finished_at="2025-01-01T10:00:00+00:00")
    make_run(tmp_path, "new", test_acc=0.60, run_key="same", finished_at="2025-01-02T10:00:00+01:00")
    built = build(tmp_path)
    assert list(built.groups["n"]) == [1]
    assert built.groups["test_acc_mean"].iloc[0] == pytest.approx(0.60)
    assert built.duplicates == [(tmp_path / "old", tmp_path / "new")]


def test_duplicate_keeps_ok_over_later_failure(tmp_path):
    make_run(tmp_path, "done", test_acc=0.7, run_key="k", finished_at="2025-01-01T10:00:00+00:00")
    make_run(tmp_path, "retry", test_acc=0.0, run_key="k", status="failed", error="killed",
             finished_at="2025-01-03T10:00:00+00:00")
    make_run(tmp_path, "retry2", test_acc=0.0, run_key="k", status="interrupted",
             finished_at="2025-01-04T10:00:00+00:00")
    make_run(tmp_path, "bad1", test_acc=0.0, run_key="j", status="failed", finished_at="2025-01-01T10:00:00+00:00")
    make_run(tmp_path, "bad2", test_acc=0.0, run_key="j", status="diverged", finished_at="2025-01-02T10:00:00+00:00")
    built = build(tmp_path)
    assert list(built.runs["dir"]) == [tmp_path / "done"]
    assert list(built.unsuccessful["dir"]) == [tmp_path / "bad2"]  # no ok run: the newest
    assert sorted(built.duplicates) == sorted([(tmp_path / "retry", tmp_path / "done"),
                                               (tmp_path / "retry2", tmp_path / "done"),
                                               (tmp_path / "bad1", tmp_path / "bad2")])


def test_out_of_domain_runs_are_skipped_and_named(tmp_path, capsys):
    make_sweep(tmp_path)
    bad = {
        "acc": ({"test_acc": "1.5"}, "test_acc is '1.5' (expected a number in [0, 1])"),
        "seconds": ({"seconds_per_epoch": "-2"}, "seconds_per_epoch is '-2' (expected a number ≥ 0)"),
        "epochs": ({"epochs_completed": "-1"}, "epochs_completed is '-1' (expected an integer ≥ 0)"),
        "nan": ({"test_acc": "nan"}, "test_acc is 'nan' (required)"),
        "noval": ({"best_val_acc": ""}, "best_val_acc is '' (required)"),
        "ece": ({"test_ece": "2"}, "test_ece is '2' (expected a number in [0, 1])"),
    }
    for i, (name, (values, _)) in enumerate(bad.items()):
        make_run(tmp_path, f"bad/{name}", test_acc=0.9, seed=10 + i, replace=values)
    # not an ok run: not checked, listed as failed
    make_run(tmp_path, "bad/failed", test_acc=0.9, seed=20, status="failed", error="boom",
             replace={"test_acc_at_best": "7"})
    out, _ = report_texts(tmp_path, capsys)
    assert "Counted 9 runs in 3 groups" in out
    for name, (_, reason) in bad.items():
        line = next(line for line in out.splitlines() if f"bad/{name}/summary.csv:" in line)
        assert f"skipped, status ok but {reason}" in line
    assert f"{tmp_path / 'bad/failed'}: failed: boom" in out


def make_messy_folder(root: Path) -> None:
    """Good runs plus everything a real results/ folder collects."""
    make_sweep(root)
    write_metrics(root / "sweeps/d1/running", 2, 0.5)  # still running: metrics.csv only
    (root / "killed/.hydra").mkdir(parents=True)  # killed before the first epoch
    (root / "empty").mkdir()
    (root / "empty/summary.csv").write_text("")
    write_csv(root / "foreign/summary.csv", [{"name": "x", "value": "1"}])
    write_csv(root / "future/summary.csv", [{"format": "3", "run_key": "k", "group_key": "g", "status": "ok"}])
    make_run(root, "half", test_acc=0.9, seed=7)
    text = (root / "half/summary.csv").read_text()
    (root / "half/summary.csv").write_text(text[: len(text) - 40])
    make_run(root, "crashed", test_acc=0.0, seed=8, status="failed", error="CUDA error: out of memory\ntrace")
    make_run(root, "exploded", test_acc=0.1, seed=9, status="diverged", diverged_epoch="2")
    make_run(root, "report/old", test_acc=0.99, seed=5)  # inside the output dir: never read
    (root / "sweeps/d1/none_0/metrics.csv").unlink()  # counted, but has no learning curve


def test_messy_folder_reports_what_was_skipped(tmp_path, capsys):
    make_messy_folder(tmp_path)
    out, md = report_texts(tmp_path, capsys)
    expected = [
        ("sweeps/d1/running", "incomplete"),
        ("killed", "incomplete"),
        ("empty/summary.csv", "empty file"),
        ("foreign/summary.csv", "no 'format' column"),
        ("future/summary.csv", "format '3'"),
        ("half/summary.csv", "half-written"),
        ("crashed", "failed: CUDA error: out of memory"),
        ("exploded", "diverged at epoch 2"),
        ("sweeps/d1/none_0/metrics.csv", "missing (run counted)"),
    ]
    for text, escape in ((out, str), (md, report.markdown_escape)):
        for path, reason in expected:
            line = next((line for line in text.splitlines() if escape(f"{path}:") in line), None)
            assert line is not None and escape(reason) in line, (path, reason)
        assert "report/old" not in text
    assert "Counted 9 runs in 3 groups" in out
    assert "2 failed/diverged/interrupted, 2 incomplete, 4 skipped files" in out
    # the seed dirs of a sweep job are runs; the job dir itself is not reported incomplete
    assert f"{tmp_path / 'sweeps'}: incomplete" not in out
    assert "\x1b[" not in out  # plain when not a terminal


# -- outputs ----------------------------------------------------------------------------------------------

def test_outputs_written_with_expected_numbers(tmp_path, capsys):
    accs = make_sweep(tmp_path)
    for seed in range(2):  # a second task: the IQM table across tasks is written too
        make_run(tmp_path, f"fashion/n{seed}", test_acc=0.8, seed=seed, regularizer="none", p="", dataset="fashion")
    out_dir = tmp_path / "out"
    assert report.main([str(tmp_path), "--out", str(out_dir)]) == 0
    written = ["comparison.csv", "tuned.csv", "iqm.csv", "comparison.md", "comparison.tex", "learning_curves.png",
               "loss_curves.png", "gap.png", "accuracy_vs_p.png", "validation_vs_test.png"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(written)  # and no temporary files left behind
    assert f"Wrote {', '.join(written)} to {out_dir}/" in capsys.readouterr().out
    for png in (n for n in written if n.endswith(".png")):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = pd.read_csv(out_dir / "comparison.csv", keep_default_na=False, na_values=[""])
    best = table[table["label"] == "mnist/mlp dropout p=0.5"].iloc[0]
    values = np.array(accs["0.5"])
    assert best["rank"] == 1 and bool(best["best"])
    assert best["test_acc_mean"] == pytest.approx(values.mean(), rel=1e-12)  # unrounded fractions
    assert best["test_acc_std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
    assert best["test_acc_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3))
    assert best["p_value"] == pytest.approx(stats.ttest_rel(values, accs["none"]).pvalue)
    assert best["p_improve"] == pytest.approx(stats.mannwhitneyu(values, accs["none"]).statistic / 9)
    assert pd.read_csv(out_dir / "tuned.csv")["method"].tolist() == ["none", "dropout", "none"]  # fashion first
    assert pd.read_csv(out_dir / "iqm.csv")[["method", "n_tasks"]].values.tolist() == [["dropout", 1], ["none", 2]]

    md = (out_dir / "comparison.md").read_text()
    ci = stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3) * 100
    assert f"**{values.mean() * 100:.1f} ± {ci:.1f}**" in md
    tex = (out_dir / "comparison.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"Test acc (\%)" in tex and r"$\pm$" in tex
    assert "±" not in tex and "−" not in tex


def test_report_states_its_statistics(tmp_path, capsys):
    make_sweep(tmp_path)
    out, md = report_texts(tmp_path, capsys)
    for text in (out, md):
        text = text.replace("\\", "")
        assert "95% confidence interval of the mean over seeds" in text
        assert "paired t-test over the seeds both ran" in text and "Welch's t-test" in text
        assert "Holm's step-down method (Holm 1979) over the K = 2 comparisons" in text
        assert "probability of improvement" in text and "2,000 resamples" in text
        assert "15 equal-width confidence bins" in text and "training seconds per epoch" in text


def test_iqm_across_tasks(tmp_path, capsys):
    scores = {("mnist", "mlp"): [0.90, 0.92, 0.95], ("fashion", "cnn"): [0.80, 0.70, 0.85]}
    for (dataset, model), values in scores.items():
        for seed, acc in enumerate(values):
            make_run(tmp_path, f"{dataset}/d{seed}", test_acc=acc, seed=seed, dataset=dataset, model=model)
            make_run(tmp_path, f"{dataset}/n{seed}", test_acc=acc - 0.1, seed=seed, dataset=dataset, model=model,
                     regularizer="none", p="")
    # a second dropout setting on mnist, worse on validation: the first one counts there
    for seed in range(3):
        make_run(tmp_path, f"mnist/q{seed}", test_acc=0.99, val_acc=0.5, seed=seed, p="0.2")
    built = build(tmp_path)
    row = built.iqm.set_index("method").loc["dropout"]
    pooled = np.concatenate(list(scores.values()))
    assert row["n_tasks"] == 2 and row["runs"] == 6
    assert row["iqm"] == pytest.approx(stats.trim_mean(pooled, 0.25))
    assert (row["iqm"], row["iqm_low"], row["iqm_high"]) == pytest.approx(
        report.iqm_with_ci([np.array(v) for v in scores.values()]))
    assert "dropout p=0.5" in row["settings_used"] and "p=0.2" not in row["settings_used"]
    assert built.iqm["method"].tolist() == ["dropout", "none"]
    assert "stratified bootstrap" in report_texts(tmp_path, capsys)[0]


def test_learning_curves_share_y_axis(tmp_path):
    make_run(tmp_path, "high", test_acc=0.95)
    make_run(tmp_path, "low", test_acc=0.30, regularizer="none", p="")
    make_run(tmp_path, "old", test_acc=0.60, p="0.2", fmt="1")
    built = build(tmp_path)
    for value in ("accuracy", "loss"):
        fig = report.learning_curve_figure(built, value)
        axes = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
        assert len(axes) == 3
        assert len({ax.get_ylim() for ax in axes}) == 1, value
        assert all("(n=1)" in ax.get_title() for ax in axes)
    labels = [t.get_text() for t in fig.legends[0].texts]
    assert {"train (mean over seeds)", "val (mean over seeds)", "test (mean over seeds)"} <= set(labels)


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
