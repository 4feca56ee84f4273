"""Sweeps: Hydra multirun into one sweep directory, skipping finished runs, launcher configs,
and the ready-made experiment configs."""

from __future__ import annotations

import pytest
from conftest import read_csv, run_cli
from hydra import compose, initialize_config_module

from dropbench.config import choices

SWEEP = ["-m", "experiment=smoke", "threads=1", "regularizer=dropout", "regularizer.p=0.1,0.5,0.9", "seed=0,1,2"]


def summaries(root):
    return {p.parent.name: read_csv(p)[0] for p in root.rglob("summary.csv")}


def test_3x3_sweep_then_rerun_skips_finished_runs(tmp_path):
    proc = run_cli("train", *SWEEP, f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (f"dropbench train: sweep done: 9/9 ok, 0 failed, 0 diverged; "
                                                    f"report: dropbench report {tmp_path}/sweep")
    first = summaries(tmp_path / "sweep")
    assert len(first) == 9 and all(row["status"] == "ok" for row in first.values())
    # job folders are named by their overrides
    assert "experiment=smoke,regularizer.p=0.5,regularizer=dropout,seed=2" in first
    assert {(row["p"], row["seed"]) for row in first.values()} == {(p, s) for p in ("0.1", "0.5", "0.9")
                                                                     for s in "012"}
    assert len({row["run_key"] for row in first.values()}) == 9
    assert len({row["group_key"] for row in first.values()}) == 3

    # the same sweep again, into another folder: every job is recognised by its config + seed
    again = run_cli("train", *SWEEP, f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/again")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already finished") == 9 and "not trained again" in again.stdout
    assert (f"sweep done: 9/9 ok, 0 failed, 0 diverged, 9 finished earlier; report: dropbench report "
            f"{tmp_path}/again") in again.stdout
    copied = summaries(tmp_path / "again")  # the new sweep folder holds the same runs, not new ones
    assert {job: row["run_id"] for job, row in copied.items()} == {job: row["run_id"] for job, row in first.items()}

    # force=true re-runs them, with the same numbers
    forced = run_cli("train", *SWEEP, "regularizer.p=0.5", "seed=1", "force=true", f"results_dir={tmp_path}",
                     f"hydra.sweep.dir={tmp_path}/forced")
    (row,) = summaries(tmp_path / "forced").values()
    same_job = first["experiment=smoke,regularizer.p=0.5,regularizer=dropout,seed=1"]
    assert forced.returncode == 0 and row["test_acc"] == same_job["test_acc"]


def test_parallel_seeds_match_the_sequential_sweep(tmp_path):
    from hydra import compose, initialize_config_module

    from dropbench.runs import train_job

    def job(name: str, *overrides: str) -> None:  # in this process: the CLI runs the same train_job
        with initialize_config_module("dropbench.conf", version_base="1.3"):
            cfg = compose("config", overrides=["experiment=smoke", "threads=1", "regularizer=dropout",
                                               "progress=false", f"results_dir={tmp_path}", *overrides])
        assert train_job(cfg, tmp_path / name, multirun=False).status == "ok"

    job("together", "parallel_seeds=3")
    for seed in range(3):
        job(f"alone{seed}", f"seed={seed}")
        a = read_csv(tmp_path / "together" / f"seed_{seed}" / "metrics.csv")
        b = read_csv(tmp_path / f"alone{seed}" / "metrics.csv")
        # same init, data order and masks; vmap's batched arithmetic agrees up to rounding
        assert [r["split"] for r in a] == [r["split"] for r in b]
        assert [float(r["loss"]) for r in a] == pytest.approx([float(r["loss"]) for r in b], rel=1e-5)
        assert [float(r["accuracy"]) for r in a] == pytest.approx([float(r["accuracy"]) for r in b], abs=0.004)
        assert (read_csv(tmp_path / "together" / f"seed_{seed}" / "summary.csv")[0]["run_key"]
                == read_csv(tmp_path / f"alone{seed}" / "summary.csv")[0]["run_key"])


def test_launcher_configs_compose(tmp_path):
    slurm = run_cli("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                    cwd=tmp_path)
    assert slurm.returncode == 0, slurm.stderr
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in slurm.stdout
    assert "partition: gpu" in slurm.stdout and "cpus_per_task: 4" in slurm.stdout
    joblib = run_cli("train", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "--cfg", "hydra",
                     cwd=tmp_path)
    assert joblib.returncode == 0 and "JoblibLauncher" in joblib.stdout and "n_jobs: 2" in joblib.stdout


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_experiments_compose(experiment):
    with initialize_config_module("dropbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    for name in str(params.get("regularizer", "")).replace("[", "").replace("]", "").split(","):
        assert not name or name in choices("regularizer"), name
    if experiment == "ablation_all":
        listed = set(params["regularizer"].replace("[dropout,maxnorm]", "").strip(",").split(","))
        assert listed == set(choices("regularizer"))  # every regularizer is in the ablation
    if experiment == "d2l_dropout":
        assert list(cfg.model.hidden) == [256, 256] and list(cfg.regularizer.p) == [0.2, 0.5]
        assert cfg.optimizer.lr == 0.5 and cfg.batch_size == 256 and cfg.model.init_std == 0.01


def test_jobs_of_different_experiments_never_share_a_folder(tmp_path):
    """Two jobs that differ only in `experiment` once went to one folder, the second deleting the first."""
    proc = run_cli("train", "-m", "experiment=smoke,d2l_dropout", "dataset=mnist1d", "epochs=2", "seed=0",
                   "threads=1", "progress=false", f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr
    rows = summaries(tmp_path / "sweep")
    assert len(rows) == 2 and len({row["run_key"] for row in rows.values()}) == 2
    assert {row["cfg.batch_size"] for row in rows.values()} == {"64", "256"}  # smoke's and d2l's
    # a sequential sweep says how far it got after each job
    assert "sweep 1/2 jobs done, 0 failed; ETA" in proc.stdout and "sweep 2/2 jobs done" in proc.stdout
