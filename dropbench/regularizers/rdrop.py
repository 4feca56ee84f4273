"""R-Drop (Liang, Wu, Li, Wang, Meng, Qin, Chen, Zhang & Liu, NeurIPS 2021, "R-Drop: Regularized
Dropout for Neural Networks", arXiv:2106.14448).

Each training batch goes through the model twice; dropout draws independent masks in the two
passes, giving logits z1, z2 and distributions P1 = softmax(z1), P2 = softmax(z2). Per replica:

    loss = 1/2 [CE(z1, y) + CE(z2, y)] + alpha * 1/2 [KL(P1 || P2) + KL(P2 || P1)]

with CE the mean over the batch and each KL summed over the classes. How the KL is reduced over
the examples decides what alpha means:

- `batchmean` (default): the KL is averaged over the batch like CE, so alpha weighs one example's
  KL against its CE. This is the weighting of the official training code (fairseq criterion of
  github.com/dropreg/R-Drop), where CE and KL are both *summed* over tokens, and of the paper's
  Eq. 3; alpha values carry over and do not depend on the batch size.
- `sum`: the KL is summed over the batch while CE stays a mean, literally as the `compute_kl_loss`
  snippet in the official README (commit 9dcc830: `F.kl_div(..., reduction='none')`, `p_loss.sum()`,
  `q_loss.sum()`, `(p_loss + q_loss) / 2`, `ce_loss = 0.5 * (CE(logits) + CE(logits2))`). alpha's
  effective weight then grows with the batch size: at batch 100, alpha=1 is ~100x the
  batchmean weight, and the MNIST-1D MLP no longer learns (measured); use alpha ~ 1/batch there.

Evaluation is the plain deterministic forward pass (dropout off). R-Drop is built on dropout: its
YAML pulls in `dropout` through the defaults list, so `regularizer.p` sets the dropout rate.
Defaults: alpha=1.0, p=0.5 (the dropout default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dropbench.config import check, scalar_or_list
from dropbench.regularizers import Regularizer, cross_entropy
from dropbench.replicas import Replicas, replica_tensor


def symmetric_kl(logits1: torch.Tensor, logits2: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """1/2 [KL(P1||P2) + KL(P2||P1)] summed over classes, then averaged (batchmean) or summed
    (sum, the official README snippet) over the examples: [R, B, C] x 2 -> [R]."""
    logp1, logp2 = F.log_softmax(logits1, dim=-1), F.log_softmax(logits2, dim=-1)
    # F.kl_div(input, target) = target * (log target - input): the first is KL(P2 || P1).
    kl21 = F.kl_div(logp1, logp2, reduction="none", log_target=True)
    kl12 = F.kl_div(logp2, logp1, reduction="none", log_target=True)
    kl = (kl21.sum((1, 2)) + kl12.sum((1, 2))) / 2
    return kl if reduction == "sum" else kl / logits1.shape[1]


class RDrop(Regularizer):
    places = ("loss",)
    needs_random_layers = True
    builds_on = ("dropout",)
    folds = ("alpha", "p")

    def __init__(self, alpha: float = 1.0, p=0.5, kl_reduction: str = "batchmean"):
        self.alpha = check("regularizer.alpha", alpha, "rdrop")
        self.kl_reduction = check("regularizer.kl_reduction", kl_reduction)
        self.p = scalar_or_list(p)  # dropout's rate, checked by the dropout method; recorded here

    def summary(self) -> dict:
        return {"p": self.p, "alpha": self.alpha, "kl_reduction": self.kl_reduction}

    def loss(self, model: Replicas, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits1, logits2 = model(x), model(x)  # two passes: independent dropout masks
        loss = (cross_entropy(logits1, y) + cross_entropy(logits2, y)) / 2
        if self.alpha != 0:
            loss = loss + replica_tensor(self.alpha, loss) * symmetric_kl(logits1, logits2, self.kl_reduction)
        return loss
