"""Datasets: loading, train/validation/test splits, standardisation, and placement on the device.

Every loader (`load_*`, one per kind of source in conf/dataset/) reads its source into arrays and hands them
to `make_dataset`, which does the common work: the stratified validation split (and a test split
for sources without one), label mapping, optional z-scoring, and placement. The training loop
gathers batches from index tensors with `Dataset.batch`: there is no DataLoader and no per-sample
Python. Reference: docs/datasets.md.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from numbers import Number
from pathlib import Path

import numpy as np
import torch

from dropbench.config import UserError, flag, non_negative, positive_int, probability
from dropbench.results import atomic_file

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Train, validation and test tensors: float32 inputs [N, *in_shape], int64 labels in 0..C-1.

    `resident` tensors live on `device`; otherwise they stay in host memory (pinned when `device`
    is a GPU) and `batch`/`chunks` copy only what is asked for. `device` defaults to where
    `x_train` is.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    device: torch.device | None = None
    resident: bool = True

    def __post_init__(self):
        self.device = self.x_train.device if self.device is None else torch.device(self.device)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; choose from {', '.join(SPLITS)}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def size(self, split: str) -> int:
        return len(self._split(split)[1])

    def batch(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples `idx` (int64, any shape S, any device) of `split` as x [*S, *in_shape], y [*S] on `device`.

        One index_select over the flattened indices (faster than advanced indexing on CPU). When
        streaming, the rows are gathered on the host into pinned memory, so that the copy to the
        GPU is asynchronous; indices already on the host avoid a synchronisation.
        """
        x, y = self._split(split)
        flat = idx.reshape(-1)
        if self.resident:
            flat = flat.to(x.device)
            return x.index_select(0, flat).view(*idx.shape, *x.shape[1:]), y.index_select(0, flat).view(idx.shape)
        flat = flat.cpu()
        pinned = x.is_pinned()
        xb = torch.empty((len(flat), *x.shape[1:]), dtype=x.dtype, pin_memory=pinned)
        yb = torch.empty(len(flat), dtype=y.dtype, pin_memory=pinned)
        torch.index_select(x, 0, flat, out=xb)
        torch.index_select(y, 0, flat, out=yb)
        return (xb.view(*idx.shape, *x.shape[1:]).to(self.device, non_blocking=True),
                yb.view(idx.shape).to(self.device, non_blocking=True))

    def chunks(self, split: str, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive (x, y) slices of `split` of at most `size` examples, on `device` (for evaluation)."""
        positive_int("chunk size", size)
        x, y = self._split(split)
        for start in range(0, len(y), size):
            # slices of a pinned tensor along dim 0 are pinned too: the copy is asynchronous
            yield (x[start:start + size].to(self.device, non_blocking=True),
                   y[start:start + size].to(self.device, non_blocking=True))


def make_dataset(name: str, x, y, x_test=None, y_test=None, num_classes: int | None = None, *,
                 device: torch.device | str, val_fraction: float = 0.1, split_seed: int = 0,
                 device_budget_gb: float = 4.0, test_fraction: float = 0.2, standardize: bool = False) -> Dataset:
    """Split, map, standardise and place arrays; the common end of every loader.

    Args:
        name: label of the dataset (results are grouped by it).
        x, y: training inputs [N, ...] (any numeric dtype) and labels [N].
        x_test, y_test: the source's test set, or None: then a stratified `test_fraction` of
            (x, y) becomes the test split, drawn before the validation split.
        num_classes: None to map the labels (any ints or strings) to 0..C-1 in sorted order of
            the unique labels of all splits; else the labels already are 0..num_classes-1.
        device: the training device.
        val_fraction: stratified fraction of the training data held out for validation, in
            [0, 1); 0 gives empty validation tensors.
        split_seed: seeds the numpy Generator that draws the test and validation splits, so
            that every run of a comparison (whatever its model seed) sees the same split.
        device_budget_gb: the tensors go on `device` when their total size is at most this many
            GB (10^9 bytes); otherwise they stay in host memory (pinned on CUDA) and are streamed.
        test_fraction: see x_test; in (0, 1).
        standardize: z-score every input feature with the mean and standard deviation of the
            training split (a standard deviation of 0 counts as 1), applied to all splits.
    """
    val_fraction = probability("dataset.val_fraction", val_fraction)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise UserError(f"dataset.split_seed={split_seed!r} is not allowed; it must be a non-negative integer")
    budget = non_negative("dataset.device_budget_gb", device_budget_gb)
    flag("dataset.standardize", standardize)
    device = torch.device(device)

    y = np.asarray(y)
    if num_classes is None:
        (y, y_test), num_classes = _class_indices(y, None if y_test is None else np.asarray(y_test))
    rng = np.random.default_rng(split_seed)
    if x_test is None:
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, Number) or not 0 < test_fraction < 1:
            raise UserError(f"dataset.test_fraction={test_fraction!r} is not allowed; it must be a number in (0, 1)")
        train, test = _stratified_split(y, float(test_fraction), rng)
        if len(train) == 0:
            raise UserError(f"dataset.test_fraction={test_fraction} leaves no training example of the {len(y)} "
                            f"in {name}; lower it")
        x_test, y_test, x, y = x[test], y[test], x[train], y[train]
    train, val = _stratified_split(y, val_fraction, rng)
    if len(train) == 0:
        raise UserError(f"dataset.val_fraction={val_fraction} leaves no training example of the {len(y)} "
                        f"in {name}; lower it")
    arrays = [x[train], y[train], x[val], y[val], x_test, y_test]
    for i in (0, 2, 4):
        arrays[i] = np.asarray(arrays[i], dtype=np.float32)
    if standardize:
        mean = arrays[0].mean(axis=0, dtype=np.float64)
        std = arrays[0].std(axis=0, dtype=np.float64)
        std[std == 0] = 1.0
        mean, std = mean.astype(np.float32), std.astype(np.float32)  # float32 results, no float64 copies
        for i in (0, 2, 4):
            arrays[i] = (arrays[i] - mean) / std
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32 if i % 2 == 0 else np.int64))
               for i, a in enumerate(arrays)]
    resident = sum(t.numel() * t.element_size() for t in tensors) <= budget * 1e9
    if resident:
        tensors = [t.to(device) for t in tensors]
    elif device.type == "cuda":
        tensors = [t.pin_memory() for t in tensors]
    return Dataset(name, *tensors, num_classes=num_classes, device=device, resident=resident)


def _class_indices(y: np.ndarray, y_test: np.ndarray | None):
    """Labels of any kind -> int64 indices into their sorted unique values (over both splits)."""
    parts = [y] if y_test is None else [y, y_test]
    if any(p.dtype.kind in "OSU" for p in parts):  # strings (or strings mixed with numbers): compare as text
        parts = [p.astype(str) for p in parts]
    labels = np.concatenate(parts)
    classes, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return (inverse[:len(y)], None if y_test is None else inverse[len(y):]), len(classes)


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, taken), both sorted: `fraction` of every class taken at random.

    round(fraction * N) examples are taken (at least 1 when fraction > 0); each class gives
    floor(fraction * n_c) or one more, the largest remainders first (Hamilton's apportionment),
    so every class's share is within one example of its exact share.
    """
    n = len(y)
    if fraction == 0:
        return np.arange(n), np.arange(0)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    exact = fraction * counts
    take = np.floor(exact).astype(np.int64)
    extra = max(1, int(fraction * n + 0.5)) - int(take.sum())
    take[np.argsort(take - exact, kind="stable")[:extra]] += 1
    by_class = np.split(np.argsort(inverse.reshape(-1), kind="stable"), np.cumsum(counts)[:-1])
    taken = np.sort(np.concatenate([rng.permutation(members)[:k] for members, k in zip(by_class, take)]))
    kept = np.ones(n, dtype=bool)
    kept[taken] = False
    return np.flatnonzero(kept), taken


def load_mnist1d(device: torch.device, name: str = "mnist1d", cache_dir: str = "~/.cache/dropbench",
                 num_samples: int = 5000, train_split: float = 0.8, seed: int = 42, val_fraction: float = 0.1,
                 split_seed: int = 0, device_budget_gb: float = 4.0, standardize: bool = False) -> Dataset:
    """MNIST-1D (Greydanus & Kobak 2020) generated offline with `mnist1d.data.make_dataset`.

    The defaults are the package's: 5,000 signals of length 40 split 4,000/1,000 into train and
    test; the validation split is drawn from the 4,000. The generated arrays are cached as .npz
    under `cache_dir` (generation takes seconds; loading milliseconds). Inputs are [N, 1, 40].
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
        with atomic_file(cache, "wb") as f:  # readers never see half a file
            np.savez(f, x=x, y=y, x_test=x_test, y_test=y_test)
    except Exception as error:  # noqa: BLE001 (a truncated or foreign file: say which, don't guess)
        raise UserError(f"cached MNIST-1D file {cache} is unreadable ({error}); delete it to regenerate") from None
    # [N, 40] -> [N, 1, 40]: one channel, so the same tensors feed an MLP or a Conv1d.
    return make_dataset(name, x[:, None, :], y, x_test[:, None, :], y_test, 10, device=device,
                        val_fraction=val_fraction, split_seed=split_seed, device_budget_gb=device_budget_gb,
                        standardize=standardize)


def _generate_mnist1d(num_samples: int, train_split: float, seed: int):
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset as make_mnist1d

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave it as it was
    try:
        d = make_mnist1d(args)
    finally:
        np.random.set_state(state)
    return (d["x"].astype(np.float32), d["y"].astype(np.int64),
            d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))


def load_digits(device: torch.device, name: str = "digits", test_fraction: float = 0.2, val_fraction: float = 0.1,
                split_seed: int = 0, device_budget_gb: float = 4.0, standardize: bool = False) -> Dataset:
    """scikit-learn's bundled handwritten digits (Alpaydin & Kaynak 1998; UCI): 1,797 8x8 images of
    10 classes with 17 grey levels, read offline, as [N, 1, 8, 8] in [0, 1]. The source has no test
    split: a stratified `test_fraction` is drawn first."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0)[:, None].astype(np.float32)
    return make_dataset(name, x, digits.target.astype(np.int64), None, None, 10, device=device,
                        val_fraction=val_fraction, split_seed=split_seed, device_budget_gb=device_budget_gb,
                        test_fraction=test_fraction, standardize=standardize)


def _user_file(key: str, path) -> Path:
    """An existing regular file given by the user as `key`."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise UserError(f"dataset.{key}={path!r} is not allowed; it must be the path of a file")
    file = Path(os.path.expanduser(str(path)))
    if not file.is_file():
        raise UserError(f"dataset.{key}={str(path)!r} " + ("is a directory, not a file" if file.is_dir()
                                                            else "does not exist"))
    return file


def load_npz(device: torch.device, path: str, name: str = "npz", test_fraction: float = 0.2,
             val_fraction: float = 0.1, split_seed: int = 0, device_budget_gb: float = 4.0,
             standardize: bool = True) -> Dataset:
    """Arrays from a NumPy .npz file: `x` [N, ...] (any numeric dtype and shape) and `y` [N]
    (ints or strings), optionally `x_test` and `y_test`; without them a stratified `test_fraction`
    becomes the test split."""
    file = _user_file("path", path)
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as error:  # noqa: BLE001 (not a zip, truncated, object arrays...)
        raise UserError(f"dataset.path={str(path)!r} is not a readable .npz file "
                        f"({type(error).__name__}: {_first_line(error)})") from None
    if "x" not in arrays or "y" not in arrays or ("x_test" in arrays) != ("y_test" in arrays):
        found = ", ".join(arrays) or "none"
        raise UserError(f"{file} has the keys {found}; it needs x and y, and optionally x_test with y_test")
    has_test = "x_test" in arrays
    for key in ("x", "x_test") if has_test else ("x",):
        a = arrays[key]
        if a.dtype.kind not in "biuf" or a.ndim < 2:
            raise UserError(f"{file}: {key} is {a.dtype} of shape {list(a.shape)}; it must be numeric (int, float "
                            f"or bool) of shape [N, features...]")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UserError(f"{file}: {key} contains NaN or infinite values")
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")) if has_test else (("x", "y"),):
        x, y = arrays[x_key], arrays[y_key]
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "biufUS":
            raise UserError(f"{file}: {y_key} is {y.dtype} of shape {list(y.shape)}; it must hold one int or string "
                            f"label per row of {x_key} ({len(x)})")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise UserError(f"{file}: {y_key} contains NaN or infinite labels")
    if has_test and arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
        raise UserError(f"{file}: x_test has examples of shape {list(arrays['x_test'].shape[1:])}, "
                        f"x of shape {list(arrays['x'].shape[1:])}; they must match")
    return make_dataset(name, arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"), device=device,
                        val_fraction=val_fraction, split_seed=split_seed, device_budget_gb=device_budget_gb,
                        test_fraction=test_fraction, standardize=standardize)


def load_csv(device: torch.device, path: str, label: str, features=None, name: str = "csv",
             test_fraction: float = 0.2, val_fraction: float = 0.1, split_seed: int = 0,
             device_budget_gb: float = 4.0, standardize: bool = True) -> Dataset:
    """A CSV file with a header row: the column `label` (ints or strings) and numeric features,
    the columns listed in `features` or else all the others, as [N, F]. A stratified
    `test_fraction` becomes the test split."""
    import pandas as pd

    file = _user_file("path", path)
    try:
        table = pd.read_csv(file)
    except pd.errors.EmptyDataError:
        raise UserError(f"dataset.path={str(path)!r} is empty; it needs a header row and data rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"dataset.path={str(path)!r} is not a readable CSV file "
                        f"({type(error).__name__}: {_first_line(error)})") from None
    columns = [str(c) for c in table.columns]
    table.columns = columns
    if all(_is_number(c) for c in columns):
        raise UserError(f"{file}: the first line ({', '.join(columns[:5])}...) holds numbers, not column names; "
                        f"a header row naming the columns is required")
    shown = ", ".join(columns)
    if not isinstance(label, str) or label not in columns:
        raise UserError(f"dataset.label={label!r} is not a column of {file}; its columns are {shown}")
    if features is None:
        features = [c for c in columns if c != label]
    else:
        features = [features] if isinstance(features, str) else list(features)
        unknown = [f for f in features if f not in columns]
        if unknown or not features or label in features:
            what = (f"{unknown[0]!r} is not a column" if unknown else "is empty" if not features
                    else f"includes the label column {label!r}")
            raise UserError(f"dataset.features={features} {what}; choose from the columns of {file}: {shown}")
    if not features:
        raise UserError(f"{file} has no feature column besides the label {label!r}")
    if table.empty:
        raise UserError(f"{file} has a header but no data rows")
    for column in [label, *features]:
        missing = table[column].isna().to_numpy()
        if missing.any():
            # line numbers of the file: the header is line 1
            raise UserError(f"{file}: column {column!r} is empty on line {np.argmax(missing) + 2}; every cell of "
                            f"the label and feature columns needs a value")
    for column in features:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            raise UserError(f"{file}: column {column!r}, line {row + 2}: {table[column].iloc[row]!r} is not a "
                            f"number; feature columns must be numeric (choose them with dataset.features)")
        table[column] = values
    x = table[features].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise UserError(f"{file}: the feature columns contain infinite values")
    return make_dataset(name, x, table[label].to_numpy(), device=device, val_fraction=val_fraction,
                        split_seed=split_seed, device_budget_gb=device_budget_gb, test_fraction=test_fraction,
                        standardize=standardize)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_imagefolder(device: torch.device, root: str, test_root: str | None = None, image_size=None,
                     name: str = "imagefolder", test_fraction: float = 0.2, val_fraction: float = 0.1,
                     split_seed: int = 0, device_budget_gb: float = 4.0, standardize: bool = False) -> Dataset:
    """Images in class folders (root/CLASS/IMAGE), read with `torchvision.datasets.ImageFolder`,
    as RGB [N, 3, H, W] in [0, 1]; classes are the folder names in sorted order.

    Args:
        root: the training images (and the test images, a stratified `test_fraction` of them,
            without `test_root`).
        test_root: the test images, in folders named like those under `root`.
        image_size: [H, W] to resize every image to (bilinear); without it all images must
            have the same size.
    """
    size = _image_size(image_size)
    train = _image_folder("root", root)
    x, y = _folder_pixels(train, size)
    x_test = y_test = None
    if test_root is not None:
        test = _image_folder("test_root", test_root)
        unknown = sorted(set(test.classes) - set(train.classes))
        if unknown:
            raise UserError(f"dataset.test_root={str(test_root)!r} has class folders that dataset.root lacks: "
                            f"{', '.join(unknown[:5])}; its folders must be among {', '.join(train.classes)}")
        x_test, test_labels = _folder_pixels(test, size)
        if x_test.shape[1:] != x.shape[1:]:
            raise UserError(f"images under dataset.root are {_hw(x.shape[1:])}, under dataset.test_root "
                            f"{_hw(x_test.shape[1:])}; set dataset.image_size=[H, W] to resize them all")
        x_test = _unit(x_test)
        y_test = np.array([train.class_to_idx[test.classes[i]] for i in test_labels], dtype=np.int64)
    return make_dataset(name, _unit(x), y, x_test, y_test, len(train.classes), device=device, val_fraction=val_fraction,
                        split_seed=split_seed, device_budget_gb=device_budget_gb, test_fraction=test_fraction,
                        standardize=standardize)


def _image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = [image_size] if isinstance(image_size, int) else image_size
    try:
        h, w = size
        positive_int("dataset.image_size", h)
        positive_int("dataset.image_size", w)
    except (TypeError, ValueError, UserError):
        raise UserError(f"dataset.image_size={image_size!r} is not allowed; it must be [H, W], two positive "
                        f"integers") from None
    return h, w


def _image_folder(key: str, root):
    from torchvision.datasets import ImageFolder

    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise UserError(f"dataset.{key}={root!r} is not allowed; it must be a folder of class folders of images")
    folder = os.path.expanduser(str(root))
    if not os.path.isdir(folder):
        raise UserError(f"dataset.{key}={str(root)!r} is not a folder; it must hold one folder of images per class")
    try:
        return ImageFolder(folder)
    except (FileNotFoundError, OSError) as error:  # no class folders, or no images in them
        raise UserError(f"dataset.{key}={str(root)!r}: {_first_line(error)}; it must hold one folder of images "
                        f"per class (e.g. {key}/cat/1.png)") from None


def _folder_pixels(folder, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """An ImageFolder's images as uint8 [N, 3, H, W] and its labels."""
    from PIL import UnidentifiedImageError

    def images():
        for path, _ in folder.samples:
            try:
                yield folder.loader(path), path  # RGB
            except (UnidentifiedImageError, OSError) as error:
                raise UserError(f"image {path} is unreadable ({_first_line(error)})") from None

    labels = np.array([label for _, label in folder.samples], dtype=np.int64)
    return _stack_images(images(), len(labels), size, folder.root), labels


def _stack_images(images: Iterable, count: int, size: tuple[int, int] | None, source) -> np.ndarray:
    """(PIL image, where) pairs -> uint8 [count, C, H, W], resized to `size` = (H, W) if given.

    Grey ("L") images give one channel, all others RGB; when both kinds occur, all become RGB.
    """
    from PIL import Image

    out, first = None, None
    for i, (image, where) in enumerate(images):
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        a = np.asarray(image) if image.mode == "L" else np.asarray(image.convert("RGB"))
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if out is None:
            out, first = np.empty((count, *a.shape), dtype=np.uint8), (where, a.shape)
        elif a.shape[1:] != out.shape[2:]:
            raise UserError(f"images under {source} differ in size: {first[0]} is {_hw(first[1])}, {where} is "
                            f"{_hw(a.shape)}; set dataset.image_size=[H, W] to resize them all")
        elif len(a) > out.shape[1]:  # the first colour image after grey ones
            out = out.repeat(len(a), axis=1)
        out[i] = a
    if out is None:
        raise UserError(f"{source} holds no images")
    return out


def _hw(chw: tuple[int, ...]) -> str:
    return f"{chw[1]}x{chw[2]} (HxW)"


def _unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1], as torchvision's ToTensor scales them."""
    return np.divide(pixels, 255, dtype=np.float32)


