"""Datasets: the train/validation/test split, standardisation, batches (resident and streamed), and
every loader over tiny files in the real on-disk formats (npz, CSV, PNG folders, IDX, CIFAR pickles,
SVHN .mat), plus the dataset configs composed by Hydra."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dropbench.config import UserError, build
from dropbench.data import (
    Dataset,
    load_csv,
    load_digits,
    load_imagefolder,
    load_mnist1d,
    load_npz,
    load_torchvision,
    make_dataset,
    write_idx,
)

CPU = torch.device("cpu")
CONF = Path(__file__).resolve().parents[1] / "conf"


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as error:
        fn(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def rows(x: torch.Tensor) -> set[tuple]:
    return {tuple(r) for r in x.reshape(len(x), -1).tolist()}


def labelled(n: int = 103, classes: int = 4, features: int = 3, seed: int = 0):
    """Examples whose first feature is their index (so each row is unique), with unbalanced classes."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.arange(n)[:, None], rng.normal(size=(n, features - 1))], axis=1)
    y = np.minimum(rng.integers(0, classes + 2, n), classes - 1)  # the last class is the largest
    return x, y


# --- the split ------------------------------------------------------------------------------------

def test_splits_are_disjoint_stratified_and_cover_the_data():
    x, y = labelled()
    d = make_dataset("t", x, y, None, None, 4, device=CPU, val_fraction=0.2, test_fraction=0.25)
    parts = [(d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)]
    ids = [set(xs[:, 0].long().tolist()) for xs, _ in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(range(len(y)))
    for xs, ys in parts:  # each example keeps its label
        assert torch.equal(ys, torch.as_tensor(y[xs[:, 0].long().numpy()]))
    assert len(d.y_test) == round(0.25 * len(y)) and len(d.y_val) == round(0.2 * (len(y) - len(d.y_test)))
    whole = np.bincount(y)
    rest = np.bincount(d.y_train.numpy(), minlength=4) + np.bincount(d.y_val.numpy(), minlength=4)
    assert np.all(np.abs(np.bincount(d.y_test.numpy(), minlength=4) - 0.25 * whole) <= 1)
    assert np.all(np.abs(np.bincount(d.y_val.numpy(), minlength=4) - 0.2 * rest) <= 1)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64


def test_split_depends_on_split_seed_only():
    x, y = labelled()

    def val_ids(split_seed=0):
        d = make_dataset("t", x, y, None, None, 4, device=CPU, split_seed=split_seed)
        return d.x_val[:, 0].tolist(), d.x_test[:, 0].tolist()

    first = val_ids()
    torch.manual_seed(123)  # what a model seed changes
    np.random.seed(123)
    assert val_ids() == first
    assert val_ids(split_seed=1) != first


def test_model_seed_in_the_config_does_not_change_the_split(tmp_path):
    x, y = labelled()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    vals = []
    for seed in (0, 7):
        cfg = compose(["dataset=npz", f"dataset.path={tmp_path / 'd.npz'}", f"seed={seed}"])
        vals.append(build(cfg.dataset, "dataset", device=CPU).x_val)
    assert torch.equal(*vals)


def test_val_fraction_zero_gives_empty_val_with_the_input_shape():
    d = make_dataset("t", np.zeros((10, 2, 5)), np.arange(10) % 2, np.zeros((4, 2, 5)), np.arange(4) % 2, 2,
                     device=CPU, val_fraction=0.0)
    assert d.x_val.shape == (0, 2, 5) and d.y_val.shape == (0,) and d.size("val") == 0 and d.size("train") == 10
    assert list(d.chunks("val", 3)) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"val_fraction": 1.0}, r"dataset.val_fraction=1.0 is not allowed; it must be a number in \[0, 1\)"),
    ({"val_fraction": -0.1}, "dataset.val_fraction"),
    ({"val_fraction": "0.1"}, "dataset.val_fraction"),
    ({"val_fraction": 0.9}, "val_fraction=0.9 leaves no training example of the 2"),
    ({"split_seed": -1}, "dataset.split_seed=-1 is not allowed"),
    ({"device_budget_gb": -1}, "dataset.device_budget_gb=-1"),
    ({"standardize": "yes"}, "dataset.standardize='yes'"),
    ({"test_fraction": 0.0}, r"dataset.test_fraction=0.0 is not allowed; it must be a number in \(0, 1\)"),
])
def test_bad_split_settings_are_one_line_user_errors(kwargs, match):
    one_line_error(match, make_dataset, "t", np.zeros((3, 2)), np.array([0, 1, 1]), device=CPU,
                   **{"test_fraction": 1 / 3, **kwargs})


