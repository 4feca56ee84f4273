#!/usr/bin/env python
"""dropbench speed benchmark, in one process: prints a table and writes results/bench/*.csv.

    python scripts/bench.py            # full run: about 2 minutes on a quiet 2-core CPU
    python scripts/bench.py --quick    # smoke test with small sizes, under 30 s
    python scripts/bench.py --out DIR  # write the CSV files to DIR instead of results/bench
    python scripts/bench.py --sections epoch,seeds --threads 1   # a subset; torch threads

Sections (see docs/speed_section.md for what each figure means):
  epoch     one training epoch of the d2l dropout setup (conf/experiment/d2l_dropout.yaml: MLP
            784-256-256-10, dropout 0.2/0.5, SGD lr 0.5, batch 256) on FashionMNIST-shaped data,
            dropbench (train.build_run + train.train_epoch) vs the textbook loop (torchvision
            dataset + ToTensor + DataLoader + nn.Sequential), epochs interleaved; and, as section
            "efficiency", the epoch's matmul FLOP/s as a fraction of peak fp32 torch.mm FLOP/s
  seeds     MNIST-1D default config through train.train_job: parallel_seeds=8 vs one single run
            vs 8 sequential single runs, and replica k's metrics vs the single run with seed k
            (default config, then with dropout)
  startup   wall time of `dropbench --help/list/report` and `python -c "import torch"`, and
            whether the dropbench commands import torch
  ablation  (not in --quick unless named) two design choices against their alternative, timed
            interleaved: the K=8 MNIST-1D training step with per-replica matmuls (exact replicas)
            vs one batched torch.baddbmm, and the d2l step's dropout masks drawn from 16 random
            bits per unit (ReplicaRNG.keep_mask) vs torch.rand(...) < keep (what the textbook pays)
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
import time
import timeit
import types
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from dropbench import train  # noqa: E402
from dropbench.data import write_idx  # noqa: E402
from dropbench.replicas import ReplicaLinear, ReplicaRNG  # noqa: E402
from dropbench.results import read_csv_rows, write_csv  # noqa: E402

K = 8  # seeds trained at once in the seeds and ablation sections
SUMMARY_COLUMNS = ["section", "metric", "value", "unit", "target", "met", "note"]


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


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="dropbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=["device=cpu", "progress=false", *overrides])


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
# the two sides of the epoch comparison
# ----------------------------------------------------------------------------------------------
class DropbenchSetup:
    """The run dropbench.train builds for `cfg` (train.build_run), trained by train.train_epoch."""

    def __init__(self, cfg):
        seeds = [cfg.seed + k for k in range(cfg.parallel_seeds)]
        self.data, self.model, self.regs, self.optimizer, _, self.rng = train.build_run(cfg, torch.device("cpu"), seeds)
        self.batch_size = cfg.batch_size

    def epoch(self) -> torch.Tensor:
        return train.train_epoch(self.data, self.model, self.regs, self.optimizer, self.rng, self.batch_size)


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
            l = self.loss(y_hat, y)
            self.trainer.zero_grad()
            l.mean().backward()
            self.trainer.step()
            metric[0] += float(l.sum().detach())
            metric[1] += float((y_hat.argmax(axis=1).type(y.dtype) == y).type(y.dtype).sum())
            metric[2] += y.numel()
        return metric[0] / metric[2], metric[1] / metric[2]


# ----------------------------------------------------------------------------------------------
# hardware efficiency
# ----------------------------------------------------------------------------------------------
def train_flops_per_sample(widths: list[int]) -> int:
    """Matmul FLOPs of one training example through Linear layers widths[0] -> ... -> widths[-1]:
    forward 2*in*out, backward 2*in*out for the weight gradient and 2*in*out for the input
    gradient except at the first layer (the input needs no gradient)."""
    return sum(2 * a * b * (2 if i == 0 else 3) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))


def peak_mm_flops(n: int, repeats: int) -> float:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return 2 * n ** 3 / min(timeit.repeat(lambda: torch.mm(a, b, out=c), number=1, repeat=repeats))


def matmul_only_epoch(n: int, widths: list[int], batch: int, repeats: int) -> float:
    """Seconds for just the matmuls of one dropbench epoch (the same mm/addmm calls and shapes as
    replicas.ReplicaLinear with R = 1), best of `repeats`: the floor the epoch time could reach."""
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


# ----------------------------------------------------------------------------------------------
# sections: each returns its CSV rows and appends its figures to `summary`
# ----------------------------------------------------------------------------------------------
def bench_epochs(args, summary: list, console) -> list[dict]:
    root, data_note = fashion_root(args.quick)
    threads = torch.get_num_threads()
    console.print(f"[bold]epoch[/]: d2l setup on {data_note}, {threads} threads")
    cfg = compose_config(["experiment=d2l_dropout", f"dataset.root={root}", "dataset.download=false"])
    sides = {"dropbench": DropbenchSetup(cfg), "textbook": TextbookSetup(root, cfg)}
    for side in sides.values():
        side.epoch()  # warm-up: allocator, MKL, DataLoader
    times = interleave({name: side.epoch for name, side in sides.items()}, args.repeats)
    n = len(sides["dropbench"].data.x_train)
    rows = [{"side": side, "round": r, "seconds": round(t, 6), "threads": threads, "images": n}
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


def run_job(tmp: Path, name: str, overrides: list[str]) -> tuple[float, Path]:
    """Wall seconds and run directory of train.train_job on the config with `overrides`."""
    cfg = compose_config([f"results_dir={tmp / name / 'results'}", *overrides])
    with LOAD.measure():
        t = time.perf_counter()
        result = train.train_job(cfg, tmp / name / "run", False)
        wall = time.perf_counter() - t
    if result.status != "ok":
        raise RuntimeError(f"bench run {name} ended {result.status!r} (see {result.run_dir})")
    return wall, result.run_dir


def replica_diff(parallel_dir: Path, seed: int, single_dir: Path) -> float:
    """Largest |difference| between replica `seed`'s loss/accuracy/entropy and its single run's."""
    def metrics(path):
        return {(r["epoch"], r["split"]): [float(r[k]) for k in ("loss", "accuracy", "entropy")]
                for r in read_csv_rows(path) or []}

    a, b = metrics(parallel_dir / f"seed_{seed}" / "metrics.csv"), metrics(single_dir / "metrics.csv")
    return max(abs(x - y) for key in a for x, y in zip(a[key], b[key])) if a and a.keys() == b.keys() else math.inf


def train_seconds(path: Path) -> float:
    return sum(float(r["seconds"]) for r in read_csv_rows(path) or [] if r["split"] == "train")


def bench_seeds(args, summary: list, console) -> list[dict]:
    epochs, threads = (2 if args.quick else 5), f"threads={torch.get_num_threads()}"
    console.print(f"[bold]seeds[/]: MNIST-1D default config, {epochs} epochs, parallel_seeds={K} vs single runs")
    rows, walls = [], {"single": [], "parallel": [], "sequential": []}
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        tmp = Path(tmpdir)

        def job(kind: str, r: int, seed: int, seeds: int) -> Path:
            wall, out = run_job(tmp, f"{kind}_{r}", [threads, f"epochs={epochs}", f"seed={seed}", f"parallel_seeds={seeds}"])
            walls[kind].append(wall)
            metrics = out / ("metrics.csv" if seeds == 1 else "seed_0/metrics.csv")
            rows.append({"kind": kind, "seeds": seeds, "round": r, "wall_seconds": round(wall, 4),
                         "train_seconds": round(train_seconds(metrics), 4)})
            return out

        run_job(tmp, "warmup", [threads, "epochs=1", "seed=100"])  # data cache, imports, allocator
        for r in range(args.seed_repeats):
            for seeds in ((1, K) if r % 2 == 0 else (K, 1)):
                out = job("single" if seeds == 1 else "parallel", r, 0, seeds)
                if seeds == K:
                    par_dir = out
        # single runs of every seed, one after another (all K in a full run; seeds 0 and K-1 with --quick)
        check_seeds = [0, K - 1] if args.quick else list(range(K))
        diffs = [replica_diff(par_dir, s, job("sequential", s, s, 1)) for s in check_seeds]
        # the same check with dropout, so that the per-replica masks are compared too
        Kd = 2 if args.quick else 3
        drop = [threads, f"epochs={1 if args.quick else 2}", "regularizer=dropout", "regularizer.p=0.5",
                "regularizer.input_p=0.1"]
        _, dpar = run_job(tmp, "dropout_parallel", [*drop, "seed=0", f"parallel_seeds={Kd}"])
        ddiffs = [replica_diff(dpar, s, run_job(tmp, f"dropout_seed{s}", [*drop, f"seed={s}"])[1]) for s in range(Kd)]
    single, par, seq = med(walls["single"]), med(walls["parallel"]), walls["sequential"]
    seq_total = sum(seq) if len(seq) == K else K * single
    summary += [
        {"section": "seeds", "metric": "single_run_s_median", "value": single, "unit": "s",
         "note": f"train_job wall, {epochs} epochs (data load, model, training, evaluation, files)"},
        {"section": "seeds", "metric": f"parallel_seeds_{K}_s_median", "value": par, "unit": "s"},
        {"section": "seeds", "metric": f"parallel_{K}_over_single", "value": par / single, "unit": "x",
         "target": "<= 2", "met": par / single <= 2},
        {"section": "seeds", "metric": f"sequential_{K}_s", "value": seq_total, "unit": "s",
         "note": "measured" if len(seq) == K else f"{K} x single run (--quick runs only seeds {check_seeds})"},
        {"section": "seeds", "metric": f"speedup_parallel_over_sequential_{K}", "value": seq_total / par, "unit": "x"},
        {"section": "seeds", "metric": "replica_vs_single_max_abs_diff", "value": max(diffs), "unit": "",
         "target": "0", "met": max(diffs) == 0, "note": f"loss/accuracy/entropy, every epoch and split, seeds {check_seeds}"},
        {"section": "seeds", "metric": "replica_vs_single_max_abs_diff_dropout", "value": max(ddiffs), "unit": "",
         "target": "0", "met": max(ddiffs) == 0, "note": f"regularizer=dropout p=0.5 input_p=0.1, parallel_seeds={Kd}"},
    ]
    return rows


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    exe = Path(sys.executable).with_name("dropbench")
    dropbench = [str(exe)] if exe.is_file() else [sys.executable, "-m", "dropbench.cli"]
    with tempfile.TemporaryDirectory(prefix="dropbench-bench-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "empty").mkdir()
        cli = {"dropbench --help": ["--help"], "dropbench list": ["list"],
               "dropbench report <empty dir>": ["report", str(tmp / "empty"), "--out", str(tmp / "report")]}
        commands = {**{name: dropbench + a for name, a in cli.items()},
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
                  "imports_torch": "" if imported is None else imported} for r, t in enumerate(times[name])]
        note = f"exit {code}" + (f": {(procs[name].stderr.strip().splitlines() or [''])[-1][:50]}" if code else "")
        if name in cli:
            note += "; imports torch: " + {None: "?", True: "yes", False: "no"}[imported]
        summary.append({"section": "startup", "metric": name, "value": med(times[name]), "unit": "s",
                        "target": "no torch import" if name in cli else "",
                        "met": (imported is False) if name in cli else "", "note": note})
    return rows


def baddbmm_forward(self, x):
    """ReplicaLinear.forward as one batched matmul over the replicas: replica k is then not bit
    for bit its single run (see replicas._PerReplicaLinear)."""
    return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


def bench_ablation(args, summary: list, console) -> list[dict]:
    console.print("[bold]ablation[/]: design choices vs their alternatives, interleaved")
    # exact replicas: K=8 MNIST-1D epochs, per-replica mm/addmm (replica_linear) vs one baddbmm per layer
    cfg = compose_config([f"parallel_seeds={K}"])
    exact, batched = DropbenchSetup(cfg), DropbenchSetup(cfg)
    for m in batched.model.modules():
        if isinstance(m, ReplicaLinear):
            m.forward = types.MethodType(baddbmm_forward, m)
    for setup in (exact, batched):
        setup.epoch()  # warm-up
    steps = math.ceil(len(exact.data.x_train) / cfg.batch_size)
    linear = interleave({"per-replica mm (exact)": exact.epoch, "batched baddbmm": batched.epoch}, args.ablation_rounds)

    # dropout masks of one d2l step: 16 random bits per unit (keep_mask) vs one float per unit
    d2l = compose_config(["experiment=d2l_dropout"])
    masks = [((d2l.batch_size, h), 1.0 - p) for h, p in zip(d2l.model.hidden, d2l.regularizer.p)]  # (shape, keep)
    rng, gen, mask_steps = ReplicaRNG([0], torch.device("cpu")), torch.Generator().manual_seed(0), 50

    def bits_masks():
        for _ in range(mask_steps):
            for shape, keep in masks:
                rng.keep_mask(shape, keep, 1.0 / keep)

    def rand_masks():
        for _ in range(mask_steps):
            for shape, keep in masks:
                (torch.rand(1, *shape, generator=gen) < keep).float().mul_(1.0 / keep)

    for fn in (bits_masks, rand_masks):
        fn()  # warm-up
    draw = interleave({"16-bit keep_mask": bits_masks, "torch.rand < keep": rand_masks}, args.ablation_rounds)

    rows, what = [], ", ".join(f"{a}x{b} at keep {keep:g}" for (a, b), keep in masks)
    for case, times, per in ((f"MNIST-1D R={K} training step", linear, steps), ("d2l step's dropout masks", draw, mask_steps)):
        for variant, ts in times.items():
            rows.append({"case": case, "variant": variant, "ms_per_step_median": round(med(ts) / per * 1e3, 4),
                         "ms_per_step_min": round(min(ts) / per * 1e3, 4)})
    exact_ms, batched_ms = (med(ts) / steps * 1e3 for ts in linear.values())
    bits_ms, rand_ms = (med(ts) / mask_steps * 1e3 for ts in draw.values())
    summary += [
        {"section": "ablation", "metric": f"mnist1d_k{K}_step_exact_over_baddbmm", "value": exact_ms / batched_ms,
         "unit": "x", "note": f"the cost of exact replicas: {exact_ms:.2f} vs {batched_ms:.2f} ms per step"},
        {"section": "ablation", "metric": "d2l_masks_16bit_over_rand", "value": bits_ms / rand_ms, "unit": "x",
         "note": f"{what}: {bits_ms:.3f} vs {rand_ms:.3f} ms per step"},
    ]
    return rows


SECTIONS = {  # name: (function, columns of its CSV file)
    "epoch": (bench_epochs, ["side", "round", "seconds", "threads", "images"]),
    "seeds": (bench_seeds, ["kind", "seeds", "round", "wall_seconds", "train_seconds"]),
    "startup": (bench_startup, ["command", "round", "seconds", "exit_code", "imports_torch"]),
    "ablation": (bench_ablation, ["case", "variant", "ms_per_step_median", "ms_per_step_min"]),
}


# ----------------------------------------------------------------------------------------------
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
                      "[green]yes[/]" if met is True else "[red]no[/]" if met is False else str(met), row.get("note", ""))
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test in < 30 s")
    parser.add_argument("--out", default=str(REPO / "results" / "bench"), help="directory for the CSV files")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as dropbench, all cores)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; no ablation with --quick)")
    args = parser.parse_args(argv)
    sections = args.sections.split(",") if args.sections else [s for s in SECTIONS if not (args.quick and s == "ablation")]
    if set(sections) - set(SECTIONS):
        parser.error(f"unknown section(s) {', '.join(sorted(set(sections) - set(SECTIONS)))}; choose from {', '.join(SECTIONS)}")
    args.repeats = 2 if args.quick else 7
    args.seed_repeats = 1 if args.quick else 3
    args.startup_repeats = 2 if args.quick else 7
    args.ablation_rounds = 4 if args.quick else 15
    args.peak_n = 1024 if args.quick else 2048

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    threads = args.threads or train.threads_for_job("auto", 1)
    torch.set_num_threads(threads)
    out, summary, t0 = Path(args.out), [], time.perf_counter()
    for section in sections:
        fn, columns = SECTIONS[section]
        write_csv(out / f"{section}.csv", fn(args, summary, console), columns)
    load = LOAD.mean
    summary.append({"section": "machine", "metric": "background_load_cores", "value": "" if load is None else load,
                    "unit": "cores", "target": "~0",
                    "note": f"CPU used by other processes while timing (of {os.cpu_count()}); above ~0.2 the "
                            f"timings are unreliable. torch {torch.__version__}, {cpu_model()}, {threads} threads, "
                            f"bench {time.perf_counter() - t0:.0f} s"})
    for row in summary:
        row["value"] = round(row["value"], 6) if isinstance(row["value"], float) else row["value"]
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    print_summary(console, summary, threads, args.quick)
    if load is not None and load > 0.2:
        console.print(f"[yellow]warning: other processes used {load:.2f} cores on average while timing; "
                      "the figures are not reliable[/]")
    console.print(f"wrote {', '.join(f'{s}.csv' for s in [*sections, 'summary'])} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
