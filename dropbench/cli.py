"""The `dropbench` command: subcommands `train` (Hydra app), `report` and `list`.

Start-up stays light: torch is imported only inside `train`, so `dropbench --help`, `list`
and `report` answer at once.
"""

from __future__ import annotations

import shutil
import signal
import sys
from importlib.resources import files
from pathlib import Path

from dropbench import __version__

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
    print(f"dropbench {command}: error: {message}", file=sys.stderr)
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


def train(argv: list[str]) -> None:
    import hydra
    from hydra._internal.utils import get_args_parser

    check_group_overrides(get_args_parser().parse_args(argv).overrides)

    from dropbench.conf import __name__ as conf_package

    failures = []

    @hydra.main(version_base="1.3", config_path=f"pkg://{conf_package}", config_name="config")
    def job(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from dropbench.config import UserError
        from dropbench.train import train_job

        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        multirun = hc.mode.name == "MULTIRUN"
        parallel_jobs = hc.launcher.get("n_jobs", 1) if multirun else 1
        try:
            status = train_job(cfg, output_dir, multirun, parallel_jobs if parallel_jobs > 0 else 1)
        except UserError as error:
            _remove_if_only_hydra(output_dir, Path(cfg.results_dir))
            fail("train", str(error))
        if status == "skipped":
            _remove_if_only_hydra(output_dir, Path(cfg.results_dir))
        elif status == "failed":
            failures.append(output_dir)
            print(f"dropbench train: run failed, recorded in {output_dir}/summary.csv", file=sys.stderr)
        else:
            print(f"dropbench train: {status}: {output_dir}")

    sys.argv = ["dropbench train", *argv]
    job()
    if failures:
        sys.exit(1)


def _remove_if_only_hydra(run_dir: Path, results_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote, and its empty parents."""
    if not run_dir.is_dir() or any(p.name != ".hydra" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir)
    parent, stop = run_dir.parent, results_dir.resolve()
    while parent.resolve() != stop and parent.is_dir() and not any(parent.iterdir()) and stop in parent.resolve().parents:
        parent.rmdir()
        parent = parent.parent


def list_choices() -> None:
    for group in GROUPS:
        print(f"{group}: {', '.join(choices(group))}")


def _terminate(signum, frame):
    # SIGTERM (a scheduler's kill, `kill PID`) ends a run like Ctrl-C: its state is written first.
    raise KeyboardInterrupt


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
        except KeyboardInterrupt:
            print("dropbench train: interrupted; finished state written, re-run the sweep to complete it",
                  file=sys.stderr)
            sys.exit(130)
    elif command == "report":
        from dropbench.report import main as report_main

        sys.exit(report_main(argv[1:]))
    elif command == "list":
        list_choices()
    else:
        fail("", f"unknown command {command!r}; choose from: train, report, list")


if __name__ == "__main__":
    main()
