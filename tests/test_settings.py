"""The settings schema (dropbench.config.SETTINGS) and hostile input: every setting's range checked
before a run writes anything, keys that nothing reads, command-line mistakes, sweep folders that
stay inside the sweep directory, a full disk, and property-based overrides that must end in one
UserError line naming the key or in a valid run."""

from __future__ import annotations

import errno
import os
import string
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_csv, run_cli
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import dropbench.results
from dropbench.cli import MAX_FOLDER_BYTES, job_folder, parse_train_args, train
from dropbench.config import (
    SETTINGS,
    TOP_LEVEL,
    Choice,
    Either,
    Flag,
    ListOf,
    Null,
    Number,
    Setting,
    UserError,
    check,
    check_run_config,
    check_writable,
    markdown,
    one_line,
    shipped_defaults,
)
from dropbench.data import load_torchvision, write_idx
from dropbench.regularizers.batchnorm import BatchNorm
from dropbench.regularizers.dropout import Dropout
from dropbench.regularizers.rdrop import RDrop
from dropbench.regularizers.standout import Standout
from dropbench.results import DiskFull, atomic_file, write_atomic
from dropbench.runs import train_job
from dropbench.train import build_run, resolve_device

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CPU = torch.device("cpu")
TINY = {"dataset.num_samples": "200", "model.hidden": "[4]", "epochs": "1", "progress": "false", "threads": "1"}


def composed(*overrides: str):
    """The config `dropbench train OVERRIDES` composes, on the tiny defaults (an override replaces them)."""
    keys = {o.lstrip("+").split("=")[0] for o in overrides}
    tiny = [f"{k}={v}" for k, v in TINY.items() if k not in keys and not (k.startswith("model.") and "model" in keys)]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*tiny, *overrides])


def rejection(*overrides: str) -> str:
    """The one-line UserError the overrides end in, before a run writes anything."""
    with pytest.raises(UserError) as error:
        cfg = composed(*overrides)
        check_run_config(cfg)
        build_run(cfg, CPU, [cfg.seed])
    assert "\n" not in str(error.value)
    return str(error.value)


# -- the schema ---------------------------------------------------------------------------------------

def test_every_key_of_the_shipped_configs_is_in_the_schema():
    keys = {s.key for s in SETTINGS}
    assert set(shipped_defaults()) <= keys
    assert set(OmegaConf.load(CONF / "config.yaml")) - {"defaults", "hydra"} == set(TOP_LEVEL)


def test_every_shipped_config_passes_the_checks():
    from dropbench.cli import GROUPS, choices

    overrides = [f"{group}={choice}" for group in GROUPS for choice in choices(group)]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for override in [*overrides, "regularizer=[dropout,maxnorm]", "logger=[tensorboard,mlflow,wandb]"]:
            check_run_config(compose("config", overrides=[override]))


def test_schema_choices_are_the_ones_the_code_takes():
    from dropbench.models import ACTIVATIONS, INITS

    rules = {s.key: s.rule for s in SETTINGS}
    assert rules["model.activation"].options == tuple(ACTIVATIONS) and rules["model.init"].options == INITS


def test_docs_page_matches_the_schema():
    assert (ROOT / "docs" / "settings.md").read_text(encoding="utf-8") == markdown(), \
        "regenerate it: python -m dropbench.config --markdown > docs/settings.md"


