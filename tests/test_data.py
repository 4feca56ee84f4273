"""Dataset loaders: MNIST-1D generation + cache, and torchvision's classes over tiny files written
in the real on-disk formats (IDX for MNIST/FashionMNIST, pickled batches for CIFAR-10)."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
import torchvision

from dropbench.config import UserError
from dropbench.data import load_mnist1d, load_torchvision, write_idx

CPU = torch.device("cpu")


def test_mnist1d_is_generated_once_then_cached(tmp_path):
    a = load_mnist1d(CPU, cache_dir=str(tmp_path), num_samples=500)
    (cache,) = tmp_path.glob("mnist1d_*.npz")
    stamp = cache.stat().st_mtime_ns
    b = load_mnist1d(CPU, cache_dir=str(tmp_path), num_samples=500)
    assert cache.stat().st_mtime_ns == stamp  # read, not regenerated
    assert a.x_train.shape == (400, 1, 40) and a.x_test.shape == (100, 1, 40)
    assert a.y_train.dtype == torch.int64 and set(a.y_train.tolist()) <= set(range(10))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_mnist1d_default_split_matches_the_paper(tmp_path):
    d = load_mnist1d(CPU, cache_dir=str(tmp_path))
    assert (len(d.x_train), len(d.x_test)) == (4000, 1000) and d.num_classes == 10


def test_corrupt_mnist1d_cache_is_a_user_error(tmp_path):
    load_mnist1d(CPU, cache_dir=str(tmp_path), num_samples=200)
    (cache,) = tmp_path.glob("mnist1d_*.npz")
    cache.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="unreadable"):
        load_mnist1d(CPU, cache_dir=str(tmp_path), num_samples=200)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_files_load_through_torchvision(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    images = {split: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for split, n in (("train", 12), ("t10k", 5))}
    for split, x in images.items():
        write_idx(raw / f"{split}-images-idx3-ubyte", x)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(len(x)) % 10)
    d = load_torchvision(CPU, name, str(tmp_path), download=False)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert torch.allclose(d.x_train[3, 0], torch.tensor(images["train"][3] / 255.0, dtype=torch.float32))
    assert d.y_test.tolist() == [0, 1, 2, 3, 4]
    # the same pixels as torchvision's ToTensor pipeline
    ref = getattr(torchvision.datasets, folder)(str(tmp_path), train=True,
                                                transform=torchvision.transforms.ToTensor())
    assert torch.equal(ref[3][0], d.x_train[3])


def test_cifar10_pickles_load_through_torchvision(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 3}
    for file, n in batches.items():
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), "labels": list(range(n))}
        (folder / file).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))

    def md5(file):
        return hashlib.md5((folder / file).read_bytes()).hexdigest()

    # torchvision verifies the real files' checksums: point it at ours instead
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f in batches if f != "test_batch"])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5("batches.meta")})
    d = load_torchvision(CPU, "cifar10", str(tmp_path), download=False)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    ref = cls(str(tmp_path), train=False, transform=torchvision.transforms.ToTensor())
    assert torch.equal(ref[1][0], d.x_test[1])


def test_missing_files_offline_say_where_to_put_them(tmp_path):
    with pytest.raises(UserError, match=r"FashionMNIST files not found.*put FashionMNIST/raw/"):
        load_torchvision(CPU, "fashion_mnist", str(tmp_path), download=False)


def test_corrupt_idx_file_is_a_user_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(UserError, match="MNIST"):
        load_torchvision(CPU, "mnist", str(tmp_path), download=False)
