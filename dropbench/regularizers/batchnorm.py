"""Batch normalization (Ioffe & Szegedy, ICML 2015, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift").

Placed between each hidden Linear/Conv and its activation, per channel c (per unit for Linear):

    training    y = gamma_c (x - mu_B) / sqrt(var_B + eps) + beta_c, with the batch's mean and
                (biased) variance over the examples (and positions, for conv), and the running
                estimates updated as  running <- (1 - momentum) running + momentum * batch
                (unbiased variance), PyTorch's convention
    evaluation  y = gamma_c (x - running_mean_c) / sqrt(running_var_c + eps) + beta_c

Places: every hidden nn.Linear/nn.Conv* directly followed by an activation module in an
nn.Sequential gets a torch.nn.BatchNorm layer between the two. A model with BatchNorm layers of
its own keeps them and gets no new ones: the method then sets their momentum and eps. Each replica
has its own statistics (they are buffers, stacked like the parameters). Defaults: momentum=0.1,
eps=1e-5 (PyTorch's). Not combinable with methods that replace hidden Linear layers.
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import check
from dropbench.regularizers import NoPlace, Regularizer, hidden_pairs
from dropbench.replicas import ReplicaGenerators

OWN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_BATCHNORMS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


class LinearBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last dimension, the features of an nn.Linear: [B, F] as usual, and
    [B, ..., F] (a Linear applied to every token) normalized over all leading dimensions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.dim() == 2 else super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


class BatchNorm(Regularizer):
    places = ("norm",)

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5):
        self.momentum = check("regularizer.momentum", momentum)
        self.eps = check("regularizer.eps", eps)

    def summary(self) -> dict:
        return {"momentum": self.momentum, "eps": self.eps}

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        own = [m for m in model.modules() if isinstance(m, OWN_BATCHNORMS)]
        for layer in own:
            layer.momentum, layer.eps = self.momentum, self.eps
        if own:
            return
        pairs = hidden_pairs(model)
        if not pairs:
            raise NoPlace("a hidden nn.Linear/nn.Conv followed by an activation module in an "
                                             "nn.Sequential, or BatchNorm layers of its own")
        for seq, i in pairs:
            layer = seq[i]
            width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            norm = LinearBatchNorm if isinstance(layer, nn.Linear) else CONV_BATCHNORMS[type(layer)]
            seq[i] = nn.Sequential(layer, norm(width, eps=self.eps, momentum=self.momentum))
