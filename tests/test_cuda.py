"""The CUDA path: every regularizer trains on the GPU, the same seed twice gives the same numbers
there, and seeds trained together agree with single runs. Skipped where PyTorch sees no GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import read_csv

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
