"""DropConnect (Wan, Zeiler, Zhang, LeCun & Fergus, ICML 2013, "Regularization of Neural Networks
using DropConnect").

Each hidden nn.Linear layer (with its activation a) computes, in training,

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
  The draws come from the replicas' own generators.
Places: every nn.Linear but the head; one directly followed by an activation module in an
nn.Sequential is replaced together with it (moment matching needs that activation; with `mean`
inference a Linear without one is regularized alone). A model without hidden Linear layers (a CNN
with model.hidden=[]) is rejected. Inputs with more than one leading dimension ([B, L, in]) get a
mask per row. Defaults: p=0.5 (the paper's), per_example=true, inference=mean, mc_samples=50.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dropbench.config import check, probabilities, scalar_or_list
from dropbench.regularizers import NoPlace, Regularizer, hidden_linears, hidden_pairs
from dropbench.replicas import ReplicaGenerators, keep_mask, replica_map, replica_random, replica_value


class DropConnectLinear(nn.Module):
    """a((M * W) x / (1 - p) + b); `linear` holds W and b, `activation` is a (identity if None)."""

    stochastic = True
    replica_settings = ("p",)

    def __init__(self, linear: nn.Linear, activation: nn.Module | None, p: float, generators: ReplicaGenerators,
                 per_example: bool = True, inference: str = "mean", mc_samples: int = 50):
        super().__init__()
        self.linear, self.activation = linear, activation or nn.Identity()
        self.p, self.generators, self.per_example = p, generators, per_example
        self.inference, self.mc_samples = inference, mc_samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return self.activation(self.linear(x))
        keep = replica_map(lambda p: 1.0 - p, self.p)
        scale = replica_map(lambda k: 1.0 / k, keep)
        w, b = self.linear.weight, self.linear.bias  # [out, in], [out]
        if self.training:
            if self.per_example:  # a mask per example (row): u_n = (M_n * W) x_n
                rows = x.reshape(-1, x.shape[-1])
                mask = keep_mask(rows, (len(rows), *w.shape), self.generators, keep, scale)
                u = torch.einsum("noi,ni->no", w * mask, rows).view(*x.shape[:-1], -1)
            else:  # one mask shared by the mini-batch
                u = F.linear(x, w * keep_mask(x, w.shape, self.generators, keep, scale))
            return self.activation(u + b if b is not None else u)
        mean = self.linear(x)
        if self.inference == "mean":
            return self.activation(mean)
        ratio = replica_value(replica_map(lambda p, k: p / k, self.p, keep), x, self.generators)
        var = ratio * F.linear(x * x, w * w)
        u = mean + var.sqrt() * replica_random(mean, (self.mc_samples, *mean.shape), self.generators, normal=True)
        return self.activation(u).mean(0)

    def extra_repr(self) -> str:
        return f"p={self.p}, per_example={self.per_example}, inference={self.inference}"


class DropConnect(Regularizer):
    places = ("hidden_linear",)
    folds = ("p",)

    def __init__(self, p=0.5, per_example: bool = True, inference: str = "mean", mc_samples: int = 50):
        self.p = scalar_or_list(p)
        check("regularizer.p", self.p)
        self.per_example = check("regularizer.per_example", per_example)
        self.inference = check("regularizer.inference", inference)
        self.mc_samples = check("regularizer.mc_samples", mc_samples)

    def summary(self) -> dict:
        out = {"p": self.p, "per_example": self.per_example, "inference": self.inference}
        if self.inference == "moment_matching":
            out["mc_samples"] = self.mc_samples
        return out

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        places = hidden_linears(model)
        if not places:
            raise NoPlace("a hidden nn.Linear layer (the head is not regularized)")
        activation_after = {id(seq[i]): (seq, i) for seq, i in hidden_pairs(model, nn.Linear)}
        rates = probabilities("regularizer.p", self.p, len(places))
        for place, p in zip(places, rates):
            linear = place.module
            pair = activation_after.get(id(linear))
            if pair is None and self.inference == "moment_matching":
                raise NoPlace(f"each hidden nn.Linear to be followed by an activation module in an nn.Sequential "
                              f"for inference=moment_matching ({place.name} is not); use inference=mean")
            activation = pair[0][pair[1] + 1] if pair else None
            place.replace(DropConnectLinear(linear, activation, p, generators, self.per_example,
                                            self.inference, self.mc_samples))
            if pair:
                pair[0][pair[1] + 1] = nn.Identity()
