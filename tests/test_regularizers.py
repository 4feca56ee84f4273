"""The regularizers: each method's defining property, where it acts in built-in and user models,
and replica k of a run being the single run of seed k.

Statistical tests use fixed seeds and tolerances of several standard errors, so they are both
deterministic and meaningful (a wrong scaling or rate is off by far more than the tolerance).
Runs are built from the YAMLs with `dropbench.train.build_run` on a tiny dataset; user models are
plain `nn.Module`s defined here.

Run: pytest tests/test_regularizers.py
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_csv, run_cli
from hydra import compose, initialize_config_dir
from torch import nn

from dropbench.config import UserError
from dropbench.models import CNN, MLP
from dropbench.regularizers import Regularizers, build_regularizers, cross_entropy, weight_names
from dropbench.regularizers.dropconnect import DropConnectLinear
from dropbench.regularizers.dropout import DropoutLayer
from dropbench.regularizers.dropout_scaled import ScaledDropoutLayer
from dropbench.regularizers.gaussian import GaussianNoise
from dropbench.regularizers.rdrop import symmetric_kl
from dropbench.regularizers.standout import StandoutLinear
from dropbench.replicas import PerReplica, ReplicaGenerators, Replicas, keep_mask
from dropbench.train import build_run, evaluate, train_epoch

CONF = str(Path(__file__).resolve().parents[1] / "conf")
CPU = torch.device("cpu")
METHODS = ["none", "dropout", "dropout_scaled", "rdrop", "multisample", "dropconnect", "gaussian", "standout",
           "l1", "l2", "maxnorm", "batchnorm", "mc_dropout"]
WITH_P = {"dropout", "dropout_scaled", "rdrop", "multisample", "dropconnect", "gaussian", "mc_dropout"}
# What each method records in summary.csv (R-Drop and MC dropout also record the dropout they build on).
SUMMARY_KEYS = {
    "none": set(), "dropout": {"p", "input_p"}, "dropout_scaled": {"p", "input_p"},
    "rdrop": {"p", "input_p", "alpha", "kl_reduction"}, "multisample": {"p", "k"},
    "dropconnect": {"p", "per_example", "inference"}, "gaussian": {"p", "sigma"}, "standout": {"alpha", "beta"},
    "l1": {"lam"}, "l2": {"lam"}, "maxnorm": {"c"}, "batchnorm": {"momentum", "eps"},
    "mc_dropout": {"p", "input_p", "samples"},
}
IN_SHAPE, CLASSES = (1, 12), 4
N_TRAIN, N_TEST, BATCH = 96, 32, 32  # 3 steps per epoch
MLP_SETTINGS = ("model=mlp", "model.hidden=[16,16]")
CNN_SETTINGS = ("model=cnn", "model.channels=[4,4]", "model.kernel_sizes=[3,3]", "model.strides=[1,2]",
                "model.paddings=[1,1]")


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    """Four Gaussian clusters in 12 dimensions, [N, 1, 12]: tiny, and learnable in a few epochs."""
    g = np.random.default_rng(0)
    centers = g.normal(size=(CLASSES, 12)) * 1.5
    y = np.arange(N_TRAIN + N_TEST) % CLASSES
    x = (centers[y] + g.normal(size=(len(y), 12)))[:, None].astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "clusters.npz"
    np.savez(path, x=x[:N_TRAIN], y=y[:N_TRAIN], x_test=x[N_TRAIN:], y_test=y[N_TRAIN:])
    return path


@functools.cache
def config(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def kept(generators: ReplicaGenerators, shape, p: float) -> torch.Tensor:
    """The keep pattern (bool) a dropout layer of rate p draws next from `generators` (one replica)."""
    return keep_mask(torch.zeros(()), shape, generators, 1 - p) > 0


def regs_for(choice: str, *overrides: str) -> Regularizers:
    """Fresh Regularizers of `regularizer=choice` plus `regularizer.KEY=VALUE` overrides, via the YAMLs."""
    return build_regularizers(config(f"regularizer={choice}", *(f"regularizer.{o}" for o in overrides)).regularizer)


def run_for(npz: Path, choice: str, *overrides: str, seeds=(0,), model=MLP_SETTINGS, optimizer=("optimizer=sgd",
            "optimizer.lr=0.1"), build=True):
    """A run built by build_run from the YAMLs (build=False: its config): `regularizer=choice` on tiny data."""
    cfg = config("dataset=npz", f"dataset.path={npz}", "dataset.val_fraction=0", *model, *optimizer,
                 f"regularizer={choice}", *(f"regularizer.{o}" for o in overrides))
    return build_run(cfg, CPU, list(seeds)) if build else cfg


def fit(run, epochs=2):
    """Losses [epochs, R] of `epochs` training epochs, then the test metrics."""
    losses = torch.stack([train_epoch(run, BATCH) for _ in range(epochs)])
    return losses, evaluate(run, "test", 64)


def replicas_of(regs: Regularizers, make, seeds=(0,)):
    """The replicas of a hand-built model (`make()` after manual_seed(seed)), as build_run builds them;
    messages name the model by its class, as the results label a user's model."""
    generators = ReplicaGenerators(list(seeds), CPU)
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = make()
        models.append(regs.attach(model, generators, type(model).__name__))
    model = Replicas(models)
    regs.bind(model)
    return model, generators


def mlp(hidden=(16, 16)):
    return lambda: MLP(IN_SHAPE, CLASSES, hidden=list(hidden))


def batch(n=8, seed=123, shape=IN_SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def generators(seed=0):
    return ReplicaGenerators([seed], CPU)


def of_type(model: nn.Module, kind) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def one_line_error(regs: Regularizers, make, match: str) -> str:
    with pytest.raises(UserError, match=match) as error:
        replicas_of(regs, make)
    assert "\n" not in str(error.value)
    return str(error.value)


# -- user models --------------------------------------------------------------------------------------
class OwnDropoutNet(nn.Module):
    """Two nn.Dropout of its own (one on the input, one before the head) and two activation modules."""

    def __init__(self):
        super().__init__()
        self.drop_in, self.fc1, self.act1 = nn.Dropout(0.3), nn.Linear(12, 16), nn.ReLU()
        self.fc2, self.act2, self.drop_out = nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.3)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        h = self.act1(self.fc1(self.drop_in(x.flatten(1))))
        return self.head(self.drop_out(self.act2(self.fc2(h))))

    def plain(self, x):
        """The forward pass without any dropout."""
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x.flatten(1))))))


