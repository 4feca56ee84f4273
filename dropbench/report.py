"""dropbench report: turn finished run directories into comparison tables and plots.

This module owns the `dropbench report [DIR ...]` command. It reads only what the
training side leaves on disk (summary.csv, metrics.csv; their columns are defined in
dropbench.results), so it never imports torch or hydra and works on results copied from
another machine. docs/report.md is the reference for every statistic and plot.

Pipeline: find run directories under each DIR -> read and validate every summary.csv
(formats 1 and 2) -> keep one run per run_key -> aggregate the seeds of each group_key ->
compare each group with its `none` baseline (t-test, Holm-adjusted p, probability of
improvement) -> select each method's setting on validation accuracy and compare the
selections -> IQM across tasks -> write tables and plots into --out, and print them.

Statistics (only runs with status `ok` are counted):
- A group is all runs sharing `group_key`, i.e. the same config except the seed; a task is
  a dataset and model; a method is a regularizer, and its groups in a task are its settings.
- Per group and metric: mean, std (ddof=1) and the half-width of the 95% confidence
  interval of the mean, t.ppf(0.975, n-1) * std / sqrt(n), over the runs that have the
  metric. Empty for n = 1.
- Baseline: the `none` group of the same task whose non-regularizer settings match;
  if none matches, the `none` group with the most runs.
- Test on final test accuracy, group minus baseline: a paired t-test over the seeds both
  ran when at least 2 match (runs with the same seed share what the seed controls, such as
  the initial weights, so pairing removes that variation), else Welch's t-test when both
  have n >= 2, else the difference of means alone. The p-values of a table are adjusted
  together with Holm's method (Holm 1979).
- Probability of improvement and IQM follow Agarwal et al. 2021 ("Deep Reinforcement
  Learning at the Edge of the Statistical Precipice", NeurIPS), with percentile bootstrap
  intervals from a fixed seed, so a report is reproducible.
"""

import argparse
import math
import os
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table
from rich.text import Text
from scipy import stats

from dropbench.results import SPLITS, NotASummary, atomic_file, check_summary

OLD_FORMAT = "1"  # dropbench 0.1: no validation split, best_test_acc picked on the test set
# The summary.csv columns (see dropbench.results.SUMMARY_COLUMNS) this report reads from every
# format, and those only format 2 has; other columns are carried along untouched.
READ_COLUMNS = (
    "format", "run_key", "group_key", "status", "dataset", "model", "regularizer", "p",
    "seed", "epochs", "lr", "batch_size", "optimizer", "epochs_completed", "diverged_epoch",
    "train_acc", "test_acc", "gap", "test_loss", "error", "finished_at",
)
FORMAT2_COLUMNS = (
    "val_fraction", "val_acc", "val_loss", "test_ece", "best_epoch", "best_val_acc", "test_acc_at_best",
    "train_seconds", "seconds_per_epoch",
)
# Metrics aggregated per group and shown in the main table: (header, scale, decimals).
STAT_COLUMNS = {
    "test_acc": ("Test acc (%)", 100, 1),
    "test_acc_at_best": ("Test acc @val-best (%)", 100, 1),
    "val_acc": ("Val acc (%)", 100, 1),
    "train_acc": ("Train acc (%)", 100, 1),
    "gap": ("Gap (pp)", 100, 1),
    "test_loss": ("Test NLL", 1, 3),
    "test_ece": ("Test ECE (%)", 100, 1),
    "seconds_per_epoch": ("Train s/epoch", 1, 2),
}
AGGREGATED = [*STAT_COLUMNS, "best_val_acc"]  # best_val_acc: what the tuned comparison selects on
# Allowed values of a counted run's numbers: (low, high, integer). Empty means "not recorded".
# val_fraction comes first: whether the validation columns are required depends on it.
DOMAINS = {
    "val_fraction": (0, 1, False),
    **{c: (0, 1, False) for c in ("train_acc", "val_acc", "test_acc", "best_val_acc", "test_acc_at_best",
                                  "test_ece")},
    "gap": (-1, 1, False),
    **{c: (0, math.inf, False) for c in ("train_loss", "val_loss", "test_loss", "train_seconds",
                                         "seconds_per_epoch", "wall_seconds")},
    **{c: (0, math.inf, True) for c in ("epochs", "epochs_completed", "best_epoch")},
}
REQUIRED = ("train_acc", "test_acc", "gap", "test_loss", "epochs_completed")  # by every counted run
REQUIRED_FORMAT2 = ("val_fraction", "test_ece", "train_seconds", "seconds_per_epoch")
REQUIRED_WITH_VAL = ("val_acc", "val_loss", "best_epoch", "best_val_acc", "test_acc_at_best")
# Settings every summary has; cfg.* columns that are fixed within a group join them.
BASE_SETTINGS = ["epochs", "lr", "batch_size", "optimizer", "val_fraction"]
TASK = ["dataset", "model"]
COMPARISON_HEADERS = ["Δ vs none (pp)", "p", "p (Holm)", "P(>none)", "Test"]
TEXT_HEADERS = {"Group", "Test", "Task", "Method", "Selected setting", "Selected", "Tasks", "Settings used"}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
MAX_PANELS = 16  # learning-curve subplots; beyond this the figure is unreadable
SPLIT_COLORS = dict(zip(SPLITS, ["tab:blue", "tab:green", "tab:orange"]))  # train, val, test
MISSING = "—"
NO_NONE = "no 'none' group among these runs"
MISMATCH_NOTE = ("* no 'none' group has the same non-regularizer settings; "
                 "compared with the 'none' group with the most runs")


class ReportError(Exception):
    """A problem that stops the report; main prints it as one line."""


class SkipFile(Exception):
    """A file that is not a readable finished run; the message says why."""


@dataclass
class Report:
    """Everything the outputs are made from."""
    groups: pd.DataFrame  # one row per group_key, in table order
    runs: pd.DataFrame  # counted runs: status ok, one per run_key
    unsuccessful: pd.DataFrame  # finished runs with another status
    curves: pd.DataFrame  # per-epoch metrics of counted runs: group_key, split, epoch, accuracy, loss
    tuned: pd.DataFrame  # per task and method its validation-selected setting; empty when nothing to select
    iqm: pd.DataFrame  # one row per method across tasks; empty unless the runs span several tasks
    incomplete: list[Path] = field(default_factory=list)  # run dirs without summary.csv
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (summary.csv, why)
    unplotted: list[tuple[Path, str]] = field(default_factory=list)  # (metrics.csv of a counted run, why)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (dropped run, kept run)


# -----------------------------------------------------------------------------
# finding and reading runs

