"""Replica-batched building blocks: R independent copies of a model held in one set of tensors.

Every activation has a leading replica dimension, ``[R, B, ...]``, and every parameter one too,
``[R, ...]``. A run with ``parallel_seeds=R`` trains R seeds at once with one batched matmul per
layer; a plain run is R = 1. Replica k draws all of its randomness (initialization, batch order,
dropout masks) from its own generator seeded with its seed, so it computes what a single run
with that seed computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ReplicaRNG:
    """One torch.Generator per replica: replica k's random stream depends only on its seed."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.seeds = list(seeds)
        self.device = device
        # Initialization is drawn on the CPU so a seed gives the same weights on every device.
        self.init = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        self.train = [torch.Generator(device).manual_seed(s) for s in self.seeds]

    @property
    def replicas(self) -> int:
        return len(self.seeds)

    def permutations(self, n: int) -> torch.Tensor:
        """[R, n] row-wise independent permutations of range(n), on the device."""
        return torch.stack([torch.randperm(n, generator=g, device=self.device) for g in self.train])

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[R, *shape] uniform samples in [0, 1)."""
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.train])

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[R, *shape] standard normal samples."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.train])

    def keep_mask(self, shape: tuple[int, ...], keep: float) -> torch.Tensor:
        """[R, *shape] float mask of ones with probability `keep`, zeros otherwise."""
        return (self.uniform(shape) < keep).to(torch.float32)

    def state(self) -> dict:
        return {"train": [g.get_state() for g in self.train]}

    def load_state(self, state: dict) -> None:
        for g, s in zip(self.train, state["train"]):
            g.set_state(s)


def init_weight_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int, scheme: str, std: float,
                 generators: list[torch.Generator]) -> None:
    """Initialize a replica-batched weight [R, ...] and bias [R, ...] in place, replica k from generator k.

    Schemes: ``default`` is PyTorch's nn.Linear/nn.Conv default (U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weight and bias); ``normal`` is N(0, std^2) with zero bias (d2l uses std=0.01);
    ``xavier`` is Glorot uniform and ``kaiming`` He normal (ReLU gain), both with zero bias.
    """
    receptive_field = weight[0, 0, 0].numel() if weight.dim() > 3 else 1
    fan_out = weight.shape[1] * receptive_field
    with torch.no_grad():
        for k, g in enumerate(generators):
            w = torch.empty(weight[k].shape)
            b = torch.zeros(bias[k].shape) if bias is not None else None
            if scheme == "default":
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                w.uniform_(-bound, bound, generator=g)
                if b is not None:
                    b.uniform_(-bound, bound, generator=g)
            elif scheme == "normal":
                w.normal_(0.0, std, generator=g)
            elif scheme == "xavier":
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                w.uniform_(-bound, bound, generator=g)
            elif scheme == "kaiming":
                w.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
            else:  # checked by the model's constructor
                raise ValueError(scheme)
            weight[k].copy_(w)
            if b is not None:
                bias[k].copy_(b)


class ReplicaLinear(nn.Module):
    """y = x W^T + b for each replica: x [R, B, in] -> [R, B, out], one batched matmul."""

    def __init__(self, replicas: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(replicas, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(replicas, out_features)) if bias else None

    def reset_parameters(self, scheme: str, std: float, generators: list[torch.Generator]) -> None:
        init_weight_(self.weight, self.bias, self.in_features, scheme, std, generators)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class ReplicaConv(nn.Module):
    """A 1-D or 2-D convolution per replica as one grouped convolution.

    x [R, B, C, *spatial] is laid out as [B, R*C, *spatial] so that group r sees replica r only.
    """

    def __init__(self, replicas: int, dims: int, in_channels: int, out_channels: int,
                 kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.replicas, self.dims = replicas, dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(replicas, out_channels, in_channels, *([kernel_size] * dims)))
        self.bias = nn.Parameter(torch.empty(replicas, out_channels))
        self.conv = F.conv1d if dims == 1 else F.conv2d

    def reset_parameters(self, scheme: str, std: float, generators: list[torch.Generator]) -> None:
        fan_in = self.weight[0, 0].numel()
        init_weight_(self.weight, self.bias, fan_in, scheme, std, generators)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R, B = x.shape[:2]
        grouped = x.transpose(0, 1).reshape(B, R * self.in_channels, *x.shape[3:])
        y = self.conv(grouped, self.weight.flatten(0, 1), self.bias.flatten(), self.stride, self.padding, 1, R)
        return y.view(B, R, self.out_channels, *y.shape[2:]).transpose(0, 1)


def output_shape(conv: ReplicaConv, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-example output shape [C, *spatial] of `conv` for an input of per-example shape `shape`."""
    k = conv.weight.shape[-1]
    spatial = tuple((s + 2 * conv.padding - k) // conv.stride + 1 for s in shape[1:])
    return (conv.out_channels, *spatial)
