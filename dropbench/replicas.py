"""Running R copies of one model together: a seed sweep (`parallel_seeds=R`) in one process.

A model is an ordinary `nn.Module`. `Replicas` holds R copies of it, built one per seed, and
runs them as one computation: their parameters and buffers are stacked into tensors [R, ...]
(`torch.func.stack_module_state`) and the forward pass is the model's own, vectorized over R
with `torch.func.vmap` + `functional_call`; for R = 1 the model simply runs as it is. Inputs
and outputs carry a leading replica dimension: [R, B, ...] -> [R, B, C].

Replica k uses seed k's initialization (the model is built after `torch.manual_seed(seed_k)`),
seed k's data order and seed k's random masks: dropbench's random layers draw through
`replica_random`, which inside vmap fills replica k's slice from generator k with exactly the
draws the single run of seed k makes. What is not the same is the arithmetic: vmap turns R
matrix products into one batched product, whose rounding can differ in the last bits (see the
README for what agrees on which device).

A folded sweep trains jobs that differ only in seeds and in a regularizer's numeric settings as
one set of replicas: a setting that differs between the replicas' models (a layer's dropout rate)
is held by the template as a `PerReplica` tuple, and replica k's forward pass uses value k.
"""

from __future__ import annotations

import functools
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class PerReplica(tuple):
    """The values of one setting in a folded sweep, one per replica: replica k trains with value k."""

    def __repr__(self) -> str:
        return f"PerReplica{tuple(self)!r}"


def per_replica(values: list):
    """One setting's values across the replicas: PerReplica where they differ, else the one value."""
    return PerReplica(values) if any(v != values[0] for v in values) else values[0]


def replica_map(f, *values):
    """f applied to the values: per replica when one of them is PerReplica, else once."""
    if not any(isinstance(v, PerReplica) for v in values):
        return f(*values)
    count = max(len(v) for v in values if isinstance(v, PerReplica))
    return PerReplica(f(*(v[k] if isinstance(v, PerReplica) else v for v in values)) for k in range(count))


def replica_tensor(value, like: torch.Tensor):
    """A setting as a factor for per-replica tensors [R, ...] outside vmap (losses, penalties,
    projections): the number itself, or for PerReplica values a tensor [R, 1, ...] shaped to
    broadcast against `like`."""
    if not isinstance(value, PerReplica):
        return value
    return _values_on(value, like.dtype, like.device).view(-1, *([1] * (like.dim() - 1)))


