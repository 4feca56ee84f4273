"""Run management around the training loop: one Hydra job = one config trained for R seeds, or in
a folded sweep several jobs trained together, each of their seeds one replica (train_jobs).

`train_jobs` decides what to train (finished seeds are skipped, an interrupted run is continued
with resume=true, a requeued submitit job continues its own), where results go (a folder never
holds two runs), and writes what the loop produces: metrics.csv after every epoch, a checkpoint,
progress lines, tracker logs, and at the end, however the run ends (finished, diverged, failed or
interrupted), summary.csv. Every file is written atomically (dropbench.results.atomic_file). The
loop itself is dropbench.train.fit.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dropbench import __version__
from dropbench.config import UserError, check_run_config, check_writable, one_line
from dropbench.results import (
    CHECKPOINT,
    CHECKPOINT_INFO,
    FORMAT,
    METRICS_COLUMNS,
    SUMMARY_COLUMNS,
    DiskFull,
    atomic_file,
    config_columns,
    copy_run,
    csv_text,
    find_finished,
    find_resumable,
    identity,
    metrics_rows,
    read_checkpoint_info,
    read_summary,
    remove_if_only_hydra,
    remove_quietly,
    remove_stale_temp,
    seed_dir,
    settings,
    write_atomic,
    write_checkpoint_info,
    write_csv,
)
from dropbench.signals import signals_ignored, signals_interrupt, submitit_signal
from dropbench.train import Run, build_run, diverged, fit, resolve_device, restore_optimizer

CHECKPOINT_FORMAT = 3
READ_CHECKPOINT_FORMATS = (2, 3)  # format 2 kept each seed's rows themselves, 3 their metrics.csv text


@dataclass
class SeedRun:
    """What one seed's run (one replica) has produced so far."""

    seed: int
    run_key: str
    group_key: str
    out_dir: Path
    job: int = 0  # which of the jobs trained together it belongs to
    rows: list = field(default_factory=list)
    metrics_csv: str = ""  # the rows as metrics.csv holds them; the checkpoint keeps this text
    epochs: int = 0  # epochs trained and recorded (metrics rows only on evaluated epochs)
    status: str = "running"
    diverged_epoch: int | None = None
    error: str = ""


@dataclass
class Job:
    """One Hydra job: its config, its Hydra output folder, and the seeds it trains."""

    cfg: DictConfig
    output_dir: Path
    config: dict = field(default_factory=dict)  # cfg resolved
    seeds: list = field(default_factory=list)
    run_dir: Path | None = None  # where its results go

    def seed_dir(self, run_dir: Path, seed: int) -> Path:
        return seed_dir(run_dir, seed, self.cfg.parallel_seeds)


@dataclass
class JobResult:
    """How a job ended ("ok", "diverged", "failed", "interrupted" or "skipped") and where it wrote."""

    status: str
    run_dir: Path
    accuracy: str = ""  # test accuracy per seed, for the closing line


