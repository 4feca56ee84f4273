"""Max-norm constraint (Srebro & Shraibman 2005; used with dropout by Hinton et al. 2012 and
Srivastava et al. 2014, Section 5.1, with c typically 3 to 4).

After every optimizer step, each hidden unit's incoming weight vector is projected onto the ball
of radius c:  w_j <- w_j * min(1, c / ||w_j||_2).  For a hidden Linear layer w_j is row j of W
[out, in]; for a conv layer it is output channel j's kernel [in, *k]. Biases and the output layer
(the head) are not constrained. Default: c=3.0.
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import UserError, positive_float
from dropbench.regularizers import Regularizer, weight_layers


def project_rows_(weight: torch.Tensor, c: float) -> None:
    """In place: rows weight[r, j] (flattened over the rest) with norm > c scaled to norm c."""
    norms = weight.flatten(2).norm(dim=2)  # [R, out]
    scale = (c / norms.clamp_min(1e-12)).clamp(max=1.0)
    weight.mul_(scale.view(*scale.shape, *([1] * (weight.dim() - 2))))


class MaxNorm(Regularizer):
    def __init__(self, c: float = 3.0):
        self.c = positive_float("regularizer.c", c)

    def summary(self) -> dict:
        return {"c": self.c}

    def check(self, model: nn.Module) -> None:
        if not weight_layers(model, hidden_only=True):
            raise UserError(f"regularizer maxnorm has no place to act in model {model.name}: it constrains "
                            f"hidden units' weights and the model has no hidden layers")

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for layer in weight_layers(model, hidden_only=True):
            project_rows_(layer.weight, self.c)
