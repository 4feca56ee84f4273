"""The regularizer library: each method's defining property, checked on tiny tensors.

Statistical tests use fixed seeds and tolerances of several standard errors, so they are both
deterministic and meaningful (a wrong scaling or rate is off by far more than the tolerance).
The last tests train every method end to end through the CLI.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch import nn

from conftest import read_csv, run_cli
from dropbench.config import UserError
from dropbench.models import CNN, MLP
from dropbench.regularizers import Regularizers, build_regularizers, cross_entropy
from dropbench.regularizers.batchnorm import ReplicaBatchNorm
from dropbench.regularizers.dropconnect import DropConnectLinear
from dropbench.regularizers.dropout import DropoutLayer
from dropbench.regularizers.dropout_scaled import ScaledDropoutLayer
from dropbench.regularizers.rdrop import symmetric_kl
from dropbench.regularizers.standout import StandoutLinear
from dropbench.replicas import ReplicaLinear, ReplicaRNG

CPU = torch.device("cpu")
METHODS = ["none", "dropout", "dropout_scaled", "rdrop", "multisample", "dropconnect", "gaussian", "standout",
           "l1", "l2", "maxnorm", "batchnorm", "mc_dropout"]
WITH_P = {"dropout", "dropout_scaled", "rdrop", "multisample", "dropconnect", "gaussian", "mc_dropout"}
IN_SHAPE, CLASSES = (1, 12), 4


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def regularizer_config(choice: str, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="dropbench.conf"):
        cfg = compose("config", overrides=[f"regularizer={choice}", *(f"regularizer.{o}" for o in overrides)])
    return cfg.regularizer


def regs_for(choice: str, *overrides: str) -> Regularizers:
    """Fresh Regularizers of `regularizer=choice` plus `regularizer.KEY=VALUE` overrides, via the YAMLs."""
    return build_regularizers(regularizer_config(choice, *overrides))


def make_model(regs, seeds=(0,), hidden=(16, 16), kind=MLP, **kwargs):
    model = kind(IN_SHAPE, CLASSES, regs, ReplicaRNG(list(seeds), CPU), hidden=list(hidden), **kwargs)
    regs.check_model(model)
    return model


def data(n=24, seed=123):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *IN_SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def train(regs, seeds=(0,), steps=3, lr=0.1, batch=8, optimizer=None, **model_kwargs):
    """A few SGD steps with the training loop's recipe on fixed batches (same for every replica)."""
    model = make_model(regs, seeds, **model_kwargs)
    opt = (optimizer or sgd(lr=lr))(model)
    x, y = data()
    R, losses = len(seeds), []
    model.train()
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x)
        loss = regs.loss(model, x[idx].expand(R, *x[idx].shape), y[idx].expand(R, -1))
        assert loss.shape == (R,)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        regs.after_step(model)
        losses.append(loss.detach())
    model.eval()
    with torch.no_grad():
        logp = regs.predict(model, x.expand(R, *x.shape))
    return model, torch.stack(losses), logp


def sgd(**kwargs):
    return lambda model: torch.optim.SGD(model.parameters(), **kwargs)


def rng(seed=0):
    return ReplicaRNG([seed], CPU)


# -- every method: builds, records p, is reproducible per replica ---------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_every_method_builds_from_its_yaml_and_records_its_parameters(name):
    regs = regs_for(name)
    assert regs.name == name
    make_model(regs)
    summary = regs.summary()
    assert ("p" in summary) == (name in WITH_P)
    for method in regs.methods:
        module = __import__(type(method).__module__, fromlist=["_"])
        assert module.__doc__ and any(str(year) in module.__doc__ for year in range(1987, 2025)), module.__name__


