"""Tuning on validation data: the per-method grids of conf/experiment/tune, scripts/tune.sh (select,
then confirm on fresh seeds), the score a job returns to a searching sweeper (Optuna), and that
no selection ever reads test labels."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from conftest import read_csv, run_cli
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dropbench.config import choices
from dropbench.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
GRIDS = sorted(p.name[:-5] for p in (files("dropbench.conf") / "experiment" / "tune").iterdir()
               if p.name.endswith(".yaml") and not p.name.startswith("_"))
needs_optuna = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                                  reason="hydra-optuna-sweeper not installed (pip install 'dropbench[tune]')")


def write_npz(path: Path, poison_test_labels: bool = False) -> Path:
    """A small 4-class problem a linear teacher labels; the test labels shuffled when poisoned."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 12)).astype(np.float32)
    y = (x @ rng.normal(size=(12, 4)) + 0.7 * rng.normal(size=(700, 4))).argmax(1)
    y_test = y[500:]
    if poison_test_labels:  # same classes, same counts, no relation to the inputs
        y_test = np.random.default_rng(1).permutation(y_test)
    np.savez(path, x=x[:500], y=y[:500], x_test=x[500:], y_test=y_test)
    return path


def tiny(npz: Path) -> list[str]:
    """Overrides that make any tuning grid run in seconds."""
    return ["dataset=npz", f"dataset.path={npz}", "dataset.val_fraction=0.2", "model.hidden=[32]", "epochs=3",
            "batch_size=50", "threads=1", "progress=false"]


def summaries(root: Path) -> list[dict]:
    return [read_csv(p)[0] for p in sorted(root.rglob("summary.csv")) if "report" not in p.parts]


def compose_grid(name: str):
    with initialize_config_module("dropbench.conf", version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", "results_dir=R"], return_hydra_config=True)


def test_every_ablation_method_has_a_grid_with_the_ablations_training():
    ablation = compose_grid("ablation_all")
    tuned = set()
    for name in GRIDS:
        cfg = compose_grid(f"tune/{name}")
        for key in ("epochs", "batch_size", "seed", "parallel_seeds", "optimizer", "model", "dataset", "schedule"):
            assert cfg[key] == ablation[key], (name, key)
        assert cfg.parallel_seeds == 3 and cfg.hydra.sweep.dir == "R/sweeps/tune"  # one folder for all grids
        params = dict(cfg.hydra.sweeper.params)
        regularizer = params.pop("regularizer")  # one method per grid
        settings = np.prod([len(str(v).split(",")) for v in params.values()])
        assert (settings == 1) == (name == "none"), (name, params)  # every method but the baseline has a grid
        with initialize_config_module("dropbench.conf", version_base="1.3"):
            method = compose("config", overrides=[f"regularizer={regularizer}"])
        for key in params:  # every swept key is a setting of the method
            assert OmegaConf.select(method, key) is not None, (name, key)
        tuned.add(regularizer)
    listed = ablation.hydra.sweeper.params.regularizer.replace("[dropout,maxnorm]", "").strip(",").split(",")
    assert tuned == {*listed, "[dropout,maxnorm]"} and set(listed) == set(choices("regularizer"))


@pytest.mark.slow
@pytest.mark.parametrize("launch", [["--jobs", "2"], ["--fold", "--jobs", "2"]], ids=["joblib", "fold"])
def test_tune_script_selects_on_validation_then_reruns_the_selection_on_fresh_seeds(tmp_path, launch):
    npz = write_npz(tmp_path / "data.npz")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "tune.sh"), "--results", str(tmp_path / "res"),
                           "--methods", "none dropout", *launch, *tiny(npz)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # folded: dropout's five settings x three seeds are one run of 15 replicas
    assert ("folded into one run of 15 replicas" in proc.stdout) == ("--fold" in launch)
    res = tmp_path / "res"

    selection = summaries(res / "sweeps" / "tune")
    assert len(selection) == 3 * (1 + 5)  # none + dropout's five p, seeds 0-2 each
    tuned = {row["method"]: row for row in read_csv(res / "reports" / "tune" / "tuned.csv")}
    assert set(tuned) == {"none", "dropout"} and tuned["dropout"]["settings"] == "5"
    # the selected group is the one with the highest mean validation accuracy over its seeds
    by_group = {}
    for row in selection:
        by_group.setdefault(row["group_key"], []).append(float(row["best_val_acc"]))
    dropout = {row["group_key"] for row in selection if row["regularizer"] == "dropout"}
    best = max(dropout, key=lambda g: (np.mean(by_group[g]), g == tuned["dropout"]["group_key"]))
    assert tuned["dropout"]["group_key"] == best

    confirm = summaries(res / "sweeps" / "tune_confirm")
    assert len(confirm) == 2 * 5
    for method in ("none", "dropout"):  # the very same setting, on seeds 100-104 only
        rows = [row for row in confirm if row["regularizer"] == method]
        assert {row["group_key"] for row in rows} == {tuned[method]["group_key"]}
        assert sorted(int(row["seed"]) for row in rows) == [100, 101, 102, 103, 104]
        assert all(row["status"] == "ok" for row in rows)
    configs = list((res / "sweeps" / "tune_confirm").glob("*/.hydra/config.yaml"))
    assert len(configs) == 2 and all(OmegaConf.load(c).results_dir == str(res) for c in configs)
    final = read_csv(res / "reports" / "tune_confirm" / "comparison.csv")
    assert sorted((row["regularizer"], row["n"]) for row in final) == [("dropout", "5"), ("none", "5")]


