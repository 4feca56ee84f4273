#!/usr/bin/env python
"""dropbench speed benchmark, in one run: prints a table and writes results/bench/*.csv.

    python scripts/bench.py                  # full run (a few minutes on a quiet 2-core CPU)
    python scripts/bench.py --quick          # smoke test with small sizes
    python scripts/bench.py --out DIR        # write the CSV files to DIR instead of results/bench
    python scripts/bench.py --sections epoch,seeds --threads 1   # a subset; torch threads

Sections (docs/speed.md says what each figure means). Everything but `gpu` runs on the CPU;
`jobs` runs on the GPU where there is one.
  epoch     one training epoch of the d2l dropout setup (conf/experiment/d2l_dropout.yaml: MLP
            784-256-256-10, dropout 0.2/0.5, SGD lr 0.5, batch 256) on FashionMNIST-shaped data,
            dropbench (train.build_run + train.train_epoch) vs the textbook loop (torchvision
            dataset + ToTensor + DataLoader + nn.Sequential), epochs interleaved; and, as section
            "efficiency", the epoch's matmul FLOP/s as a fraction of peak fp32 torch.mm FLOP/s
  seeds     MNIST-1D default config through runs.train_job: parallel_seeds=8 vs one single run vs
            8 sequential single runs, and how far replica k's final losses are from the single
            run with seed k (default config, then with dropout); the hand-written batched loop
            (scripts/batched_mlps.py) with 8 models vs 1 as what batching alone reaches
  plain     three seeds of the MNIST-1D MLP recipe (6,000 steps of batch 100, Adam lr 1e-2,
            evaluation every epoch) as `dropbench train parallel_seeds=3` vs one seed of a plain
            PyTorch loop vs three seeds of the hand-written batched loop, whole processes,
            run interleaved
  startup   wall time of `dropbench --help/list/report` and `python -c "import torch"`, and
            whether the dropbench commands import torch
  replicas  the K=8 MNIST-1D training step through Replicas (vmap over stacked parameters) vs
            8 separate copies of the model stepped one after another, interleaved
  gpu       (with a CUDA GPU only) the MNIST-1D recipe run, the d2l epoch, parallel_seeds=64
            model-steps/s against a hand-written CUDA-graph loop, and peak GPU memory
  jobs      experiment=ablation_all (14 jobs x 3 seeds, 20 epochs) with Hydra's joblib launcher
            running 1, 4 and 14 jobs at once on one GPU (1 and one per core on a CPU): sweep wall
            time, and whether every run's numbers equal those of n_jobs=1
  fold      a sweep of dropout rates x seeds (experiment=ablation_all's training; 20 epochs on a
            CPU, 50 on a GPU), one job at a time (Hydra's basic launcher) vs hydra/launcher=fold
            (one run of every job as replicas): command wall time, and the largest difference in a
            run's final test accuracy between the two
The real FashionMNIST files are used (full run only) when they are under $DROPBENCH_DATA (default
~/.cache/dropbench/data); otherwise random uint8 images are written once, in the real gzip'd IDX
format, under $DROPBENCH_CACHE/bench (default ~/.cache/dropbench/bench) and read through
torchvision's own FashionMNIST class.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import dropbench  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from dropbench import runs, train  # noqa: E402
from dropbench.config import build  # noqa: E402
from dropbench.data import write_idx  # noqa: E402
from dropbench.results import read_csv_rows, read_summary, write_csv  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # loaded by path (the tests), or run with python -P (gpu_checks.sh)
    sys.path.insert(0, str(SCRIPTS))
from batched_mlps import BatchedMLPs  # noqa: E402

K = 8  # seeds trained at once in the seeds and replicas sections
PLAIN_SEEDS = 3  # the plain section: this many seeds in dropbench against one seed of the plain loop
GPU_SEEDS = 64
# The MNIST-1D MLP recipe (Greydanus & Kobak 2020): batch 100, Adam lr 1e-2, all 4,000 training
# examples (40 steps per epoch); on top of the default config (MLP 40-100-100-10).
RECIPE = ["dataset.val_fraction=0", "batch_size=100", "optimizer.lr=0.01"]
RECIPE_STEPS = 40  # per epoch: 4,000 / 100
RECIPE_EPOCHS = 150  # 6,000 steps
D2L = ["experiment=d2l_dropout", "dataset.val_fraction=0", "dataset.download=false"]  # all 60,000 images, as d2l
SUMMARY_COLUMNS = ["section", "metric", "value", "unit", "target", "met", "note"]
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# machine, load and timing
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
BUSY = 0.2  # cores of other work while timing above which timings are flagged as unreliable
BUSY_LOADAVG = 0.5  # the same for the 1-minute load average before the start (it counts waiting processes too)


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


def interleave(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, per round; calls interleaved (A B C, B C A, ...) so that slow spells
    of the machine hit every side."""
    names, times = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with LOAD.measure():
                t = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t)
    return times


def synced(fn, device: torch.device):
    """`fn` followed by a wait for the device, so that a timer around it sees the work done."""
    def call():
        fn()
        train.synchronize(device)
    return call


def compose_config(overrides: list[str], device: str = "cpu"):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="dropbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[f"device={device}", "progress=false", *overrides])


def dropbench_command() -> list[str]:
    exe = Path(sys.executable).with_name("dropbench")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dropbench.cli"]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# ----------------------------------------------------------------------------------------------
# data: real FashionMNIST if present, else random images in the real gzip'd IDX format
# ----------------------------------------------------------------------------------------------
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fashion_root(quick: bool) -> tuple[Path, str]:
    """A torchvision root holding FashionMNIST/raw, and what its images are."""
    real = Path(os.path.expanduser(os.environ.get("DROPBENCH_DATA", "~/.cache/dropbench/data")))
    if not quick and all((real / "FashionMNIST" / "raw" / f).is_file() for f in FILES):
        return real, "real FashionMNIST"
    n_train, n_test = (6000, 1000) if quick else (60000, 10000)
    return synthetic_fashion_root(n_train, n_test), f"random uint8 images in IDX files ({n_train} train)"


