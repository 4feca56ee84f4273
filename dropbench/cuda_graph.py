"""The training step recorded once in a CUDA graph and replayed (`cuda_graph=true`).

A small model's step on a GPU is a hundred or more kernel launches and the Python that issues
them, for a fraction of a millisecond of work: the GPU mostly waits. A CUDA graph records the
step's kernels once; each later step is one `replay()` that launches them all, with no Python and
no per-kernel launch cost (Nvidia, "CUDA Graphs"; torch.cuda.graphs). A replay runs exactly the
kernels that the recorded step ran, on the same memory, so what a step reads or writes has to
stay where it was when the graph was recorded:

- the step's input is one static index tensor [R, B]: each step copies its batch's indices into
  it, and the recorded gather reads the examples from the dataset on the GPU;
- the learning rate is a tensor on the GPU (`prepare_optimizer`): a schedule writes its new value
  into it, and the replayed optimizer step reads it (torch's fused optimizers get it so without
  graphs too, so that both round alike);
- the optimizer keeps its step counts on the GPU (`capturable=True`), and its state exists before
  recording (the first steps of each batch shape run eagerly);
- random masks come from each replica's CUDA generator, registered with the graph: a replay draws
  the numbers that an eager step would have drawn at that point of the generator's stream and
  moves the generator on by as much, so masks never repeat and checkpoints save where each stream
  is. A run is meant to give exactly the numbers of the same run without graphs; tests/test_cuda.py
  checks that on a GPU.

What the step may not do is read a value back to Python (`.item()`, a branch on a tensor) or
copy from the host: recording fails on such an operation, and the run fails with the reason.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import torch

# Eager steps of a batch shape before it is recorded: the optimizer creates its state and every
# lazily built cache (cuBLAS workspaces, per-replica setting tensors) exists by the second; torch's
# whole-network capture example warms up for 3.
EAGER_STEPS = 3


def prepare_optimizer(optimizer: torch.optim.Optimizer, device: torch.device, graphed: bool) -> None:
    """On a GPU, hold the learning rate the way a recorded step can read it. Called after building
    the optimizer and its schedule (whose base learning rates stay numbers); nothing on a CPU.

    torch's fused kernels read a tensor learning rate as float32, and a number as float64: the two
    round differently. So every fused group's learning rate is a float32 tensor on the GPU, with or
    without graphs, and a run gives the same numbers either way. With `graphed` every group's is
    (a schedule writes its new value into it, and the replayed step reads it there), and
    `capturable` is on where the optimizer has it (Adam and AdamW keep their step counts on the GPU).
    """
    if device.type != "cuda":
        return
    for group in optimizer.param_groups:
        if graphed or group.get("fused"):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if graphed and "capturable" in group:
            group["capturable"] = True


class CapturedStep:
    """`step(idx)` for idx [R, B], replayed from a CUDA graph per batch shape.

    The first EAGER_STEPS calls with a shape run the step eagerly on a side stream (as recording
    requires); the next records it and replays it, and every later call copies idx into the
    recorded input and replays. The training loop calls it the way it calls the eager step.

    Args:
        step: one training step on the batch of indices idx [R, B]; it keeps its results in tensors
            that outlive the call (the parameters, the optimizer's state, a running loss sum).
        generators: the CUDA generators the step draws random numbers from, besides the default one.
        device: the step's GPU.
    """

    def __init__(self, step: Callable[[torch.Tensor], None], generators: list[torch.Generator],
                 device: torch.device):
        self.step, self.generators, self.device = step, generators, device
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.eager_steps: Counter = Counter()
        self.side = torch.cuda.Stream(device)

    def __call__(self, idx: torch.Tensor) -> None:
        shape = tuple(idx.shape)
        # the step's GPU as the current one: recording and replay use the current device's streams,
        # and a sweep's job may train on cuda:N with another device current
        with torch.cuda.device(self.device):
            if shape not in self.graphs and self.eager_steps[shape] < EAGER_STEPS:
                self.eager_steps[shape] += 1
                self._eager(idx)
                return
            if shape not in self.graphs:
                self.graphs[shape] = self._record(idx)
            graph, recorded_idx = self.graphs[shape]
            recorded_idx.copy_(idx)
            graph.replay()

    def _eager(self, idx: torch.Tensor) -> None:
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side), warnings.catch_warnings():
            # torch warns that a capturable optimizer runs uncaptured: it is, for these first steps
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self.step(idx)
        current.wait_stream(self.side)

    def _record(self, idx: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        recorded_idx = idx.clone()
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph, stream=self.side):  # a stream on this step's GPU
                self.step(recorded_idx)
        except RuntimeError as error:
            first = error  # ending a failed recording raises again: the first error names the operation
            while isinstance(first.__context__, RuntimeError):
                first = first.__context__
            reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
            raise RuntimeError(f"cuda_graph=true: the training step could not be recorded as a CUDA graph "
                               f"({reason}); train with cuda_graph=false") from error
        return graph, recorded_idx
