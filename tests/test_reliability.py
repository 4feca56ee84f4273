"""Reliability of `dropbench train`: bad input, atomic results, divergence, failures, interruption,
resume, parallel jobs. Most tests drive the real command in a subprocess on the smoke experiment.

Runs are kept tiny (a few seconds each) and on one thread (the CI box is small and shared).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import stopped_in_epoch

from dropbench.results import METRICS_COLUMNS, read_csv_rows, read_summary, write_csv

SMOKE = ["experiment=smoke", "progress=false"]
TIMEOUT = 120


def train_cmd(*overrides: str, smoke: bool = True, threads: str = "1") -> list[str]:
    return [sys.executable, "-m", "dropbench.cli", "train", *(SMOKE if smoke else []), f"threads={threads}",
            *overrides]


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def summaries(root: Path) -> dict[Path, dict]:
    """Run dir -> summary row, for every summary.csv under root (each must be complete)."""
    found = {}
    for path in root.rglob("summary.csv"):
        row = read_summary(path)
        assert row is not None, f"unreadable summary {path}"
        found[path.parent] = row
    return found


def metrics_without_seconds(path: Path) -> list[dict]:
    rows = read_csv_rows(path)
    assert rows is not None, f"incomplete {path}"
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc={proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


# -- bad input --------------------------------------------------------------------------------------

def _garbage_mnist(tmp: Path) -> None:
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        path = tmp / "data" / "MNIST" / "raw" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not an IDX file\n" * 4)


def _corrupt_cache(tmp: Path) -> None:
    (tmp / "cache").mkdir()
    (tmp / "cache" / "mnist1d_n600_split0.8_seed42.npz").write_bytes(os.urandom(300))


def _not_writable(tmp: Path) -> None:
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o555)


def _has_gpu() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False

# id -> (overrides, words the error line must contain, setup, use experiment=smoke, results_dir)
# "{tmp}" is the case's temporary directory, "{results}" its results_dir.
BAD_INPUT = {
    "p_out_of_range": (["regularizer=dropout", "regularizer.p=1.5"], ["regularizer.p=1.5", "[0, 1)"], None),
    "epochs_zero": (["epochs=0"], ["epochs=0", "positive"], None),
    "batch_size_negative": (["batch_size=-8"], ["batch_size=-8", "positive"], None),
    "lr_zero": (["optimizer.lr=0"], ["optimizer.lr=0", "(0, 1e+06]"], None),
    "lr_negative": (["optimizer.lr=-0.1"], ["optimizer.lr=-0.1", "(0, 1e+06]"], None),
    "unknown_dataset": (["dataset=imagenet"], ["'imagenet'", "mnist1d"], None),
    "unknown_model": (["model=resnet9"], ["'resnet9'", "mlp"], None),
    "unknown_regularizer": (["regularizer=dropblock"], ["'dropblock'", "dropout"], None),
    # logreg has no hidden layer for dropout to act on (smoke gives the MLP one, so clear it)
    "incompatible_combination": (["model=logreg", "model.hidden=[]", "regularizer=dropout"],
                                 ["dropout", "logreg"], None),
    "cuda_without_gpu": (["device=cuda"], ["device=cuda", "cpu"], None),
    "cuda_index_out_of_range": (["device=cuda:99"], ["device=cuda:99"], None),
    "corrupt_mnist1d_cache": (["dataset.num_samples=600", "dataset.cache_dir={tmp}/cache"],
                              ["mnist1d_n600_split0.8_seed42.npz", "unreadable"], _corrupt_cache),
    "garbage_idx_files": (["dataset=mnist", "dataset.download=false", "dataset.root={tmp}/data"],
                          ["MNIST", "corrupt"], _garbage_mnist),
    "results_dir_under_a_file": (["results_dir={tmp}/afile/results"], ["afile"],
                                 lambda tmp: (tmp / "afile").write_text("not a directory")),
    "results_dir_not_writable": (["results_dir={tmp}/locked/results"], ["locked"], _not_writable),
    "override_syntax": (["epochs=[1,"], ["[1,"], None),
    "unknown_key": (["regularizer.nonexistent=1"], ["regularizer.nonexistent"], None),
    "bad_optimizer_argument": (["optimizer=sgd", "optimizer.momentum=-1"], ["optimizer.momentum=-1", "[0, 1)"], None),
    "resume_not_a_boolean": (["resume=maybe"], ["resume='maybe'", "true or false"], None),
    "sweep_with_bad_value": (["-m", "regularizer=dropout", "regularizer.p=1.5,0.5", "epochs=1"],
                             ["regularizer.p=1.5"], None),
}
SKIP = {
    "cuda_without_gpu": _has_gpu(),
    "results_dir_not_writable": ROOT,  # root writes anywhere; results_dir_under_a_file covers root
}
NO_SMOKE = {"garbage_idx_files"}  # smoke sets mnist1d's num_samples, which torchvision datasets lack


# Cases run through the real entry point, `python -m dropbench.cli`, one process each; the others
# run in processes forked from one that imported dropbench (and torch) once: each is still its own
# process with its own exit status and stderr, running dropbench.cli.main(argv) as the `dropbench`
# script does, with the interpreter's handling of an uncaught exception (traceback, exit 1).
REAL_PROCESS = {"unknown_key", "results_dir_under_a_file"}

FORK_SERVER = r"""
import json, os, sys, traceback
import dropbench.cli, dropbench.train  # the costly imports, once; no torch op runs in this process
from hydra.core.plugins import Plugins

