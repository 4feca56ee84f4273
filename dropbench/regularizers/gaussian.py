"""Multiplicative Gaussian noise ("Gaussian dropout"; Srivastava et al., JMLR 2014, "Dropout: A
Simple Way to Prevent Neural Networks from Overfitting", Section 10).

Training: y = x * e with e ~ N(1, sigma^2) per unit and example, after each hidden activation.
Evaluation: y = x (E[e] = 1, so no rescaling is needed).
sigma^2 = p / (1 - p) by default: the variance of inverted Bernoulli dropout's factor m / (1 - p),
the paper's matching of the two methods. `sigma`, when given, sets the standard deviation directly
and takes precedence over p; the summary's p column then holds the equivalent
p = sigma^2 / (1 + sigma^2), so the two noise families share one axis.
Defaults: p=0.5 (sigma = 1), sigma=null. p may be a list with one value per hidden layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dropbench.config import non_negative, probabilities, scalar_or_list
from dropbench.regularizers import Regularizer
from dropbench.replicas import ReplicaRNG


class GaussianNoise(nn.Module):
    """y = x * (1 + sigma * eps), eps ~ N(0, 1) from replica r's generator."""

    stochastic = True

    def __init__(self, sigma: float, rng: ReplicaRNG):
        super().__init__()
        self.sigma, self.rng = sigma, rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.sigma == 0.0:
            return x
        return x * (1.0 + self.sigma * self.rng.normal(tuple(x.shape[1:])))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:.4g}"


class Gaussian(Regularizer):
    stochastic = True

    def __init__(self, p=0.5, sigma: float | None = None):
        self.sigma = None if sigma is None else non_negative("regularizer.sigma", sigma)
        if self.sigma is not None:
            self.p = self.sigma ** 2 / (1.0 + self.sigma ** 2)
        else:
            self.p = scalar_or_list(p)
            probabilities("regularizer.p", self.p, len(self.p) if isinstance(self.p, list) else 1)

    def summary(self) -> dict:
        return {"p": self.p, "sigma": self.sigma if self.sigma is not None else ""}

    def hidden_layer(self, index, num_hidden, shape, rng):
        if self.sigma is not None:
            return GaussianNoise(self.sigma, rng)
        p = probabilities("regularizer.p", self.p, num_hidden)[index]
        return GaussianNoise(math.sqrt(p / (1.0 - p)), rng)