def test_standardisation_uses_training_statistics_only():
    x, y = labelled(200)
    x_test = x[:50] * 3 + 100  # far from the training data: statistics over all splits would differ a lot
    raw = make_dataset("t", x, y, x_test, y[:50], 4, device=CPU)
    z = make_dataset("t", x, y, x_test, y[:50], 4, device=CPU, standardize=True)
    mean, std = raw.x_train.double().mean(0), raw.x_train.double().std(0, unbiased=False)
    for split in ("train", "val", "test"):
        expected = (getattr(raw, f"x_{split}").double() - mean) / std
        assert torch.allclose(getattr(z, f"x_{split}").double(), expected, atol=1e-5)
    assert torch.allclose(z.x_train.mean(0), torch.zeros(3), atol=1e-5)


def test_constant_feature_is_centred_not_divided_by_zero():
    x = np.stack([np.full(20, 5.0), np.arange(20.0)], axis=1)
    d = make_dataset("t", x, np.arange(20) % 2, x[:4], np.arange(4) % 2, 2, device=CPU, standardize=True)
    assert torch.isfinite(d.x_train).all() and torch.all(d.x_train[:, 0] == 0)


# --- batches ------------------------------------------------------------------------------------------

def test_batch_gathers_replica_indices_and_streaming_matches_resident():
    x, y = labelled(60)
    resident = make_dataset("t", x.reshape(60, 3, 1), y, None, None, 4, device=CPU)
    streamed = make_dataset("t", x.reshape(60, 3, 1), y, None, None, 4, device=CPU, device_budget_gb=0)
    assert resident.resident and not streamed.resident and streamed.device == CPU
    idx = torch.randint(0, resident.size("train"), (3, 5), generator=torch.Generator().manual_seed(0))
    xb, yb = resident.batch("train", idx)
    assert xb.shape == (3, 5, 3, 1) and yb.shape == (3, 5)
    assert torch.equal(xb[2, 4], resident.x_train[idx[2, 4]]) and torch.equal(yb[1], resident.y_train[idx[1]])
    for split in ("train", "val", "test"):
        idx = torch.arange(resident.size(split)).flip(0).view(1, -1)
        assert all(torch.equal(a, b) for a, b in zip(resident.batch(split, idx), streamed.batch(split, idx)))
        chunks = list(streamed.chunks(split, 4))
        assert all(len(c[1]) <= 4 for c in chunks)
        assert torch.equal(torch.cat([c[0] for c in chunks]), resident.x_test if split == "test" else
                           getattr(resident, f"x_{split}"))


def test_dataset_built_from_tensors_defaults_to_their_device():
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    d = Dataset("t", x, y, x[:0], y[:0], x, y, 2)
    assert d.device == CPU and d.resident and d.in_shape == (2,)
    assert d.batch("test", torch.tensor([[1], [2]]))[1].tolist() == [[1], [0]]


# --- MNIST-1D and digits ---------------------------------------------------------------------------

def test_mnist1d_is_generated_once_then_cached(tmp_path):
    a = load_mnist1d(CPU, cache_dir=str(tmp_path), num_samples=500)
    (cache,) = tmp_path.glob("mnist1d_*.npz")
    stamp = cache.stat().st_mtime_ns
    b = load_mnist1d(CPU, cache_dir=str(tmp_path), num_samples=500)
    assert cache.stat().st_mtime_ns == stamp  # read, not regenerated
    assert a.x_train.shape == (360, 1, 40) and a.x_val.shape == (40, 1, 40) and a.x_test.shape == (100, 1, 40)
    assert a.y_train.dtype == torch.int64 and set(a.y_train.tolist()) <= set(range(10))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val) and torch.equal(a.y_test, b.y_test)


def test_mnist1d_default_split_keeps_the_papers_test_set():
    d = load_mnist1d(CPU, cache_dir=os.environ["DROPBENCH_CACHE"])
    assert (d.size("train"), d.size("val"), d.size("test")) == (3600, 400, 1000) and d.num_classes == 10


def test_corrupt_mnist1d_cache_is_a_user_error(tmp_path):
    load_mnist1d(CPU, cache_dir=str(tmp_path), num_samples=200)
    (cache,) = tmp_path.glob("mnist1d_*.npz")
    cache.write_bytes(b"not a zip file")
    one_line_error("unreadable", load_mnist1d, CPU, cache_dir=str(tmp_path), num_samples=200)


