"""Standout, adaptive dropout (Ba & Frey, NIPS 2013, "Adaptive dropout for training deep neural
networks").

A binary belief network overlaid on each hidden Linear layer decides which units to keep,
P(m_j = 1 | x) = f(sum_i pi_ji x_i). The paper found that the learnt standout weights track the
layer's own and ties them, pi = alpha W + beta; in the usual per-unit form used here, for a layer
with pre-activation a = W x + b:

    keep probability  pi = sigmoid(alpha * a + beta)
    training          y = m * act(a),  m ~ Bernoulli(pi) per unit and example
    evaluation        y = pi * act(a)  (the expected mask; no inverted scaling)

The mask is a sample, so no gradient flows through pi in training (as in the paper with tied
weights, where the standout network is not trained separately); gradients flow through act(a).
Places: every hidden nn.Linear directly followed by an activation module in an nn.Sequential (it
needs the pre-activation); the pair is replaced by one StandoutLinear holding the same Linear.
alpha=0 gives dropout with the constant keep probability sigmoid(beta) (scaled at evaluation).
Defaults: alpha=1.0, beta=0.0.
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import check
from dropbench.regularizers import NoPlace, Regularizer, hidden_pairs
from dropbench.replicas import ReplicaGenerators, replica_random, replica_value


class StandoutLinear(nn.Module):
    """m * act(W x + b), m ~ Bernoulli(sigmoid(alpha (W x + b) + beta)); `linear` holds W and b."""

    stochastic = True
    replica_settings = ("alpha", "beta")

    def __init__(self, linear: nn.Linear, activation: nn.Module, alpha: float, beta: float,
                 generators: ReplicaGenerators):
        super().__init__()
        self.linear, self.activation = linear, activation
        self.alpha, self.beta, self.generators = alpha, beta, generators

    def keep_probability(self, a: torch.Tensor) -> torch.Tensor:
        alpha, beta = (replica_value(v, a, self.generators) for v in (self.alpha, self.beta))
        return torch.sigmoid(alpha * a + beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.linear(x)
        keep = self.keep_probability(a)
        if self.training:
            mask = (replica_random(a, a.shape, self.generators) < keep.detach()).to(a.dtype)
            return self.activation(a) * mask
        return self.activation(a) * keep

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


class Standout(Regularizer):
    places = ("hidden_linear",)
    folds = ("alpha", "beta")

    def __init__(self, alpha: float = 1.0, beta: float = 0.0):
        self.alpha = check("regularizer.alpha", alpha, "standout")
        self.beta = check("regularizer.beta", beta)

    def summary(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        pairs = hidden_pairs(model, nn.Linear)
        if not pairs:
            raise NoPlace("a hidden nn.Linear followed by an activation module in an nn.Sequential")
        for seq, i in pairs:
            seq[i] = StandoutLinear(seq[i], seq[i + 1], self.alpha, self.beta, generators)
            seq[i + 1] = nn.Identity()
