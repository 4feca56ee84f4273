#!/usr/bin/env python
"""dropbench speed benchmark, in one process: prints a table and writes results/bench/*.csv.

    python scripts/bench.py            # full run: about 2-3 minutes on a quiet 2-core CPU
    python scripts/bench.py --quick    # smoke test with small sizes, under 30 s
    python scripts/bench.py --out DIR  # write the CSV files to DIR instead of results/bench

Sections (see docs/speed_section.md for what each figure means):
  epoch     per-epoch training time of the d2l dropout setup (FashionMNIST-shaped data, MLP
            784-256-256-10, dropout 0.2/0.5, SGD lr 0.5, batch 256) through dropbench's training
            path vs the textbook loop (torchvision dataset + ToTensor + DataLoader + nn.Sequential),
            epochs interleaved A/B; plus achieved matmul FLOP/s / peak fp32 mm FLOP/s
  seeds     MNIST-1D default config: parallel_seeds=8 vs one single run vs 8 sequential single
            runs (dropbench.train.train_job), and replica k's metrics vs the single run with seed k
  startup   wall time of `dropbench --help/list/report` and `python -c "import torch"`,
            and whether the dropbench commands import torch
  ablation  (full run only) the hot-path changes of dropbench.replicas, each against the code it
            replaced, interleaved in 20-step chunks
The real FashionMNIST files are used when they are under $DROPBENCH_DATA (default
~/.cache/dropbench/data); otherwise random uint8 images are written once, in the real gzip'd IDX
format, under $DROPBENCH_CACHE/bench (default ~/.cache/dropbench/bench) and read through
torchvision's own FashionMNIST class.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from dropbench import train as dropbench_train  # noqa: E402
from dropbench.data import load_torchvision  # noqa: E402
from dropbench.models import MLP  # noqa: E402
from dropbench.regularizers import build_regularizers  # noqa: E402
from dropbench.results import read_csv_rows, write_csv  # noqa: E402
from dropbench.replicas import ReplicaRNG, gather_rows  # noqa: E402

D2L_HIDDEN = (256, 256)
D2L_P = (0.2, 0.5)
D2L_LR = 0.5
D2L_BATCH = 256
SUMMARY_COLUMNS = ["section", "metric", "value", "unit", "target", "met", "note"]


# ----------------------------------------------------------------------------------------------
# machine and load
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class LoadMeter:
    """CPU time used by *other* processes while a block runs, in cores (Linux /proc; else None)."""

    def __init__(self):
        self.samples: list[float] = []

    @staticmethod
    def _read():
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            total_busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # minus idle, iowait
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            return total_busy, sum(int(v) for v in own[11:15]), time.perf_counter()  # self + waited-for children
        except (OSError, ValueError, IndexError):
            return None

    @contextmanager
    def measure(self):
        a = self._read()
        yield
        b = self._read()
        if a and b and b[2] > a[2]:
            ticks = os.sysconf("SC_CLK_TCK")
            self.samples.append(max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / ticks / (b[2] - a[2])))

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


LOAD = LoadMeter()


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------
# data: real FashionMNIST if present, else random images in the real gzip'd IDX format
# ----------------------------------------------------------------------------------------------
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def real_fashion_root() -> Path | None:
    root = Path(os.path.expanduser(os.environ.get("DROPBENCH_DATA", "~/.cache/dropbench/data")))
    raw = root / "FashionMNIST" / "raw"
    return root if all((raw / f).is_file() for f in FILES) else None


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    """IDX (LeCun's MNIST format): 0x0000, type 0x08 (ubyte), ndim, big-endian int32 sizes, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header)
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def synthetic_fashion_root(n_train: int, n_test: int) -> Path:
    """A torchvision root whose FashionMNIST/raw holds random images: the .gz files as published,
    unpacked with torchvision's own extract_archive as its download() leaves them. Made once per
    size (atomically: built in a temporary directory, then renamed)."""
    from torchvision.datasets.utils import extract_archive

    base = Path(os.path.expanduser(os.environ.get("DROPBENCH_CACHE", "~/.cache/dropbench"))) / "bench"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        base = Path(tempfile.gettempdir()) / "dropbench-bench"
        base.mkdir(parents=True, exist_ok=True)
    root = base / f"fashion_mnist_random_{n_train}_{n_test}"
    if all((root / "FashionMNIST" / "raw" / f).is_file() for f in FILES):
        return root
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{root.name}."))
    try:
        raw = tmp / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        rng = np.random.default_rng(0)
        arrays = {
            "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
        }
        for name, array in arrays.items():
            _write_idx_gz(raw / f"{name}.gz", array)
            extract_archive(str(raw / f"{name}.gz"), str(raw))
        try:
            os.replace(tmp, root)
        except OSError:  # another process made it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------
# 1. per-epoch time: dropbench vs the textbook loop
# ----------------------------------------------------------------------------------------------
def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="dropbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def d2l_config(root: Path):
    return compose_config([
        "dataset=fashion_mnist", f"dataset.root={root}", "dataset.download=false", "model=mlp",
        f"model.hidden=[{D2L_HIDDEN[0]},{D2L_HIDDEN[1]}]", "model.init=normal", "model.init_std=0.01",
        "regularizer=dropout", f"regularizer.p=[{D2L_P[0]},{D2L_P[1]}]", "optimizer=sgd", f"optimizer.lr={D2L_LR}",
        f"batch_size={D2L_BATCH}", "device=cpu",
    ])


class DropbenchSetup:
    """The objects dropbench.train builds for the d2l config, on the CPU."""

    def __init__(self, root: Path, seed: int = 0, replicas: int = 1):
        from hydra.utils import instantiate

        self.cfg = cfg = d2l_config(root)
        device = torch.device("cpu")
        self.data = load_torchvision(device, "fashion_mnist", str(root), download=False)
        self.rng = ReplicaRNG([seed + k for k in range(replicas)], device)
        self.regs = build_regularizers(cfg.regularizer)
        self.model = MLP(self.data.in_shape, self.data.num_classes, self.regs, self.rng, hidden=list(cfg.model.hidden),
                         activation=cfg.model.activation, init=cfg.model.init, init_std=cfg.model.init_std).to(device)
        self.regs.check_model(self.model)
        self.optimizer = instantiate({k: v for k, v in cfg.optimizer.items() if k != "name"},
                                     params=self.model.parameters())
        self.batch_size = cfg.batch_size

    def epoch(self, max_steps: int | None = None, start_step: int = 0) -> torch.Tensor:
        return dropbench_epoch(self.data, self.model, self.regs, self.optimizer, self.rng, self.batch_size,
                               max_steps, start_step)


def dropbench_epoch(data, model, regs, optimizer, rng, batch_size, max_steps=None, start_step=0):
    """One training epoch exactly as dropbench.train runs it: train.train_epoch when train.py
    exposes it, else the inner loop of train._fit copied verbatim (the batch gather uses
    replicas.gather_rows, the faster equivalent of data.x_train[idx], when train.py does)."""
    fn = getattr(dropbench_train, "train_epoch", None)
    if fn is not None and max_steps is None:
        return fn(data, model, regs, optimizer, rng, batch_size)
    R, n, B = rng.replicas, len(data.x_train), batch_size
    model.train()
    epoch_loss = torch.zeros(R, device=data.x_train.device)
    order = rng.permutations(n)
    for i, start in enumerate(range(start_step * B, n, B)):
        if max_steps is not None and i >= max_steps:
            break
        idx = order[:, start:start + B]
        loss = regs.loss(model, GATHER(data.x_train, idx), GATHER(data.y_train, idx))
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # replicas are independent: d(sum)/d(loss_r) = 1
        optimizer.step()
        regs.after_step(model)
        epoch_loss += loss.detach()
    return epoch_loss


def _train_py_gathers_with_gather_rows() -> bool:
    try:
        import inspect

        return "gather_rows" in inspect.getsource(dropbench_train)
    except (OSError, TypeError):
        return False


def _index_gather(x, idx):
    return x[idx]


GATHER = gather_rows if _train_py_gathers_with_gather_rows() else _index_gather


class TextbookSetup:
    """The d2l dropout chapter (concise implementation), run as train_epoch_ch3 runs it."""

    def __init__(self, root: Path, seed: int = 0):
        from torch import nn
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        torch.manual_seed(seed)
        train = datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor(), download=False)
        self.train_iter = DataLoader(train, batch_size=D2L_BATCH, shuffle=True)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, D2L_HIDDEN[0]), nn.ReLU(), nn.Dropout(D2L_P[0]),
                                 nn.Linear(D2L_HIDDEN[0], D2L_HIDDEN[1]), nn.ReLU(), nn.Dropout(D2L_P[1]),
                                 nn.Linear(D2L_HIDDEN[1], 10))

        def init_weights(m):
            if type(m) is nn.Linear:
                nn.init.normal_(m.weight, std=0.01)

        self.net.apply(init_weights)
        self.loss = nn.CrossEntropyLoss(reduction="none")
        self.trainer = torch.optim.SGD(self.net.parameters(), lr=D2L_LR)

    def epoch(self, max_steps: int | None = None):
        self.net.train()
        metric = [0.0, 0.0, 0]  # d2l.Accumulator(3): loss sum, correct, count
        for i, (X, y) in enumerate(self.train_iter):
            if max_steps is not None and i >= max_steps:
                break
            y_hat = self.net(X)
            l = self.loss(y_hat, y)
            self.trainer.zero_grad()
            l.mean().backward()
            self.trainer.step()
            metric[0] += float(l.sum().detach())
            metric[1] += float((y_hat.argmax(axis=1).type(y.dtype) == y).type(y.dtype).sum())
            metric[2] += y.numel()
        return metric[0] / max(metric[2], 1), metric[1] / max(metric[2], 1)


