"""Inverted dropout (Srivastava et al., JMLR 2014, "Dropout: A Simple Way to Prevent Neural
Networks from Overfitting"; inverted scaling as in every modern framework).

Training: y = m * x / (1 - p) with m ~ Bernoulli(1 - p) per unit, so E[y] = x.
Evaluation: y = x (the identity; the 1/(1-p) at training time already matches the expectation).
p may be one number or one per hidden layer (d2l: 0.2 then 0.5); `input_p` drops inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dropbench.config import choice, probabilities, probability, scalar_or_list
from dropbench.regularizers import Regularizer
from dropbench.replicas import ReplicaRNG


class DropoutLayer(nn.Module):
    """Inverted dropout on [R, B, *shape]; replica r's masks come from its own generator.

    impl="torch" uses torch.nn.functional.dropout instead (same distribution, one global stream,
    so replicas no longer reproduce their single runs exactly).
    """

    stochastic = True

    def __init__(self, p: float, rng: ReplicaRNG, impl: str = "own"):
        super().__init__()
        self.p, self.rng, self.impl = p, rng, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.impl == "torch":
            return F.dropout(x, self.p, training=True)
        keep = 1.0 - self.p
        return x * self.rng.keep_mask(tuple(x.shape[1:]), keep, 1.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, impl={self.impl}"


class Dropout(Regularizer):
    """Defaults: p=0.5 (Srivastava et al. 2014 for hidden units), input_p=0.0, impl=own."""

    stochastic = True
    layer = DropoutLayer  # the module placed after each hidden activation (and on the inputs)

    def __init__(self, p=0.5, input_p: float = 0.0, impl: str = "own"):
        self.impl = choice("regularizer.impl", impl, ("own", "torch"))
        self.p = scalar_or_list(p)
        self.input_p = probability("regularizer.input_p", input_p)
        probabilities("regularizer.p", self.p, len(self.p) if isinstance(self.p, list) else 1)

    def summary(self) -> dict:
        return {"p": self.p, "input_p": self.input_p}

    def input_layer(self, shape, rng):
        return self.layer(self.input_p, rng, self.impl) if self.input_p > 0 else None

    def hidden_layer(self, index, num_hidden, shape, rng):
        # Kept even at p = 0 (an identity) so that p sweeps share one model structure.
        return self.layer(probabilities("regularizer.p", self.p, num_hidden)[index], rng, self.impl)
