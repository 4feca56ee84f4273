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
from dropbench.replicas import aligned


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
        # One call per replica (a grouped call over R*C channels rounds differently from the single
        # run); the rows running_mean[k], running_var[k] are views, updated in place by batch_norm.
        outs = [F.batch_norm(aligned(x[k]), self.running_mean[k], self.running_var[k], self.weight[k], self.bias[k],
                             self.training, self.momentum, self.eps) for k in range(len(x))]
        return torch.stack(outs) if len(outs) > 1 else outs[0].unsqueeze(0)

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