@pytest.mark.parametrize("name", [m for m in METHODS if m != "none"])
@pytest.mark.parametrize("hidden", [(16, 16), (13, 7)])
def test_replica_k_reproduces_the_single_run_with_seed_k(name, hidden):
    """Bit for bit, also at odd widths where a batched matmul would round differently."""
    model, losses, logp = train(regs_for(name), seeds=(3, 4, 5), hidden=hidden)
    for k, seed in enumerate((3, 4, 5)):
        alone, alone_losses, alone_logp = train(regs_for(name), seeds=(seed,), hidden=hidden)
        assert torch.equal(losses[:, k], alone_losses[:, 0])
        assert torch.equal(logp[k], alone_logp[0])
        assert all(torch.equal(a[k], b[0]) for a, b in zip(model.parameters(), alone.parameters()))


# Settings that switch each method off: the run must be the unregularized one, step for step.
SWITCHED_OFF = [
    ("dropout", ["p=0"]), ("dropout", ["p=[0,0]"]), ("dropout_scaled", ["p=0"]), ("rdrop", ["p=0", "alpha=0"]),
    ("multisample", ["p=0"]), ("dropconnect", ["p=0"]), ("dropconnect", ["p=0", "per_example=false"]),
    ("gaussian", ["p=0"]), ("gaussian", ["sigma=0"]), ("standout", ["alpha=0", "beta=100"]),
    ("l1", ["lam=0"]), ("l2", ["lam=0"]), ("maxnorm", ["c=1e9"]), ("mc_dropout", ["p=0", "samples=3"]),
]


@pytest.mark.parametrize("name, overrides", SWITCHED_OFF)
def test_switched_off_method_reproduces_the_unregularized_run_exactly(name, overrides):
    base_model, base_losses, base_logp = train(regs_for("none"))
    model, losses, logp = train(regs_for(name, *overrides))
    assert torch.equal(losses, base_losses)
    params, base_params = list(model.parameters()), list(base_model.parameters())
    assert len(params) == len(base_params)
    assert all(torch.equal(a, b) for a, b in zip(params, base_params))
    if name == "mc_dropout":  # log of a mean of identical softmaxes: equal up to rounding
        torch.testing.assert_close(logp, base_logp)
    else:
        assert torch.equal(logp, base_logp)


# -- dropout and its non-inverted variant -------------------------------------------------------
def test_inverted_dropout_keeps_the_mean_and_drops_a_fraction_p():
    p, x = 0.3, torch.full((1, 4000, 50), 2.0)
    y = DropoutLayer(p, rng()).train()(x)
    n = x.numel()
    assert abs((y == 0).float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(y[y != 0], torch.tensor(2.0 / (1 - p)))
    assert abs(y.mean().item() - 2.0) < 4 * 2.0 * math.sqrt(p / (1 - p) / n)


def test_own_and_torch_dropout_agree_in_distribution():
    p, x = 0.4, torch.randn(1, 2000, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    outs = {impl: DropoutLayer(p, rng(), impl).train()(x) for impl in ("own", "torch")}
    n = x.numel()
    for y in outs.values():
        kept = y != 0
        assert abs(1 - kept.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))  # same scaling of the kept units
        zeros_per_example = (~kept).float().sum(-1).flatten()  # Binomial(64, p) in both
        assert abs(zeros_per_example.mean().item() - 64 * p) < 4 * math.sqrt(64 * p * (1 - p) / 2000)
        assert abs(zeros_per_example.var().item() / (64 * p * (1 - p)) - 1) < 0.15
    assert not torch.equal(outs["own"], outs["torch"])  # different streams, same law


@pytest.mark.parametrize("layer", [DropoutLayer, ScaledDropoutLayer])
def test_dropout_layers_in_eval_are_deterministic(layer):
    x = torch.randn(2, 5, 7)
    module = layer(0.5, ReplicaRNG([0, 1], CPU)).eval()
    scale = 1.0 if layer is DropoutLayer else 0.5
    assert torch.equal(module(x), x * scale) and torch.equal(module(x), module(x))


def test_scaled_dropout_does_not_rescale_in_training_and_scales_by_1_minus_p_in_eval():
    p, x = 0.25, torch.full((1, 4000, 25), 3.0)
    layer = ScaledDropoutLayer(p, rng())
    y = layer.train()(x)
    assert set(y.unique().tolist()) == {0.0, 3.0}
    assert abs(y.mean().item() - 3.0 * (1 - p)) < 4 * 3.0 * math.sqrt(p * (1 - p) / x.numel())
    assert torch.equal(layer.eval()(x), x * (1 - p))  # eval = E[train output]


def test_dropout_p_per_hidden_layer():
    model = make_model(regs_for("dropout", "p=[0.2,0.5]"))
    assert [b.after.p for b in model.blocks] == [0.2, 0.5]
    with pytest.raises(UserError, match="one p per hidden layer"):
        make_model(regs_for("dropout", "p=[0.2,0.5,0.1]"))


def test_dropout_gradient_is_the_mask():
    x = torch.randn(1, 50, 20, requires_grad=True)
    y = DropoutLayer(0.5, rng()).train()(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, (y.detach() != 0).float() * 2.0)


# -- R-Drop ----------------------------------------------------------------------------------------
def official_compute_kl_loss(p, q):
    """github.com/dropreg/R-Drop README (commit 9dcc830), for one replica's logits [B, C]."""
    p_loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="none")
    q_loss = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="none")
    return (p_loss.sum() + q_loss.sum()) / 2


