"""Long sweeps through Hydra's submitit launcher, tried with submitit's local executor: a job
stopped by its timeout signal is requeued and continues from its checkpoint with the numbers of a
run that never stopped; threads=auto gives a job the CPUs it was given; each job's log lands in
its own folder; the launcher settings print with a documented command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_csv, run_cli
from omegaconf import OmegaConf
from submitit import JobEnvironment

from dropbench.cli import SUBMITIT_LAUNCHER, _parallel_jobs
from dropbench.runs import available_cores, threads_for_job
from dropbench.signals import signals_interrupt

SETTINGS = ["experiment=smoke", "epochs=6", "batch_size=8", "threads=1"]  # ~0.3 s an epoch: time to signal
SIGNAL = f"SIG{JobEnvironment.USR_SIG}"  # submitit's timeout/preemption signal (USR2)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    """`dropbench ARGS...` in the background, single-threaded like CI."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dropbench.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))


def submitit_job_pid(sweep: Path) -> int:
    """The process running the sweep's job (`python -m submitit.core._submit SWEEP/.submitit/...`)."""
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, or one that just ended
            continue
        if "submitit.core._submit" in words and any(w.startswith(str(sweep)) for w in words):
            return int(entry.name)
    raise AssertionError(f"no submitit job process for {sweep}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the job's process in /proc")
def test_timeout_signal_requeues_the_job_which_continues_with_the_numbers_of_an_uninterrupted_run(tmp_path):
    # the reference has its own results_dir: a finished run of the same config would be skipped by the sweep
    reference = start("train", *SETTINGS, f"results_dir={tmp_path / 'ref'}", f"hydra.run.dir={tmp_path / 'ref/run'}",
                      cwd=tmp_path)
    sweep = tmp_path / "sweep"
    proc = start("train", "-m", "hydra/launcher=submitit_local", *SETTINGS, f"results_dir={tmp_path / 'results'}",
                 f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:  # wait for 2 of the 6 epochs
        metrics = [p / "metrics.csv" for p in job_dirs(sweep)] if sweep.is_dir() else []
        if metrics and metrics[0].is_file() and len(read_csv(metrics[0])) >= 2 * 3:  # train, val, test rows
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()  # still running after 2 epochs
    os.kill(submitit_job_pid(sweep), getattr(signal, SIGNAL))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "sweep done: 1/1 ok" in out
    ref_out, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err

    (job,) = job_dirs(sweep)
    summary = read_csv(job / "summary.csv")[0]
    assert summary["status"] == "ok" and summary["epochs_completed"] == "6"
    # the requeued job continued from its own last checkpoint: epoch 2's, or 1's if the signal cut epoch 2's saving
    stopped_after = int(summary["resumed_from_epoch"])
    assert 1 <= stopped_after < 6
    log = (job / "log.out").read_text()  # both attempts, in order, in the job's folder
    saved = log.index(f"{SIGNAL}: the run's state is saved; requeueing the job")
    assert log.index(f"resuming {job} after epoch {stopped_after}") > saved

    def numbers(path):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_csv(path)]

    assert numbers(job / "metrics.csv") == numbers(tmp_path / "ref/run/metrics.csv")
    assert summary["test_acc"] == read_csv(tmp_path / "ref/run/summary.csv")[0]["test_acc"]


@pytest.mark.slow
def test_local_submitit_jobs_share_the_cores_and_keep_their_logs_in_their_folders(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli("train", "-m", "hydra/launcher=local", "experiment=smoke", "epochs=1", "seed=0,1",
                   "results_dir=results", "hydra.sweep.dir=results/sweep", cwd=work)
    assert proc.returncode == 0, proc.stderr
    sweep = work / "results/sweep"
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["epochs=1,experiment=smoke,seed=0", "epochs=1,experiment=smoke,seed=1"]
    for job in jobs:
        # both jobs run at once: threads=auto gives each hydra.launcher.cpus_per_task threads, 1 when unset
        assert read_csv(job / "summary.csv")[0]["threads"] == "1"
        assert f"dropbench train: ok (seed {job.name[-1]} test acc" in (job / "log.out").read_text()
        assert (job / "log.err").is_file()
    assert sorted(os.listdir(work)) == ["results"]  # no .submitit in the working directory
    assert not list(sweep.rglob("%j"))  # nor a folder named after submitit's unexpanded pattern


def test_threads_are_the_cpus_a_submitit_job_is_given(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cores = available_cores()

    def local(cpus):
        return OmegaConf.create({"launcher": {"_target_": SUBMITIT_LAUNCHER + "LocalLauncher", "cpus_per_task": cpus}})

    assert threads_for_job("auto", _parallel_jobs(local(None))) == 1  # every job of the sweep runs at once
    for cpus in range(1, cores + 1):
        threads = threads_for_job("auto", _parallel_jobs(local(cpus)))
        assert 1 <= threads <= cpus and (cores % cpus or threads == cpus)
    assert threads_for_job("auto", _parallel_jobs(local(4 * cores))) == cores
    assert threads_for_job(3, _parallel_jobs(local(None))) == 3  # a number given explicitly wins

    slurm = OmegaConf.create({"launcher": {"_target_": SUBMITIT_LAUNCHER + "SlurmLauncher", "cpus_per_task": 4}})
    assert _parallel_jobs(slurm) == 1  # a Slurm job's cores are its own
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # a cluster that does not pin jobs to their CPUs
    assert available_cores() == 1 and threads_for_job("auto", _parallel_jobs(slurm)) == 1


def stopped_by_submitit_signal(handler) -> list[str]:
    """What happens, in order, when submitit's signal (its handler `handler`) stops a run that saves
    its state on KeyboardInterrupt, as train_job does."""
    signum, events = getattr(signal, SIGNAL), []
    previous = signal.signal(signum, handler)
    try:
        with signals_interrupt():
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # interrupted at once
            except KeyboardInterrupt as stop:
                events.append(f"state saved ({stop.args[0]})")
                raise
        events.append("job goes on")
    except SystemExit as end:
        events.append(f"exit {end.code}")
    finally:
        assert signal.signal(signum, previous) is handler  # submitit's handler is back
    return events


def test_submitit_signal_saves_the_state_then_submitit_requeues(monkeypatch, capsys):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")

    def requeue(signum, frame):  # submitit's: checkpoint the job, requeue it, exit
        raise SystemExit(144)

    assert stopped_by_submitit_signal(requeue) == [f"state saved ({SIGNAL})", "exit 144"]

    def no_more(signum, frame):  # submitit's, past max_num_timeout
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    # the job ends as interrupted (train_job returns it), so that its sweep goes on
    assert stopped_by_submitit_signal(no_more) == [f"state saved ({SIGNAL})", "job goes on"]
    assert "not requeued (Job not requeued because: timed-out too many times.)" in capsys.readouterr().out


def test_launcher_settings_print_with_the_documented_command(tmp_path):
    proc = run_cli("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                   "-p", "hydra.launcher", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for line in ("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 "partition: gpu", "cpus_per_task: 4", "signal_delay_s: 120", "max_num_timeout: 5",
                 "submitit_folder: ${hydra.sweep.dir}/.submitit"):
        assert line in proc.stdout.splitlines()
    # with -m, Hydra prints no config: one line says so
    sweep = run_cli("train", "-m", "hydra/launcher=slurm", "seed=0,1", "--cfg", "hydra", cwd=tmp_path)
    assert sweep.returncode == 2 and len(sweep.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing submitted, nothing written