def test_digits_are_8x8_images_in_unit_range_with_a_carved_test_split():
    from sklearn.datasets import load_digits as sklearn_digits

    d = load_digits(CPU)
    assert d.in_shape == (1, 8, 8) and d.num_classes == 10
    assert (d.size("train") + d.size("val") + d.size("test"), d.size("test")) == (1797, 359)
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    assert rows(d.x_test * 16) <= rows(torch.as_tensor(sklearn_digits().images, dtype=torch.float32))


# --- npz and CSV ------------------------------------------------------------------------------------

def test_npz_with_test_arrays_and_string_labels(tmp_path):
    x, _ = labelled(40)
    names = np.array(["cat", "ant", "bee", "cat"] * 10)
    np.savez(tmp_path / "d.npz", x=x, y=names, x_test=x[:6] + 0.5, y_test=names[:6])
    d = load_npz(CPU, str(tmp_path / "d.npz"), standardize=False)
    assert d.num_classes == 3 and d.y_test.tolist() == [2, 0, 1, 2, 2, 0]  # ant < bee < cat
    assert torch.allclose(d.x_test, torch.as_tensor(x[:6] + 0.5, dtype=torch.float32))
    assert d.size("train") + d.size("val") == 40


def test_npz_without_test_arrays_carves_a_stratified_test_split(tmp_path):
    x, y = labelled(100)
    np.savez(tmp_path / "d.npz", x=x.reshape(100, 3, 1).astype(np.float64), y=y + 10)
    d = load_npz(CPU, str(tmp_path / "d.npz"), standardize=False)
    assert d.in_shape == (3, 1) and d.size("test") == 20 and d.num_classes == 4
    assert np.all(np.abs(np.bincount(d.y_test.numpy(), minlength=4) - 0.2 * np.bincount(y)) <= 1)


@pytest.mark.parametrize("arrays, match", [
    ({"data": np.zeros((3, 2)), "y": np.zeros(3)}, r"has the keys data, y; it needs x and y"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3), "x_test": np.zeros((1, 2))}, "optionally x_test with y_test"),
    ({"x": np.array([["a", "b"]] * 3), "y": np.zeros(3)}, r"x is <U1 of shape \[3, 2\]; it must be numeric"),
    ({"x": np.zeros(3), "y": np.zeros(3)}, r"shape \[N, features...\]"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, r"y is float64 of shape \[4\]; it must hold one int or string"),
    ({"x": np.full((3, 2), np.nan), "y": np.zeros(3)}, "x contains NaN"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3), "x_test": np.zeros((1, 3)), "y_test": np.zeros(1)},
     r"x_test has examples of shape \[3\], x of shape \[2\]"),
])
def test_bad_npz_contents_are_one_line_user_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    one_line_error(match, load_npz, CPU, str(tmp_path / "d.npz"))


def test_missing_or_foreign_npz_files_are_user_errors(tmp_path):
    one_line_error("dataset.path=.*nope.npz' does not exist", load_npz, CPU, str(tmp_path / "nope.npz"))
    (tmp_path / "bad.npz").write_text("hello")
    one_line_error("is not a readable .npz file", load_npz, CPU, str(tmp_path / "bad.npz"))


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_csv_with_string_labels_and_chosen_features(tmp_path):
    lines = ["id,a,b,species"] + [f"{i},{i * 0.5},{i % 3},{['setosa', 'virginica'][i % 2]}" for i in range(30)]
    path = write_csv(tmp_path / "t.csv", "\n".join(lines) + "\n")
    d = load_csv(CPU, path, label="species", features=["a", "b"], standardize=False, val_fraction=0.0)
    assert d.in_shape == (2,) and d.num_classes == 2 and d.size("test") == 6 and d.size("train") == 24
    a = torch.cat([d.x_train[:, 0], d.x_test[:, 0]])
    assert sorted((a * 2).long().tolist()) == list(range(30))
    labels = torch.cat([d.y_train, d.y_test])[torch.argsort(a)]
    assert labels.tolist() == [i % 2 for i in range(30)]
    assert load_csv(CPU, path, label="species").in_shape == (3,)  # default: every other column


