"""The training module's own rules: which device a job gets, when a run has diverged, and the
evaluation metrics (ECE against a direct computation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from dropbench.config import UserError
from dropbench.train import DIVERGED_LOSS_FACTOR, build_run, diverged, evaluate, resolve_device, train_epoch


def test_jobs_of_a_sweep_spread_over_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [str(resolve_device("auto", n)) for n in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3",
                                                                  "cuda:0", "cuda:1"]
    assert str(resolve_device("cuda", 6)) == "cuda:2" and str(resolve_device("cuda:3", 6)) == "cuda:3"
    with pytest.raises(UserError, match="has 4 GPU"):
        resolve_device("cuda:4")


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(UserError, match="device=cuda is not available"):
        resolve_device("cuda")


def test_divergence_is_a_loss_that_is_not_finite_or_far_above_chance():
    limit = DIVERGED_LOSS_FACTOR * math.log(10)
    loss = torch.tensor([2.3, float("nan"), float("inf"), limit * 0.99, limit * 1.01, 4.6e16])
    assert diverged(loss, 10) == [False, True, True, False, True, True]


@pytest.fixture(scope="module")
def run():
    with initialize_config_module("dropbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["dataset.num_samples=300", "model.hidden=[16]", "regularizer=dropout"])
    torch.set_num_threads(1)
    run = build_run(cfg, torch.device("cpu"), [0, 1])
    train_epoch(run, 32)
    return run


def test_evaluation_metrics_match_a_direct_computation(run):
    metrics = evaluate(run, "test", batch_size=50)  # several chunks
    run.model.eval()
    x, y = run.data.x_test, run.data.y_test
    with torch.no_grad():
        probs = torch.softmax(run.model.shared(x), -1).double().numpy()
    labels = y.numpy()
    for r in range(2):
        p = probs[r]
        confidence, hit = p.max(1), p.argmax(1) == labels
        bins = np.minimum((confidence * 15).astype(int), 14)
        ece = sum(abs(confidence[bins == b].sum() - hit[bins == b].sum()) for b in range(15)) / len(labels)
        assert metrics["ece"][r] == pytest.approx(ece, abs=1e-6)
        assert metrics["accuracy"][r] == pytest.approx(hit.mean())
        assert metrics["loss"][r] == pytest.approx(-np.log(p[np.arange(len(labels)), labels]).mean(), rel=1e-5)


def test_eval_every_records_the_evaluated_epochs_and_the_last(tmp_path):
    from dropbench.results import read_csv_rows, read_summary
    from dropbench.runs import train_job

    with initialize_config_module("dropbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "epochs=5", "eval_every=2", "progress=false",
                                           "threads=1", f"results_dir={tmp_path}"])
    assert train_job(cfg, tmp_path / "run", multirun=False).status == "ok"
    rows = read_csv_rows(tmp_path / "run" / "metrics.csv")
    assert [(r["epoch"], r["split"]) for r in rows] == [(e, s) for e in "245" for s in ("train", "val", "test")]
    summary = read_summary(tmp_path / "run" / "summary.csv")
    assert summary["epochs_completed"] == "5" and summary["best_epoch"] in ("2", "4", "5")
    assert float(summary["seconds_per_epoch"]) > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_the_shipped_optimizers_run_fused_unless_the_config_picks_an_implementation(optimizer):
    """Unset, optimizer.fused is true: one kernel updates every parameter, with the numbers of the
    per-parameter loop up to rounding. fused=false or foreach=true keep the config's choice."""
    overrides = ["dataset.num_samples=300", "model.hidden=[16]", "regularizer=dropout", f"optimizer={optimizer}"]
    with initialize_config_module("dropbench.conf", version_base="1.3"):
        cfgs = {choice: compose("config", overrides=[*overrides, *choice]) for choice in
                [(), ("+optimizer.fused=false",), ("+optimizer.foreach=true",),
                 ("+optimizer.fused=true", "+optimizer.foreach=true")]}
    losses = {}
    for choice, fused, foreach in [((), True, None), (("+optimizer.fused=false",), False, None),
                                   (("+optimizer.foreach=true",), None, True)]:
        run = build_run(cfgs[choice], torch.device("cpu"), [0, 1])
        assert (run.optimizer.defaults["fused"], run.optimizer.defaults["foreach"]) == (fused, foreach)
        losses[choice] = torch.stack([train_epoch(run, 32) for _ in range(3)])
    torch.testing.assert_close(losses[()], losses[("+optimizer.fused=false",)], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[()], losses[("+optimizer.foreach=true",)], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="cannot build optimizer .*fused.* and .*foreach.* cannot be"):
        build_run(cfgs[("+optimizer.fused=true", "+optimizer.foreach=true")], torch.device("cpu"), [0])