def test_every_setting_says_what_it_allows_on_one_line():
    for s in SETTINGS:
        assert s.allowed and s.meaning and "\n" not in s.allowed + s.meaning


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.lr", float("inf"), "optimizer.lr=inf is not allowed; it must be a number in (0, 1e+06]"),
    ("optimizer.lr", 10**400, "it must be a number in (0, 1e+06]"),
    ("optimizer.lr", float("nan"), "it must be a number in (0, 1e+06]"),
    ("seed", 2**70, "seed=1180591620717411303424 is not allowed; it must be a non-negative integer below 2**63"),
    ("seed", 1.0, "it must be a non-negative integer below 2**63"),
    ("epochs", True, "epochs=True is not allowed"),
    ("schedule.gamma", 0, "it must be a number in (0, 1]"),
    ("regularizer.p", [0.5, 1.0], "regularizer.p=[0.5, 1.0] is not allowed; it must be a number in [0, 1) or a list"),
    ("regularizer.p", [], "it must be a number in [0, 1) or a list of numbers in [0, 1)"),
    ("optimizer.betas", [0.9], "it must be a list of 2 numbers in [0, 1)"),
    ("threads", 100_000, "it must be auto or an integer in [1, 1024]"),
    ("progress", "yes", "it must be auto, true or false"),
    ("device", "gpu", "it must be auto, cpu, cuda or cuda:N"),
    ("results_dir", "", "results_dir='' is not allowed; it must be a path"),
    ("regularizer.sigma", -1, "it must be null or a number in [0, 1e+06]"),
    ("dataset.image_size", [0, 4], "it must be null or a list of 2 positive integers"),
])
def test_check_names_key_value_and_range(key, value, message):
    with pytest.raises(UserError) as error:
        check(key, value)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_check_converts_like_the_code_expects():
    assert check("regularizer.p", [0, 0.5]) == [0.0, 0.5] and isinstance(check("optimizer.lr", 1), float)
    assert check("regularizer.sigma", None) is None and check("threads", "auto") == "auto"
    assert check("model.hidden", OmegaConf.create([3, 4])) == [3, 4]


def test_a_key_two_methods_read_differently_has_a_range_per_method():
    assert check("regularizer.alpha", -1.0, "standout") == -1.0
    with pytest.raises(UserError, match=r"regularizer.alpha=-1.0 is not allowed; it must be a finite number >= 0"):
        check("regularizer.alpha", -1.0, "rdrop")


@pytest.mark.parametrize("make, message", [
    (lambda: Dropout(p=1.0), r"regularizer.p=1.0 is not allowed; it must be a number in \[0, 1\)"),
    (lambda: Dropout(input_p=-0.1), r"regularizer.input_p=-0.1 is not allowed"),
    (lambda: BatchNorm(momentum=0), r"regularizer.momentum=0 is not allowed; it must be a number in \(0, 1\]"),
    (lambda: BatchNorm(momentum=1.5), r"regularizer.momentum=1.5 is not allowed"),
    (lambda: RDrop(alpha=-1), r"regularizer.alpha=-1 is not allowed; it must be a finite number >= 0"),
    (lambda: RDrop(kl_reduction="mean"), r"regularizer.kl_reduction='mean' is not allowed; it must be one of"),
    (lambda: Standout(beta=float("inf")), r"regularizer.beta=inf is not allowed; it must be a finite number"),
])
def test_regularizers_check_their_parameters_with_the_schema(make, message):
    with pytest.raises(UserError, match=message):
        make()
    assert Standout(alpha=-2.0).alpha == -2.0  # standout's alpha is any finite number


