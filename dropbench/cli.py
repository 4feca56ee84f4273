"""The `dropbench` command: subcommands `train` (Hydra app), `report` and `list`.

Start-up stays light: torch is imported only inside `train`, so `dropbench --help`, `list`
and `report` answer at once.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import math
import os
import signal
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from dropbench import __version__
from dropbench.config import choices
from dropbench.results import (  # stdlib only: no torch
    NoScore,
    files_named,
    job_score,
    read_summary,
    remove_if_only_hydra,
    searching,
)
from dropbench.signals import raise_interrupt

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
GROUPS = ("dataset", "model", "regularizer", "optimizer", "schedule", "logger", "experiment")


def fail(command: str, message: str, code: int = 2) -> None:
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"dropbench {command}: error: {message}".replace("dropbench : ", "dropbench: "), file=sys.stderr)
    sys.exit(code)


MAX_FOLDER_BYTES = 200  # below a file system's 255-byte limit on a name, with room for the -2, -3 of free_run_dir


def job_folder(overrides: str) -> str:
    """The folder name of a sweep job from its overrides (Hydra's `hydra.job.override_dirname`).

    One folder inside the sweep directory whatever the values: `/`, `%`, control characters and a
    leading `.` become `%XX`, so `../` in a value names no parent and no name is hidden, `.` or `..`.
    A name over MAX_FOLDER_BYTES becomes its first 64 bytes, `~` and a hash of the whole (stable: the
    same overrides, the same folder); the job's full overrides are in its `.hydra/overrides.yaml`.
    """
    name = "".join(f"%{ord(c):02X}" if c in "/%" or ord(c) < 32 or ord(c) == 127 or (c == "." and i == 0) else c
                   for i, c in enumerate(str(overrides)))
    if len(name.encode()) <= MAX_FOLDER_BYTES:
        return name
    head = name.encode()[:64].decode(errors="ignore")
    return f"{head}~{hashlib.sha1(str(overrides).encode()).hexdigest()[:16]}"


# conf/config.yaml names sweep jobs' folders with ${job_folder:...}. Registered on import: launchers
# that run jobs in other processes (joblib, submitit) import this module there to unpickle the
# SweepCallback, before the job's folder is resolved.
if not OmegaConf.has_resolver("job_folder"):
    OmegaConf.register_new_resolver("job_folder", job_folder)


def _unknown_option(arg: str, parser) -> str:
    """The message for a command-line word Hydra's parser does not know, with the likeliest intent."""
    from dropbench.config import GROUPS, TOP_LEVEL

    word = arg.lstrip("-")
    if "=" in word or word in TOP_LEVEL or word.split(".")[0] in GROUPS:
        return f"unknown option {arg}; did you mean {word}? (settings are KEY=VALUE, without dashes)"
    flags = [s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")]
    match = difflib.get_close_matches(word, flags, n=1, cutoff=0.6)
    hint = f"did you mean --{match[0]}? " if match else ""
    return (f"unknown option {arg}; {hint}settings are KEY=VALUE (e.g. epochs=5), "
            f"and `dropbench train --help` lists the options")


def _check_overrides(overrides: list[str]) -> None:
    """Overrides that Hydra would fail on with a traceback, or that would write where they should not."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from dropbench.config import UserError, check, one_line

    parser, parsed = OverridesParser.create(), []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except HydraException as error:
            fail("train", f"{override!r} is not a valid override: {one_line(error)}")
    for o in parsed:
        if not o.key_or_group:
            fail("train", f"{o.input_line!r} has no key; an override is KEY=VALUE (e.g. epochs=5)")
        if o.key_or_group == "results_dir" and o.is_sweep_override():
            fail("train", f"{o.input_line} would sweep over results_dir, but a sweep writes to one directory; "
                          f"give one (quote a path with a comma: results_dir='a,b')")
        if o.key_or_group == "results_dir" and not o.is_delete():
            try:  # checked before Hydra makes its run directory in it
                check("results_dir", o.value())
            except UserError as error:
                fail("train", str(error))


def parse_train_args(argv: list[str]):
    """Hydra's own command line, with its usage errors as one line and flags (-m, --cfg job)
    accepted anywhere among the overrides; returns (argv reordered for Hydra: flags first, parsed)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = "dropbench train"
    parser.error = lambda message: fail("train", message)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        fail("train", _unknown_option(unknown[0], parser))
    _check_overrides(args.overrides)
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
    # a user's model takes whatever arguments its callable declares: `model.module.ARG=VALUE` adds
    # ARG, where Hydra alone would ask for `+` on a key the config does not list
    args.overrides = [f"++{o}" if o.startswith("model.module.") else o for o in args.overrides]
    return flags + list(args.overrides), args


class SweepCallback:
    """Hydra callback (conf/config.yaml, hydra.callbacks): notes the sweep directory in the process
    that launches the jobs, which with the joblib launcher runs none of them itself; in a submitit
    job, puts the job's log files into its folder."""

    sweep_dir: Path | None = None
    # progress of a sweep whose jobs run one after another in this process (Hydra's basic launcher)
    total: int | None = None
    done, failed, started, last_status = 0, 0, 0.0, ""

    def on_multirun_start(self, config, **kwargs) -> None:
        SweepCallback.sweep_dir = Path(str(config.hydra.sweep.dir))
        SweepCallback.total = _sweep_size(config)
        SweepCallback.done, SweepCallback.failed, SweepCallback.started = 0, 0, time.time()

    def on_run_start(self, config, **kwargs) -> None: ...
    def on_run_end(self, config, **kwargs) -> None: ...
    def on_multirun_end(self, config, **kwargs) -> None: ...
    def on_job_start(self, config, **kwargs) -> None:
        _link_submitit_logs(Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        """After each job of a sequential sweep, one line: jobs done of the total, failures, ETA."""
        if SweepCallback.total is None:
            return
        SweepCallback.done += 1
        SweepCallback.failed += SweepCallback.last_status == "failed" or job_return.status.name == "FAILED"
        done, total = SweepCallback.done, SweepCallback.total
        left = (time.time() - SweepCallback.started) / done * (total - done)
        print(f"dropbench train: sweep {done}/{total} jobs done, {SweepCallback.failed} failed; "
              f"ETA {int(left // 60)}m{int(left % 60):02d}s", flush=True)


def _sweep_size(config) -> int | None:
    """How many jobs Hydra's basic sweeper and launcher run one after another in this process, or
    None for other sweepers and launchers (their jobs run elsewhere, or their number is not fixed)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    basic = "hydra._internal.core_plugins.basic_"
    if (config.hydra.sweeper.get("_target_") != basic + "sweeper.BasicSweeper"
            or config.hydra.launcher.get("_target_") != basic + "launcher.BasicLauncher"):
        return None
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def train(argv: list[str]) -> None:
    argv, args = parse_train_args(argv)

    import hydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from dropbench.conf import __name__ as conf_package
    from dropbench.config import UserError, check_run_config, check_writable, one_line

    # Hydra prints its own errors over several lines with a hint; let them reach us instead
    # (unless the user asked for Hydra's full tracebacks).
    hydra_errors = (HydraException, OmegaConfBaseException) if not os.environ.get("HYDRA_FULL_ERROR") else ()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    failures, started = [], time.time()

    _register_fold_launcher()

    @hydra.main(version_base="1.3", config_path=f"pkg://{conf_package}", config_name="config")
    def job(cfg) -> float:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        multirun = hc.mode.name == "MULTIRUN"
        # a sweeper other than Hydra's grid (e.g. Optuna) optimizes the score the job returns
        optimizing = multirun and searching(hc.sweeper.get("_target_", ""))
        jobs = [(cfg, output_dir)]
        try:
            check_run_config(cfg)  # cheap checks before torch is imported
            check_writable(cfg.results_dir)
            if optimizing and not cfg.dataset.get("val_fraction"):
                raise UserError("dataset.val_fraction=0 holds out no validation data, and a search is scored on "
                                "validation accuracy only (never on test data); set dataset.val_fraction in (0, 1)")
            from dropbench.fold import folded_with
            from dropbench.runs import train_jobs

            jobs += folded_with(hc.job.num) if multirun else []
            results = train_jobs(jobs, multirun, _parallel_jobs(hc) if multirun else 1,
                                 job_num=hc.job.num if multirun else 0)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            fail("train", _no_space(error), code=1)
        except UserError as error:  # one line and exit 2 (SystemExit passes Hydra's and joblib's handlers)
            for _, folder in jobs:
                remove_if_only_hydra(folder, Path(cfg.results_dir))
            fail("train", str(error))
        except KeyboardInterrupt:  # stopped before the run had written anything: leave no empty run dir
            for _, folder in jobs:
                remove_if_only_hydra(folder, Path(cfg.results_dir))
            raise
        for (job_cfg, folder), result in zip(jobs, results):
            if result.run_dir != folder or result.status == "skipped":
                remove_if_only_hydra(folder, Path(job_cfg.results_dir))
            if result.status == "failed":
                failures.append(result.run_dir)
                print(f"dropbench train: run failed, recorded in {result.run_dir}/summary.csv", file=sys.stderr)
            elif result.status != "skipped":
                detail = f" ({result.accuracy})" if result.accuracy else ""
                print(f"dropbench train: {result.status}{detail}: {result.run_dir}")
        result = results[0]
        SweepCallback.last_status = result.status
        # output_dir: copies of seeds finished earlier
        score = job_score(OmegaConf.to_container(cfg, resolve=True), [result.run_dir, output_dir])
        if optimizing and math.isnan(score):
            # an exception is how a Hydra sweeper learns of a failed trial (Optuna 2 aborts on a NaN value)
            raise NoScore(result.run_dir)
        return score

    sys.argv = [sys.argv[0] if Path(sys.argv[0]).name == "dropbench" else "dropbench", *argv]
    SweepCallback.sweep_dir = None
    try:
        job()
    except SystemExit:
        _remove_empty_sweep(SweepCallback.sweep_dir)
        raise
    except UserError as error:  # from a launcher, before any job ran
        _remove_empty_sweep(SweepCallback.sweep_dir)
        fail("train", str(error))
    except hydra_errors as error:
        _remove_empty_sweep(SweepCallback.sweep_dir)
        if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
            group, name = error.missing_cfg_file.rsplit("/", 1)
            known = ", ".join(o for o in error.options if not o.startswith("_"))  # `_name`: shared parts
            fail("train", f"unknown {group} {name!r}; choose from: {known} (or add your own with --config-dir DIR)")
        cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else None
        fail("train", one_line(error) + (f" ({one_line(cause)})" if cause else ""))
    except OSError as error:
        if error.errno == errno.ENOSPC:
            fail("train", _no_space(error), code=1)
        where = f" {error.filename}" if error.filename else ""
        fail("train", f"cannot write{where}: {error.strerror or error}; choose another place with results_dir=PATH")
    sweep_dir = SweepCallback.sweep_dir
    if sweep_dir is not None:
        _remove_empty_sweep(sweep_dir)
        statuses = _sweep_statuses(sweep_dir, started)
        if not failures:  # jobs run in worker processes (joblib) report through their summaries
            failures = [run_dir for run_dir, (status, _) in statuses.items() if status == "failed"]
            for run_dir in failures:
                print(f"dropbench train: run failed, recorded in {run_dir}/summary.csv", file=sys.stderr)
        if statuses:
            print(_sweep_line(statuses, sweep_dir))
    if failures:
        sys.exit(1)


FOLD_LAUNCHER = "hydra_plugins.dropbench_fold.fold_launcher.FoldLauncher"


def _register_fold_launcher() -> None:
    """Make dropbench's launcher known to Hydra. Hydra finds plugins by listing the hydra_plugins
    package, which does not list a package installed in editable mode (pip install -e); importing
    it by name works in both kinds of install."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.dropbench_fold.fold_launcher import FoldLauncher

    Plugins.instance().class_name_to_class.setdefault(FOLD_LAUNCHER, FoldLauncher)


def _no_space(error: OSError) -> str:
    where = f" while writing {error.filename}" if error.filename else ""
    return (f"no space left on the device{where}; free some space and run the same command again "
            f"(resume=true continues from the last checkpoint)")


def _sweep_statuses(sweep_dir: Path, started: float) -> dict[Path, tuple[str, bool]]:
    """Every run in the sweep folder: (status, whether this command trained it) by run directory.
    Runs finished by an earlier command were copied in; their `finished_at` is older."""
    found = {}
    for path in files_named(sweep_dir, "summary.csv"):
        row = read_summary(path)
        if row:
            try:
                trained_now = datetime.fromisoformat(row["finished_at"]).timestamp() >= started - 1
            except ValueError:
                trained_now = False
            found[path.parent] = (row["status"], trained_now)
    return found


def _sweep_line(statuses: dict[Path, tuple[str, bool]], sweep_dir: Path) -> str:
    """The closing line of `-m`: `14/14 ok, 0 failed, 0 diverged; report: dropbench report DIR`."""
    counts = Counter(status for status, _ in statuses.values())
    earlier = sum(not now for _, now in statuses.values())
    parts = [f"{counts['ok']}/{len(statuses)} ok", f"{counts['failed']} failed", f"{counts['diverged']} diverged"]
    if counts["interrupted"]:
        parts.append(f"{counts['interrupted']} interrupted")
    if earlier:
        parts.append(f"{earlier} finished earlier")
    return f"dropbench train: sweep done: {', '.join(parts)}; report: dropbench report {sweep_dir}"


def _remove_empty_sweep(sweep_dir: Path | None) -> None:
    """A sweep directory holding nothing but Hydra's multirun.yaml (every job skipped, resumed
    elsewhere or rejected) is removed."""
    if sweep_dir is None or not sweep_dir.is_dir():
        return
    if [p.name for p in sweep_dir.iterdir()] == ["multirun.yaml"]:
        (sweep_dir / "multirun.yaml").unlink()
        sweep_dir.rmdir()


def _link_submitit_logs(job_dir: Path) -> None:
    """In a submitit job, its stdout and stderr (files named by job id under
    hydra.launcher.submitit_folder) also appear in its own folder as log.out and log.err: hard
    links, which stay when the submitit folder is deleted."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    paths = submitit.JobEnvironment().paths
    for name, log in (("log.out", paths.stdout), ("log.err", paths.stderr)):
        with contextlib.suppress(OSError):  # no stderr file (stderr_to_stdout), or no hard links on this file system
            (job_dir / name).unlink(missing_ok=True)  # a requeued job links its log again
            os.link(log, job_dir / name)


SUBMITIT_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."


def _parallel_jobs(hc) -> int:
    """How many jobs share this process's cores (threads=auto gives each cores / jobs): joblib's
    n_jobs (-1 = all cores, -2 = all but one); 1 for a Slurm job, whose cores are its own
    (runs.available_cores); under submitit's local executor, which starts every job of the sweep at
    once, the number of shares of hydra.launcher.cpus_per_task (1 when unset) the cores hold, so a
    job gets at most cpus_per_task threads."""
    target = str(hc.launcher.get("_target_", ""))
    if target == SUBMITIT_LAUNCHER + "SlurmLauncher":
        return 1
    if target == SUBMITIT_LAUNCHER + "LocalLauncher":
        from dropbench.runs import available_cores

        return math.ceil(available_cores() / int(hc.launcher.get("cpus_per_task") or 1))
    n_jobs = int(hc.launcher.get("n_jobs", 1) or 1)
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


def list_choices() -> None:
    for group in GROUPS:
        print(f"{group}: {', '.join(choices(group))}")


def shell_completion(argv: list[str]) -> None:
    """Hydra's shell completion calls `dropbench -sc query=SHELL` with the command line in
    COMP_LINE; the `train` word is ours, not an override, so it is taken out before Hydra reads it."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split(maxsplit=2)
    if len(words) >= 2 and words[1] == "train":
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]]) + (" " if line.endswith(" ") else "")
    train(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if not command:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if command in ("-h", "--help", "help"):
        print(USAGE)
    elif command in ("-sc", "--shell-completion"):
        shell_completion(argv)
    elif command == "--version":
        print(f"dropbench {__version__}")
    elif command == "train":
        signal.signal(signal.SIGTERM, raise_interrupt)
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
