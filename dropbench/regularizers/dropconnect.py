"""DropConnect (Wan, Zeiler, Zhang, LeCun & Fergus, ICML 2013, "Regularization of Neural Networks
using DropConnect").

Each hidden Linear layer (with its activation a) computes, in training,

    r = a((M * W) v / (1 - p) + b),    M_ij ~ Bernoulli(1 - p)

a Bernoulli mask on the *weights* (not the biases: they are left unmasked here, our choice). The
mask is drawn per example, as in the paper (`per_example: true`, default), or once per mini-batch
and shared by its examples (`per_example: false`).

Cost trade-off: per-example masks need B x out x in random numbers and a batched matrix-vector
product per example (memory and time ~ B times a plain layer's weights); a per-batch mask costs one
out x in mask and keeps the ordinary matrix product, but its examples' noise is correlated, so the
gradient is noisier per step. Use per_example=false for wide layers or big batches.

Evaluation (`inference`):
- `mean` (default): weight scaling; with the inverted 1/(1 - p) in training, r = a(W v + b).
- `moment_matching`: the paper's Algorithm 2. u = (M * W) v / (1 - p) + b is approximated by a
  Gaussian with mean W v + b and variance p/(1 - p) (W*W)(v*v) (keep probability q = 1 - p:
  Var[M_ij/q] = (1 - q)/q), and r = 1/S sum_s a(u_s) over S = `mc_samples` draws u_s ~ N(mean, var).
  The draws go through the run's replica generators.
Only hidden Linear layers are regularized: a CNN without hidden Linear layers (model.hidden=[]) is
rejected. Defaults: p=0.5 (the paper's), per_example=true, inference=mean, mc_samples=50.
"""

from __future__ import annotations

import torch
from torch import nn

from dropbench.config import choice, flag, positive_int, probabilities, scalar_or_list
from dropbench.regularizers import Regularizer
from dropbench.replicas import ReplicaLinear, ReplicaRNG, aligned, replica_linear


class DropConnectLinear(nn.Module):
    """a((M * W) x / (1 - p) + b) on [R, B, in] -> [R, B, out]; `linear` holds W and b."""

    stochastic = True

    def __init__(self, linear: ReplicaLinear, activation: nn.Module, p: float, rng: ReplicaRNG,
                 per_example: bool = True, inference: str = "mean", mc_samples: int = 50):
        super().__init__()
        self.linear, self.activation = linear, activation
        self.p, self.rng, self.per_example = p, rng, per_example
        self.inference, self.mc_samples = inference, mc_samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return self.activation(self.linear(x))
        keep = 1.0 - self.p
        w, b = self.linear.weight, self.linear.bias  # [R, out, in], [R, out]
        if self.training:
            if self.per_example:
                # [R, B, out, in]: one mask per example; u[r, n] = (M[r, n] * W[r]) x[r, n]
                # (one product per replica, so replica k computes what its single run computes)
                mask = self.rng.keep_mask((x.shape[1], *w.shape[1:]), keep, 1.0 / keep)
                u = torch.stack([torch.einsum("noi,ni->no", w[k] * mask[k], aligned(x[k])) for k in range(len(x))])
            else:
                mask = self.rng.keep_mask(tuple(w.shape[1:]), keep, 1.0 / keep)  # [R, out, in], shared by the batch
                u = replica_linear(x, w * mask)
            return self.activation(u + b.unsqueeze(1))
        mean = self.linear(x)
        if self.inference == "mean":
            return self.activation(mean)
        var = (self.p / keep) * replica_linear(x * x, w * w)  # [R, B, out]
        noise = self.rng.normal((self.mc_samples, *mean.shape[1:]))  # [R, S, B, out]
        u = mean.unsqueeze(1) + var.sqrt().unsqueeze(1) * noise
        return self.activation(u).mean(1)

    def extra_repr(self) -> str:
        return (f"in={self.linear.in_features}, out={self.linear.out_features}, p={self.p}, "
                f"per_example={self.per_example}, inference={self.inference}")


class DropConnect(Regularizer):
    stochastic = True

    def __init__(self, p=0.5, per_example: bool = True, inference: str = "mean", mc_samples: int = 50):
        self.p = scalar_or_list(p)
        probabilities("regularizer.p", self.p, len(self.p) if isinstance(self.p, list) else 1)
        self.per_example = flag("regularizer.per_example", per_example)
        self.inference = choice("regularizer.inference", inference, ("mean", "moment_matching"))
        self.mc_samples = positive_int("regularizer.mc_samples", mc_samples)

    def summary(self) -> dict:
        out = {"p": self.p, "per_example": self.per_example, "inference": self.inference}
        if self.inference == "moment_matching":
            out["mc_samples"] = self.mc_samples
        return out

    def hidden_linear(self, index, num_hidden, in_features, out_features, activation, rng):
        p = probabilities("regularizer.p", self.p, num_hidden)[index]
        linear = ReplicaLinear(rng.replicas, in_features, out_features)  # initialized by the model
        return DropConnectLinear(linear, activation, p, rng, self.per_example, self.inference, self.mc_samples)
