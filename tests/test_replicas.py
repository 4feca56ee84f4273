"""Replicas: R copies of an ordinary nn.Module trained together equal the R single runs (same
initialization, data order and masks; the numbers agree up to rounding), and each replica's
random draws come from its own seed alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dropbench.regularizers.dropout import dropout
from dropbench.replicas import ReplicaGenerators, Replicas, keep_mask, mask_keep_probability, replica_random

CPU = torch.device("cpu")


class Net(nn.Module):
    """A user's model: plain layers, its own dropout module and a BatchNorm."""

    def __init__(self, generators=None):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.generators = generators

    def forward(self, x):
        h = self.body(x)
        if self.generators is not None and self.training:
            h = dropout(h, 0.3, self.generators)
        return self.head(h)


def build(seeds, generators):
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(Net(generators))
    return Replicas(models)


def train(seeds, steps=4, batch=8, masks=True):
    """`steps` Adam steps on random data, replica k on its own batches; losses [R, steps] and weights."""
    generators = ReplicaGenerators(seeds, CPU)
    model = build(seeds, generators if masks else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(99)
    x, y = torch.randn(64, 3, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    order = generators.permutations(64)
    losses = []
    model.train()
    for step in range(steps):
        idx = order[:, step * batch:(step + 1) * batch]
        logits = model(x[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="none").view(len(seeds), -1).mean(1)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses, 1), model.stacked("head.weight").detach(), model


@pytest.mark.parametrize("masks", [True, False])
def test_replica_k_follows_the_single_run_of_seed_k(masks):
    losses, weights, _ = train([3, 5, 7], masks=masks)
    for k, seed in enumerate([3, 5, 7]):
        single_losses, single_weights, _ = train([seed], masks=masks)
        torch.testing.assert_close(losses[k], single_losses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights[k], single_weights[0], rtol=1e-4, atol=1e-5)


def test_a_single_run_is_the_model_itself_and_repeats_bit_for_bit():
    a, wa, model = train([4])
    b, wb, _ = train([4])
    assert torch.equal(a, b) and torch.equal(wa, wb)
    assert model.stacked("head.weight").data_ptr() == model.module.head.weight.data_ptr()


def test_batchnorm_statistics_are_kept_per_replica():
    _, _, model = train([0, 1], masks=False)
    stats = model.buffers["body.2.running_var"]
    assert stats.shape == (2, 16) and not torch.equal(stats[0], stats[1])
    _, _, single = train([1], masks=False)
    # (not running_mean: the bias of the Linear before a BatchNorm has a gradient that is zero but for
    # rounding, which Adam normalizes to full-size steps, so that bias and the mean drift with rounding)
    torch.testing.assert_close(stats[1], single.module.body[2].running_var, rtol=1e-4, atol=1e-5)


def test_shared_inputs_give_each_replica_its_own_prediction():
    _, _, model = train([0, 1])
    model.eval()
    x = torch.randn(5, 3, 4)
    shared = model.shared(x)
    assert torch.allclose(shared, model(x.expand(2, *x.shape)))
    assert not torch.allclose(shared[0], shared[1])


def test_each_replica_draws_from_its_own_generator_alone():
    """Inside vmap, replica k's sample is what generator k alone gives, whatever the other seeds."""
    def draw(seeds):
        generators = ReplicaGenerators(seeds, CPU)
        like = torch.zeros(len(seeds), 2)
        return torch.func.vmap(lambda t: replica_random(t, (4, 5), generators), randomness="different")(like)

    together = draw([10, 11, 12])
    for k, seed in enumerate([10, 11, 12]):
        expected = torch.empty(4, 5).uniform_(generator=torch.Generator().manual_seed(seed))
        assert torch.equal(together[k], expected)
        alone = replica_random(torch.zeros(2), (4, 5), ReplicaGenerators([seed], CPU))  # a single run: no vmap
        assert torch.equal(alone, expected)


def test_normal_draws_and_no_gradient_through_samples():
    generators = ReplicaGenerators([0], CPU)
    x = torch.ones(3, requires_grad=True)
    z = replica_random(x, (1000,), generators, normal=True)
    assert not z.requires_grad and abs(z.mean()) < 0.15 and abs(z.std() - 1) < 0.1


def test_shared_input_in_a_random_layer_is_a_clear_error():
    generators = ReplicaGenerators([0, 1], CPU)
    with pytest.raises(RuntimeError, match="shared by 2 replicas"):
        replica_random(torch.zeros(3), (3,), generators)


def test_permutations_depend_on_the_seed_alone():
    a = ReplicaGenerators([1, 2], CPU).permutations(10)
    b = ReplicaGenerators([2], CPU).permutations(10)
    assert torch.equal(a[1], b[0]) and sorted(a[0].tolist()) == list(range(10))


def test_state_dict_round_trip():
    _, _, model = train([0, 1], masks=False)
    state = model.state_dict()
    _, _, other = train([5, 6], masks=False)
    other.load_state_dict(state)
    x = torch.randn(4, 3, 4)
    model.eval(), other.eval()
    assert torch.equal(model.shared(x), other.shared(x))
    with pytest.raises(ValueError):
        other.load_state_dict({"nope": torch.zeros(1)})


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.8, 0.999])
def test_keep_masks_keep_the_requested_fraction(keep):
    generators = ReplicaGenerators([0], CPU)
    mask = keep_mask(torch.zeros(()), (400_000,), generators, keep, scale=1 / keep)
    values = mask.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / keep)
    realized = mask_keep_probability(keep)
    assert abs(realized - keep) <= 2 ** -17
    assert (mask > 0).double().mean().item() == pytest.approx(realized, abs=4 * (keep * (1 - keep) / 400_000) ** 0.5)


def test_keep_mask_extremes_and_odd_sizes_use_the_same_stream():
    a, b = ReplicaGenerators([3], CPU), ReplicaGenerators([3], CPU)
    assert torch.equal(keep_mask(torch.zeros(()), (7, 3), a, 1.0), torch.ones(7, 3))
    assert torch.equal(keep_mask(torch.zeros(()), (7, 3), b, 0.0), torch.zeros(7, 3))
    assert torch.equal(a.masks[0].get_state(), b.masks[0].get_state())  # drawn even when p decides alone
