"""MC dropout (Gal & Ghahramani, ICML 2016, "Dropout as a Bayesian Approximation: Representing
Model Uncertainty in Deep Learning").

Training is ordinary dropout (the YAML pulls in `dropout` through its defaults list). Prediction
keeps the dropout layers stochastic and averages the predictive distribution over T passes:

    p(y | x) ~= 1/T sum_t softmax(f(x; m_t)),   returned as its log: logsumexp_t log_softmax - log T

Only dropbench's random layers (`stochastic = True`: dropout-like layers) are switched to training mode;
everything else, BatchNorm in particular, stays in evaluation mode (running statistics). The masks
come from the replicas' own generators. Defaults: samples=20 (T), p=0.5 (the dropout default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dropbench.config import check, scalar_or_list
from dropbench.regularizers import Regularizer
from dropbench.replicas import Replicas


class MCDropout(Regularizer):
    places = ("predict",)
    needs_random_layers = True
    builds_on = ("dropout",)
    folds = ("p",)

    def __init__(self, samples: int = 20, p=0.5):
        self.samples = check("regularizer.samples", samples)
        self.p = scalar_or_list(p)  # dropout's rate, checked by the dropout method; recorded here

    def summary(self) -> dict:
        return {"p": self.p, "samples": self.samples}

    def predict(self, model: Replicas, x: torch.Tensor) -> torch.Tensor:
        random_layers = [m for m in model.module.modules() if getattr(m, "stochastic", False)]
        for m in random_layers:
            m.train()
        x = x.expand(len(model), *x.shape)  # each replica its own input, so input dropout draws per replica
        try:
            # log sum_t p_t accumulated pass by pass (no [T, R, B, C] tensor held)
            total = F.log_softmax(model(x), dim=-1)
            for _ in range(self.samples - 1):
                total = torch.logaddexp(total, F.log_softmax(model(x), dim=-1))
        finally:
            for m in random_layers:
                m.eval()
        return total - math.log(self.samples)