# -- regressions: values and keys rejected before anything runs ---------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lr=inf"], "optimizer.lr=inf is not allowed; it must be a number in (0, 1e+06]"),
    (["optimizer.lr=1e400"], "optimizer.lr=inf is not allowed; it must be a number in (0, 1e+06]"),
    (["schedule=step", "schedule.gamma=-1"], "schedule.gamma=-1 is not allowed; it must be a number in (0, 1]"),
    (["optimizer=sgd", "optimizer.momentum=-1"], "optimizer.momentum=-1 is not allowed; it must be a number in [0, 1)"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 is not allowed; it must be a number in [0, 1e+06]"),
    ([f"seed={2**70}"], "seed=1180591620717411303424 is not allowed; it must be a non-negative integer below 2**63"),
    ([f"seed={2**63 - 1}", "parallel_seeds=2"], "the last seed must be below 2**63"),
    (["schedule=step", "schedule.step_size=0"], "schedule.step_size=0 is not allowed"),
    (["model.hidden=abc"], "model.hidden='abc' is not allowed"),
    (["+epoch=5"], "epoch=5 is not a setting; did you mean epochs?"),
    (["+note=x"], "note='x' is not a setting (every setting: docs/settings.md)"),
    (["regularizer=dropout", "+regularizer.alpha=2"],
     "regularizer.alpha=2 is not read by regularizer dropout (it reads regularizer.p, regularizer.input_p"),
    (["regularizer=dropout", "+regularizer.inputp=0.2"], "did you mean regularizer.input_p?"),
    (["+schedule.gamma=0.5"], "schedule.gamma=0.5 is not read by schedule none (it reads none)"),
    (["model=custom", "+model.width=3"], "model.width=3 is not read by model custom; did you mean model.module.width?"),
    (["+dataset.val_fracton=0.2"], "dataset.val_fracton=0.2 is not an argument of load_mnist1d; "
                                   "did you mean dataset.val_fraction?"),
    (["+optimizer.beta=[0.9,0.99]"], "did you mean optimizer.betas?"),
    (["regularizer=dropout", "+regularizer.methods.dropout.q=1"], "regularizer.methods.dropout.q=1 is not an argument"),
])
def test_bad_values_and_unread_keys_are_one_line(overrides, message):
    assert message in rejection(*overrides)


@pytest.mark.parametrize("overrides", [
    ["regularizer=standout", "regularizer.alpha=-1"],
    ["+optimizer.betas=[0.8,0.9]", "+optimizer.amsgrad=true"],
    ["+tag=a", "dataset.name=${tag}"],  # a key of one's own that another setting refers to is read
    ["model=custom", "model.module._target_=torch.nn.Flatten", "++model.module.start_dim=1"],
])
def test_keys_that_are_read_pass(overrides):
    cfg = composed(*overrides)
    check_run_config(cfg)
    if cfg.model.get("_target_"):
        build_run(cfg, CPU, [cfg.seed])


# -- the command line before Hydra -------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["=3"], "'=3' has no key; an override is KEY=VALUE (e.g. epochs=5)"),
    (["--foo"], "unknown option --foo; settings are KEY=VALUE (e.g. epochs=5), and `dropbench train --help`"),
    (["--multirn"], "did you mean --multirun?"),
    (["--epochs=3"], "did you mean epochs=3? (settings are KEY=VALUE, without dashes)"),
    (["-m", "results_dir=a,b"], "results_dir=a,b would sweep over results_dir"),
    (["-m", "results_dir=range(2)"], "would sweep over results_dir"),
    (["results_dir="], "results_dir='' is not allowed; it must be a path"),
    (["epochs=[1"], "'epochs=[1' is not a valid override: no viable alternative at input '[1'"),
])
def test_command_line_mistakes_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_train_args(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err and message in err


def test_quoted_comma_in_results_dir_is_one_directory():
    flags, args = parse_train_args(["-m", "results_dir='a,b'", "seed=0,1"])
    assert flags == ["-m", "results_dir='a,b'", "seed=0,1"] and args.multirun


def cli_fails_with_one_line(proc, message: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, \
        proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["=3"], "'=3' has no key"),
    (["--foo"], "unknown option --foo"),
    (["+epoch=5"], "epoch=5 is not a setting; did you mean epochs?"),
])
def test_cli_rejects_with_one_line_and_writes_nothing(tmp_path, args, message):
    proc = run_cli("train", *args, "epochs=1", f"results_dir={tmp_path}/r", cwd=tmp_path)
    cli_fails_with_one_line(proc, message)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# -- sweep folders ------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400), st.text(max_size=400))
def test_job_folder_is_one_safe_stable_name(a, b):
    name = job_folder(a)
    assert "/" not in name and "\0" not in name and not name.startswith(".") and len(name.encode()) <= 255
    assert job_folder(a) == name
    if a != b:
        assert job_folder(b) != name
    assert (Path("/sweep") / name).resolve().parent == Path("/sweep") if name else True


