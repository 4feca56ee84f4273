"""Batch normalization (Ioffe & Szegedy, ICML 2015, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift").

Placed between each hidden Linear/Conv and its activation, per channel c (per unit for Linear):

    training    y = gamma_c (x - mu_B) / sqrt(var_B + eps) + beta_c, with the batch's mean and
                (biased) variance over the examples (and positions, for conv), and the running
                estimates updated as  running <- (1 - momentum) running + momentum * batch
                (unbiased variance), PyTorch's convention
    evaluation  y = gamma_c (x - running_mean_c) / sqrt(running_var_c + eps) + beta_c

Per replica: [R, B, C, *] is laid out as [B, R*C, *] so one F.batch_norm call normalizes each
replica's channels over that replica's batch only, with R*C running statistics and affine
parameters gamma (init 1) and beta (init 0) of shape [R, C]. Defaults: momentum=0.1, eps=1e-5
(PyTorch's). Not combinable with methods that replace hidden Linear layers (dropconnect, standout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dropbench.config import UserError, positive_float
from dropbench.regularizers import Regularizer


class ReplicaBatchNorm(nn.Module):
    """Batch normalization of [R, B, C, *spatial] with separate statistics for each replica."""

    def __init__(self, replicas: int, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.replicas, self.channels, self.momentum, self.eps = replicas, channels, momentum, eps
        self.weight = nn.Parameter(torch.ones(replicas, channels))
        self.bias = nn.Parameter(torch.zeros(replicas, channels))
        self.register_buffer("running_mean", torch.zeros(replicas, channels))
        self.register_buffer("running_var", torch.ones(replicas, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R, B, C = x.shape[:3]
        grouped = x.transpose(0, 1).reshape(B, R * C, *x.shape[3:])
        # The buffers are contiguous [R, C]: their flat views are updated in place by batch_norm.
        y = F.batch_norm(grouped, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
                         self.bias.view(-1), self.training, self.momentum, self.eps)
        return y.view(B, R, C, *x.shape[3:]).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, momentum={self.momentum}, eps={self.eps}"


class BatchNorm(Regularizer):
    def __init__(self, momentum: float = 0.1, eps: float = 1e-5):
        self.momentum = positive_float("regularizer.momentum", momentum)
        if self.momentum > 1:
            raise UserError(f"regularizer.momentum={momentum!r} is not allowed; it must be a number in (0, 1]")
        self.eps = positive_float("regularizer.eps", eps)

    def summary(self) -> dict:
        return {"momentum": self.momentum, "eps": self.eps}

    def norm_layer(self, index, num_hidden, shape, replicas):
        return ReplicaBatchNorm(replicas, shape[0], self.momentum, self.eps)
