"""dropbench report: turn finished run directories into comparison tables and plots.

This module owns the `dropbench report [DIR ...]` command. It reads only what the
training side leaves on disk (summary.csv, metrics.csv), so it never imports torch
or hydra and works on results copied from another machine.

Pipeline: find run directories under each DIR -> read and validate every summary.csv
-> keep the latest run per run_key -> aggregate the seeds of each group_key ->
compare each group with its `none` baseline -> write comparison.{csv,md,tex} and
plots into --out, and print the table.

Statistics (only runs with status `ok` are counted):
- A group is all runs sharing `group_key`, i.e. the same config except the seed.
- Per group and metric: mean, std (ddof=1) and the half-width of the 95% confidence
  interval of the mean, t.ppf(0.975, n-1) * std / sqrt(n). Empty for n = 1.
- Baseline: the `none` group of the same dataset and model whose non-regularizer
  settings (epochs, lr, batch_size, optimizer, cfg.* outside cfg.regularizer.*)
  match; if none matches, the `none` group with the most runs.
- Test on final test accuracy, group minus baseline:
  * paired t-test (scipy.stats.ttest_rel) over the seeds both groups ran, when at
    least 2 seeds match. Runs with the same seed share what the seed controls (such
    as the initial weights), so pairing removes that shared variation and is the more
    sensitive test. Delta is the mean of the per-seed differences and its
    CI is the t interval of those differences (k-1 dof).
  * otherwise Welch's t-test (scipy.stats.ttest_ind, equal_var=False) when both
    groups have n >= 2: it does not assume equal variances. Delta is the
    difference of means, CI with Welch-Satterthwaite dof.
  * otherwise only the difference of means is reported, without CI or p-value.
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
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table
from rich.text import Text
from scipy import stats

from dropbench.results import NotASummary, atomic_file, check_summary

# The summary.csv columns this report reads; other columns are carried along untouched.
REQUIRED_COLUMNS = (
    "format", "run_key", "group_key", "status", "dataset", "model", "regularizer", "p",
    "seed", "epochs", "lr", "batch_size", "optimizer", "epochs_completed", "diverged_epoch",
    "train_acc", "test_acc", "best_test_acc", "gap", "test_loss", "wall_seconds", "error",
    "finished_at",
)
# Metrics aggregated per group, with how tables show them: (header, scale, decimals).
STAT_COLUMNS = {
    "test_acc": ("Test acc (%)", 100, 1),
    "best_test_acc": ("Best test acc (%)", 100, 1),
    "train_acc": ("Train acc (%)", 100, 1),
    "gap": ("Gap (pp)", 100, 1),
    "test_loss": ("Test loss", 1, 3),
    "wall_seconds": ("Time (s)", 1, 0),
}
# Settings every summary has; cfg.* columns that are fixed within a group join them.
BASE_SETTINGS = ["epochs", "lr", "batch_size", "optimizer"]
HEADERS = ["Rank", "Group", "n", *(h for h, _, _ in STAT_COLUMNS.values()),
           "Δ test acc vs none (pp)", "p-value", "Test"]
TEXT_HEADERS = {"Group", "Test"}  # left-aligned; every other column holds numbers
MAX_PANELS = 16  # learning-curve subplots; beyond this the figure is unreadable
MISSING = "—"
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
    curves: pd.DataFrame  # per-epoch accuracy of counted runs: group_key, split, epoch, accuracy
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
    """Read one summary.csv into a dict of strings; raise SkipFile unless it is a finished run."""
    try:
        run = check_summary(path)
    except NotASummary as e:
        raise SkipFile(str(e)) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in run]
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
    """An ok run must carry finite numbers for everything the statistics use."""
    for key in STAT_COLUMNS:
        try:
            ok = math.isfinite(float(run[key]))
        except ValueError:
            ok = False
        if not ok:
            raise SkipFile(f"status ok but {key} is {run[key]!r}")
    if not run["seed"].lstrip("-").isdigit():
        raise SkipFile(f"seed is {run['seed']!r}, expected an integer")


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """Per-epoch accuracy of one run from its metrics.csv; raise SkipFile if unusable."""
    try:
        metrics = pd.read_csv(run_dir / "metrics.csv")
    except FileNotFoundError:
        raise SkipFile("missing") from None
    except (OSError, ValueError) as e:  # pandas parse errors are ValueErrors
        raise SkipFile(f"unreadable: {e}") from None
    missing = {"epoch", "split", "accuracy"} - set(metrics.columns)
    if missing:
        raise SkipFile(f"missing columns: {', '.join(sorted(missing))}")
    metrics = metrics[["epoch", "split", "accuracy"]].copy()
    for col in ("epoch", "accuracy"):
        metrics[col] = pd.to_numeric(metrics[col], errors="coerce")
    return metrics.dropna()


def drop_duplicates(runs: list[dict]) -> tuple[list[dict], list[tuple[Path, Path]]]:
    """Keep the latest-finished run per run_key (a forced re-run replaces the earlier one).

    Returns the kept runs in their original order and (dropped run dir, kept run dir) pairs.
    """
    latest = {}
    for run in sorted(runs, key=lambda r: r["finished_at"]):
        latest[run["run_key"]] = run
    kept = [run for run in runs if latest[run["run_key"]] is run]
    dropped = [(run["dir"], latest[run["run_key"]]["dir"]) for run in runs if latest[run["run_key"]] is not run]
    return kept, dropped


# -----------------------------------------------------------------------------
# statistics

def mean_std_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, sample std (ddof=1) and 95% CI half-width of the mean (Student t); nan where n < 2."""
    n = len(values)
    if n < 2:
        return float(values.mean()), math.nan, math.nan
    std = float(values.std(ddof=1))
    return float(values.mean()), std, float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))


