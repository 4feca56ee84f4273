"""An installed (non-editable) copy finds its config tree: conf/ is shipped inside the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_conf_and_trains_from_anywhere(tmp_path):
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", REPO],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("dropbench-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True,
                   capture_output=True)
    assert (tmp_path / "site" / "dropbench" / "conf" / "regularizer" / "dropout.yaml").is_file()

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    where = subprocess.run([sys.executable, "-c", "import dropbench; print(dropbench.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(tmp_path / "site"))  # the installed copy, not the checkout
    run = subprocess.run([sys.executable, "-m", "dropbench.cli", "train", "experiment=smoke", "threads=1",
                          f"hydra.run.dir={tmp_path}/run"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "summary.csv").is_file()
