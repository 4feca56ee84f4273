"""Run results on disk: run identity, atomic CSV writes, summary rows and statuses.

A run directory holds `metrics.csv` (rewritten after every epoch) and, once the run has ended,
`summary.csv` (one row, with `status`). Both are written to a temporary file and renamed, so a
reader sees either the previous complete file or the new one; a directory without summary.csv is
an incomplete run. Runs are identified by `run_key`, a hash of the resolved config and seed, so a
re-run of the same job is recognised whatever directory it was written to.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

FORMAT = 2  # summary format; format 1 (dropbench 0.1) had no validation split and is still read
_UMASK = os.umask(0)
os.umask(_UMASK)
READABLE_FORMATS = ("1", str(FORMAT))
STATUSES = ("ok", "diverged", "failed", "interrupted")
SPLITS = ("train", "val", "test")
# metrics.csv: one row per epoch and split; loss is the NLL under the evaluation rule, ece the
# expected calibration error over 15 equal-width confidence bins (Guo et al. 2017)
METRICS_COLUMNS = ["epoch", "split", "loss", "accuracy", "entropy", "ece", "seconds"]
# summary.csv: the one place that names these columns (train.py writes them, report.py reads them)
SUMMARY_COLUMNS = [
    "format", "run_id", "run_key", "group_key", "status", "dataset", "model", "regularizer", "p", "seed",
    "epochs", "lr", "batch_size", "optimizer", "val_fraction", "epochs_completed", "diverged_epoch",
    # the last epoch's metrics
    "train_acc", "val_acc", "test_acc", "gap", "train_loss", "val_loss", "test_loss", "test_ece",
    # the epoch selected on validation accuracy (empty without a validation split) and the test
    # accuracy at that epoch; test data never take part in the selection
    "best_epoch", "best_val_acc", "test_acc_at_best",
    "train_seconds", "seconds_per_epoch", "wall_seconds", "parallel_seeds", "error", "started_at", "finished_at",
    "device", "dropbench_version", "threads", "resumed_from_epoch",
]
# Settings that change where or how fast a run goes, or what watches it, not what it computes:
# they are not part of a run's identity (run_key) nor of its summary's cfg.* columns. Tests check
# that changing them leaves the numbers as they are.
NOT_IDENTITY_GROUPS = ("logger.",)
NOT_IDENTITY = {"device", "cuda_graph", "threads", "progress", "results_dir", "force", "resume", "keep_checkpoint",
                "checkpoint_every", "parallel_seeds", "dataset.cache_dir", "dataset.root", "dataset.download",
                "dataset.device_budget_gb"}


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
    flat = {k: v for k, v in settings(config).items() if k != "seed"}
    return _digest({**flat, "seed": seed}), _digest(flat)


def settings(config: dict) -> dict[str, object]:
    """The flattened settings that can change a run's numbers (see NOT_IDENTITY)."""
    return {k: v for k, v in flatten(config).items() if k not in NOT_IDENTITY and not k.startswith(NOT_IDENTITY_GROUPS)}


def config_columns(config: dict) -> dict[str, str]:
    """The run's settings as `cfg.*` summary columns (targets and the methods' interpolated copies left out)."""
    return {
        f"cfg.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
        for k, v in settings(config).items()
        if not k.endswith("_target_") and not k.startswith("regularizer.methods.")
    }


