"""The CLI end to end, as a user runs it: smoke run, result files, determinism, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import read_csv, run_cli

from dropbench.results import METRICS_COLUMNS, SUMMARY_COLUMNS

SMOKE = ["experiment=smoke", "threads=1"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = run_cli("train", *SMOKE, f"results_dir={out}", f"hydra.run.dir={out}/run")
    assert proc.returncode == 0, proc.stderr
    return out / "run", proc


def test_smoke_run_writes_tidy_csvs(smoke_run):
    run_dir, proc = smoke_run
    metrics = read_csv(run_dir / "metrics.csv")
    assert list(metrics[0]) == METRICS_COLUMNS
    assert [(r["epoch"], r["split"]) for r in metrics] == [(e, s) for e in "12" for s in ("train", "val", "test")]
    for row in metrics:
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["loss"]) > 0 and float(row["seconds"]) >= 0
    (summary,) = read_csv(run_dir / "summary.csv")
    assert list(summary)[: len(SUMMARY_COLUMNS)] == SUMMARY_COLUMNS
    assert summary["status"] == "ok" and summary["dataset"] == "mnist1d" and summary["model"] == "mlp"
    assert summary["regularizer"] == "none" and summary["p"] == "" and summary["seed"] == "0"
    assert summary["epochs"] == "2" and summary["batch_size"] == "64" and summary["epochs_completed"] == "2"
    last_train, last_val, last_test = metrics[-3:]
    assert float(summary["train_acc"]) == float(last_train["accuracy"])
    assert float(summary["val_acc"]) == float(last_val["accuracy"])
    assert float(summary["test_acc"]) == float(last_test["accuracy"])
    assert float(summary["gap"]) == pytest.approx(float(last_train["accuracy"]) - float(last_test["accuracy"]))
    # the epoch is selected on validation accuracy; the test accuracy is the one at that epoch
    val = [r for r in metrics if r["split"] == "val"]
    best = max(val, key=lambda r: float(r["accuracy"]))
    assert summary["best_epoch"] == best["epoch"] and float(summary["best_val_acc"]) == float(best["accuracy"])
    test_at_best = next(r for r in metrics if r["split"] == "test" and r["epoch"] == best["epoch"])
    assert float(summary["test_acc_at_best"]) == float(test_at_best["accuracy"])
    assert 0 <= float(summary["test_ece"]) <= 1 and float(summary["seconds_per_epoch"]) > 0
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "Traceback" not in proc.stderr
    # not a terminal: one plain line per epoch, so that a cluster log shows life
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[:3] for line in lines] == [["epoch", "1/2", "train_acc"], ["epoch", "2/2", "train_acc"]]
    assert "val_acc" in lines[0] and "test_acc" in lines[0] and lines[0].endswith(" s")


def test_same_seed_gives_identical_metrics(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    proc = run_cli("train", *SMOKE, f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/again")
    assert proc.returncode == 0, proc.stderr

    def values(path):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_csv(path)]

    assert values(run_dir / "metrics.csv") == values(tmp_path / "again" / "metrics.csv")
    other = run_cli("train", *SMOKE, "seed=1", f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/seed1")
    assert values(tmp_path / "seed1" / "metrics.csv") != values(run_dir / "metrics.csv"), other.stderr


def test_cfg_job_prints_composed_config(tmp_path):
    proc = run_cli("train", "--cfg", "job", "regularizer=dropout", "regularizer.p=0.3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "_target_: dropbench.data.load_mnist1d" in proc.stdout and "p: 0.3" in proc.stdout
    assert not (tmp_path / "results").exists()


def test_help_and_list_do_not_import_torch():
    code = ("import sys; from dropbench import cli; cli.list_choices(); print(cli.USAGE); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "regularizer: " in proc.stdout and "dropbench train" in proc.stdout


def test_train_help_is_hydras():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0 and "Configuration groups" in proc.stdout and "regularizer:" in proc.stdout


@pytest.mark.parametrize("override, message", [
    ("epochs=-1", "epochs=-1 is not allowed"),
    ("dataset=nope", "unknown dataset 'nope'; choose from: cifar10, csv, digits, fashion_mnist, imagefolder, mnist, "
                     "mnist1d, npz, torchvision"),
    ("device=cuda", "device=cuda is not available"),
    ("cuda_graph=true", "cuda_graph=true needs a CUDA GPU, but this run trains on cpu"),
])
def test_bad_values_give_one_line_and_write_nothing(tmp_path, override, message):
    proc = run_cli("train", *SMOKE, override, f"results_dir={tmp_path}/results")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not any((tmp_path / "results").rglob("*")) if (tmp_path / "results").exists() else True


def test_no_arguments_prints_usage_and_fails():
    proc = run_cli()
    assert proc.returncode == 2 and "usage: dropbench" in proc.stderr


def test_own_config_dir_adds_a_dataset_choice(tmp_path):
    (tmp_path / "myconf" / "dataset").mkdir(parents=True)
    (tmp_path / "myconf" / "dataset" / "tiny.yaml").write_text(
        "defaults: [mnist1d, _self_]\nname: tiny\nnum_samples: 300\n")
    proc = run_cli("train", "--config-dir", str(tmp_path / "myconf"), "dataset=tiny", *SMOKE, "progress=false",
                   f"results_dir={tmp_path}/r", f"hydra.run.dir={tmp_path}/r/run")
    assert proc.returncode == 0, proc.stderr
    (summary,) = read_csv(tmp_path / "r" / "run" / "summary.csv")
    assert summary["dataset"] == "tiny" and summary["cfg.dataset.num_samples"] == "300"


def test_shell_completion_installs_and_completes(tmp_path):
    install = run_cli("train", "--shell-completion", "install=bash")
    assert install.returncode == 0 and "hydra_bash_completion dropbench" in install.stdout, install.stderr
    env_line = "dropbench train regularizer=dro"
    proc = subprocess.run([sys.executable, "-m", "dropbench.cli", "-sc", "query=bash"], capture_output=True, text=True,
                          env={**__import__("os").environ, "COMP_LINE": env_line, "COMP_POINT": str(len(env_line))})
    assert proc.returncode == 0, proc.stderr
    assert "regularizer=dropout" in proc.stdout.split() and "regularizer=dropconnect" in proc.stdout.split()


def test_hydra_searchpath_adds_a_model_choice_from_a_users_package_dir(tmp_path):
    (tmp_path / "extra" / "model").mkdir(parents=True)
    (tmp_path / "extra" / "model" / "wide.yaml").write_text("defaults: [mlp, _self_]\nname: wide\nhidden: [64]\n")
    proc = run_cli("train", f"hydra.searchpath=[file://{tmp_path}/extra]", "model=wide", *SMOKE, "progress=false",
                   f"results_dir={tmp_path}/r", f"hydra.run.dir={tmp_path}/r/run")
    assert proc.returncode == 0, proc.stderr
    (summary,) = read_csv(tmp_path / "r" / "run" / "summary.csv")
    assert summary["model"] == "wide" and summary["cfg.model.hidden"] == "[64]"
