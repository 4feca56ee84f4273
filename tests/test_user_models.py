"""A user's own model and data, as a user runs them: a package written in a temporary directory
(plain nn.Modules, an .npz and a .csv dataset) trained through the CLI with every regularizer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import read_csv

ALL = "none,dropout,dropout_scaled,rdrop,multisample,dropconnect,gaussian,standout,l1,l2,maxnorm,batchnorm,mc_dropout"

USER_PACKAGE = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A plain classifier without dropout layers: methods go after its activation modules."""

    def __init__(self, in_shape, num_classes, width=32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_shape[-1], width), nn.ReLU(), nn.Linear(width, width),
                                  nn.Tanh())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


class NetWithDropout(nn.Module):
    """The user's own dropout layers mark where dropout goes."""

    def __init__(self, num_classes, features=10):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(features, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.layers(x)


def no_hidden(in_shape, num_classes):
    """A function returning a module: logistic regression, no hidden layer at all."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[-1], num_classes))


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "models.py").write_text(textwrap.dedent(USER_PACKAGE))
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, (3, 10))
    y = rng.integers(0, 3, 600)
    x = (centers[y] + rng.normal(0, 1, (600, 10))).astype(np.float32)
    np.savez(root / "blobs.npz", x=x, y=y)
    names = np.array(["cat", "dog", "owl"])
    lines = ["a,b,c,d,e,f,g,h,i,j,animal"]
    lines += [",".join(f"{v:.4f}" for v in row) + f",{names[c]}" for row, c in zip(x, y)]
    (root / "blobs.csv").write_text("\n".join(lines) + "\n")
    return root


def run(user: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(user), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dropbench.cli", "train", "threads=1", "progress=false", *args],
                          capture_output=True, text=True, cwd=user, env=env, timeout=600)


def finished(root: Path) -> dict[str, dict]:
    return {row["regularizer"]: row for path in root.rglob("summary.csv") for row in read_csv(path)}


@pytest.mark.slow
@pytest.mark.parametrize("model, data", [
    ("mypkg.models.Net", ["dataset=npz", "dataset.path=blobs.npz"]),
    ("mypkg.models.NetWithDropout", ["dataset=csv", "dataset.path=blobs.csv", "dataset.label=animal"]),
])
def test_every_regularizer_trains_a_users_model_above_chance(user, model, data):
    out = user / model.rsplit(".", 1)[-1]
    proc = run(user, "-m", f"regularizer={ALL}", "model=custom", f"model.module._target_={model}", *data,
               "epochs=4", "batch_size=32", "optimizer.lr=0.01", f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = finished(out)
    assert set(rows) == set(ALL.split(","))
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["error"])
        assert row["model"] == model.rsplit(".", 1)[-1] and float(row["val_fraction"]) == 0.1
        assert float(row["test_acc"]) > 0.6, (name, row["test_acc"])  # chance is 1/3


def test_model_arguments_and_seeds_in_one_process(user):
    proc = run(user, "model=custom", "model.module._target_=mypkg.models.Net", "model.module.width=8",
               "dataset=npz", "dataset.path=blobs.npz", "regularizer=dropout", "epochs=2", "parallel_seeds=2",
               "hydra.run.dir=width8")
    assert proc.returncode == 0, proc.stderr
    rows = [read_csv(user / "width8" / f"seed_{s}" / "summary.csv")[0] for s in (0, 1)]
    assert [r["cfg.model.module.width"] for r in rows] == ["8", "8"] and rows[0]["test_acc"] != rows[1]["test_acc"]


@pytest.mark.parametrize("regularizer, model, message", [
    ("dropconnect", "mypkg.models.no_hidden", "regularizer dropconnect has no place to act in model no_hidden"),
    ("standout", "mypkg.models.no_hidden", "regularizer standout has no place to act in model no_hidden"),
    ("dropout", "mypkg.models.FunctionalRelu", "regularizer dropout has no place to act in model FunctionalRelu"),
    ("maxnorm", "mypkg.models.no_hidden", "regularizer maxnorm has no place to act"),
])
def test_a_method_without_a_place_is_one_line_and_writes_nothing(user, regularizer, model, message):
    proc = run(user, "model=custom", f"model.module._target_={model}", "dataset=npz", "dataset.path=blobs.npz",
               f"regularizer={regularizer}", "epochs=1", "results_dir=rejected")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (user / "rejected").exists() or not any((user / "rejected").rglob("*.csv"))


def test_torchvision_resnet18_trains_on_tiny_images(user):
    rng = np.random.default_rng(1)
    np.savez(user / "tiny_images.npz", x=rng.random((48, 3, 32, 32), dtype=np.float32), y=np.arange(48) % 10)
    proc = run(user, "model=torchvision", "model.name=resnet18", "dataset=npz", "dataset.path=tiny_images.npz",
               "dataset.standardize=false", "epochs=1", "batch_size=16", "hydra.run.dir=resnet18")
    assert proc.returncode == 0, proc.stderr
    (row,) = read_csv(user / "resnet18" / "summary.csv")
    assert row["status"] == "ok" and row["model"] == "resnet18" and float(row["train_loss"]) > 0
