"""The training loop: one Hydra job = one config trained for R seeds at once (R = parallel_seeds).

Data sit on the device; each step gathers a batch [R, B, ...] through per-replica index
permutations, computes the regularized loss per replica, and steps all replicas together. After
every epoch both splits are evaluated under the regularizers' evaluation rule, metrics.csv is
rewritten and a checkpoint saved; when the run ends (finished, diverged, failed or interrupted)
summary.csv is written. Every file is written atomically (dropbench.results.atomic_file).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dropbench import __version__
from dropbench.config import UserError, build, check_run_config, check_writable, one_line
from dropbench.data import Dataset
from dropbench.regularizers import Regularizers, build_regularizers
from dropbench.replicas import ReplicaRNG, gather_rows
from dropbench.results import (CHECKPOINT, CHECKPOINT_INFO, METRICS_COLUMNS, SUMMARY_COLUMNS, atomic_file,
                               config_columns, copy_run, find_finished, find_resumable, identity, remove_if_only_hydra,
                               remove_quietly, remove_stale_temp, write_checkpoint_info, write_csv)

CHECKPOINT_FORMAT = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if isinstance(name, str) and name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} is not available: PyTorch sees no CUDA GPU here; use device=cpu or auto")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"device={name!r} is not allowed; choose auto, cpu, cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name} is not available; this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    raise UserError(f"device={name!r} is not allowed; choose auto, cpu, cuda or cuda:N")


def threads_for_job(setting, parallel_jobs: int) -> int:
    """Torch threads for this process: parallel jobs share the cores instead of oversubscribing them."""
    if setting != "auto":
        return int(setting)
    return max(1, available_cores() // max(1, parallel_jobs))


def available_cores() -> int:
    """Cores this process may run on: a Slurm or container allocation, not the whole machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Replica:
    """What one seed's run has produced so far."""

    seed: int
    run_key: str
    group_key: str
    out_dir: Path
    rows: list = field(default_factory=list)
    status: str = "running"
    diverged_epoch: int | None = None
    error: str = ""


@dataclass
class JobResult:
    """How a job ended ("ok", "diverged", "failed", "interrupted" or "skipped") and where it wrote."""

    status: str
    run_dir: Path
    accuracy: str = ""  # final test accuracy per seed, for the closing line


@dataclass
class Session:
    """Everything a run needs to go on after a restart (what checkpoint.pt holds, with the model's,
    optimizer's, scheduler's and random generators' states)."""

    run_dir: Path
    replicas: list
    started_at: str
    resumed_from: int | None = None  # last epoch of the checkpoint this run was continued from
    earlier_seconds: float = 0.0  # wall time spent before that checkpoint


@torch.no_grad()
def evaluate(model, regs: Regularizers, x: torch.Tensor, y: torch.Tensor, replicas: int, batch_size: int):
    """Mean loss, accuracy and predictive entropy per replica over (x, y), under the evaluation rule."""
    model.eval()
    loss = torch.zeros(replicas, device=x.device, dtype=torch.float64)
    correct = torch.zeros_like(loss)
    entropy = torch.zeros_like(loss)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        logp = regs.predict(model, xb.expand(replicas, *xb.shape))
        loss += -logp.gather(-1, yb.expand(replicas, -1).unsqueeze(-1)).squeeze(-1).sum(1)
        correct += (logp.argmax(-1) == yb).sum(1)
        entropy += torch.special.entr(logp.exp()).sum(-1).sum(1)
    n = len(x)
    return (loss / n).tolist(), (correct / n).tolist(), (entropy / n).tolist()


