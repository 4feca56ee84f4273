"""Every setting's type and range, the checks derived from them, and config to objects.

`SETTINGS` is the one table of what a user can set: each key's rule (type and range) and meaning.
From it come `check` (one value), `check_run_config` (a whole composed config: every value, then
every key that nothing would read), each failure one `UserError` line naming the key, the value
and what is allowed, and the reference page docs/settings.md (`python -m dropbench.config
--markdown > docs/settings.md`). Every config group node becomes an object through `build`
(Hydra's instantiate of its `_target_`), which first checks the node's keys against the target's
arguments: the keys a user's own model or dataset callable takes are not in the table, its
signature is their schema.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass
from importlib.resources import files

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

INT64_MAX = 2**63 - 1  # seeds, counts and sizes end up in torch's int64
UINT32_MAX = 2**32 - 1  # numpy's legacy global seed (MNIST-1D's generator)


class UserError(Exception):
    """A mistake in the user's config or environment, reported as one line and exit code 2."""


# -- rules: what a value may be -----------------------------------------------------------------------
# Each rule has convert(value) -> the value as the code takes it, raising NotAllowed, and
# describe(plural) -> what it allows, in words.

class NotAllowed(ValueError):
    """A value a rule does not allow."""


def _bound(x) -> str:
    return {2**63: "2**63", 2**32: "2**32"}.get(x, f"{x:g}" if isinstance(x, float) else str(x))


