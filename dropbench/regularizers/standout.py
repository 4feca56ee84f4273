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
Acts on hidden Linear layers (it needs the pre-activation), so a CNN needs model.hidden layers.
alpha=0 gives dropout with the constant keep probability sigmoid(beta) (scaled at evaluation).
Defaults: alpha=1.0, beta=0.0.
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import real
from dropbench.regularizers import Regularizer
from dropbench.replicas import ReplicaLinear, ReplicaRNG


class StandoutLinear(nn.Module):
    """m * act(W x + b), m ~ Bernoulli(sigmoid(alpha (W x + b) + beta)); [R, B, in] -> [R, B, out]."""

    stochastic = True

    def __init__(self, linear: ReplicaLinear, activation: nn.Module, alpha: float, beta: float, rng: ReplicaRNG):
        super().__init__()
        self.linear, self.activation = linear, activation
        self.alpha, self.beta, self.rng = alpha, beta, rng

    def keep_probability(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.alpha * a + self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.linear(x)
        keep = self.keep_probability(a)
        if self.training:
            mask = (self.rng.uniform(tuple(a.shape[1:])) < keep.detach()).to(a.dtype)
            return self.activation(a) * mask
        return self.activation(a) * keep

    def extra_repr(self) -> str:
        return f"in={self.linear.in_features}, out={self.linear.out_features}, alpha={self.alpha}, beta={self.beta}"


class Standout(Regularizer):
    stochastic = True

    def __init__(self, alpha: float = 1.0, beta: float = 0.0):
        self.alpha = real("regularizer.alpha", alpha)
        self.beta = real("regularizer.beta", beta)

    def summary(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}

    def hidden_linear(self, index, num_hidden, in_features, out_features, activation, rng):
        return StandoutLinear(ReplicaLinear(rng.replicas, in_features, out_features), activation,
                              self.alpha, self.beta, rng)