class ActivationNet(nn.Module):
    """No dropout layers; activation modules as attributes (not in an nn.Sequential)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1, self.fc2, self.act2 = nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU()
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x.flatten(1))))))


class FunctionalNet(nn.Module):
    """Hidden Linear layers, but F.relu instead of activation modules, and no dropout layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class ConvNet(nn.Module):
    """Convolutions (one with its own BatchNorm) and a Linear head: no hidden Linear layer. Input [1, 6, 6]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(5 * 3 * 3, CLASSES)

    def forward(self, x):
        return self.head(self.features(x))


# -- every method: builds from its YAML, records its parameters -----------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_every_method_builds_from_its_yaml_and_records_its_parameters(name):
    regs = regs_for(name)
    assert regs.name == name
    replicas_of(regs, mlp())
    summary = regs.summary()
    assert set(summary) == SUMMARY_KEYS[name]
    assert ("p" in summary) == (name in WITH_P)
    defaults = config(f"regularizer={name}").regularizer
    for key, value in summary.items():
        expected = defaults[key]
        assert value == ("" if expected is None else expected), key
    for method in regs.methods:
        module = __import__(type(method).__module__, fromlist=["_"])
        assert module.__doc__ and any(str(year) in module.__doc__ for year in range(1987, 2025)), module.__name__


# -- replica k = the single run of seed k ---------------------------------------------------------------
REPLICA_CASES = [(name, (), MLP_SETTINGS) for name in METHODS] + [
    ("dropconnect", ("per_example=false",), MLP_SETTINGS),
    ("dropconnect", ("inference=moment_matching", "mc_samples=5"), MLP_SETTINGS),
    ("dropout", ("p=[0.2,0.5]",), MLP_SETTINGS),
    ("batchnorm", (), CNN_SETTINGS), ("maxnorm", ("c=0.5",), CNN_SETTINGS), ("dropout", (), CNN_SETTINGS),
]


@pytest.mark.parametrize("name, overrides, model", REPLICA_CASES)
def test_replica_k_is_the_single_run_of_seed_k(npz, name, overrides, model):
    """Init, data order and masks of seed k; only the rounding of batched products may differ."""
    seeds = (3, 4, 5)
    tol = dict(rtol=1e-3, atol=1e-3) if name == "batchnorm" else dict(rtol=1e-4, atol=1e-4)
    run = run_for(npz, name, *overrides, seeds=seeds, model=model)
    losses, metrics = fit(run)
    assert not torch.equal(losses[:, 0], losses[:, 1])  # the replicas really are different runs
    for k, seed in enumerate(seeds):
        single = run_for(npz, name, *overrides, seeds=(seed,), model=model)
        single_losses, single_metrics = fit(single)
        torch.testing.assert_close(losses[:, k], single_losses[:, 0], **tol)
        for key, values in metrics.items():
            torch.testing.assert_close(values[k], single_metrics[key][0], **tol, msg=key)
        for param in single.model.params:
            torch.testing.assert_close(run.model.stacked(param)[k], single.model.stacked(param)[0], **tol)


# -- a folded sweep: replica k = the single run of its own settings and seed ------------------------------
FOLD_CASES = [
    ("dropout", ["p=0.1", "p=0.5", "p=0.0"], MLP_SETTINGS),
    ("dropout", ["p=[0.2,0.5]", "p=[0.1,0.3]"], MLP_SETTINGS),
    ("dropout", ["input_p=0.1", "input_p=0.3"], MLP_SETTINGS),
    ("dropout_scaled", ["p=0.2", "p=0.6"], MLP_SETTINGS),
    ("rdrop", ["alpha=0.5 p=0.1", "alpha=2.0 p=0.3", "alpha=0.0 p=0.3"], MLP_SETTINGS),
    ("multisample", ["p=0.2", "p=0.6"], MLP_SETTINGS),
    ("dropconnect", ["p=0.2", "p=0.5"], MLP_SETTINGS),
    ("dropconnect", ["p=0.2 inference=moment_matching mc_samples=5",
                     "p=0.5 inference=moment_matching mc_samples=5"], MLP_SETTINGS),
    ("gaussian", ["p=0.2", "p=0.5"], MLP_SETTINGS),
    ("gaussian", ["sigma=0.5", "sigma=1.5"], MLP_SETTINGS),
    ("standout", ["alpha=0.5 beta=0.0", "alpha=1.0 beta=1.0"], MLP_SETTINGS),
    ("l1", ["lam=1e-3", "lam=1e-2"], MLP_SETTINGS),
    ("l2", ["lam=1e-3", "lam=1e-1"], MLP_SETTINGS),
    ("maxnorm", ["c=0.5", "c=1.0"], CNN_SETTINGS),
    ("mc_dropout", ["p=0.2 samples=3", "p=0.5 samples=3"], MLP_SETTINGS),
]


@pytest.mark.parametrize("name, settings, model", FOLD_CASES)
def test_a_folded_replica_is_the_single_run_of_its_settings(npz, name, settings, model):
    """Replicas differing in seed and in the method's numeric settings train together; replica k
    has the numbers of the single run of its own settings, up to the rounding of batched products."""
    seeds = [3 + k for k in range(len(settings))]
    overrides = [s.split() for s in settings]
    cfgs = [run_for(npz, name, *o, seeds=(seed,), model=model, build=False) for o, seed in zip(overrides, seeds)]
    run = build_run(cfgs[0], CPU, seeds, cfgs)
    losses, metrics = fit(run)
    for k, (o, seed) in enumerate(zip(overrides, seeds)):
        single = run_for(npz, name, *o, seeds=(seed,), model=model)
        single_losses, single_metrics = fit(single)
        torch.testing.assert_close(losses[:, k], single_losses[:, 0], rtol=1e-4, atol=1e-4)
        for key, values in metrics.items():
            torch.testing.assert_close(values[k], single_metrics[key][0], rtol=1e-4, atol=1e-4, msg=key)
        assert run.replica_regs[k].summary() == single.regs.summary()


@pytest.mark.parametrize("layer, scaled", [(DropoutLayer, True), (ScaledDropoutLayer, False)])
def test_folded_rates_with_torch_masks_keep_each_replicas_rate(layer, scaled):
    """impl=torch draws every replica's mask in one sample of torch's generator, at the replica's own rate."""
    rates, generators = (0.2, 0.7), ReplicaGenerators([0, 1], CPU)
    models = []
    for p in rates:
        linear = nn.Linear(4, 4, bias=False)
        nn.init.eye_(linear.weight)
        models.append(nn.Sequential(layer(p, generators, impl="torch"), linear))
    replicas = Replicas(models)
    torch.manual_seed(0)
    out = replicas(torch.ones(2, 20000, 4)).detach()
    for k, p in enumerate(rates):
        kept = out[k] != 0
        assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.01)
        assert torch.allclose(out[k][kept], torch.tensor(1 / (1 - p) if scaled else 1.0))