@dataclass(frozen=True)
class Number:
    """A finite number (an integer with `integer`) between `low` and `high`; an open end excludes its bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def convert(self, value):
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            raise NotAllowed
        if not self.integer:
            try:
                value = float(value)  # an int beyond float's range overflows: not allowed
            except OverflowError:
                raise NotAllowed from None
            if not math.isfinite(value):
                raise NotAllowed
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise NotAllowed
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise NotAllowed
        return value

    def describe(self, plural: bool = False) -> str:
        noun = ("integers" if plural else "an integer") if self.integer else ("numbers" if plural else "a number")
        if self.integer and self.high in (INT64_MAX, UINT32_MAX):  # the ceiling of the type the value ends up in
            kind = {0: "non-negative", 1: "positive"}.get(self.low)
            start = (f"{kind} integers" if plural else f"a {kind} integer") if kind else f"{noun} >= {self.low} and"
            return f"{start} below {_bound(self.high + 1)}"
        if self.low is not None and self.high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}" \
                   f"{')' if self.high_open else ']'}"
        finite = "" if self.integer else ("finite " if plural else "a finite ")
        noun = noun if self.integer else noun.removeprefix("a ")
        if self.low is not None:
            return f"{finite}{noun} {'>' if self.low_open else '>='} {_bound(self.low)}"
        if self.high is not None:
            return f"{finite}{noun} {'<' if self.high_open else '<='} {_bound(self.high)}"
        return f"{finite}{noun}"


@dataclass(frozen=True)
class Choice:
    """One of a few words."""

    options: tuple[str, ...]

    def convert(self, value):
        if not isinstance(value, str) or value not in self.options:
            raise NotAllowed
        return value

    def describe(self, plural: bool = False) -> str:
        if len(self.options) == 1:
            return self.options[0]
        return ("each " if plural else "") + "one of " + ", ".join(self.options)


@dataclass(frozen=True)
class Flag:
    """true or false."""

    def convert(self, value):
        if not isinstance(value, bool):
            raise NotAllowed
        return value

    def describe(self, plural: bool = False) -> str:
        return "true or false"


@dataclass(frozen=True)
class Text:
    """A non-empty string (a path, a name), optionally of a given form; `numbers`: a number also
    passes, as its text (a CSV column named 5)."""

    what: str = "a non-empty string"
    pattern: str | None = None
    numbers: bool = False

    def convert(self, value):
        if self.numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value or (self.pattern and not re.fullmatch(self.pattern, value)):
            raise NotAllowed
        return value

    def describe(self, plural: bool = False) -> str:
        return self.what.removeprefix("a ").removeprefix("an ") + "s" if plural else self.what


@dataclass(frozen=True)
class Null:
    """null: the setting is off, or left to the code (its meaning says which)."""

    def convert(self, value):
        if value is not None:
            raise NotAllowed
        return None

    def describe(self, plural: bool = False) -> str:
        return "null"


@dataclass(frozen=True)
class ListOf:
    """A list of values of one rule: `length` of them, or at least `min_length`."""

    item: object
    length: int | None = None
    min_length: int = 0

    def convert(self, value):
        if not isinstance(value, (list, tuple)) or len(value) < self.min_length:
            raise NotAllowed
        if self.length is not None and len(value) != self.length:
            raise NotAllowed
        return [self.item.convert(v) for v in value]

    def describe(self, plural: bool = False) -> str:
        size = f"{self.length} " if self.length else ""
        return f"{'lists' if plural else 'a list'} of {size}{self.item.describe(plural=True)}"


@dataclass(frozen=True)
class Either:
    """A value that one of `rules` allows (the first that does converts it)."""

    rules: tuple

    def convert(self, value):
        for rule in self.rules:
            try:
                return rule.convert(value)
            except NotAllowed:
                continue
        raise NotAllowed

    def describe(self, plural: bool = False) -> str:
        parts = [part for rule in self.rules for part in rule.describe(plural).split(" or ")]
        return ", ".join(parts[:-1]) + " or " + parts[-1]


def count(low: int = 1, high: int = INT64_MAX) -> Number:
    return Number(low, high, integer=True)


PROBABILITY = Number(0.0, 1.0, high_open=True)
FINITE = Number()
NON_NEGATIVE = Number(0.0)
POSITIVE = Number(0.0, low_open=True)
# Learning rates, decays and noise scales: at most 1e6, beyond any useful value. PyTorch turns them
# (Adam: lr / (1 - beta1^t)) into float32 numbers, which overflow near 3.4e38 and fail the run
# instead of letting it diverge.
SCALE = Number(0.0, 1e6)
RATE = Number(0.0, 1e6, low_open=True)
PATH = Text("a path")


# -- the settings -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """A key a user can set: its rule and one-line meaning. `used_by` restricts the entry to those
    regularizer methods, for a key that two methods read with different meanings."""

    key: str
    rule: object
    meaning: str
    used_by: tuple[str, ...] = ()

    @property
    def allowed(self) -> str:
        return self.rule.describe()


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # the run
    S("seed", count(0), "first model seed: initialization, data order and random masks "
                        "(parallel_seeds trains seed, seed+1, ...)"),
    S("parallel_seeds", count(), "seeds trained at once, vectorized in one process"),
    S("epochs", count(), "passes over the training split"),
    S("batch_size", count(), "training mini-batch size"),
    S("eval_batch_size", count(), "examples per forward pass when evaluating"),
    S("eval_every", count(), "evaluate every N epochs and after the last one (1: every epoch); the epoch "
                             "selected on validation is one of those evaluated"),
    S("device", Text("auto, cpu, cuda or cuda:N", r"auto|cpu|cuda(:\d+)?"),
      "where to train; auto: a GPU if there is one"),
    S("cuda_graph", Flag(), "record the training step once as a CUDA graph and replay it; needs a CUDA GPU "
                            "and the dataset in its memory"),
    S("threads", Either((Choice(("auto",)), count(1, 1024))),
      "torch intra-op threads; auto: the cores available divided by the launcher's parallel jobs"),
    S("progress", Either((Choice(("auto",)), Flag())), "progress bar; auto: only on a terminal"),
    S("results_dir", PATH, "where runs (runs/) and sweeps (sweeps/) are written"),
    S("force", Flag(), "re-run jobs that already finished (same settings and seed)"),
    S("resume", Flag(), "continue the latest unfinished run of this config from its checkpoint"),
    S("keep_checkpoint", Flag(), "keep checkpoint.pt when a run finishes"),
    S("checkpoint_every", count(), "write the checkpoint every N epochs and after the last one; a stopped run "
                                   "resumes from the last one written, up to N-1 epochs back"),
    # optimizer (torch.optim); keys a choice's YAML lacks are added with +, e.g. +optimizer.betas=[0.9,0.99]
    S("optimizer.name", Text(), "labels results (the optimizer column)"),
    S("optimizer.lr", RATE, "learning rate"),
    S("optimizer.momentum", PROBABILITY, "momentum factor (sgd)"),
    S("optimizer.dampening", Number(0.0, 1.0), "dampening of the momentum (sgd)"),
    S("optimizer.nesterov", Flag(), "Nesterov momentum (sgd; needs momentum > 0 and dampening 0)"),
    S("optimizer.weight_decay", SCALE, "weight decay: coupled L2 (sgd, adam), decoupled (adamw)"),
    S("optimizer.betas", ListOf(PROBABILITY, length=2), "running-average coefficients (adam, adamw)"),
    S("optimizer.eps", POSITIVE, "term added to the denominator (adam, adamw)"),
    S("optimizer.amsgrad", Flag(), "the AMSGrad variant (adam, adamw)"),
    S("optimizer.fused", Flag(), "torch.optim's fused implementation, one kernel for every parameter; "
                                 "unset, dropbench uses it for sgd, adam and adamw unless foreach is set"),
    S("optimizer.foreach", Flag(), "torch.optim's foreach implementation (not with fused=true)"),
    # schedule (torch.optim.lr_scheduler)
    S("schedule.name", Text(), "labels the schedule"),
    S("schedule.step_size", count(), "epochs between two decays (step)"),
    S("schedule.gamma", Number(0.0, 1.0, low_open=True), "factor applied to the learning rate at each decay (step)"),
    S("schedule.T_max", count(), "epochs of one cosine half-period (cosine)"),
    S("schedule.eta_min", SCALE, "learning rate at the end of the half-period (cosine)"),
    # dataset (checked when the dataset's _target_ is one of dropbench's loaders)
    S("dataset.name", Text(), "labels results (the dataset column); torchvision: also the class"),
    S("dataset.val_fraction", PROBABILITY, "stratified share of the training data held out for validation"),
    S("dataset.test_fraction", Number(0.0, 1.0, low_open=True, high_open=True),
      "stratified share carved out as the test split, for sources without one"),
    S("dataset.split_seed", count(0), "seeds the test and validation splits, and nothing else"),
    S("dataset.device_budget_gb", NON_NEGATIVE, "GB of tensors allowed on the GPU; larger data are streamed"),
    S("dataset.standardize", Flag(), "z-score each input feature with training-split statistics"),
    S("dataset.num_samples", count(), "signals generated (mnist1d)"),
    S("dataset.train_split", Number(0.0, 1.0, low_open=True, high_open=True), "the package's train share (mnist1d)"),
    S("dataset.seed", count(0, UINT32_MAX), "seed of the generator (mnist1d)"),
    S("dataset.cache_dir", PATH, "where generated data are cached (mnist1d)"),
    S("dataset.path", PATH, "the data file (npz, csv)"),
    S("dataset.label", Text("a column name", numbers=True), "the label column (csv)"),
    S("dataset.features", Either((Null(), ListOf(Text("a column name", numbers=True), min_length=1))),
      "feature columns; null: every column but the label (csv)"),
    S("dataset.root", PATH, "folder of the images (imagefolder) or of torchvision's files"),
    S("dataset.test_root", Either((Null(), PATH)), "test images in the same class folders; null: carve test_fraction "
                                                   "(imagefolder)"),
    S("dataset.image_size", Either((Null(), ListOf(count(), length=2))), "[H, W] to resize every image to; "
                                                                         "null: as stored"),
    S("dataset.class_name", Either((Null(), Text())), "the torchvision.datasets class; null: dataset.name"),
    S("dataset.download", Flag(), "let torchvision download missing files"),
    # model (checked when the model's _target_ is one of dropbench's models)
    S("model.name", Text(), "labels results; torchvision: the builder (resnet18, ...)"),
    S("model.hidden", Either((ListOf(count()), count())),
      "hidden widths: a list (mlp, cnn), units per direction (gru)"),
    S("model.activation", Choice(("relu", "tanh", "gelu", "sigmoid")), "hidden activation"),
    S("model.init", Choice(("default", "normal", "xavier", "kaiming")), "weight initialization; default: PyTorch's"),
    S("model.init_std", POSITIVE, "standard deviation of init=normal"),
    S("model.channels", ListOf(count(), min_length=1), "channels of each conv layer (cnn)"),
    S("model.kernel_sizes", ListOf(count(), min_length=1), "kernel size of each conv layer (cnn)"),
    S("model.strides", ListOf(count(), min_length=1), "stride of each conv layer (cnn)"),
    S("model.paddings", ListOf(count(0), min_length=1), "padding of each conv layer (cnn)"),
    S("model.depth", count(8), "layers, 6n+2 (resnet)"),
    S("model.width", count(), "channels of the first stage (resnet)"),
    S("model.bidirectional", Flag(), "a second GRU reading backwards (gru)"),
    S("model.d_model", count(), "token width, a multiple of heads (transformer)"),
    S("model.heads", count(), "attention heads (transformer)"),
    S("model.layers", count(), "encoder layers (transformer)"),
    S("model.ff_dim", count(), "feed-forward hidden width (transformer)"),
    # regularizer: each method's YAML passes these to its class (regularizer.methods.NAME)
    S("regularizer.p", Either((PROBABILITY, ListOf(PROBABILITY, min_length=1))),
      "drop probability: one for every place, or a list with one per place"),
    S("regularizer.input_p", PROBABILITY, "drop probability of the inputs"),
    S("regularizer.impl", Choice(("own", "torch")), "own: per-seed generators; torch: nn.functional.dropout"),
    S("regularizer.alpha", NON_NEGATIVE, "weight of the symmetric KL term", used_by=("rdrop",)),
    S("regularizer.kl_reduction", Choice(("batchmean", "sum")), "the KL averaged over the batch like CE, or summed"),
    S("regularizer.alpha", FINITE, "slope of the keep probability sigmoid(alpha a + beta)", used_by=("standout",)),
    S("regularizer.beta", FINITE, "offset of the keep probability sigmoid(alpha a + beta)"),
    S("regularizer.lam", NON_NEGATIVE, "penalty strength (l1: lam sum |w|, l2: lam/2 sum w^2)"),
    S("regularizer.c", POSITIVE, "largest norm of a unit's incoming weights"),
    S("regularizer.sigma", Either((Null(), SCALE)), "noise standard deviation; null: from p, "
                                                           "sigma^2 = p / (1 - p)"),
    S("regularizer.k", count(), "dropout samples per batch"),
    S("regularizer.samples", count(), "stochastic passes averaged at evaluation"),
    S("regularizer.per_example", Flag(), "a weight mask per example (true) or per mini-batch"),
    S("regularizer.inference", Choice(("mean", "moment_matching")), "evaluation rule"),
    S("regularizer.mc_samples", count(), "samples per unit for inference=moment_matching"),
    S("regularizer.momentum", Number(0.0, 1.0, low_open=True), "weight of the batch in the running statistics"),
    S("regularizer.eps", POSITIVE, "added to the variance"),
    # logger (experiment trackers)
    S("logger.tensorboard.dir", Either((Null(), PATH)), "event files go to DIR/GROUP/RUN; null: the run directory"),
    S("logger.mlflow.tracking_uri", Either((Null(), Text("a URI"))), "MLflow store; null: MLFLOW_TRACKING_URI"),
    S("logger.wandb.project", Text(), "W&B project"),
    S("logger.wandb.entity", Either((Null(), Text())), "W&B user or team; null: your account's default"),
    S("logger.wandb.mode", Choice(("offline", "online", "disabled")), "W&B mode"),
    S("logger.wandb.dir", Either((Null(), PATH)), "W&B files go to DIR/wandb; null: the run directory"),
)
del S
GROUPS = ("dataset", "model", "regularizer", "optimizer", "schedule", "logger")
# Group keys checked only when the group's _target_ is dropbench's own: another callable gives them its meanings.
OWN_TARGETS = {"dataset": "dropbench.data.", "model": "dropbench.models."}
TOP_LEVEL = tuple(dict.fromkeys(s.key for s in SETTINGS if "." not in s.key))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _settings_for(key: str, method: str | None = None) -> list[Setting]:
    found = [s for s in SETTINGS if s.key == key and (not s.used_by or method is None or method in s.used_by)]
    if not found:
        raise KeyError(f"{key} is not in dropbench.config.SETTINGS")
    return found


def check(key: str, value, method: str | None = None):
    """`value` of setting `key` (plain Python: lists, not ListConfig), as int or float where the rule
    says a number; UserError naming the key, the value and what is allowed otherwise. `method`: the
    regularizer method reading the key, for a key two methods read differently (regularizer.alpha)."""
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    for setting in _settings_for(key, method):
        value = _enforce(key, value, setting.rule)
    return value


def _enforce(name: str, value, rule):
    try:
        return rule.convert(value)
    except NotAllowed:
        raise UserError(f"{name}={_shown(value)} is not allowed; it must be {rule.describe()}") from None


# Checks that loaders and models share, named by their caller, with the same rules.
def positive_int(name: str, value) -> int:
    return _enforce(name, value, count())


def positive_float(name: str, value) -> float:
    return _enforce(name, value, POSITIVE)


def probability(name: str, value) -> float:
    """A drop probability: 0 <= p < 1 (p = 1 would drop every unit)."""
    return _enforce(name, value, PROBABILITY)


def non_negative(name: str, value) -> float:
    """A finite number >= 0 (a strength such as alpha or lambda, where 0 switches the method off)."""
    return _enforce(name, value, NON_NEGATIVE)


def flag(name: str, value) -> bool:
    return _enforce(name, value, Flag())


def probabilities(name: str, value, count: int) -> list[float]:
    """Setting `name` (a scalar p, or a list with one p per place) checked and spread over `count` places."""
    if isinstance(value, (list, tuple, ListConfig)) and len(value) != count:
        raise UserError(f"{name}={list(value)} has {len(value)} values; the model has {count} places for it, "
                        f"so give one value per place or a single number")
    value = check(name, value)
    return list(value) if isinstance(value, list) else [value] * count


def scalar_or_list(p):
    """A p that may be one number or one per hidden layer (kept as a list for summary())."""
    return list(p) if isinstance(p, (list, tuple, ListConfig)) else p


# -- a whole run's config -----------------------------------------------------------------------------

def _value(cfg: DictConfig, key: str):
    """(present, value) of a dotted key, resolved; an interpolation that cannot be resolved is the user's."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_missing(node, leaf):
        return False, None
    try:
        value = node[leaf]
        return True, OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except OmegaConfBaseException as error:
        raise UserError(f"{key}: {one_line(error)}") from None


