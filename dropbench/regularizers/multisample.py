"""Multi-sample dropout (Inoue 2019, "Multi-Sample Dropout for Accelerated Training and Better
Generalization", arXiv:1905.09788).

The network runs once up to its last hidden representation h = features(x); K dropout masks
m_1..m_K ~ Bernoulli(1 - p) are applied to h (inverted scaling), each copy goes through the shared
head, and the loss is the average over the samples:

    loss = 1/K sum_k CE(head(m_k * h / (1 - p)), y)

so the cost of the expensive layers is paid once per batch. Evaluation is the plain forward pass
(no dropout), as in the paper. Hidden layers before the last get ordinary inverted dropout with
their p; the last hidden layer's dropout happens in the loss. With k=1 the method is dropout.
Parameters: k (default 8, the paper's), p (default 0.5; scalar or one per hidden layer, the last
entry being the multi-sample rate).
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import positive_int, probabilities, scalar_or_list
from dropbench.regularizers import Regularizer, cross_entropy
from dropbench.regularizers.dropout import DropoutLayer
from dropbench.replicas import ReplicaRNG


class MultiSampleSlot(nn.Module):
    """Marks the last hidden layer, whose dropout multi-sample dropout applies in the loss (identity)."""

    stochastic = True

    def __init__(self, p: float, k: int):
        super().__init__()
        self.p, self.k = p, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"p={self.p}, k={self.k} (applied in the loss)"


class MultiSample(Regularizer):
    stochastic = True

    def __init__(self, k: int = 8, p=0.5):
        self.k = positive_int("regularizer.k", k)
        self.p = scalar_or_list(p)
        probabilities("regularizer.p", self.p, len(self.p) if isinstance(self.p, list) else 1)
        self.last_p: float | None = None
        self.rng: ReplicaRNG | None = None

    def summary(self) -> dict:
        return {"p": self.p, "k": self.k}

    def hidden_layer(self, index, num_hidden, shape, rng):
        p = probabilities("regularizer.p", self.p, num_hidden)[index]
        if index < num_hidden - 1:
            return DropoutLayer(p, rng)
        self.last_p, self.rng = p, rng
        return MultiSampleSlot(p, self.k)

    def forward_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = model.features(x)  # [R, B, *shape], computed once
        if not self.last_p:
            return cross_entropy(model.head(h), y)
        keep = 1.0 - self.last_p
        masks = self.rng.keep_mask((self.k, *h.shape[1:]), keep)  # [R, K, B, *shape]
        samples = (h.unsqueeze(1) * masks * (1.0 / keep)).flatten(1, 2)  # [R, K*B, *shape]
        # Mean over K*B examples = mean over the K samples of each sample's batch-mean CE.
        return cross_entropy(model.head(samples), y.repeat(1, self.k))