def train_flops_per_sample(widths: list[int]) -> int:
    """Matmul FLOPs of one training example through Linear layers widths[0] -> ... -> widths[-1]:
    forward 2*in*out, backward 2*in*out for the weight gradient and 2*in*out for the input
    gradient except at the first layer (the input needs no gradient)."""
    total = 0
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        total += 2 * a * b * (2 if i == 0 else 3)
    return total


def peak_mm_flops(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def matmul_only_epoch(n: int, widths: list[int], batch: int, repeats: int) -> float:
    """Seconds for just the matmuls of one dropbench epoch (the same mm/addmm calls and shapes as
    replicas.ReplicaLinear with R = 1), best of `repeats`: the floor the epoch time could reach."""
    layers = [(torch.randn(b, a), torch.randn(b)) for a, b in zip(widths[:-1], widths[1:])]
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])

    def one_epoch():
        for B in sizes:
            acts = [torch.randn(B, widths[0])]
            for w, b in layers:
                acts.append(torch.addmm(b, acts[-1], w.t()))
            for i in reversed(range(len(layers))):
                g = acts[i + 1]
                torch.mm(g.t(), acts[i])  # weight gradient, in the weight's layout
                if i > 0:
                    torch.mm(g, layers[i][0])  # input gradient

    # the random inputs are part of the loop above; time them separately and subtract
    def inputs_only():
        for B in sizes:
            torch.randn(B, widths[0])

    best, best_inputs = math.inf, math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        one_epoch()
        best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        inputs_only()
        best_inputs = min(best_inputs, time.perf_counter() - t)
    return max(best - best_inputs, 1e-9)


