"""Regularizers: one small object per method, consulted by the model and the training loop at
the places where a method can act (see `Regularizer`). A run's regularizers are a `Regularizers`
combination built from the `regularizer.methods` config node, one entry per chosen method.

Adding a method = one module here with a `Regularizer` subclass + one YAML in conf/regularizer/.

Methods (config name -> module): none, dropout, dropout_scaled, rdrop, multisample, dropconnect,
gaussian, standout, l1 / l2 (penalties), maxnorm, batchnorm, mc_dropout. See docs/regularizers_section.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dropbench.config import UserError, build
from dropbench.replicas import ReplicaConv, ReplicaLinear, ReplicaRNG


class Regularizer:
    """A regularization method. Override only the places the method uses; each default does nothing.

    Shapes: activations are [R, B, *features] (R replicas, see dropbench.replicas); per-example
    `shape` arguments exclude R and B, e.g. (100,) after a hidden Linear or (25, 20) after a Conv1d.
    """

    name = "regularizer"
    # True when the method makes the forward pass random (dropout-like layers in train mode).
    stochastic = False
    # True when the method only makes sense on top of random layers (R-Drop, MC dropout).
    needs_stochastic = False
    # Methods this one is built on and pulls in through its YAML defaults (R-Drop, MC dropout on
    # dropout): they are left out of the run's label, so `regularizer=rdrop` is labelled "rdrop".
    builds_on: tuple[str, ...] = ()

    def summary(self) -> dict:
        """Parameters recorded in summary.csv; `p` fills the summary's p column."""
        return {}

    def check(self, model: nn.Module) -> None:
        """Raise UserError when the method cannot work on `model` (called once the model is built)."""

    # -- layers ---------------------------------------------------------------------------------
    def input_layer(self, shape: tuple[int, ...], rng: ReplicaRNG) -> nn.Module | None:
        """A module applied to the inputs."""

    def hidden_linear(self, index: int, num_hidden: int, in_features: int, out_features: int,
                      activation: nn.Module, rng: ReplicaRNG) -> nn.Module | None:
        """A module replacing hidden Linear layer `index` *and* its activation: [R,B,in] -> [R,B,out]."""

    def norm_layer(self, index: int, num_hidden: int, shape: tuple[int, ...], replicas: int) -> nn.Module | None:
        """A module between hidden layer `index`'s Linear/Conv and its activation."""

    def hidden_layer(self, index: int, num_hidden: int, shape: tuple[int, ...], rng: ReplicaRNG) -> nn.Module | None:
        """A module after hidden layer `index`'s activation."""

    # -- loss -----------------------------------------------------------------------------------
    def forward_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The task loss per replica [R] computed the method's way (e.g. several passes)."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A term per replica [R] added to the loss."""

    # -- after the optimizer step ---------------------------------------------------------------
    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. a projection of the weights)."""

    # -- evaluation -----------------------------------------------------------------------------
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Log-probabilities [R, B, C] under the method's evaluation rule (model is in eval mode)."""


LAYER_PLACES = ("input_layer", "hidden_linear", "norm_layer", "hidden_layer")


# -- weights the penalties and constraints act on -------------------------------------------------
def weight_layers(model: nn.Module, hidden_only: bool = False) -> list[nn.Module]:
    """The model's Linear/Conv layers (weights [R, out, in, *kernel]); `hidden_only` leaves out the head."""
    head = getattr(model, "head", None)
    return [m for m in model.modules() if isinstance(m, (ReplicaLinear, ReplicaConv))
            and not (hidden_only and m is head)]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per replica: logits [R, B, C], y [R, B] -> [R]."""
    R, B, C = logits.shape
    return F.cross_entropy(logits.reshape(R * B, C), y.reshape(R * B), reduction="none").view(R, B).mean(1)


class Regularizers:
    """The combination of methods of one run, asked in turn at each place."""

    def __init__(self, methods: list[Regularizer]):
        self.methods = methods
        implied = {base for m in methods for base in m.builds_on}
        self.name = "+".join(m.name for m in methods if m.name not in implied) or "none"
        self.placed: set[str] = set()  # methods that put at least one layer into the model

    def _one(self, place: str, *args) -> object | None:
        """The single method's answer at `place`; two methods claiming the same slot is an error."""
        answers = [(m, getattr(m, place)(*args)) for m in self.methods]
        answers = [(m, a) for m, a in answers if a is not None]
        if len(answers) > 1:
            names = " and ".join(m.name for m, _ in answers)
            raise UserError(f"regularizers {names} both act at the same place ({place}); combine at most one of them")
        if not answers:
            return None
        self.placed.add(answers[0][0].name)
        return answers[0][1]

    def input_layer(self, *args) -> nn.Module | None:
        return self._one("input_layer", *args)

    def hidden_linear(self, *args) -> nn.Module | None:
        return self._one("hidden_linear", *args)

    def norm_layer(self, *args) -> nn.Module | None:
        return self._one("norm_layer", *args)

    def hidden_layer(self, *args) -> nn.Module | None:
        return self._one("hidden_layer", *args)

    def check_model(self, model: nn.Module) -> None:
        """Reject methods that found no place in the model, or need random layers it lacks."""
        for m in self.methods:
            m.check(model)
        for m in self.methods:
            acts_on_layers = any(getattr(type(m), place) is not getattr(Regularizer, place) for place in LAYER_PLACES)
            if acts_on_layers and m.name not in self.placed:
                raise UserError(f"regularizer {m.name} has no place to act in model {model.name} with these settings "
                                f"(it needs hidden layers of the kind it regularizes)")
        has_random_layers = any(getattr(m, "stochastic", False) for m in model.modules())
        for m in self.methods:
            if m.needs_stochastic and not has_random_layers:
                raise UserError(
                    f"regularizer {m.name} needs dropout-like layers, but model {model.name} with these "
                    f"settings has none (no hidden layers, or p=0); add hidden layers or a dropout method"
                )

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training loss per replica [R]: the task loss plus every method's penalty."""
        loss = self._one("forward_loss", model, x, y)
        if loss is None:
            loss = cross_entropy(model(x), y)
        for m in self.methods:
            term = m.penalty(model)
            if term is not None:
                loss = loss + term
        return loss

    def after_step(self, model: nn.Module) -> None:
        for m in self.methods:
            m.after_step(model)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [R, B, C] under the evaluation rule (plain forward pass by default)."""
        logp = self._one("predict", model, x)
        return logp if logp is not None else F.log_softmax(model(x), dim=-1)

    def summary(self) -> dict:
        out = {}
        for m in self.methods:
            out.update(m.summary())
        return out


def build_regularizers(cfg: DictConfig) -> Regularizers:
    """Instantiate every entry of `regularizer.methods` (a dict name -> {_target_, params})."""
    methods = []
    for name, node in (cfg.get("methods") or {}).items():
        method = build(node, f"regularizer {name}")
        method.name = name
        methods.append(method)
    return Regularizers(methods)
