"""Experiment trackers: live views of a run in TensorBoard, MLflow or Weights & Biases.

A run's CSVs (metrics.csv, summary.csv) are its record; a tracker only mirrors them, so it may
fail without harm. `Trackers` holds the trackers of one trained seed, chosen by the Hydra group
`logger` (conf/logger/, several at once with `logger=[tensorboard,mlflow]`). Any exception in a
tracker prints one warning line and drops that tracker; the run and its CSVs go on unchanged.
Each tracker's library is imported only when it is used (extra `dropbench[trackers]`).
Reference: docs/trackers.md.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from dropbench.config import one_line

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so parallel jobs must not create a new SQLite store at once
    fcntl = None

INSTALL = 'pip install "dropbench[trackers]"'
# param values are cut here, well below MLflow's own limit (6,000 characters now, less in old versions):
# a longer config value is a list that nobody reads whole in a table of runs
PARAM_LENGTH = 500
# a run's status in TensorBoard's HParams sessions (api_pb2.Status) and in MLflow; a diverged run ran to its end
_SESSION_STATUS = {"ok": "STATUS_SUCCESS", "diverged": "STATUS_SUCCESS", "failed": "STATUS_FAILURE",
                   "interrupted": "STATUS_FAILURE"}
_RUN_STATUS = {"ok": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class Trackers:
    """The experiment trackers of one trained seed (one tracker run per seed).

    Args:
        active: tracker name (its key in the `logger` config) -> open tracker.
    """

    def __init__(self, active: dict[str, object]):
        self.active = active

    @classmethod
    def open(cls, logger_cfg, *, run_name: str, group: str, config: dict, out_dir: Path) -> Trackers:
        """Start one run in each tracker of `logger_cfg`.

        Args:
            logger_cfg: the `logger` config node, {name: {_target_: class, **settings}}; None or empty: no tracker.
            run_name: the run's name in the trackers, e.g. "dropout_p0.5_seed1".
            group: the sweep or experiment the run belongs to (TensorBoard folder, MLflow experiment, W&B group).
            config: the flattened run config {"optimizer.lr": 0.01, ...}, logged as hyperparameters.
            out_dir: the run's directory, where trackers write whose config names no place.
        """
        active = {}
        for name in list(logger_cfg or ()):
            node = logger_cfg[name]
            if node is None:  # switched off with logger.NAME=null
                continue
            try:
                active[name] = _build(node, run_name=run_name, group=group, config=config, out_dir=Path(out_dir))
            except Exception as error:  # noqa: BLE001 - whatever a tracker raises, the run goes on
                _warn(name, error)
        return cls(active)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Record one epoch's metrics, keyed like "train/acc" or "val/loss", at step `epoch`."""
        metrics = {key: float(value) for key, value in metrics.items()}
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(epoch, metrics)
            except Exception as error:  # noqa: BLE001 - whatever a tracker raises, the run goes on
                _warn(name, error)
                del self.active[name]

    def finish(self, status: str) -> None:
        """Record how the run ended ("ok", "diverged", "failed" or "interrupted") and close every tracker."""
        for name, tracker in self.active.items():
            try:
                tracker.finish(status)
            except Exception as error:  # noqa: BLE001 - whatever a tracker raises, the run goes on
                _warn(name, error)
        self.active = {}


def _build(node, **run):
    settings = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    module, _, name = settings.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(module), name)(**run, **settings)


def _warn(name: str, error: Exception) -> None:
    if isinstance(error, ModuleNotFoundError):  # the tracker's library, or a package it needs
        print(f"dropbench: warning: tracker {name} needs a package that is not installed ({one_line(error)}); "
              f"install it with {INSTALL}; the run continues without it", file=sys.stderr)
    else:
        print(f"dropbench: warning: tracker {name} failed ({type(error).__name__}: {one_line(error)}); "
              f"the run continues without it", file=sys.stderr)


