"""Folded sweeps: the jobs of a sweep that differ only in seeds, in the regularizer's numeric
settings and in the learning rate train together as the replicas of one run (`dropbench train -m
hydra/launcher=fold ...`).

`fold_groups` decides which jobs go together: those whose configs are equal once the seed, each
method's `folds` settings (Regularizer.folds: dropout rates, penalty weights, R-Drop's alpha, ...)
and, where it folds (LR_FOLDS), the learning rate are set aside. The launcher
(hydra_plugins/dropbench_fold) runs each group through the first job's task function and notes the
others here (`note_folded`), where that job finds them (`folded_with`); every job still writes its
own folder, run keys and summaries (dropbench.runs.train_jobs).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from dropbench.results import flatten

# The learning rate folds for these optimizers, whose step is linear in lr for a given state (see
# train.optimizer_step), under no schedule or one that scales every replica's lr by the same factor.
LR_FOLDS = {"torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW"}
SCALING_SCHEDULES = {"torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.CosineAnnealingLR"}

# The jobs a group's first job trains with it, by the first job's number in the sweep.
_FOLDED: dict[int, list[tuple[DictConfig, Path]]] = {}


def note_folded(job_num: int, jobs: list[tuple[DictConfig, Path]]) -> None:
    _FOLDED[job_num] = jobs


def folded_with(job_num: int) -> list[tuple[DictConfig, Path]]:
    """The other jobs (task config, output folder) that the sweep's job `job_num` trains with it."""
    return _FOLDED.pop(job_num, [])


def task_config(config: DictConfig) -> DictConfig:
    """A job's config without its `hydra` node."""
    task = copy.deepcopy(config)
    with open_dict(task):
        task.pop("hydra", None)
    return task


def fold_key(config: DictConfig) -> str | None:
    """What a job's config must share with the others of its group: everything but the seed and the
    regularizer's foldable settings. None when the config cannot be folded (it does not resolve, or
    names a method that cannot be imported: such a job runs alone, and reports its own error)."""
    from hydra.utils import get_class

    try:
        flat = flatten(OmegaConf.to_container(task_config(config), resolve=True))
        foldable = {"seed", "parallel_seeds"}
        # regularizer.* outside `methods` only feeds the methods (interpolations); the methods' values decide
        foldable |= {key for key in flat if key.startswith("regularizer.") and ".methods." not in f".{key}"}
        for name, method in (config.regularizer.get("methods") or {}).items():
            foldable |= {f"regularizer.methods.{name}.{s}" for s in getattr(get_class(method._target_), "folds", ())}
        schedule = flat.get("schedule._target_")
        if flat.get("optimizer._target_") in LR_FOLDS and (
                schedule is None or schedule in SCALING_SCHEDULES and not flat.get("schedule.eta_min")):
            foldable.add("optimizer.lr")
    except Exception:
        return None
    return json.dumps({k: v for k, v in flat.items() if k not in foldable}, sort_keys=True, default=str)


def fold_groups(configs: list[DictConfig], max_replicas: int) -> list[list[int]]:
    """The sweep's jobs (indices into `configs`, in order) in groups that train together: same
    fold_key, at most `max_replicas` seeds in all (a job with parallel_seeds=N counts N)."""
    open_groups: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    groups: list[list[int]] = []
    for i, config in enumerate(configs):
        key = fold_key(config)
        seeds = int(config.get("parallel_seeds", 1))
        if key is None or key not in open_groups or sizes[key] + seeds > max_replicas:
            group = [i]
            groups.append(group)
            if key is not None:
                open_groups[key], sizes[key] = group, 0
        else:
            open_groups[key].append(i)
        if key is not None:
            sizes[key] += seeds
    return groups