@dataclass
class Comparison:
    """Final test accuracy of a group against its baseline."""
    delta: float  # group minus baseline, as a fraction
    ci95: float  # half-width of the 95% CI of delta; nan when not computable
    p_value: float
    test: str  # "paired", "welch", or "" when neither applies
    n_pairs: int  # seeds used by the paired test


def compare(group: pd.Series, baseline: pd.Series) -> Comparison:
    """Compare two Series of test accuracy indexed by seed (see module docstring for the choice)."""
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


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """Columns that describe a group's config: BASE_SETTINGS plus cfg.* values fixed across its seeds."""
    cfg = [c for c in runs.columns if c.startswith("cfg.") and c.rsplit(".", 1)[-1] != "seed"]
    if not cfg:
        return BASE_SETTINGS
    # anything that varies between the seeds of one group describes a run, not the group
    fixed = runs.groupby("group_key")[cfg].nunique(dropna=False).max() <= 1
    return BASE_SETTINGS + [c for c in cfg if fixed[c]]


def summarize_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group_key: settings, seeds, metric statistics, label, rank and baseline comparison."""
    settings = setting_columns(runs)
    rows = []
    for key, g in runs.groupby("group_key", sort=False):
        first = g.iloc[0]
        row = {"group_key": key, **{c: first[c] for c in ["dataset", "model", "regularizer", "p"] + settings},
               "n": len(g), "seeds": " ".join(str(s) for s in sorted(g["seed"]))}
        for col in STAT_COLUMNS:
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_ci95"] = mean_std_ci(g[col].to_numpy(float))
        rows.append(row)
    groups = pd.DataFrame(rows)
    groups["label"], groups["variant"] = label_groups(groups, settings)
    groups["rank"] = groups.groupby(["dataset", "model"])["test_acc_mean"]\
        .rank(ascending=False, method="min").astype(int)
    groups["best"] = groups["rank"] == 1
    groups = add_baseline_comparisons(groups, runs, settings)
    return groups.sort_values(["dataset", "model", "rank", "label"], ignore_index=True)


def label_groups(groups: pd.DataFrame, settings: list[str]) -> tuple[pd.Series, pd.Series]:
    """Short labels "dataset/model regularizer p=.. setting=.." and the settings part alone (variant).

    A setting joins the label when it varies among the groups of one dataset/model/regularizer
    and is not already implied by the label so far (e.g. cfg.regularizer.p moving with p).
    """
    p_part = groups["p"].where(groups["p"] == "", " p=" + groups["p"])
    label = groups["dataset"] + "/" + groups["model"] + " " + groups["regularizer"] + p_part
    variant = pd.Series("", index=groups.index)
    for _, family in groups.groupby(["dataset", "model", "regularizer"]):
        for col in settings:
            values = family[col].astype(str)
            if values.groupby(label[family.index]).nunique().max() > 1:
                label[family.index] += " " + col + "=" + values
                variant[family.index] += " " + col + "=" + values
    return label, variant.str.strip()


def add_baseline_comparisons(groups: pd.DataFrame, runs: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """Add baseline_* columns and the test of each group against its `none` baseline."""
    acc_by_seed = runs.groupby(["group_key", "seed"])["test_acc"].mean()
    shared = [c for c in settings if not c.startswith("cfg.regularizer.")]
    rows = []
    for _, group in groups.iterrows():
        nones = groups[(groups["dataset"] == group["dataset"]) & (groups["model"] == group["model"])
                       & (groups["regularizer"] == "none")]
        row = {"baseline_group_key": "", "baseline_label": "", "baseline_settings_match": False,
               "test": "", "n_pairs": 0, "delta_test_acc": math.nan, "delta_ci95": math.nan,
               "p_value": math.nan}
        if not nones.empty:
            matching = nones[(nones[shared] == group[shared]).all(axis=1)]
            pool = matching if not matching.empty else nones
            baseline = pool.sort_values(["n", "label"], ascending=[False, True]).iloc[0]
            row.update(baseline_group_key=baseline["group_key"], baseline_label=baseline["label"],
                       baseline_settings_match=not matching.empty)
            if baseline["group_key"] != group["group_key"]:
                result = compare(acc_by_seed[group["group_key"]], acc_by_seed[baseline["group_key"]])
                row.update(test=result.test, n_pairs=result.n_pairs, delta_test_acc=result.delta,
                           delta_ci95=result.ci95, p_value=result.p_value)
        rows.append(row)
    return pd.concat([groups, pd.DataFrame(rows, index=groups.index)], axis=1)


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
    ok[list(STAT_COLUMNS)] = ok[list(STAT_COLUMNS)].astype(float)
    ok["seed"] = ok["seed"].astype(int)
    curves, unplotted = load_curves(ok)
    return Report(groups=summarize_groups(ok), runs=ok, unsuccessful=unsuccessful,
                  curves=curves, incomplete=list(incomplete.values()), skipped=skipped, unplotted=unplotted,
                  duplicates=duplicates)


def load_curves(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Per-epoch accuracy of all counted runs, and the metrics.csv files that could not be used."""
    curves, unplotted = [], []
    for run in runs.itertuples():
        try:
            curves.append(read_metrics(run.dir).assign(group_key=run.group_key))
        except SkipFile as why:
            unplotted.append((run.dir / "metrics.csv", str(why)))
    if not curves:
        return pd.DataFrame(columns=["epoch", "split", "accuracy", "group_key"]), unplotted
    return pd.concat(curves, ignore_index=True), unplotted


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
    lines += [f"{old}: duplicate of {kept} (same run_key, earlier finished_at)"
              for old, kept in report.duplicates]
    return lines