def _plain(value):
    """A hyperparameter value as a number, bool or string (lists and None as JSON)."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)


class TensorBoard:
    """TensorBoard event files (`torch.utils.tensorboard`): each metric as a scalar per epoch, and at
    the end the config and status for the HParams dashboard.

    Args:
        dir: where event folders go (default: `<run dir>/tensorboard`); a run writes to `<dir>/<group>/<run_name>`.
    """

    def __init__(self, *, run_name: str, group: str, config: dict, out_dir: Path, dir: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(dir or out_dir / "tensorboard") / group / run_name
        self.config = config
        self.tags: dict[str, None] = {}  # the scalars logged, in order: the HParams dashboard's metric columns
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, epoch)
        self.tags.update(dict.fromkeys(metrics))
        self.writer.flush()  # a running TensorBoard shows each epoch as it ends, not every 2 minutes

    def finish(self, status: str) -> None:
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams

        values = {key: _plain(value) for key, value in self.config.items()} | {"status": status}
        # metric values are not written here: the dashboard reads the last value of each logged scalar
        experiment, start, end = hparams(values, dict.fromkeys(self.tags, 0.0))
        # torch marks every session a success; set the run's own status
        data = end.value[0].metadata.plugin_data
        content = plugin_data_pb2.HParamsPluginData.FromString(data.content)
        content.session_end_info.status = api_pb2.Status.Value(_SESSION_STATUS[status])
        data.content = content.SerializeToString()
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()


class MLflow:
    """MLflow runs through `MlflowClient` (no global active run, so that several seeds can be open at
    once): experiment = group, params = config, metrics per epoch with the epoch as step, tag `status`.

    Args:
        tracking_uri: the store, e.g. "sqlite:///results/mlflow.db" or a server "http://host:5000";
            None: MLflow's default (the environment variable MLFLOW_TRACKING_URI).
    """

    def __init__(self, *, run_name: str, group: str, config: dict, out_dir: Path, tracking_uri: str | None = None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        with _one_opener(tracking_uri):
            self.client = MlflowClient(tracking_uri)
            experiment = _experiment_id(self.client, group)
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        params = [Param(key, _short(str(_plain(value)))) for key, value in config.items()]
        for start in range(0, len(params), 100):  # the most params one log_batch takes
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, epoch) for key, value in metrics.items()])

    def finish(self, status: str) -> None:
        self.client.set_tag(self.run_id, "status", status)
        self.client.set_terminated(self.run_id, _RUN_STATUS[status])


@contextmanager
def _one_opener(tracking_uri: str | None):
    """For a SQLite store, one process at a time: parallel jobs that find the database missing would
    each create its tables, and all but one fail."""
    prefix = "sqlite:///"
    if fcntl is None or not str(tracking_uri).startswith(prefix):
        yield
        return
    database = Path(tracking_uri[len(prefix):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # a parallel job of the same sweep created it first (on a server: no lock)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _short(text: str) -> str:
    return text if len(text) <= PARAM_LENGTH else text[:PARAM_LENGTH - 3] + "..."


class WandB:
    """A Weights & Biases run per seed: config, metrics per epoch (step = epoch), summary `status`.

    Args:
        project: W&B project.
        entity: W&B user or team (None: the account's default).
        mode: "offline" (no network; upload later with `wandb sync`), "online" or "disabled".
        dir: where W&B writes (default: the run directory); runs go to `<dir>/wandb/`.
    """

    def __init__(self, *, run_name: str, group: str, config: dict, out_dir: Path, project: str = "dropbench",
                 entity: str | None = None, mode: str = "offline", dir: str | None = None):
        import wandb

        directory = Path(dir or out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        # create_new: each seed of a vectorized job is its own run, open at the same time as the others;
        # console off: the seeds share one terminal, whose lines are dropbench's own
        self.run = wandb.init(project=project, entity=entity, group=group, name=run_name, config=config, mode=mode,
                              dir=str(directory), reinit="create_new",
                              settings=wandb.Settings(quiet=True, console="off"))

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=epoch)

    def finish(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status in ("ok", "diverged") else 1)