def _dropout_folds_scale() -> bool:
    import inspect

    from dropbench.regularizers import dropout

    try:
        return "1.0 / keep)" in inspect.getsource(dropout.DropoutLayer.forward).split("keep_mask(", 1)[-1]
    except (OSError, TypeError):
        return False


@contextmanager
def proposed_patches():
    """The train.py / dropout.py changes proposed in docs/speed_section.md, applied in-process:
    batches gathered with replicas.gather_rows, dropout scale folded into the mask."""
    global GATHER
    from dropbench.regularizers import dropout

    saved = GATHER, dropout.DropoutLayer.forward
    GATHER = gather_rows
    if not _dropout_folds_scale():
        dropout.DropoutLayer.forward = _dropout_forward_folded
    try:
        yield
    finally:
        GATHER, dropout.DropoutLayer.forward = saved


def bench_epochs(args, threads: int, summary: list, console) -> list[dict]:
    real = None if args.quick else real_fashion_root()
    n_train, n_test = (6000, 1000) if args.quick else (60000, 10000)
    root = real or synthetic_fashion_root(n_train, n_test)
    data_note = "real FashionMNIST" if real else f"random uint8 images in IDX files ({n_train} train)"
    console.print(f"[bold]epoch[/]: d2l setup on {data_note}, {threads} threads")
    patched_already = GATHER is gather_rows and _dropout_folds_scale()
    sides = {"dropbench": DropbenchSetup(root)}
    if not patched_already:
        with proposed_patches():
            sides["dropbench+patches"] = DropbenchSetup(root)
    sides["textbook"] = TextbookSetup(root)
    n = len(sides["dropbench"].data.x_train)

    def run(side, **kw):
        if side == "dropbench+patches":
            with proposed_patches():
                return sides[side].epoch(**kw)
        return sides[side].epoch(**kw)

    for side in sides:  # warm-up: allocator, MKL, DataLoader
        run(side, max_steps=5 if side == "textbook" else 20)
    rows, times = [], {side: [] for side in sides}
    names = list(sides)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for side in order:
            with LOAD.measure():
                t = time.perf_counter()
                run(side)
                dt = time.perf_counter() - t
            times[side].append(dt)
            rows.append({"side": side, "round": r, "seconds": round(dt, 6), "threads": threads, "images": n})
    t_db, t_tb = times["dropbench"], times["textbook"]
    pair_ratios = [b / a for a, b in zip(t_db, t_tb)]
    ratio = med(t_tb) / med(t_db)
    epoch_fn = "train.train_epoch" if hasattr(dropbench_train, "train_epoch") else "copy of train._fit's loop"
    summary += [
        {"section": "epoch", "metric": "dropbench_epoch_s_median", "value": med(t_db), "unit": "s",
         "note": f"{epoch_fn}, code as it is; min {min(t_db):.3f}; {data_note}"},
    ]
    if "dropbench+patches" in times:
        t_p = times["dropbench+patches"]
        summary += [
            {"section": "epoch", "metric": "dropbench_patched_epoch_s_median", "value": med(t_p), "unit": "s",
             "note": f"with the proposed train.py/dropout.py patches; min {min(t_p):.3f}; "
                     f"{med(t_db) / med(t_p):.3f}x the code as it is"},
        ]
    summary += [
        {"section": "epoch", "metric": "textbook_epoch_s_median", "value": med(t_tb), "unit": "s",
         "note": f"DataLoader+ToTensor+nn.Sequential; min {min(t_tb):.3f}"},
        {"section": "epoch", "metric": "speedup_textbook_over_dropbench", "value": ratio, "unit": "x",
         "target": ">= 8", "met": ratio >= 8,
         "note": f"ratio of medians; per-pair ratios median {med(pair_ratios):.2f}"},
    ]
    if "dropbench+patches" in times:
        pr = med(t_tb) / med(times["dropbench+patches"])
        summary.append({"section": "epoch", "metric": "speedup_textbook_over_dropbench_patched", "value": pr,
                        "unit": "x", "target": ">= 8", "met": pr >= 8, "note": "ratio of medians"})
    best_side = min((s for s in times if s != "textbook"), key=lambda s: med(times[s]))
    t_best = times[best_side]

    # 2. hardware efficiency, of the faster dropbench side
    widths = [784, *D2L_HIDDEN, 10]
    flops = train_flops_per_sample(widths) * n
    peak = max(peak_mm_flops(args.peak_n, 5), peak_mm_flops(args.peak_n, 5))
    mm_only = matmul_only_epoch(n, widths, D2L_BATCH, 2 if args.quick else 3)
    peak = max(peak, peak_mm_flops(args.peak_n, 5))
    achieved, best_achieved = flops / med(t_best), flops / min(t_best)
    eff = achieved / peak
    summary += [
        {"section": "efficiency", "metric": "epoch_matmul_gflop", "value": flops / 1e9, "unit": "GFLOP",
         "note": f"{train_flops_per_sample(widths)} FLOP/example x {n}"},
        {"section": "efficiency", "metric": "peak_fp32_mm_gflops", "value": peak / 1e9, "unit": "GFLOP/s",
         "note": f"torch.mm {args.peak_n}^2, best of 15, {threads} threads"},
        {"section": "efficiency", "metric": "achieved_gflops", "value": achieved / 1e9, "unit": "GFLOP/s",
         "note": f"{best_side}, median epoch; best epoch {best_achieved / 1e9:.1f}"},
        {"section": "efficiency", "metric": "fraction_of_peak", "value": eff, "unit": "",
         "target": ">= 0.5", "met": eff >= 0.5, "note": f"best epoch {best_achieved / peak:.2f}"},
        {"section": "efficiency", "metric": "matmul_only_epoch_s", "value": mm_only, "unit": "s",
         "note": f"the epoch's mm/addmm calls alone: {flops / mm_only / 1e9:.1f} GFLOP/s = "
                 f"{flops / mm_only / peak:.2f} of peak; non-matmul share of the {best_side} epoch "
                 f"{1 - mm_only / med(t_best):.2f}"},
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# 3. seeds in parallel (MNIST-1D default config through train_job)
# ----------------------------------------------------------------------------------------------
JOB_OVERRIDES: list[str] = []  # threads=N when --threads is given


def run_job(tmp: Path, name: str, overrides: list[str]) -> tuple[float, Path]:
    cfg = compose_config(["device=cpu", "progress=false", f"results_dir={tmp / name / 'results'}", *JOB_OVERRIDES,
                          *overrides])
    out = tmp / name / "run"
    with LOAD.measure():
        t = time.perf_counter()
        result = dropbench_train.train_job(cfg, out, False)
        wall = time.perf_counter() - t
    status = getattr(result, "status", result)
    if status != "ok":
        raise RuntimeError(f"bench run {name} ended {status!r} (see {out})")
    return wall, Path(getattr(result, "run_dir", out))


METRIC_KEYS = ("loss", "accuracy", "entropy")


def read_metrics(path: Path) -> dict:
    rows = read_csv_rows(path) or []
    return {(r["epoch"], r["split"]): [float(r[k]) for k in METRIC_KEYS] for r in rows}


def metrics_diff(a: dict, b: dict) -> float:
    if not a or a.keys() != b.keys():
        return math.inf
    return max(abs(x - y) for key in a for x, y in zip(a[key], b[key]))


def train_seconds(path: Path) -> float:
    rows = read_csv_rows(path) or []
    return sum(float(r["seconds"]) for r in rows if r["split"] == "train")


def bench_seeds(args, summary: list, console) -> list[dict]:
    K = 8
    epochs = 2 if args.quick else 5
    base = [f"epochs={epochs}"]
    console.print(f"[bold]seeds[/]: MNIST-1D default config, {epochs} epochs, parallel_seeds={K} vs single runs")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        tmp = Path(tmpdir)
        run_job(tmp, "warmup", ["epochs=1", "seed=100"])  # data cache, imports, allocator
        singles, parallel, par_dir = [], [], None
        for r in range(args.seed_repeats):
            for kind in (("single", "parallel") if r % 2 == 0 else ("parallel", "single")):
                if kind == "single":
                    wall, out = run_job(tmp, f"single_r{r}", [*base, "seed=0"])
                    singles.append(wall)
                    rows.append({"kind": "single", "seeds": 1, "round": r, "wall_seconds": round(wall, 4),
                                 "train_seconds": round(train_seconds(out / "metrics.csv"), 4)})
                else:
                    wall, par_dir = run_job(tmp, f"parallel_r{r}", [*base, "seed=0", f"parallel_seeds={K}"])
                    parallel.append(wall)
                    rows.append({"kind": "parallel", "seeds": K, "round": r, "wall_seconds": round(wall, 4),
                                 "train_seconds": round(train_seconds(par_dir / "seed_0" / "metrics.csv"), 4)})
        # sequential single runs of every seed (all 8 in a full run; seeds 0 and K-1 with --quick)
        check_seeds = [0, K - 1] if args.quick else list(range(K))
        diffs, seq = {}, []
        for s in check_seeds:
            wall, out = run_job(tmp, f"seq_seed{s}", [*base, f"seed={s}"])
            seq.append(wall)
            rows.append({"kind": "sequential", "seeds": 1, "round": s, "wall_seconds": round(wall, 4),
                         "train_seconds": round(train_seconds(out / "metrics.csv"), 4)})
            diffs[s] = metrics_diff(read_metrics(par_dir / f"seed_{s}" / "metrics.csv"), read_metrics(out / "metrics.csv"))
        # the same check with dropout, so that the per-replica masks are compared too
        Kd = 2 if args.quick else 3
        drop = [f"epochs={1 if args.quick else 2}", "regularizer=dropout", "regularizer.p=0.5", "regularizer.input_p=0.1"]
        _, dpar = run_job(tmp, "dropout_parallel", [*drop, "seed=0", f"parallel_seeds={Kd}"])
        ddiffs = {}
        for s in range(Kd):
            _, dout = run_job(tmp, f"dropout_seed{s}", [*drop, f"seed={s}"])
            ddiffs[s] = metrics_diff(read_metrics(dpar / f"seed_{s}" / "metrics.csv"), read_metrics(dout / "metrics.csv"))
    single, par = med(singles), med(parallel)
    seq_total = sum(seq) if len(seq) == K else K * single
    max_diff, max_ddiff = max(diffs.values()), max(ddiffs.values())
    summary += [
        {"section": "seeds", "metric": "single_run_s_median", "value": single, "unit": "s",
         "note": f"train_job wall, {epochs} epochs (data load, model, training, evaluation, files)"},
        {"section": "seeds", "metric": f"parallel_seeds_{K}_s_median", "value": par, "unit": "s"},
        {"section": "seeds", "metric": f"parallel_{K}_over_single", "value": par / single, "unit": "x",
         "target": "<= 2", "met": par / single <= 2},
        {"section": "seeds", "metric": f"sequential_{K}_s", "value": seq_total, "unit": "s",
         "note": "measured" if len(seq) == K else f"{K} x single run (--quick runs only seeds {check_seeds})"},
        {"section": "seeds", "metric": f"speedup_parallel_over_sequential_{K}", "value": seq_total / par, "unit": "x"},
        {"section": "seeds", "metric": "replica_vs_single_max_abs_diff", "value": max_diff, "unit": "",
         "target": "0", "met": max_diff == 0, "note": f"loss/accuracy/entropy, every epoch and split, seeds {check_seeds}"},
        {"section": "seeds", "metric": "replica_vs_single_max_abs_diff_dropout", "value": max_ddiff, "unit": "",
         "target": "0", "met": max_ddiff == 0, "note": f"regularizer=dropout p=0.5 input_p=0.1, parallel_seeds={Kd}"},
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# 4. start-up
# ----------------------------------------------------------------------------------------------
_PROBE = """
import sys
args, marker = sys.argv[2:], sys.argv[1]
sys.argv = ["dropbench", *args]
code = 0
try:
    from dropbench.cli import main
    main(args)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    with open(marker, "w") as f:
        f.write("1" if "torch" in sys.modules else "0")
sys.exit(code)
"""


def dropbench_command() -> list[str]:
    exe = Path(sys.executable).with_name("dropbench")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dropbench.cli"]


def bench_startup(args, summary: list, console) -> list[dict]:
    console.print("[bold]startup[/]: subprocess wall times")
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        empty = Path(tmpdir) / "empty"
        empty.mkdir()
        commands = {
            "dropbench --help": dropbench_command() + ["--help"],
            "dropbench list": dropbench_command() + ["list"],
            "dropbench report <empty dir>": dropbench_command() + ["report", str(empty), "--out", str(Path(tmpdir) / "rep")],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
        }
        times = {name: [] for name in commands}
        codes = {}
        for r in range(args.startup_repeats):
            for name, cmd in commands.items():
                with LOAD.measure():
                    t = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmpdir)
                    times[name].append(time.perf_counter() - t)
                codes[name] = (proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1][:120])
        torch_imported = {}
        for name, cmd_args in (("dropbench --help", ["--help"]), ("dropbench list", ["list"]),
                               ("dropbench report <empty dir>", ["report", str(empty), "--out", str(Path(tmpdir) / "rep2")])):
            marker = Path(tmpdir) / "marker"
            subprocess.run([sys.executable, "-c", _PROBE, str(marker), *cmd_args], capture_output=True, env=env, cwd=tmpdir)
            torch_imported[name] = marker.read_text() == "1" if marker.exists() else None
    for name in commands:
        code, last = codes[name]
        imported = torch_imported.get(name)
        for r, t in enumerate(times[name]):
            rows.append({"command": name, "round": r, "seconds": round(t, 4), "exit_code": code,
                         "imports_torch": "" if imported is None else imported})
        note = f"exit {code}" + (f": {last}" if code else "")
        if name in torch_imported:
            note += "; imports torch: " + ("?" if imported is None else "yes" if imported else "no")
        summary.append({"section": "startup", "metric": name, "value": med(times[name]), "unit": "s",
                        "target": "no torch import" if name in torch_imported else "",
                        "met": (imported is False) if name in torch_imported else "", "note": note})
    return rows