def test_config_yaml_names_job_folders_with_the_resolver():
    tree = OmegaConf.load(CONF / "config.yaml")
    tree.hydra.job.override_dirname = "dataset.path=../../../x.npz,seed=1"
    assert tree.hydra.sweep.subdir == "dataset.path=..%2F..%2F..%2Fx.npz,seed=1"
    tree.hydra.job.override_dirname = "dataset.name=" + "x" * 300
    name = tree.hydra.sweep.subdir
    assert len(name.encode()) <= MAX_FOLDER_BYTES and name.startswith("dataset.name=xxx") and "~" in name


def test_sweep_values_with_dot_dot_and_long_names_stay_inside_the_sweep(tmp_path):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    long = "y" * 300
    proc = run_cli("train", "-m", f"dataset.name=../../../../escaped,{long}", "epochs=1", "dataset.num_samples=200",
                   "model.hidden=[4]", "progress=false", "threads=1", "results_dir=out", cwd=work)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (work / "out" / "sweeps").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all(len(j.name.encode()) <= MAX_FOLDER_BYTES for j in jobs)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and sweep not in p.parents]
    assert outside == []
    labels = {read_csv(j / "summary.csv")[0]["dataset"]: j for j in jobs}
    assert set(labels) == {"../../../../escaped", long}
    assert f"dataset.name={long}" in (labels[long] / ".hydra" / "overrides.yaml").read_text()

    proc = run_cli("train", "-m", "+note=../../../../escaped", "epochs=1", "results_dir=out2", cwd=work)
    cli_fails_with_one_line(proc, "note='../../../../escaped' is not a setting")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and sweep not in p.parents]


# -- a full disk ---------------------------------------------------------------------------------------

@pytest.fixture
def full_disk(monkeypatch):
    """Atomic writes of files whose name contains one of `full_disk.names` go to /dev/full (ENOSPC)."""
    real_mkstemp = tempfile.mkstemp

    class Disk:
        names: tuple[str, ...] = ("",)

    def mkstemp(dir, prefix, suffix):
        fd, tmp = real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)
        if any(n in prefix for n in Disk.names):
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, tmp

    monkeypatch.setattr(dropbench.results.tempfile, "mkstemp", mkstemp)
    return Disk


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, full_disk):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with pytest.raises(DiskFull) as error:
        write_atomic(target, "new\n" * 10_000)
    assert str(error.value) == f"no space left on the device while writing {target}"
    assert error.value.errno == errno.ENOSPC and target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    with pytest.raises(DiskFull, match="checkpoint.pt"):  # torch.save reports it as a RuntimeError
        with atomic_file(tmp_path / "checkpoint.pt", "wb") as f:
            torch.save({"w": torch.zeros(100_000)}, f)


def test_a_run_whose_checkpoint_does_not_fit_fails_and_says_so(tmp_path, full_disk):
    full_disk.names = ("checkpoint.pt",)
    cfg = composed("epochs=2", f"results_dir={tmp_path}")
    with pytest.raises(DiskFull, match="while writing .*checkpoint.pt"):
        train_job(cfg, tmp_path / "run", multirun=False)
    (summary,) = read_csv(tmp_path / "run" / "summary.csv")
    assert summary["status"] == "failed" and "no space left on the device while writing" in summary["error"]