Plugins.instance()  # Hydra's plugin discovery, once

def child(case):
    os.chdir(case["cwd"])
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code = 0
    try:
        dropbench.cli.main(case["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

cases, running, codes = json.load(sys.stdin), {}, {}
sys.stdout.flush()
sys.stderr.flush()
for i, case in enumerate(cases):
    while len(running) >= 3:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    pid = os.fork()
    if pid == 0:
        child(case)
    running[pid] = i
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(cases))]))
"""


def _prepare_bad_input(case: str, tmp: Path) -> tuple[list[str], Path, list[Path]]:
    overrides, _, setup = BAD_INPUT[case]
    if setup:
        setup(tmp)
    before = sorted(tmp.rglob("*"))
    results = tmp / "results"
    args = [a.format(tmp=tmp) for a in overrides]
    if not any(a.startswith("results_dir=") for a in args):
        args += [f"results_dir={results}", f"hydra.run.dir={results}/run", f"hydra.sweep.dir={results}/sweep"]
    else:
        results = Path(next(a for a in args if a.startswith("results_dir=")).split("=", 1)[1])
    return train_cmd(*args, smoke=case not in NO_SMOKE), results, before


@pytest.fixture(scope="module")
def bad_input_results(request, tmp_path_factory):
    """case -> (CompletedProcess, results_dir, files before, case dir) for every selected case."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input" and hasattr(item, "callspec")}
    cases = [c for c in BAD_INPUT if c in selected and not SKIP.get(c)]
    base = tmp_path_factory.mktemp("bad_input")
    capture = tmp_path_factory.mktemp("bad_input_output")
    prepared = {}
    for c in cases:
        (base / c).mkdir()
        prepared[c] = _prepare_bad_input(c, base / c)
    forked = [c for c in cases if c not in REAL_PROCESS]
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=capture)
    jobs = [{"argv": prepared[c][0][3:], "cwd": str(base / c), "stdout": str(capture / f"{c}.out"),
             "stderr": str(capture / f"{c}.err")} for c in forked]
    with ThreadPoolExecutor(max_workers=3) as pool:
        real = {c: pool.submit(run, prepared[c][0], base / c) for c in cases if c in REAL_PROCESS}
        out, err = server.communicate(json.dumps(jobs), timeout=TIMEOUT)
        assert server.returncode == 0, err
        procs = {c: f.result() for c, f in real.items()}
    for c, code in zip(forked, json.loads(out.splitlines()[-1])):
        procs[c] = subprocess.CompletedProcess(prepared[c][0], code, (capture / f"{c}.out").read_text(),
                                               (capture / f"{c}.err").read_text())
    for c in cases:  # let pytest clean up
        for p in (base / c).rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
    return {c: (procs[c], prepared[c][1], prepared[c][2], base / c) for c in cases}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(case, bad_input_results):
    if SKIP.get(case):
        pytest.skip("not applicable on this machine (GPU present, or running as root)")
    proc, results, before, tmp = bad_input_results[case]
    words = BAD_INPUT[case][1]
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dropbench"), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    # nothing written: no run directory left under results_dir, nothing new anywhere in the case dir
    assert not results.exists() or not any(results.rglob("*")), sorted(results.rglob("*"))
    after = sorted(p for p in tmp.rglob("*") if p != results and results not in p.parents)
    assert after == before