def threads_for_job(setting, parallel_jobs: int) -> int:
    """Torch threads for this process: parallel jobs share the cores instead of oversubscribing them."""
    if setting != "auto":
        return int(setting)
    return max(1, available_cores() // max(1, parallel_jobs))


def available_cores() -> int:
    """Cores this process may run on: a Slurm or container allocation, not the whole machine. A Slurm
    job's --cpus-per-task bounds it also on clusters that do not pin jobs to their CPUs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    given = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(given)) if given.isdigit() and int(given) > 0 else cores


def train_job(cfg: DictConfig, output_dir: Path, multirun: bool, parallel_jobs: int = 1, job_num: int = 0) -> JobResult:
    """Run one job (or continue it from its checkpoint with resume=true, or, as a requeued submitit
    job, from the checkpoint in its own folder) and return how it ended; `job_num` is the job's
    number in its sweep (it picks the GPU when several are visible).

    Raises UserError before anything is written if the config is invalid.
    """
    return train_jobs([(cfg, output_dir)], multirun, parallel_jobs, job_num)[0]


def train_jobs(jobs: list[tuple[DictConfig, Path]], multirun: bool, parallel_jobs: int = 1,
               job_num: int = 0) -> list[JobResult]:
    """Train jobs (config, Hydra output folder) together as one set of replicas, each of their seeds
    one replica, and return how each ended: one job, or the jobs of a folded sweep (dropbench.fold),
    which differ only in seeds, the regularizer's numeric settings and the learning rate. The first job's config
    decides how they run (device, threads, epochs, checkpoints); each seed writes its own results
    into its own job's folder, as if trained alone.
    """
    jobs = [Job(c, Path(d)) for c, d in jobs]
    for job in jobs:
        check_run_config(job.cfg)
        check_writable(job.cfg.results_dir)
        check_writable(str(job.output_dir))
        job.config = OmegaConf.to_container(job.cfg, resolve=True)
        job.seeds = [job.cfg.seed + k for k in range(job.cfg.parallel_seeds)]
    cfg = jobs[0].cfg
    device = resolve_device(cfg.device, job_num)

    if (multirun or cfg.resume) and not cfg.force:  # a re-run skips what already finished
        for job in jobs:
            done = {s: find_finished(job.cfg.results_dir, identity(job.config, s)[0]) for s in job.seeds}
            for s, where in done.items():
                if where is not None:  # the sweep directory still gets the run's results, so it reports whole
                    copy_run(where, job.seed_dir(job.output_dir, s))
                    which = f"job {job.output_dir.name}" if len(jobs) > 1 else "this job"
                    print(f"dropbench: seed {s} of {which} already finished in {where}; not trained again, "
                          f"its results copied (force=true re-runs)")
            job.seeds = [s for s in job.seeds if done[s] is None]
    if not any(job.seeds for job in jobs):
        return [JobResult("skipped", job.output_dir) for job in jobs]
    training = [job for job in jobs if job.seeds]
    keys = {(j, s): identity(job.config, s) for j, job in enumerate(jobs) for s in job.seeds}
    run_keys = [key[0] for key in keys.values()]
    home = training[0].output_dir  # the checkpoint's folder
    if submitit_signal() is not None and find_resumable(str(home), run_keys, device.type) == home:
        # a submitit job started again after a timeout or preemption (requeued by submitit or by Slurm) finds
        # its checkpoint in its own folder: it continues, with the numbers of a run that never stopped
        found = home
    else:
        found = find_resumable(cfg.results_dir, run_keys, device.type)
        if found is not None and not cfg.resume:
            if found != home:
                print(f"dropbench: an unfinished run of this job has a checkpoint in {found}; starting afresh "
                      f"(resume=true continues it instead)")
            found = None
        elif cfg.resume and found is None:
            print("dropbench: resume=true but no unfinished run of this config has a checkpoint; starting afresh")
    if found is not None:  # the runs go on where they were
        where = {key: Path(os.path.normpath(found / folder)) for key, folder in read_checkpoint_info(found).items()}
        for j, job in enumerate(jobs):
            for s in job.seeds:
                job.run_dir = where[keys[j, s][0]].parent if job.cfg.parallel_seeds > 1 else where[keys[j, s][0]]
        out_dirs = {(j, s): where[keys[j, s][0]] for j, s in keys}
        home = found
    else:
        for j, job in enumerate(jobs):
            if job.seeds:
                job.run_dir = free_run_dir(job.output_dir, [job.seed_dir(job.output_dir, s) for s in job.seeds],
                                           {s: keys[j, s] for s in job.seeds}, job.cfg, multirun)
        out_dirs = {(j, s): jobs[j].seed_dir(jobs[j].run_dir, s) for j, s in keys}
        home = training[0].run_dir
    for job in training:
        if job.run_dir != job.output_dir:  # its results go on elsewhere
            remove_if_only_hydra(job.output_dir, Path(job.cfg.results_dir))
    threads = threads_for_job(cfg.threads, parallel_jobs)
    torch.set_num_threads(threads)

    runs = [SeedRun(s, *keys[j, s], out_dirs[j, s], job=j) for j, s in keys]
    if len(training) > 1:
        print(f"dropbench train: {len(training)} jobs folded into one run of {len(runs)} replicas", flush=True)
    state = {"run_dir": home, "started_at": _now(), "resumed_from": None, "earlier_seconds": 0.0,
             "train_seconds": 0.0}
    run, started, t_start, trackers, disk_full = None, False, time.perf_counter(), [], None
    with signals_interrupt():
        try:
            run = build_run(cfg, device, [r.seed for r in runs], [jobs[r.job].cfg for r in runs])
            if found is not None:
                _restore(state, runs, run)
            else:
                _start_afresh(home, runs)
            started = True  # from here on the run directories tell how far they got
            trackers = _open_trackers(jobs, runs, multirun)
            with _progress(cfg, len(runs)) as progress:
                def on_epoch(epoch, mean_loss, metrics, train_seconds, eval_seconds) -> bool:
                    state["train_seconds"] += train_seconds
                    _record_epoch(runs, trackers, epoch, diverged(mean_loss, run.data.num_classes), metrics,
                                  train_seconds, eval_seconds)
                    progress(epoch, cfg.epochs, metrics, train_seconds + eval_seconds)
                    live = any(seed_run.status == "running" for seed_run in runs)
                    if live and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
                        _save_checkpoint(state, runs, run, epoch, time.perf_counter() - t_start, device)
                    return live

                fit(cfg, run, (state["resumed_from"] or 0) + 1, on_epoch)
        except KeyboardInterrupt:
            if started:
                with signals_ignored():  # a second Ctrl-C must not cut the state being written
                    _finish(runs, "interrupted", "")
                    for seed_run in runs:  # the signal may have cut the last metrics.csv write short
                        if seed_run.metrics_csv:
                            write_atomic(seed_run.out_dir / "metrics.csv", seed_run.metrics_csv)
                    _close(jobs, run, state, runs, trackers, time.perf_counter() - t_start, device, threads)
            raise
        except Exception as error:  # a crash is recorded as a failed run so that a sweep goes on
            if not started and isinstance(error, UserError):
                raise  # a config problem found while building: nothing written, one line
            _finish(runs, "failed", f"{type(error).__name__}: {one_line(error)}")
            disk_full = error if isinstance(error, DiskFull) else None
        else:
            _finish(runs, "ok", "")
        _close(jobs, run, state, runs, trackers, time.perf_counter() - t_start, device, threads)
        if disk_full is not None:  # recorded as failed where it could be; the command must not go on
            raise disk_full
    _finish(runs, "interrupted", "")  # stopped by submitit's signal and not requeued (signals_interrupt)
    statuses = {r.status for r in runs}
    if statuses <= {"ok", "diverged"} and not cfg.keep_checkpoint:  # nothing left to continue
        remove_quietly(home / CHECKPOINT, home / CHECKPOINT_INFO)
    return [_job_result(job, [r for r in runs if r.job == j]) for j, job in enumerate(jobs)]


def _job_result(job: Job, runs: list[SeedRun]) -> JobResult:
    if not runs:
        return JobResult("skipped", job.output_dir)
    statuses = {r.status for r in runs}
    status = ("failed" if "failed" in statuses else "interrupted" if "interrupted" in statuses
              else "diverged" if statuses == {"diverged"} else "ok")
    accuracy = ", ".join(f"seed {r.seed} test acc {_last(r.rows, 'test', 'accuracy'):.3f}"
                         for r in runs if _last(r.rows, "test", "accuracy") is not None)
    return JobResult(status, job.run_dir, accuracy)


def _record_epoch(runs: list[SeedRun], trackers: list, epoch: int, stopped: list[bool], metrics: dict,
                  train_seconds: float, eval_seconds: float) -> None:
    """Each running seed's metrics of this epoch into its metrics.csv and trackers; a seed whose
    training loss diverged stops recording (the others go on)."""
    for r, (seed_run, stop) in enumerate(zip(runs, stopped)):
        if seed_run.status != "running":
            continue
        if stop:
            seed_run.status, seed_run.diverged_epoch = "diverged", epoch
            continue
        seed_run.epochs = epoch
        if not metrics:  # an epoch eval_every skips
            continue
        rows = [{"epoch": epoch, "split": split, **{k: v[r] for k, v in values.items()},
                 "seconds": round(train_seconds if split == "train" else eval_seconds, 6)}
                for split, values in metrics.items()]
        # the text grows by this epoch's lines: formatting every row anew each epoch grew with the run
        text = csv_text(rows, METRICS_COLUMNS, header=not seed_run.metrics_csv)
        seed_run.rows += rows
        seed_run.metrics_csv += text
        write_atomic(seed_run.out_dir / "metrics.csv", seed_run.metrics_csv)
        if trackers:
            trackers[r].log_epoch(epoch, {f"{split}/{'acc' if k == 'accuracy' else k}": v[r]
                                          for split, values in metrics.items() for k, v in values.items()})


def _open_trackers(jobs: list[Job], runs: list[SeedRun], multirun: bool) -> list:
    """One tracker run per seed (TensorBoard, MLflow, W&B as the `logger` group says), grouped by sweep."""
    if not jobs[0].cfg.get("logger"):
        return []
    from dropbench.trackers import Trackers

    trackers = []
    for r in runs:
        job = jobs[r.job]
        group = job.output_dir.parent.name if multirun else "runs"
        trackers.append(Trackers.open(job.cfg.logger, run_name=f"{job.output_dir.name}-seed{r.seed}", group=group,
                                      config={**settings(job.config), "seed": r.seed}, out_dir=r.out_dir))
    return trackers


def free_run_dir(run_dir: Path, seed_dirs: list[Path], keys: dict, cfg, multirun: bool) -> Path:
    """`run_dir`, unless it holds results of a run it would overwrite: a finished run is never
    deleted by another. A single run refuses (force=true replaces it); a sweep job whose folder is
    taken by another config writes into the next free `NAME-2`, `NAME-3`, ... instead."""
    run_keys = {k[0] for k in keys.values()}
    taken = [d for d in seed_dirs if (row := read_summary(d / "summary.csv")) is not None
             and (row["status"] in ("ok", "diverged") or row["run_key"] not in run_keys)]
    if not taken or cfg.force:
        return run_dir
    if not multirun:
        raise UserError(f"hydra.run.dir {str(run_dir)!r} already holds a finished run; choose another directory, "
                        f"or force=true to replace it")
    n = 2
    while (run_dir.parent / f"{run_dir.name}-{n}").exists():
        n += 1
    moved = run_dir.parent / f"{run_dir.name}-{n}"
    print(f"dropbench: {run_dir} holds another run's results; this job writes into {moved}")
    return moved


def _last(rows: list[dict], split: str, key: str):
    values = [row[key] for row in rows if row["split"] == split]
    return values[-1] if values else None


def _finish(runs: list[SeedRun], status: str, error: str) -> None:
    for seed_run in runs:
        if seed_run.status == "running":
            seed_run.status, seed_run.error = status, error


def _close(jobs: list[Job], run: Run | None, state: dict, runs: list[SeedRun], trackers: list, wall_seconds: float,
           device, threads: int) -> None:
    """However a run ended: each seed's summary.csv, then its trackers told the status."""
    _write_summaries(jobs, run, state, runs, wall_seconds, device, threads)
    for seed_run, tracker in zip(runs, trackers):
        tracker.finish(seed_run.status)


def _write_summaries(jobs: list[Job], run: Run | None, state: dict, runs: list[SeedRun], wall_seconds: float, device,
                     threads: int) -> None:
    from dropbench.models import model_label

    for k, seed_run in enumerate(runs):
        cfg, config = jobs[seed_run.job].cfg, jobs[seed_run.job].config
        if run is not None:
            name, reg_params = run.regs.name, run.replica_regs[k].summary()
        else:  # stopped before the regularizers were built
            name = "+".join(cfg.regularizer.get("methods") or {}) or "none"
            reg_params = {"p": cfg.regularizer.get("p", "")}
        p = reg_params.get("p", "")
        p = "/".join(str(v) for v in p) if isinstance(p, (list, tuple)) or OmegaConf.is_list(p) else p
        by_split = {s: [row for row in seed_run.rows if row["split"] == s] for s in ("train", "val", "test")}
        last = {s: rows[-1] if rows else {} for s, rows in by_split.items()}
        # the epoch selected on validation accuracy (the first of equals); test data take no part
        best = max(by_split["val"], key=lambda row: row["accuracy"]) if by_split["val"] else {}
        test_at_best = next((row for row in by_split["test"] if best and row["epoch"] == best["epoch"]), {})
        epochs_done = seed_run.epochs
        summary = {
            "format": FORMAT, "run_id": uuid.uuid4().hex[:12], "run_key": seed_run.run_key,
            "group_key": seed_run.group_key, "status": seed_run.status, "dataset": cfg.dataset.name,
            "model": model_label(cfg.model), "regularizer": name, "p": p, "seed": seed_run.seed, "epochs": cfg.epochs,
            "lr": cfg.optimizer.lr, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer.name,
            "val_fraction": cfg.dataset.get("val_fraction", ""), "epochs_completed": epochs_done,
            "diverged_epoch": seed_run.diverged_epoch,
            "train_acc": last["train"].get("accuracy", ""), "val_acc": last["val"].get("accuracy", ""),
            "test_acc": last["test"].get("accuracy", ""),
            "gap": last["train"]["accuracy"] - last["test"]["accuracy"] if last["test"] else "",
            "train_loss": last["train"].get("loss", ""), "val_loss": last["val"].get("loss", ""),
            "test_loss": last["test"].get("loss", ""), "test_ece": last["test"].get("ece", ""),
            "best_epoch": best.get("epoch", ""), "best_val_acc": best.get("accuracy", ""),
            "test_acc_at_best": test_at_best.get("accuracy", ""),
            "train_seconds": round(state["train_seconds"], 3),
            "seconds_per_epoch": round(state["train_seconds"] / epochs_done, 4) if epochs_done else "",
            "wall_seconds": round(state["earlier_seconds"] + wall_seconds, 3),
            "parallel_seeds": len(runs), "error": seed_run.error, "started_at": state["started_at"],
            "finished_at": _now(), "device": str(device), "dropbench_version": __version__,
            "threads": threads, "resumed_from_epoch": state["resumed_from"] or "",
            **config_columns({**config, "seed": seed_run.seed}),
        }
        write_csv(seed_run.out_dir / "summary.csv", [summary], SUMMARY_COLUMNS + sorted(config_columns(config)))


# -- checkpoints -----------------------------------------------------------------------------------

def _start_afresh(run_dir: Path, runs: list[SeedRun]) -> None:
    """A run directory being (re)used from the start holds nothing of an earlier attempt."""
    for seed_run in runs:
        remove_quietly(seed_run.out_dir / "summary.csv", seed_run.out_dir / "metrics.csv")
        remove_stale_temp(seed_run.out_dir)
    remove_quietly(run_dir / CHECKPOINT, run_dir / CHECKPOINT_INFO)
    remove_stale_temp(run_dir)


def _save_checkpoint(state: dict, runs: list[SeedRun], run: Run, epoch: int, seconds: float,
                     device: torch.device) -> None:
    """Everything needed to continue after `epoch`, as one dict, written atomically; checkpoint.json
    (run keys) beside it."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "started_at": state["started_at"],
        "wall_seconds": state["earlier_seconds"] + seconds, "train_seconds": state["train_seconds"],
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "generators": run.generators.state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # the metrics as the text metrics.csv got: pickling the rows anew at every epoch made a
        # checkpoint grow with the run (one seed, 2-core CPU: 3.3 ms at epoch 150 and 4.6 ms at
        # epoch 300, against 2.2 and 2.0 ms with the text and checkpoint.json written once)
        "seeds": [{"seed": r.seed, "run_key": r.run_key, "status": r.status, "diverged_epoch": r.diverged_epoch,
                   "metrics_csv": r.metrics_csv, "epochs": r.epochs} for r in runs],
    }
    # checkpoint.json first: a checkpoint.pt is never without it (resume ignores a json alone); its
    # content does not change while the process runs, so it is written once
    if not state.get("checkpoint_info_written"):
        write_checkpoint_info(state["run_dir"], [r.run_key for r in runs],
                              [os.path.relpath(r.out_dir, state["run_dir"]) for r in runs], device.type)
        state["checkpoint_info_written"] = True
    with atomic_file(state["run_dir"] / CHECKPOINT, "wb") as f:
        torch.save(checkpoint, f)


def _restore(state: dict, runs: list[SeedRun], run: Run) -> None:
    """Continue from the run directory's checkpoint: every state as it was at the end of its epoch."""
    path = state["run_dir"] / CHECKPOINT
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("format") not in READ_CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint format {checkpoint.get('format')!r}, this version reads "
                             f"{' and '.join(map(str, READ_CHECKPOINT_FORMATS))}")
        run.model.load_state_dict(checkpoint["model"])
        restore_optimizer(run, checkpoint["optimizer"], checkpoint["scheduler"])
        run.generators.load_state(checkpoint["generators"])
        torch.set_rng_state(checkpoint["torch_rng"])  # random ops outside dropbench's layers draw from it
        if checkpoint["cuda_rng"] is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], run.data.device)
        # by run key: the replicas of a folded sweep may share a seed (dropbench 0.2's checkpoints have seeds only)
        saved = {r.get("run_key", r["seed"]): r for r in checkpoint["seeds"]}
        for seed_run in runs:
            r = saved.get(seed_run.run_key) or saved[seed_run.seed]
            # the saved text is what metrics.csv held; format 2 saved the rows themselves
            seed_run.metrics_csv = r["metrics_csv"] if "metrics_csv" in r else csv_text(r["rows"], METRICS_COLUMNS)
            seed_run.rows = metrics_rows(seed_run.metrics_csv)
            seed_run.status, seed_run.diverged_epoch = r["status"], r["diverged_epoch"]
            seed_run.epochs = r["epochs"]
    except Exception as error:
        raise UserError(f"cannot resume from {path} ({type(error).__name__}: {one_line(error)}); "
                        f"delete it, or run without resume=true") from None
    remove_stale_temp(state["run_dir"])
    for seed_run in runs:  # the directory holds a running run again
        remove_quietly(seed_run.out_dir / "summary.csv")
        remove_stale_temp(seed_run.out_dir)
        write_atomic(seed_run.out_dir / "metrics.csv", seed_run.metrics_csv)
    state.update(resumed_from=checkpoint["epoch"], started_at=checkpoint["started_at"],
                 earlier_seconds=checkpoint["wall_seconds"], train_seconds=checkpoint["train_seconds"])
    print(f"dropbench: resuming {state['run_dir']} after epoch {checkpoint['epoch']}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- progress ------------------------------------------------------------------------------------------

@contextmanager
def _progress(cfg, replicas: int):
    """Yields progress(epoch, epochs, metrics, seconds): a rich bar with ETA on a terminal; one
    plain line per epoch on stdout elsewhere (cluster logs, nohup), so a log shows life; nothing
    with progress=false."""
    if cfg.progress is False:
        yield lambda *args: None
        return
    if not sys.stderr.isatty():
        def line(epoch, epochs, metrics, seconds):
            accs = [f"{split}_acc {_mean(m['accuracy']):.4f}" for split, m in metrics.items()]
            print(" ".join([f"epoch {epoch}/{epochs}", *accs, f"{seconds:.2f} s"]), flush=True)

        yield line
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("train", total=cfg.epochs)

        def update(epoch, epochs, metrics, seconds):
            if not metrics:  # not evaluated this epoch
                bar.update(task, completed=epoch)
                return
            split = "val" if "val" in metrics else "test"
            bar.update(task, completed=epoch,
                       description=f"epoch {epoch} {split} acc {_mean(metrics[split]['accuracy']):.3f}"
                                   + (f" (mean of {replicas})" if replicas > 1 else ""))

        yield update


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
