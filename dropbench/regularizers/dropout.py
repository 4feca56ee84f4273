"""Inverted dropout (Srivastava et al., JMLR 2014, "Dropout: A Simple Way to Prevent Neural
Networks from Overfitting"; inverted scaling as in every modern framework).

Training: y = m * x / (1 - p) with m ~ Bernoulli(1 - p) per unit, so E[y] = x.
Evaluation: y = x (the identity; the 1/(1-p) at training time already matches the expectation).
Places: the model's own dropout modules (replaced), else after every activation module; `p` is one
number or one per place (d2l: 0.2 then 0.5); `input_p` drops inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dropbench.config import check, probabilities, scalar_or_list
from dropbench.regularizers import Regularizer, dropout_places, put_at
from dropbench.replicas import PerReplica, ReplicaGenerators, keep_mask, replica_map, replica_value


def dropout(x: torch.Tensor, p, generators: ReplicaGenerators, scale: bool = True, impl: str = "own") -> torch.Tensor:
    """x * m (/ (1 - p) when `scale`), m ~ Bernoulli(1 - p) per element, from the replica's generator.

    Args:
        x: any shape.
        p: drop probability in [0, 1) (PerReplica in a folded sweep).
        generators: the run's ReplicaGenerators.
        scale: inverted dropout (divide by 1 - p); False keeps the raw mask (non-inverted dropout).
        impl: "own" (each replica's generator: its single run's masks) or "torch" (torch's global
            generator: one kernel for every replica, the same distribution, other masks).
    """
    keep = replica_map(lambda p: 1.0 - p, p)
    if impl == "torch":
        if not isinstance(p, PerReplica):
            out = F.dropout(x, p, training=True)
            return out if scale else out * keep
        keep = replica_value(keep, x, generators)  # each replica's own rate, one sample for all of them
        mask = (torch.rand_like(x) < keep).to(x.dtype)
        return x * mask / keep if scale else x * mask
    return x * keep_mask(x, x.shape, generators, keep, replica_map(lambda k: 1.0 / k, keep) if scale else 1.0)


class DropoutLayer(nn.Module):
    """Inverted dropout on any shape; replica k's masks come from its own generator.

    impl="torch" draws from torch's global generator instead (torch.nn.functional.dropout; same
    distribution, one kernel for every replica: replicas then no longer draw their single runs' masks).
    """

    stochastic = True
    replica_settings = ("p",)  # may differ between the replicas of a folded sweep

    def __init__(self, p: float, generators: ReplicaGenerators, impl: str = "own"):
        super().__init__()
        self.p, self.generators, self.impl = p, generators, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return dropout(x, self.p, self.generators, impl=self.impl)

    def extra_repr(self) -> str:
        return f"p={self.p}, impl={self.impl}"


class Dropout(Regularizer):
    """Defaults: p=0.5 (Srivastava et al. 2014 for hidden units), input_p=0.0, impl=own."""

    places = ("dropout",)
    folds = ("p", "input_p")
    layer = DropoutLayer  # the module placed at each dropout place (and on the inputs)

    def __init__(self, p=0.5, input_p: float = 0.0, impl: str = "own"):
        self.impl = check("regularizer.impl", impl)
        self.p = scalar_or_list(p)
        self.input_p = check("regularizer.input_p", input_p)
        check("regularizer.p", self.p)

    def summary(self) -> dict:
        return {"p": self.p, "input_p": self.input_p}

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        places = dropout_places(model)
        # kept even at p = 0 (an identity) so that p sweeps share one model structure
        for place, p in zip(places, probabilities("regularizer.p", self.p, len(places))):
            put_at(place, self.layer(p, generators, self.impl))
        if self.input_p > 0:
            add_input_layer(model, self.layer(self.input_p, generators, self.impl))


def add_input_layer(model: nn.Module, layer: nn.Module) -> None:
    """Apply `layer` to the model's input: first in an nn.Sequential, else through a forward pre-hook
    (the layer registered as a submodule, so train/eval reach it)."""
    if isinstance(model, nn.Sequential):  # a Sequential runs every child, so it goes in front
        model.insert(0, layer)
        return
    model.add_module("input_dropout", layer)
    model.register_forward_pre_hook(lambda module, args: (module.input_dropout(args[0]), *args[1:]))