class DiskFull(OSError):
    """A results file could not be written: the device holding it is full."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"no space left on the device while writing {path}", str(path))

    def __str__(self) -> str:
        return self.strerror


def _out_of_space(error: BaseException) -> bool:
    """Whether `error`, or an error it arose from, is ENOSPC (torch.save reports a failed write as a
    RuntimeError raised while handling the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def atomic_file(path: Path, mode: str = "w"):
    """Yield a file opened on a temporary name beside `path`; once the block ends without an
    error it is flushed to disk and renamed onto `path`. A crash at any moment leaves the old file
    or the new one, never half a file; the temporary name is unique (mkstemp), so processes
    writing into the same directory never share one. Leftovers of a killed process are hidden
    `.NAME.*.tmp` files that readers ignore. A full device raises DiskFull naming `path`."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are ordinary files
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if _out_of_space(error) and not isinstance(error, DiskFull):
            raise DiskFull(path) from error
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash at any moment leaves the old file or the new one."""
    with atomic_file(path) as f:
        f.write(text)


def csv_text(rows: list[dict], columns: list[str], header: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    write_atomic(path, csv_text(rows, columns))


def metrics_rows(text: str) -> list[dict]:
    """The rows of a metrics.csv text (csv_text of METRICS_COLUMNS) as they were recorded: epoch an
    int, split a string, every other column a float (written by repr, so read back exactly)."""
    return [{"epoch": int(row["epoch"]), "split": row["split"],
             **{k: float(row[k]) for k in METRICS_COLUMNS[2:]}} for row in csv.DictReader(io.StringIO(text))]


class NotASummary(Exception):
    """A file named summary.csv that is not a finished dropbench run; the message says why."""


def read_csv_rows(path: Path) -> list[dict] | None:
    """The rows of a CSV file written by `write_csv`, or None unless the file is complete."""
    try:
        return csv_rows(path)
    except NotASummary:
        return None


def csv_rows(path: Path) -> list[dict]:
    """The rows of a complete CSV file: it must end with a newline and every row must have exactly
    the header's number of fields (a file cut short anywhere fails one of the two)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise NotASummary(f"unreadable: {error}") from None
    if not rows:
        raise NotASummary("empty file")
    if not text.endswith("\n") or any(len(row) != len(rows[0]) for row in rows):
        raise NotASummary("rows of unequal length or no final newline (half-written?)")
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def check_summary(path: Path) -> dict:
    """The row of a dropbench summary.csv; raises NotASummary saying why for anything else
    (foreign, empty, half-written, another format, unknown status)."""
    rows = csv_rows(path)
    if rows and "format" not in rows[0]:
        raise NotASummary("not a dropbench summary (no 'format' column)")
    if len(rows) != 1:
        raise NotASummary(f"expected 1 data row, found {len(rows)}")
    row = rows[0]
    if row["format"].strip() not in READABLE_FORMATS:
        raise NotASummary(f"summary format {row['format']!r}; this version reads formats {', '.join(READABLE_FORMATS)}")
    if row.get("status") not in STATUSES:
        raise NotASummary(f"unknown status {row.get('status')!r}")
    for key in ("run_key", "group_key"):
        if not row.get(key):
            raise NotASummary(f"empty or missing {key}")
    return row


def read_summary(path: Path) -> dict | None:
    """The row of a dropbench summary.csv, or None for anything else (see check_summary)."""
    try:
        return check_summary(path)
    except NotASummary:
        return None


def files_named(root: str | Path, name: str):
    """Every file called `name` under `root`. Unlike Path.rglob, a directory that vanishes during
    the walk (another job tidying up) is skipped, not an error; hidden directories are not entered."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if name in filenames:
            yield Path(dirpath) / name


def copy_run(source: Path, target: Path) -> None:
    """Copy a finished run's metrics.csv and summary.csv (summary last) into `target`; the copy is
    the same run (same run_key), which the report counts once."""
    if Path(source).resolve() == Path(target).resolve():
        return
    for name in ("metrics.csv", "summary.csv"):
        if (Path(source) / name).is_file():
            write_atomic(Path(target) / name, (Path(source) / name).read_text(encoding="utf-8"))


def find_finished(results_dir: str, run_key: str) -> Path | None:
    """A finished run (status ok or diverged: re-running would give the same) with this key, if any."""
    for path in files_named(results_dir, "summary.csv"):
        row = read_summary(path)
        if row and row["run_key"] == run_key and row["status"] in ("ok", "diverged"):
            return path.parent
    return None


# -- checkpoints -------------------------------------------------------------------------------
# A run's directory holds, while it can still be continued, `checkpoint.pt` (the state at the end
# of the last epoch, torch) and `checkpoint.json` (its run keys and where its replicas write), so
# `resume=true` finds it without loading torch files.
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_INFO = "checkpoint.json"


def write_checkpoint_info(run_dir: Path, run_keys: list[str], replica_dirs: list[str], device_type: str) -> None:
    """checkpoint.json: what find_resumable matches (written once per run; checkpoint.pt's mtime dates it)."""
    info = {"format": FORMAT, "run_keys": list(run_keys), "replica_dirs": list(replica_dirs),
            "device_type": device_type}
    text = json.dumps(info, indent=1) + "\n"
    try:
        if (run_dir / CHECKPOINT_INFO).read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_atomic(run_dir / CHECKPOINT_INFO, text)


def read_checkpoint_info(run_dir: Path) -> dict[str, str]:
    """Where each replica of a checkpointed run writes: {run_key: folder relative to run_dir}."""
    info = json.loads((Path(run_dir) / CHECKPOINT_INFO).read_text(encoding="utf-8"))
    return dict(zip(info["run_keys"], info.get("replica_dirs") or ["."]))


def find_resumable(results_dir: str, run_keys: list[str], device_type: str) -> Path | None:
    """The most recently checkpointed run under `results_dir` with exactly these run keys that has
    not finished (some replica without an ok/diverged summary), or None."""
    found = []
    for info_path in files_named(results_dir, CHECKPOINT_INFO):
        run_dir = info_path.parent
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            mtime = (run_dir / CHECKPOINT).stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or sorted(info.get("run_keys") or []) != sorted(run_keys):
            continue
        if info.get("device_type") != device_type:
            continue
        summaries = [read_summary(run_dir / d / "summary.csv") for d in info.get("replica_dirs") or ["."]]
        if all(row and row["status"] in ("ok", "diverged") for row in summaries):
            continue
        found.append((mtime, str(run_dir)))
    return Path(max(found)[1]) if found else None


def remove_stale_temp(directory: Path) -> None:
    """Delete the temporary files a killed writer left in a run directory (call it only where no
    other process writes: a run's own directory, before the run starts writing again)."""
    for name in ("metrics.csv", "summary.csv", CHECKPOINT, CHECKPOINT_INFO):
        remove_quietly(*Path(directory).glob(f".{name}.*.tmp"))


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def remove_if_only_hydra(run_dir: Path, results_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote, and its empty parents
    up to `results_dir`."""
    if not run_dir.is_dir() or any(p.name != ".hydra" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent, stop = run_dir.parent, Path(results_dir).resolve()
    while (parent.resolve() != stop and parent.is_dir() and not any(parent.iterdir())
           and stop in parent.resolve().parents):
        try:
            parent.rmdir()
        except OSError:  # someone wrote into it meanwhile
            break
        parent = parent.parent


def seed_dir(run_dir: Path, seed: int, parallel_seeds: int) -> Path:
    """Where a seed of a run writes: `run_dir/seed_N/` when the job trains several seeds, else `run_dir`."""
    return run_dir / f"seed_{seed}" if parallel_seeds > 1 else run_dir


# -- a job's score for a searching sweeper ------------------------------------------------------
def job_score(config: dict, dirs: list[Path]) -> float:
    """The value a job returns to Hydra's sweeper: the mean over the job's seeds of `best_val_acc`,
    each seed's validation accuracy at its validation-selected epoch.

    NaN when a seed did not finish `ok` (failed, diverged) or the data have no validation split
    (`dataset.val_fraction=0`): test accuracy never scores a job, so a search never selects on it.

    Args:
        config: the job's resolved config (its seeds are `seed`, ..., `seed + parallel_seeds - 1`).
        dirs: where the job's summaries are (in `seed_N/` with several seeds): its run directory
            and, for seeds finished earlier and copied in, its Hydra output directory.
    """
    seeds = [config["seed"] + k for k in range(config["parallel_seeds"])]
    keys = {identity(config, s)[0]: s for s in seeds}
    rows = {}
    for folder in dict.fromkeys(dirs):
        for s in seeds:
            row = read_summary(seed_dir(folder, s, len(seeds)) / "summary.csv")
            # the run key tells this config's run from another one's that a reused folder may hold
            if row and keys.get(row["run_key"]) == s and (s not in rows or row["status"] == "ok"):
                rows[s] = row
    values = [rows[s]["best_val_acc"] if s in rows and rows[s]["status"] == "ok" else "" for s in seeds]
    if not all(values):
        return float("nan")
    return sum(float(v) for v in values) / len(values)


def searching(sweeper_target: str) -> bool:
    """Whether the sweeper (its `_target_`) optimizes the jobs' scores (Optuna, ...), not Hydra's grid."""
    return not str(sweeper_target).endswith(".BasicSweeper")


class NoScore(RuntimeError):
    """A job that a searching sweeper cannot score (a seed failed or diverged). The sweeper records
    a failed trial; its max_failure_rate decides whether the search goes on."""

    def __init__(self, run_dir):
        super().__init__(f"{run_dir}: not every seed finished ok, so the job has no validation score")