def train_job(cfg: DictConfig, output_dir: Path, multirun: bool, parallel_jobs: int = 1) -> JobResult:
    """Run one job (or continue it from its checkpoint with resume=true) and return how it ended.

    Raises UserError before anything is written if the config is invalid.
    """
    check_run_config(cfg)
    check_writable(cfg.results_dir)
    check_writable(str(output_dir))
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    seeds = [cfg.seed + k for k in range(cfg.parallel_seeds)]
    if (multirun or cfg.resume) and not cfg.force:  # a re-run skips what already finished
        done = {s: find_finished(cfg.results_dir, identity(config, s)[0]) for s in seeds}
        for s, where in done.items():
            if where is not None:  # the sweep directory still gets the run's results, so it reports whole
                here = output_dir / f"seed_{s}" if cfg.parallel_seeds > 1 else output_dir
                copy_run(where, here)
                print(f"dropbench: seed {s} of this job already finished in {where}; not trained again, "
                      f"its results copied (force=true re-runs)")
        seeds = [s for s in seeds if done[s] is None]
        if not seeds:
            return JobResult("skipped", output_dir)
    keys = {s: identity(config, s) for s in seeds}
    found = find_resumable(cfg.results_dir, [keys[s][0] for s in seeds], device.type)
    if found is not None and not cfg.resume:
        if found != output_dir:
            print(f"dropbench: an unfinished run of this job has a checkpoint in {found}; starting afresh "
                  f"(resume=true continues it instead)")
        found = None
    elif cfg.resume and found is None:
        print("dropbench: resume=true but no unfinished run of this config has a checkpoint; starting afresh")
    if found is not None and found != output_dir:  # the run goes on in its own directory
        remove_if_only_hydra(output_dir, Path(cfg.results_dir))
    run_dir = found or output_dir
    threads = threads_for_job(cfg.threads, parallel_jobs)
    torch.set_num_threads(threads)

    replicas = [Replica(s, *keys[s], run_dir / f"seed_{s}" if cfg.parallel_seeds > 1 else run_dir) for s in seeds]
    session = Session(run_dir, replicas, _now())
    regs, started, t_start = None, False, time.perf_counter()
    with _signals_interrupt():
        try:
            data, model, regs, optimizer, scheduler, rng = build_run(cfg, device, seeds)
            parts = (model, optimizer, scheduler, rng, regs)
            if found is not None:
                _restore(session, parts, device)
            else:
                _start_afresh(session)
            started = True  # from here on the run directory tells how far it got

            def checkpoint(epoch: int) -> None:
                _save_checkpoint(session, parts, epoch, time.perf_counter() - t_start, device)

            _fit(cfg, data, model, regs, optimizer, scheduler, rng, replicas,
                 start_epoch=(session.resumed_from or 0) + 1, checkpoint=checkpoint)
        except KeyboardInterrupt:
            if started:
                with _signals_ignored():  # a second Ctrl-C must not cut the state being written
                    _finish(replicas, "interrupted", "")
                    for rep in replicas:  # the signal may have cut the last metrics.csv write short
                        if rep.rows:
                            write_csv(rep.out_dir / "metrics.csv", rep.rows, METRICS_COLUMNS)
                    _write_summaries(cfg, config, regs, session, time.perf_counter() - t_start, device, threads)
            raise
        except Exception as error:  # a crash is recorded as a failed run so that a sweep goes on
            if not started and isinstance(error, UserError):
                raise  # a config problem found while building: nothing written, one line
            _finish(replicas, "failed", f"{type(error).__name__}: {error}")
        else:
            _finish(replicas, "ok", "")
        _write_summaries(cfg, config, regs, session, time.perf_counter() - t_start, device, threads)
    statuses = {r.status for r in replicas}
    if statuses <= {"ok", "diverged"} and not cfg.keep_checkpoint:  # nothing left to continue
        remove_quietly(run_dir / CHECKPOINT, run_dir / CHECKPOINT_INFO)
    status = "failed" if "failed" in statuses else "diverged" if statuses == {"diverged"} else "ok"
    accuracy = ", ".join(f"seed {r.seed} test acc {r.rows[-1]['accuracy']:.3f}" for r in replicas if r.rows)
    return JobResult(status, run_dir, accuracy)


def build_run(cfg: DictConfig, device: torch.device, seeds: list[int]):
    """Data, model, regularizers, optimizer, scheduler and generators from the config."""
    data: Dataset = build(cfg.dataset, "dataset", device=device)
    rng = ReplicaRNG(seeds, device)
    regs = build_regularizers(cfg.regularizer)
    model = build(cfg.model, "model", in_shape=data.in_shape, num_classes=data.num_classes, regs=regs,
                  rng=rng).to(device)
    regs.check_model(model)
    optimizer = build(cfg.optimizer, "optimizer", params=model.parameters())
    scheduler = build(cfg.schedule, "schedule", optimizer=optimizer) if "_target_" in cfg.schedule else None
    return data, model, regs, optimizer, scheduler, rng


