"""Models: an MLP and a small CNN (1-D signals or 2-D images), assembled from hidden blocks

    Linear/Conv -> [norm] -> activation -> [after-activation layer]

where the bracketed places (and the input, and the Linear + activation pair) are filled by the
run's regularizers. All parameters carry a leading replica dimension (dropbench.replicas).
Each model exposes `features` (inputs -> last hidden representation) and `head` (-> logits).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dropbench.config import UserError, positive_int
from dropbench.regularizers import Regularizers
from dropbench.replicas import ReplicaConv, ReplicaLinear, ReplicaRNG, output_shape

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
INITS = ("default", "normal", "xavier", "kaiming")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise UserError(f"model.activation={name!r} is not allowed; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Flatten(nn.Module):
    """[R, B, *shape] -> [R, B, prod(shape)]."""

    def forward(self, x):
        return x.flatten(2)


class HiddenBlock(nn.Module):
    """layer -> norm -> activation -> after, or custom (Linear + activation) -> after."""

    def __init__(self, layer: nn.Module | None, norm: nn.Module | None, activation: nn.Module,
                 after: nn.Module | None, custom: nn.Module | None = None):
        super().__init__()
        if custom is not None and norm is not None:
            raise UserError("a method replacing hidden Linear layers cannot be combined with a normalization method")
        self.layer = custom if custom is not None else layer
        self.norm = norm or nn.Identity()
        self.activation = nn.Identity() if custom is not None else activation
        self.after = after or nn.Identity()

    def forward(self, x):
        return self.after(self.activation(self.norm(self.layer(x))))


class Classifier(nn.Module):
    """inputs -> input layer -> hidden blocks -> head, with init and the regularizers' layers."""

    def __init__(self, name: str, inputs: nn.Module, blocks: list[nn.Module], head: nn.Module,
                 rng: ReplicaRNG, init: str, init_std: float):
        super().__init__()
        if init not in INITS:
            raise UserError(f"model.init={init!r} is not allowed; choose from {', '.join(INITS)}")
        self.name = name
        self.inputs = inputs
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        for module in self.modules():
            if isinstance(module, (ReplicaLinear, ReplicaConv)):
                module.reset_parameters(init, init_std, rng.init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.inputs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _linear_blocks(widths: list[int], in_features: int, activation: str, regs: Regularizers,
                   rng: ReplicaRNG, first_index: int, num_hidden: int) -> tuple[list[nn.Module], int]:
    blocks = []
    for i, width in enumerate(widths):
        index = first_index + i
        act = _activation(activation)
        custom = regs.hidden_linear(index, num_hidden, in_features, width, act, rng)
        blocks.append(HiddenBlock(
            ReplicaLinear(rng.replicas, in_features, width),
            regs.norm_layer(index, num_hidden, (width,), rng.replicas),
            act,
            regs.hidden_layer(index, num_hidden, (width,), rng),
            custom,
        ))
        in_features = width
    return blocks, in_features


def MLP(in_shape: tuple[int, ...], num_classes: int, regs: Regularizers, rng: ReplicaRNG,
        hidden=(100, 100), activation: str = "relu", init: str = "default", init_std: float = 0.01) -> Classifier:
    """A multi-layer perceptron on flattened inputs; `hidden=[]` is logistic regression."""
    hidden = [positive_int("model.hidden", h) for h in hidden]
    in_features = math.prod(in_shape)
    inputs = nn.Sequential(Flatten(), regs.input_layer((in_features,), rng) or nn.Identity())
    blocks, width = _linear_blocks(hidden, in_features, activation, regs, rng, 0, len(hidden))
    head = ReplicaLinear(rng.replicas, width, num_classes)
    return Classifier("logreg" if not hidden else "mlp", inputs, blocks, head, rng, init, init_std)


def CNN(in_shape: tuple[int, ...], num_classes: int, regs: Regularizers, rng: ReplicaRNG,
        channels=(25, 25, 25), kernel_sizes=(5, 3, 3), strides=(2, 2, 2), paddings=(1, 1, 1), hidden=(),
        activation: str = "relu", init: str = "default", init_std: float = 0.01) -> Classifier:
    """Conv blocks over [C, L] signals or [C, H, W] images, then optional hidden Linear blocks and a head."""
    if not len(channels) == len(kernel_sizes) == len(strides) == len(paddings):
        raise UserError("model.channels, kernel_sizes, strides and paddings must have the same length")
    if len(in_shape) not in (2, 3):
        raise UserError(f"model cnn needs [C, L] or [C, H, W] inputs, the dataset gives {list(in_shape)}")
    num_hidden = len(channels) + len(hidden)
    shape = tuple(in_shape)
    inputs = regs.input_layer(shape, rng) or nn.Identity()
    blocks = []
    for index, (c, k, s, p) in enumerate(zip(channels, kernel_sizes, strides, paddings)):
        conv = ReplicaConv(rng.replicas, len(in_shape) - 1, shape[0], positive_int("model.channels", c), k, s, p)
        shape = output_shape(conv, shape)
        if min(shape[1:]) <= 0:
            raise UserError(f"model cnn: the input {list(in_shape)} is too small for {len(channels)} conv layers")
        blocks.append(HiddenBlock(
            conv,
            regs.norm_layer(index, num_hidden, shape, rng.replicas),
            _activation(activation),
            regs.hidden_layer(index, num_hidden, shape, rng),
        ))
    blocks.append(Flatten())
    linear, width = _linear_blocks([positive_int("model.hidden", h) for h in hidden], math.prod(shape),
                                   activation, regs, rng, len(channels), num_hidden)
    head = ReplicaLinear(rng.replicas, width, num_classes)
    return Classifier("cnn", inputs, blocks + linear, head, rng, init, init_std)
