"""Replica batching: R seeds trained at once give, bit for bit, the R single runs; masks are right.

Run: pytest tests/test_replicas.py
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from dropbench.data import Dataset
from dropbench.models import CNN, MLP
from dropbench.regularizers import build_regularizers
from dropbench.train import train_epoch
from dropbench.replicas import (MASK_BITS, ReplicaLinear, ReplicaRNG, _PerReplicaLinear, gather_rows,
                                mask_keep_probability)

CPU = torch.device("cpu")


def _dropout_regs(p, input_p=0.0):
    node = {"methods": {"dropout": {"_target_": "dropbench.regularizers.dropout.Dropout", "p": p,
                                    "input_p": input_p, "impl": "own"}}}
    return build_regularizers(OmegaConf.create(node))


def _step_data(x, y, step, batch) -> Dataset:
    """The `step`-th batch of (x, y) as a dataset: one training-loop step = train_epoch over it."""
    part = slice(step * batch, (step + 1) * batch)
    return Dataset("random", x[part], y[part], x[:0], y[:0], int(y.max()) + 1)


def _train(seeds, optimizer, steps=6, batch=32, hidden=(48, 40), p=(0.2, 0.5), input_p=0.1):
    """`steps` steps of the training loop (dropbench.train.train_epoch) on random data; returns the
    parameters and the loss of every step per replica."""
    gen = torch.Generator().manual_seed(1234)
    n = steps * batch  # every step a full batch
    x = torch.rand(n, 1, 6, 7, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    rng = ReplicaRNG(seeds, CPU)
    regs = _dropout_regs(list(p), input_p)
    model = MLP(tuple(x.shape[1:]), 5, regs, rng, hidden=list(hidden))
    regs.check_model(model)
    opt = optimizer(model.parameters())
    losses = [train_epoch(_step_data(x, y, step, batch), model, regs, opt, rng, batch) for step in range(steps)]
    return [p.detach().clone() for p in model.parameters()], torch.stack(losses, 1)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_parallel_replicas_equal_single_runs(name):
    seeds = [3, 4, 5]
    params, losses = _train(seeds, OPTIMIZERS[name])
    for k, s in enumerate(seeds):
        single_params, single_losses = _train([s], OPTIMIZERS[name])
        assert torch.equal(losses[k], single_losses[0]), f"seed {s}: losses differ"
        for p, q in zip(params, single_params):
            assert torch.equal(p[k], q[0]), f"seed {s}: parameters differ (max {(p[k] - q[0]).abs().max()})"
    # and the replicas really are different runs
    assert not torch.equal(params[0][0], params[0][1])


@pytest.mark.parametrize("hidden,batch", [((13, 7), 17), ((100, 100), 128), ((33,), 5)])
def test_any_shape_reproduces(hidden, batch):
    """Widths and batches where a batched matmul over R (bmm) differed from the single run (13 and 7,
    batch 17), slices that are not 64-byte aligned (33; batch 5), and the default MNIST-1D widths."""
    seeds = [0, 1, 2]
    p = [0.3] * len(hidden)
    params, losses = _train(seeds, OPTIMIZERS["adam"], hidden=hidden, batch=batch, p=p)
    for k, s in enumerate(seeds):
        single, single_losses = _train([s], OPTIMIZERS["adam"], hidden=hidden, batch=batch, p=p)
        assert torch.equal(losses[k], single_losses[0])
        assert all(torch.equal(a[k], b[0]) for a, b in zip(params, single)), f"seed {s}"


@pytest.mark.parametrize("shape,batch", [((1, 40), 17), ((3, 12, 12), 8)])
def test_cnn_replicas_equal_single_runs(shape, batch):
    """ReplicaConv: one convolution per replica (a grouped convolution over R differed in the last bits)."""

    def run(seeds, steps=3):
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(steps * batch, *shape, generator=gen)
        y = torch.randint(0, 10, (steps * batch,), generator=gen)
        rng = ReplicaRNG(seeds, CPU)
        regs = _dropout_regs(0.3)
        model = CNN(shape, 10, regs, rng, hidden=[16])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(steps):
            train_epoch(_step_data(x, y, step, batch), model, regs, opt, rng, batch)
        return [p.detach().clone() for p in model.parameters()]

    params = run([0, 1, 2])
    for k in range(3):
        assert all(torch.equal(a[k], b[0]) for a, b in zip(params, run([k]))), f"seed {k}"


def test_evaluation_forward_reproduces():
    """dropbench.train.evaluate feeds the same batch to every replica as an expanded [R, B, ...] view."""
    x = torch.rand(50, 1, 13)
    outs = {}
    for seeds in ([4, 5, 6], [4], [5], [6]):
        rng = ReplicaRNG(seeds, CPU)
        regs = _dropout_regs([0.5, 0.5])
        model = MLP((1, 13), 3, regs, rng, hidden=[11, 9]).eval()
        with torch.no_grad():
            outs[tuple(seeds)] = model(x.expand(len(seeds), *x.shape))
    for k, s in enumerate([4, 5, 6]):
        assert torch.equal(outs[(4, 5, 6)][k], outs[(s,)][0])


def test_every_method_draws_from_its_replica_alone():
    many = ReplicaRNG([7, 8, 9], CPU)
    draws = [many.permutations(50), many.uniform((4, 5)), many.normal((6,)), many.keep_mask((3, 5), 0.7),
             many.random_bits((9,))]
    for k, s in enumerate([7, 8, 9]):
        one = ReplicaRNG([s], CPU)
        single = [one.permutations(50), one.uniform((4, 5)), one.normal((6,)), one.keep_mask((3, 5), 0.7),
                  one.random_bits((9,))]
        for a, b in zip(draws, single):
            assert torch.equal(a[k], b[0])


def test_uniform_and_normal_match_torch_rand():
    """The in-place draws are the same stream as torch.rand / torch.randn with that generator."""
    rng = ReplicaRNG([11], CPU)
    g = torch.Generator().manual_seed(11)
    assert torch.equal(rng.uniform((3, 4))[0], torch.rand((3, 4), generator=g))
    assert torch.equal(rng.normal((40,))[0], torch.randn((40,), generator=g))
    assert torch.equal(rng.permutations(30)[0], torch.randperm(30, generator=g))


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.8, 0.9])
def test_keep_mask_distribution(keep):
    rng = ReplicaRNG([0, 1], CPU)
    n = 400_000
    mask = rng.keep_mask((n,), keep)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    q = mask_keep_probability(keep)
    assert abs(q - keep) <= 2.0 ** -(MASK_BITS + 1)
    tol = 5 * math.sqrt(q * (1 - q) / n)  # 5 standard errors
    for r in range(2):
        assert abs(mask[r].mean().item() - q) < tol
    assert not torch.equal(mask[0], mask[1])
    # neighbouring units (the four 16-bit pieces of one random word) are independent
    m = mask[0].view(-1, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            both = (m[:, i] * m[:, j]).mean().item()
            assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / len(m))


def test_keep_mask_scale_is_folded_exactly():
    x = torch.randn(2, 33, 17)
    keep = 0.8
    a = ReplicaRNG([5, 6], CPU).keep_mask((33, 17), keep, 1.0 / keep)
    b = ReplicaRNG([5, 6], CPU).keep_mask((33, 17), keep)
    assert set(a.unique().tolist()) <= {0.0, 1.0 / keep}
    assert torch.equal(x * a, x * b * (1.0 / keep))


def test_keep_mask_extremes_and_odd_sizes():
    rng = ReplicaRNG([0], CPU)
    assert torch.equal(rng.keep_mask((3, 5), 1.0, 2.0), torch.full((1, 3, 5), 2.0))
    assert torch.equal(rng.keep_mask((7,), 0.0), torch.zeros(1, 7))
    assert rng.keep_mask((1,), 0.5).shape == (1, 1)
    assert rng.random_bits((2, 3, 5)).shape == (1, 2, 3, 5)


def test_gather_rows_is_advanced_indexing():
    x = torch.randn(50, 3, 4)
    idx = torch.randint(0, 50, (3, 8))
    assert torch.equal(gather_rows(x, idx), x[idx])
    y = torch.randint(0, 10, (50,))
    assert torch.equal(gather_rows(y, idx), y[idx])


def test_batched_linear_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_PerReplicaLinear.apply, (x, w, b))
    assert torch.autograd.gradgradcheck(_PerReplicaLinear.apply, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: _PerReplicaLinear.apply(x, w, None), (x, w))
    # same as autograd through baddbmm, and the weight gradient comes in the weight's own layout
    layer = ReplicaLinear(2, 4, 3)
    with torch.no_grad():
        layer.weight.copy_(w), layer.bias.copy_(b)
    xf = x.detach().float().requires_grad_()
    layer(xf).square().sum().backward()
    ref_w, ref_b = w.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    xr = x.detach().float().requires_grad_()
    torch.baddbmm(ref_b.unsqueeze(1), xr, ref_w.transpose(1, 2)).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref_w.grad)
    torch.testing.assert_close(layer.bias.grad, ref_b.grad)
    torch.testing.assert_close(xf.grad, xr.grad)
    assert layer.weight.grad.stride() == layer.weight.stride()