def _methods(cfg: DictConfig) -> list[str]:
    node = cfg.get("regularizer")
    return list((node.get("methods") or {}).keys()) if isinstance(node, DictConfig) else []


def _applies(setting: Setting, cfg: DictConfig, methods: list[str]) -> bool:
    group = setting.key.split(".")[0]
    if group in OWN_TARGETS:
        if not str(OmegaConf.select(cfg, f"{group}._target_")).startswith(OWN_TARGETS[group]):
            return False
    return not setting.used_by or any(m in setting.used_by for m in methods)


def check_run_config(cfg: DictConfig) -> None:
    """Every setting of `cfg` within its range, then no key that nothing reads (see `_check_keys`);
    the first problem is raised as one UserError line. Runs before anything is written."""
    methods = _methods(cfg)
    for setting in SETTINGS:
        present, value = _value(cfg, setting.key)
        if present and _applies(setting, cfg, methods):
            _enforce(setting.key, value, setting.rule)
    last = cfg.seed + cfg.parallel_seeds - 1
    if last > INT64_MAX:
        raise UserError(f"seed={cfg.seed} with parallel_seeds={cfg.parallel_seeds} reaches seed {last}; "
                        f"the last seed must be below 2**63")
    _check_keys(cfg)


def _interpolated(cfg: DictConfig) -> set[str]:
    """The keys that some value refers to with ${KEY} (how a regularizer's methods take regularizer.p)."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            found.update(re.findall(r"\$\{([\w.\-]+)\}", node))

    walk(OmegaConf.to_container(cfg, resolve=False))
    return found


def _nearest(word: str, known, prefix: str = "") -> str:
    """"; did you mean PREFIX.KEY?" for the known key closest to `word`, or ""."""
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{match[0]}?" if match else ""


def _check_keys(cfg: DictConfig) -> None:
    """Reject a key that nothing reads (a typo added with +, or one left in a YAML).

    A key is read when it is a top-level setting or a config group; when it sits in a node with a
    `_target_` (`build` checks it against the callable's arguments); when another value refers
    to it with ${KEY}; or when it is `name`, a group's label. Any other key, whatever brought it
    in, is rejected naming the nearest key that is read.
    """
    referenced = _interpolated(cfg)
    for key in cfg:
        if key == "hydra" or key in TOP_LEVEL or key in GROUPS or key in referenced:
            continue
        raise UserError(f"{key}={_shown(_value(cfg, key)[1])} is not a setting{_nearest(key, TOP_LEVEL + GROUPS)} "
                        f"(every setting: docs/settings.md)")
    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or _has_target(node):
            continue
        targets = [k for k in node if _has_target(node._get_node(k))]
        settings = [k for k in node if f"{group}.{k}" in referenced and k not in targets]
        for key in node:
            if key in settings or key in targets or key == "name" or (group == "regularizer" and key == "methods"):
                continue
            label = ("+".join(_methods(cfg)) or "none") if group == "regularizer" else node.get("name", "")
            reads = ", ".join(f"{group}.{k}" for k in settings) or "none"
            hint = (_nearest(key, settings, f"{group}.")
                    or (f"; did you mean {group}.{targets[0]}.{key}?" if len(targets) == 1 else f" (it reads {reads})"))
            raise UserError(f"{group}.{key}={_shown(_value(cfg, f'{group}.{key}')[1])} is not read by "
                            f"{group} {label}{hint}")


def _has_target(node) -> bool:
    # keys(), not `in`: a DictConfig hides keys whose value is ??? (model=custom's module._target_)
    return isinstance(node, DictConfig) and "_target_" in node.keys()


def check_writable(directory: str) -> None:
    """Fail early, with the path, when results cannot be written under `directory`.

    The nearest existing ancestor must be a directory we may write into (a path under a regular
    file can be created by no one, root included; root passes the permission check, as it should).
    """
    probe = os.path.abspath(os.path.expanduser(str(directory)))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"results directory {str(directory)!r} cannot be created: {probe!r} is a file, "
                        f"not a directory; choose another with results_dir=PATH")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"results directory {str(directory)!r} is not writable ({probe!r} does not allow it); "
                        f"choose another with results_dir=PATH")


def one_line(error: BaseException | str) -> str:
    """An error message on one line: Hydra's and OmegaConf's messages run over several lines and
    end in details (full_key, object_type) that say nothing to a user."""
    text = str(error) if not isinstance(error, BaseException) or str(error) else type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return " ".join(lines) or type(error).__name__


# -- config to objects --------------------------------------------------------------------------------

def build(node: DictConfig, what: str, **kwargs):
    """Instantiate a config group node; its `name` key labels results, and is passed on only to a
    target that takes a `name` argument (load_torchvision).

    Whatever goes wrong while building from the config (a key the target does not take, a bad
    value) is the config's fault: it becomes a one-line UserError naming the group.
    """
    missing = sorted(OmegaConf.missing_keys(node)) if isinstance(node, DictConfig) else []
    if missing:  # `???` in a YAML: a value the user must give
        raise UserError(f"{what} {node.get('name', '')} needs {', '.join(f'{k}=VALUE' for k in missing)} "
                        f"(no default)".replace("  ", " "))
    try:
        target = get_object(str(node.get("_target_")))
    except Exception as error:  # no such class or function
        raise UserError(f"cannot build {what} {node.get('name')}: _target_={node.get('_target_')!r} "
                        f"({type(error).__name__}: {one_line(error)})") from None
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        parameters = None
    if parameters is not None:
        _check_arguments(node, what, target, parameters, kwargs)
    takes_name = parameters is not None and "name" in parameters
    try:
        return instantiate({k: v for k, v in node.items() if k != "name" or takes_name}, **kwargs)
    except InstantiationException as error:
        raise _user_error(what, node.get("name"), error) from None


def _check_arguments(node: DictConfig, what: str, target, parameters, kwargs: dict) -> None:
    """Every key of `node` must be an argument of `target`, unless it takes **kwargs."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    group, full = what.split()[0], node._get_full_key(None)
    prefix = full if full.startswith(group) else f"{group}.{full}" if full else group
    settable = [k for k, p in parameters.items()
                if k not in kwargs and (k in node or p.default is not inspect.Parameter.empty)]
    for key in node:
        if key in parameters or key == "name" or key.startswith("_"):
            continue
        hint = _nearest(key, settable, f"{prefix}.") or f"; it takes {', '.join(settable)}"
        raise UserError(f"{prefix}.{key}={_shown(_value(node, key)[1])} is not an argument of "
                        f"{getattr(target, '__name__', target)}{hint}")


def _user_error(what: str, name, error: InstantiationException) -> UserError:
    cause = error.__cause__
    while isinstance(cause, InstantiationException):
        cause = cause.__cause__
    if isinstance(cause, UserError):
        return cause
    detail = f"{type(cause).__name__}: {one_line(cause)}" if cause is not None else one_line(error)
    return UserError(f"cannot build {what}{f' {name}' if name else ''} from its config ({detail})")


# -- the reference page -------------------------------------------------------------------------------

PAGE_HEAD = """# Settings

<!-- Generated from dropbench/config.py by `python -m dropbench.config --markdown > docs/settings.md`;
edit SETTINGS there, not this page (a test checks that they agree). -->

Every setting dropbench reads and what it allows. All of them are checked before a run writes
anything: a value outside its range stops `dropbench train` with one line naming the key, the
value and the range, and exit code 2:

```
dropbench train: error: optimizer.lr=inf is not allowed; it must be a number in (0, 1e+06]
```

*Default* is the value in the shipped configs, followed by the choices that have the key when
not every choice of the group does. A key without a default is not in any shipped YAML: add it
with `+` (`+optimizer.betas=[0.9,0.99]`). Keys of `model` and `dataset` are checked when the
group's `_target_` is one of dropbench's; a callable of your own (`model.module._target_=...`, a
dataset or model `_target_` of your own) is given its keys as they are, and its signature says
which it takes.

## Keys that nothing reads

A misspelt key added with `+` (`+epoch=5`) would otherwise run with the default and say nothing,
so a composed config may hold only keys that something reads:

- a top-level setting listed below, or a config group (`dataset`, `model`, ...);
- a key of a node with a `_target_` (a dataset, model, optimizer, schedule or regularizer
  method): it must be an argument of that callable, unless the callable takes `**kwargs`
  (torchvision models: `+model.dropout=0.2`); this is checked when the node is built;
- a key another value refers to with `${KEY}`: this is how a regularizer's methods read
  `regularizer.p` and the like, and how a key of your own can feed another setting;
- `name`, the label of a group.

Any other key is rejected with the nearest key that would be read, whether it came from `+` on
the command line, from `++` or from a YAML of your own:

```
dropbench train: error: epoch=5 is not a setting; did you mean epochs? (every setting: docs/settings.md)
dropbench train: error: regularizer.alpha=2 is not read by regularizer dropout (it reads regularizer.p, ...)
```

The check looks at the composed config only, not at how each key got there, so it treats the
command line, `--config-dir` YAMLs and experiments alike.

## Job folders of a sweep

A job of `dropbench train -m` writes into a folder of the sweep directory named after its
overrides (`regularizer.p=0.5,seed=1`). The name is made safe first: `/` becomes `%2F`, `%`
becomes `%25`, control characters and a leading `.` their `%XX` code, so that a value such as
`dataset.path=../data/x.npz` names one folder inside the sweep directory. A name longer than
200 bytes becomes its first 64 bytes, `~` and a hash of the whole name (the same overrides give the
same name); the job's overrides are in full in its `.hydra/overrides.yaml`. `results_dir` cannot
be swept (one sweep writes to one place): a comma in its value must be quoted,
`results_dir='a,b'`.
"""
SECTIONS = {"": "The run", "optimizer": "optimizer", "schedule": "schedule", "dataset": "dataset",
            "model": "model", "regularizer": "regularizer", "logger": "logger"}


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


@functools.cache
def shipped_defaults() -> dict[str, dict[str, object]]:
    """key -> {config choice: value} over the shipped configs ("" for the top level), values unresolved."""
    from hydra import compose, initialize_config_module

    found: dict[str, dict[str, object]] = {}

    def note(tree: dict, prefix: str, choice: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) and key != "methods":
                note(value, f"{prefix}{key}.", choice)
            elif not key.startswith("_") and key != "methods":
                found.setdefault(f"{prefix}{key}", {})[choice] = value

    with initialize_config_module("dropbench.conf", version_base="1.3"):
        top = OmegaConf.to_container(compose("config"), resolve=False)
        note({k: v for k, v in top.items() if k not in GROUPS}, "", "")
        for group in GROUPS:
            for choice in choices(group):
                node = OmegaConf.to_container(compose("config", overrides=[f"{group}={choice}"]), resolve=False)[group]
                note(node, f"{group}.", choice)
    return found


def _default(setting: Setting, defaults: dict) -> str:
    group = setting.key.split(".")[0] if "." in setting.key else ""
    by_choice = {c: v for c, v in defaults.get(setting.key, {}).items() if not setting.used_by or c in setting.used_by}
    if not by_choice:
        return "—"
    values: dict[str, list[str]] = {}
    for choice, value in sorted(by_choice.items()):
        shown = ("the config's name" if value == choice and setting.key.endswith(".name")
                 else "required" if value == "???" else f"`{_yaml_value(value)}`")
        values.setdefault(shown, []).append(choice)
    plain = len(values) == 1 and (group == "" or sorted(by_choice) == choices(group))
    return "; ".join(v if plain or v == "the config's name" else f"{v} ({', '.join(cs)})" for v, cs in values.items())


def markdown() -> str:
    """docs/settings.md: the introduction, then one table per group."""
    defaults = shipped_defaults()
    lines = [PAGE_HEAD]
    for group, title in SECTIONS.items():
        lines += [f"## {title}", "", "| key | allowed | default | meaning |", "| --- | --- | --- | --- |"]
        for s in SETTINGS:
            if (s.key.split(".")[0] if "." in s.key else "") == group:
                key = f"`{s.key}`" + (f" ({', '.join(s.used_by)})" if s.used_by else "")
                cells = (key, s.allowed, _default(s, defaults), s.meaning)
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m dropbench.config --markdown > docs/settings.md")
    from dropbench.config import markdown as _markdown  # the imported module, whose SETTINGS the tests read

    sys.stdout.write(_markdown())


def choices(group: str) -> list[str]:
    """Config names available in a config group (YAML files under conf/<group>; `_name` files are
    shared parts of the others, not choices)."""
    folder = files("dropbench.conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_"))