def counts_line(report: Report) -> str:
    return (f"Counted {len(report.runs)} runs in {len(report.groups)} groups; not counted: "
            f"{len(report.unsuccessful)} failed/diverged/interrupted, {len(report.incomplete)} incomplete, "
            f"{len(report.skipped)} skipped files, {len(report.duplicates)} duplicates.")


# -----------------------------------------------------------------------------
# tables

def number(x: float, decimals: int, sign: bool = False) -> str:
    """Format with a real minus sign, which tables typeset better than a hyphen."""
    return f"{x:{'+' if sign else ''}.{decimals}f}".replace("-", "−")


def mean_pm_ci(mean: float, ci: float, decimals: int, sign: bool = False) -> str:
    text = number(mean, decimals, sign)
    return text if math.isnan(ci) else f"{text} ± {number(ci, decimals)}"


def table_cells(group: pd.Series) -> list[str]:
    """The displayed row of one group, matching HEADERS."""
    cells = [str(group["rank"]), group["label"], str(group["n"])]
    for col, (_, scale, decimals) in STAT_COLUMNS.items():
        cells.append(mean_pm_ci(group[f"{col}_mean"] * scale, group[f"{col}_ci95"] * scale, decimals))
    if group["baseline_group_key"] == group["group_key"]:
        return cells + ["baseline", MISSING, MISSING]
    if not group["baseline_group_key"]:
        return cells + [MISSING, MISSING, MISSING]
    delta = mean_pm_ci(group["delta_test_acc"] * 100, group["delta_ci95"] * 100, 1, sign=True)
    if not group["baseline_settings_match"]:
        delta += "*"
    p_value = group["p_value"]
    p_text = MISSING if math.isnan(p_value) else "<0.001" if p_value < 0.001 else f"{p_value:.3f}"
    test = {"paired": f"paired, {group['n_pairs']} seeds", "welch": "Welch"}.get(group["test"], MISSING)
    return cells + [delta, p_text, test]


