"""Folded sweeps (hydra/launcher=fold): jobs that differ only in seeds and in the regularizer's numeric
settings train as the replicas of one run, and each writes what it would have written alone."""

from __future__ import annotations

import pytest
from conftest import read_csv, run_cli, stopped_in_epoch
from hydra import compose, initialize_config_module

from dropbench.fold import fold_groups
from dropbench.results import read_summary

SWEEP = ["-m", "experiment=smoke", "threads=1", "regularizer=dropout", "regularizer.p=0.1,0.5", "seed=0,1"]


def config(*overrides: str):
    with initialize_config_module("dropbench.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", "threads=1", "progress=false", *overrides])


def summaries(root):
    return {p.parent.name: read_csv(p)[0] for p in root.rglob("summary.csv")}


def curves(path):
    """A metrics.csv's (epoch, split) -> (loss, accuracy), timings left out."""
    return {(r["epoch"], r["split"]): (float(r["loss"]), float(r["accuracy"])) for r in read_csv(path)}


def assert_same_numbers(a, b):
    """Replicas trained together agree with single runs up to the rounding of batched products."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == pytest.approx(b[key][0], rel=1e-4), key
        assert a[key][1] == pytest.approx(b[key][1], abs=0.004), key


def test_a_folded_sweep_writes_what_the_unfolded_one_does_and_reruns_skip(tmp_path):
    alone = run_cli("train", *SWEEP, f"results_dir={tmp_path}/alone", f"hydra.sweep.dir={tmp_path}/alone")
    folded = run_cli("train", *SWEEP, "hydra/launcher=fold", f"results_dir={tmp_path}/folded",
                     f"hydra.sweep.dir={tmp_path}/folded")
    assert alone.returncode == 0 and folded.returncode == 0, folded.stderr
    assert "4 jobs folded into one run of 4 replicas" in folded.stdout
    assert folded.stdout.strip().splitlines()[-1] == (f"dropbench train: sweep done: 4/4 ok, 0 failed, 0 diverged; "
                                                      f"report: dropbench report {tmp_path}/folded")
    a, b = summaries(tmp_path / "alone"), summaries(tmp_path / "folded")
    assert a.keys() == b.keys() and len(a) == 4  # the same job folders
    for job in a:
        assert {k: a[job][k] for k in ("run_key", "group_key", "p", "seed", "cfg.regularizer.p")} == \
               {k: b[job][k] for k in ("run_key", "group_key", "p", "seed", "cfg.regularizer.p")}
        assert b[job]["status"] == "ok" and b[job]["parallel_seeds"] == "4"
        assert (tmp_path / "folded" / job / ".hydra" / "overrides.yaml").is_file()
        assert_same_numbers(curves(tmp_path / "alone" / job / "metrics.csv"),
                            curves(tmp_path / "folded" / job / "metrics.csv"))

    # the sweep again: every job finished; one more rate: only its two jobs train, folded together
    wider = run_cli("train", *SWEEP, "regularizer.p=0.1,0.5,0.9", "hydra/launcher=fold",
                    f"results_dir={tmp_path}/folded", f"hydra.sweep.dir={tmp_path}/wider")
    assert wider.returncode == 0, wider.stderr
    assert wider.stdout.count("already finished") == 4
    assert "2 jobs folded into one run of 2 replicas" in wider.stdout
    assert "sweep done: 6/6 ok, 0 failed, 0 diverged, 4 finished earlier" in wider.stdout
    new = {job: row for job, row in summaries(tmp_path / "wider").items() if row["p"] == "0.9"}
    assert len(new) == 2 and all(row["parallel_seeds"] == "2" for row in new.values())


def test_only_jobs_that_differ_in_seeds_and_foldable_settings_fold():
    jobs = [
        ["regularizer=dropout", "regularizer.p=0.1"],  # 0
        ["regularizer=dropout", "regularizer.p=0.5", "seed=1"],  # 1: with 0
        ["regularizer=gaussian", "regularizer.p=0.5"],  # 2: another method
        ["regularizer=batchnorm", "regularizer.momentum=0.1"],  # 3, 4: BatchNorm's momentum does not fold
        ["regularizer=batchnorm", "regularizer.momentum=0.3"],
        ["regularizer=dropout", "regularizer.p=[0.2,0.5]", "parallel_seeds=3"],  # 5: with 0
        ["regularizer=l2", "regularizer.lam=1e-3"], ["regularizer=l2", "regularizer.lam=1e-2"],  # 6, 7
        ["regularizer=rdrop", "regularizer.alpha=0.5"], ["regularizer=rdrop", "regularizer.alpha=2", "seed=3"],  # 8, 9
        ["optimizer=sgd", "optimizer.momentum=0.9"], ["optimizer=sgd", "optimizer.momentum=0.0"],  # 10, 11: apart
        ["optimizer.lr=0.01"], ["optimizer.lr=0.001"],  # 12, 13: the learning rate folds for Adam,
        ["optimizer.lr=0.01", "schedule=cosine"], ["optimizer.lr=0.001", "schedule=cosine"],  # 14, 15: also under
        # a schedule that scales it, not under one that adds to it
        ["optimizer.lr=0.01", "schedule=cosine", "schedule.eta_min=1e-4"],  # 16
        ["optimizer.lr=0.001", "schedule=cosine", "schedule.eta_min=1e-4"],  # 17
    ]
    assert fold_groups([config(*o) for o in jobs], max_replicas=64) == [
        [0, 1, 5], [2], [3], [4], [6, 7], [8, 9], [10], [11], [12, 13], [14, 15], [16], [17]]
    # at most max_replicas seeds a run: job 6 alone trains 3
    assert fold_groups([config("regularizer=dropout", f"regularizer.p={p}", *s) for p, s in (
        (0.1, []), (0.2, []), (0.3, ["parallel_seeds=3"]), (0.4, []))], max_replicas=4) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("optimizer", [["optimizer=sgd", "optimizer.momentum=0.9"], ["optimizer=adam"],
                                       ["optimizer=adamw", "schedule=step", "schedule.step_size=1"]])
def test_replicas_with_their_own_learning_rate_are_their_single_runs(tmp_path, optimizer):
    """The optimizer steps with replica 0's lr and scales each replica's change by lr_k / lr_0."""
    import torch

    from dropbench.train import build_run, evaluate, train_epoch

    def fit(cfgs, seeds):
        torch.manual_seed(0)
        run = build_run(cfgs[0], torch.device("cpu"), seeds, cfgs)
        losses = []
        for _ in range(3):
            losses.append(train_epoch(run, 100))
            if run.scheduler is not None:
                run.scheduler.step()
        return torch.stack(losses), evaluate(run, "test", 1000)["loss"]

    cfgs = [config("regularizer=dropout", *optimizer, f"seed={s}", f"optimizer.lr={lr}")
            for lr, s in ((0.01, 0), (0.003, 1), (0.03, 0))]
    losses, test = fit(cfgs, [0, 1, 0])
    for k, cfg in enumerate(cfgs):
        alone, alone_test = fit([cfg], [cfg.seed])
        torch.testing.assert_close(losses[:, k], alone[:, 0], rtol=1e-4, atol=1e-5)
        assert test[k] == pytest.approx(alone_test[0], rel=1e-4)


def test_an_interrupted_folded_run_resumes_each_job_in_its_folder(tmp_path, monkeypatch):
    """Two jobs with the same seed (their run keys tell them apart) stop in epoch 3 and resume
    after epoch 2 with resume=true; each ends with the numbers of the run never stopped."""
    from dropbench import runs

    def jobs(name, *overrides):
        return [(config("epochs=4", "regularizer=dropout", f"regularizer.p={p}", f"results_dir={tmp_path}/{name}",
                        *overrides), tmp_path / name / f"p{p}") for p in (0.1, 0.5)]

    assert [r.status for r in runs.train_jobs(jobs("whole"), multirun=True)] == ["ok", "ok"]
    with stopped_in_epoch(monkeypatch, 3):
        runs.train_jobs(jobs("r", "checkpoint_every=2"), multirun=True)
    assert {read_summary(tmp_path / "r" / f"p{p}" / "summary.csv")["status"] for p in (0.1, 0.5)} == {"interrupted"}
    again = [(cfg, tmp_path / "r2" / folder.name) for cfg, folder in jobs("r", "resume=true")]
    results = runs.train_jobs(again, multirun=True)
    assert [(r.status, r.run_dir) for r in results] == [("ok", tmp_path / "r" / f"p{p}") for p in (0.1, 0.5)]
    for p in (0.1, 0.5):
        assert read_summary(tmp_path / "r" / f"p{p}" / "summary.csv")["resumed_from_epoch"] == "2"
        assert curves(tmp_path / "r" / f"p{p}" / "metrics.csv") == curves(tmp_path / "whole" / f"p{p}" / "metrics.csv")
    assert not (tmp_path / "r2").exists()  # the new folders held nothing, and went


def test_folded_runs_side_by_side_give_the_numbers_of_one_after_another(tmp_path):
    """hydra.launcher.n_jobs=2: the two folded runs (dropout, Gaussian) train in two processes at once."""
    sweep = ["-m", "experiment=smoke", "threads=1", "regularizer=dropout,gaussian", "regularizer.p=0.1,0.5",
             "hydra/launcher=fold", f"results_dir={tmp_path}", "force=true"]
    for n in (1, 2):
        proc = run_cli("train", *sweep, f"hydra.launcher.n_jobs={n}", f"hydra.sweep.dir={tmp_path}/n{n}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("2 jobs folded into one run of 2 replicas") == 2
        assert "sweep done: 4/4 ok" in proc.stdout
    one, two = summaries(tmp_path / "n1"), summaries(tmp_path / "n2")
    assert one.keys() == two.keys() and len(one) == 4
    for job in one:
        assert curves(tmp_path / "n1" / job / "metrics.csv") == curves(tmp_path / "n2" / job / "metrics.csv")


@pytest.mark.parametrize("setting", ["max_replicas", "n_jobs"])
def test_launcher_counts_must_be_positive_whole_numbers(tmp_path, setting):
    proc = run_cli("train", *SWEEP, "hydra/launcher=fold", f"hydra.launcher.{setting}=0",
                   f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/s")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"dropbench train: error: hydra.launcher.{setting}=0 is not allowed; "
                                   f"give a whole number >= 1")
    assert not (tmp_path / "s").exists()