def test_settings_that_do_not_differ_stay_numbers():
    regs = [regs_for("rdrop", "alpha=1.0", f"p={p}") for p in (0.1, 0.3)]
    folded = regs[0].folded(regs)
    rdrop = next(m for m in folded.methods if m.name == "rdrop")
    assert rdrop.alpha == 1.0 and rdrop.p == PerReplica((0.1, 0.3))
    assert regs[0].methods[1].p == 0.1  # the replicas' own methods are left as their configs set them


@pytest.mark.parametrize("name", METHODS)
def test_a_single_run_is_reproduced_bit_for_bit(npz, name):
    (losses, metrics), (again, again_metrics) = (fit(run_for(npz, name, seeds=(7,))) for _ in range(2))
    assert torch.equal(losses, again) and metrics == again_metrics


def test_replicas_of_a_user_model_are_its_single_runs():
    x, y = batch(64)

    def steps(seeds):
        """3 SGD steps of OwnDropoutNet with dropout; seed s trains on its own 16 rows each step."""
        regs = regs_for("dropout", "p=[0.2,0.4]")
        model, _ = replicas_of(regs, OwnDropoutNet, seeds)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            rows = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(10 * s + step))[:16]
                                for s in seeds])
            loss = regs.loss(model, x[rows], y[rows])
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses), model

    seeds = (0, 1, 2)
    together, model = steps(seeds)
    assert not torch.equal(together[:, 0], together[:, 1])
    for k, seed in enumerate(seeds):
        alone, single = steps((seed,))
        torch.testing.assert_close(together[:, k], alone[:, 0], rtol=1e-4, atol=1e-4)
        for name in single.params:
            torch.testing.assert_close(model.stacked(name)[k], single.stacked(name)[0], rtol=1e-4, atol=1e-4)


# Settings that switch each method off: the run must be the unregularized one, step for step.
SWITCHED_OFF = [
    ("dropout", ["p=0"]), ("dropout", ["p=[0,0]"]), ("dropout_scaled", ["p=0"]), ("rdrop", ["p=0", "alpha=0"]),
    ("multisample", ["p=0"]), ("dropconnect", ["p=0"]), ("dropconnect", ["p=0", "per_example=false"]),
    ("dropconnect", ["p=0", "inference=moment_matching"]), ("gaussian", ["p=0"]), ("gaussian", ["sigma=0"]),
    ("standout", ["alpha=0", "beta=100"]), ("l1", ["lam=0"]), ("l2", ["lam=0"]), ("maxnorm", ["c=1e9"]),
    ("mc_dropout", ["p=0", "samples=3"]),
]


@pytest.mark.parametrize("name, overrides", SWITCHED_OFF)
def test_switched_off_method_reproduces_the_unregularized_run_exactly(npz, name, overrides):
    base = run_for(npz, "none")
    base_losses, base_metrics = fit(base)
    run = run_for(npz, name, *overrides)
    losses, metrics = fit(run)
    assert torch.equal(losses, base_losses)
    params, base_params = run.model.parameters(), base.model.parameters()
    assert len(params) == len(base_params)
    assert all(torch.equal(a, b) for a, b in zip(params, base_params))
    if name == "mc_dropout":  # log of a mean of identical softmaxes: equal up to rounding
        for key in metrics:
            torch.testing.assert_close(metrics[key], base_metrics[key])
    else:
        assert metrics == base_metrics


def test_multisample_with_one_sample_is_dropout_step_for_step(npz):
    losses, metrics = fit(run_for(npz, "multisample", "k=1", "p=0.4"))
    base_losses, base_metrics = fit(run_for(npz, "dropout", "p=0.4"))
    assert torch.equal(losses, base_losses) and metrics == base_metrics


# -- where methods act in user models ---------------------------------------------------------------------
@pytest.mark.parametrize("name, layer", [("dropout", DropoutLayer), ("dropout_scaled", ScaledDropoutLayer),
                                         ("gaussian", GaussianNoise), ("mc_dropout", DropoutLayer)])
def test_dropout_methods_replace_exactly_the_models_own_dropout_layers(name, layer):
    model, _ = replicas_of(regs_for(name, "p=[0.1,0.2]"), OwnDropoutNet)
    net = model.module
    assert type(net.drop_in) is layer and type(net.drop_out) is layer
    assert type(net.act1) is nn.ReLU and type(net.act2) is nn.Tanh  # nothing after the activations
    assert len(of_type(net, (DropoutLayer, GaussianNoise))) == 2 and not of_type(net, nn.Dropout)
    if layer is not GaussianNoise:
        assert (net.drop_in.p, net.drop_out.p) == (0.1, 0.2)  # p per place, in module order


def test_multisample_on_own_dropout_layers_takes_the_last_one_as_its_rate():
    model, _ = replicas_of(regs_for("multisample", "p=[0.1,0.2]", "k=3"), OwnDropoutNet)
    net = model.module
    assert type(net.drop_in) is DropoutLayer and net.drop_in.p == 0.1
    assert type(net.drop_out) is nn.Identity  # the K samples at the head's input replace it
    x, y = batch(5)
    assert model(x[None]).shape == (1, 15, CLASSES)  # K copies through the head in training
    model.eval()
    assert model(x[None]).shape == (1, 5, CLASSES)


@pytest.mark.parametrize("name", ["none", "l2", "maxnorm"])
def test_without_a_dropout_method_the_models_own_dropout_layers_are_removed(name):
    model, _ = replicas_of(regs_for(name), OwnDropoutNet)
    net = model.module
    assert type(net.drop_in) is nn.Identity and type(net.drop_out) is nn.Identity
    torch.manual_seed(0)
    reference = OwnDropoutNet()  # the same weights, own dropout left in place
    x, _ = batch(10)
    model.train()
    assert torch.equal(model(x[None])[0], reference.plain(x))  # training: no dropout at all
    assert torch.equal(model(x[None])[0], reference.eval()(x))


@pytest.mark.parametrize("name, layer", [("dropout", DropoutLayer), ("gaussian", GaussianNoise),
                                         ("dropout_scaled", ScaledDropoutLayer)])
def test_without_dropout_layers_methods_go_after_every_activation_module(name, layer):
    model, _ = replicas_of(regs_for(name), ActivationNet)
    net = model.module
    for act, kind in ((net.act1, nn.GELU), (net.act2, nn.SiLU)):
        assert isinstance(act, nn.Sequential) and type(act[0]) is kind and type(act[1]) is layer
    x, _ = batch(10)
    model.train()
    assert not torch.equal(model(x[None]), model(x[None]))
    model.eval()
    torch.manual_seed(0)
    plain = ActivationNet()
    scale = 0.5 if layer is ScaledDropoutLayer else 1.0
    expected = plain.head(plain.act2(plain.fc2(plain.act1(plain.fc1(x.flatten(1))) * scale)) * scale)
    torch.testing.assert_close(model(x[None])[0], expected)


