"""Max-norm constraint (Srebro & Shraibman 2005; used with dropout by Hinton et al. 2012 and
Srivastava et al. 2014, Section 5.1, with c typically 3 to 4).

After every optimizer step, each hidden unit's incoming weight vector is projected onto the ball
of radius c:  w_j <- w_j * min(1, c / ||w_j||_2).  For a Linear layer w_j is row j of W [out, in];
for a conv layer it is output channel j's kernel [in, *k]. Places: the weights of every
nn.Linear/nn.Conv* except the head (the output layer); biases are not constrained. Default: c=3.0.
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import check
from dropbench.regularizers import NoPlace, Regularizer, weight_names
from dropbench.replicas import ReplicaGenerators, Replicas, replica_tensor


def project_rows_(weight: torch.Tensor, c) -> None:
    """In place: rows weight[r, j] (flattened over the rest) with norm > c scaled to norm c; weight
    [R, out, ...]; c a number or PerReplica."""
    norms = weight.flatten(2).norm(dim=2)  # [R, out]
    scale = (replica_tensor(c, norms) / norms.clamp_min(1e-12)).clamp(max=1.0)
    weight.mul_(scale.view(*scale.shape, *([1] * (weight.dim() - 2))))


class MaxNorm(Regularizer):
    folds = ("c",)

    def __init__(self, c: float = 3.0):
        self.c = check("regularizer.c", c)
        self.names: list[str] = []

    def summary(self) -> dict:
        return {"c": self.c}

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        if not weight_names(model, hidden_only=True):
            raise NoPlace("a hidden nn.Linear or nn.Conv layer (the head is not constrained)")

    def bind(self, model: Replicas) -> None:
        self.names = weight_names(model.module, hidden_only=True)

    def after_step(self, model: Replicas) -> None:
        for name in self.names:
            project_rows_(model.stacked(name), self.c)