def synthetic_fashion_root(n_train: int, n_test: int) -> Path:
    """A root whose FashionMNIST/raw holds random images: the .gz files as published, unpacked with
    torchvision's own extract_archive as its download() leaves them. Made once per size
    (atomically: built in a temporary directory, then renamed)."""
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
        raw, rng = tmp / "FashionMNIST" / "raw", np.random.default_rng(0)
        for name in FILES:
            n = n_train if name.startswith("train") else n_test
            images = "images" in name
            write_idx(raw / f"{name}.gz", rng.integers(0, 256 if images else 10, (n, 28, 28) if images else n,
                                                       dtype=np.uint8))
            extract_archive(str(raw / f"{name}.gz"), str(raw))
        try:
            os.replace(tmp, root)
        except OSError:  # another process made it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------
# epoch: dropbench's training path vs the textbook loop
# ----------------------------------------------------------------------------------------------
class DropbenchSetup:
    """The run dropbench.train builds for `cfg` (train.build_run), trained by train.train_epoch."""

    def __init__(self, cfg, device: torch.device = CPU):
        self.run = train.build_run(cfg, device, [cfg.seed + k for k in range(cfg.parallel_seeds)])
        self.batch_size, self.device = cfg.batch_size, device

    def epoch(self) -> None:
        train.train_epoch(self.run, self.batch_size)
        train.synchronize(self.device)

    @property
    def steps(self) -> int:
        return math.ceil(self.run.data.size("train") / self.batch_size)


class TextbookSetup:
    """The d2l dropout chapter (concise implementation) for the same config, trained as its
    train_epoch_ch3 trains it."""

    def __init__(self, root: Path, cfg):
        from torch import nn
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        torch.manual_seed(cfg.seed)
        dataset = datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor(), download=False)
        self.train_iter = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True)
        (h1, h2), (p1, p2) = cfg.model.hidden, cfg.regularizer.p
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, h1), nn.ReLU(), nn.Dropout(p1),
                                 nn.Linear(h1, h2), nn.ReLU(), nn.Dropout(p2), nn.Linear(h2, 10))

        def init_weights(m):
            if type(m) is nn.Linear:
                nn.init.normal_(m.weight, std=cfg.model.init_std)

        self.net.apply(init_weights)
        self.loss = nn.CrossEntropyLoss(reduction="none")
        self.trainer = torch.optim.SGD(self.net.parameters(), lr=cfg.optimizer.lr)

    def epoch(self):
        self.net.train()
        metric = [0.0, 0.0, 0]  # d2l.Accumulator(3): loss sum, correct, count
        for X, y in self.train_iter:
            y_hat = self.net(X)
            l = self.loss(y_hat, y)  # noqa: E741 (d2l's name)
            self.trainer.zero_grad()
            l.mean().backward()
            self.trainer.step()
            metric[0] += float(l.sum().detach())
            metric[1] += float((y_hat.argmax(axis=1).type(y.dtype) == y).type(y.dtype).sum())
            metric[2] += y.numel()
        return metric[0] / metric[2], metric[1] / metric[2]


def train_flops_per_sample(widths: list[int]) -> int:
    """Matmul FLOPs of one training example through Linear layers widths[0] -> ... -> widths[-1]:
    forward 2*in*out, backward 2*in*out for the weight gradient and 2*in*out for the input
    gradient except at the first layer (the input needs no gradient)."""
    return sum(2 * a * b * (2 if i == 0 else 3) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))


def peak_mm_flops(n: int, repeats: int) -> float:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return 2 * n ** 3 / min(timeit.repeat(lambda: torch.mm(a, b, out=c), number=1, repeat=repeats))


def matmul_only_epoch(n: int, widths: list[int], batch: int, repeats: int) -> float:
    """Seconds for just the matmuls of one dropbench epoch (the addmm/mm calls and shapes of nn.Linear's
    forward and backward, as a single run makes them), best of `repeats`: the floor the epoch could reach."""
    layers = [(torch.randn(b, a), torch.randn(b)) for a, b in zip(widths[:-1], widths[1:])]
    x = torch.randn(batch, widths[0])

    def one_epoch():
        for start in range(0, n, batch):
            acts = [x[:min(batch, n - start)]]
            for w, b in layers:
                acts.append(torch.addmm(b, acts[-1], w.t()))
            for i in reversed(range(len(layers))):
                g = acts[i + 1]
                torch.mm(g.t(), acts[i])  # weight gradient, in the weight's layout
                if i > 0:
                    torch.mm(g, layers[i][0])  # input gradient

    return min(timeit.repeat(one_epoch, number=1, repeat=repeats))