# ----------------------------------------------------------------------------------------------
# 5. ablation: each hot-path change against the code it replaced
# ----------------------------------------------------------------------------------------------
def _legacy_linear_forward(self, x):
    """ReplicaLinear.forward before: one baddbmm over R (autograd's backward; dW copied into W's layout)."""
    if self.bias is None:
        return torch.bmm(x, self.weight.transpose(1, 2))
    return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


def _legacy_keep_mask(self, shape, keep, scale=1.0):
    """ReplicaRNG.keep_mask before: one float32 uniform per unit, stacked, compared, converted."""
    m = (torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.train]) < keep).to(torch.float32)
    return m if scale == 1.0 else m * scale


def _dropout_forward_folded(self, x):
    """DropoutLayer.forward with the proposed dropout.py patch: one multiplication by a scaled mask."""
    if not self.training or self.p == 0.0:
        return x
    if self.impl == "torch":
        import torch.nn.functional as F

        return F.dropout(x, self.p, training=True)
    keep = 1.0 - self.p
    return x * self.rng.keep_mask(tuple(x.shape[1:]), keep, 1.0 / keep)


def bench_ablation(args, summary: list, console) -> list[dict]:
    """Per-step time of the d2l epoch with each change switched on alone and all together,
    interleaved in 20-step chunks; and the K=8 MNIST-1D step with batched vs per-replica matmuls."""
    from dropbench import replicas
    from dropbench.regularizers import dropout

    global GATHER
    console.print("[bold]ablation[/]: hot-path changes, interleaved 20-step chunks")
    root = synthetic_fashion_root(60000, 10000) if real_fashion_root() is None else real_fashion_root()
    new_forward, new_mask = replicas.ReplicaLinear.forward, replicas.ReplicaRNG.keep_mask
    old_dropout = dropout.DropoutLayer.forward
    variants = {
        "before (all legacy)": dict(),
        "+ per-replica mm linear": dict(linear=True),
        "+ 16-bit masks": dict(mask=True),
        "+ 16-bit masks, scale folded (dropout.py patch)": dict(mask=True, fold=True),
        "+ gather_rows (train.py patch)": dict(gather=True),
        "all": dict(linear=True, mask=True, fold=True, gather=True),
    }

    def switch(v):
        global GATHER
        replicas.ReplicaLinear.forward = new_forward if v.get("linear") else _legacy_linear_forward
        replicas.ReplicaRNG.keep_mask = new_mask if v.get("mask") else _legacy_keep_mask
        dropout.DropoutLayer.forward = _dropout_forward_folded if v.get("fold") else old_dropout
        GATHER = gather_rows if v.get("gather") else _index_gather

    saved_gather = GATHER
    rows = []
    try:
        setups = {}
        for name, v in variants.items():
            switch(v)
            setups[name] = DropbenchSetup(root)
            setups[name].epoch(max_steps=10)
        steps, times = 20, {name: [] for name in variants}
        for r in range(args.ablation_rounds):
            for name, v in variants.items():
                switch(v)
                with LOAD.measure():
                    t = time.perf_counter()
                    setups[name].epoch(max_steps=steps, start_step=(r * steps) % 200)
                    times[name].append((time.perf_counter() - t) / steps)
        base = med(times["before (all legacy)"])
        for name in variants:
            m = med(times[name])
            rows.append({"case": "d2l R=1 step", "variant": name, "ms_per_step_median": round(m * 1e3, 4),
                         "ms_per_step_min": round(min(times[name]) * 1e3, 4), "speedup_vs_before": round(base / m, 4)})
        summary.append({"section": "ablation", "metric": "d2l_step_speedup_all_vs_before",
                        "value": base / med(times["all"]), "unit": "x", "note": "median per-step time ratio"})

        # K=8 MNIST-1D-shaped step: batched baddbmm (legacy) vs per-replica mm
        x, y = torch.randn(4000, 1, 40), torch.randint(0, 10, (4000,))
        regs = build_regularizers(compose_config([]).regularizer)
        cases = {}
        for name, fwd in (("batched baddbmm (legacy)", _legacy_linear_forward), ("per-replica mm", new_forward)):
            for R in (1, 8):
                rng = ReplicaRNG(list(range(R)), torch.device("cpu"))
                model = MLP((1, 40), 10, regs, rng, hidden=[100, 100])
                cases[(name, R)] = (fwd, rng, model, torch.optim.Adam(model.parameters(), lr=1e-3))
        ktimes = {key: [] for key in cases}
        for r in range(args.ablation_rounds):
            for key, (fwd, rng, model, opt) in cases.items():
                replicas.ReplicaLinear.forward = fwd
                order = rng.permutations(4000)
                t = time.perf_counter()
                for s in range(31):
                    idx = order[:, s * 128:(s + 1) * 128]
                    loss = regs.loss(model, gather_rows(x, idx), gather_rows(y, idx))
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()
                    opt.step()
                ktimes[key].append((time.perf_counter() - t) / 31)
        for (name, R), ts in ktimes.items():
            rows.append({"case": f"MNIST-1D R={R} step", "variant": name, "ms_per_step_median": round(med(ts) * 1e3, 4),
                         "ms_per_step_min": round(min(ts) * 1e3, 4),
                         "speedup_vs_before": round(med(ktimes[("batched baddbmm (legacy)", R)]) / med(ts), 4)})
    finally:
        switch(dict(linear=True, mask=True))
        dropout.DropoutLayer.forward = old_dropout
        GATHER = saved_gather
    return rows


