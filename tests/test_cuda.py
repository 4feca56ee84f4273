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
