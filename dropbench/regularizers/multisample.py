"""Multi-sample dropout (Inoue 2019, "Multi-Sample Dropout for Accelerated Training and Better
Generalization", arXiv:1905.09788).

The network runs once up to the input h of its head (the output layer); K dropout masks
m_1..m_K ~ Bernoulli(1 - p) are applied to h (inverted scaling), each copy goes through the shared
head, and the loss is the average over the samples:

    loss = 1/K sum_k CE(head(m_k * h / (1 - p)), y)

so the cost of the layers before the head is paid once per batch. Evaluation is the plain forward
pass (no dropout), as in the paper. The other dropout places get ordinary inverted dropout with
their p; the last place's rate is the multi-sample rate (no dropout there: the samples replace it).
With k=1 the method is dropout. Parameters: k (default 8, the paper's), p (default 0.5; scalar or
one per dropout place).
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import check, probabilities, scalar_or_list
from dropbench.regularizers import DROPOUTS, NoPlace, Regularizer, cross_entropy, dropout_places, head_of, put_at
from dropbench.regularizers.dropout import DropoutLayer, dropout
from dropbench.replicas import ReplicaGenerators, Replicas


class HeadSamples(nn.Module):
    """The head's input h [B, ...] as K dropout-masked copies [K*B, ...] in training (h itself in evaluation)."""

    replica_settings = ("p",)  # not `stochastic`: MC dropout's sampling at evaluation leaves it off

    def __init__(self, k: int, p: float, generators: ReplicaGenerators):
        super().__init__()
        self.k, self.p, self.generators = k, p, generators

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return h
        return dropout(h.unsqueeze(0).expand(self.k, *h.shape), self.p, self.generators).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"k={self.k}, p={self.p}"


class MultiSample(Regularizer):
    places = ("dropout", "loss")
    folds = ("p",)

    def __init__(self, k: int = 8, p=0.5):
        self.k = check("regularizer.k", k)
        self.p = scalar_or_list(p)
        check("regularizer.p", self.p)

    def summary(self) -> dict:
        return {"p": self.p, "k": self.k}

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        head = head_of(model)
        if head is None:
            raise NoPlace("an output layer (nn.Linear) to feed K samples")
        places = dropout_places(model)
        rates = probabilities("regularizer.p", self.p, len(places))
        for place, p in zip(places[:-1], rates[:-1]):
            put_at(place, DropoutLayer(p, generators))
        if isinstance(places[-1].module, DROPOUTS):
            places[-1].replace(nn.Identity())
        # a submodule of the head, so that train/eval and folding reach it, applied by a pre-hook
        head.add_module("samples", HeadSamples(self.k, rates[-1], generators))
        head.register_forward_pre_hook(lambda module, args: (module.samples(args[0]), *args[1:]))

    def loss(self, model: Replicas, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)  # [R, K*B, C] in training: sample k's batch is rows k*B..(k+1)*B-1
        # mean over K*B examples = mean over the K samples of each sample's batch-mean CE
        return cross_entropy(logits, y.repeat(1, logits.shape[1] // y.shape[1]))