def markdown_report(report: Report, plots: list[str]) -> str:
    rows = ["| " + " | ".join(HEADERS) + " |",
            "|" + "|".join(":--" if h in TEXT_HEADERS else "--:" for h in HEADERS) + "|"]
    for _, group in report.groups.iterrows():
        cells = [markdown_escape(c) for c in table_cells(group)]
        if group["best"]:
            cells = [f"**{c}**" for c in cells]
        rows.append("| " + " | ".join(cells) + " |")
    notes = [
        "- Accuracies in percent, gap in percentage points (pp): mean ± half-width of the 95% "
        "confidence interval over seeds (Student t, n−1 dof); no ± when n = 1.",
        "- Rank is by mean final test accuracy within each dataset/model; the best is in bold.",
        "- Δ: final test accuracy minus the `none` baseline of the same dataset/model, in pp, "
        "± 95% CI. *paired*: paired t-test over the seeds both ran (Δ is the mean per-seed "
        "difference); *Welch*: Welch's t-test (fewer than 2 shared seeds); — : too few runs for a test.",
    ]
    if any_mismatched_baseline(report):
        notes.append("- " + markdown_escape(MISMATCH_NOTE))
    text = ["# dropbench comparison", "", counts_line(report), "", *rows, "", *notes, ""]
    for heading, lines in problem_sections(report):
        text += [f"## {heading}", "", *(f"- {markdown_escape(line)}" for line in lines), ""]
    text += ["## Plots", "", *(f"![{name}]({name})" for name in plots), ""]
    return "\n".join(text)


def any_mismatched_baseline(report: Report) -> bool:
    groups = report.groups
    return bool((groups["baseline_group_key"].ne("") & ~groups["baseline_settings_match"]).any())


