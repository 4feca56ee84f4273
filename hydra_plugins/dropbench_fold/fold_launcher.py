"""Hydra launcher `fold` (conf/hydra/launcher/fold.yaml): the jobs of a sweep that differ only in
seeds and in the regularizer's numeric settings run as one set of replicas (see dropbench.fold).

Each group runs through the task function of its first job, which trains the others with it; the
others get their folders and .hydra files here, as Hydra's own launchers would make them, and a
JobReturn with their own score.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict, read_write


class FoldLauncher(Launcher):
    def __init__(self, max_replicas: int = 64, n_jobs: int = 1) -> None:
        self.max_replicas, self.n_jobs = max_replicas, n_jobs
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        from dropbench.config import UserError
        from dropbench.fold import fold_groups, task_config
        from dropbench.results import job_score, searching

        for name, value in (("max_replicas", self.max_replicas), ("n_jobs", self.n_jobs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"hydra.launcher.{name}={value!r} is not allowed; give a whole number >= 1")
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = idx
            configs.append(config)
        groups = fold_groups(configs, self.max_replicas)
        folded = {i: (task_config(configs[i]), _prepare_folder(configs[i])) for group in groups for i in group[1:]}
        runs = [(configs[group[0]], [folded[i] for i in group[1:]]) for group in groups]
        if self.n_jobs == 1:
            leads = [_run_group(lead, others, self.hydra_context, self.task_function) for lead, others in runs]
        else:  # runs side by side in worker processes, as Hydra's joblib launcher runs jobs
            from hydra.core.singleton import Singleton
            from joblib import Parallel, delayed

            state = Singleton.get_state()
            leads = Parallel(n_jobs=self.n_jobs, backend="loky")(
                delayed(_run_group)(lead, others, self.hydra_context, self.task_function, state)
                for lead, others in runs)
        optimizing = searching(self.config.hydra.sweeper.get("_target_", ""))
        returns: list[JobReturn | None] = [None] * len(configs)
        for group, lead in zip(groups, leads):
            returns[group[0]] = lead
            for i in group[1:]:
                task, output_dir = folded[i]
                score = job_score(OmegaConf.to_container(task, resolve=True), [output_dir])
                returns[i] = _folded_return(lead, configs[i], task, score, optimizing)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns


def _run_group(lead, others, hydra_context, task_function, singleton_state=None) -> JobReturn:
    """The group's first job through the task function, which trains the others with it."""
    from dropbench.fold import note_folded

    if singleton_state is not None:  # in a worker process
        from hydra.core.singleton import Singleton

        setup_globals()
        Singleton.set_state(singleton_state)
    note_folded(lead.hydra.job.num, others)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=lead,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def _prepare_folder(config) -> Path:
    """A folded job's output folder with its .hydra files, as Hydra's run_job makes them."""
    HydraConfig.instance().set_config(config)  # the folder name resolves from the job's own overrides
    output_dir = (Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)).absolute()
    with read_write(config.hydra.runtime):
        with open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(output_dir)
    hydra_dir = output_dir / str(config.hydra.output_subdir)
    hydra_dir.mkdir(parents=True, exist_ok=True)
    from dropbench.fold import task_config

    OmegaConf.save(task_config(config), hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": config.hydra}), hydra_dir / "hydra.yaml")
    OmegaConf.save(config.hydra.overrides.task, hydra_dir / "overrides.yaml")
    return output_dir


def _folded_return(lead: JobReturn, config, task, score: float, optimizing: bool) -> JobReturn:
    """A folded job's JobReturn: its group's status and its own score; for a searching sweeper, a
    failed trial when the job has no score, as dropbench.cli's task function reports one."""
    from dropbench.results import NoScore

    status, value = lead.status, score if lead.status == JobStatus.COMPLETED else lead._return_value
    if status == JobStatus.COMPLETED and optimizing and math.isnan(score):
        status, value = JobStatus.FAILED, NoScore(config.hydra.runtime.output_dir)
    return JobReturn(overrides=list(config.hydra.overrides.task), cfg=task, hydra_cfg=config,
                     working_dir=os.getcwd(), task_name=str(config.hydra.job.name), status=status,
                     _return_value=value)