# Each section returns its CSV rows and appends its figures to `summary`.
def bench_epochs(args, summary: list, console) -> list[dict]:
    root, data_note = fashion_root(args.quick)
    threads = torch.get_num_threads()
    console.print(f"[bold]epoch[/]: d2l setup on {data_note}, {threads} threads")
    cfg = compose_config([*D2L, f"dataset.root={root}"])
    sides = {"dropbench": DropbenchSetup(cfg), "textbook": TextbookSetup(root, cfg)}
    for side in sides.values():
        side.epoch()  # warm-up: allocator, MKL, DataLoader
    times = interleave({name: side.epoch for name, side in sides.items()}, args.repeats)
    n = sides["dropbench"].run.data.size("train")
    rows = [{"side": side, "round": r, "seconds": round(t, 6), "threads": threads, "images": n, "device": args.cpu}
            for side, ts in times.items() for r, t in enumerate(ts)]
    t_db, t_tb = times["dropbench"], times["textbook"]
    ratio = med(t_tb) / med(t_db)

    widths = [784, *cfg.model.hidden, 10]
    flops = train_flops_per_sample(widths) * n
    peak = peak_mm_flops(args.peak_n, 15)
    mm_only = matmul_only_epoch(n, widths, cfg.batch_size, 2 if args.quick else 3)
    achieved = flops / med(t_db)
    summary += [
        {"section": "epoch", "metric": "dropbench_epoch_s_median", "value": med(t_db), "unit": "s",
         "note": f"train.build_run + train.train_epoch; min {min(t_db):.3f}; {data_note}"},
        {"section": "epoch", "metric": "textbook_epoch_s_median", "value": med(t_tb), "unit": "s",
         "note": f"DataLoader+ToTensor+nn.Sequential; min {min(t_tb):.3f}"},
        {"section": "epoch", "metric": "speedup_textbook_over_dropbench", "value": ratio, "unit": "x",
         "target": ">= 8", "met": ratio >= 8,
         "note": f"ratio of medians; per-pair ratios median {med([b / a for a, b in zip(t_db, t_tb)]):.2f}"},
        {"section": "efficiency", "metric": "epoch_matmul_gflop", "value": flops / 1e9, "unit": "GFLOP",
         "note": f"{train_flops_per_sample(widths)} FLOP/example x {n}"},
        {"section": "efficiency", "metric": "peak_fp32_mm_gflops", "value": peak / 1e9, "unit": "GFLOP/s",
         "note": f"torch.mm {args.peak_n}^2, best of 15, {threads} threads"},
        {"section": "efficiency", "metric": "achieved_gflops", "value": achieved / 1e9, "unit": "GFLOP/s",
         "note": f"dropbench, median epoch; best epoch {flops / min(t_db) / 1e9:.1f}"},
        {"section": "efficiency", "metric": "fraction_of_peak", "value": achieved / peak, "unit": "",
         "target": ">= 0.5", "met": achieved / peak >= 0.5, "note": f"best epoch {flops / min(t_db) / peak:.2f}"},
        {"section": "efficiency", "metric": "matmul_only_epoch_s", "value": mm_only, "unit": "s",
         "note": f"the epoch's mm/addmm calls alone: {flops / mm_only / 1e9:.1f} GFLOP/s = "
                 f"{flops / mm_only / peak:.2f} of peak; non-matmul share of the epoch {1 - mm_only / med(t_db):.2f}"},
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# seeds: parallel_seeds=8 vs single runs, through the job a user runs
# ----------------------------------------------------------------------------------------------
def run_job(tmp: Path, name: str, overrides: list[str], device: str = "cpu") -> tuple[float, Path]:
    """Wall seconds and run directory of runs.train_job on the config with `overrides`."""
    cfg = compose_config([f"results_dir={tmp / name / 'results'}", *overrides], device)
    with LOAD.measure():
        t = time.perf_counter()
        result = runs.train_job(cfg, tmp / name / "run", False)
        wall = time.perf_counter() - t
    if result.status != "ok":
        error = (read_summary(result.run_dir / "summary.csv") or {}).get("error", "")
        raise RuntimeError(f"bench run {name} ended {result.status!r}: {error}")
    return wall, result.run_dir


def final_losses(metrics_csv: Path) -> dict[str, float]:
    rows = read_csv_rows(metrics_csv) or []
    last = max((int(r["epoch"]) for r in rows), default=None)
    return {r["split"]: float(r["loss"]) for r in rows if int(r["epoch"]) == last}


def loss_diff(parallel_dir: Path, seed: int, single_dir: Path) -> float:
    """Largest |difference| between replica `seed`'s last-epoch losses (every split) and its single run's."""
    a, b = final_losses(parallel_dir / f"seed_{seed}" / "metrics.csv"), final_losses(single_dir / "metrics.csv")
    return max(abs(a[s] - b[s]) for s in a) if a and a.keys() == b.keys() else math.inf


def summary_seconds(run_dir: Path, key: str) -> float:
    return float((read_csv_rows(run_dir / "summary.csv") or [{key: "nan"}])[0][key])


def bench_seeds(args, summary: list, console) -> list[dict]:
    epochs, threads = (2 if args.quick else 5), f"threads={torch.get_num_threads()}"
    console.print(f"[bold]seeds[/]: MNIST-1D default config, {epochs} epochs, parallel_seeds={K} vs single runs")
    rows, walls = [], {"single": [], "parallel": [], "sequential": []}
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        tmp = Path(tmpdir)

        def job(kind: str, r: int, seed: int, seeds: int) -> Path:
            wall, out = run_job(tmp, f"{kind}_{r}", [threads, f"epochs={epochs}", f"seed={seed}",
                                                     f"parallel_seeds={seeds}"])
            walls[kind].append(wall)
            rows.append({"kind": kind, "seeds": seeds, "round": r, "wall_seconds": round(wall, 4),
                         "train_seconds": summary_seconds(out if seeds == 1 else out / "seed_0", "train_seconds"),
                         "device": args.cpu})
            return out

        run_job(tmp, "warmup", [threads, "epochs=1", "seed=100"])  # data cache, imports, allocator
        for r in range(args.seed_repeats):
            for seeds in ((1, K) if r % 2 == 0 else (K, 1)):
                out = job("single" if seeds == 1 else "parallel", r, 0, seeds)
                if seeds == K:
                    par_dir = out
        # single runs of every seed, one after another (all K in a full run; seeds 0 and K-1 with --quick)
        check_seeds = [0, K - 1] if args.quick else list(range(K))
        diffs = [loss_diff(par_dir, s, job("sequential", s, s, 1)) for s in check_seeds]
        # the same check with dropout: every replica draws its single run's masks
        kd = 2 if args.quick else 3
        drop = [threads, f"epochs={1 if args.quick else 2}", "regularizer=dropout", "regularizer.p=0.5",
                "regularizer.input_p=0.1"]
        _, dpar = run_job(tmp, "dropout_parallel", [*drop, "seed=0", f"parallel_seeds={kd}"])
        ddiffs = [loss_diff(dpar, s, run_job(tmp, f"dropout_seed{s}", [*drop, f"seed={s}"])[1]) for s in range(kd)]
    single, par, seq = med(walls["single"]), med(walls["parallel"]), walls["sequential"]
    seq_total = sum(seq) if len(seq) == K else K * single
    train_s = {kind: med([row["train_seconds"] for row in rows if row["kind"] == kind])
               for kind in ("single", "parallel")}

    # the same training by the hand-written batched loop, 1 and K models: the ratio batching alone reaches here
    cfg = compose_config([])
    data = build(cfg.dataset, "dataset", device=CPU)
    widths = [math.prod(data.in_shape), *cfg.model.hidden, data.num_classes]
    batched = {k: BatchedMLPs(data.x_train, data.y_train, k, widths, cfg.batch_size, cfg.optimizer.lr, capture=False)
               for k in (1, K)}

    def train(mlps: BatchedMLPs) -> None:
        for _ in range(epochs):
            mlps.epoch()
    times = interleave({k: partial(train, m) for k, m in batched.items()}, args.seed_repeats)
    rows += [{"kind": f"batched loop {k}", "seeds": k, "round": r, "train_seconds": round(t, 4), "device": args.cpu}
             for k, ts in times.items() for r, t in enumerate(ts)]
    batched_ratio = med(times[K]) / med(times[1])
    summary += [
        {"section": "seeds", "metric": "single_run_s_median", "value": single, "unit": "s",
         "note": f"train_job wall, {epochs} epochs (data load, model, training, evaluation, files)"},
        {"section": "seeds", "metric": f"parallel_seeds_{K}_s_median", "value": par, "unit": "s"},
        {"section": "seeds", "metric": f"parallel_{K}_over_single", "value": par / single, "unit": "x",
         "target": "<= 2", "met": par / single <= 2},
        {"section": "seeds", "metric": f"parallel_{K}_over_single_training", "value": train_s["parallel"] /
         train_s["single"], "unit": "x", "note": "the same, training time only (summary.csv train_seconds)"},
        {"section": "seeds", "metric": f"batched_loop_{K}_over_1_training", "value": batched_ratio, "unit": "x",
         "note": f"scripts/batched_mlps.py, {K} models against 1, {epochs} epochs of the same data, batch and lr, "
                 f"eager; median of {args.seed_repeats} interleaved rounds: what batching alone reaches here"},
        {"section": "seeds", "metric": f"sequential_{K}_s", "value": seq_total, "unit": "s",
         "note": "measured" if len(seq) == K else f"{K} x single run (--quick runs only seeds {check_seeds})"},
        {"section": "seeds", "metric": f"speedup_parallel_over_sequential_{K}", "value": seq_total / par, "unit": "x"},
        {"section": "seeds", "metric": "replica_vs_single_max_abs_loss_diff", "value": max(diffs), "unit": "",
         "note": f"last epoch's loss, every split, seeds {check_seeds}; rounding of the batched products"},
        {"section": "seeds", "metric": "replica_vs_single_max_abs_loss_diff_dropout", "value": max(ddiffs),
         "unit": "", "note": f"regularizer=dropout p=0.5 input_p=0.1, parallel_seeds={kd}"},
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# plain: `dropbench train parallel_seeds=3` vs one seed of a plain PyTorch loop, whole processes
# ----------------------------------------------------------------------------------------------
PLAIN_LOOP = '''\
"""One seed of the MNIST-1D MLP recipe, the plain PyTorch way. Arguments: NPZ THREADS EPOCHS SEED."""
import sys

import numpy as np
import torch
from torch import nn

path, threads, epochs, seed = sys.argv[1], *map(int, sys.argv[2:5])
torch.set_num_threads(threads)
torch.manual_seed(seed)
with np.load(path) as d:
    x, y, x_test, y_test = (torch.from_numpy(d[k]) for k in ("x", "y", "x_test", "y_test"))
model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
batch_size = 100
for epoch in range(epochs):
    model.train()
    perm = torch.randperm(len(x))
    xs, ys = x[perm], y[perm]
    for start in range(0, len(x), batch_size):
        loss = nn.functional.cross_entropy(model(xs[start:start + batch_size]), ys[start:start + batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        log = {}
        for split, (xe, ye) in {"train": (x, y), "test": (x_test, y_test)}.items():
            logits = model(xe)
            log[split] = (nn.functional.cross_entropy(logits, ye).item(),
                          (logits.argmax(1) == ye).float().mean().item())
print(f"epoch {epochs} train acc {log['train'][1]:.4f} test acc {log['test'][1]:.4f}")
'''


def bench_plain(args, summary: list, console) -> list[dict]:
    epochs, threads = (3 if args.quick else RECIPE_EPOCHS), torch.get_num_threads()
    console.print(f"[bold]plain[/]: MNIST-1D recipe, {epochs} epochs: dropbench {PLAIN_SEEDS} seeds vs a plain "
                  f"loop, 1 seed, whole processes, {threads} threads")
    cfg = compose_config(RECIPE)
    data = build(cfg.dataset, "dataset", device=CPU)  # also fills the MNIST-1D cache
    env = subprocess_env()
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        tmp = Path(tmpdir)
        np.savez(tmp / "mnist1d.npz", x=data.x_train.flatten(1).numpy(), y=data.y_train.numpy(),
                 x_test=data.x_test.flatten(1).numpy(), y_test=data.y_test.numpy())
        (tmp / "plain_loop.py").write_text(PLAIN_LOOP)
        started = []

        def run(name: str, command: list[str]) -> None:
            started.append(name)
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp)
            if proc.returncode:
                raise RuntimeError(f"{name} failed: {proc.stderr.strip()[-500:]}")

        def dropbench() -> None:  # every run in a fresh directory
            run("dropbench", [*dropbench_command(), "train", *RECIPE, f"epochs={epochs}",
                              f"parallel_seeds={PLAIN_SEEDS}", "device=cpu", f"threads={threads}", "progress=false",
                              f"results_dir={tmp / 'results'}", f"hydra.run.dir={tmp / 'runs' / str(len(started))}"])
        plain = partial(run, "plain", [sys.executable, str(tmp / "plain_loop.py"), str(tmp / "mnist1d.npz"),
                                       str(threads), str(epochs), "0"])
        batched = partial(run, "batched", [sys.executable, str(SCRIPTS / "batched_mlps.py"), str(tmp / "mnist1d.npz"),
                                           str(threads), str(epochs), str(PLAIN_SEEDS)])
        sides = {f"dropbench {PLAIN_SEEDS} seeds": dropbench, "plain loop 1 seed": plain,
                 f"batched loop {PLAIN_SEEDS} seeds": batched}
        for side in sides.values():
            side()  # warm-up: the page cache holds torch, Hydra and dropbench
        times = interleave(sides, args.plain_rounds)
    rows = [{"side": side, "round": r, "wall_seconds": round(t, 4), "epochs": epochs, "threads": threads,
             "device": args.cpu} for side, ts in times.items() for r, t in enumerate(ts)]
    t_db, t_plain = times[f"dropbench {PLAIN_SEEDS} seeds"], times["plain loop 1 seed"]
    t_batched = times[f"batched loop {PLAIN_SEEDS} seeds"]
    ratio = med(t_db) / med(t_plain)
    steps = epochs * RECIPE_STEPS
    summary += [
        {"section": "plain", "metric": f"dropbench_{PLAIN_SEEDS}_seeds_s_median", "value": med(t_db), "unit": "s",
         "note": f"`dropbench train` process, {steps} steps, train+test evaluated every epoch, files written"},
        {"section": "plain", "metric": "plain_loop_1_seed_s_median", "value": med(t_plain), "unit": "s",
         "note": "python process: nn.Sequential, torch.optim.Adam, slices of shuffled tensors, same evaluation"},
        {"section": "plain", "metric": f"dropbench_{PLAIN_SEEDS}_seeds_over_plain_1_seed", "value": ratio,
         "unit": "x", "target": "< 1", "met": ratio < 1,
         "note": f"ratio of medians of {args.plain_rounds} interleaved rounds"},
        {"section": "plain", "metric": f"batched_loop_{PLAIN_SEEDS}_seeds_s_median", "value": med(t_batched),
         "unit": "s", "note": "python process: scripts/batched_mlps.py, the seeds' weights stacked, one baddbmm "
                              "a layer, Adam in foreach ops, same evaluation; no run management, no files"},
        {"section": "plain", "metric": f"batched_loop_{PLAIN_SEEDS}_seeds_over_plain_1_seed",
         "value": med(t_batched) / med(t_plain), "unit": "x",
         "note": "the target's ratio for a hand-written batched loop: what batching alone reaches on this machine"},
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# jobs: a sweep of small jobs, n of them at a time on one device (Hydra's joblib launcher)
# ----------------------------------------------------------------------------------------------
def sweep_metrics(sweep: Path) -> dict[str, list[dict]]:
    """Every run's metrics.csv rows below `sweep` without the seconds column, by relative path."""
    return {str(path.relative_to(sweep)): [{k: v for k, v in row.items() if k != "seconds"}
                                           for row in read_csv_rows(path) or []]
            for path in sorted(sweep.rglob("metrics.csv"))}


def timed_command(command: list[str], what: str) -> float:
    """Wall seconds of `command` run as its own process; RuntimeError naming `what` if it fails."""
    with LOAD.measure():
        t = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=subprocess_env())
        wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{what} failed: {proc.stderr.strip()[-500:]}")
    return wall


@contextmanager
def gpu_memory_in_use(device: str):
    """Yields a dict whose "peak" and "start" end as the most GPU memory in use (bytes, every process
    on the GPU, `torch.cuda.mem_get_info`) while the block ran, sampled every 0.1 s, and the memory
    in use when it began; both None on a CPU."""
    result = {"peak": None, "start": None}
    if device != "cuda":
        yield result
        return
    torch.cuda.empty_cache()  # what earlier sections left in this process's cache is not the sweep's

    def used() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    stop, result["start"] = threading.Event(), used()
    peak = [result["start"]]

    def poll():
        while not stop.wait(0.1):
            peak[0] = max(peak[0], used())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(peak[0], used())


def bench_jobs(args, summary: list, console) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counts = sorted({1, 4, 14} if device == "cuda" else {1, os.cpu_count() or 1})
    epochs = 2 if args.quick else 20
    methods = ["regularizer=none,dropout,batchnorm,mc_dropout"] if args.quick else []  # else all 14
    name = torch.cuda.get_device_name(0) if device == "cuda" else args.cpu
    console.print(f"[bold]jobs[/]: experiment=ablation_all epochs={epochs} on {name}, n_jobs {counts}")
    rows, first = [], None
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        def sweep(n: int, folder: str, *overrides: str) -> tuple[float, dict, dict]:
            out = Path(tmpdir) / folder
            command = [*dropbench_command(), "train", "-m", "experiment=ablation_all", *overrides, *methods,
                       f"device={device}", "threads=1", "progress=false", "hydra/launcher=joblib",
                       f"hydra.launcher.n_jobs={n}", f"results_dir={out}", f"hydra.sweep.dir={out / 'sweep'}"]
            with gpu_memory_in_use(device) as memory:
                wall = timed_command(command, f"jobs n_jobs={n} {' '.join(overrides)}")
            return wall, sweep_metrics(out / "sweep"), memory

        for n in counts:
            wall, metrics, _ = sweep(n, f"n{n}", f"epochs={epochs}")
            first = metrics if first is None else first
            rows.append({"n_jobs": n, "epochs": epochs, "wall_seconds": round(wall, 3), "runs": len(metrics),
                         "identical_to_n_jobs_1": metrics == first, "device": name})
        # the target: the whole experiment (its own 200 epochs) with every job at once, on a GPU
        # (2 epochs with --quick, to try the path on a CPU)
        full = device == "cuda" or args.quick
        if full:
            full_epochs = 2 if args.quick else int(compose_config(["experiment=ablation_all"]).epochs)
            graphed = ["cuda_graph=true"] if device == "cuda" else []  # the step replayed from a CUDA graph
            try:
                wall, metrics, memory = sweep(counts[-1], "full", f"epochs={full_epochs}", *graphed)
                rows.append({"n_jobs": counts[-1], "epochs": full_epochs, "wall_seconds": round(wall, 3),
                             "runs": len(metrics), "identical_to_n_jobs_1": "", "device": name})
            except RuntimeError as error:  # keep the sweeps above
                console.print(f"[red]jobs: the whole experiment failed: {error}[/]")
                summary.append({"section": "jobs", "metric": "ablation_all_failed", "value": "",
                                "note": f"{' '.join(graphed)}: {error}"})
                full = False
    base = rows[0]["wall_seconds"]
    summary += [{"section": "jobs", "metric": f"ablation_all_{epochs}_epochs_n_jobs_{r['n_jobs']}_s",
                 "value": r["wall_seconds"], "unit": "s",
                 "note": f"{r['runs']} runs, the whole sweep, {base / r['wall_seconds']:.2f}x n_jobs=1; metrics "
                         f"identical to n_jobs=1: {r['identical_to_n_jobs_1']}; {name}"} for r in rows[:len(counts)]]
    if full:
        whole, target = rows[-1], device == "cuda" and not args.quick
        summary.append({"section": "jobs", "metric": "ablation_all_s", "value": whole["wall_seconds"], "unit": "s",
                        "target": "<= 30" if target else "", "met": whole["wall_seconds"] <= 30 if target else "",
                        "note": f"experiment=ablation_all, {whole['epochs']} epochs, {whole['runs']} runs, "
                                f"n_jobs={whole['n_jobs']} {' '.join(graphed)}: the whole command; {name}"})
        if memory["peak"] is not None:
            gb = (memory["peak"] - memory["start"]) / 1e9
            summary.append({"section": "jobs", "metric": "ablation_all_peak_gpu_memory_gb", "value": gb, "unit": "GB",
                            "target": "<= 16", "met": gb <= 16,
                            "note": f"most GPU memory in use by every process while it ran, less the "
                                    f"{memory['start'] / 1e9:.2f} GB in use before (torch.cuda.mem_get_info, "
                                    f"every 0.1 s)"})
    return rows


# ----------------------------------------------------------------------------------------------
# fold: a sweep over seeds and a numeric setting, job by job vs folded into one run
# ----------------------------------------------------------------------------------------------
def final_test_accuracies(sweep: Path) -> dict[str, float]:
    """Every run's final test accuracy below `sweep`, by run key."""
    return {row["run_key"]: float(row["test_acc"]) for path in sorted(sweep.rglob("summary.csv"))
            for row in read_csv_rows(path) or []}


def bench_fold(args, summary: list, console) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs = 2 if args.quick else 50 if device == "cuda" else 20
    rates = "0.1,0.5" if args.quick else "0.05,0.1,0.2,0.3,0.5"
    seeds = "0,1" if args.quick else "0,1,2"
    name = torch.cuda.get_device_name(0) if device == "cuda" else args.cpu
    sweep_args = ["experiment=ablation_all", "parallel_seeds=1", f"epochs={epochs}", "regularizer=dropout",
                  f"regularizer.p={rates}", f"seed={seeds}"]
    console.print(f"[bold]fold[/]: {' '.join(sweep_args)} on {name}: one job at a time vs hydra/launcher=fold")
    rows, accuracies = [], {}
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        for r in range(args.fold_rounds):
            for launcher in ("basic", "fold") if r % 2 == 0 else ("fold", "basic"):  # interleaved, order rotating
                sweep = Path(tmpdir) / f"{launcher}{r}"
                command = [*dropbench_command(), "train", "-m", *sweep_args, f"hydra/launcher={launcher}",
                           f"device={device}", "progress=false", f"results_dir={sweep}",
                           f"hydra.sweep.dir={sweep / 's'}"]
                wall = timed_command(command, f"fold {launcher}")
                found = final_test_accuracies(sweep / "s")
                if accuracies.setdefault(launcher, found) != found:
                    raise RuntimeError(f"fold: the {launcher} sweep gave other numbers in round {r}")
                rows.append({"launcher": launcher, "round": r, "wall_seconds": round(wall, 3), "runs": len(found),
                             "device": name})
    basic, fold = accuracies["basic"], accuracies["fold"]
    same_runs = basic.keys() == fold.keys()
    diff = max(abs(basic[k] - fold[k]) for k in basic) if same_runs else float("nan")
    mean_diff = (sum(fold.values()) - sum(basic.values())) / len(basic) if same_runs else float("nan")
    for row in rows:
        row.update(same_run_keys=same_runs, max_abs_test_acc_diff=round(diff, 6))
    walls = {launcher: med([r["wall_seconds"] for r in rows if r["launcher"] == launcher]) for launcher in accuracies}
    summary += [
        {"section": "fold", "metric": "speedup_fold_over_one_job_at_a_time", "value": walls["basic"] / walls["fold"],
         "unit": "x", "note": f"{len(basic)} runs ({rates} x seeds {seeds}, {epochs} epochs), whole command, median "
                              f"of {args.fold_rounds}: {walls['basic']:.1f} s job by job, {walls['fold']:.1f} s "
                              f"folded; every round the same numbers; {name}"},
        {"section": "fold", "metric": "max_abs_test_acc_diff", "value": diff, "unit": "",
         "note": f"per run key, folded vs job by job (same run keys: {same_runs}); mean difference {mean_diff:+.4f}"},
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# startup: the light commands stay light
# ----------------------------------------------------------------------------------------------
_PROBE = """
import sys
marker, args = sys.argv[1], sys.argv[2:]
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


def imports_torch(cli_args: list[str], tmp: Path, env: dict) -> bool | None:
    """Whether `dropbench ARGS` ends with torch in sys.modules (None: the probe did not finish)."""
    marker = tmp / "marker"
    marker.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", _PROBE, str(marker), *cli_args], capture_output=True, env=env, cwd=tmp)
    return marker.read_text() == "1" if marker.exists() else None


def bench_startup(args, summary: list, console) -> list[dict]:
    console.print("[bold]startup[/]: subprocess wall times")
    env = subprocess_env()
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "empty").mkdir()
        cli = {"dropbench --help": ["--help"], "dropbench list": ["list"],
               "dropbench report <empty dir>": ["report", str(tmp / "empty"), "--out", str(tmp / "report")]}
        commands = {**{name: dropbench_command() + a for name, a in cli.items()},
                    'python -c "import torch"': [sys.executable, "-c", "import torch"]}
        procs = {}

        def run(name):
            procs[name] = subprocess.run(commands[name], capture_output=True, text=True, env=env, cwd=tmp)

        times = interleave({name: partial(run, name) for name in commands}, args.startup_repeats)
        torch_in = {name: imports_torch(a, tmp, env) for name, a in cli.items()}
    rows = []
    for name in commands:
        code, imported = procs[name].returncode, torch_in.get(name)
        rows += [{"command": name, "round": r, "seconds": round(t, 4), "exit_code": code,
                  "imports_torch": "" if imported is None else imported, "device": args.cpu}
                 for r, t in enumerate(times[name])]
        note = f"exit {code}" + (f": {(procs[name].stderr.strip().splitlines() or [''])[-1][:50]}" if code else "")
        if name in cli:
            note += "; imports torch: " + {None: "?", True: "yes", False: "no"}[imported]
        summary.append({"section": "startup", "metric": name, "value": med(times[name]), "unit": "s",
                        "target": "no torch import" if name in cli else "",
                        "met": (imported is False) if name in cli else "", "note": note})
    return rows


# ----------------------------------------------------------------------------------------------
# replicas: vmap over stacked parameters vs separate copies
# ----------------------------------------------------------------------------------------------
def bench_replicas(args, summary: list, console) -> list[dict]:
    console.print(f"[bold]replicas[/]: K={K} MNIST-1D training steps, Replicas (vmap) vs {K} separate models")
    cfg = compose_config([f"parallel_seeds={K}"])
    stacked = DropbenchSetup(cfg)
    separate = [DropbenchSetup(compose_config([f"seed={s}"])) for s in range(K)]

    def separate_epoch():
        for setup in separate:  # each copy has its own Adam, as K single runs would
            setup.epoch()

    stacked.epoch()  # warm-up
    separate_epoch()
    steps = stacked.steps
    times = interleave({f"Replicas, vmap over {K} stacked models": stacked.epoch,
                        f"{K} separate models in turn": separate_epoch}, args.replica_rounds)
    rows = [{"variant": variant, "round": r, "ms_per_step": round(t / steps * 1e3, 4), "steps": steps,
             "device": args.cpu} for variant, ts in times.items() for r, t in enumerate(ts)]
    vmap_ms, separate_ms = (med(ts) / steps * 1e3 for ts in times.values())
    summary += [
        {"section": "replicas", "metric": f"vmap_k{K}_step_ms", "value": vmap_ms, "unit": "ms",
         "note": f"train.train_epoch on parallel_seeds={K}, per step of all {K} (batch {cfg.batch_size}, Adam)"},
        {"section": "replicas", "metric": f"separate_k{K}_step_ms", "value": separate_ms, "unit": "ms",
         "note": f"{K} single runs (R = 1: the module itself), one step of each"},
        {"section": "replicas", "metric": f"speedup_vmap_over_separate_k{K}", "value": separate_ms / vmap_ms,
         "unit": "x", "note": f"ratio of medians of {args.replica_rounds} interleaved rounds"},
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# gpu: dropbench on a CUDA GPU, and the ceiling of a hand-written batched loop
# ----------------------------------------------------------------------------------------------
def bench_gpu(args, summary: list, console) -> list[dict]:
    if not torch.cuda.is_available():
        console.print("[bold]gpu[/]: skipped (PyTorch sees no CUDA GPU)")
        summary.append({"section": "gpu", "metric": "skipped", "value": "", "note": "PyTorch sees no CUDA GPU"})
        return []
    device = torch.device("cuda")
    name, rows = torch.cuda.get_device_name(device), []
    epochs, threads = (5 if args.quick else RECIPE_EPOCHS), f"threads={torch.get_num_threads()}"
    console.print(f"[bold]gpu[/]: {name}")
    torch.cuda.reset_peak_memory_stats(device)

    # one seed of the MNIST-1D recipe, evaluated every epoch, as `dropbench train device=cuda` runs it,
    # without and with cuda_graph, alternating
    modes = {"eager": "cuda_graph=false", "cuda_graph": "cuda_graph=true"}
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for mode, setting in list(modes.items()):  # CUDA context, cuBLAS, kernels
            try:
                run_job(tmp, f"warmup_{mode}", [*RECIPE, threads, setting, "epochs=5"], "cuda")
            except RuntimeError as error:  # the eager figures are still worth having
                if mode == "eager":
                    raise
                console.print(f"[red]gpu: {setting} failed, measured without it: {error}[/]")
                summary.append({"section": "gpu", "metric": "cuda_graph_failed", "value": "", "note": str(error)})
                del modes[mode]
        recipe = {mode: [] for mode in modes}
        for r in range(args.gpu_rounds):
            for mode, setting in modes.items():
                wall, out = run_job(tmp, f"recipe_{mode}_{r}", [*RECIPE, threads, setting, f"epochs={epochs}"], "cuda")
                recipe[mode].append((summary_seconds(out, "train_seconds"), wall))
                rows.append({"case": f"mnist1d recipe, 1 seed, {mode}", "round": r,
                             "seconds": round(recipe[mode][-1][0], 4),
                             "model_steps_per_s": round(epochs * RECIPE_STEPS / recipe[mode][-1][0], 1),
                             "device": name})

    # the d2l epoch
    root, data_note = fashion_root(args.quick)
    d2l = {mode: DropbenchSetup(compose_config([*D2L, f"dataset.root={root}", setting], "cuda"), device)
           for mode, setting in modes.items()}
    for setup in d2l.values():
        for _ in range(5):  # warm-up; with cuda_graph the smaller last batch's step is recorded in the 4th epoch
            setup.epoch()
    d2l_times = interleave({mode: setup.epoch for mode, setup in d2l.items()}, args.gpu_rounds * 3)
    rows += [{"case": f"d2l epoch, {mode}", "round": r, "seconds": round(t, 5), "device": name}
             for mode, ts in d2l_times.items() for r, t in enumerate(ts)]
    del d2l

    # parallel_seeds=64 against the hand-written ceiling, interleaved
    sides = {}
    for mode, setting in modes.items():
        cfg = compose_config([*RECIPE, f"parallel_seeds={GPU_SEEDS}", setting], "cuda")
        many = DropbenchSetup(cfg, device)
        sides[mode] = many.epoch
    widths = [math.prod(many.run.data.in_shape), *cfg.model.hidden, many.run.data.num_classes]
    ceiling = BatchedMLPs(many.run.data.x_train, many.run.data.y_train, GPU_SEEDS, widths, cfg.batch_size,
                          cfg.optimizer.lr)
    steps = many.steps
    sides["ceiling"] = synced(ceiling.epoch, device)
    for side in sides.values():
        for _ in range(5):  # warm-up, past recording
            side()
    times = interleave(sides, args.gpu_rounds * 3)
    rows += [{"case": f"{GPU_SEEDS} models, {side}", "round": r, "seconds": round(t, 5),
              "model_steps_per_s": round(GPU_SEEDS * steps / t, 1), "device": name}
             for side, ts in times.items() for r, t in enumerate(ts)]
    rate = {side: GPU_SEEDS * steps / med(ts) for side, ts in times.items()}
    peak = torch.cuda.max_memory_allocated(device)
    for mode in modes:
        suffix = "" if mode == "eager" else "_cuda_graph"
        train_s = med([t for t, _ in recipe[mode]])
        fraction = rate[mode] / rate["ceiling"]
        summary += [
            {"section": "gpu", "metric": f"mnist1d_recipe_train_s{suffix}", "value": train_s, "unit": "s",
             "target": "<= 2", "met": train_s <= 2,
             "note": f"{epochs * RECIPE_STEPS} steps, evaluation every epoch; summary.csv train_seconds; wall "
                     f"{med([w for _, w in recipe[mode]]):.2f} s; {modes[mode]}; {name}"},
            {"section": "gpu", "metric": f"d2l_epoch_s_median{suffix}", "value": med(d2l_times[mode]), "unit": "s",
             "target": "<= 0.05", "met": med(d2l_times[mode]) <= 0.05, "note": f"{data_note}; {modes[mode]}"},
            {"section": "gpu", "metric": f"parallel_seeds_{GPU_SEEDS}_model_steps_per_s{suffix}", "value": rate[mode],
             "unit": "1/s", "note": f"train.train_epoch, {steps} steps of batch {cfg.batch_size}; {modes[mode]}"},
            {"section": "gpu", "metric": f"dropbench_fraction_of_ceiling{suffix}", "value": fraction, "unit": "",
             "target": ">= 0.5", "met": fraction >= 0.5, "note": modes[mode]},
        ]
    summary += [
        {"section": "gpu", "metric": "ceiling_model_steps_per_s", "value": rate["ceiling"], "unit": "1/s",
         "note": "stacked weights, baddbmm, foreach Adam, the step replayed as one CUDA graph"},
        {"section": "gpu", "metric": "peak_gpu_memory_mib", "value": peak / 2 ** 20, "unit": "MiB",
         "note": "torch.cuda.max_memory_allocated over the section"},
    ]
    return rows


SECTIONS = {  # name: (function, columns of its CSV file)
    "epoch": (bench_epochs, ["side", "round", "seconds", "threads", "images", "device"]),
    "seeds": (bench_seeds, ["kind", "seeds", "round", "wall_seconds", "train_seconds", "device"]),
    "plain": (bench_plain, ["side", "round", "wall_seconds", "epochs", "threads", "device"]),
    "startup": (bench_startup, ["command", "round", "seconds", "exit_code", "imports_torch", "device"]),
    "replicas": (bench_replicas, ["variant", "round", "ms_per_step", "steps", "device"]),
    "gpu": (bench_gpu, ["case", "round", "seconds", "model_steps_per_s", "device"]),
    "jobs": (bench_jobs, ["n_jobs", "epochs", "wall_seconds", "runs", "identical_to_n_jobs_1", "device"]),
    "fold": (bench_fold, ["launcher", "round", "wall_seconds", "runs", "same_run_keys", "max_abs_test_acc_diff",
                          "device"]),
}


# ----------------------------------------------------------------------------------------------
def peak_rss_mib(children: bool) -> float:
    """Peak resident memory of this process, or of its largest finished subprocess, in MiB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def machine_rows(threads: int, seconds: float, load_before: float | None) -> list[dict]:
    load = LOAD.mean
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        {"section": "machine", "metric": "cpu", "value": cpu_model(),
         "note": f"{os.cpu_count()} logical CPUs, {threads} torch threads, torch {torch.__version__}"},
        {"section": "machine", "metric": "gpu", "value": gpu, "note": "used by the gpu section only"},
        {"section": "machine", "metric": "background_load_cores", "value": "" if load is None else load,
         "unit": "cores", "target": f"< {BUSY}", "met": "" if load is None else load < BUSY,
         "note": f"CPU used by other processes while timing (of {os.cpu_count()}); above {BUSY} the timings are "
                 f"unreliable; bench {seconds:.0f} s"},
        {"section": "machine", "metric": "load_average_1min_at_start", "value": "" if load_before is None
         else load_before, "unit": "", "target": f"< {BUSY_LOADAVG}",
         "met": "" if load_before is None else load_before < BUSY_LOADAVG,
         "note": "os.getloadavg() before the first section"},
        {"section": "memory", "metric": "peak_rss_mib", "value": peak_rss_mib(children=False), "unit": "MiB",
         "note": "this process (getrusage RUSAGE_SELF)"},
        {"section": "memory", "metric": "peak_rss_children_mib", "value": peak_rss_mib(children=True), "unit": "MiB",
         "note": "the largest subprocess (dropbench train, plain loop, startup commands)"},
    ]


def print_summary(console, summary: list, threads: int, quick: bool):
    from rich.table import Table

    table = Table(title=f"dropbench benchmark ({'quick' if quick else 'full'}) - {cpu_model()}, "
                        f"{os.cpu_count()} logical CPUs, {threads} torch threads")
    for col in SUMMARY_COLUMNS:
        table.add_column(col, overflow="fold", max_width=60 if col == "note" else None)
    for row in summary:
        v, met = row["value"], row.get("met", "")
        table.add_row(row["section"], row["metric"], f"{v:.4g}" if isinstance(v, float) else str(v),
                      row.get("unit", ""), row.get("target", ""),
                      "[green]yes[/]" if met is True else "[red]no[/]" if met is False else str(met),
                      row.get("note", ""))
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds: a smoke test")
    parser.add_argument("--out", default=str(REPO / "results" / "bench"), help="directory for the CSV files")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as dropbench, all cores)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections {args.sections!r}: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(SECTIONS)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: give a positive number of threads")
    args.repeats = 2 if args.quick else 7
    args.seed_repeats = 1 if args.quick else 3
    args.plain_rounds = 1 if args.quick else 3
    args.startup_repeats = 2 if args.quick else 7
    args.replica_rounds = 3 if args.quick else 15
    args.gpu_rounds = 1 if args.quick else 3
    args.fold_rounds = 1 if args.quick else 3
    args.peak_n = 1024 if args.quick else 2048
    args.cpu = cpu_model()

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_before is not None and load_before > BUSY_LOADAVG:
        console.print(f"[yellow]warning: load average {load_before:.2f} before starting: other processes are "
                      f"running; timings may be unreliable[/]")
    threads = args.threads or runs.threads_for_job("auto", 1)
    torch.set_num_threads(threads)
    out, summary, t0 = Path(args.out), [], time.perf_counter()
    failed = []
    for section in sections:
        fn, columns, started = *SECTIONS[section], time.perf_counter()
        try:
            write_csv(out / f"{section}.csv", fn(args, summary, console), columns)
        except Exception as error:  # the other sections' figures are still written
            console.print(f"[red]{section} failed:[/]\n{traceback.format_exc()}")
            summary.append({"section": section, "metric": "failed", "value": "", "note": f"{type(error).__name__}: "
                                                                                         f"{error}"})
            failed.append(section)
        console.print(f"{section} done in {time.perf_counter() - started:.0f} s")
    summary += machine_rows(threads, time.perf_counter() - t0, load_before)
    for row in summary:
        row["value"] = round(row["value"], 6) if isinstance(row["value"], float) else row["value"]
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    print_summary(console, summary, threads, args.quick)
    if LOAD.mean is not None and LOAD.mean > BUSY:
        console.print(f"[yellow]warning: other processes used {LOAD.mean:.2f} cores on average while timing; "
                      "the figures are not reliable[/]")
    console.print(f"wrote {', '.join(f'{s}.csv' for s in [*sections, 'summary'] if s not in failed)} to {out}")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)} (see above and summary.csv)[/]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