# -- atomic results ---------------------------------------------------------------------------------

def test_read_summary_never_returns_a_half_written_file(tmp_path):
    row = {"format": 1, "run_id": "abc", "run_key": "k1", "group_key": "g1", "status": "ok", "dataset": "mnist1d",
           "error": 'a "quoted",\nmulti-line message', "test_acc": 0.5}
    full = tmp_path / "summary.csv"
    write_csv(full, [row], list(row))
    assert read_summary(full)["run_key"] == "k1"
    data = full.read_bytes()
    cut = tmp_path / "cut" / "summary.csv"
    cut.parent.mkdir()
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        assert read_summary(cut) is None, data[:n]
    rows = [{"epoch": e, "split": s, "loss": 1.0 / e, "accuracy": 0.5, "entropy": 2.0, "seconds": 0.1}
            for e in (1, 2) for s in ("train", "test")]
    write_csv(tmp_path / "metrics.csv", rows, METRICS_COLUMNS)
    data = (tmp_path / "metrics.csv").read_bytes()
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        parsed = read_csv_rows(cut)
        assert parsed is None or all(len(r) == len(METRICS_COLUMNS) for r in parsed)
    assert read_summary(tmp_path / "missing.csv") is None


def _check_incomplete_or_complete(run_dir: Path, epochs: int) -> int:
    """A killed run's directory: a complete run (valid summary) or an incomplete one (no summary;
    metrics.csv, if any, parses fully with complete, consecutive epochs). Returns epochs recorded."""
    summary = run_dir / "summary.csv"
    if summary.exists():
        row = read_summary(summary)
        assert row is not None and row["status"] in ("ok", "interrupted"), row
        if row["status"] == "ok":
            assert int(row["epochs_completed"]) == epochs
    if not (run_dir / "metrics.csv").exists():
        return 0
    rows = read_csv_rows(run_dir / "metrics.csv")
    assert rows is not None, (run_dir / "metrics.csv").read_text()
    for row in rows:
        assert set(row) == set(METRICS_COLUMNS) and all(row[c] != "" for c in METRICS_COLUMNS), row
        float(row["loss"]), float(row["accuracy"])
    recorded = sorted({int(r["epoch"]) for r in rows})
    assert recorded == list(range(1, len(recorded) + 1))
    assert [r["split"] for r in rows] == ["train", "val", "test"] * len(recorded)
    if (run_dir / "checkpoint.json").exists():
        info = json.loads((run_dir / "checkpoint.json").read_text())
        assert info["run_keys"]
    return len(recorded)


