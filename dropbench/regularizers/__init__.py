"""Regularizers: one small object per method, acting on whatever `nn.Module` tree it is given.

A method can act in five ways (override only what it uses; each default does nothing):
- `attach(model, generators)`: change the module tree of one freshly built model (insert, replace
  or wrap layers); called for every replica before the replicas are stacked;
- `loss(model, x, y)`: compute the task loss its own way (several passes, several samples);
- `penalty(model)`: a term added to the loss;
- `after_step(model)`: change the weights after each optimizer step (a projection);
- `predict(model, x)`: the evaluation rule (e.g. an average over stochastic passes).
`model` in the last four is the run's `Replicas` ([R, B, ...] -> [R, B, C]); losses are per replica [R].

Where a method finds its places in an arbitrary model is decided by the helpers below, one rule
each, written down in docs/regularizers.md. A run's methods are combined in `Regularizers`; two
methods claiming the same kind of place are rejected before anything runs.

Adding a method = one module here with a `Regularizer` subclass + one YAML in conf/regularizer/.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dropbench.config import UserError, build
from dropbench.replicas import ReplicaGenerators, Replicas, per_replica

# Modules that count as a hidden activation: dropout-family methods act after them.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
               nn.LogSigmoid, nn.Tanhshrink)
# A user's own dropout layers: they mark where dropout goes, and the method under test replaces them.
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Regularizer:
    """A regularization method; see the module docstring for the places it can act."""

    name = "regularizer"
    # Kinds of place the method takes; two methods of one run may not share one (see CONFLICTS).
    places: tuple[str, ...] = ()
    # Methods this one is built on and pulls in through its YAML defaults (R-Drop, MC dropout on
    # dropout): they are left out of the run's label, so `regularizer=rdrop` is labelled "rdrop".
    builds_on: tuple[str, ...] = ()
    # True when the method only makes sense on top of random layers (R-Drop, MC dropout).
    needs_random_layers = False
    # Numeric settings (constructor arguments, held as attributes of the same name) that may differ
    # between the replicas of one job: a sweep over them folds into one job (dropbench.fold). The
    # method and its layers then see PerReplica values (dropbench.replicas) where they differ.
    folds: tuple[str, ...] = ()

    def summary(self) -> dict:
        """Parameters recorded in summary.csv; `p` fills the summary's p column."""
        return {}

    def attach(self, model: nn.Module, generators: ReplicaGenerators) -> None:
        """Change `model`'s module tree in place; raise UserError when it offers no place."""

    def bind(self, model: Replicas) -> None:
        """Called once the replicas are built (e.g. to look up the weights a penalty sums)."""

    def loss(self, model: Replicas, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The task loss per replica [R], computed the method's way."""

    def penalty(self, model: Replicas) -> torch.Tensor | None:
        """A term per replica [R] added to the loss."""

    def after_step(self, model: Replicas) -> None:
        """Called after every optimizer step, under torch.no_grad()."""

    def predict(self, model: Replicas, x: torch.Tensor) -> torch.Tensor | None:
        """Log-probabilities [R, B, C] of inputs [B, ...] under the method's evaluation rule (eval mode)."""


# "dropout": the dropout places; "hidden_linear": replacing hidden Linear layers (+ activation);
# "norm": between a hidden layer and its activation; "loss" / "predict": the training loss and the
# evaluation rule. A layer replacing a Linear and its activation leaves no room for a norm layer.
CONFLICTS = {frozenset(("hidden_linear", "norm"))}


# -- where methods act in an arbitrary model ----------------------------------------------------------
def head_of(model: nn.Module) -> nn.Linear | None:
    """The output layer: `model.head` if that is an nn.Linear, else the last nn.Linear in module order."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@dataclass
class Place:
    """A submodule of the model and every (parent, attribute) it is registered under (one
    nn.ReLU object can sit at several places of a model)."""

    module: nn.Module
    name: str  # its first qualified name, for messages
    slots: list[tuple[nn.Module, str]] = field(default_factory=list)

    def replace(self, new: nn.Module) -> None:
        """Put `new` everywhere the module is registered."""
        for parent, attr in self.slots:
            setattr(parent, attr, new)


def places_where(model: nn.Module, predicate) -> list[Place]:
    """Every submodule satisfying `predicate`, in module order (depth first, as `named_modules`)."""
    found: dict[int, Place] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and predicate(module):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            place = found.setdefault(id(module), Place(module, name))
            if not any(p is parent and a == attr for p, a in place.slots):
                place.slots.append((parent, attr))
    return list(found.values())


def dropout_places(model: nn.Module) -> list[Place]:
    """Where dropout-family methods act: the model's own dropout modules if it has any, else right
    after every activation module; NoPlace without either."""
    places = (places_where(model, lambda m: isinstance(m, DROPOUTS))
              or places_where(model, lambda m: isinstance(m, ACTIVATIONS)))
    if not places:
        raise NoPlace("dropout modules or activation modules (nn.ReLU, nn.GELU, ...)")
    return places


def put_at(place: Place, layer: nn.Module) -> None:
    """Put `layer` at a dropout place: instead of the user's dropout module, or after the activation."""
    place.replace(layer if isinstance(place.module, DROPOUTS) else nn.Sequential(place.module, layer))


def hidden_pairs(model: nn.Module, kinds=WEIGHT_LAYERS) -> list[tuple[nn.Sequential, int]]:
    """(container, i) where container[i] is a hidden layer of `kinds` (not the head) and
    container[i + 1] an activation module, inside an nn.Sequential."""
    head = head_of(model)
    pairs = []
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            layers = list(seq)
            pairs += [(seq, i) for i, (layer, after) in enumerate(zip(layers, layers[1:]))
                      if isinstance(layer, kinds) and layer is not head and isinstance(after, ACTIVATIONS)]
    return pairs


def hidden_linears(model: nn.Module) -> list[Place]:
    head = head_of(model)
    return places_where(model, lambda m: isinstance(m, nn.Linear) and m is not head)


def weight_names(model: nn.Module, hidden_only: bool = False) -> list[str]:
    """Names of the weights of every Linear/Conv layer (`hidden_only`: the head left out); biases
    and normalization parameters are not weights here."""
    head = head_of(model)
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, WEIGHT_LAYERS) and not (hidden_only and m is head)]