@pytest.mark.parametrize("text, kwargs, match", [
    ("a,b,y\n1,2,0\n3,x,1\n", {}, r"t.csv: column 'b', line 3: 'x' is not a number"),
    ("a,b,y\n1,2,0\n3,,1\n", {}, r"column 'b' is empty on line 3"),
    ("a,b,y\n1,2,0\n", {"label": "klass"},
     r"dataset.label='klass' is not a column of .*t.csv; its columns are a, b, y"),
    ("a,b,y\n1,2,0\n", {"features": ["a", "c"]}, r"'c' is not a column; choose from the columns .*: a, b, y"),
    ("1,2,0\n3,4,1\n", {"label": "0"}, "a header row naming the columns is required"),
    ("a,b,y\n", {}, "has a header but no data rows"),
    ("", {}, "is empty"),
])
def test_bad_csv_files_are_one_line_user_errors(tmp_path, text, kwargs, match):
    path = write_csv(tmp_path / "t.csv", text)
    one_line_error(match, load_csv, CPU, path, **{"label": "y", **kwargs})


# --- image folders -------------------------------------------------------------------------------------

def png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_imagefolder_reads_rgb_pixels_by_class_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for c in ("cat", "dog"):
        for i in range(5):
            images[c, i] = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
            png(tmp_path / "train" / c / f"{i}.png", images[c, i])
    grey = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    png(tmp_path / "test" / "dog" / "g.png", grey)
    d = load_imagefolder(CPU, str(tmp_path / "train"), test_root=str(tmp_path / "test"), val_fraction=0.2)
    assert d.in_shape == (3, 4, 6) and d.num_classes == 2 and (d.size("train"), d.size("val")) == (8, 2)
    assert d.y_test.tolist() == [1] and torch.equal(d.x_test[0], torch.as_tensor(np.stack([grey] * 3) / 255.0,
                                                                                 dtype=torch.float32))
    expected = {tuple((torch.as_tensor(a, dtype=torch.float32).permute(2, 0, 1) / 255).flatten().tolist())
                for a in images.values()}
    assert rows(torch.cat([d.x_train, d.x_val])) == expected
    carved = load_imagefolder(CPU, str(tmp_path / "train"), val_fraction=0.0)
    assert (carved.size("train"), carved.size("test")) == (8, 2) and sorted(carved.y_test.tolist()) == [0, 1]


def test_imagefolder_sizes_must_match_unless_resized(tmp_path):
    png(tmp_path / "a" / "0.png", np.zeros((4, 4, 3), dtype=np.uint8))
    png(tmp_path / "b" / "0.png", np.full((8, 6, 3), 255, dtype=np.uint8))
    one_line_error(r"differ in size: .*0.png is 4x4 \(HxW\), .*0.png is 8x6 .*dataset.image_size=\[H, W\]",
                   load_imagefolder, CPU, str(tmp_path), test_fraction=0.5, val_fraction=0.0)
    d = load_imagefolder(CPU, str(tmp_path), image_size=[5, 3], test_fraction=0.5, val_fraction=0.0)
    assert d.in_shape == (3, 5, 3)
    assert torch.cat([d.x_train, d.x_test]).amax(dim=(1, 2, 3)).sort().values.tolist() == [0.0, 1.0]


def test_bad_image_folders_are_user_errors(tmp_path):
    one_line_error("dataset.root=.*nowhere' is not a folder", load_imagefolder, CPU, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    one_line_error("dataset.root=.*: .*one folder of images per class", load_imagefolder, CPU, str(tmp_path / "empty"))
    png(tmp_path / "ok" / "a" / "0.png", np.zeros((2, 2, 3), dtype=np.uint8))
    (tmp_path / "ok" / "a" / "1.png").write_bytes(b"not a png")
    one_line_error(r"image .*1.png is unreadable", load_imagefolder, CPU, str(tmp_path / "ok"))
    one_line_error(r"dataset.image_size=\[3\] is not allowed", load_imagefolder, CPU, str(tmp_path / "ok"),
                   image_size=[3])


# --- torchvision -----------------------------------------------------------------------------------------

def idx_root(root: Path, folder: str, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    images = {split: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for split, n in (("train", n_train),
                                                                                      ("t10k", n_test))}
    for split, x in images.items():
        write_idx(raw / f"{split}-images-idx3-ubyte", x)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(len(x)) % 10)
    return images


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_files_load_through_torchvision(tmp_path, name, folder):
    images = idx_root(tmp_path, folder)
    d = load_torchvision(CPU, name, str(tmp_path), class_name=folder, val_fraction=0.0)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28) and d.num_classes == 10
    assert torch.allclose(d.x_train[3, 0], torch.tensor(images["train"][3] / 255.0, dtype=torch.float32))
    assert d.y_test.tolist() == [0, 1, 2, 3, 4]
    # the same pixels as torchvision's ToTensor pipeline
    ref = getattr(torchvision.datasets, folder)(str(tmp_path), train=True, transform=torchvision.transforms.ToTensor())
    assert torch.equal(ref[3][0], d.x_train[3])