def find_runs(root: Path, exclude: Path) -> tuple[list[Path], list[Path]]:
    """Walk `root` and return (summary.csv files, incomplete run dirs), not entering `exclude`."""
    summaries, started, hydra_only = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        has_hydra = ".hydra" in dirnames
        # hidden dirs (.hydra, .git) hold no runs; the output dir holds an earlier report
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and (here / d).resolve() != exclude)
        if "summary.csv" in filenames:
            summaries.append(here / "summary.csv")
        elif "metrics.csv" in filenames:
            started.append(here)
        elif has_hydra:
            hydra_only.append(here)
    # a Hydra job dir whose seeds run in subdirs (job/seed_3/) is a container, not a run
    run_dirs = [s.parent for s in summaries] + started
    waiting = [d for d in hydra_only if not any(d in r.parents for r in run_dirs)]
    return summaries, sorted(started + waiting)


def read_summary(path: Path) -> dict:
    """Read one summary.csv into a dict of strings; raise SkipFile unless it is a finished run.

    A format-1 summary (dropbench 0.1) had no validation split: its format-2 columns read as
    empty, with val_fraction 0, and its best_test_acc and best_epoch, picked on the test set,
    are dropped.
    """
    try:
        run = check_summary(path)
    except NotASummary as e:
        raise SkipFile(str(e)) from None
    if run["format"].strip() == OLD_FORMAT:
        run.pop("best_test_acc", None)
        run.update({c: "" for c in FORMAT2_COLUMNS}, val_fraction="0")
    missing = [c for c in (*READ_COLUMNS, *FORMAT2_COLUMNS) if c not in run]
    if missing:
        raise SkipFile(f"missing columns: {', '.join(missing)}")
    run["finished_at"] = parse_time(run["finished_at"])
    if run["status"] == "ok":
        check_numbers(run)
    return run


def parse_time(text: str) -> datetime:
    """ISO timestamp as an aware UTC datetime (naive ones are taken as UTC) so all compare."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SkipFile(f"bad finished_at {text!r}") from None
    return when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)


def check_numbers(run: dict) -> None:
    """Raise SkipFile unless every number of an ok run lies in its domain (DOMAINS) and those the
    statistics need are present: REQUIRED always, REQUIRED_FORMAT2 from format 2 on, and
    REQUIRED_WITH_VAL when the run held out a validation split."""
    required = set(REQUIRED)
    if run["format"].strip() != OLD_FORMAT:
        required.update(REQUIRED_FORMAT2)
    for col, (low, high, integer) in DOMAINS.items():
        text = str(run.get(col, "")).strip()
        try:
            value = float(text) if text else math.nan
        except ValueError:
            value = None
        if value is not None and math.isnan(value):
            if col in required:
                raise SkipFile(f"status ok but {col} is {text!r} (required)")
            continue
        if value is None or not math.isfinite(value) or not low <= value <= high or (
                integer and not value.is_integer()):
            kind = "an integer" if integer else "a number"
            kind += f" ≥ {low}" if high == math.inf else f" in [{low}, {high}]"
            raise SkipFile(f"status ok but {col} is {text!r} (expected {kind})")
        if col == "val_fraction" and value > 0:
            required.update(REQUIRED_WITH_VAL)
    if not run["seed"].lstrip("-").isdigit():
        raise SkipFile(f"seed is {run['seed']!r}, expected an integer")


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """Per-epoch accuracy and loss of one run from its metrics.csv; raise SkipFile if unusable."""
    try:
        metrics = pd.read_csv(run_dir / "metrics.csv")
    except FileNotFoundError:
        raise SkipFile("missing") from None
    except (OSError, ValueError) as e:  # pandas parse errors are ValueErrors
        raise SkipFile(f"unreadable: {e}") from None
    missing = {"epoch", "split", "accuracy", "loss"} - set(metrics.columns)
    if missing:
        raise SkipFile(f"missing columns: {', '.join(sorted(missing))}")
    metrics = metrics[["epoch", "split", "accuracy", "loss"]].copy()
    for col in ("epoch", "accuracy", "loss"):
        metrics[col] = pd.to_numeric(metrics[col], errors="coerce")
    return metrics.dropna(subset=["epoch"])


def drop_duplicates(runs: list[dict]) -> tuple[list[dict], list[tuple[Path, Path]]]:
    """Keep one run per run_key: the newest with status ok if there is one, else the newest, so
    a finished result is never hidden by a later failed or interrupted attempt of the same run.

    Returns the kept runs in their original order and (dropped run dir, kept run dir) pairs.
    """
    kept = {}
    for run in sorted(runs, key=lambda r: (r["status"] == "ok", r["finished_at"])):
        kept[run["run_key"]] = run  # the last one wins
    dropped = [(run["dir"], kept[run["run_key"]]["dir"]) for run in runs if kept[run["run_key"]] is not run]
    return [run for run in runs if kept[run["run_key"]] is run], dropped


# -----------------------------------------------------------------------------
# statistics

def mean_std_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, sample std (ddof=1) and 95% CI half-width of the mean (Student t) of the finite
    values; nan where fewer than 2 (mean nan where none)."""
    values = values[np.isfinite(values)]
    n = len(values)
    if n < 2:
        return (float(values[0]) if n else math.nan), math.nan, math.nan
    std = float(values.std(ddof=1))
    return float(values.mean()), std, float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))


@dataclass
class Comparison:
    """A metric of a group against its baseline."""
    delta: float  # group minus baseline
    ci95: float  # half-width of the 95% CI of delta; nan when not computable
    p_value: float
    test: str  # "paired", "welch", or "" when neither applies
    n_pairs: int  # seeds used by the paired test


def compare(group: pd.Series, baseline: pd.Series) -> Comparison:
    """Compare two Series of a metric indexed by seed (see module docstring for the choice)."""
    group, baseline = group.dropna(), baseline.dropna()
    seeds = group.index.intersection(baseline.index)
    # identical values make the t statistic 0/0; scipy warns and returns nan, shown as "—"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if len(seeds) >= 2:
            a, b = group[seeds].to_numpy(float), baseline[seeds].to_numpy(float)
            result = stats.ttest_rel(a, b)
            return Comparison(float(np.mean(a - b)), half_width(result), float(result.pvalue),
                              "paired", len(seeds))
        if len(group) >= 2 and len(baseline) >= 2:
            result = stats.ttest_ind(group.to_numpy(float), baseline.to_numpy(float), equal_var=False)
            return Comparison(float(group.mean() - baseline.mean()), half_width(result),
                              float(result.pvalue), "welch", 0)
    return Comparison(float(group.mean() - baseline.mean()), math.nan, math.nan, "", 0)