class NoPlace(UserError):
    """Raised by a method's attach when the model offers it no place; `needs` says what it looks for."""

    def __init__(self, needs: str):
        super().__init__(needs)
        self.needs = needs


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per replica: logits [R, B, C], y [R, B] -> [R]."""
    R, B, C = logits.shape
    return F.cross_entropy(logits.reshape(R * B, C), y.reshape(R * B), reduction="none").view(R, B).mean(1)


class Regularizers:
    """The combination of methods of one run."""

    def __init__(self, methods: list[Regularizer]):
        self.methods = methods
        implied = {base for m in methods for base in m.builds_on}
        self.name = "+".join(m.name for m in methods if m.name not in implied) or "none"
        taken: list[tuple[str, str]] = []  # (kind of place, method)
        for m in methods:
            for place in m.places:
                rival = next((name for p, name in taken if p == place or frozenset((p, place)) in CONFLICTS), None)
                if rival is not None:
                    raise UserError(f"regularizers {rival} and {m.name} both act at the same place ({place}); "
                                    f"combine at most one of them")
            taken += [(place, m.name) for place in m.places]

    def attach(self, model: nn.Module, generators: ReplicaGenerators, model_name: str) -> nn.Module:
        """Every method's changes to one freshly built model (called `model_name` in messages); the
        model itself is returned."""
        if not any("dropout" in m.places for m in self.methods):
            # the method under test decides about dropout: without one, the model's own dropout goes
            for place in places_where(model, lambda m: isinstance(m, DROPOUTS)):
                place.replace(nn.Identity())
        # methods that look for a hidden layer next to its activation go before the dropout family,
        # which wraps the activations
        for m in sorted(self.methods, key=lambda m: "dropout" in m.places):
            try:
                m.attach(model, generators)
            except NoPlace as error:
                raise UserError(f"regularizer {m.name} has no place to act in model {model_name}: it needs "
                                f"{error.needs} (see docs/regularizers.md)") from None
        random_layers = any(getattr(layer, "stochastic", False) for layer in model.modules())
        for m in self.methods:
            if m.needs_random_layers and not random_layers:
                raise UserError(f"regularizer {m.name} needs dropout-like layers, but model {model_name} has none "
                                f"with these settings; add a dropout method or dropout places")
        return model

    def bind(self, model: Replicas) -> None:
        for m in self.methods:
            m.bind(model)

    def loss(self, model: Replicas, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training loss per replica [R]: the task loss plus every method's penalty."""
        loss = next((v for v in (m.loss(model, x, y) for m in self.methods) if v is not None), None)
        if loss is None:
            loss = cross_entropy(model(x), y)
        for m in self.methods:
            term = m.penalty(model)
            if term is not None:
                loss = loss + term
        return loss

    @torch.no_grad()
    def after_step(self, model: Replicas) -> None:
        for m in self.methods:
            m.after_step(model)

    def predict(self, model: Replicas, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [R, B, C] of inputs [B, ...] under the evaluation rule (model in eval mode)."""
        logp = next((v for v in (m.predict(model, x) for m in self.methods) if v is not None), None)
        return logp if logp is not None else F.log_softmax(model.shared(x), dim=-1)

    def summary(self) -> dict:
        out = {}
        for m in self.methods:
            out.update(m.summary())
        return out

    def folded(self, replicas: list[Regularizers]) -> Regularizers:
        """The methods of one set of replicas, replica k configured as replicas[k] (self is replica 0):
        a copy whose `folds` settings that differ between the replicas are PerReplica."""
        methods = []
        for k, method in enumerate(self.methods):
            method = copy.copy(method)
            for name in method.folds:
                setattr(method, name, per_replica([getattr(r.methods[k], name) for r in replicas]))
            methods.append(method)
        return Regularizers(methods)


def build_regularizers(cfg: DictConfig) -> Regularizers:
    """Instantiate every entry of `regularizer.methods` (a dict name -> {_target_, params})."""
    methods = []
    for name, node in (cfg.get("methods") or {}).items():
        method = build(node, f"regularizer {name}")
        method.name = name
        methods.append(method)
    return Regularizers(methods)
