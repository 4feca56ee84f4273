"""cuda_graph=true on the CPU, as far as it goes there: the replayed step's control flow (with the
CUDA calls replaced) and resuming across the two ways of holding the learning rate. The GPU side
is in test_cuda.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hydra import compose, initialize_config_module

from dropbench import cuda_graph
from dropbench.train import build_run, restore_optimizer, train_epoch, train_step

CPU = torch.device("cpu")


def config(*overrides: str):
    with initialize_config_module("dropbench.conf", version_base="1.3"):
        return compose("config", overrides=["dataset.num_samples=300", "model.hidden=[16]", *overrides])


class FakeCuda:
    """torch.cuda as far as CapturedStep uses it, on the CPU: streams that order nothing, and graphs
    whose recording does not run the step (the step sees `recording` and leaves its work to the
    replay, on the input it was given), as a CUDA graph's recording does not."""

    def __init__(self, monkeypatch):
        self.recording = None
        self.recorded = []  # (batch shape, generators registered) of each graph

        fake = self

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        class Graph:
            def __init__(self):
                self.generators, self.work = [], None

            def register_generator_state(self, generator):
                self.generators.append(generator)

            def replay(self):
                self.work()

        @contextlib.contextmanager
        def graph(cuda_graph, stream=None):
            fake.recording = cuda_graph
            try:
                yield
            except RuntimeError:  # as CUDA does: ending a failed recording fails too
                raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
            finally:
                fake.recording = None

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)

    def step(self, run, fail_when_recorded: bool = False):
        def step(idx):
            if self.recording is None:
                train_step(run, idx)
                return
            if fail_when_recorded:
                raise RuntimeError("operation not permitted when stream is capturing\nmore details")
            self.recorded.append((tuple(idx.shape), len(self.recording.generators)))
            self.recording.work = lambda: train_step(run, idx)
        return step


@pytest.mark.parametrize("overrides", [("regularizer=dropout",),
                                       ("regularizer=dropout", "parallel_seeds=3", "schedule=step",
                                        "schedule.step_size=1"),
                                       ("regularizer=rdrop", "optimizer=sgd")])
def test_the_captured_step_runs_every_step_once_in_order(monkeypatch, overrides):
    """Each batch shape runs EAGER_STEPS steps eagerly, is then recorded once (with every replica's
    generator registered) and replayed from then on, each step's indices copied into the recorded
    input: 5 epochs end with exactly the numbers and generator states of the eager loop."""
    cuda = FakeCuda(monkeypatch)
    cfg = config(*overrides)
    seeds = list(range(cfg.parallel_seeds))
    runs = {"eager": build_run(cfg, CPU, seeds), "captured": build_run(cfg, CPU, seeds)}
    run = runs["captured"]
    run.captured = cuda_graph.CapturedStep(cuda.step(run), run.generators.masks, CPU)
    losses = {name: [] for name in runs}
    for _ in range(5):
        for name, r in runs.items():
            losses[name].append(train_epoch(r, 32).tolist())
            if r.scheduler is not None:
                r.scheduler.step()
    n, R = run.data.size("train"), len(seeds)
    assert n % 32 and cuda.recorded == [((R, 32), R), ((R, n % 32), R)]
    assert losses["captured"] == losses["eager"]
    for a, b in zip(runs["captured"].model.parameters(), runs["eager"].model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(runs["captured"].generators.masks, runs["eager"].generators.masks):
        assert torch.equal(a.get_state(), b.get_state())


def test_a_step_that_cannot_be_recorded_fails_with_the_first_reason(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    run = build_run(config("regularizer=dropout"), CPU, [0])
    run.captured = cuda_graph.CapturedStep(cuda.step(run, fail_when_recorded=True), run.generators.masks, CPU)
    with pytest.raises(RuntimeError, match=r"^cuda_graph=true: the training step could not be recorded as a CUDA "
                                           r"graph \(operation not permitted when stream is capturing\); train "
                                           r"with cuda_graph=false$"):
        train_epoch(run, 32)


def test_prepare_optimizer_leaves_a_cpu_run_as_it_is():
    run = build_run(config("regularizer=dropout"), CPU, [0])
    cuda_graph.prepare_optimizer(run.optimizer, CPU, graphed=True)
    assert type(run.optimizer.param_groups[0]["lr"]) is float and not run.optimizer.param_groups[0]["capturable"]


def test_cuda_graph_without_a_gpu_is_refused_before_anything_is_built():
    from dropbench.config import UserError

    with pytest.raises(UserError, match="cuda_graph=true needs a CUDA GPU, but this run trains on cpu"):
        build_run(config("cuda_graph=true"), CPU, [0])


@pytest.mark.parametrize("saved_as_tensor", [True, False], ids=["tensor-to-number", "number-to-tensor"])
def test_a_checkpoint_resumes_whether_the_learning_rate_is_a_tensor_or_a_number(tmp_path, saved_as_tensor):
    """On a GPU the learning rate is a tensor that the schedule fills in (a recorded step reads it
    there); without cuda_graph a non-fused optimizer holds a number. A checkpoint of either resumes
    in the other: the schedule goes on where it was, each run keeps its own kind of learning rate,
    and the losses are those of a run never stopped. (On the CPU, as here, fused Adam computes the
    same with a number and with a float64 tensor.)"""
    cfg = config("regularizer=dropout", "schedule=step", "schedule.step_size=1", "schedule.gamma=0.5")

    def fresh(as_tensor: bool):
        run = build_run(cfg, CPU, [0, 1])
        if as_tensor:  # as build_run holds it on a GPU (there as float32, which is what the kernels read)
            run.optimizer.param_groups[0]["lr"] = torch.tensor(cfg.optimizer.lr, dtype=torch.float64)
        return run

    def epochs(run, count: int) -> list[list[float]]:
        losses = []
        for _ in range(count):
            losses.append(train_epoch(run, 32).tolist())
            run.scheduler.step()
        return losses

    whole = epochs(fresh(False), 4)
    first = fresh(saved_as_tensor)
    assert epochs(first, 2) == whole[:2]
    torch.save({"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict(),
                "scheduler": first.scheduler.state_dict(), "generators": first.generators.state()},
               tmp_path / "checkpoint.pt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    second = fresh(not saved_as_tensor)
    lr = second.optimizer.param_groups[0]["lr"]
    second.model.load_state_dict(checkpoint["model"])
    restore_optimizer(second, checkpoint["optimizer"], checkpoint["scheduler"])
    second.generators.load_state(checkpoint["generators"])
    group = second.optimizer.param_groups[0]
    assert float(group["lr"]) == pytest.approx(cfg.optimizer.lr * 0.5 ** 2)
    assert isinstance(group["lr"], torch.Tensor) is (not saved_as_tensor)
    assert group["lr"] is lr or saved_as_tensor  # the same tensor, filled in
    assert all(type(v) is float for v in second.scheduler.base_lrs + second.scheduler.get_last_lr())
    assert epochs(second, 2) == whole[2:]
    assert float(group["lr"]) == pytest.approx(cfg.optimizer.lr * 0.5 ** 4)