@pytest.mark.parametrize("name", ["dropout", "gaussian", "multisample", "rdrop", "mc_dropout", "dropout_scaled"])
def test_dropout_methods_reject_a_model_without_activation_modules_or_dropout_layers(name):
    message = one_line_error(regs_for(name), FunctionalNet, "has no place to act in model FunctionalNet")
    assert "dropout modules or activation modules" in message


@pytest.mark.parametrize("name", ["dropconnect", "standout"])
def test_hidden_linear_methods_reject_a_model_without_hidden_linear_layers(npz, name):
    one_line_error(regs_for(name), ConvNet, f"regularizer {name} has no place to act in model ConvNet")
    with pytest.raises(UserError, match=f"regularizer {name} has no place to act in model cnn"):
        run_for(npz, name, model=CNN_SETTINGS)
    run = run_for(npz, name, model=(*CNN_SETTINGS, "model.hidden=[8]"))
    assert len(of_type(run.model.module, (DropConnectLinear, StandoutLinear))) == 1  # the hidden Linear, not the head


def test_dropconnect_on_linear_layers_without_activation_modules():
    model, _ = replicas_of(regs_for("dropconnect"), FunctionalNet)
    net = model.module
    assert isinstance(net.fc1, DropConnectLinear) and isinstance(net.fc2, DropConnectLinear)
    assert type(net.fc1.activation) is nn.Identity and type(net.head) is nn.Linear
    one_line_error(regs_for("dropconnect", "inference=moment_matching"), FunctionalNet,
                   "dropconnect has no place to act in model FunctionalNet.*inference=moment_matching.*"
                   "fc1 is not.*use inference=mean")
    one_line_error(regs_for("standout"), FunctionalNet, "standout has no place to act in model FunctionalNet")


def test_hidden_linear_methods_replace_linear_and_activation_in_the_mlp():
    for name, kind in (("dropconnect", DropConnectLinear), ("standout", StandoutLinear)):
        model, _ = replicas_of(regs_for(name), mlp())
        net = model.module
        assert [type(m) for m in net] == [nn.Flatten, kind, nn.Identity, kind, nn.Identity, nn.Linear]
        assert all(type(layer.activation) is nn.ReLU for layer in of_type(net, kind))


def test_l2_on_a_user_model_adds_exactly_half_lambda_times_the_squared_weights():
    lam = 0.03
    regs = regs_for("l2", f"lam={lam}")
    model, _ = replicas_of(regs, ConvNet)
    base_regs = regs_for("none")
    base, _ = replicas_of(base_regs, ConvNet)
    x, y = batch(6, shape=(1, 6, 6))
    loss, base_loss = regs.loss(model, x[None], y[None]), base_regs.loss(base, x[None], y[None])
    net = base.module
    weights = [net.features[0].weight, net.features[3].weight, net.head.weight]  # not biases, not BatchNorm
    assert weight_names(net) == ["features.0.weight", "features.3.weight", "head.weight"]
    torch.testing.assert_close(loss - base_loss, lam / 2 * sum(w.square().sum() for w in weights).view(1))


def test_maxnorm_on_a_conv_model_constrains_the_kernels_not_the_head():
    c = 0.3
    regs = regs_for("maxnorm", f"c={c}")
    model, _ = replicas_of(regs, ConvNet)
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    x, y = batch(16, shape=(1, 6, 6))
    for _ in range(3):
        loss = regs.loss(model, x[None], y[None])
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        regs.after_step(model)
    net = model.module
    for conv in (net.features[0], net.features[3]):
        norms = conv.weight.flatten(1).norm(dim=1)  # one kernel [in, kh, kw] per output channel
        assert norms.max() <= c * (1 + 1e-5) and (norms > 0.99 * c).any()
    assert net.head.weight.norm(dim=1).max() > c
    assert net.features[1].weight.abs().max() > c  # BatchNorm's scale is not a weight row


def test_batchnorm_reuses_a_models_own_batchnorm_layers():
    model, _ = replicas_of(regs_for("batchnorm", "momentum=0.25", "eps=0.001"), ConvNet)
    bns = of_type(model.module, nn.modules.batchnorm._BatchNorm)
    assert len(bns) == 1 and (bns[0].momentum, bns[0].eps) == (0.25, 0.001)
    assert type(model.module.features[3]) is nn.Conv2d  # no new layer after the second conv
    one_line_error(regs_for("batchnorm"), FunctionalNet, "batchnorm has no place to act in model FunctionalNet")


