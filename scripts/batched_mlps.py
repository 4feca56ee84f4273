#!/usr/bin/env python
"""K small MLPs trained as one, written by hand: the ceiling the benchmark holds dropbench against.

Imported by scripts/bench.py (the gpu and seeds sections), and run as a process by its plain
section: K seeds of the MNIST-1D MLP recipe with the plain loop's evaluation after every epoch,

    python scripts/batched_mlps.py NPZ THREADS EPOCHS SEEDS

where NPZ holds x, y, x_test, y_test (as the plain section writes it).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F


class BatchedMLPs:
    """K MLPs trained as one, written by hand: weights stacked [K, in, out], each layer one
    torch.baddbmm, Adam (Kingma & Ba 2015, as torch.optim.Adam computes it) in foreach ops, and on
    a GPU the whole step (batch gather, forward, backward, update) captured once in a CUDA graph and
    replayed, so no Python and no kernel launch cost per op remains: what a batched loop can reach.

    Args:
        x, y: training inputs [N, ...] and labels [N], on the device.
        count: K, the number of models.
        widths: layer widths, input first ([40, 100, 100, 10]).
        batch_size: examples per step and model; an epoch is N // batch_size steps.
        lr: Adam's learning rate (betas 0.9, 0.999, eps 1e-8).
        capture: record the step in a CUDA graph (needs x on a GPU); False runs it eagerly.
    """

    def __init__(self, x, y, count: int, widths: list[int], batch_size: int, lr: float, capture: bool = True):
        device = x.device
        self.x, self.y, self.count, self.batch_size, self.lr = x.flatten(1), y, count, batch_size, lr
        self.params = []
        for a, b in zip(widths[:-1], widths[1:]):  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / math.sqrt(a)
            self.params += [torch.empty(count, a, b, device=device).uniform_(-bound, bound).requires_grad_(),
                            torch.empty(count, 1, b, device=device).uniform_(-bound, bound).requires_grad_()]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = torch.zeros((), device=device)  # the step count as a tensor: a graph replay reads it
        self.idx = torch.zeros(count, batch_size, dtype=torch.long, device=device)  # the graph's input
        self.graph = None
        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                for _ in range(3):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [K, B, C] of inputs [K, B, in]."""
        h = x
        for i in range(0, len(self.params), 2):
            h = torch.baddbmm(self.params[i + 1], h, self.params[i])
            if i + 2 < len(self.params):
                h = F.relu(h)
        return h

    def _step(self) -> None:
        logits = self.forward(self.x[self.idx])
        # the sum over models of each model's mean loss: model k's gradient is that of its own loss
        loss = F.cross_entropy(logits.flatten(0, 1), self.y[self.idx].flatten(), reduction="sum") / self.batch_size
        grads = torch.autograd.grad(loss, self.params)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        self.t += 1
        torch._foreach_lerp_(self.m, grads, 1 - beta1)
        torch._foreach_mul_(self.v, beta2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, (1 - beta2 ** self.t).sqrt())
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(self.m, denom)
        torch._foreach_mul_(update, -self.lr / (1 - beta1 ** self.t))
        with torch.no_grad():
            torch._foreach_add_(self.params, update)

    def step(self, idx: torch.Tensor) -> None:
        """One Adam step of every model on its batch: idx [K, B], row k model k's examples."""
        self.idx.copy_(idx)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def epoch(self) -> None:
        order = torch.argsort(torch.rand(self.count, len(self.y), device=self.y.device), dim=1)
        for start in range(0, len(self.y) - self.batch_size + 1, self.batch_size):
            self.step(order[:, start:start + self.batch_size])


@torch.no_grad()
def evaluate(mlps: BatchedMLPs, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Every model's mean loss and accuracy on (x, y)."""
    logits = mlps.forward(x.flatten(1).expand(mlps.count, -1, -1))  # [K, N, C]
    loss = F.cross_entropy(logits.transpose(1, 2), y.expand(mlps.count, -1), reduction="none").mean(1)
    return loss.tolist(), (logits.argmax(-1) == y).float().mean(1).tolist()


def main(argv: list[str]) -> None:
    path, threads, epochs, seeds = argv[0], *map(int, argv[1:4])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with np.load(path) as d:
        x, y, x_test, y_test = (torch.from_numpy(d[k]) for k in ("x", "y", "x_test", "y_test"))
    mlps = BatchedMLPs(x, y, seeds, [x.shape[1], 100, 100, 10], batch_size=100, lr=1e-2, capture=False)
    for _ in range(epochs):
        mlps.epoch()
        log = {split: evaluate(mlps, xe, ye) for split, (xe, ye) in {"train": (x, y), "test": (x_test, y_test)}.items()}
    print(f"epoch {epochs} train acc {log['train'][1]} test acc {log['test'][1]}")


if __name__ == "__main__":
    main(sys.argv[1:])
