"""Shared test helpers: running the CLI as a subprocess, reading result CSVs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

# One torch thread per test process (pytest runs two workers): two processes of two threads each
# on two cores run many times slower than of one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`dropbench ARGS...` in a fresh process, quiet and single-threaded like CI."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dropbench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@contextmanager
def stopped_in_epoch(monkeypatch, epoch: int):
    """Inside it a run is stopped by KeyboardInterrupt (as Ctrl-C would) right after recording `epoch`;
    the block must raise it, and recording is normal again after."""
    from dropbench import runs

    record = runs._record_epoch

    def stop(seed_runs, trackers, recorded, *args):
        record(seed_runs, trackers, recorded, *args)
        if recorded == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "_record_epoch", stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(runs, "_record_epoch", record)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """One MNIST-1D cache for the whole test session (generation takes seconds)."""
    os.environ.setdefault("DROPBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