def test_class_is_found_from_the_name_ignoring_case_and_underscores(tmp_path):
    idx_root(tmp_path, "KMNIST", n_train=30)
    d = load_torchvision(CPU, "k_mnist", str(tmp_path))
    assert d.name == "k_mnist" and (d.size("train"), d.size("val"), d.size("test")) == (27, 3, 5)
    resized = load_torchvision(CPU, "KMNIST", str(tmp_path), image_size=[14, 14])
    assert resized.in_shape == (1, 14, 14)


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
    d = load_torchvision(CPU, "cifar10", str(tmp_path), class_name="CIFAR10")
    assert (d.size("train"), d.size("val")) == (18, 2) and d.x_test.shape == (3, 3, 32, 32)
    ref = cls(str(tmp_path), train=False, transform=torchvision.transforms.ToTensor())
    assert torch.equal(ref[1][0], d.x_test[1])


def test_svhn_uses_the_split_convention(tmp_path, monkeypatch):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    cls = torchvision.datasets.SVHN
    split_list = {}
    for split, n in (("train", 10), ("test", 4)):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                  "y": (np.arange(n) % 10 + 1)[:, None]})  # SVHN's labels: 1..10
        md5 = hashlib.md5((tmp_path / f"{split}_32x32.mat").read_bytes()).hexdigest()
        split_list[split] = ["", f"{split}_32x32.mat", md5]
    monkeypatch.setattr(cls, "split_list", split_list)
    d = load_torchvision(CPU, "SVHN", str(tmp_path), val_fraction=0.0)
    assert d.x_train.shape == (10, 3, 32, 32) and d.y_test.tolist() == [1, 2, 3, 4] and d.num_classes == 10
    ref = cls(str(tmp_path), split="test", transform=torchvision.transforms.ToTensor())
    assert torch.equal(ref[2][0], d.x_test[2])


def test_unknown_torchvision_class_lists_valid_ones(tmp_path):
    message = one_line_error(r"dataset.name='ImageNette2' is not a class of torchvision.datasets; e.g. MNIST",
                             load_torchvision, CPU, "ImageNette2", str(tmp_path))
    assert "CIFAR10" in message
    one_line_error(r"dataset.class_name='Nope'", load_torchvision, CPU, "mine", str(tmp_path), class_name="Nope")


def test_missing_files_offline_say_where_to_put_them(tmp_path):
    one_line_error(r"FashionMNIST files not found.*put FashionMNIST/raw/", load_torchvision, CPU, "fashion_mnist",
                   str(tmp_path), class_name="FashionMNIST")


def test_corrupt_idx_file_is_a_user_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    one_line_error("MNIST", load_torchvision, CPU, "mnist", str(tmp_path), class_name="MNIST")


# --- configs ------------------------------------------------------------------------------------------

def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def test_csv_config_composes_and_builds(tmp_path):
    path = write_csv(tmp_path / "x.csv", "f,g,y\n" + "".join(f"{i},{i % 4},{'ab'[i % 2]}\n" for i in range(20)))
    cfg = compose(["dataset=csv", f"dataset.path={path}", "dataset.label=y", "dataset.val_fraction=0.25"])
    d = build(cfg.dataset, "dataset", device=CPU)
    assert isinstance(d, Dataset) and d.name == "csv" and d.in_shape == (2,)
    assert (d.size("train"), d.size("val"), d.size("test")) == (12, 4, 4)
    assert torch.allclose(d.x_train.mean(0), torch.zeros(2), atol=1e-5)  # standardize is on for CSV


@pytest.mark.parametrize("file", sorted(p.name for p in (CONF / "dataset").glob("[!_]*.yaml")))
def test_every_dataset_config_composes_with_the_shared_keys(file):
    text = (CONF / "dataset" / file).read_text()
    assert text.startswith("# ")
    node = compose([f"dataset={file[:-5]}"]).dataset
    assert {"_target_", "name", "val_fraction", "split_seed", "device_budget_gb", "standardize"} <= set(node)
    assert node.val_fraction == 0.1 and node.split_seed == 0 and node.device_budget_gb == 4


def test_shortcut_configs_keep_their_labels():
    for shortcut, cls in (("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("cifar10", "CIFAR10")):
        node = compose([f"dataset={shortcut}"]).dataset
        assert (node.name, node.class_name, node._target_) == (shortcut, cls, "dropbench.data.load_torchvision")