def test_rdrop_kl_is_zero_for_identical_passes_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 6, 5, generator=g, dtype=torch.float64), torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    assert torch.equal(symmetric_kl(z1, z1), torch.zeros(3, dtype=torch.float64))
    kl = symmetric_kl(z1, z2, "sum")
    assert kl.shape == (3,)
    p1, p2 = z1.softmax(-1), z2.softmax(-1)
    direct = 0.5 * ((p1 * (p1 / p2).log()).sum((1, 2)) + (p2 * (p2 / p1).log()).sum((1, 2)))
    torch.testing.assert_close(kl, direct)
    torch.testing.assert_close(kl, torch.stack([official_compute_kl_loss(a, b) for a, b in zip(z1, z2)]))
    torch.testing.assert_close(symmetric_kl(z1, z2), kl / 6)  # batchmean, the default


def test_rdrop_loss_is_mean_ce_of_two_passes_plus_alpha_kl():
    regs = regs_for("rdrop", "alpha=0.7", "p=0.3")
    model = make_model(regs, seeds=(0, 1)).train()
    x, y = data(10)
    x, y = x.expand(2, *x.shape), y.expand(2, -1)
    generators = model.blocks[0].after.rng
    state = generators.state()
    loss = regs.loss(model, x, y)
    generators.load_state(state)  # replay the same masks by hand
    z1, z2 = model(x), model(x)
    assert not torch.equal(z1, z2)  # independent masks in the two passes
    expected = (cross_entropy(z1, y) + cross_entropy(z2, y)) / 2 + 0.7 * symmetric_kl(z1, z2)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["rdrop", "mc_dropout"])
def test_rdrop_and_mc_dropout_need_dropout_layers(name):
    with pytest.raises(UserError, match="dropout has no place to act in model logreg"):
        make_model(regs_for(name), hidden=())
    alone = Regularizers([m for m in regs_for(name).methods if m.name == name])  # without its dropout
    with pytest.raises(UserError, match=f"regularizer {name} needs dropout-like layers"):
        make_model(alone)


# -- multi-sample dropout ----------------------------------------------------------------------------
def test_multisample_with_one_sample_is_dropout_step_for_step():
    _, losses, logp = train(regs_for("multisample", "k=1", "p=0.4"))
    _, base_losses, base_logp = train(regs_for("dropout", "p=0.4"))
    assert torch.equal(losses, base_losses) and torch.equal(logp, base_logp)


