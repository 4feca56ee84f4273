"""The `dropbench` command: subcommands `train` (Hydra app), `report` and `list`.

Start-up stays light: torch is imported only inside `train`, so `dropbench --help`, `list`
and `report` answer at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from importlib.resources import files
from pathlib import Path

from dropbench import __version__
from dropbench.results import files_named, read_summary, remove_if_only_hydra  # stdlib only: no torch

USAGE = """usage: dropbench <command> [args]

commands:
  train [OVERRIDES]   train one config, or a sweep with -m (Hydra overrides, e.g. regularizer=rdrop);
                      `dropbench train --help` shows the config groups and Hydra's flags
  report [DIR ...]    compare the runs under DIR (default results/): tables and plots
  list                list the config groups and their choices

examples:
  dropbench train regularizer=dropout regularizer.p=0.3
  dropbench train -m regularizer=dropout regularizer.p=0.1,0.5,0.9 seed=0,1,2
  dropbench report results/sweeps
"""
GROUPS = ("dataset", "model", "regularizer", "optimizer", "schedule", "experiment")


def choices(group: str) -> list[str]:
    """Config names available in a config group (YAML files under conf/<group>)."""
    folder = files("dropbench.conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def fail(command: str, message: str, code: int = 2) -> None:
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"dropbench {command}: error: {message}".replace("dropbench : ", "dropbench: "), file=sys.stderr)
    sys.exit(code)


def check_group_overrides(overrides: list[str]) -> None:
    """Unknown group choices (dataset=nope) get one line listing the choices, before Hydra starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        fail("train", str(error).splitlines()[0])

    def names(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from names(v)
        elif isinstance(value, ChoiceSweep):
            yield from names(value.list)

    for o in parsed:
        group = o.key_or_group
        if group not in GROUPS or o.is_delete() or o.package is not None:
            continue
        known = choices(group)
        for name in names(o.value()):
            if name not in known and name != "null":
                fail("train", f"unknown {group} {name!r}; choose from: {', '.join(known)}")


def parse_train_args(argv: list[str]):
    """Hydra's own command line, with its usage errors as one line and flags (-m, --cfg job)
    accepted anywhere among the overrides; returns (argv reordered for Hydra: flags first, parsed)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = "dropbench train"
    parser.error = lambda message: fail("train", message)
    args = parser.parse_intermixed_args(argv)
    modes = [f for f, on in (("--run", args.run), ("--multirun", args.multirun), ("--cfg", args.cfg),
                             ("--info", args.info), ("--shell-completion", args.shell_completion)) if on]
    if len(modes) > 1:
        fail("train", f"{' and '.join(modes)} cannot be combined; give one of them")
    flags, pending = [], list(args.overrides)
    for a in argv:
        if pending and a == pending[0]:
            pending.pop(0)
        else:
            flags.append(a)
    return flags + list(args.overrides), args


class SweepCallback:
    """Hydra callback (conf/config.yaml, hydra.callbacks): notes the sweep directory in the process
    that launches the jobs, which with the joblib launcher runs none of them itself."""

    sweep_dir: Path | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        SweepCallback.sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_run_start(self, config, **kwargs) -> None: ...
    def on_run_end(self, config, **kwargs) -> None: ...
    def on_multirun_end(self, config, **kwargs) -> None: ...
    def on_job_start(self, config, **kwargs) -> None: ...
    def on_job_end(self, config, job_return, **kwargs) -> None: ...


def train(argv: list[str]) -> None:
    argv, args = parse_train_args(argv)
    check_group_overrides(args.overrides)

    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dropbench.conf import __name__ as conf_package
    from dropbench.config import UserError, check_run_config, check_writable, one_line

    # Hydra prints its own errors over several lines with a hint; let them reach us instead
    # (unless the user asked for Hydra's full tracebacks).
    hydra_errors = (HydraException, OmegaConfBaseException) if not os.environ.get("HYDRA_FULL_ERROR") else ()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    failures, started = [], time.time()

    @hydra.main(version_base="1.3", config_path=f"pkg://{conf_package}", config_name="config")
    def job(cfg) -> str:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        multirun = hc.mode.name == "MULTIRUN"
        try:
            check_run_config(cfg)  # cheap checks before torch is imported
            check_writable(cfg.results_dir)
            from dropbench.train import train_job

            result = train_job(cfg, output_dir, multirun, _parallel_jobs(hc) if multirun else 1)
        except UserError as error:  # one line and exit 2 (SystemExit passes Hydra's and joblib's handlers)
            remove_if_only_hydra(output_dir, Path(cfg.results_dir))
            fail("train", str(error))
        except KeyboardInterrupt:  # stopped before the run had written anything: leave no empty run dir
            remove_if_only_hydra(output_dir, Path(cfg.results_dir))
            raise
        if result.run_dir != output_dir or result.status == "skipped":
            remove_if_only_hydra(output_dir, Path(cfg.results_dir))
        if result.status == "failed":
            failures.append(result.run_dir)
            print(f"dropbench train: run failed, recorded in {result.run_dir}/summary.csv", file=sys.stderr)
        elif result.status != "skipped":
            detail = f" ({result.accuracy})" if result.accuracy else ""
            print(f"dropbench train: {result.status}{detail}: {result.run_dir}")
        return result.status

    sys.argv = ["dropbench train", *argv]
    SweepCallback.sweep_dir = None
    try:
        job()
    except SystemExit:
        _remove_empty_sweep(SweepCallback.sweep_dir)
        raise
    except hydra_errors as error:
        _remove_empty_sweep(SweepCallback.sweep_dir)
        cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else None
        fail("train", one_line(error) + (f" ({one_line(cause)})" if cause else ""))
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        fail("train", f"cannot write{where}: {error.strerror or error}; choose another place with results_dir=PATH")
    sweep_dir = SweepCallback.sweep_dir
    if sweep_dir is not None:
        _remove_empty_sweep(sweep_dir)
        if not failures:  # jobs run in worker processes (joblib) report through their summaries
            failures = _failed_since(sweep_dir, started)
            for run_dir in failures:
                print(f"dropbench train: run failed, recorded in {run_dir}/summary.csv", file=sys.stderr)
    if failures:
        sys.exit(1)


def _failed_since(sweep_dir: Path, started: float) -> list[Path]:
    """Runs of this sweep that failed (jobs in other processes report through their summaries)."""
    failed = []
    for path in files_named(sweep_dir, "summary.csv"):
        row = read_summary(path)
        try:
            recent = path.stat().st_mtime >= started - 1
        except OSError:
            continue
        if row and row["status"] == "failed" and recent:
            failed.append(path.parent)
    return failed


def _remove_empty_sweep(sweep_dir: Path | None) -> None:
    """A sweep directory holding nothing but Hydra's multirun.yaml (every job skipped, resumed
    elsewhere or rejected) is removed."""
    if sweep_dir is None or not sweep_dir.is_dir():
        return
    if [p.name for p in sweep_dir.iterdir()] == ["multirun.yaml"]:
        (sweep_dir / "multirun.yaml").unlink()
        sweep_dir.rmdir()


def _parallel_jobs(hc) -> int:
    """How many jobs the launcher runs at once (joblib's n_jobs: -1 = all cores, -2 = all but one)."""
    n_jobs = int(hc.launcher.get("n_jobs", 1) or 1)
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


def list_choices() -> None:
    for group in GROUPS:
        print(f"{group}: {', '.join(choices(group))}")


def _terminate(signum, frame):
    # SIGTERM (a scheduler's kill, `kill PID`) ends a run like Ctrl-C: its state is written first.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "--help"
    if command in ("-h", "--help", "help"):
        print(USAGE)
    elif command == "--version":
        print(f"dropbench {__version__}")
    elif command == "train":
        signal.signal(signal.SIGTERM, _terminate)
        try:
            train(argv[1:])
        except KeyboardInterrupt as stop:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            name = stop.args[0] if stop.args and stop.args[0] == "SIGTERM" else "SIGINT"
            print(f"dropbench train: interrupted ({name}); the current run was saved with status interrupted "
                  "(metrics and checkpoint kept); run the same command again to finish: finished runs are "
                  "skipped, and resume=true continues the interrupted one from its last epoch", file=sys.stderr)
            sys.exit(143 if name == "SIGTERM" else 130)
    elif command == "report":
        from dropbench.report import main as report_main

        sys.exit(report_main(argv[1:]))
    elif command == "list":
        list_choices()
    else:
        fail("", f"unknown command {command!r}; choose from: train, report, list")


if __name__ == "__main__":
    # `python -m dropbench.cli`: run the imported module's main, so that Hydra's callback (which
    # imports dropbench.cli) and this code share one module's state
    from dropbench.cli import main as _main

    _main()
