"""Config to objects, and the checks of what a user can get wrong.

Every config group node becomes an object through `build` (Hydra's instantiate of its
`_target_`); every value a user can get wrong is checked by the helpers here, before a run writes
anything, and reported as one `UserError` line (never a traceback)."""

from __future__ import annotations

import inspect
import math
import os
from numbers import Number

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig


class UserError(Exception):
    """A mistake in the user's config or environment, reported as one line and exit code 2."""


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name}={value!r} is not allowed; it must be a positive integer")
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Number) or not value > 0:
        raise UserError(f"{name}={value!r} is not allowed; it must be a positive number")
    return float(value)


def probability(name: str, value) -> float:
    """A drop probability: 0 <= p < 1 (p = 1 would drop every unit)."""
    if isinstance(value, bool) or not isinstance(value, Number) or not 0.0 <= value < 1.0:
        raise UserError(f"{name}={value!r} is not allowed; it must be a number in [0, 1)")
    return float(value)


def probabilities(name: str, value, count: int) -> list[float]:
    """A scalar p, or a list with one p per hidden layer (`count` of them)."""
    if isinstance(value, (list, tuple, ListConfig)):
        if len(value) != count:
            raise UserError(
                f"{name}={list(value)} has {len(value)} values; the model has {count} hidden layers, "
                f"so give one p per hidden layer or a single number"
            )
        return [probability(name, v) for v in value]
    return [probability(name, value)] * count


def non_negative(name: str, value) -> float:
    """A number >= 0 (a strength such as alpha or lambda, where 0 switches the method off)."""
    if isinstance(value, bool) or not isinstance(value, Number) or not 0.0 <= value < math.inf:
        raise UserError(f"{name}={value!r} is not allowed; it must be a number >= 0")
    return float(value)


def real(name: str, value) -> float:
    """Any finite number."""
    if isinstance(value, bool) or not isinstance(value, Number) or not math.isfinite(value):
        raise UserError(f"{name}={value!r} is not allowed; it must be a finite number")
    return float(value)


def choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not allowed; choose {' or '.join(allowed)}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name}={value!r} is not allowed; it must be true or false")
    return value


def scalar_or_list(p):
    """A p that may be one number or one per hidden layer (kept as a list for summary())."""
    return list(p) if isinstance(p, (list, tuple, ListConfig)) else p


def check_run_config(cfg: DictConfig) -> None:
    """Checks of the top-level settings; groups check their own parameters when built."""
    positive_int("epochs", cfg.epochs)
    positive_int("batch_size", cfg.batch_size)
    positive_int("eval_batch_size", cfg.eval_batch_size)
    positive_int("parallel_seeds", cfg.parallel_seeds)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UserError(f"seed={cfg.seed!r} is not allowed; it must be a non-negative integer")
    positive_float("optimizer.lr", cfg.optimizer.lr)
    if cfg.threads != "auto":
        positive_int("threads", cfg.threads)
    if cfg.progress not in ("auto", True, False):
        raise UserError(f"progress={cfg.progress!r} is not allowed; choose auto, true or false")
    for key in ("force", "resume", "keep_checkpoint"):
        value = cfg.get(key, False)
        if not isinstance(value, bool):
            raise UserError(f"{key}={value!r} is not allowed; choose true or false")


def check_writable(directory: str) -> None:
    """Fail early, with the path, when results cannot be written under `directory`.

    The nearest existing ancestor must be a directory we may write into (a path under a regular
    file can be created by no one, root included; root passes the permission check, as it should).
    """
    probe = os.path.abspath(os.path.expanduser(str(directory)))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"results directory {str(directory)!r} cannot be created: {probe!r} is a file, "
                        f"not a directory; choose another with results_dir=PATH")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"results directory {str(directory)!r} is not writable ({probe!r} does not allow it); "
                        f"choose another with results_dir=PATH")


def one_line(error: BaseException | str) -> str:
    """An error message on one line: Hydra's and OmegaConf's messages run over several lines and
    end in details (full_key, object_type) that say nothing to a user."""
    text = str(error) if not isinstance(error, BaseException) or str(error) else type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return " ".join(lines) or type(error).__name__


def build(node: DictConfig, what: str, **kwargs):
    """Instantiate a config group node; its `name` key labels results, and is passed on only to a
    target that takes a `name` argument (load_torchvision).

    Whatever goes wrong while building from the config (a bad value, an argument the target does
    not take) is the config's fault: it becomes a one-line UserError naming the group.
    """
    try:
        target = get_object(str(node.get("_target_")))
    except Exception as error:  # no such class or function
        raise UserError(f"cannot build {what} {node.get('name')}: _target_={node.get('_target_')!r} "
                        f"({type(error).__name__}: {one_line(error)})") from None
    try:
        takes_name = "name" in inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        takes_name = False
    try:
        return instantiate({k: v for k, v in node.items() if k != "name" or takes_name}, **kwargs)
    except InstantiationException as error:
        raise _user_error(what, node.get("name"), error) from None


def _user_error(what: str, name, error: InstantiationException) -> UserError:
    cause = error.__cause__
    while isinstance(cause, InstantiationException):
        cause = cause.__cause__
    if isinstance(cause, UserError):
        return cause
    detail = f"{type(cause).__name__}: {one_line(cause)}" if cause is not None else one_line(error)
    return UserError(f"cannot build {what}{f' {name}' if name else ''} from its config ({detail})")
