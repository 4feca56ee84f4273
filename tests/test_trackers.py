"""Experiment trackers: what each writes is read back with the library's own reader; a failing
tracker warns once and drops out while the others go on; the logger configs compose."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dropbench.trackers import PARAM_LENGTH, Trackers

CONFIG = {"optimizer.lr": 0.01, "regularizer.p": [0.5, 0.3], "dataset.root": None, "model.name": "mlp",
          "long": "x" * 1000}
EPOCHS = {1: {"train/acc": 0.5, "val/loss": 1.5}, 2: {"train/acc": 0.75, "val/loss": 1.25},
          3: {"train/acc": 0.875, "val/loss": 1.0}}


def node(name: str, **settings) -> dict:
    return {"_target_": f"dropbench.trackers.{name}", **settings}


def run_through(trackers: Trackers, status: str) -> None:
    for epoch, metrics in EPOCHS.items():
        trackers.log_epoch(epoch, metrics)
    trackers.finish(status)


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dropbench: warning")]


class Recorder:
    def __init__(self, fail_in: str = ""):
        self.fail_in, self.logged, self.status = fail_in, [], None

    def log(self, epoch, metrics):
        if self.fail_in == "log":
            raise RuntimeError("disk full")
        self.logged.append((epoch, metrics))

    def finish(self, status):
        if self.fail_in == "finish":
            raise RuntimeError("server gone")
        self.status = status


def test_no_logger_config_means_no_trackers(tmp_path, capsys):
    for cfg in (None, {}):
        trackers = Trackers.open(cfg, run_name="r", group="g", config=CONFIG, out_dir=tmp_path)
        run_through(trackers, "ok")
        assert trackers.active == {}
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("fail_in", ["log", "finish"])
def test_a_failing_tracker_warns_once_and_the_others_go_on(fail_in, capsys):
    good, bad = Recorder(), Recorder(fail_in)
    trackers = Trackers({"good": good, "bad": bad})
    run_through(trackers, "ok")
    assert good.logged == list(EPOCHS.items()) and good.status == "ok"
    error = "disk full" if fail_in == "log" else "server gone"
    assert warnings_in(capsys.readouterr().err) == [
        f"dropbench: warning: tracker bad failed (RuntimeError: {error}); the run continues without it"]
    assert bad.logged == ([] if fail_in == "log" else list(EPOCHS.items())) and bad.status is None


def test_a_tracker_that_cannot_open_is_left_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    cfg = {"wandb": node("WandB"), "typo": node("TensorBoard", logdir="x"), "missing": node("NoSuchTracker"),
           "off": None}
    trackers = Trackers.open(cfg, run_name="r", group="g", config=CONFIG, out_dir=tmp_path)
    assert trackers.active == {}
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 3
    assert lines[0].startswith("dropbench: warning: tracker wandb needs a package that is not installed (")
    assert lines[0].endswith('install it with pip install "dropbench[trackers]"; the run continues without it')
    assert lines[1].startswith("dropbench: warning: tracker typo failed (TypeError: ") and "logdir" in lines[1]
    assert lines[2] == ("dropbench: warning: tracker missing failed (AttributeError: module 'dropbench.trackers' "
                        "has no attribute 'NoSuchTracker'); the run continues without it")


def read_tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
               for tag, content in events.PluginTagToContent("hparams").items()}
    return scalars, hparams


@pytest.mark.parametrize("status", ["ok", "failed"])
def test_tensorboard_writes_scalars_per_epoch_hparams_and_status(status, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import api_pb2

    trackers = Trackers.open({"tensorboard": node("TensorBoard")}, run_name="dropout_seed1", group="sweep",
                             config=CONFIG, out_dir=tmp_path)
    run_through(trackers, status)
    scalars, hparams = read_tensorboard(tmp_path / "tensorboard" / "sweep" / "dropout_seed1")
    assert scalars["train/acc"] == [(1, 0.5), (2, 0.75), (3, 0.875)]
    assert scalars["val/loss"] == [(1, 1.5), (2, 1.25), (3, 1.0)]
    values = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert values["optimizer.lr"].number_value == pytest.approx(0.01)
    assert values["regularizer.p"].string_value == "[0.5, 0.3]" and values["dataset.root"].string_value == "null"
    assert values["status"].string_value == status
    metrics = [m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos]
    assert metrics == ["train/acc", "val/loss"]
    end = hparams["_hparams_/session_end_info"].session_end_info.status
    assert end == api_pb2.Status.Value("STATUS_SUCCESS" if status == "ok" else "STATUS_FAILURE")
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A new MLflow SQLite store (creating its tables takes seconds), copied by each test that needs one."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def store_at(path: Path, empty_store: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, path)
    return f"sqlite:///{path}"


def read_mlflow(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, runs


def test_mlflow_records_params_metrics_per_epoch_and_status(tmp_path, empty_store, capsys):
    uri = store_at(tmp_path / "mlflow.db", empty_store)
    trackers = Trackers.open({"mlflow": node("MLflow", tracking_uri=uri)}, run_name="dropout_seed1", group="sweep",
                             config=CONFIG, out_dir=tmp_path / "run")
    run_through(trackers, "diverged")
    client, runs = read_mlflow(uri, "sweep")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "dropout_seed1" and run.info.status == "FINISHED"
    assert run.data.tags["status"] == "diverged"
    params = run.data.params
    assert params["optimizer.lr"] == "0.01" and params["regularizer.p"] == "[0.5, 0.3]"
    assert len(params["long"]) == PARAM_LENGTH and params["long"].endswith("...")
    history = client.get_metric_history(run.info.run_id, "train/acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75), (3, 0.875)]
    assert warnings_in(capsys.readouterr().err) == []


OPEN_IN_A_JOB = """
import sys
from pathlib import Path
from dropbench.trackers import Trackers
trackers = Trackers.open({"mlflow": {"_target_": "dropbench.trackers.MLflow", "tracking_uri": sys.argv[1]}},
                         run_name=sys.argv[2], group="sweep", config={}, out_dir=Path(sys.argv[3]))
