"""The CUDA path: every regularizer trains on the GPU, the same seed twice gives the same numbers
there, seeds trained together agree with single runs, and the step replayed from a CUDA graph
(cuda_graph=true) gives the numbers of the step run eagerly. Skipped where PyTorch sees no GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import read_csv, stopped_in_epoch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = ["none", "dropout", "dropout_scaled", "rdrop", "multisample", "dropconnect", "gaussian", "standout",
           "l1", "l2", "maxnorm", "batchnorm", "mc_dropout"]


def train(tmp_path, name: str, *overrides: str) -> list[dict]:
    from hydra import compose, initialize_config_module

    from dropbench.runs import train_job

    with initialize_config_module("dropbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "device=cuda", "progress=false",
                                           f"results_dir={tmp_path}", *overrides])
    result = train_job(cfg, tmp_path / name, multirun=False)
    assert result.status == "ok", (name, overrides)
    return [read_csv(path) for path in sorted((tmp_path / name).rglob("metrics.csv"))]


@pytest.mark.parametrize("method", METHODS)
def test_every_regularizer_trains_on_cuda_and_repeats_exactly(tmp_path, method):
    first = train(tmp_path, "a", f"regularizer={method}")
    again = train(tmp_path, "b", f"regularizer={method}")
    assert [[{k: v for k, v in row.items() if k != "seconds"} for row in rows] for rows in first] == \
           [[{k: v for k, v in row.items() if k != "seconds"} for row in rows] for rows in again]


@pytest.mark.parametrize("method", ["dropout", "batchnorm"])
def test_seeds_together_agree_with_single_runs_on_cuda(tmp_path, method):
    together = train(tmp_path, "together", f"regularizer={method}", "parallel_seeds=3")
    for seed in range(3):
        (alone,) = train(tmp_path, f"alone{seed}", f"regularizer={method}", f"seed={seed}")
        losses = [float(r["loss"]) for r in together[seed]]
        assert losses == pytest.approx([float(r["loss"]) for r in alone], rel=1e-3)


@pytest.mark.parametrize("method, values", [("dropout", "p=0.1 p=0.5"), ("l2", "lam=1e-3 lam=1e-2"),
                                            ("rdrop", "alpha=0.5 alpha=2.0")])
def test_a_folded_sweep_equals_the_unfolded_one_on_cuda(tmp_path, method, values):
    """Two settings x two seeds as one run of 4 replicas on the GPU: each replica's curve agrees with
    its single run's to 1e-3, and the same folded run twice gives identical numbers."""
    from hydra import compose, initialize_config_module

    from dropbench.runs import train_jobs

    settings = [f"regularizer.{v}" for v in values.split()]

    def folded(name):
        with initialize_config_module("dropbench.conf", version_base="1.3"):
            cfgs = [(compose("config", overrides=["experiment=smoke", "device=cuda", "progress=false",
                                                  f"results_dir={tmp_path}", "force=true", f"regularizer={method}",
                                                  setting, f"seed={seed}"]), tmp_path / name / f"{k}-{seed}")
                    for k, setting in enumerate(settings) for seed in (0, 1)]
        assert [r.status for r in train_jobs(cfgs, multirun=True)] == ["ok"] * 4
        return {folder.name: read_csv(folder / "metrics.csv") for _, folder in cfgs}

    first, again = folded("a"), folded("b")
    strip = lambda runs: {k: [{c: v for c, v in r.items() if c != "seconds"} for r in rows]  # noqa: E731
                          for k, rows in runs.items()}
    assert strip(first) == strip(again)
    for k, setting in enumerate(settings):
        for seed in (0, 1):
            (alone,) = train(tmp_path, f"alone{k}{seed}", f"regularizer={method}", setting, f"seed={seed}")
            losses = [float(r["loss"]) for r in first[f"{k}-{seed}"]]
            assert losses == pytest.approx([float(r["loss"]) for r in alone], rel=1e-3)


def without_seconds(runs: list[list[dict]]) -> list[list[dict]]:
    return [[{k: v for k, v in row.items() if k != "seconds"} for row in rows] for rows in runs]


@pytest.fixture
def recorded(monkeypatch) -> list[tuple[int, ...]]:
    """The batch shapes whose step was recorded as a CUDA graph, in order."""
    from dropbench.cuda_graph import CapturedStep

    shapes, record = [], CapturedStep._record
    monkeypatch.setattr(CapturedStep, "_record", lambda self, idx: (shapes.append(tuple(idx.shape)),
                                                                    record(self, idx))[1])
    return shapes


# 5 epochs: the last batch of an epoch is smaller, and its step is recorded in epoch 4 (after 3 eager
# steps of that shape) and replayed in epoch 5
GRAPH_CASES = [(f"regularizer={m}",) for m in METHODS] + [
    ("regularizer=dropout", "optimizer=sgd", "schedule=step", "schedule.step_size=1", "schedule.gamma=0.5"),
    ("regularizer=dropout", "optimizer=adamw", "schedule=cosine"),
    ("regularizer=dropout", "parallel_seeds=3"),
]