def test_tune_script_refuses_an_unknown_method_and_a_missing_selection(tmp_path):
    script = str(ROOT / "scripts" / "tune.sh")
    unknown = subprocess.run(["bash", script, "--methods", "dropout nope"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "no grid conf/experiment/tune/nope.yaml" in unknown.stderr
    no_jobs = subprocess.run(["bash", script, "--jobs", "0"], capture_output=True, text=True)
    assert no_jobs.returncode == 2 and "--jobs 0; give a positive number" in no_jobs.stderr
    missing = subprocess.run(["bash", script, "--results", str(tmp_path), "--stage", "confirm"],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "run --stage select first" in missing.stderr


def tuned_selection(tmp_path: Path, name: str, poison: bool) -> tuple[dict, dict]:
    """Train the dropout grid on the data (test labels poisoned or not); tuned.csv's dropout row and
    comparison.csv's rows by group."""
    npz = write_npz(tmp_path / "data.npz", poison_test_labels=poison)  # one path: the same configs either way
    results = tmp_path / name
    proc = run_cli("train", "experiment=tune/dropout", *tiny(npz), f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr
    assert report_main([str(results / "sweeps" / "tune"), "--out", str(results / "report")]) == 0
    (row,) = read_csv(results / "report" / "tuned.csv")
    return row, {group["group_key"]: group for group in read_csv(results / "report" / "comparison.csv")}


@pytest.mark.slow
def test_poisoned_test_labels_change_test_accuracy_but_not_the_selection(tmp_path):
    clean, clean_groups = tuned_selection(tmp_path, "clean", poison=False)
    poisoned, poisoned_groups = tuned_selection(tmp_path, "poisoned", poison=True)
    assert clean["settings"] == "5" and clean_groups.keys() == poisoned_groups.keys()
    for key in ("group_key", "label", "best_val_acc_mean", "best_val_acc_std"):
        assert poisoned[key] == clean[key], key
    for key, group in clean_groups.items():  # what the selection reads is the same for every setting
        assert poisoned_groups[key]["best_val_acc_mean"] == group["best_val_acc_mean"]
        assert poisoned_groups[key]["selected"] == group["selected"]
        assert poisoned_groups[key]["test_acc_at_best_mean"] != group["test_acc_at_best_mean"]
    # test accuracy did change: near chance (4 classes) once the labels say nothing
    assert float(clean["test_acc_at_best_mean"]) > 0.5 > 0.4 > float(poisoned["test_acc_at_best_mean"])


@needs_optuna
def test_optuna_maximizes_the_mean_validation_accuracy_over_seeds(tmp_path):
    npz = write_npz(tmp_path / "data.npz")
    search = ["train", "-m", "hydra/sweeper=tune", "hydra.sweeper.n_trials=3", "regularizer=dropout",
              "regularizer.p=interval(0.05,0.8)", "parallel_seeds=2", *tiny(npz), "epochs=2", f"results_dir={tmp_path}"]
    proc = run_cli(*search, f"hydra.sweep.dir={tmp_path}/search")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = {}
    for row in summaries(tmp_path / "search"):
        assert row["status"] == "ok"
        scores.setdefault(row["p"], []).append(float(row["best_val_acc"]))
    assert len(scores) == 3 and all(len(v) == 2 for v in scores.values())
    result = OmegaConf.load(tmp_path / "search" / "optimization_results.yaml")
    best_p, best = max(scores.items(), key=lambda item: np.mean(item[1]))
    assert result.best_value == pytest.approx(np.mean(best))  # the maximum, of the mean over the seeds
    assert result.best_params["regularizer.p"] == float(best_p)

    # the same search again: the seeded sampler proposes the same trials, whose finished runs are
    # copied, not trained, and score the same from the copies
    again = run_cli(*search, f"hydra.sweep.dir={tmp_path}/again")
    assert again.returncode == 0 and again.stdout.count("already finished") == 3 * 2, again.stderr[-3000:]
    assert OmegaConf.load(tmp_path / "again" / "optimization_results.yaml") == result


@needs_optuna
def test_a_folded_search_scores_every_trial_of_a_batch(tmp_path):
    """hydra.sweeper.n_jobs=2 proposes two trials at a time, which the fold launcher trains as one run;
    Optuna gets each trial's own score (the mean of its seeds' best_val_acc): maximizing it finds the
    best trial and minimizing it the worst, one of which is the second of its batch."""
    npz = write_npz(tmp_path / "data.npz")
    best = {}
    for direction in ("maximize", "minimize"):  # the same seeded trials; the second search copies the runs
        proc = run_cli("train", "-m", "hydra/sweeper=tune", "hydra/launcher=fold", "hydra.sweeper.n_trials=4",
                       "hydra.sweeper.n_jobs=2", f"hydra.sweeper.direction={direction}", "regularizer=dropout",
                       "regularizer.p=interval(0.05,0.8)", "optimizer.lr=tag(log,interval(1e-3,3e-2))",
                       "parallel_seeds=2", *tiny(npz), f"results_dir={tmp_path}",
                       f"hydra.sweep.dir={tmp_path}/{direction}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        folded = proc.stdout.count("2 jobs folded into one run of 4 replicas")
        assert folded == (2 if direction == "maximize" else 0)  # the second time every trial finished earlier
        best[direction] = OmegaConf.load(tmp_path / direction / "optimization_results.yaml").best_value
    scores, second = {}, set()
    for path in sorted((tmp_path / "maximize").rglob("summary.csv")):
        row = read_csv(path)[0]
        scores.setdefault(row["group_key"], []).append(float(row["best_val_acc"]))
        if OmegaConf.load(path.parent.parent / ".hydra" / "hydra.yaml").hydra.job.num % 2:  # in seed_N/
            second.add(row["group_key"])
    means = {group: np.mean(values) for group, values in scores.items()}
    assert len(means) == 4 and len(second) == 2
    assert best == pytest.approx({"maximize": max(means.values()), "minimize": min(means.values())})
    extremes = {max(means, key=means.get), min(means, key=means.get)}
    assert extremes & second  # a folded trial's own score reached the search


@needs_optuna
def test_a_search_without_validation_data_is_refused(tmp_path):
    proc = run_cli("train", "-m", "hydra/sweeper=tune", "hydra.sweeper.n_trials=2", "regularizer=dropout",
                   "regularizer.p=interval(0.05,0.8)", "experiment=smoke", "dataset.val_fraction=0",
                   f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/search")
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("dropbench")]
    assert "dataset.val_fraction=0" in line and "never on test data" in line
    assert not (tmp_path / "search").exists() and not list(tmp_path.rglob("summary.csv"))


@needs_optuna
def test_a_diverged_trial_is_a_failed_trial_and_the_search_goes_on(tmp_path):
    npz = write_npz(tmp_path / "data.npz")
    # the seeded sampler's first trials: lr 1e6 (the largest allowed; diverges), then 0.05
    proc = run_cli("train", "-m", "hydra/sweeper=tune", "hydra.sweeper.n_trials=3", "optimizer=sgd",
                   "optimizer.lr=choice(0.05,1e6)", *tiny(npz), "epochs=1",
                   f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/search")
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = {row["lr"]: row["status"] for row in summaries(tmp_path / "search")}
    assert statuses == {"0.05": "ok", "1000000.0": "diverged"}
    assert "not every seed finished ok, so the job has no validation score" in proc.stdout + proc.stderr
    assert OmegaConf.load(tmp_path / "search" / "optimization_results.yaml").best_params["optimizer.lr"] == 0.05
