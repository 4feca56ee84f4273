"""Run results on disk: run identity, atomic CSV writes, summary rows and statuses.

A run directory holds `metrics.csv` (rewritten after every epoch) and, once the run has ended,
`summary.csv` (one row, with `status`). Both are written to a temporary file and renamed, so a
reader sees either the previous complete file or the new one; a directory without summary.csv is
an incomplete run. Runs are identified by `run_key`, a hash of the resolved config and seed, so a
re-run of the same job is recognised whatever directory it was written to.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

FORMAT = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
STATUSES = ("ok", "diverged", "failed", "interrupted")
METRICS_COLUMNS = ["epoch", "split", "loss", "accuracy", "entropy", "seconds"]
SUMMARY_COLUMNS = [
    "format", "run_id", "run_key", "group_key", "status", "dataset", "model", "regularizer", "p", "seed",
    "epochs", "lr", "batch_size", "optimizer", "epochs_completed", "diverged_epoch",
    "train_acc", "test_acc", "best_test_acc", "best_epoch", "gap", "train_loss", "test_loss", "test_entropy",
    "wall_seconds", "parallel_seeds", "error", "started_at", "finished_at", "device", "dropbench_version",
]
# Settings that change where or how fast a run goes, not what it computes.
NOT_IDENTITY = {"device", "threads", "progress", "results_dir", "force", "eval_batch_size", "parallel_seeds",
                "dataset.cache_dir", "dataset.root", "dataset.download"}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _digest(flat: dict) -> str:
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(config: dict, seed: int) -> tuple[str, str]:
    """(run_key, group_key) of a resolved config (without `hydra`) trained with `seed`."""
    flat = {k: v for k, v in flatten(config).items() if k not in NOT_IDENTITY and k != "seed"}
    return _digest({**flat, "seed": seed}), _digest(flat)


def config_columns(config: dict) -> dict[str, str]:
    """The run's settings as `cfg.*` summary columns (targets and the methods' interpolated copies left out)."""
    return {
        f"cfg.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
        for k, v in flatten(config).items()
        if not k.endswith("_target_") and not k.startswith("regularizer.methods.") and k not in NOT_IDENTITY
    }


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash at any moment leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are ordinary files
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def read_summary(path: Path) -> dict | None:
    """The row of a dropbench summary.csv, or None for anything else (foreign, empty, other format)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if len(rows) != 1 or rows[0].get("format") != str(FORMAT) or not rows[0].get("run_key"):
        return None
    return rows[0]


def find_finished(results_dir: str, run_key: str) -> Path | None:
    """A finished run (status ok or diverged: re-running would give the same) with this key, if any."""
    for path in Path(results_dir).rglob("summary.csv"):
        row = read_summary(path)
        if row and row["run_key"] == run_key and row["status"] in ("ok", "diverged"):
            return path.parent
    return None
