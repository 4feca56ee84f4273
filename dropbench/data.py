"""Datasets as tensors on the training device.

`load_*` functions return a `Dataset` of float inputs [N, C, *spatial] and int64 labels, already
on the device: training batches are gathered from index permutations on that device, so there is
no DataLoader and no per-sample Python in the training loop.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dropbench.config import UserError, positive_int


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _to_device(name, x_train, y_train, x_test, y_test, num_classes, device) -> Dataset:
    def f(a):
        return torch.as_tensor(a, dtype=torch.float32).to(device)

    def i(a):
        return torch.as_tensor(a, dtype=torch.int64).to(device)

    return Dataset(name, f(x_train), i(y_train), f(x_test), i(y_test), num_classes)


def load_mnist1d(device: torch.device, cache_dir: str = "~/.cache/dropbench", num_samples: int = 5000,
                 train_split: float = 0.8, seed: int = 42) -> Dataset:
    """MNIST-1D (Greydanus & Kobak 2020) generated offline with `mnist1d.data.make_dataset`.

    The defaults are the package's: 5,000 signals of length 40 split 4,000/1,000. The generated
    arrays are cached as .npz under `cache_dir` (generation takes seconds; loading milliseconds).
    """
    positive_int("dataset.num_samples", num_samples)
    if not 0.0 < train_split < 1.0:
        raise UserError(f"dataset.train_split={train_split!r} is not allowed; it must be in (0, 1)")
    cache = Path(os.path.expanduser(cache_dir)) / f"mnist1d_n{num_samples}_split{train_split}_seed{seed}.npz"
    try:
        with np.load(cache) as arrays:
            x, y, x_test, y_test = (arrays[k] for k in ("x", "y", "x_test", "y_test"))
    except FileNotFoundError:
        x, y, x_test, y_test = _generate_mnist1d(num_samples, train_split, seed)
        _save_npz_atomic(cache, x=x, y=y, x_test=x_test, y_test=y_test)
    except Exception as error:  # a truncated or foreign file: say which, don't guess
        raise UserError(f"cached MNIST-1D file {cache} is unreadable ({error}); delete it to regenerate") from None
    # [N, 40] -> [N, 1, 40]: one channel, so the same tensors feed an MLP or a Conv1d.
    return _to_device("mnist1d", x[:, None, :], y, x_test[:, None, :], y_test, 10, device)


def _generate_mnist1d(num_samples: int, train_split: float, seed: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave it as it was
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return d["x"].astype(np.float32), d["y"].astype(np.int64), d["x_test"].astype(np.float32), d["y_test"].astype(np.int64)


def _save_npz_atomic(path: Path, **arrays) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# name -> (torchvision class, number of classes, files a user must provide when offline)
TORCHVISION = {
    "mnist": ("MNIST", 10, "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
    "fashion_mnist": ("FashionMNIST", 10, "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
    "cifar10": ("CIFAR10", 10, "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"),
}


def load_torchvision(device: torch.device, name: str, root: str, download: bool = True) -> Dataset:
    """FashionMNIST, MNIST or CIFAR-10 through torchvision's own dataset classes.

    Pixels are scaled to [0, 1] as `transforms.ToTensor()` does; images are [N, C, H, W].
    """
    if name not in TORCHVISION:
        raise UserError(f"dataset.name={name!r} is not allowed; choose from {', '.join(TORCHVISION)}")
    import torchvision

    class_name, num_classes, files = TORCHVISION[name]
    cls = getattr(torchvision.datasets, class_name)
    root = os.path.expanduser(root)
    try:
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, OSError) as error:
        hint = "download=true could not fetch them" if download else "download=false"
        raise UserError(
            f"{class_name} files not found or unreadable under {root} ({hint}: {str(error).splitlines()[0]}); "
            f"put {files} there, or set dataset.root=DIR"
        ) from None
    except Exception as error:  # corrupt files make the parsers raise all sorts of errors
        raise UserError(f"{class_name} files under {root} are corrupt ({type(error).__name__}: {error})") from None
    return _to_device(name, *_images(train), *_images(test), num_classes, device)


def _images(ds) -> tuple[np.ndarray, np.ndarray]:
    """torchvision dataset -> (float images [N, C, H, W] in [0, 1], int labels)."""
    x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # MNIST [N,H,W]; CIFAR [N,H,W,C]
    y = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else np.asarray(ds.targets)
    return x.astype(np.float32) / 255.0, y


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of MNIST-style files (gzip'd when `path` ends in .gz).

    Used to make stand-in data in the real on-disk format where the real files are absent
    (the benchmark, the tests): torchvision's own parsers then read them.
    """
    import gzip

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.tobytes())
