"""Weight penalties added to the loss, per replica (the classic "weight decay" of Hinton 1987 /
Krogh & Hertz 1992, "A Simple Weight Decay Can Improve Generalization"; L1 as in Tibshirani 1996):

    l1:  lam * sum_w |w|          (default lam = 1e-5)
    l2:  lam / 2 * sum_w w^2      (default lam = 1e-4)

The sums run over the weights of every nn.Linear/nn.Conv* module of the model, head included, and leave
out biases and normalization parameters (our choice, the common one: biases do not cause overfitting and
penalizing them shifts the units' operating points).

l2 versus the optimizer's weight_decay: the gradient of lam/2 ||w||^2 is lam w, which is exactly
what SGD's coupled `weight_decay=lam` adds to the gradient, so for plain SGD the two give the same
updates (here only on weights; weight_decay also decays biases). With momentum they still agree
(both enter the gradient before the momentum buffer). With Adam they differ: the penalty's gradient
is divided by Adam's per-parameter sqrt(v) like the loss's, so large-gradient weights are decayed
less; Adam's own weight_decay is the same coupled L2. AdamW's weight_decay is decoupled
(Loshchilov & Hutter 2019): w <- w - lr * wd * w outside the adaptive step, not a loss term at all.
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import check
from dropbench.regularizers import NoPlace, Regularizer, weight_names
from dropbench.replicas import ReplicaGenerators, Replicas, replica_tensor


class Penalty(Regularizer):
    """lam * sum over the weights of `term(w)`, per replica."""

    folds = ("lam",)

    def __init__(self, lam: float):
        self.lam = check("regularizer.lam", lam)
        self.names: list[str] = []

    def summary(self) -> dict:
        return {"lam": self.lam}

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        if not weight_names(model):
            raise NoPlace("an nn.Linear or nn.Conv layer whose weights it penalizes")

    def bind(self, model: Replicas) -> None:
        self.names = weight_names(model.module)

    @staticmethod
    def term(w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self, model: Replicas) -> torch.Tensor:
        total = sum(self.term(model.stacked(name)).flatten(1).sum(1) for name in self.names)
        return replica_tensor(self.lam, total) * total


class L1(Penalty):
    def __init__(self, lam: float = 1e-5):
        super().__init__(lam)

    @staticmethod
    def term(w):
        return w.abs()


class L2(Penalty):
    def __init__(self, lam: float = 1e-4):
        super().__init__(lam)

    @staticmethod
    def term(w):
        return w.square() / 2