@pytest.mark.parametrize("overrides", GRAPH_CASES, ids=[" ".join(c) for c in GRAPH_CASES])
def test_the_step_replayed_from_a_cuda_graph_gives_the_eager_numbers(tmp_path, recorded, overrides):
    """Replays draw fresh masks (the eager run draws new ones every step: any repeat would part the
    curves), read the learning rate the schedule sets, and end every epoch with the eager numbers."""
    eager = train(tmp_path, "eager", "epochs=5", *overrides)
    assert recorded == []
    graphed = train(tmp_path, "graphed", "epochs=5", "cuda_graph=true", *overrides)
    seeds = 3 if "parallel_seeds=3" in overrides else 1
    assert len(recorded) == 2 and recorded[0][0] == seeds and recorded[0][1] > recorded[1][1]  # full, then last
    assert without_seconds(graphed) == without_seconds(eager)


def test_a_folded_lr_sweep_replayed_from_a_cuda_graph_gives_the_eager_numbers(tmp_path, recorded):
    """Two learning rates x two seeds folded into one run: per-replica learning rates go through the
    recorded step as they go through the eager one."""
    from hydra import compose, initialize_config_module

    from dropbench.runs import train_jobs

    def folded(name, *extra):
        with initialize_config_module("dropbench.conf", version_base="1.3"):
            cfgs = [(compose("config", overrides=["experiment=smoke", "epochs=5", "device=cuda", "progress=false",
                                                  f"results_dir={tmp_path}", "force=true", "regularizer=dropout",
                                                  f"optimizer.lr={lr}", f"seed={seed}", *extra]),
                     tmp_path / name / f"{lr}-{seed}")
                    for lr in (0.001, 0.01) for seed in (0, 1)]
        assert [r.status for r in train_jobs(cfgs, multirun=True)] == ["ok"] * 4
        return {folder.name: read_csv(folder / "metrics.csv") for _, folder in cfgs}

    eager, graphed = folded("eager"), folded("graphed", "cuda_graph=true")
    assert len(recorded) == 2 and recorded[0][0] == 4
    assert without_seconds(list(graphed.values())) == without_seconds(list(eager.values()))


def test_a_cuda_graph_run_stopped_and_resumed_gives_the_numbers_of_one_never_stopped(tmp_path, monkeypatch):
    """Stopped in epoch 3 (before its checkpoint) and resumed after epoch 2, once with cuda_graph=true
    and once without it: both end with the numbers of the run never stopped (the generators' streams
    were saved where the replays had moved them)."""
    from hydra import compose, initialize_config_module

    from dropbench.results import read_summary
    from dropbench.runs import train_job

    def config(results: str, *extra):
        with initialize_config_module("dropbench.conf", version_base="1.3"):
            return compose("config", overrides=["experiment=smoke", "epochs=6", "device=cuda", "progress=false",
                                                "regularizer=dropout", "schedule=step", "schedule.step_size=2",
                                                "keep_checkpoint=true", f"results_dir={tmp_path / results}",
                                                *extra])

    whole = train_job(config("whole", "cuda_graph=true"), tmp_path / "whole", multirun=False)
    for results, resumed_with in (("a", "cuda_graph=true"), ("b", "cuda_graph=false")):
        with stopped_in_epoch(monkeypatch, 3):
            train_job(config(results, "cuda_graph=true"), tmp_path / results / "first", multirun=False)
        resumed = train_job(config(results, "resume=true", resumed_with), tmp_path / results / "again",
                            multirun=False)
        assert resumed.status == "ok" and read_summary(resumed.run_dir / "summary.csv")["resumed_from_epoch"] == "2"
        assert without_seconds([read_csv(resumed.run_dir / "metrics.csv")]) == \
            without_seconds([read_csv(whole.run_dir / "metrics.csv")])


class ReadsBack(torch.nn.Module):
    """A model whose forward pass reads a value back to Python, which a CUDA graph cannot record."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_shape[-1], 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.body(x)
        if h.sum().item() < 0:  # never true after a ReLU: only the read matters
            h = -h
        return self.head(h)


def test_a_step_that_reads_back_to_python_fails_the_run_with_the_reason(tmp_path):
    from hydra import compose, initialize_config_module

    from dropbench.results import read_summary
    from dropbench.runs import train_job

    with initialize_config_module("dropbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "device=cuda", "progress=false", "cuda_graph=true",
                                           "model=custom", "model.module._target_=test_cuda.ReadsBack",
                                           f"results_dir={tmp_path}"])
    result = train_job(cfg, tmp_path / "run", multirun=False)
    error = read_summary(result.run_dir / "summary.csv")["error"]
    assert result.status == "failed" and "the training step could not be recorded as a CUDA graph" in error, error
    assert "train with cuda_graph=false" in error