class NestedDropoutNet(nn.Module):
    """An own dropout inside a block, then one after the block: block.2 comes first in module order."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5))
        self.drop2 = nn.Dropout(0.5)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.drop2(self.block(x)))


def test_one_p_per_place_follows_module_order_in_nested_models():
    model, _ = replicas_of(regs_for("dropout", "p=[0.1,0.2]"), NestedDropoutNet)
    assert (model.module.block[3].p, model.module.drop2.p) == (0.1, 0.2)


def test_an_activation_registered_twice_gets_dropout_at_both_points():
    relu = nn.ReLU()
    model, _ = replicas_of(regs_for("dropout"), lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 8), relu,
                                                                       nn.Linear(8, 8), relu, nn.Linear(8, CLASSES)))
    assert len(of_type(model.module[2], DropoutLayer)) == 1 and len(of_type(model.module[4], DropoutLayer)) == 1


def test_the_head_is_model_head_else_the_last_linear():
    class HeadFirst(nn.Module):
        """`head` registered before the hidden layer: the attribute wins over module order."""

        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, CLASSES)
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())

        def forward(self, x):
            return self.head(self.body(x))

    model, _ = replicas_of(regs_for("dropconnect"), HeadFirst)
    assert type(model.module.head) is nn.Linear and isinstance(model.module.body[1], DropConnectLinear)
    assert weight_names(model.module, hidden_only=True) == ["body.1.linear.weight"]


# -- dropout and its non-inverted variant -------------------------------------------------------
def test_inverted_dropout_keeps_the_mean_and_drops_a_fraction_p():
    p, x = 0.3, torch.full((4000, 50), 2.0)
    y = DropoutLayer(p, generators()).train()(x)
    n = x.numel()
    assert abs((y == 0).float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(y[y != 0], torch.tensor(2.0 / (1 - p)))
    assert abs(y.mean().item() - 2.0) < 4 * 2.0 * math.sqrt(p / (1 - p) / n)


def test_own_and_torch_dropout_agree_in_distribution():
    p, x = 0.4, torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    outs = {impl: DropoutLayer(p, generators(), impl).train()(x) for impl in ("own", "torch")}
    n = x.numel()
    for y in outs.values():
        kept = y != 0
        assert abs(1 - kept.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))  # same scaling of the kept units
        zeros_per_example = (~kept).float().sum(-1)  # Binomial(64, p) in both
        assert abs(zeros_per_example.mean().item() - 64 * p) < 4 * math.sqrt(64 * p * (1 - p) / 2000)
        assert abs(zeros_per_example.var().item() / (64 * p * (1 - p)) - 1) < 0.15
    assert not torch.equal(outs["own"], outs["torch"])  # different streams, same law


@pytest.mark.parametrize("layer, scale", [(DropoutLayer, 1.0), (ScaledDropoutLayer, 0.5)])
def test_dropout_layers_in_eval_are_deterministic(layer, scale):
    x = torch.randn(5, 7)
    module = layer(0.5, ReplicaGenerators([0, 1], CPU)).eval()
    assert torch.equal(module(x), x * scale) and torch.equal(module(x), module(x))


def test_scaled_dropout_does_not_rescale_in_training_and_scales_by_1_minus_p_in_eval():
    p, x = 0.25, torch.full((4000, 25), 3.0)
    layer = ScaledDropoutLayer(p, generators())
    y = layer.train()(x)
    assert set(y.unique().tolist()) == {0.0, 3.0}
    assert abs(y.mean().item() - 3.0 * (1 - p)) < 4 * 3.0 * math.sqrt(p * (1 - p) / x.numel())
    assert torch.equal(layer.eval()(x), x * (1 - p))  # eval = E[train output]


def test_dropout_p_per_place_and_a_wrong_count_is_a_user_error():
    model, _ = replicas_of(regs_for("dropout", "p=[0.2,0.5]"), mlp())
    assert [m.p for m in of_type(model.module, DropoutLayer)] == [0.2, 0.5]
    one_line_error(regs_for("dropout", "p=[0.2,0.5,0.1]"), mlp(), r"regularizer\.p=\[0\.2, 0\.5, 0\.1\] has 3 values")


def test_dropout_gradient_is_the_mask():
    x = torch.randn(50, 20, requires_grad=True)
    y = DropoutLayer(0.5, generators()).train()(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, (y.detach() != 0).float() * 2.0)


def test_input_dropout_drops_the_inputs_of_a_user_model():
    model, _ = replicas_of(regs_for("dropout", "p=0", "input_p=0.5"), ActivationNet)
    seen = []
    model.module.fc1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.ones(200, *IN_SHAPE)
    model(x[None])
    assert set(seen[0].unique().tolist()) == {0.0, 2.0}  # inverted dropout on the inputs
    model.eval()
    model(x[None])
    assert torch.equal(seen[1], x.flatten(1))


def test_input_dropout_leaves_the_logits_of_a_sequential_model_alone():
    model, gens = replicas_of(regs_for("dropout", "p=0", "input_p=0.5"), mlp())
    x, _ = batch(50)
    model.train()
    state = gens.state()
    logits = model(x[None])[0]
    gens.load_state(state)
    dropped = x * kept(gens, x.shape, 0.5) / 0.5
    torch.manual_seed(0)
    torch.testing.assert_close(logits, mlp()()(dropped))  # the same weights, on the dropped inputs


# -- R-Drop ----------------------------------------------------------------------------------------
def official_compute_kl_loss(p, q):
    """`compute_kl_loss` of the github.com/dropreg/R-Drop README (commit 9dcc830), one replica's logits [B, C]."""
    p_loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="none")
    q_loss = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="none")
    return (p_loss.sum() + q_loss.sum()) / 2


def test_rdrop_kl_is_zero_for_identical_passes_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(3, 6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.equal(symmetric_kl(z1, z1), torch.zeros(3, dtype=torch.float64))
    kl = symmetric_kl(z1, z2, "sum")
    assert kl.shape == (3,)
    p1, p2 = z1.softmax(-1), z2.softmax(-1)
    direct = 0.5 * ((p1 * (p1 / p2).log()).sum((1, 2)) + (p2 * (p2 / p1).log()).sum((1, 2)))
    torch.testing.assert_close(kl, direct)
    torch.testing.assert_close(kl, torch.stack([official_compute_kl_loss(a, b) for a, b in zip(z1, z2)]))
    torch.testing.assert_close(symmetric_kl(z1, z2), kl / 6)  # batchmean, the default


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_rdrop_loss_is_mean_ce_of_two_passes_plus_alpha_kl(reduction):
    regs = regs_for("rdrop", "alpha=0.7", "p=0.3", f"kl_reduction={reduction}")
    model, gens = replicas_of(regs, mlp(), seeds=(0, 1))
    model.train()
    x, y = batch(20)
    x, y = x.view(2, 10, *IN_SHAPE), y.view(2, 10)  # each replica its own batch
    state = gens.state()
    loss = regs.loss(model, x, y)
    gens.load_state(state)  # replay the same masks by hand
    z1, z2 = model(x), model(x)
    assert not torch.equal(z1, z2)  # independent masks in the two passes
    expected = (cross_entropy(z1, y) + cross_entropy(z2, y)) / 2 + 0.7 * symmetric_kl(z1, z2, reduction)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["rdrop", "mc_dropout"])
def test_rdrop_and_mc_dropout_need_dropout_layers(npz, name):
    with pytest.raises(UserError, match="regularizer dropout has no place to act in model logreg"):
        run_for(npz, name, model=("model=logreg",))
    alone = Regularizers([m for m in regs_for(name).methods if m.name == name])  # without its dropout
    one_line_error(alone, mlp(), f"regularizer {name} needs dropout-like layers")


# -- multi-sample dropout ----------------------------------------------------------------------------
def test_multisample_loss_averages_k_masked_copies_through_the_shared_head():
    k, p = 5, 0.5
    regs = regs_for("multisample", f"k={k}", f"p={p}")
    model, gens = replicas_of(regs, mlp())
    net, head = model.module, model.module[-1]
    model.train()
    x, y = batch(6)
    state = gens.state()
    loss = regs.loss(model, x[None], y[None])
    gens.load_state(state)
    h = net[:-1](x)  # the first hidden layer's ordinary dropout draws its mask here
    keep = kept(gens, (k, *h.shape), p)
    per_sample = torch.stack([cross_entropy(F.linear(h * keep[i] / (1 - p), head.weight, head.bias)[None], y[None])
                              for i in range(k)])
    torch.testing.assert_close(loss, per_sample.mean(0))
    assert per_sample.std(0).min() > 0  # the samples really differ
    # evaluation: one deterministic pass, no dropout before the head
    model.eval()
    logp = regs.predict(model, x)
    torch.testing.assert_close(logp[0], F.log_softmax(F.linear(net[:-1](x), head.weight, head.bias), -1))
    assert torch.equal(logp, regs.predict(model, x))