def test_multisample_loss_averages_k_masked_copies_through_the_shared_head():
    k, p = 5, 0.5
    regs = regs_for("multisample", f"k={k}", f"p={p}")
    model = make_model(regs, seeds=(0, 1), hidden=(16, 16)).train()
    x, y = data(6)
    x, y = x.expand(2, *x.shape), y.expand(2, -1)
    generators = regs.methods[0].rng
    state = generators.state()
    loss = regs.loss(model, x, y)
    generators.load_state(state)
    h = model.features(x)  # the first hidden layer's ordinary dropout draws its mask here
    masks = generators.keep_mask((k, *h.shape[1:]), 1 - p)
    per_sample = torch.stack([cross_entropy(model.head(h * masks[:, i] / (1 - p)), y) for i in range(k)])
    torch.testing.assert_close(loss, per_sample.mean(0))
    assert per_sample.std(0).min() > 0  # the samples really differ
    # evaluation: one deterministic pass, no dropout on the last hidden layer
    model.eval()
    torch.testing.assert_close(regs.predict(model, x), F.log_softmax(model.head(model.features(x)), -1))
    assert torch.equal(regs.predict(model, x), regs.predict(model, x))


def test_multisample_needs_a_hidden_layer():
    with pytest.raises(UserError, match="no place to act"):
        make_model(regs_for("multisample"), hidden=())


# -- DropConnect -------------------------------------------------------------------------------------
def dropconnect_layer(p=0.5, per_example=True, inference="mean", mc_samples=50, seed=0, n_in=12, n_out=6,
                      activation=None):
    linear = ReplicaLinear(1, n_in, n_out)
    linear.reset_parameters("default", 0.0, [torch.Generator().manual_seed(seed)])
    return DropConnectLinear(linear, activation or nn.Identity(), p, rng(seed), per_example, inference, mc_samples)


def test_dropconnect_masks_differ_per_example_or_are_shared_per_batch():
    x = torch.randn(1, 1, 12).expand(1, 64, 12)  # 64 copies of one example
    y = dropconnect_layer(per_example=True).train()(x)
    assert (y - y[:, :1]).abs().amax(-1).gt(0).float().mean() > 0.9  # the copies see different masks
    layer = dropconnect_layer(per_example=False).train()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y1[:, :1].expand_as(y1))  # one mask for the whole batch...
    assert not torch.equal(y1, y2)  # ...and a new one at the next step


def test_dropconnect_masks_weights_with_inverted_scaling():
    p = 0.5
    layer = dropconnect_layer(p=p, per_example=False).train()
    x = torch.randn(1, 4, 12)
    state = layer.rng.state()
    y = layer(x)
    layer.rng.load_state(state)
    mask = layer.rng.keep_mask((6, 12), 1 - p)
    w, b = layer.linear.weight, layer.linear.bias
    torch.testing.assert_close(y, torch.bmm(x, (w * mask / (1 - p)).transpose(1, 2)) + b.unsqueeze(1))
    # gradients reach exactly the kept weights
    y.sum().backward()
    assert torch.equal(w.grad != 0, (mask != 0) & (x.sum(1, keepdim=True) != 0).expand_as(mask))


def test_dropconnect_is_unbiased_and_evaluates_with_the_unmasked_weights():
    layer = dropconnect_layer(p=0.5).train()
    x = torch.randn(1, 1, 12).expand(1, 20000, 12)
    mean_train = layer(x).mean(1)
    layer.eval()
    exact = layer.linear(x[:, :1])[:, 0]
    assert torch.equal(layer(x[:, :3]), layer.linear(x[:, :3]))  # inference=mean: a(Wx + b), deterministic
    spread = (layer.linear.weight ** 2 * x[0, 0] ** 2).sum(-1).sqrt()  # ~ std of one masked output
    assert ((mean_train - exact).abs() < 5 * spread / math.sqrt(20000)).all()