@functools.lru_cache(maxsize=256)
def _values_on(values: PerReplica, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A setting's values as a tensor [R] on the device, made once (a copy to a GPU at every step
    would wait for it)."""
    return torch.tensor(values, dtype=dtype, device=device)


def fold_settings(models: list[nn.Module]) -> bool:
    """Into the first model (the template that runs every replica): each layer setting that differs
    between the models, as PerReplica; whether there was one. A layer names its foldable settings in
    `replica_settings`."""
    folded = False
    others = [dict(m.named_modules()) for m in models[1:]]
    for name, layer in models[0].named_modules():
        for setting in getattr(layer, "replica_settings", ()):
            value = per_replica([getattr(layer, setting), *(getattr(m[name], setting) for m in others)])
            setattr(layer, setting, value)
            folded |= isinstance(value, PerReplica)
    return folded


class ReplicaGenerators:
    """One random stream per replica, seeded by its seed: replica k's draws depend on seed k alone.

    `order` (on the CPU, so a seed shuffles the data the same way on every device) gives the
    batch order; `masks` (on the training device) feed the random layers of the regularizers.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.seeds = list(seeds)
        self.device = device
        self.order = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        self.masks = [torch.Generator(device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def permutations(self, n: int) -> torch.Tensor:
        """[R, n] independent permutations of range(n), replica k's from its own generator."""
        return torch.stack([torch.randperm(n, generator=g) for g in self.order])

    def state(self) -> dict:
        return {"order": [g.get_state() for g in self.order], "masks": [g.get_state() for g in self.masks]}

    def load_state(self, state: dict) -> None:
        for g, s in zip(self.order + self.masks, state["order"] + state["masks"]):
            g.set_state(s)


class _ReplicaSample(torch.autograd.Function):
    """A random tensor of a given shape, filled by `fill(out, generator, k)` from the running
    replica k's own generator.

    Called once per replica (R = 1) it draws from generator 0; under vmap over R replicas its
    vmap rule fills slice k from generator k, the same numbers replica k's single run draws.
    The result is a sample, not a function of `like`: no gradient flows through it.
    """

    generate_vmap_rule = False

    @staticmethod
    def forward(like, shape, fill, generators):
        if len(generators) != 1:  # outside vmap, or `like` not batched: no replica to draw for
            raise RuntimeError(f"a random layer ran on input shared by {len(generators)} replicas; "
                               f"give each replica its own input ([R, B, ...])")
        out = torch.empty(shape, device=like.device, dtype=like.dtype)
        fill(out, generators.masks[0], 0)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, None

    @staticmethod
    def vmap(info, in_dims, like, shape, fill, generators):
        if info.batch_size != len(generators):
            raise RuntimeError(f"{info.batch_size} replicas in vmap but {len(generators)} generators")
        out = torch.empty(info.batch_size, *shape, device=like.device, dtype=like.dtype)
        for k, g in enumerate(generators.masks):
            fill(out[k], g, k)
        return out, 0


def replica_sample(like: torch.Tensor, shape: tuple[int, ...], generators: ReplicaGenerators, fill) -> torch.Tensor:
    """A sample of `shape` that `fill(out, generator, k)` writes, from the running replica k's generator.

    Args:
        like: any tensor of the current forward pass (it tells the device, dtype and, under vmap,
            the replica dimension).
        shape: the shape of one replica's sample.
        generators: the run's ReplicaGenerators.
        fill: fills a tensor of `shape` in place from a torch.Generator, for replica k.
    """
    if len(generators) == 1:  # a single run is never vmapped: skip the Function (~0.2 ms a call on a CPU)
        out = torch.empty(shape, device=like.device, dtype=like.dtype)
        fill(out, generators.masks[0], 0)
        return out
    return _ReplicaSample.apply(like, tuple(shape), fill, generators)


def _uniform(out: torch.Tensor, generator: torch.Generator, replica: int) -> None:
    out.uniform_(generator=generator)


def _normal(out: torch.Tensor, generator: torch.Generator, replica: int) -> None:
    out.normal_(generator=generator)


def replica_value(value, like: torch.Tensor, generators: ReplicaGenerators):
    """A setting inside the replicas' forward pass: the number itself, or for PerReplica values
    the running replica's value (a 0-d tensor of `like`'s dtype; one per replica under vmap, where
    `like` must be batched over the replicas, as every input is when settings are folded)."""
    if not isinstance(value, PerReplica):
        return value
    return _ReplicaValue.apply(like, value)


class _ReplicaValue(torch.autograd.Function):
    """A PerReplica setting as a 0-d tensor: value 0 outside vmap, value k in replica k under vmap
    (one tensor [R] for all replicas, not one fill per replica)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(like, values):
        return _values_on(values, like.dtype, like.device)[0].clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad):
        return None, None

    @staticmethod
    def vmap(info, in_dims, like, values):
        if info.batch_size != len(values):
            raise RuntimeError(f"{info.batch_size} replicas in vmap but {len(values)} values of a setting")
        return _values_on(values, like.dtype, like.device).clone(), 0


def replica_random(like: torch.Tensor, shape: tuple[int, ...], generators: ReplicaGenerators,
                   normal: bool = False) -> torch.Tensor:
    """U[0, 1) (or N(0, 1) with `normal`) samples of `shape`, from the running replica's generator."""
    return replica_sample(like, shape, generators, _normal if normal else _uniform)


# Dropout-style masks are drawn from 16 random bits per unit, four units per random int64 word: a
# quarter of the generator calls of one float per unit. A unit is kept when its bits, read as a
# signed 16-bit integer, fall below a threshold, so the keep probability is round(keep * 2^16) / 2^16
# (within 2^-17 of `keep`; exact for 1/2, 1/4, 3/4, ...). Measured on the d2l dropout step (two
# 256 x 256 masks per step, 1 CPU thread): 0.43x the time of torch.rand(...) < keep.
MASK_LEVELS = 1 << 16


def mask_keep_probability(keep: float) -> float:
    """The keep probability a keep mask actually realizes (see MASK_LEVELS)."""
    return min(max(round(keep * MASK_LEVELS), 0), MASK_LEVELS) / MASK_LEVELS


def keep_mask(like: torch.Tensor, shape: tuple[int, ...], generators: ReplicaGenerators, keep,
              scale=1.0) -> torch.Tensor:
    """A mask of `shape` holding `scale` with probability `keep` (see MASK_LEVELS) and 0 otherwise,
    from the running replica's generator; inverted dropout is x * keep_mask(x, x.shape, g, 1 - p, 1 / (1 - p)).
    `keep` and `scale` may be PerReplica."""
    return replica_sample(like, shape, generators, partial(_fill_keep_mask, keep=keep, scale=scale))


def _fill_keep_mask(out: torch.Tensor, generator: torch.Generator, replica: int, keep, scale) -> None:
    keep = keep[replica] if isinstance(keep, PerReplica) else keep
    scale = scale[replica] if isinstance(scale, PerReplica) else scale
    n = out.numel()
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=out.device)
    words.random_(-(1 << 63), None, generator=generator)  # the stream never depends on keep
    levels = round(keep * MASK_LEVELS)
    if levels >= MASK_LEVELS:
        out.fill_(scale)
    elif levels <= 0:
        out.zero_()
    else:
        bits = words.view(torch.int16)[:n].view(out.shape)
        torch.lt(bits, levels - MASK_LEVELS // 2, out=out)  # int16 in [-2^15, 2^15): P = levels / 2^16
        if scale != 1.0:
            out.mul_(scale)


class Replicas:
    """R copies of one model, trained together: [R, B, *in_shape] -> [R, B, num_classes].

    Args:
        models: the R copies, already built (replica k with seed k) and on the device; the first
            one becomes the template that runs every replica's parameters (its own are dropped) and
            holds the layer settings that differ between them as PerReplica values.
    """

    def __init__(self, models: list[nn.Module]):
        self.module = models[0]
        self.count = len(models)
        # a layer reads a PerReplica setting through an input batched over the replicas: with folded
        # settings, evaluation gives each replica its own view of the shared inputs
        self.folded = fold_settings(models)
        if self.count == 1:
            self.params = dict(self.module.named_parameters())
            self.buffers = dict(self.module.named_buffers())
        else:
            params, buffers = stack_module_state(models)
            self.params, self.buffers = dict(params), dict(buffers)
            self.module.to("meta")  # the template keeps its structure; the stacked tensors hold the numbers
            run = lambda p, b, x: functional_call(self.module, (p, b), (x,))  # noqa: E731
            # randomness="different": random ops that do not go through replica_random (a user's own
            # F.dropout) draw independent samples per replica from the global generator
            self._own_inputs = vmap(run, in_dims=(0, 0, 0), randomness="different")
            self._shared_inputs = vmap(run, in_dims=(0, 0, None), randomness="different")

    def __len__(self) -> int:
        return self.count

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [R, B, C] of inputs [R, B, ...] (each replica its own batch)."""
        if self.count == 1:
            return self.module(x[0]).unsqueeze(0)
        return self._own_inputs(self.params, self.buffers, x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [R, B, C] of inputs [B, ...] that every replica sees (evaluation)."""
        if self.count == 1:
            return self.module(x).unsqueeze(0)
        if self.folded:
            return self._own_inputs(self.params, self.buffers, x.expand(self.count, *x.shape))
        return self._shared_inputs(self.params, self.buffers, x)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def stacked(self, name: str) -> torch.Tensor:
        """Parameter `name` (as in the model's named_parameters) of every replica: [R, ...].

        A view: in-place changes under torch.no_grad() change the parameter."""
        p = self.params[name]
        return p.unsqueeze(0) if self.count == 1 else p

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.module.train(False)

    def state_dict(self) -> dict:
        return {name: t.detach().clone() for name, t in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, state: dict) -> None:
        tensors = {**self.params, **self.buffers}
        if set(state) != set(tensors):
            raise ValueError("the checkpoint holds another model's parameters")
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(state[name])