trackers.log_epoch(1, {"train/acc": 0.5})
trackers.finish("ok")
"""


@pytest.mark.slow
def test_mlflow_parallel_jobs_create_one_new_store_together(tmp_path):
    """Jobs of a sweep that start at once must not each create the SQLite store's tables."""
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"  # in a directory that does not exist yet
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-c", OPEN_IN_A_JOB, uri, f"job{k}", str(tmp_path / f"job{k}")],
                             stderr=subprocess.PIPE, text=True, env=env) for k in range(3)]
    errors = [job.communicate(timeout=120)[1] for job in jobs]
    assert [warnings_in(err) for err in errors] == [[], [], []], errors
    _, runs = read_mlflow(uri, "sweep")
    assert sorted(run.info.run_name for run in runs) == ["job0", "job1", "job2"]
    assert {run.data.tags["status"] for run in runs} == {"ok"}


def test_wandb_offline_writes_one_run_per_seed(tmp_path, capsys):
    wandb = pytest.importorskip("wandb")
    seeds = [Trackers.open({"wandb": node("WandB")}, run_name=f"dropout_seed{s}", group="sweep", config=CONFIG,
                           out_dir=tmp_path) for s in (0, 1)]  # open at the same time, as in a vectorized job
    for trackers in seeds:
        assert list(trackers.active) == ["wandb"]
        run_through(trackers, "ok")
    wandb.teardown()  # W&B's service process ends writing after finish() returns; at exit, and here, it is awaited
    records = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 2
    for record in records:  # W&B's binary log keeps names as plain bytes
        data = record.read_bytes()
        assert all(text in data for text in (b"train/acc", b"val/loss", b"optimizer.lr", b"status", b"sweep"))
    assert warnings_in(capsys.readouterr().err) == []


def test_several_trackers_and_one_breaking_midway(tmp_path, empty_store, capsys):
    pytest.importorskip("tensorboard")
    uri = store_at(tmp_path / "mlflow.db", empty_store)
    trackers = Trackers.open({"tensorboard": node("TensorBoard"), "mlflow": node("MLflow", tracking_uri=uri)},
                             run_name="r", group="g", config=CONFIG, out_dir=tmp_path)
    trackers.log_epoch(1, EPOCHS[1])

    def store_gone(*args, **kwargs):
        raise OSError("store gone")

    trackers.active["mlflow"].client.log_batch = store_gone
    trackers.log_epoch(2, EPOCHS[2])
    trackers.log_epoch(3, EPOCHS[3])
    trackers.finish("ok")
    assert warnings_in(capsys.readouterr().err) == [
        "dropbench: warning: tracker mlflow failed (OSError: store gone); the run continues without it"]
    scalars, hparams = read_tensorboard(tmp_path / "tensorboard" / "g" / "r")
    assert [step for step, _ in scalars["train/acc"]] == [1, 2, 3]
    assert hparams["_hparams_/session_start_info"].session_start_info.hparams["status"].string_value == "ok"
    client, [run] = read_mlflow(uri, "g")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/acc")] == [1]


@pytest.fixture
def conf_dir(tmp_path) -> Path:
    """A copy of dropbench's config tree whose defaults list has the `logger` group."""
    copy = tmp_path / "conf"
    shutil.copytree(Path(importlib.import_module("dropbench.conf").__file__).parent, copy)
    config = copy / "config.yaml"
    text = config.read_text()
    if "- logger: null" not in text:
        text = text.replace("  - _self_\n", "  - logger: null\n  - _self_\n", 1)
        assert "- logger: null" in text
        config.write_text(text)
    return copy


def test_logger_configs_compose_and_open(conf_dir, tmp_path, empty_store, capsys):
    pytest.importorskip("tensorboard")
    results = tmp_path / "results"
    store_at(results / "mlflow.db", empty_store)
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        assert compose("config").get("logger") is None
        wandb = compose("config", overrides=["logger=wandb"]).logger
        cfg = compose("config", overrides=["logger=[tensorboard,mlflow]", f"results_dir={results}"])
    assert list(wandb) == ["wandb"] and wandb.wandb.mode == "offline"
    assert list(cfg.logger) == ["tensorboard", "mlflow"]
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{results}/mlflow.db"
    run_dir = results / "runs" / "1"
    run_through(Trackers.open(cfg.logger, run_name="r", group="g", config=CONFIG, out_dir=run_dir), "ok")
    scalars, _ = read_tensorboard(run_dir / "tensorboard" / "g" / "r")
    assert len(scalars["val/loss"]) == 3
    _, [run] = read_mlflow(cfg.logger.mlflow.tracking_uri, "g")
    assert run.data.tags["status"] == "ok"
    assert warnings_in(capsys.readouterr().err) == []