def test_dropconnect_moment_matching_approximates_the_mc_average():
    kwargs = dict(p=0.5, n_in=32, n_out=6, activation=nn.ReLU(), seed=3)
    mc = dropconnect_layer(per_example=True, **kwargs).train()
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(4))
    mc_average = mc(x.expand(1, 20000, 32)).mean(1)  # E[relu(u)] over weight masks
    mm = dropconnect_layer(inference="moment_matching", mc_samples=20000, **kwargs).eval()
    approx = mm(x)[:, 0]
    plain = mm.linear(x).relu()[:, 0]  # weight scaling ignores the variance: E[relu(u)] >= relu(E[u])
    scale = mc_average.abs().max()
    assert (approx - mc_average).abs().max() < 0.05 * scale
    assert (approx - mc_average).abs().max() < (plain - mc_average).abs().max()


def test_dropconnect_needs_hidden_linear_layers_and_excludes_batchnorm():
    with pytest.raises(UserError, match="dropconnect has no place to act in model cnn"):
        make_model(regs_for("dropconnect"), kind=CNN, hidden=(), channels=[4], kernel_sizes=[3], strides=[2],
                   paddings=[1])
    make_model(regs_for("dropconnect"), kind=CNN, hidden=(8,), channels=[4], kernel_sizes=[3], strides=[2],
               paddings=[1])
    with pytest.raises(UserError, match="cannot be combined with a normalization"):
        make_model(regs_for("[dropconnect,batchnorm]"))


# -- Gaussian noise and standout ----------------------------------------------------------------------
@pytest.mark.parametrize("override, variance", [("p=0.3", 0.3 / 0.7), ("sigma=0.5", 0.25)])
def test_gaussian_noise_has_mean_1_and_the_dropout_matched_variance(override, variance):
    (method,) = regs_for("gaussian", override).methods
    layer = method.hidden_layer(0, 1, (50,), rng()).train()
    x = torch.ones(1, 4000, 50, requires_grad=True)
    y = layer(x)
    n = x.numel()
    assert abs(y.mean().item() - 1) < 4 * math.sqrt(variance / n)
    assert abs(y.var().item() / variance - 1) < 4 * math.sqrt(2 / n)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, y.detach())  # d(x * e)/dx = e: the noise is in the graph as a factor
    assert torch.equal(layer.eval()(x), x)
    if override.startswith("sigma"):
        assert method.summary()["p"] == pytest.approx(0.25 / 1.25)  # the equivalent dropout rate


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (2.0, -1.0)])
def test_standout_keeps_units_with_probability_sigmoid_alpha_a_plus_beta(alpha, beta):
    linear = ReplicaLinear(1, 8, 5)
    linear.reset_parameters("default", 0.0, [torch.Generator().manual_seed(0)])
    layer = StandoutLinear(linear, nn.Identity(), alpha, beta, rng()).train()
    x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(1))
    n = 20000
    y = layer(x.expand(1, n, 8))
    a = linear(x)[0, 0]
    pi = torch.sigmoid(alpha * a + beta)
    kept = (y[0] != 0).float().mean(0)
    assert ((kept - pi).abs() < 4 * (pi * (1 - pi) / n).sqrt() + 1e-3).all()
    assert torch.allclose(y[0][y[0] != 0], a.expand(n, -1)[y[0] != 0])  # kept units are not rescaled
    layer.eval()
    torch.testing.assert_close(layer(x)[0, 0], pi * a)  # evaluation: the expected mask
    layer.train()
    layer(x.expand(1, 64, 8)).sum().backward()
    assert linear.weight.grad.abs().sum() > 0


# -- penalties ---------------------------------------------------------------------------------------
def test_l1_l2_penalties_per_replica_over_weights_only():
    model = make_model(regs_for("none"), seeds=(0, 1))
    weights = [m.weight for m in model.modules() if isinstance(m, ReplicaLinear)]
    (l1,), (l2,) = regs_for("l1", "lam=0.01").methods, regs_for("l2", "lam=0.01").methods
    torch.testing.assert_close(l1.penalty(model), 0.01 * sum(w.abs().flatten(1).sum(1) for w in weights))
    torch.testing.assert_close(l2.penalty(model), 0.005 * sum((w ** 2).flatten(1).sum(1) for w in weights))
    assert l1.penalty(model).shape == (2,)
    before = l2.penalty(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ReplicaLinear):
                m.bias.add_(5.0)  # biases are not penalized
        model.head.weight[1].mul_(2.0)  # replica 1 only
    after = l2.penalty(model)
    assert after[0] == before[0] and after[1] > before[1]


