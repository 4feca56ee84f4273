"""Models: output shapes for 1-D and 2-D inputs, per-replica initialization, init schemes."""

from __future__ import annotations

import pytest
import torch

from dropbench.config import UserError
from dropbench.models import CNN, MLP
from dropbench.regularizers import Regularizers
from dropbench.replicas import ReplicaRNG

CPU = torch.device("cpu")


def build(kind, in_shape, seeds=(0,), **kwargs):
    return kind(in_shape, 10, Regularizers([]), ReplicaRNG(list(seeds), CPU), **kwargs)


@pytest.mark.parametrize("kind, in_shape, kwargs", [
    (MLP, (1, 40), {"hidden": [100, 100]}),
    (MLP, (1, 28, 28), {"hidden": [256, 256]}),
    (MLP, (1, 40), {"hidden": []}),
    (CNN, (1, 40), {}),
    (CNN, (3, 32, 32), {"channels": [8, 16], "kernel_sizes": [3, 3], "strides": [2, 2], "paddings": [1, 1],
                        "hidden": [32]}),
])
@pytest.mark.parametrize("replicas", [1, 3])
def test_output_shapes(kind, in_shape, kwargs, replicas):
    model = build(kind, in_shape, seeds=range(replicas), **kwargs)
    x = torch.randn(replicas, 7, *in_shape)
    assert model(x).shape == (replicas, 7, 10)
    assert all(p.shape[0] == replicas for p in model.parameters())


def test_mlp_parameter_count_matches_a_plain_mlp():
    model = build(MLP, (1, 28, 28), hidden=[256, 256])
    assert sum(p.numel() for p in model.parameters()) == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


@pytest.mark.parametrize("kind", [MLP, CNN])
def test_replica_k_is_initialized_like_the_single_run_with_seed_k(kind):
    together = build(kind, (1, 40), seeds=[5, 6, 7])
    for k, seed in enumerate([5, 6, 7]):
        alone = build(kind, (1, 40), seeds=[seed])
        for a, b in zip(together.parameters(), alone.parameters()):
            assert torch.equal(a[k], b[0])


def test_replicas_do_not_mix():
    model = build(CNN, (1, 40), seeds=[0, 1])
    x = torch.randn(2, 4, 1, 40)
    y = model(x)
    x2 = x.clone()
    x2[1] += 1.0  # change replica 1's inputs only
    assert torch.equal(model(x2)[0], y[0]) and not torch.equal(model(x2)[1], y[1])


def test_normal_init_uses_std_and_zero_bias():
    model = build(MLP, (1, 28, 28), hidden=[256], init="normal", init_std=0.01)
    w = model.blocks[0].layer.weight
    assert abs(w.std().item() - 0.01) < 0.0005 and torch.count_nonzero(model.blocks[0].layer.bias) == 0


def test_bad_model_settings_are_user_errors():
    with pytest.raises(UserError, match="model.activation='swish'"):
        build(MLP, (1, 40), activation="swish")
    with pytest.raises(UserError, match="model.init='zeros'"):
        build(MLP, (1, 40), init="zeros")
    with pytest.raises(UserError, match="too small"):
        build(CNN, (1, 2))
