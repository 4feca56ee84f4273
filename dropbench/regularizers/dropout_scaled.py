"""Non-inverted ("scaled at test time") dropout, as originally described by Hinton et al. 2012
("Improving neural networks by preventing co-adaptation of feature detectors", arXiv:1207.0580)
and Srivastava et al. 2014 (JMLR, "Dropout: ...", Section 4 and Figure 2).

Training: y = m * x with m ~ Bernoulli(1 - p) per unit and *no* rescaling, so E[y] = (1 - p) x.
Evaluation: y = (1 - p) * x, i.e. the paper's "weights multiplied by the retention probability"
(scaling a layer's outputs by 1 - p is the same as scaling the next layer's weights).

In exact arithmetic this trains the same function family as inverted dropout; it differs from it
in the effective learning rate of the layers after a dropout layer (activations are (1 - p) times
smaller in training), which matters for SGD and much less for Adam.
Parameters, defaults and places are those of `dropout`: p=0.5 (scalar or one per place),
input_p=0.0, impl=own|torch.
"""

from __future__ import annotations

import torch

from dropbench.regularizers.dropout import Dropout, DropoutLayer, dropout
from dropbench.replicas import replica_map, replica_value


class ScaledDropoutLayer(DropoutLayer):
    """Dropout without rescaling in training; scales by 1 - p in evaluation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        if not self.training:
            return x * replica_value(replica_map(lambda p: 1.0 - p, self.p), x, self.generators)
        return dropout(x, self.p, self.generators, scale=False, impl=self.impl)


class DropoutScaled(Dropout):
    layer = ScaledDropoutLayer