def half_width(result) -> float:
    """Half-width of the 95% CI of a scipy t-test result."""
    ci = result.confidence_interval(0.95)
    return float(ci.high - ci.low) / 2


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values; nan entries are not tests and stay nan.

    With the K finite p-values sorted, p(1) <= ... <= p(K), the adjusted p(i) is
    max over j <= i of min(1, (K - j + 1) * p(j)). Rejecting where it is below alpha keeps
    the chance of any false rejection among the K tests at most alpha.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = np.minimum(1.0, (len(order) - np.arange(len(order))) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def probability_of_improvement(x: np.ndarray, y: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                               seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """P(X > Y) + P(X = Y) / 2 over all pairs of a run of x and a run of y (the Mann-Whitney U
    statistic over nx * ny), and its 95% percentile bootstrap interval.

    Agarwal et al. 2021 (rliable). Each resample draws nx runs of x and ny runs of y with
    replacement (x first, from numpy's default_rng(seed)). The interval is nan when either
    side has fewer than 2 runs.

    Args:
        x: scores of the method.
        y: scores of the baseline.
        resamples: bootstrap resamples.
        seed: seed of the resampling.
    """
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]

    def estimate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        diff = a[..., :, None] - b[..., None, :]
        return (diff > 0).mean(axis=(-2, -1)) + 0.5 * (diff == 0).mean(axis=(-2, -1))

    point = float(estimate(x, y))
    if len(x) < 2 or len(y) < 2:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    xs = x[rng.integers(0, len(x), (resamples, len(x)))]
    ys = y[rng.integers(0, len(y), (resamples, len(y)))]
    low, high = np.percentile(estimate(xs, ys), [2.5, 97.5])
    return point, float(low), float(high)


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (scipy.stats.trim_mean with 0.25 cut from each end)."""
    return float(stats.trim_mean(scores, 0.25))


def iqm_with_ci(per_task: list[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """IQM of all runs of all tasks and its 95% stratified-bootstrap percentile interval.

    Agarwal et al. 2021 (rliable): each resample draws, within every task, as many runs as the
    task has, with replacement (tasks in the given order, from numpy's default_rng(seed)), so
    every resample keeps the tasks' proportions. The interval is nan when a task has fewer than
    2 runs (resampling one run gives it no spread).

    Args:
        per_task: the scores of each task.
        resamples: bootstrap resamples.
        seed: seed of the resampling.
    """
    point = iqm(np.concatenate(per_task))
    if min(len(t) for t in per_task) < 2:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    samples = np.concatenate([t[rng.integers(0, len(t), (resamples, len(t)))] for t in per_task], axis=1)
    low, high = np.percentile(stats.trim_mean(samples, 0.25, axis=1), [2.5, 97.5])
    return point, float(low), float(high)


# -----------------------------------------------------------------------------
# groups and their comparison with the baseline

def setting_columns(runs: pd.DataFrame) -> list[str]:
    """Columns that describe a group's config: BASE_SETTINGS plus cfg.* values fixed across its seeds."""
    cfg = [c for c in runs.columns if c.startswith("cfg.") and c.rsplit(".", 1)[-1] != "seed"]
    if not cfg:
        return BASE_SETTINGS
    # anything that varies between the seeds of one group describes a run, not the group
    fixed = runs.groupby("group_key")[cfg].nunique(dropna=False).max() <= 1
    return BASE_SETTINGS + [c for c in cfg if fixed[c]]


def summarize_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group_key: settings, seeds, metric statistics, label, rank, baseline comparison
    and whether the group is its method's validation-selected setting."""
    settings = setting_columns(runs)
    rows = []
    for key, g in runs.groupby("group_key", sort=False):
        first = g.iloc[0]
        row = {"group_key": key, **{c: first[c] for c in ["dataset", "model", "regularizer", "p"] + settings},
               "n": len(g), "seeds": " ".join(str(s) for s in sorted(g["seed"])),
               "format": " ".join(sorted(set(g["format"].str.strip())))}
        for col in AGGREGATED:
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_ci95"] = mean_std_ci(g[col].to_numpy(float))
        row["best_val_acc_n"] = int(g["best_val_acc"].notna().sum())
        rows.append(row)
    groups = pd.DataFrame(rows)
    groups["label"], groups["name"], groups["variant"] = label_groups(groups, settings)
    groups["rank"] = groups.groupby(TASK)["test_acc_mean"].rank(ascending=False, method="min").astype(int)
    groups["best"] = groups["rank"] == 1
    groups = add_baseline_comparisons(groups, runs, settings)
    groups = groups.sort_values([*TASK, "rank", "label"], ignore_index=True)
    groups["selectable"], groups["selected"] = select_settings(groups[SELECTION_COLUMNS])
    return groups


def label_groups(groups: pd.DataFrame, settings: list[str]) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Labels "dataset/model regularizer p=.. setting=..", the same without the task (name), and
    the settings part alone (variant).

    A setting joins the label when it varies among the groups of one dataset/model/regularizer
    and is not already implied by the label so far (e.g. cfg.regularizer.p moving with p), named
    without its cfg. prefix, and a regularizer's own setting by its key alone (alpha=1.0).
    """
    p_part = groups["p"].where(groups["p"] == "", " p=" + groups["p"])
    name = groups["regularizer"] + p_part
    variant = pd.Series("", index=groups.index)
    for _, family in groups.groupby([*TASK, "regularizer"]):
        for col in settings:
            values = family[col].astype(str)
            if values.groupby(name[family.index]).nunique().max() > 1:
                part = " " + col.removeprefix("cfg.").removeprefix("regularizer.") + "=" + values
                name[family.index] += part
                variant[family.index] += part
    return groups["dataset"] + "/" + groups["model"] + " " + name, name, variant.str.strip()


BASELINE_COLUMNS = ["baseline_group_key", "baseline_label", "baseline_settings_match", "note"]
COMPARISON_COLUMNS = ["test", "n_pairs", "delta", "delta_ci95", "p_value", "p_holm",
                      "p_improve", "p_improve_low", "p_improve_high"]


def add_baseline_comparisons(groups: pd.DataFrame, runs: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """Add baseline_* columns, the test of each group's final test accuracy against its `none`
    baseline, Holm-adjusted p-values over all these tests, and the probability of improvement."""
    acc_by_seed = runs.groupby(["group_key", "seed"])["test_acc"].mean()
    shared = [c for c in settings if not c.startswith("cfg.regularizer.")]
    rows = []
    for _, group in groups.iterrows():
        nones = groups[(groups["dataset"] == group["dataset"]) & (groups["model"] == group["model"])
                       & (groups["regularizer"] == "none")]
        row = {"baseline_group_key": "", "baseline_label": "", "baseline_settings_match": False, "note": NO_NONE}
        if not nones.empty:
            matching = nones[(nones[shared] == group[shared]).all(axis=1)]
            pool = matching if not matching.empty else nones
            baseline = pool.sort_values(["n", "label"], ascending=[False, True]).iloc[0]
            row.update(baseline_group_key=baseline["group_key"], baseline_label=baseline["label"],
                       baseline_settings_match=not matching.empty, note="")
            if baseline["group_key"] == group["group_key"]:
                row["note"] = "baseline"
            else:
                row.update(comparison_columns(acc_by_seed[group["group_key"]], acc_by_seed[baseline["group_key"]]))
        rows.append(row)
    compared = pd.DataFrame(rows, index=groups.index, columns=BASELINE_COLUMNS + COMPARISON_COLUMNS)
    compared["p_holm"] = holm(compared["p_value"])
    return pd.concat([groups, compared], axis=1)


def comparison_columns(group: pd.Series, baseline: pd.Series) -> dict:
    """The test and the probability of improvement of one metric (Series indexed by seed)."""
    result = compare(group, baseline)
    p_improve, low, high = probability_of_improvement(group.to_numpy(float), baseline.to_numpy(float))
    return {"test": result.test, "n_pairs": result.n_pairs, "delta": result.delta, "delta_ci95": result.ci95,
            "p_value": result.p_value, "p_improve": p_improve, "p_improve_low": low, "p_improve_high": high}


# -----------------------------------------------------------------------------
# tuned comparison: each method at its validation-selected setting

# All that the selection may read: no test metric is among them.
SELECTION_COLUMNS = [*TASK, "regularizer", "label", "n", "best_val_acc_n", "best_val_acc_mean"]


def select_settings(grid: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(selectable, selected) per group: a group is selectable when all its runs have a validation
    split; per task and method the selectable group with the highest mean best_val_acc over seeds
    is selected, ties going to more seeds, then to the first label in order.

    Args:
        grid: the groups, reduced to SELECTION_COLUMNS.
    """
    selectable = grid["best_val_acc_n"].eq(grid["n"]) & grid["best_val_acc_mean"].notna()
    ranked = grid[selectable].sort_values(["best_val_acc_mean", "n", "label"], ascending=[False, False, True])
    chosen = ranked.drop_duplicates([*TASK, "regularizer"]).index
    return selectable, pd.Series(grid.index.isin(chosen), index=grid.index)


def several_settings(groups: pd.DataFrame) -> bool:
    """Whether some method ran with more than one setting in some task."""
    return bool(groups.groupby([*TASK, "regularizer"]).size().max() > 1)


def tuned_comparisons(groups: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per task and method: the selected setting, its test accuracy at the selected epoch
    (test_acc_at_best) and the comparison with the selected `none` setting of the task."""
    at_best = runs.groupby(["group_key", "seed"])["test_acc_at_best"].mean()
    rows = []
    for (dataset, model), task in groups.groupby(TASK, sort=False):
        baseline = task[task["selected"] & (task["regularizer"] == "none")]
        for method, settings in task.groupby("regularizer", sort=False):
            row = {"dataset": dataset, "model": model, "method": method, "settings": len(settings),
                   "selectable": int(settings["selectable"].sum()), "note": ""}
            pick = settings[settings["selected"]]
            if pick.empty:
                rows.append({**row, "note": "no setting with a validation split"})
                continue
            pick = pick.iloc[0]
            row.update(group_key=pick["group_key"], label=pick["label"], name=pick["name"], n=pick["n"],
                       **{k: pick[k] for k in pick.index if k.startswith(("best_val_acc_", "test_acc_at_best_"))})
            if method == "none":
                row["note"] = "baseline"
            elif baseline.empty:
                row["note"] = NO_NONE if (task["regularizer"] != "none").all() else "no selectable 'none' setting"
            else:
                row.update(baseline_group_key=baseline["group_key"].iloc[0], baseline_label=baseline["label"].iloc[0],
                           **comparison_columns(at_best[pick["group_key"]], at_best[baseline["group_key"].iloc[0]]))
            rows.append(row)
    tuned = pd.DataFrame(rows)
    for col in ["group_key", "label", "name", "n", "baseline_group_key", "baseline_label", "best_val_acc_mean",
                "best_val_acc_ci95", "test_acc_at_best_mean", "test_acc_at_best_ci95", *COMPARISON_COLUMNS]:
        if col not in tuned:
            tuned[col] = math.nan
    tuned["p_holm"] = holm(tuned["p_value"])
    tuned["baseline_settings_match"] = True  # selected on validation: no settings to match
    order = tuned.assign(task_order=tuned.groupby(TASK, sort=False).ngroup())
    order = order.sort_values(["task_order", "test_acc_at_best_mean", "method"], ascending=[True, False, True],
                              na_position="last")
    return tuned.loc[order.index].reset_index(drop=True)


def iqm_table(groups: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per method, the IQM of final test accuracy over its runs on all tasks, with a stratified
    bootstrap CI. In each task the method counts with its only setting, or with its
    validation-selected one if it ran several (a task where none is selectable is left out)."""
    rows = []
    for method, family in groups.groupby("regularizer"):
        per_task, tasks, used, left_out = [], [], [], []
        for (dataset, model), settings in family.groupby(TASK, sort=False):
            chosen = settings if len(settings) == 1 else settings[settings["selected"]]
            if chosen.empty:
                left_out.append(f"{dataset}/{model}")
                continue
            key = chosen["group_key"].iloc[0]
            per_task.append(runs.loc[runs["group_key"] == key, "test_acc"].to_numpy(float))
            tasks.append(f"{dataset}/{model}")
            used.append(chosen["label"].iloc[0])
        row = {"method": method, "n_tasks": len(tasks), "tasks": ", ".join(tasks),
               "runs": sum(len(t) for t in per_task), "settings_used": "; ".join(used),
               "left_out": ", ".join(left_out), "iqm": math.nan, "iqm_low": math.nan, "iqm_high": math.nan}
        if per_task:
            row["iqm"], row["iqm_low"], row["iqm_high"] = iqm_with_ci(per_task)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["iqm", "method"], ascending=[False, True], ignore_index=True)


# -----------------------------------------------------------------------------
# building the report

def build_report(dirs: list[Path], out_dir: Path) -> Report:
    """Scan `dirs`, validate runs, and compute group statistics. Raises ReportError if nothing counts."""
    summaries, incomplete = {}, {}
    for root in dirs:
        files, unfinished = find_runs(root, out_dir.resolve())
        # keyed by real path: overlapping DIRs (results and results/sweeps) must not count a run twice
        for path in files:
            summaries.setdefault(path.resolve(), path)
        for run_dir in unfinished:
            incomplete.setdefault(run_dir.resolve(), run_dir)
    found, skipped = [], []
    for path in summaries.values():
        try:
            found.append({**read_summary(path), "dir": path.parent})
        except SkipFile as why:
            skipped.append((path, str(why)))

    runs, duplicates = drop_duplicates(found)
    ok = pd.DataFrame([run for run in runs if run["status"] == "ok"])
    unsuccessful = pd.DataFrame([run for run in runs if run["status"] != "ok"])
    if ok.empty:
        counts = f"{len(unsuccessful)} with another status, {len(incomplete)} incomplete, {len(skipped)} skipped"
        raise ReportError(f"no finished runs with status ok under {', '.join(map(str, dirs))} ({counts})")

    cfg = [c for c in ok.columns if c.startswith("cfg.")]
    ok[cfg] = ok[cfg].fillna("")  # a cfg column some runs lack compares as empty
    ok[AGGREGATED] = ok[AGGREGATED].apply(pd.to_numeric, errors="coerce")
    ok["seed"] = ok["seed"].astype(int)
    ok["val_fraction"] = ok["val_fraction"].map(lambda v: f"{float(v):g}")  # "0" and "0.0" are one setting
    curves, unplotted = load_curves(ok)
    groups = summarize_groups(ok)
    tunable = several_settings(groups) and groups["selectable"].any()
    tuned = tuned_comparisons(groups, ok) if tunable else pd.DataFrame()
    spans_tasks = len(groups[TASK].drop_duplicates()) > 1
    return Report(groups=groups, runs=ok, unsuccessful=unsuccessful, curves=curves, tuned=tuned,
                  iqm=iqm_table(groups, ok) if spans_tasks else pd.DataFrame(),
                  incomplete=list(incomplete.values()), skipped=skipped, unplotted=unplotted, duplicates=duplicates)


def load_curves(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Per-epoch metrics of all counted runs, and the metrics.csv files that could not be used."""
    curves, unplotted = [], []
    for run in runs.itertuples():
        try:
            curves.append(read_metrics(run.dir).assign(group_key=run.group_key))
        except SkipFile as why:
            unplotted.append((run.dir / "metrics.csv", str(why)))
    if not curves:
        return pd.DataFrame(columns=["epoch", "split", "accuracy", "loss", "group_key"]), unplotted
    return pd.concat(curves, ignore_index=True), unplotted


# -----------------------------------------------------------------------------
# what the report says

def problem_sections(report: Report) -> list[tuple[str, list[str]]]:
    """(heading, lines) for what the statistics and the plots left out; empty sections dropped."""
    unplotted = [f"{path}: {why} (run counted)" for path, why in report.unplotted]
    sections = [("Not counted", not_counted_lines(report)), ("Not in learning curves", unplotted)]
    return [(heading, lines) for heading, lines in sections if lines]


def not_counted_lines(report: Report) -> list[str]:
    """One line per run or file that did not enter the statistics, saying why."""
    lines = []
    for run in report.unsuccessful.itertuples():
        if run.status == "diverged":
            detail = f"diverged at epoch {run.diverged_epoch or '?'}"
        elif run.status == "failed":
            detail = f"failed: {(run.error or 'no error message').splitlines()[0][:200]}"
        else:
            detail = f"interrupted after {run.epochs_completed or '?'} epochs"
        lines.append(f"{run.dir}: {detail}")
    lines += [f"{d}: incomplete (no summary.csv: still running or killed)" for d in report.incomplete]
    lines += [f"{path}: skipped, {why}" for path, why in report.skipped]
    lines += [f"{old}: duplicate of {kept} (same run_key; the newest ok run is kept, else the newest)"
              for old, kept in report.duplicates]
    return lines


def counts_line(report: Report) -> str:
    return (f"Counted {len(report.runs)} runs in {len(report.groups)} groups; not counted: "
            f"{len(report.unsuccessful)} failed/diverged/interrupted, {len(report.incomplete)} incomplete, "
            f"{len(report.skipped)} skipped files, {len(report.duplicates)} duplicates.")


def format1_line(report: Report) -> str | None:
    """What format-1 runs lack, if any were counted."""
    old = int((report.runs["format"].str.strip() == OLD_FORMAT).sum())
    if not old:
        return None
    return (f"{old} runs are in summary format 1 (dropbench 0.1): trained without a validation split, so their "
            "validation accuracy, validation-selected epoch and the selection of settings are unavailable (— in the "
            "tables, or the column left out where no group has it); "
            "their best test accuracy was picked on the test set and is not used.")


def improvement_note(metric: str) -> str:
    return (f"P(>none): probability of improvement (Agarwal et al. 2021): the chance that a run of the method has "
            f"higher {metric} than a run of the baseline, P(X > Y) + ½·P(X = Y) over all pairs of runs; "
            f"[95% percentile bootstrap interval: {BOOTSTRAP_RESAMPLES:,} resamples of the runs of each side, "
            f"seed {BOOTSTRAP_SEED}]; no interval when a side has fewer than 2 runs.")


def comparison_notes(metric: str, k: int) -> list[str]:
    return [
        (f"Δ: {metric} minus the 'none' baseline of the same dataset/model, in pp, ± 95% CI. Test paired: a "
         "paired t-test over the seeds both ran (Δ = mean of the k per-seed differences, t interval with k−1 dof); "
         "Welch: Welch's t-test when fewer than 2 seeds are shared (Δ = difference of means); too few runs: Δ alone."),
        (f"p: two-sided p-value of that test. p (Holm): adjusted with Holm's step-down method (Holm 1979) over the "
         f"K = {k} comparisons with a p-value in this table, so the chance of any false positive among them is at "
         "most the level you compare it with."),
        improvement_note(metric),
    ]


def main_notes(report: Report) -> list[str]:
    groups = report.groups
    notes = [
        ("Accuracies and ECE in percent, gap in percentage points (pp): mean ± half-width of the 95% confidence "
         "interval of the mean over seeds (Student t, n−1 dof); no ± when n = 1; — where not recorded (a column no "
         "group recorded is left out)."),
        ("Test acc, Val acc, Train acc, Gap (train − test accuracy), Test NLL: at the last epoch. Test acc @val-best: "
         "test accuracy at the epoch with the highest validation accuracy (the test set plays no part in choosing "
         "it); needs a validation split."),
        ("Test NLL: mean negative log-likelihood of the test labels (nats). Test ECE: expected calibration error, "
         "15 equal-width confidence bins (Guo et al. 2017). Train s/epoch: training seconds per epoch as the run "
         "recorded them (not wall time, which includes start-up)."),
        "Rank is by mean final test accuracy within each dataset/model; the best is in bold.",
        *comparison_notes("final test accuracy", int(groups["p_value"].notna().sum())),
    ]
    no_none = groups.loc[groups["note"] == NO_NONE, TASK].drop_duplicates()
    notes += [f"{d}/{m}: no Δ, p or P(>none): {NO_NONE}." for d, m in no_none.itertuples(index=False)]
    if any_mismatched_baseline(report):
        notes.append(MISMATCH_NOTE)
    if several_settings(groups) and not groups["selectable"].any():
        notes.append("No tuned comparison: methods ran with several settings, but no group has a validation split "
                     "(summary format 1 or val_fraction = 0), so none can be selected without the test set.")
    return notes + [line for line in [format1_line(report)] if line]


def tuned_notes(report: Report) -> list[str]:
    groups, tuned = report.groups, report.tuned
    notes = [
        ("Fair comparison: per dataset/model and method (regularizer), the setting with the highest mean validation "
         "accuracy over seeds (each run at its validation-selected epoch) is selected; ties go to more seeds, then "
         "to the first name. Test numbers play no part in the choice. Shown: the selected setting's validation "
         "accuracy and its test accuracy at the selected epoch, ± 95% CI over seeds; the baseline is the "
         "selected 'none' setting."),
        *comparison_notes("test accuracy @val-best", int(tuned["p_value"].notna().sum())),
    ]
    unselectable = int((~groups["selectable"]).sum())
    if unselectable:
        notes.append(f"Groups that cannot be selected: {unselectable}; their runs had no validation split "
                     "(summary format 1 or val_fraction = 0). The grid marks them.")
    return notes


def iqm_notes(report: Report) -> list[str]:
    notes = [
        ("IQM: interquartile mean (the mean of the middle 50% of the runs) of final test accuracy, in percent, over "
         "all runs of the method on all tasks it ran (Agarwal et al. 2021). In each task the method counts with its "
         "only setting, or with its validation-selected one if it ran several."),
        (f"[95% CI]: percentile interval of {BOOTSTRAP_RESAMPLES:,} stratified bootstrap resamples (the runs of each "
         f"task resampled within the task, seed {BOOTSTRAP_SEED}); none when a task has fewer than 2 runs."),
        "The IQMs of methods that ran on different tasks are not comparable.",
    ]
    left = report.iqm[report.iqm["left_out"] != ""]
    notes += [f"{row.method}: left out of {row.left_out} (several settings, none with a validation split)."
              for row in left.itertuples()]
    return notes


# -----------------------------------------------------------------------------
# tables

@dataclass
class Section:
    """A table of the report with what its numbers mean."""
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]
    bold: list[bool] = field(default_factory=list)


def number(x: float, decimals: int, sign: bool = False) -> str:
    """Format with a real minus sign, which tables typeset better than a hyphen."""
    return f"{x:{'+' if sign else ''}.{decimals}f}".replace("-", "−")


def mean_pm_ci(mean: float, ci: float, decimals: int, sign: bool = False) -> str:
    if math.isnan(mean):
        return MISSING
    text = number(mean, decimals, sign)
    return text if math.isnan(ci) else f"{text} ± {number(ci, decimals)}"


def p_text(p: float) -> str:
    return MISSING if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_cells(row: pd.Series) -> list[str]:
    """Δ, p, p (Holm), P(>none) and test of a row of the groups or the tuned table."""
    if row["note"]:
        return [MISSING] * 4 + [row["note"]]
    delta = mean_pm_ci(row["delta"] * 100, row["delta_ci95"] * 100, 1, sign=True)
    if not row["baseline_settings_match"]:
        delta += "*"
    improve = f"{row['p_improve']:.2f}"
    if not math.isnan(row["p_improve_low"]):
        improve += f" [{row['p_improve_low']:.2f}, {row['p_improve_high']:.2f}]"
    test = {"paired": f"paired, {int(row['n_pairs'])} seeds", "welch": "Welch"}.get(row["test"], "too few runs")
    return [delta, p_text(row["p_value"]), p_text(row["p_holm"]), improve, test]


def table_cells(group: pd.Series, columns: list[str]) -> list[str]:
    """The displayed row of one group: rank, label, n, the STAT_COLUMNS in `columns`, comparison."""
    cells = [str(group["rank"]), group["label"], str(group["n"])]
    for col in columns:
        _, scale, decimals = STAT_COLUMNS[col]
        cells.append(mean_pm_ci(group[f"{col}_mean"] * scale, group[f"{col}_ci95"] * scale, decimals))
    return cells + comparison_cells(group)


def main_section(report: Report) -> Section:
    """The table of all groups; a metric no group recorded (e.g. validation in format 1) is left out."""
    groups = report.groups
    columns = [c for c in STAT_COLUMNS if groups[f"{c}_mean"].notna().any()]
    headers = ["Rank", "Group", "n", *(STAT_COLUMNS[c][0] for c in columns), *COMPARISON_HEADERS]
    return Section("Comparison", headers, [table_cells(g, columns) for _, g in groups.iterrows()],
                   main_notes(report), list(groups["best"]))


def tuned_section(report: Report) -> Section:
    headers = ["Task", "Method", "Selected setting", "Settings (selectable)", "n", "Val acc (%)",
               "Test acc @val-best (%)", *COMPARISON_HEADERS]
    rows = []
    for _, row in report.tuned.iterrows():
        selected = row["name"] if isinstance(row["name"], str) else MISSING
        n = MISSING if math.isnan(row["n"]) else str(int(row["n"]))
        rows.append([f"{row['dataset']}/{row['model']}", row["method"], selected,
                     f"{row['settings']} ({row['selectable']})", n,
                     mean_pm_ci(row["best_val_acc_mean"] * 100, row["best_val_acc_ci95"] * 100, 1),
                     mean_pm_ci(row["test_acc_at_best_mean"] * 100, row["test_acc_at_best_ci95"] * 100, 1),
                     *comparison_cells(row)])
    return Section("Tuned comparison (settings selected on validation)", headers, rows, tuned_notes(report))


def grid_section(report: Report) -> Section:
    headers = ["Task", "Method", "Group", "n", "Val acc (%)", "Test acc @val-best (%)", "Selected"]
    grid = report.groups.sort_values([*TASK, "regularizer", "best_val_acc_mean", "label"],
                                     ascending=[True, True, True, False, True], na_position="last")
    rows = []
    for _, g in grid.iterrows():
        mark = "selected" if g["selected"] else "" if g["selectable"] else "no validation split"
        rows.append([f"{g['dataset']}/{g['model']}", g["regularizer"], g["name"], str(g["n"]),
                     mean_pm_ci(g["best_val_acc_mean"] * 100, g["best_val_acc_ci95"] * 100, 1),
                     mean_pm_ci(g["test_acc_at_best_mean"] * 100, g["test_acc_at_best_ci95"] * 100, 1), mark])
    notes = [("Every setting: mean ± 95% CI over seeds of the validation accuracy the selection uses and of the "
              "test accuracy at each run's selected epoch; 'selected' marks the choice of each method in each task.")]
    return Section("Tuning grid", headers, rows, notes, list(grid["selected"]))


def iqm_section(report: Report) -> Section:
    headers = ["Method", "Tasks", "Runs", "IQM test acc (%) [95% CI]", "Settings used"]
    rows = []
    for row in report.iqm.itertuples():
        value = MISSING if math.isnan(row.iqm) else number(row.iqm * 100, 1)
        if not math.isnan(row.iqm_low):
            value += f" [{number(row.iqm_low * 100, 1)}, {number(row.iqm_high * 100, 1)}]"
        rows.append([row.method, f"{row.n_tasks}: {row.tasks}", str(row.runs), value, row.settings_used])
    return Section("Across tasks: interquartile mean", headers, rows, iqm_notes(report))


def sections(report: Report) -> list[Section]:
    shown = [main_section(report)]
    if not report.tuned.empty:
        shown += [tuned_section(report), grid_section(report)]
    if not report.iqm.empty:
        shown.append(iqm_section(report))
    return shown


def any_mismatched_baseline(report: Report) -> bool:
    groups = report.groups
    return bool((groups["baseline_group_key"].ne("") & ~groups["baseline_settings_match"]).any())


def markdown_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\|*_`<>[]" else c for c in text)


def markdown_table(section: Section) -> list[str]:
    lines = ["| " + " | ".join(section.headers) + " |",
             "|" + "|".join(":--" if h in TEXT_HEADERS else "--:" for h in section.headers) + "|"]
    for i, row in enumerate(section.rows):
        cells = [markdown_escape(c) for c in row]
        if section.bold and section.bold[i]:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(report: Report, plots: list[str]) -> str:
    text = ["# dropbench comparison", "", counts_line(report), ""]
    for section in sections(report):
        text += [f"## {section.title}", "", *markdown_table(section), ""]
        text += [*(f"- {markdown_escape(note)}" for note in section.notes), ""]
    for heading, lines in problem_sections(report):
        text += [f"## {heading}", "", *(f"- {markdown_escape(line)}" for line in lines), ""]
    text += ["## Plots", "", *(f"![{name}]({name})" for name in plots), ""]
    return "\n".join(text)


TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "±": r"$\pm$", "−": r"$-$", "—": "---",
    "Δ": r"$\Delta$",
}


def tex_escape(text: str) -> str:
    return "".join(TEX_ESCAPES.get(c, c) for c in text)


def latex_table(report: Report) -> str:
    """The main table as a booktabs tabular."""
    section = main_section(report)
    spec = "".join("l" if h in TEXT_HEADERS else "r" for h in section.headers)
    lines = [r"% dropbench report; needs \usepackage{booktabs}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(h) for h in section.headers) + r" \\", r"\midrule"]
    for row, bold in zip(section.rows, section.bold):
        cells = [tex_escape(c) for c in row]
        if bold:
            cells = [rf"\textbf{{{c}}}" for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def rich_table(section: Section) -> Table:
    table = Table(title=f"dropbench: {section.title.lower()}")
    for header in section.headers:
        table.add_column(header, justify="left" if header in TEXT_HEADERS else "right")
    for i, row in enumerate(section.rows):
        # Text(), not str: labels like "hidden=[512]" must not be parsed as rich markup
        table.add_row(*map(Text, row), style="bold" if section.bold and section.bold[i] else None)
    return table


def comparison_csv(groups: pd.DataFrame) -> pd.DataFrame:
    """The tidy table: one row per group, unrounded numbers, accuracies as fractions."""
    stat_cols = [f"{c}_{s}" for c in AGGREGATED for s in ("mean", "std", "ci95")]
    first = ["group_key", "label", "dataset", "model", "regularizer", "p", "n", "seeds", "format", "rank", "best",
             *stat_cols, "baseline_group_key", "baseline_label", "baseline_settings_match", "note",
             *COMPARISON_COLUMNS, "selectable", "selected"]
    settings = [c for c in groups.columns if c not in first and c not in ("variant", "name", "best_val_acc_n")]
    return groups[first + settings]


def tuned_csv(tuned: pd.DataFrame) -> pd.DataFrame:
    first = ["dataset", "model", "method", "settings", "selectable", "group_key", "label", "n",
             "best_val_acc_mean", "best_val_acc_std", "best_val_acc_ci95",
             "test_acc_at_best_mean", "test_acc_at_best_std", "test_acc_at_best_ci95",
             "baseline_group_key", "baseline_label", "note", *COMPARISON_COLUMNS]
    return tuned.reindex(columns=first)


# -----------------------------------------------------------------------------
# plots

def grid_axes(fig: Figure, panels: int, ncols: int, **share) -> np.ndarray:
    """A flat array of `panels` axes in rows of `ncols`; the unused ones are hidden."""
    ncols = min(ncols, panels)
    axes = fig.subplots(math.ceil(panels / ncols), ncols, squeeze=False, **share).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return axes[:panels]


def learning_curve_figure(report: Report, value: str) -> Figure:
    """Train, val and test `value` ("accuracy" or "loss") per epoch, one panel per group (mean
    line, min–max band over seeds), all panels on one y-axis so they compare at a glance."""
    shown = report.groups.head(MAX_PANELS)
    ncols = min(4, len(shown))
    fig = Figure(figsize=(4.2 * ncols, 3.2 * math.ceil(len(shown) / ncols) + 0.9), layout="constrained")
    axes = grid_axes(fig, len(shown), ncols, sharey=True)
    scale, unit = (100, "accuracy (%)") if value == "accuracy" else (1, "loss (NLL, nats)")
    by_epoch = report.curves.groupby(["group_key", "split", "epoch"])[value].agg(["mean", "min", "max"])
    for ax, group in zip(axes, shown.itertuples()):
        for split, color in SPLIT_COLORS.items():
            try:
                curve = by_epoch.loc[(group.group_key, split)].dropna() * scale
            except KeyError:  # no readable metrics.csv, or no such split (no validation)
                continue
            ax.plot(curve.index, curve["mean"], color=color, label=f"{split} (mean over seeds)")
            ax.fill_between(curve.index, curve["min"], curve["max"], color=color, alpha=0.2,
                            label=f"{split} (min–max over seeds)")
        ax.set_title(textwrap.fill(f"{group.label} (n={group.n})", 45), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(unit)
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    legend = {}
    for ax in axes:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=3, fontsize=9)
    title = f"Learning curves, {value}: line = mean over seeds, band = min–max over seeds; shared y-axis"
    if len(report.groups) > MAX_PANELS:
        title += f"\n(first {MAX_PANELS} of {len(report.groups)} groups, table order)"
    fig.suptitle(title)
    return fig


def gap_figure(report: Report) -> Figure:
    """Generalization gap (final train − test accuracy) per group: bars with 95% CI, one panel per task."""
    tasks = list(report.groups.groupby(TASK, sort=False))
    heights = [0.3 * len(g) + 0.9 for _, g in tasks]
    fig = Figure(figsize=(9, sum(heights) + 1.0), layout="constrained")
    axes = fig.subplots(len(tasks), 1, squeeze=False, height_ratios=heights).ravel()
    for ax, ((dataset, model), g) in zip(axes, tasks):
        y = np.arange(len(g))
        colors = ["0.6" if r == "none" else "tab:blue" for r in g["regularizer"]]
        ax.barh(y, g["gap_mean"] * 100, xerr=g["gap_ci95"].fillna(0) * 100, color=colors, capsize=3)
        ax.set_yticks(y, [f"{name} (n={n})" for name, n in zip(g["name"], g["n"])], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{dataset}/{model}", fontsize=10)
        ax.set_xlabel("train − test accuracy, final epoch (percentage points)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Generalization gap: mean over seeds, error bar = 95% CI (none when n = 1)\n"
                 "grey = no regularizer")
    return fig


def accuracy_vs_p_figure(report: Report) -> Figure | None:
    """Mean test accuracy against p, one line per regularizer variant, for those swept over >= 2 p;
    None when no regularizer has two numeric p values."""
    groups = report.groups.assign(p_number=pd.to_numeric(report.groups["p"], errors="coerce"))
    swept = groups[groups["p_number"].notna() & (groups["regularizer"] != "none")]
    lines = [g for _, g in swept.groupby([*TASK, "regularizer", "variant"]) if g["p_number"].nunique() >= 2]
    if not lines:
        return None
    panels = sorted({(g["dataset"].iloc[0], g["model"].iloc[0]) for g in lines})
    ncols = min(3, len(panels))
    fig = Figure(figsize=(6 * ncols, 4.5 * math.ceil(len(panels) / ncols) + 0.6), layout="constrained")
    for ax, (dataset, model) in zip(grid_axes(fig, len(panels), ncols), panels):
        for g in lines:
            if (g["dataset"].iloc[0], g["model"].iloc[0]) != (dataset, model):
                continue
            g = g.sort_values("p_number")
            name = f"{g['regularizer'].iloc[0]} {g['variant'].iloc[0]}".strip()
            ax.errorbar(g["p_number"], g["test_acc_mean"] * 100, yerr=g["test_acc_ci95"].fillna(0) * 100,
                        marker="o", capsize=3, label=f"{name} (n={n_range(g['n'])} per point)")
        nones = groups[(groups["dataset"] == dataset) & (groups["model"] == model) & (groups["regularizer"] == "none")]
        for style, none in zip(["--", ":", "-."], nones.itertuples()):
            mean, ci = none.test_acc_mean * 100, np.nan_to_num(none.test_acc_ci95) * 100
            ax.axhline(mean, color="black", linestyle=style,
                       label=f"{f'none {none.variant}'.strip()} (baseline, n={none.n}; band = 95% CI)")
            ax.axhspan(mean - ci, mean + ci, color="black", alpha=0.08)
        ax.set_title(f"{dataset}/{model}")
        ax.set_xlabel("p (drop probability)")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Final test accuracy vs p (mean over seeds, error bars = 95% CI)")
    return fig


def n_range(n: pd.Series) -> str:
    return str(n.min()) if n.min() == n.max() else f"{n.min()}–{n.max()}"


def validation_vs_test_figure(report: Report) -> Figure | None:
    """The tuning grid: each group's mean validation accuracy against its mean test accuracy at the
    selected epoch, one panel per task, the selected setting of each method starred; None when no
    group has a validation split."""
    grid = report.groups[report.groups["selectable"]]
    if grid.empty:
        return None
    tasks = list(grid.groupby(TASK, sort=False))
    ncols = min(3, len(tasks))
    fig = Figure(figsize=(5.5 * ncols, 4.6 * math.ceil(len(tasks) / ncols) + 0.8), layout="constrained")
    methods = sorted(grid["regularizer"].unique())
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, ((dataset, model), g) in zip(grid_axes(fig, len(tasks), ncols), tasks):
        x, y = g["best_val_acc_mean"] * 100, g["test_acc_at_best_mean"] * 100
        ax.scatter(x, y, c=[colors[m] for m in g["regularizer"]], s=30, zorder=3)
        chosen = g["selected"].to_numpy()
        ax.scatter(x[chosen], y[chosen], marker="*", s=220, facecolors="none", edgecolors="black", zorder=4)
        for xi, yi, name, method, n in zip(x, y, g["name"], g["regularizer"], g["n"]):
            setting = name.removeprefix(method).strip() or method
            ax.annotate(f"{setting} (n={n})", (xi, yi), xytext=(5, 3), textcoords="offset points", fontsize=7)
        low, high = min(x.min(), y.min()), max(x.max(), y.max())
        pad = max(high - low, 1) * 0.1
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.5", linestyle="--", linewidth=1)
        ax.set_title(f"{dataset}/{model}")
        ax.set_xlabel("mean validation accuracy (%)")
        ax.set_ylabel("mean test accuracy @val-best epoch (%)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[m], label=m) for m in methods]
    handles += [Line2D([], [], marker="*", linestyle="", markersize=12, markerfacecolor="none",
                       markeredgecolor="black", label="selected on validation"),
                Line2D([], [], color="0.5", linestyle="--", label="validation = test")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=9)
    fig.suptitle("Tuning grid: one point per setting (mean over its n seeds); "
                 "star = each method's choice on validation")
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)  # Figure without pyplot renders with Agg


# -----------------------------------------------------------------------------
# output

def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_table(path: Path, table: pd.DataFrame) -> None:
    with atomic_file(path) as f:
        table.to_csv(f, index=False, lineterminator="\n")


def write_outputs(report: Report, out_dir: Path) -> list[Path]:
    """Write tables and plots into `out_dir`; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"learning_curves.png": learning_curve_figure(report, "accuracy"),
               "loss_curves.png": learning_curve_figure(report, "loss"),
               "gap.png": gap_figure(report),
               "accuracy_vs_p.png": accuracy_vs_p_figure(report),
               "validation_vs_test.png": validation_vs_test_figure(report)}
    plots = [name for name, fig in figures.items() if fig is not None]
    for name in plots:
        save_figure(figures[name], out_dir / name)
    tables = ["comparison.csv"]
    write_table(out_dir / "comparison.csv", comparison_csv(report.groups))
    if not report.tuned.empty:
        write_table(out_dir / "tuned.csv", tuned_csv(report.tuned))
        tables.append("tuned.csv")
    if not report.iqm.empty:
        write_table(out_dir / "iqm.csv", report.iqm)
        tables.append("iqm.csv")
    write_text(out_dir / "comparison.md", markdown_report(report, plots))
    write_text(out_dir / "comparison.tex", latex_table(report))
    return [out_dir / name for name in [*tables, "comparison.md", "comparison.tex", *plots]]


def print_report(report: Report, written: list[Path], max_lines: int = 20) -> None:
    # rich drops colour codes when stdout is not a terminal; the wide width keeps piped rows on one line
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 250)
    for section in sections(report):
        console.print(rich_table(section))
        for note in section.notes:
            print(f"  - {note}")
        print()
    for heading, lines in problem_sections(report):
        print(f"{heading} ({len(lines)}):")
        for line in lines[:max_lines]:
            print(f"  {line}")
        if len(lines) > max_lines:
            print(f"  ... {len(lines) - max_lines} more in comparison.md")
    print(f"Wrote {', '.join(p.name for p in written)} to {written[0].parent}/")
    print(counts_line(report))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dropbench report",
        description="Compare finished runs: tables with 95% CIs, tests against the `none` baseline, "
                    "settings selected on validation, plots.")
    parser.add_argument("dirs", nargs="*", default=["results"], metavar="DIR",
                        help="directories searched (recursively) for runs (default: results)")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: FIRST_DIR/report)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    dirs = [Path(d) for d in args.dirs]
    out_dir = Path(args.out) if args.out else dirs[0] / "report"
    try:
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise ReportError(f"no such directory: {', '.join(missing)}")
        report = build_report(dirs, out_dir)
        written = write_outputs(report, out_dir)
    except (ReportError, OSError) as e:
        print(f"dropbench report: error: {e}", file=sys.stderr)
        return 1
    print_report(report, written)
    return 0