def _decay_weights_only(optim, **kwargs):
    def make(model):
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        return optim([{"params": weights}, {"params": others, "weight_decay": 0.0}], **kwargs)
    return make


def test_l2_equals_coupled_weight_decay_but_not_adamw():
    lam = 0.05
    l2_sgd, _, _ = train(regs_for("l2", f"lam={lam}"), optimizer=sgd(lr=0.1, momentum=0.9))
    wd_sgd, _, _ = train(regs_for("none"), optimizer=_decay_weights_only(torch.optim.SGD, lr=0.1, momentum=0.9,
                                                                         weight_decay=lam))
    for a, b in zip(l2_sgd.parameters(), wd_sgd.parameters()):
        torch.testing.assert_close(a, b)
    l2_adam, _, _ = train(regs_for("l2", f"lam={lam}"), optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=0.01))
    adamw, _, _ = train(regs_for("none"), optimizer=_decay_weights_only(torch.optim.AdamW, lr=0.01, weight_decay=lam))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(l2_adam.parameters(), adamw.parameters()))


# -- max-norm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, kwargs", [(MLP, {"hidden": (16, 16)}),
                                          (CNN, {"hidden": (), "channels": [4, 4], "kernel_sizes": [3, 3],
                                                 "strides": [1, 1], "paddings": [1, 1]})])
def test_maxnorm_leaves_no_hidden_unit_above_c(kind, kwargs):
    c = 0.3
    model, _, _ = train(regs_for("maxnorm", f"c={c}"), lr=5.0, kind=kind, **kwargs)
    hidden = [b.layer.weight for b in model.blocks if hasattr(b, "layer")]
    norms = torch.cat([w.flatten(2).norm(dim=2).flatten() for w in hidden])
    assert norms.max() <= c * (1 + 1e-5)
    assert (norms > 0.99 * c).any()  # the constraint was active
    assert model.head.weight.flatten(2).norm(dim=2).max() > c  # the output layer is not constrained


def test_maxnorm_projects_only_rows_above_c():
    (method,) = regs_for("maxnorm", "c=1.0").methods
    model = make_model(regs_for("none"), hidden=(3,))
    w = model.blocks[0].layer.weight
    with torch.no_grad():
        w.copy_(torch.tensor([[[3.0] + [0.0] * 11, [0.5] + [0.0] * 11, [0.0, 4.0] + [0.0] * 10]]))
    method.after_step(model)
    assert w[0, :, :2].tolist() == [[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]]


def test_maxnorm_needs_hidden_layers():
    with pytest.raises(UserError, match="maxnorm"):
        make_model(regs_for("maxnorm"), hidden=())