# ----------------------------------------------------------------------------------------------
def print_summary(console, summary: list, threads: int, args):
    from rich.table import Table

    table = Table(title=f"dropbench benchmark ({'quick' if args.quick else 'full'}) - {cpu_model()}, "
                        f"{os.cpu_count()} logical CPUs, {threads} torch threads")
    for col in ("section", "metric", "value", "unit", "target", "met", "note"):
        table.add_column(col, overflow="fold", max_width=60 if col == "note" else None)
    for row in summary:
        v = row["value"]
        if row["section"] == "startup" and len(row.get("note", "")) > 60:
            row = {**row, "note": row["note"][:57] + "..."}
        value = f"{v:.4g}" if isinstance(v, float) else str(v)
        met = row.get("met", "")
        met = "[green]yes[/]" if met is True else "[red]no[/]" if met is False else str(met)
        table.add_row(row["section"], row["metric"], value, row.get("unit", ""), row.get("target", ""), met,
                      row.get("note", ""))
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test in < 30 s")
    parser.add_argument("--out", default=str(REPO / "results" / "bench"), help="directory for the CSV files")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as dropbench, all cores)")
    parser.add_argument("--sections", default=None,
                        help="comma-separated subset of epoch,seeds,startup,ablation (default: all; no ablation with --quick)")
    args = parser.parse_args(argv)
    args.repeats = 2 if args.quick else 7
    args.seed_repeats = 1 if args.quick else 3
    args.startup_repeats = 2 if args.quick else 7
    args.ablation_rounds = 4 if args.quick else 15
    args.peak_n = 1024 if args.quick else 2048
    sections = (args.sections.split(",") if args.sections else
                ["epoch", "seeds", "startup"] + ([] if args.quick else ["ablation"]))

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    threads = args.threads or dropbench_train.threads_for_job("auto", 1)
    if args.threads:
        JOB_OVERRIDES.append(f"threads={args.threads}")
    torch.set_num_threads(threads)
    out = Path(args.out)
    summary: list[dict] = []
    t0 = time.perf_counter()
    written = []
    for section, fn, columns in (
        ("epoch", bench_epochs, ["side", "round", "seconds", "threads", "images"]),
        ("seeds", bench_seeds, ["kind", "seeds", "round", "wall_seconds", "train_seconds"]),
        ("startup", bench_startup, ["command", "round", "seconds", "exit_code", "imports_torch"]),
        ("ablation", bench_ablation, ["case", "variant", "ms_per_step_median", "ms_per_step_min", "speedup_vs_before"]),
    ):
        if section not in sections:
            continue
        rows = fn(args, summary, console) if section != "epoch" else fn(args, threads, summary, console)
        torch.set_num_threads(threads)  # train_job sets its own
        write_csv(out / f"{section}.csv", rows, columns)
        written.append(f"{section}.csv")
    load = LOAD.mean
    summary.append({"section": "machine", "metric": "background_load_cores", "value": load if load is not None else "",
                    "unit": "cores", "target": "~0",
                    "note": f"CPU used by other processes while timing (of {os.cpu_count()}); above ~0.2 the "
                            "timings are unreliable. torch " + torch.__version__ + f", {cpu_model()}, "
                            f"{threads} threads, bench {time.perf_counter() - t0:.0f} s"})
    for row in summary:
        row["value"] = round(row["value"], 6) if isinstance(row["value"], float) else row["value"]
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    print_summary(console, summary, threads, args)
    if load is not None and load > 0.2:
        console.print(f"[yellow]warning: other processes used {load:.2f} cores on average while timing; "
                      "the figures are not reliable[/]")
    console.print(f"wrote {', '.join(written + ['summary.csv'])} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
