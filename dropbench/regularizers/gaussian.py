"""Multiplicative Gaussian noise ("Gaussian dropout"; Srivastava et al., JMLR 2014, "Dropout: A
Simple Way to Prevent Neural Networks from Overfitting", Section 10).

Training: y = x * e with e ~ N(1, sigma^2) per unit and example, after each hidden activation.
Evaluation: y = x (E[e] = 1, so no rescaling is needed).
sigma^2 = p / (1 - p) by default: the variance of inverted Bernoulli dropout's factor m / (1 - p),
the paper's matching of the two methods. `sigma`, when given, sets the standard deviation directly
and takes precedence over p; the summary's p column then holds the equivalent
p = sigma^2 / (1 + sigma^2), so the two noise families share one axis.
Places: those of dropout (the model's own dropout modules, else after every activation module).
Defaults: p=0.5 (sigma = 1), sigma=null. p may be a list with one value per place.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dropbench.config import check, probabilities, scalar_or_list
from dropbench.regularizers import Regularizer, dropout_places, put_at
from dropbench.replicas import ReplicaGenerators, replica_random, replica_value


class GaussianNoise(nn.Module):
    """y = x * (1 + sigma * eps), eps ~ N(0, 1) per element from the replica's generator."""

    stochastic = True
    replica_settings = ("sigma",)

    def __init__(self, sigma: float, generators: ReplicaGenerators):
        super().__init__()
        self.sigma, self.generators = sigma, generators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.sigma == 0.0:
            return x
        sigma = replica_value(self.sigma, x, self.generators)
        return x * (1.0 + sigma * replica_random(x, x.shape, self.generators, normal=True))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:.4g}"


class Gaussian(Regularizer):
    places = ("dropout",)
    folds = ("p", "sigma")

    def __init__(self, p=0.5, sigma: float | None = None):
        self.sigma = check("regularizer.sigma", sigma)
        if self.sigma is not None:
            self.p = self.sigma ** 2 / (1.0 + self.sigma ** 2)
        else:
            self.p = scalar_or_list(p)
            check("regularizer.p", self.p)

    def summary(self) -> dict:
        return {"p": self.p, "sigma": self.sigma if self.sigma is not None else ""}

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        places = dropout_places(model)
        if self.sigma is not None:
            sigmas = [self.sigma] * len(places)
        else:
            sigmas = [math.sqrt(p / (1.0 - p)) for p in probabilities("regularizer.p", self.p, len(places))]
        for place, sigma in zip(places, sigmas):
            put_at(place, GaussianNoise(sigma, generators))