# -- batch normalization ---------------------------------------------------------------------------------
def test_batchnorm_matches_torch_per_replica_and_replicas_do_not_mix():
    R, C = 3, 4
    bn = ReplicaBatchNorm(R, C).train()
    refs = [nn.BatchNorm1d(C).train() for _ in range(R)]
    with torch.no_grad():
        bn.weight.copy_(torch.rand(R, C) + 0.5)
        bn.bias.copy_(torch.randn(R, C))
        for r, ref in enumerate(refs):
            ref.weight.copy_(bn.weight[r])
            ref.bias.copy_(bn.bias[r])
    assert torch.equal(ReplicaBatchNorm(R, C).weight, torch.ones(R, C))  # affine init 1 / 0
    assert torch.equal(ReplicaBatchNorm(R, C).bias, torch.zeros(R, C))
    for _ in range(3):  # batch statistics in training, running statistics updated per replica
        x = torch.randn(R, 16, C) * torch.arange(1, R + 1).view(R, 1, 1) + 2
        y = bn(x)
        for r, ref in enumerate(refs):
            torch.testing.assert_close(y[r], ref(x[r]))
            torch.testing.assert_close(bn.running_mean[r], ref.running_mean)
            torch.testing.assert_close(bn.running_var[r], ref.running_var)
    bn.eval()
    for ref in refs:
        ref.eval()
    x = torch.randn(R, 5, C)
    y = bn(x)
    for r, ref in enumerate(refs):  # running statistics in evaluation
        torch.testing.assert_close(y[r], ref(x[r]))
        expected = (x[r] - bn.running_mean[r]) / (bn.running_var[r] + bn.eps).sqrt() * bn.weight[r] + bn.bias[r]
        torch.testing.assert_close(y[r], expected)
    torch.testing.assert_close(bn(x[:, :1]), y[:, :1])  # an example's output does not depend on its batch
    bn.train()
    x2 = x.clone()
    x2[1] += 10.0  # replica 1's inputs only
    start = bn.running_mean.clone(), bn.running_var.clone()
    y1, mean1 = bn(x), bn.running_mean.clone()
    bn.running_mean.copy_(start[0])
    bn.running_var.copy_(start[1])
    y2, mean2 = bn(x2), bn.running_mean.clone()
    assert torch.equal(y1[0], y2[0]) and torch.equal(y1[2], y2[2])
    assert torch.equal(mean1[0], mean2[0]) and torch.equal(mean1[2], mean2[2]) and not torch.equal(mean1[1], mean2[1])


def test_batchnorm_normalizes_conv_channels_and_gradients_flow():
    bn = ReplicaBatchNorm(2, 3).train()
    x = torch.randn(2, 8, 3, 10) * 5 + 3
    y = bn(x)
    mean, var = y.mean((1, 3)), y.var((1, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(2, 3), atol=1e-3, rtol=0)
    (y * torch.randn_like(y)).sum().backward()
    assert bn.weight.grad.abs().min() > 0 and bn.bias.grad.abs().min() > 0


def test_batchnorm_sits_between_the_linear_layer_and_the_activation():
    model = make_model(regs_for("[batchnorm,dropout]"), hidden=(8, 8))
    for block in model.blocks:
        assert isinstance(block.norm, ReplicaBatchNorm) and isinstance(block.after, DropoutLayer)
    model = make_model(regs_for("batchnorm"), kind=CNN, hidden=(), channels=[4], kernel_sizes=[3], strides=[2],
                       paddings=[1])
    assert isinstance(model.blocks[0].norm, ReplicaBatchNorm) and model.blocks[0].norm.channels == 4


# -- MC dropout ------------------------------------------------------------------------------------------
def test_mc_dropout_predict_averages_stochastic_passes_into_a_log_distribution():
    regs = regs_for("[batchnorm,mc_dropout]", "samples=7", "p=0.5")
    assert regs.name == "batchnorm+mc_dropout"
    model, _, _ = train(regs, seeds=(0, 1), hidden=(16, 16))
    model.eval()
    x, _ = data(10)
    x = x.expand(2, *x.shape)
    bn = model.blocks[0].norm
    running = bn.running_mean.clone()
    generators = model.blocks[0].after.rng
    state = generators.state()
    logp = regs.predict(model, x)
    assert logp.shape == (2, 10, CLASSES)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 10))
    assert torch.equal(bn.running_mean, running)  # BatchNorm stayed in eval mode
    assert not any(m.training for m in model.modules())  # and every layer is back in eval mode
    single = F.log_softmax(model(x), -1)
    assert (logp - single).abs().max() > 1e-3  # differs from the deterministic pass
    generators.load_state(state)  # = log of the mean of 7 softmaxes with dropout on
    for m in model.modules():
        if getattr(m, "stochastic", False):
            m.train()
    probs = torch.stack([F.softmax(model(x), -1) for _ in range(7)]).mean(0)
    torch.testing.assert_close(logp, probs.log())