def test_multisample_needs_a_hidden_layer(npz):
    with pytest.raises(UserError, match="multisample has no place to act"):
        run_for(npz, "multisample", model=("model=logreg",))


# -- DropConnect -------------------------------------------------------------------------------------
def dropconnect_layer(p=0.5, per_example=True, inference="mean", mc_samples=50, seed=0, n_in=12, n_out=6,
                      activation=None):
    torch.manual_seed(seed)
    return DropConnectLinear(nn.Linear(n_in, n_out), activation, p, generators(seed), per_example, inference,
                             mc_samples)


def test_dropconnect_masks_differ_per_example_or_are_shared_per_batch():
    x = torch.randn(1, 12).expand(64, 12)  # 64 copies of one example
    y = dropconnect_layer(per_example=True).train()(x)
    assert (y - y[:1]).abs().amax(-1).gt(0).float().mean() > 0.9  # the copies see different masks
    layer = dropconnect_layer(per_example=False).train()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y1[:1].expand_as(y1))  # one mask for the whole batch...
    assert not torch.equal(y1, y2)  # ...and a new one at the next step
    rows = dropconnect_layer(per_example=True).train()(torch.randn(1, 1, 12).expand(4, 16, 12))
    assert rows.shape == (4, 16, 6) and (rows - rows[:, :1]).abs().amax(-1).gt(0).float().mean() > 0.9


@pytest.mark.parametrize("per_example", [False, True])
def test_dropconnect_masks_weights_with_inverted_scaling(per_example):
    p = 0.5
    layer = dropconnect_layer(p=p, per_example=per_example).train()
    x = torch.randn(4, 12)
    gens = layer.generators
    state = gens.state()
    y = layer(x)
    gens.load_state(state)
    w, b = layer.linear.weight, layer.linear.bias
    if per_example:
        mask = kept(gens, (4, 6, 12), p)
        expected = torch.einsum("noi,ni->no", w * mask / (1 - p), x) + b
    else:
        mask = kept(gens, (6, 12), p)
        expected = F.linear(x, w * mask / (1 - p), b)
    torch.testing.assert_close(y, expected)
    if not per_example:  # gradients reach exactly the kept weights
        y.sum().backward()
        assert torch.equal(w.grad != 0, mask & (x.sum(0) != 0).expand_as(mask))


def test_dropconnect_is_unbiased_and_evaluates_with_the_unmasked_weights():
    layer = dropconnect_layer(p=0.5).train()
    x = torch.randn(1, 12).expand(20000, 12)
    mean_train = layer(x).mean(0)
    layer.eval()
    exact = layer.linear(x[:1])[0]
    assert torch.equal(layer(x[:3]), layer.linear(x[:3]))  # inference=mean: a(Wx + b), deterministic
    spread = (layer.linear.weight ** 2 * x[0] ** 2).sum(-1).sqrt()  # ~ std of one masked output
    assert ((mean_train - exact).abs() < 5 * spread / math.sqrt(20000)).all()


def test_dropconnect_moment_matching_approximates_the_mc_average():
    kwargs = dict(p=0.5, n_in=32, n_out=6, activation=nn.ReLU(), seed=3)
    mc = dropconnect_layer(per_example=True, **kwargs).train()
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    mc_average = mc(x.expand(20000, 32)).mean(0)  # E[relu(u)] over weight masks
    mm = dropconnect_layer(inference="moment_matching", mc_samples=20000, **kwargs).eval()
    approx = mm(x)[0]
    plain = mm.linear(x).relu()[0]  # weight scaling ignores the variance: E[relu(u)] >= relu(E[u])
    scale = mc_average.abs().max()
    assert (approx - mc_average).abs().max() < 0.05 * scale
    assert (approx - mc_average).abs().max() < (plain - mc_average).abs().max()


# -- Gaussian noise and standout ----------------------------------------------------------------------
@pytest.mark.parametrize("override, variance", [("p=0.3", 0.3 / 0.7), ("sigma=0.5", 0.25)])
def test_gaussian_noise_has_mean_1_and_the_dropout_matched_variance(override, variance):
    regs = regs_for("gaussian", override)
    model, _ = replicas_of(regs, mlp())
    layers = of_type(model.module, GaussianNoise)
    assert len(layers) == 2 and all(layer.sigma == pytest.approx(math.sqrt(variance)) for layer in layers)
    layer = GaussianNoise(layers[0].sigma, generators()).train()
    x = torch.ones(4000, 50, requires_grad=True)
    y = layer(x)
    n = x.numel()
    assert abs(y.mean().item() - 1) < 4 * math.sqrt(variance / n)
    assert abs(y.var().item() / variance - 1) < 4 * math.sqrt(2 / n)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, y.detach())  # d(x * e)/dx = e: the noise is in the graph as a factor
    assert torch.equal(layer.eval()(x), x)
    if override.startswith("sigma"):
        assert regs.summary()["p"] == pytest.approx(0.25 / 1.25)  # the equivalent dropout rate


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (2.0, -1.0)])
def test_standout_keeps_units_with_probability_sigmoid_alpha_a_plus_beta(alpha, beta):
    torch.manual_seed(0)
    linear = nn.Linear(8, 5)
    layer = StandoutLinear(linear, nn.Identity(), alpha, beta, generators()).train()
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    n = 20000
    y = layer(x.expand(n, 8))
    a = linear(x)[0]
    pi = torch.sigmoid(alpha * a + beta)
    kept = (y != 0).float().mean(0)
    assert ((kept - pi).abs() < 4 * (pi * (1 - pi) / n).sqrt() + 1e-3).all()
    assert torch.allclose(y[y != 0], a.expand(n, -1)[y != 0])  # kept units are not rescaled
    layer.eval()
    torch.testing.assert_close(layer(x)[0], pi * a)  # evaluation: the expected mask
    layer.train()
    layer(x.expand(64, 8)).sum().backward()
    assert linear.weight.grad.abs().sum() > 0


# -- penalties ---------------------------------------------------------------------------------------
def test_l1_l2_penalties_per_replica_over_weights_only():
    regs = regs_for("none")
    model, _ = replicas_of(regs, mlp(), seeds=(0, 1))
    names = ["1.weight", "3.weight", "5.weight"]
    assert weight_names(model.module) == names
    (l1,), (l2,) = regs_for("l1", "lam=0.01").methods, regs_for("l2", "lam=0.01").methods
    l1.bind(model)
    l2.bind(model)
    weights = [model.stacked(name) for name in names]
    torch.testing.assert_close(l1.penalty(model), 0.01 * sum(w.abs().flatten(1).sum(1) for w in weights))
    torch.testing.assert_close(l2.penalty(model), 0.005 * sum((w ** 2).flatten(1).sum(1) for w in weights))
    assert l1.penalty(model).shape == (2,)
    before = l2.penalty(model)
    with torch.no_grad():
        for name in ("1.bias", "3.bias", "5.bias"):
            model.stacked(name).add_(5.0)  # biases are not penalized
        model.stacked("5.weight")[1].mul_(2.0)  # replica 1 only
    after = l2.penalty(model)
    assert after[0] == before[0] and after[1] > before[1]


