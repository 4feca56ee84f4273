"""The training loop: one Hydra job = one config trained for R seeds at once (R = parallel_seeds).

Data sit on the device; each step gathers a batch [R, B, ...] through per-replica index
permutations, computes the regularized loss per replica, and steps all replicas together. After
every epoch both splits are evaluated under the regularizers' evaluation rule and metrics.csv is
rewritten; when the run ends (finished, diverged, failed or interrupted) summary.csv is written.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dropbench import __version__
from dropbench.config import UserError, check_run_config, check_writable
from dropbench.data import Dataset
from dropbench.regularizers import Regularizers, build_regularizers
from dropbench.replicas import ReplicaRNG
from dropbench.results import (METRICS_COLUMNS, SUMMARY_COLUMNS, config_columns, find_finished, identity,
                               write_csv)


def build(node: DictConfig, **kwargs):
    """Instantiate a config group node; its `name` key labels results and is not an argument."""
    return instantiate({k: v for k, v in node.items() if k != "name"}, **kwargs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} is not available: PyTorch sees no CUDA GPU here; use device=cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name} is not available; this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    raise UserError(f"device={name!r} is not allowed; choose auto, cpu, cuda or cuda:N")


def threads_for_job(setting, parallel_jobs: int) -> int:
    """Torch threads for this process: parallel jobs share the cores instead of oversubscribing them."""
    if setting != "auto":
        return int(setting)
    return max(1, (os.cpu_count() or 1) // max(1, parallel_jobs))


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


def train_job(cfg: DictConfig, output_dir: Path, multirun: bool, parallel_jobs: int = 1) -> str:
    """Run one job; returns its status ("ok", "diverged", "failed", "interrupted" or "skipped").

    Raises UserError before anything is written if the config is invalid.
    """
    check_run_config(cfg)
    device = resolve_device(cfg.device)
    check_writable(str(output_dir))
    config = OmegaConf.to_container(cfg, resolve=True)
    seeds = [cfg.seed + k for k in range(cfg.parallel_seeds)]
    if multirun and not cfg.force:  # an interrupted sweep re-run skips what already finished
        done = {s: find_finished(cfg.results_dir, identity(config, s)[0]) for s in seeds}
        for s, where in done.items():
            if where is not None:
                print(f"dropbench: seed {s} of this job already finished in {where}; skipped (force=true re-runs)")
        seeds = [s for s in seeds if done[s] is None]
        if not seeds:
            return "skipped"

    torch.set_num_threads(threads_for_job(cfg.threads, parallel_jobs))
    data: Dataset = build(cfg.dataset, device=device)
    rng = ReplicaRNG(seeds, device)
    regs = build_regularizers(cfg.regularizer)
    model = build(cfg.model, in_shape=data.in_shape, num_classes=data.num_classes, regs=regs, rng=rng).to(device)
    regs.check_model(model)
    optimizer = build(cfg.optimizer, params=model.parameters())
    scheduler = build(cfg.schedule, optimizer=optimizer) if "_target_" in cfg.schedule else None

    replicas = []
    for s in seeds:
        run_key, group_key = identity(config, s)
        out = output_dir / f"seed_{s}" if cfg.parallel_seeds > 1 else output_dir
        replicas.append(Replica(s, run_key, group_key, out))
    started_at, t_start = _now(), time.perf_counter()
    try:
        _fit(cfg, data, model, regs, optimizer, scheduler, rng, replicas)
    except KeyboardInterrupt:
        _finish(replicas, "interrupted", "")
        _write_summaries(cfg, config, regs, replicas, started_at, time.perf_counter() - t_start, device)
        raise
    except UserError:
        raise
    except Exception as error:  # a crash is recorded as a failed run so that a sweep goes on
        _finish(replicas, "failed", f"{type(error).__name__}: {error}")
    else:
        _finish(replicas, "ok", "")
    _write_summaries(cfg, config, regs, replicas, started_at, time.perf_counter() - t_start, device)
    statuses = {r.status for r in replicas}
    return "failed" if "failed" in statuses else "diverged" if statuses == {"diverged"} else "ok"


def _fit(cfg, data: Dataset, model, regs: Regularizers, optimizer, scheduler, rng: ReplicaRNG, replicas) -> None:
    R, n, B = rng.replicas, len(data.x_train), cfg.batch_size
    live = torch.ones(R, dtype=torch.bool)
    with _progress(cfg) as bar:
        task = bar.add_task("train", total=cfg.epochs) if bar else None
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            epoch_loss = torch.zeros(R, device=data.x_train.device)
            order = rng.permutations(n)
            for start in range(0, n, B):
                idx = order[:, start:start + B]
                loss = regs.loss(model, data.x_train[idx], data.y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()  # replicas are independent: d(sum)/d(loss_r) = 1
                optimizer.step()
                regs.after_step(model)
                epoch_loss += loss.detach()
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


def _row(epoch, split, metrics, r, seconds) -> dict:
    loss, acc, ent = metrics
    return {"epoch": epoch, "split": split, "loss": loss[r], "accuracy": acc[r], "entropy": ent[r],
            "seconds": round(seconds, 6)}


def _finish(replicas, status: str, error: str) -> None:
    for rep in replicas:
        if rep.status == "running":
            rep.status, rep.error = status, error


def _write_summaries(cfg, config, regs: Regularizers, replicas, started_at, wall_seconds, device) -> None:
    reg_params = regs.summary()
    p = reg_params.get("p", "")
    p = "/".join(str(v) for v in p) if isinstance(p, list) else p
    columns = SUMMARY_COLUMNS + sorted(config_columns(config))
    for rep in replicas:
        train = [row for row in rep.rows if row["split"] == "train"]
        test = [row for row in rep.rows if row["split"] == "test"]
        best = max(test, key=lambda row: row["accuracy"]) if test else None
        summary = {
            "format": 1, "run_id": uuid.uuid4().hex[:12], "run_key": rep.run_key, "group_key": rep.group_key,
            "status": rep.status, "dataset": cfg.dataset.name, "model": cfg.model.name, "regularizer": regs.name,
            "p": p, "seed": rep.seed, "epochs": cfg.epochs, "lr": cfg.optimizer.lr, "batch_size": cfg.batch_size,
            "optimizer": cfg.optimizer.name, "epochs_completed": len(test), "diverged_epoch": rep.diverged_epoch,
            "train_acc": train[-1]["accuracy"] if train else "", "test_acc": test[-1]["accuracy"] if test else "",
            "best_test_acc": best["accuracy"] if best else "", "best_epoch": best["epoch"] if best else "",
            "gap": train[-1]["accuracy"] - test[-1]["accuracy"] if test else "",
            "train_loss": train[-1]["loss"] if train else "", "test_loss": test[-1]["loss"] if test else "",
            "test_entropy": test[-1]["entropy"] if test else "", "wall_seconds": round(wall_seconds, 3),
            "parallel_seeds": len(replicas), "error": rep.error, "started_at": started_at, "finished_at": _now(),
            "device": str(device), "dropbench_version": __version__,
            **config_columns({**config, "seed": rep.seed}),
        }
        write_csv(rep.out_dir / "summary.csv", [summary], columns)


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