# -- parameters, combinations, labels -------------------------------------------------------------------
@pytest.mark.parametrize("name, override, key", [
    ("dropout", "p=1.0", "regularizer.p"), ("dropout", "input_p=-0.1", "regularizer.input_p"),
    ("dropout", "impl=cuda", "regularizer.impl"), ("dropout_scaled", "p=1.5", "regularizer.p"),
    ("rdrop", "alpha=-1", "regularizer.alpha"), ("rdrop", "kl_reduction=mean", "regularizer.kl_reduction"),
    ("multisample", "k=0", "regularizer.k"), ("multisample", "p=1", "regularizer.p"),
    ("dropconnect", "p=1", "regularizer.p"), ("dropconnect", "per_example=maybe", "regularizer.per_example"),
    ("dropconnect", "inference=sampling", "regularizer.inference"), ("dropconnect", "mc_samples=0", "regularizer.mc_samples"),
    ("gaussian", "p=1", "regularizer.p"), ("gaussian", "sigma=-0.5", "regularizer.sigma"),
    ("standout", "alpha=nan", "regularizer.alpha"), ("standout", "beta=abc", "regularizer.beta"),
    ("l1", "lam=-1", "regularizer.lam"), ("l2", "lam=inf", "regularizer.lam"), ("maxnorm", "c=0", "regularizer.c"),
    ("batchnorm", "momentum=2", "regularizer.momentum"), ("batchnorm", "eps=0", "regularizer.eps"),
    ("mc_dropout", "samples=0", "regularizer.samples"),
])
def test_bad_parameters_are_one_line_user_errors(name, override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as error:
        make_model(regs_for(name, override))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("choice, label", [("[dropout,maxnorm]", "dropout+maxnorm"),
                                           ("[batchnorm,dropout]", "batchnorm+dropout"),
                                           ("[dropout,l2]", "dropout+l2"), ("rdrop", "rdrop"),
                                           ("[rdrop,maxnorm]", "rdrop+maxnorm"), ("mc_dropout", "mc_dropout")])
def test_combinations_train_together(choice, label):
    regs = regs_for(choice)
    assert regs.name == label
    _, losses, _ = train(regs, steps=2)
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("choice", ["[dropout,gaussian]", "[dropconnect,standout]", "[rdrop,multisample]"])
def test_conflicting_combinations_are_rejected(choice):
    with pytest.raises(UserError, match="both act at the same place"):
        train(regs_for(choice), steps=1)


# -- end to end through the CLI ----------------------------------------------------------------------------
E2E = ["epochs=3", "model.hidden=[64,64]", "optimizer.lr=0.01", "threads=1", "progress=false"]
E2E_EXTRA: dict[str, list[str]] = {}


@pytest.mark.parametrize("name", [m for m in METHODS if m != "none"] + ["[dropout,maxnorm]"])
def test_every_regularizer_trains_through_the_cli(name, tmp_path):
    proc = run_cli("train", f"regularizer={name}", *E2E, *E2E_EXTRA.get(name, []), f"results_dir={tmp_path}",
                   f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr
    (summary,) = read_csv(tmp_path / "run" / "summary.csv")
    assert summary["status"] == "ok", summary["error"]
    assert summary["regularizer"] == name.strip("[]").replace(",", "+")
    assert (summary["p"] != "") == (name in WITH_P or name == "[dropout,maxnorm]")
    assert float(summary["test_acc"]) > 0.2, summary["test_acc"]


def test_a_conflicting_combination_fails_cleanly_through_the_cli(tmp_path):
    proc = run_cli("train", "regularizer=[dropout,gaussian]", *E2E, f"results_dir={tmp_path}",
                   f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "dropout and gaussian both act at the same place" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