def _decay_weights_only(run, optim, **kwargs):
    weights = [p for n, p in run.model.params.items() if n.endswith("weight")]
    others = [p for n, p in run.model.params.items() if not n.endswith("weight")]
    optimizer = optim([{"params": weights}, {"params": others, "weight_decay": 0.0}], **kwargs)
    return dataclasses.replace(run, optimizer=optimizer)


def test_l2_equals_coupled_weight_decay_but_not_adamw(npz):
    lam = 0.05
    sgd = ("optimizer=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9")
    l2_sgd = run_for(npz, "l2", f"lam={lam}", optimizer=sgd)
    wd_sgd = _decay_weights_only(run_for(npz, "none"), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=lam)
    fit(l2_sgd)
    fit(wd_sgd)
    for a, b in zip(l2_sgd.model.parameters(), wd_sgd.model.parameters()):
        torch.testing.assert_close(a, b)
    l2_adam = run_for(npz, "l2", f"lam={lam}", optimizer=("optimizer=adam", "optimizer.lr=0.01"))
    adamw = _decay_weights_only(run_for(npz, "none"), torch.optim.AdamW, lr=0.01, weight_decay=lam)
    fit(l2_adam)
    fit(adamw)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(l2_adam.model.parameters(),
                                                                    adamw.model.parameters()))


# -- max-norm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [MLP_SETTINGS, CNN_SETTINGS], ids=["mlp", "cnn"])
def test_maxnorm_leaves_no_hidden_unit_above_c(npz, model):
    c = 0.3
    run = run_for(npz, "maxnorm", f"c={c}", model=model, optimizer=("optimizer=sgd", "optimizer.lr=5.0"))
    fit(run, epochs=1)
    hidden = weight_names(run.model.module, hidden_only=True)
    assert len(hidden) == 2
    norms = torch.cat([run.model.stacked(name).flatten(2).norm(dim=2).flatten() for name in hidden])
    assert norms.max() <= c * (1 + 1e-5)
    assert (norms > 0.99 * c).any()  # the constraint was active
    head = [name for name in weight_names(run.model.module) if name not in hidden]
    assert run.model.stacked(head[0]).flatten(2).norm(dim=2).max() > c  # the output layer is not constrained


def test_maxnorm_projects_only_rows_above_c():
    regs = regs_for("maxnorm", "c=1.0")
    model, _ = replicas_of(regs, mlp(hidden=(3,)))
    w = model.stacked("1.weight")
    with torch.no_grad():
        w.copy_(torch.tensor([[[3.0] + [0.0] * 11, [0.5] + [0.0] * 11, [0.0, 4.0] + [0.0] * 10]]))
    regs.after_step(model)
    assert w[0, :, :2].tolist() == [[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]]


def test_maxnorm_needs_hidden_layers(npz):
    with pytest.raises(UserError, match="regularizer maxnorm has no place to act"):
        run_for(npz, "maxnorm", model=("model=logreg",))


# -- batch normalization ---------------------------------------------------------------------------------
def test_batchnorm_train_and_eval_statistics_are_per_replica():
    """Each replica's layer is a plain nn.BatchNorm1d on that replica's batch."""
    R, C = 3, 5
    regs = regs_for("batchnorm")
    model, _ = replicas_of(regs, mlp(hidden=(C,)), seeds=(0, 1, 2))
    with torch.no_grad():
        model.stacked("1.1.weight").copy_(torch.rand(R, C) + 0.5)
        model.stacked("1.1.bias").copy_(torch.randn(R, C))
    p = {name: model.stacked(name) for name in model.params}
    refs = [nn.BatchNorm1d(C) for _ in range(R)]
    with torch.no_grad():
        for r, ref in enumerate(refs):
            ref.weight.copy_(p["1.1.weight"][r])
            ref.bias.copy_(p["1.1.bias"][r])

    def reference(r, x):
        h = refs[r](F.linear(x.flatten(1), p["1.0.weight"][r], p["1.0.bias"][r]))
        return F.linear(h.relu(), p["3.weight"][r], p["3.bias"][r])

    for step in range(3):  # batch statistics in training, running statistics updated per replica
        x, _ = batch(3 * 16, seed=step)
        x = x.view(R, 16, *IN_SHAPE) * torch.arange(1, R + 1).view(R, 1, 1, 1) + 2
        model.train()
        logits = model(x)
        for r, ref in enumerate(refs):
            torch.testing.assert_close(logits[r], reference(r, x[r]), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.buffers["1.1.running_mean"][r], ref.running_mean)
            torch.testing.assert_close(model.buffers["1.1.running_var"][r], ref.running_var)
    assert not torch.equal(model.buffers["1.1.running_var"][0], model.buffers["1.1.running_var"][1])
    model.eval()
    for ref in refs:
        ref.eval()
    x, _ = batch(7)
    logits = model.shared(x)
    for r in range(R):  # running statistics in evaluation
        torch.testing.assert_close(logits[r], reference(r, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.shared(x[:1]), logits[:, :1])  # an example's output does not depend on its batch
    model.train()
    x, y = batch(3 * 8, seed=9)
    regs.loss(model, x.view(R, 8, *IN_SHAPE), y.view(R, 8)).sum().backward()
    assert p["1.1.weight"].grad.abs().sum(1).gt(0).all() and p["1.1.bias"].grad.abs().sum(1).gt(0).all()


def test_batchnorm_sits_between_the_hidden_layer_and_the_activation():
    model, _ = replicas_of(regs_for("[batchnorm,dropout]"), mlp(hidden=(8, 8)))
    net = model.module
    for i in (1, 3):
        assert type(net[i][0]) is nn.Linear and isinstance(net[i][1], nn.BatchNorm1d) and net[i][1].num_features == 8
        assert [type(m) for m in net[i + 1]] == [nn.ReLU, DropoutLayer]
    assert type(net[5]) is nn.Linear  # not before the head
    model, _ = replicas_of(regs_for("batchnorm"), lambda: CNN((1, 6, 6), CLASSES, channels=[4], kernel_sizes=[3],
                                                              strides=[2], paddings=[1], hidden=[3]))
    net = model.module
    assert [type(m) for m in net[0]] == [nn.Conv2d, nn.BatchNorm2d] and net[0][1].num_features == 4
    assert type(net[3][0]) is nn.Linear and isinstance(net[3][1], nn.BatchNorm1d) and net[3][1].num_features == 3


@pytest.mark.parametrize("choice", ["[dropout,batchnorm]", "[mc_dropout,batchnorm]", "[dropout,standout]"])
def test_the_order_of_methods_in_a_combination_does_not_matter(choice):
    replicas_of(regs_for(choice), mlp())


def test_batchnorm_on_a_linear_layer_over_tokens(npz):
    transformer = ("model=transformer", "model.d_model=8", "model.heads=2", "model.layers=1", "model.ff_dim=16")
    losses, _ = fit(run_for(npz, "batchnorm", model=transformer), epochs=1)
    assert torch.isfinite(losses).all()


# -- MC dropout ------------------------------------------------------------------------------------------
def test_mc_dropout_predict_averages_probabilities_of_stochastic_passes(npz):
    run = run_for(npz, "[batchnorm,mc_dropout]", "samples=7", "p=0.5", seeds=(0, 1))
    assert run.regs.name == "batchnorm+mc_dropout"
    fit(run, epochs=1)
    model, regs, gens = run.model, run.regs, run.generators
    model.eval()
    x = run.data.x_test[:10]
    running = model.buffers["1.1.running_mean"].clone()
    state = gens.state()
    logp = regs.predict(model, x)
    assert logp.shape == (2, 10, CLASSES)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 10))
    assert torch.equal(model.buffers["1.1.running_mean"], running)  # BatchNorm stayed in eval mode
    assert not any(m.training for m in model.module.modules())  # and every layer is back in eval mode
    assert (logp - F.log_softmax(model.shared(x), -1)).abs().max() > 1e-3  # not the deterministic pass
    gens.load_state(state)  # = log of the mean of 7 softmaxes with dropout on
    for m in model.module.modules():
        if getattr(m, "stochastic", False):
            m.train()
    probs = torch.stack([F.softmax(model(x.expand(2, *x.shape)), -1) for _ in range(7)]).mean(0)
    torch.testing.assert_close(logp, probs.log())