def test_killed_anytime_then_resumed_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL at a random moment, then SIGINT, then resume=true to the end: every stop leaves a
    complete or an incomplete run, never a broken file, and the resumed run's metrics equal those
    of an uninterrupted run (batch order and dropout masks included)."""
    epochs = 40
    args = ["regularizer=dropout", "schedule=cosine", f"epochs={epochs}"]
    reference = start(train_cmd(*args, f"results_dir={tmp_path}/ref", f"hydra.run.dir={tmp_path}/ref/run"),
                      tmp_path)
    results, run_dir = tmp_path / "results", tmp_path / "results" / "run0"
    rng = random.Random(0)
    last_epoch = 0
    for attempt, how in enumerate([signal.SIGKILL, signal.SIGINT]):
        extra = ["resume=true"] if attempt else []
        proc = start(train_cmd(*args, *extra, f"results_dir={results}", f"hydra.run.dir={results}/run{attempt}"),
                     tmp_path)

        def checkpointed_further(done=last_epoch):
            rows = read_csv_rows(run_dir / "metrics.csv") if (run_dir / "checkpoint.pt").exists() else None
            return rows is not None and len(rows) // 3 > done  # train, val and test rows per epoch

        wait_for(checkpointed_further, proc, f"a new checkpoint (attempt {attempt})")
        time.sleep(rng.uniform(0.0, 0.05))  # anywhere in an epoch: training, metrics.csv, checkpoint
        proc.send_signal(how)
        rc, out, err = finish(proc)
        assert "Traceback" not in err, err
        if how == signal.SIGINT:
            assert rc == 130 and "interrupted" in err, (rc, err)
            assert read_summary(run_dir / "summary.csv")["status"] == "interrupted"
        else:
            assert rc == -signal.SIGKILL
        last_epoch = _check_incomplete_or_complete(run_dir, epochs)
        assert 0 < last_epoch < epochs, "the run was not stopped mid-way; make it longer"
        if attempt:  # the resumed attempt wrote into the original run directory, not its own
            assert not (results / f"run{attempt}" / "metrics.csv").exists()

    proc = run(train_cmd(*args, "resume=true", f"results_dir={results}", f"hydra.run.dir={results}/run9"),
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    row = read_summary(run_dir / "summary.csv")
    assert row["status"] == "ok" and int(row["epochs_completed"]) == epochs and row["resumed_from_epoch"]
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "checkpoint.json").exists()
    assert not (results / "run9").exists()
    assert not list(run_dir.glob(".*.tmp")), list(run_dir.glob(".*.tmp"))

    rc, out, err = finish(reference)
    assert rc == 0, err
    assert metrics_without_seconds(run_dir / "metrics.csv") == metrics_without_seconds(tmp_path / "ref/run/metrics.csv")
    ref = read_summary(tmp_path / "ref/run/summary.csv")
    assert ref["run_key"] == row["run_key"] and ref["test_acc"] == row["test_acc"]


# -- divergence and failures ------------------------------------------------------------------------

def test_divergence_stops_the_run_and_the_sweep_goes_on(tmp_path):
    results = tmp_path / "results"
    proc = run(train_cmd("-m", "optimizer=sgd", "optimizer.lr=1e6,0.1", "epochs=5", f"results_dir={results}",
                         f"hydra.sweep.dir={results}/sweep"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = {r["lr"]: (d, r) for d, r in summaries(results).items()}
    assert set(rows) == {"1000000.0", "0.1"}
    run_dir, diverged = rows["1000000.0"]
    assert diverged["status"] == "diverged"
    assert 1 <= int(diverged["diverged_epoch"]) <= 5
    assert int(diverged["epochs_completed"]) == int(diverged["diverged_epoch"]) - 1 < 5  # stopped early
    assert not (run_dir / "checkpoint.pt").exists()
    assert rows["0.1"][1]["status"] == "ok" and int(rows["0.1"][1]["epochs_completed"]) == 5


# The failing job (seed 1) raises in its 3rd epoch; the sweep must record it and run the next job.
INJECT_FAILURE = """
import sys
import dropbench.replicas as replicas

original = replicas.ReplicaGenerators.permutations
calls = {}

def permutations(self, n):
    calls[id(self)] = calls.get(id(self), 0) + 1
    if self.seeds == [1] and calls[id(self)] == 3:
        raise RuntimeError("injected failure in epoch 3")
    return original(self, n)