# Files a user must put under root when offline, for the classes people use most.
FILES = {
    "MNIST": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "FashionMNIST": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "KMNIST": "KMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "CIFAR10": "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
    "CIFAR100": "cifar-100-python/ (train, test, meta)",
    "SVHN": "train_32x32.mat and test_32x32.mat",
}
EXAMPLES = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100", "SVHN", "STL10")


def load_torchvision(device: torch.device, name: str, root: str, class_name: str | None = None,
                     download: bool = False, image_size=None, val_fraction: float = 0.1, split_seed: int = 0,
                     device_budget_gb: float = 4.0, standardize: bool = False) -> Dataset:
    """A class of `torchvision.datasets` with a train/test split, as [N, C, H, W] in [0, 1].

    Classes whose constructor takes `train=` (MNIST, CIFAR10...) or `split=` ("train"/"test":
    SVHN, STL10...) work. Classes that hold their images as one array are converted at once;
    the others are read image by image in RGB (then `image_size` [H, W] resizes them, and
    without it all images must share one size).

    Args:
        name: label of the dataset; also the class when `class_name` is not given.
        root: folder of the files, as torchvision lays them out.
        class_name: the torchvision.datasets class, matched ignoring case and underscores
            (fashion_mnist = FashionMNIST).
        download: let torchvision download missing files into `root`.
    """
    import torchvision

    wanted = name if class_name is None else class_name
    key = "dataset.name" if class_name is None else "dataset.class_name"
    classes = {c.replace("_", "").lower(): c for c in torchvision.datasets.__all__
               if inspect.isclass(getattr(torchvision.datasets, c))}
    found = classes.get(str(wanted).replace("_", "").lower())
    if found is None:
        raise UserError(f"{key}={wanted!r} is not a class of torchvision.datasets; e.g. {', '.join(EXAMPLES)}")
    cls = getattr(torchvision.datasets, found)
    params = inspect.signature(cls).parameters
    if "train" in params:
        splits = {"train": True}, {"train": False}
    elif "split" in params:
        splits = {"split": "train"}, {"split": "test"}
    else:
        raise UserError(f"torchvision.datasets.{found} takes neither train= nor split=; use dataset=imagefolder "
                        f"for its images")
    flag("dataset.download", download)
    extra = {"download": download} if "download" in params else {}
    folder = os.path.expanduser(str(root))
    try:
        train, test = (cls(folder, **split, **extra) for split in splits)
    except (RuntimeError, OSError) as error:
        hint = "download=true could not fetch them" if download else "download=false"
        files = FILES.get(found, f"the files torchvision.datasets.{found} reads")
        raise UserError(f"{found} files not found or unreadable under {folder} ({hint}: {_first_line(error)}); "
                        f"put {files} there, or set dataset.root=DIR") from None
    except Exception as error:  # noqa: BLE001 (corrupt files make the parsers raise all sorts of errors)
        raise UserError(f"{found} files under {folder} are corrupt or not what torchvision expects "
                        f"({type(error).__name__}: {_first_line(error)})") from None
    for split, ds in (("train", train), ("test", test)):  # a truncated or mismatched label file
        data, labels = getattr(ds, "data", None), getattr(ds, "targets", getattr(ds, "labels", None))
        if hasattr(data, "__len__") and hasattr(labels, "__len__") and len(data) != len(labels):
            raise UserError(f"{found} files under {folder}: the {split} split has {len(data)} images but "
                            f"{len(labels)} labels; the files are truncated or do not belong together "
                            f"(delete them and download again)")
    size = _image_size(image_size)
    (x, y), (x_test, y_test) = (_torchvision_arrays(d, size, found) for d in (train, test))
    if x.shape[1:] != x_test.shape[1:]:
        raise UserError(f"{found}: train images are {_hw(x.shape[1:])}, test images {_hw(x_test.shape[1:])}; "
                        f"set dataset.image_size=[H, W] to resize them all")
    num_classes = max(len(getattr(train, "classes", ())), int(max(y.max(initial=0), y_test.max(initial=0))) + 1)
    return make_dataset(name, _unit(x), y, _unit(x_test), y_test, num_classes, device=device,
                        val_fraction=val_fraction, split_seed=split_seed, device_budget_gb=device_budget_gb,
                        standardize=standardize)