# -- parameters, combinations, labels -------------------------------------------------------------------
@pytest.mark.parametrize("name, override, key", [
    ("dropout", "p=1.0", "regularizer.p"), ("dropout", "input_p=-0.1", "regularizer.input_p"),
    ("dropout", "impl=cuda", "regularizer.impl"), ("dropout", "p=[0.1,0.2,0.3]", "regularizer.p"),
    ("dropout_scaled", "p=1.5", "regularizer.p"),
    ("rdrop", "alpha=-1", "regularizer.alpha"), ("rdrop", "kl_reduction=mean", "regularizer.kl_reduction"),
    ("multisample", "k=0", "regularizer.k"), ("multisample", "p=1", "regularizer.p"),
    ("dropconnect", "p=1", "regularizer.p"), ("dropconnect", "per_example=maybe", "regularizer.per_example"),
    ("dropconnect", "inference=sampling", "regularizer.inference"),
    ("dropconnect", "mc_samples=0", "regularizer.mc_samples"),
    ("gaussian", "p=1", "regularizer.p"), ("gaussian", "sigma=-0.5", "regularizer.sigma"),
    ("standout", "alpha=nan", "regularizer.alpha"), ("standout", "beta=abc", "regularizer.beta"),
    ("l1", "lam=-1", "regularizer.lam"), ("l2", "lam=inf", "regularizer.lam"), ("maxnorm", "c=0", "regularizer.c"),
    ("batchnorm", "momentum=2", "regularizer.momentum"), ("batchnorm", "eps=0", "regularizer.eps"),
    ("mc_dropout", "samples=0", "regularizer.samples"),
])
def test_bad_parameters_are_one_line_user_errors(name, override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as error:
        replicas_of(regs_for(name, override), mlp())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("choice, label", [("[dropout,maxnorm]", "dropout+maxnorm"),
                                           ("[batchnorm,dropout]", "batchnorm+dropout"),
                                           ("[dropout,l2]", "dropout+l2"), ("rdrop", "rdrop"),
                                           ("[rdrop,maxnorm]", "rdrop+maxnorm"), ("mc_dropout", "mc_dropout"),
                                           ("[batchnorm,mc_dropout]", "batchnorm+mc_dropout"),
                                           ("[standout,dropout]", "standout+dropout"),
                                           ("[dropconnect,l1,maxnorm]", "dropconnect+l1+maxnorm")])
def test_combinations_train_together(npz, choice, label):
    run = run_for(npz, choice)
    assert run.regs.name == label
    losses, metrics = fit(run, epochs=1)
    assert torch.isfinite(losses).all() and all(math.isfinite(v) for v in metrics["loss"])


@pytest.mark.parametrize("choice", ["[dropout,gaussian]", "[dropout,dropout_scaled]", "[dropout,multisample]",
                                    "[rdrop,multisample]", "[dropconnect,standout]", "[dropconnect,batchnorm]",
                                    "[standout,batchnorm]"])
def test_conflicting_combinations_are_rejected(choice):
    with pytest.raises(UserError, match="both act at the same place") as error:
        regs_for(choice)
    assert "\n" not in str(error.value)


# -- methods learn, through the command line --------------------------------------------------------------
@pytest.mark.slow
def test_every_regularizer_trains_through_the_cli(npz, tmp_path):
    names = [m for m in METHODS if m != "none"] + ["[dropout,maxnorm]"]
    proc = run_cli("train", "-m", f"regularizer={','.join(names)}", "dataset=npz", f"dataset.path={npz}",
                   "dataset.val_fraction=0", "model.hidden=[32]", "optimizer.lr=0.01", "epochs=5",
                   f"batch_size={BATCH}", "threads=1", "progress=false", f"results_dir={tmp_path}",
                   f"hydra.sweep.dir={tmp_path}/sweep", timeout=300)
    assert proc.returncode == 0, proc.stderr
    summaries = {row["regularizer"]: row for path in (tmp_path / "sweep").rglob("summary.csv")
                 for row in read_csv(path)}
    assert set(summaries) == {name.strip("[]").replace(",", "+") for name in names}
    for name, summary in summaries.items():
        assert summary["status"] == "ok", summary["error"]
        assert (summary["p"] != "") == (name in WITH_P or name == "dropout+maxnorm"), name
        assert float(summary["test_acc"]) > 0.5, (name, summary["test_acc"])


@pytest.mark.parametrize("overrides, message", [
    (["regularizer=[dropout,gaussian]"], "regularizers dropout and gaussian both act at the same place"),
    (["regularizer=dropout", "model=logreg"], "regularizer dropout has no place to act in model logreg"),
])
def test_a_method_without_a_place_fails_cleanly_through_the_cli(npz, tmp_path, overrides, message):
    proc = run_cli("train", *overrides, "dataset=npz", f"dataset.path={npz}", "epochs=1", "threads=1",
                   "progress=false", f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