def train_epoch(data: Dataset, model, regs: Regularizers, optimizer, rng: ReplicaRNG, batch_size: int) -> torch.Tensor:
    """One pass over the training set in [R, B, ...] mini-batches; the summed loss per replica [R]."""
    model.train()
    epoch_loss = torch.zeros(rng.replicas, device=data.x_train.device)
    order = rng.permutations(len(data.x_train))
    for start in range(0, len(data.x_train), batch_size):
        idx = order[:, start:start + batch_size]
        loss = regs.loss(model, gather_rows(data.x_train, idx), gather_rows(data.y_train, idx))
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # replicas are independent: d(sum)/d(loss_r) = 1
        optimizer.step()
        regs.after_step(model)
        epoch_loss += loss.detach()
    return epoch_loss


def _fit(cfg, data: Dataset, model, regs: Regularizers, optimizer, scheduler, rng: ReplicaRNG, replicas,
         start_epoch: int = 1, checkpoint=None) -> None:
    R, B = rng.replicas, cfg.batch_size
    live = torch.tensor([rep.status == "running" for rep in replicas])
    with _progress(cfg) as bar:
        task = bar.add_task("train", total=cfg.epochs, completed=start_epoch - 1) if bar else None
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            epoch_loss = train_epoch(data, model, regs, optimizer, rng, B)
            if scheduler is not None:
                scheduler.step()
            _sync(data.x_train.device)
            train_seconds = time.perf_counter() - t0

            t0 = time.perf_counter()
            train_metrics = evaluate(model, regs, data.x_train, data.y_train, R, cfg.eval_batch_size)
            test_metrics = evaluate(model, regs, data.x_test, data.y_test, R, cfg.eval_batch_size)
            eval_seconds = time.perf_counter() - t0
            finite = torch.isfinite(epoch_loss.cpu()) & torch.isfinite(torch.tensor(train_metrics[0]))
            for r, rep in enumerate(replicas):
                if not live[r]:
                    continue
                if not finite[r]:  # NaN/inf: stop recording this seed, keep the others going
                    live[r] = False
                    rep.status, rep.diverged_epoch = "diverged", epoch
                    continue
                rep.rows.append(_row(epoch, "train", train_metrics, r, train_seconds))
                rep.rows.append(_row(epoch, "test", test_metrics, r, eval_seconds))
                write_csv(rep.out_dir / "metrics.csv", rep.rows, METRICS_COLUMNS)
            if bar:
                bar.update(task, advance=1, description=f"epoch {epoch} test acc {max(test_metrics[1]):.3f}")
            if not live.any():
                return
            if checkpoint is not None:
                checkpoint(epoch)


def _row(epoch, split, metrics, r, seconds) -> dict:
    loss, acc, ent = metrics
    return {"epoch": epoch, "split": split, "loss": loss[r], "accuracy": acc[r], "entropy": ent[r],
            "seconds": round(seconds, 6)}


def _finish(replicas, status: str, error: str) -> None:
    for rep in replicas:
        if rep.status == "running":
            rep.status, rep.error = status, error


def _write_summaries(cfg, config, regs: Regularizers | None, session: Session, wall_seconds, device,
                     threads: int) -> None:
    if regs is not None:
        name, reg_params = regs.name, regs.summary()
    else:  # stopped before the regularizers were built
        name, reg_params = "+".join(cfg.regularizer.get("methods") or {}) or "none", {"p": cfg.regularizer.get("p", "")}
    p = reg_params.get("p", "")
    p = "/".join(str(v) for v in p) if isinstance(p, (list, tuple)) or OmegaConf.is_list(p) else p
    columns = SUMMARY_COLUMNS + sorted(config_columns(config))
    replicas = session.replicas
    for rep in replicas:
        train = [row for row in rep.rows if row["split"] == "train"]
        test = [row for row in rep.rows if row["split"] == "test"]
        best = max(test, key=lambda row: row["accuracy"]) if test else None
        summary = {
            "format": 1, "run_id": uuid.uuid4().hex[:12], "run_key": rep.run_key, "group_key": rep.group_key,
            "status": rep.status, "dataset": cfg.dataset.name, "model": cfg.model.name, "regularizer": name,
            "p": p, "seed": rep.seed, "epochs": cfg.epochs, "lr": cfg.optimizer.lr, "batch_size": cfg.batch_size,
            "optimizer": cfg.optimizer.name, "epochs_completed": len(test), "diverged_epoch": rep.diverged_epoch,
            "train_acc": train[-1]["accuracy"] if train else "", "test_acc": test[-1]["accuracy"] if test else "",
            "best_test_acc": best["accuracy"] if best else "", "best_epoch": best["epoch"] if best else "",
            "gap": train[-1]["accuracy"] - test[-1]["accuracy"] if test else "",
            "train_loss": train[-1]["loss"] if train else "", "test_loss": test[-1]["loss"] if test else "",
            "test_entropy": test[-1]["entropy"] if test else "",
            "wall_seconds": round(session.earlier_seconds + wall_seconds, 3),
            "parallel_seeds": len(replicas), "error": rep.error, "started_at": session.started_at,
            "finished_at": _now(), "device": str(device), "dropbench_version": __version__,
            "threads": threads, "resumed_from_epoch": session.resumed_from or "",
            **config_columns({**config, "seed": rep.seed}),
        }
        write_csv(rep.out_dir / "summary.csv", [summary], columns)