replicas.ReplicaGenerators.permutations = permutations
from dropbench.cli import main
main(sys.argv[1:])
"""


def test_exception_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    results = tmp_path / "results"
    cmd = train_cmd("-m", "seed=1,0", "epochs=4", f"results_dir={results}", f"hydra.sweep.dir={results}/sweep")
    proc = run([sys.executable, "-c", INJECT_FAILURE, *cmd[3:]], tmp_path)
    assert proc.returncode == 1, proc.stderr  # the sweep finished but a job failed
    assert "Traceback" not in proc.stderr and "run failed" in proc.stderr
    rows = {r["seed"]: (d, r) for d, r in summaries(results).items()}
    failed_dir, failed = rows["1"]
    assert failed["status"] == "failed" and "injected failure in epoch 3" in failed["error"]
    assert failed["epochs_completed"] == "2"
    assert len(read_csv_rows(failed_dir / "metrics.csv")) == 2 * 3  # train, val, test per epoch
    assert (failed_dir / "checkpoint.pt").exists()  # a failed run can be resumed
    assert rows["0"][1]["status"] == "ok" and rows["0"][1]["epochs_completed"] == "4"


# -- interruption -----------------------------------------------------------------------------------

def test_sigterm_stops_a_sweep_cleanly_and_a_rerun_completes_it(tmp_path):
    results = tmp_path / "results"
    sweep = ["-m", "seed=0,1,2", "epochs=30", f"results_dir={results}"]
    proc = start(train_cmd(*sweep, f"hydra.sweep.dir={results}/first"), tmp_path)

    def second_job_checkpointed():
        done = [read_summary(p) for p in (results / "first").rglob("summary.csv")]
        running = [p for p in (results / "first").rglob("checkpoint.pt") if not (p.parent / "summary.csv").exists()]
        return any(r and r["status"] == "ok" for r in done) and running

    wait_for(second_job_checkpointed, proc, "the second job's first checkpoint")
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert rc == 143, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("dropbench train: interrupted")
    rows = {r["seed"]: (d, r) for d, r in summaries(results).items()}
    assert set(rows) == {"0", "1"}
    assert rows["0"][1]["status"] == "ok"
    stopped_dir, stopped = rows["1"]
    assert stopped["status"] == "interrupted"
    assert 1 <= int(stopped["epochs_completed"]) < 30
    assert len(read_csv_rows(stopped_dir / "metrics.csv")) == 3 * int(stopped["epochs_completed"])
    assert (stopped_dir / "checkpoint.pt").exists() and (stopped_dir / "checkpoint.json").exists()

    # the same sweep again, into another sweep directory: seed 0 is copied, not trained; 1 and 2 run
    proc = run(train_cmd(*sweep, f"hydra.sweep.dir={results}/second"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "already finished" in proc.stdout and "resume=true continues it" in proc.stdout
    second = {r["seed"]: r for r in summaries(results / "second").values()}
    assert sorted(second) == ["0", "1", "2"]
    assert second["0"]["run_id"] == rows["0"][1]["run_id"]  # the finished run itself
    assert all(r["status"] == "ok" and r["epochs_completed"] == "30" for r in second.values())
    everything = summaries(results)
    assert len({r["run_key"] for r in everything.values() if r["status"] == "ok"}) == 3


# -- parallel jobs ----------------------------------------------------------------------------------

def test_joblib_jobs_share_a_sweep_dir_safely_while_readers_read(tmp_path):
    results = tmp_path / "results"
    sweep_dir = results / "sweep"
    proc = start(train_cmd("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1,2,3", "epochs=3",
                           f"results_dir={results}", f"hydra.sweep.dir={sweep_dir}", threads="auto"), tmp_path)
    try:
        from dropbench import report
    except ImportError:
        report = None
    errors, reads = [], [0]

    def read_while_writing():
        last_report = 0.0
        while proc.poll() is None:
            try:
                for path in sweep_dir.rglob("summary.csv"):
                    row = read_summary(path)
                    assert row is None or row["status"] == "ok"
                for path in sweep_dir.rglob("metrics.csv"):
                    read_csv_rows(path)
                if report is not None and sweep_dir.is_dir() and time.monotonic() - last_report > 1.0:
                    report.main([str(sweep_dir), "--out", str(tmp_path / "report")])  # 0 or 1, never a crash
                    last_report = time.monotonic()
                reads[0] += 1
            except FileNotFoundError:  # a temporary file renamed away between listing and reading
                continue
            except BaseException as error:  # noqa: BLE001 - any crash of a reader fails the test
                errors.append(error)
                return
            time.sleep(0.05)

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    rc, out, err = finish(proc)
    reader.join()
    assert rc == 0, err
    assert not errors, errors
    assert reads[0] > 0
    rows = summaries(sweep_dir)
    assert len(rows) == 4 and len({r["run_key"] for r in rows.values()}) == 4
    assert sorted(r["seed"] for r in rows.values()) == ["0", "1", "2", "3"]
    expected_threads = max(1, (os.cpu_count() or 1) // 2)
    for run_dir, row in rows.items():
        assert row["status"] == "ok" and row["threads"] == str(expected_threads)
        assert len(read_csv_rows(run_dir / "metrics.csv")) == 9
    assert not list(sweep_dir.rglob("*.tmp"))


# -- in-process checks ------------------------------------------------------------------------------

def test_threads_per_job():
    from dropbench.runs import threads_for_job

    cores = os.cpu_count() or 1
    assert threads_for_job("auto", 1) == cores
    assert threads_for_job("auto", 2) == max(1, cores // 2)
    assert threads_for_job("auto", 4 * cores) == 1
    assert threads_for_job(3, 2) == 3


def test_parallel_jobs_from_the_launcher_config():
    from omegaconf import OmegaConf

    from dropbench.cli import _parallel_jobs

    cores = os.cpu_count() or 1
    assert _parallel_jobs(OmegaConf.create({"launcher": {"n_jobs": 2}})) == 2
    assert _parallel_jobs(OmegaConf.create({"launcher": {"n_jobs": -1}})) == cores
    assert _parallel_jobs(OmegaConf.create({"launcher": {}})) == 1


def test_finished_jobs_are_skipped_unless_forced(tmp_path):
    from hydra import compose, initialize_config_module

    from dropbench.runs import train_job

    with initialize_config_module("dropbench.conf", version_base="1.3"):
        def cfg(*extra):
            return compose("config", [*SMOKE, "threads=1", "epochs=1", f"results_dir={tmp_path}", *extra])

        assert train_job(cfg(), tmp_path / "a", multirun=True).status == "ok"
        assert train_job(cfg(), tmp_path / "b", multirun=True).status == "skipped"
        assert train_job(cfg("resume=true"), tmp_path / "c", multirun=False).status == "skipped"
        assert train_job(cfg("force=true"), tmp_path / "d", multirun=True).status == "ok"
        assert train_job(cfg("seed=1"), tmp_path / "e", multirun=True).status == "ok"
    runs = {p.parent.name: read_summary(p) for p in tmp_path.rglob("summary.csv")}
    assert sorted(runs) == ["a", "b", "c", "d", "e"]
    assert runs["b"]["run_id"] == runs["c"]["run_id"] == runs["a"]["run_id"]  # copies of the finished run
    assert len({runs[k]["run_id"] for k in "ade"}) == 3  # trained
    with open(tmp_path / "a" / "summary.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["threads"] == "1" and row["resumed_from_epoch"] == ""


def test_a_finished_run_dir_is_never_reused_unless_forced(tmp_path):
    run_dir = tmp_path / "results" / "fixed"
    first = run(train_cmd(f"results_dir={tmp_path}/results", f"hydra.run.dir={run_dir}"), tmp_path)
    assert first.returncode == 0, first.stderr
    before = (run_dir / "summary.csv").read_text()
    again = run(train_cmd("seed=1", f"results_dir={tmp_path}/results", f"hydra.run.dir={run_dir}"), tmp_path)
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1 and "already holds a finished run" in lines[0], again.stderr
    assert (run_dir / "summary.csv").read_text() == before
    forced = run(train_cmd("seed=1", "force=true", f"results_dir={tmp_path}/results", f"hydra.run.dir={run_dir}"),
                 tmp_path)
    assert forced.returncode == 0 and read_summary(run_dir / "summary.csv")["seed"] == "1"


def test_a_loss_far_above_chance_is_divergence_not_a_result(tmp_path):
    """Adam at lr=1e6 once reached a loss of 4.6e16 and was recorded `ok`."""
    from hydra import compose, initialize_config_module

    from dropbench.runs import train_job

    with initialize_config_module("dropbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "optimizer=adam", "optimizer.lr=1e6", "epochs=3",
                                           "progress=false", "threads=1", f"results_dir={tmp_path}"])
    result = train_job(cfg, tmp_path / "run", multirun=False)
    row = read_summary(tmp_path / "run" / "summary.csv")
    assert result.status == "diverged" and row["status"] == "diverged" and row["diverged_epoch"] == "1"


def test_settings_outside_the_run_identity_change_no_number(tmp_path):
    """NOT_IDENTITY lists what does not change a run's numbers: changing those leaves every metric and
    the run_key as they were."""
    from hydra import compose, initialize_config_module

    from dropbench.runs import train_job

    def once(name, *overrides):
        with initialize_config_module("dropbench.conf", version_base="1.3"):
            cfg = compose("config", overrides=["experiment=smoke", "threads=1", *overrides])
        assert train_job(cfg, tmp_path / name, multirun=False).status == "ok"
        return metrics_without_seconds(tmp_path / name / "metrics.csv"), read_summary(tmp_path / name / "summary.csv")

    a, row_a = once("a", "progress=false", f"results_dir={tmp_path}/r1")
    b, row_b = once("b", "progress=true", "keep_checkpoint=true", "checkpoint_every=2", f"results_dir={tmp_path}/r2",
                    "dataset.device_budget_gb=0", f"dataset.cache_dir={tmp_path}/cache")
    assert a == b and row_a["run_key"] == row_b["run_key"] and row_a["group_key"] == row_b["group_key"]


def test_a_checkpoint_of_format_2_still_resumes(tmp_path, monkeypatch):
    """Format 2 (dropbench 0.2) kept each seed's metrics rows themselves and no run keys; format 3
    keeps the metrics.csv text. Such a checkpoint resumes to the numbers of a run never stopped."""
    import torch
    from hydra import compose, initialize_config_module

    from dropbench import runs
    from dropbench.results import metrics_rows

    def config(*overrides):
        with initialize_config_module("dropbench.conf", version_base="1.3"):
            return compose("config", overrides=["experiment=smoke", "epochs=4", "threads=1", "progress=false",
                                                "regularizer=dropout", "parallel_seeds=2", *overrides])

    whole = runs.train_job(config(f"results_dir={tmp_path}/whole"), tmp_path / "whole", multirun=False)
    with stopped_in_epoch(monkeypatch, 3):
        runs.train_job(config(f"results_dir={tmp_path}/r"), tmp_path / "r" / "a", multirun=False)
    path = tmp_path / "r" / "a" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == 3 and checkpoint["epoch"] == 2
    checkpoint["format"] = 2
    for seed in checkpoint["seeds"]:
        seed["rows"] = metrics_rows(seed.pop("metrics_csv"))
        assert [row["epoch"] for row in seed["rows"]] == [1, 1, 1, 2, 2, 2]  # train, val, test
        del seed["run_key"]
    torch.save(checkpoint, path)
    resumed = runs.train_job(config(f"results_dir={tmp_path}/r", "resume=true"), tmp_path / "r" / "b", multirun=False)
    assert resumed.status == "ok" and resumed.run_dir == tmp_path / "r" / "a"
    for seed in ("seed_0", "seed_1"):
        assert read_summary(resumed.run_dir / seed / "summary.csv")["resumed_from_epoch"] == "2"
        assert metrics_without_seconds(resumed.run_dir / seed / "metrics.csv") == metrics_without_seconds(
            whole.run_dir / seed / "metrics.csv")


def test_checkpoint_every_n_epochs_resumes_from_the_last_one_written(tmp_path, monkeypatch):
    """checkpoint_every=2: checkpoints after epochs 2, 4 and the last; a run stopped during epoch 3
    resumes after epoch 2 and ends with the numbers of a run never stopped."""
    import torch
    from hydra import compose, initialize_config_module

    from dropbench import runs

    def config(*overrides):
        with initialize_config_module("dropbench.conf", version_base="1.3"):
            return compose("config", overrides=["experiment=smoke", "epochs=5", "threads=1", "progress=false",
                                                "regularizer=dropout", *overrides])

    saved, save = [], runs._save_checkpoint
    monkeypatch.setattr(runs, "_save_checkpoint", lambda state, rs, run, epoch, *a: (saved.append(epoch),
                                                                                      save(state, rs, run, epoch, *a)))
    whole = runs.train_job(config(f"results_dir={tmp_path}/whole", "checkpoint_every=2", "keep_checkpoint=true"),
                           tmp_path / "whole", multirun=False)
    assert whole.status == "ok" and saved == [2, 4, 5]
    assert torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["epoch"] == 5

    with stopped_in_epoch(monkeypatch, 3):
        runs.train_job(config(f"results_dir={tmp_path}/r", "checkpoint_every=2"), tmp_path / "r" / "a", multirun=False)
    assert read_summary(tmp_path / "r" / "a" / "summary.csv")["status"] == "interrupted"
    resumed = runs.train_job(config(f"results_dir={tmp_path}/r", "checkpoint_every=2", "resume=true"),
                             tmp_path / "r" / "b", multirun=False)
    assert resumed.status == "ok" and resumed.run_dir == tmp_path / "r" / "a"
    assert read_summary(resumed.run_dir / "summary.csv")["resumed_from_epoch"] == "2"
    assert metrics_without_seconds(resumed.run_dir / "metrics.csv") == metrics_without_seconds(
        tmp_path / "whole" / "metrics.csv")