def markdown_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\|*_`<>[]" else c for c in text)


TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "±": r"$\pm$", "−": r"$-$", "—": "---",
    "Δ": r"$\Delta$",
}


def tex_escape(text: str) -> str:
    return "".join(TEX_ESCAPES.get(c, c) for c in text)


def latex_table(report: Report) -> str:
    spec = "".join("l" if h in TEXT_HEADERS else "r" for h in HEADERS)
    lines = [r"% dropbench report; needs \usepackage{booktabs}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(h) for h in HEADERS) + r" \\", r"\midrule"]
    for _, group in report.groups.iterrows():
        cells = [tex_escape(c) for c in table_cells(group)]
        if group["best"]:
            cells = [rf"\textbf{{{c}}}" for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def rich_table(report: Report) -> Table:
    table = Table(title="dropbench comparison (± = 95% CI over seeds; Δ vs none in pp)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in TEXT_HEADERS else "right")
    for _, group in report.groups.iterrows():
        # Text(), not str: labels like "hidden=[512]" must not be parsed as rich markup
        table.add_row(*map(Text, table_cells(group)), style="bold" if group["best"] else None)
    return table


def comparison_csv(groups: pd.DataFrame) -> pd.DataFrame:
    """The tidy table: one row per group, unrounded numbers, accuracies as fractions."""
    stat_cols = [f"{c}_{s}" for c in STAT_COLUMNS for s in ("mean", "std", "ci95")]
    first = ["group_key", "label", "dataset", "model", "regularizer", "p", "n", "seeds", "rank", "best",
             *stat_cols, "baseline_group_key", "baseline_label", "baseline_settings_match", "test",
             "n_pairs", "delta_test_acc", "delta_ci95", "p_value"]
    settings = [c for c in groups.columns if c not in first and c != "variant"]
    return groups[first + settings]


# -----------------------------------------------------------------------------
# plots

def plot_learning_curves(report: Report, path: Path) -> None:
    """Train and test accuracy per epoch, one panel per group: mean line, min–max band over seeds."""
    shown = report.groups.head(MAX_PANELS)
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    by_epoch = report.curves.groupby(["group_key", "split", "epoch"])["accuracy"].agg(["mean", "min", "max"])
    for ax, group in zip(axes, shown.itertuples()):
        for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
            try:
                curve = by_epoch.loc[(group.group_key, split)] * 100
            except KeyError:  # no readable metrics.csv for this group
                continue
            ax.plot(curve.index, curve["mean"], color=color, label=f"{split} accuracy (mean over seeds)")
            ax.fill_between(curve.index, curve["min"], curve["max"], color=color, alpha=0.2,
                            label=f"{split} accuracy (min–max over seeds)")
        ax.set_title(textwrap.fill(f"{group.label} (n={group.n})", 45), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes if ax.lines), ([], []))
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=9)
    title = "Learning curves: line = mean over seeds, band = min–max over seeds"
    if len(report.groups) > MAX_PANELS:
        title += f" (first {MAX_PANELS} of {len(report.groups)} groups, table order)"
    fig.suptitle(title)
    save_figure(fig, path)


def plot_accuracy_vs_p(report: Report, path: Path) -> bool:
    """Mean test accuracy against p, one line per regularizer variant, for those swept over >= 2 p.

    Returns False (and writes nothing) when no regularizer has two numeric p values.
    """
    groups = report.groups.assign(p_number=pd.to_numeric(report.groups["p"], errors="coerce"))
    swept = groups[groups["p_number"].notna() & (groups["regularizer"] != "none")]
    lines = [g for _, g in swept.groupby(["dataset", "model", "regularizer", "variant"])
             if g["p_number"].nunique() >= 2]
    if not lines:
        return False
    panels = sorted({(g["dataset"].iloc[0], g["model"].iloc[0]) for g in lines})
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6 * ncols, 4.5 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (dataset, model) in zip(axes, panels):
        for g in lines:
            if (g["dataset"].iloc[0], g["model"].iloc[0]) != (dataset, model):
                continue
            g = g.sort_values("p_number")
            name = f"{g['regularizer'].iloc[0]} {g['variant'].iloc[0]}".strip()
            ax.errorbar(g["p_number"], g["test_acc_mean"] * 100, yerr=g["test_acc_ci95"].fillna(0) * 100,
                        marker="o", capsize=3, label=name)
        nones = groups[(groups["dataset"] == dataset) & (groups["model"] == model)
                       & (groups["regularizer"] == "none")]
        for style, none in zip(["--", ":", "-."], nones.itertuples()):
            mean, ci = none.test_acc_mean * 100, np.nan_to_num(none.test_acc_ci95) * 100
            ax.axhline(mean, color="black", linestyle=style,
                       label=f"{' '.join(['none', none.variant]).strip()} (baseline, no regularizer; band = 95% CI)")
            ax.axhspan(mean - ci, mean + ci, color="black", alpha=0.08)
        ax.set_title(f"{dataset}/{model}")
        ax.set_xlabel("p (drop probability)")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Final test accuracy vs p (mean over seeds, error bars = 95% CI)")
    save_figure(fig, path)
    return True


def save_figure(fig: Figure, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)  # Figure without pyplot renders with Agg


# -----------------------------------------------------------------------------
# output

def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_outputs(report: Report, out_dir: Path) -> list[Path]:
    """Write tables and plots into `out_dir`; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(report, out_dir / "learning_curves.png")
    plots = ["learning_curves.png"]
    if plot_accuracy_vs_p(report, out_dir / "accuracy_vs_p.png"):
        plots.append("accuracy_vs_p.png")
    with atomic_file(out_dir / "comparison.csv") as f:
        comparison_csv(report.groups).to_csv(f, index=False, lineterminator="\n")
    write_text(out_dir / "comparison.md", markdown_report(report, plots))
    write_text(out_dir / "comparison.tex", latex_table(report))
    return [out_dir / name for name in ["comparison.csv", "comparison.md", "comparison.tex", *plots]]


def print_report(report: Report, written: list[Path], max_lines: int = 20) -> None:
    # rich drops colour codes when stdout is not a terminal; the wide width keeps piped rows on one line
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    console.print(rich_table(report))
    if any_mismatched_baseline(report):
        print(MISMATCH_NOTE)
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
        description="Compare finished runs: tables with 95% CIs, tests against the `none` baseline, plots.")
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