def _torchvision_arrays(ds, size: tuple[int, int] | None, class_name: str) -> tuple[np.ndarray, np.ndarray]:
    """A torchvision dataset -> (uint8 images [N, C, H, W], int64 labels), the pixels its items hold.

    Classes that keep all images in one uint8 array ([N, H, W], [N, H, W, C] or [N, C, H, W])
    are converted at once, after checking that the first item holds the same pixels; the
    others are read item by item.
    """
    data = getattr(ds, "data", None)
    labels = getattr(ds, "targets", getattr(ds, "labels", None))
    data = data.numpy() if isinstance(data, torch.Tensor) else data
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if size is None and len(ds) and isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim in (3, 4) \
            and labels.ndim == 1 and len(labels) == len(data) == len(ds):
        if data.ndim == 3:  # MNIST-like [N, H, W]
            x = data[:, None]
        elif data.shape[1] in (1, 3) and data.shape[-1] not in (1, 3):  # SVHN, STL10: [N, C, H, W]
            x = data
        else:  # CIFAR: [N, H, W, C]
            x = data.transpose(0, 3, 1, 2)
        image, label = ds[0]
        if np.array_equal(_stack_images([(image, "item 0")], 1, None, class_name)[0], x[0]) and label == labels[0]:
            return x, labels.astype(np.int64)

    labels = []

    def images():
        for i in range(len(ds)):
            image, label = ds[i]
            labels.append(int(label))
            yield image, f"item {i}"

    x = _stack_images(images(), len(ds), size, f"torchvision.datasets.{class_name}")
    return x, np.array(labels, dtype=np.int64)


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