def test_a_run_on_a_disk_that_fills_up_claims_no_success(tmp_path, full_disk, capsys, monkeypatch):
    full_disk.names = ("summary.csv", "metrics.csv", "checkpoint")
    cfg = composed(f"results_dir={tmp_path}")
    with pytest.raises(DiskFull):
        train_job(cfg, tmp_path / "run", multirun=False)
    assert not (tmp_path / "run" / "summary.csv").exists()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # the command sets it in its process: recorded, so undone after
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as stop:  # the command: one line, exit 1, not "ok"
        train(["epochs=1", "dataset.num_samples=200", "model.hidden=[4]", "progress=false", "threads=1",
               f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/cli"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and "\n" not in err
    assert err.startswith(f"dropbench train: error: no space left on the device while writing {tmp_path}/cli/")


# -- IDX files whose labels do not match their images --------------------------------------------------

def test_idx_label_file_shorter_than_its_images_is_one_line(tmp_path):
    raw, rng = tmp_path / "MNIST" / "raw", np.random.default_rng(0)
    for split, n_images, n_labels in (("train", 30, 25), ("t10k", 10, 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n_images, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n_labels,)))
    with pytest.raises(UserError, match=r"MNIST files under .*: the train split has 30 images but 25 labels") as e:
        load_torchvision(CPU, name="mnist", root=str(tmp_path), class_name="MNIST")
    assert "\n" not in str(e.value)


# -- property-based: any value of a sample of keys -----------------------------------------------------

# key -> the configs that read it
KEYS = {
    "seed": [], "epochs": [], "batch_size": [], "eval_batch_size": [], "threads": [], "progress": [], "device": [],
    "results_dir": [], "optimizer.lr": [], "optimizer.weight_decay": [], "optimizer.momentum": ["optimizer=sgd"],
    "schedule.gamma": ["schedule=step"], "schedule.step_size": ["schedule=step"], "schedule.T_max": ["schedule=cosine"],
    "schedule.eta_min": ["schedule=cosine"], "regularizer.p": ["regularizer=dropout"],
    "regularizer.alpha": ["regularizer=rdrop"], "regularizer.k": ["regularizer=multisample"],
    "regularizer.lam": ["regularizer=l2"], "regularizer.c": ["regularizer=maxnorm"],
    "regularizer.momentum": ["regularizer=batchnorm"], "regularizer.sigma": ["regularizer=gaussian"],
    "dataset.val_fraction": [], "dataset.split_seed": [], "dataset.device_budget_gb": [], "dataset.name": [],
}
# keys whose valid values all train one epoch of the tiny config quickly (no huge counts)
RUNNABLE = {"seed", "batch_size", "results_dir", "optimizer.lr", "optimizer.weight_decay", "optimizer.momentum",
            "schedule.gamma", "schedule.step_size", "schedule.T_max", "schedule.eta_min", "regularizer.p",
            "regularizer.alpha", "regularizer.lam", "regularizer.c", "regularizer.momentum", "regularizer.sigma",
            "dataset.val_fraction", "dataset.split_seed", "dataset.device_budget_gb", "dataset.name"}
EDGES = ["inf", "-inf", "nan", "1e400", "-1e400", "0", "-0.0", "-1", "1", "0.5", "1.0", "0.999999", "2", str(2**63 - 1),
         str(2**63), str(2**70), "1e-320", "null", "true", "false", "auto", "''", "' '", "[]", "[0.5]", "[0.2,0.5]"]
WORD = st.text(alphabet=string.ascii_letters + string.digits + "._-", max_size=12)
PATH_LIKE = st.lists(st.sampled_from(["..", ".", "a", "b,c", "x y", "..."]), min_size=1, max_size=4).map("/".join)
PLAUSIBLE = ["0.1", "0.01", "1e-3", "0.9", "3", "10", "4096", "[0.1]", "'run'", "auto", "cpu", "false"]
VALUES = st.one_of(
    st.sampled_from(EDGES), st.sampled_from(PLAUSIBLE),
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    WORD, WORD.map(lambda w: f"'{w}'"),
    PATH_LIKE, PATH_LIKE.map(lambda p: f"'{p}'"),
    st.lists(st.one_of(st.floats(-1, 2).map(repr), st.integers(-2, 9).map(str), WORD), max_size=3)
    .map(lambda items: f"[{','.join(items)}]"),
)


def allowed(rule) -> st.SearchStrategy[str]:
    """Override values that `rule` allows (magnitudes kept small enough to train)."""
    if isinstance(rule, Number):
        if rule.integer:
            return st.integers(rule.low, min(rule.high, rule.low + 1000)).map(str)
        high = 1e3 if rule.high is None else rule.high
        return st.floats(rule.low, high, exclude_min=rule.low_open, exclude_max=rule.high_open).map(repr)
    if isinstance(rule, ListOf):
        size = {"min_size": rule.length or rule.min_length, "max_size": rule.length or 3}
        return st.lists(allowed(rule.item), **size).map(lambda items: f"[{','.join(items)}]")
    if isinstance(rule, Either):
        return st.one_of(*(allowed(r) for r in rule.rules))
    if isinstance(rule, Choice):
        return st.sampled_from(rule.options)
    if isinstance(rule, Flag):
        return st.sampled_from(["true", "false"])
    return st.just("null") if isinstance(rule, Null) else WORD.map(lambda w: f"'{w}x'")  # Text


def setting(key: str) -> Setting:
    methods = {o.split("=")[1] for o in KEYS[key] if o.startswith("regularizer=")}
    return next(s for s in SETTINGS if s.key == key and (not s.used_by or methods & set(s.used_by)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A deep working directory, so relative results_dir values (up to three ../) stay in the test's folder."""
    root = tmp_path_factory.mktemp("hostile")
    work = root / "w" / "a" / "b" / "c"
    work.mkdir(parents=True)
    previous = os.getcwd()
    os.chdir(work)
    yield root
    os.chdir(previous)


@pytest.mark.parametrize("overrides", [
    ["optimizer.lr=1e6"], ["optimizer=sgd", "optimizer.lr=1e6"], ["optimizer.weight_decay=1e6"],
    ["optimizer=sgd", "optimizer.weight_decay=1e6"], ["schedule=cosine", "schedule.eta_min=1e6", "epochs=2"],
    ["regularizer=gaussian", "regularizer.sigma=1e6"]])
def test_the_largest_allowed_scales_train_or_diverge(tmp_path, overrides):
    """At the upper bound of a rate or scale the run ends ok or diverged, never failed: the optimizers'
    float32 step sizes do not overflow there (Adam's did from an lr of about 3.4e37 on)."""
    cfg = composed(*overrides, f"results_dir={tmp_path}")
    check_run_config(cfg)
    result = train_job(cfg, tmp_path / "run", multirun=False)
    assert result.status in ("ok", "diverged"), read_csv(tmp_path / "run" / "summary.csv")[0]["error"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_is_one_line_naming_the_key_or_a_valid_run(workdir, data):
    key = data.draw(st.sampled_from(sorted(KEYS)), label="key")
    override = f"{key}={data.draw(st.one_of(VALUES, allowed(setting(key).rule)), label='value')}"
    train_it = data.draw(st.booleans(), label="train")
    try:
        cfg = composed(*KEYS[key], override)
    except (HydraException, OmegaConfBaseException) as error:  # Hydra's own rejection: the CLI prints one_line
        event("rejected by Hydra")
        assert one_line(error) and "\n" not in one_line(error)
        return
    try:
        check_run_config(cfg)
        check_writable(cfg.results_dir)
        build_run(cfg, resolve_device(cfg.device), [cfg.seed])
    except UserError as error:
        event("rejected by dropbench")
        assert "\n" not in str(error) and key in str(error), (override, str(error))
        assert not [p for p in (workdir / "w").rglob("*") if p.is_file()], "nothing may be written before a run"
        return
    event("valid")
    if key in RUNNABLE and train_it:
        event("trained")
        out = workdir / "out" / f"run{len(list(workdir.glob('out/*')))}"
        result = train_job(cfg, out, multirun=False)
        assert result.status in ("ok", "diverged"), read_csv(out / "summary.csv")[0]["error"]
        assert read_csv(out / "summary.csv")[0]["status"] == result.status