# -- checkpoints -----------------------------------------------------------------------------------

def _start_afresh(session: Session) -> None:
    """A run directory being (re)used from the start holds nothing of an earlier attempt."""
    for rep in session.replicas:
        remove_quietly(rep.out_dir / "summary.csv", rep.out_dir / "metrics.csv")
        remove_stale_temp(rep.out_dir)
    remove_quietly(session.run_dir / CHECKPOINT, session.run_dir / CHECKPOINT_INFO)
    remove_stale_temp(session.run_dir)


def _save_checkpoint(session: Session, parts, epoch: int, seconds: float, device: torch.device) -> None:
    """State at the end of `epoch`, written atomically; checkpoint.json (run keys) beside it."""
    model, optimizer, scheduler, rng, regs = parts
    state = {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "started_at": session.started_at,
        "wall_seconds": session.earlier_seconds + seconds,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(rng, device),
        # a method that keeps state outside the model's parameters and buffers exposes state_dict()
        "regularizers": {m.name: m.state_dict() for m in regs.methods if hasattr(m, "state_dict")},
        "replicas": [{"seed": r.seed, "status": r.status, "diverged_epoch": r.diverged_epoch, "rows": r.rows}
                     for r in session.replicas],
    }
    with atomic_file(session.run_dir / CHECKPOINT, "wb") as f:
        torch.save(state, f)
    write_checkpoint_info(session.run_dir, [r.run_key for r in session.replicas],
                          [os.path.relpath(r.out_dir, session.run_dir) for r in session.replicas], device.type)


def _restore(session: Session, parts, device: torch.device) -> None:
    """Continue from run_dir's checkpoint: every state as it was at the end of its epoch."""
    model, optimizer, scheduler, rng, regs = parts
    path = session.run_dir / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        _load_rng_state(rng, state["rng"], device)
        for m in regs.methods:
            if hasattr(m, "load_state_dict") and m.name in state["regularizers"]:
                m.load_state_dict(state["regularizers"][m.name])
        saved = {r["seed"]: r for r in state["replicas"]}
        for rep in session.replicas:
            r = saved[rep.seed]
            rep.rows, rep.status, rep.diverged_epoch = r["rows"], r["status"], r["diverged_epoch"]
    except Exception as error:
        raise UserError(f"cannot resume from {path} ({type(error).__name__}: {one_line(error)}); "
                        f"delete it, or run without resume=true") from None
    remove_stale_temp(session.run_dir)
    for rep in session.replicas:  # the directory holds a running run again
        remove_quietly(rep.out_dir / "summary.csv")
        remove_stale_temp(rep.out_dir)
        write_csv(rep.out_dir / "metrics.csv", rep.rows, METRICS_COLUMNS)
    session.resumed_from, session.started_at = state["epoch"], state["started_at"]
    session.earlier_seconds = state["wall_seconds"]
    print(f"dropbench: resuming {session.run_dir} after epoch {state['epoch']}")


def _rng_state(rng: ReplicaRNG, device: torch.device) -> dict:
    state = {"replicas": rng.state(), "init": [g.get_state() for g in rng.init], "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _load_rng_state(rng: ReplicaRNG, state: dict, device: torch.device) -> None:
    rng.load_state(state["replicas"])
    for g, s in zip(rng.init, state["init"]):
        g.set_state(s)
    torch.set_rng_state(state["torch"])  # nn.functional.dropout (impl=torch) draws from it
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# -- signals -------------------------------------------------------------------------------------------

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def _signals_interrupt():
    """SIGTERM (a scheduler's kill, `kill PID`) stops the run like Ctrl-C: its state is written first.

    Set here as well as in the CLI, for launchers that run jobs in worker processes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def _signals_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(cfg):
    """A rich progress bar on a terminal; nothing in CI, logs or pipes."""
    show = sys.stderr.isatty() if cfg.progress == "auto" else bool(cfg.progress)
    if not show:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)
