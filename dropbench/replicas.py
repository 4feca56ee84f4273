"""Replica-batched building blocks: R independent copies of a model held in one set of tensors.

Every activation has a leading replica dimension, ``[R, B, ...]``, and every parameter one too,
``[R, ...]``. A run with ``parallel_seeds=R`` trains R seeds at once in one process; a plain run
is R = 1. Replica k draws all of its randomness (initialization, batch order, dropout masks)
from its own generator seeded with its seed, and its matmuls and convolutions are separate calls
with the same shapes, strides and alignment as in a single run, so it computes bit for bit what
a single run with that seed computes (tests/test_replicas.py). Elementwise work (activations,
masks, losses, optimizer updates) runs once over all replicas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# Dropout-style masks are drawn from 16 random bits per unit: a unit is kept when its 16 bits,
# read as a signed integer, fall below a threshold, so the keep probability is
# round(keep * 2^16) / 2^16 (within 2^-17 of `keep`; exact for 1/2, 1/4, 3/4, ...).
MASK_BITS = 16
_MASK_LEVELS = 1 << MASK_BITS


def mask_keep_probability(keep: float) -> float:
    """The keep probability `ReplicaRNG.keep_mask(shape, keep)` actually realizes."""
    return min(max(round(keep * _MASK_LEVELS), 0), _MASK_LEVELS) / _MASK_LEVELS


class ReplicaRNG:
    """One torch.Generator per replica: replica k's random stream depends only on its seed.

    Every method draws replica k's samples from generator k alone, in the same amount whatever
    the number of replicas, and writes them straight into slice k of the result (no stacking).
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.seeds = list(seeds)
        self.device = device
        # Initialization is drawn on the CPU so a seed gives the same weights on every device.
        self.init = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        self.train = [torch.Generator(device).manual_seed(s) for s in self.seeds]

    @property
    def replicas(self) -> int:
        return len(self.seeds)

    def permutations(self, n: int) -> torch.Tensor:
        """[R, n] row-wise independent permutations of range(n), on the device."""
        out = torch.empty(self.replicas, n, dtype=torch.int64, device=self.device)
        for k, g in enumerate(self.train):
            torch.randperm(n, generator=g, out=out[k])
        return out

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[R, *shape] uniform samples in [0, 1)."""
        out = torch.empty(self.replicas, *shape, device=self.device)
        for k, g in enumerate(self.train):
            out[k].uniform_(generator=g)
        return out

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[R, *shape] standard normal samples."""
        out = torch.empty(self.replicas, *shape, device=self.device)
        for k, g in enumerate(self.train):
            out[k].normal_(generator=g)
        return out

    def random_bits(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[R, *shape] int16 tensor of independent uniformly random 16-bit integers.

        Drawn as full-range random int64 words (four units per word), which costs a quarter of
        the generator calls and a fraction of the work of one float per unit (torch.rand).
        """
        n = math.prod(shape)
        words = torch.empty(self.replicas, -(-n // 4), dtype=torch.int64, device=self.device)
        for k, g in enumerate(self.train):
            words[k].random_(-(1 << 63), None, generator=g)  # from=int64 min, to=None: all 64 bits
        bits = words.view(torch.int16)
        return bits.view(self.replicas, *shape) if bits.shape[1] == n else bits[:, :n].reshape(self.replicas, *shape)

    def keep_mask(self, shape: tuple[int, ...], keep: float, scale: float = 1.0) -> torch.Tensor:
        """[R, *shape] float mask: `scale` with probability `keep` (see MASK_BITS), 0 otherwise.

        Dropout passes scale = 1/keep and multiplies once: x * keep_mask(shape, keep, 1/keep)
        equals x * keep_mask(shape, keep) * (1/keep) bit for bit.
        """
        mask = torch.empty(self.replicas, *shape, device=self.device)
        bits = self.random_bits(shape)  # drawn even when keep is 0 or 1: the stream never depends on p
        levels = round(keep * _MASK_LEVELS)
        if levels >= _MASK_LEVELS:
            return mask.fill_(scale)
        if levels <= 0:
            return mask.zero_()
        torch.lt(bits, levels - _MASK_LEVELS // 2, out=mask)  # int16 in [-2^15, 2^15): P = levels / 2^16
        return mask if scale == 1.0 else mask.mul_(scale)

    def state(self) -> dict:
        return {"train": [g.get_state() for g in self.train]}

    def load_state(self, state: dict) -> None:
        for g, s in zip(self.train, state["train"]):
            g.set_state(s)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for x [N, ...] and indices idx [R, B] -> [R, B, ...], as one index_select.

    Same values as advanced indexing, which goes through a slower general gather kernel on the
    CPU (2-5x slower for a [256, 784] float batch: 263 vs 115 us on one core for random rows).
    """
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])


def init_weight_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int, scheme: str, std: float,
                 generators: list[torch.Generator]) -> None:
    """Initialize a replica-batched weight [R, ...] and bias [R, ...] in place, replica k from generator k.

    Schemes: ``default`` is PyTorch's nn.Linear/nn.Conv default (U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weight and bias); ``normal`` is N(0, std^2) with zero bias (d2l uses std=0.01);
    ``xavier`` is Glorot uniform and ``kaiming`` He normal (ReLU gain), both with zero bias.
    """
    receptive_field = weight[0, 0, 0].numel() if weight.dim() > 3 else 1
    fan_out = weight.shape[1] * receptive_field
    with torch.no_grad():
        for k, g in enumerate(generators):
            w = torch.empty(weight[k].shape)
            b = torch.zeros(bias[k].shape) if bias is not None else None
            if scheme == "default":
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                w.uniform_(-bound, bound, generator=g)
                if b is not None:
                    b.uniform_(-bound, bound, generator=g)
            elif scheme == "normal":
                w.normal_(0.0, std, generator=g)
            elif scheme == "xavier":
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                w.uniform_(-bound, bound, generator=g)
            elif scheme == "kaiming":
                w.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
            else:  # checked by the model's constructor
                raise ValueError(scheme)
            weight[k].copy_(w)
            if b is not None:
                bias[k].copy_(b)


class ReplicaLinear(nn.Module):
    """y = x W^T + b for each replica: x [R, B, in] -> [R, B, out], weight [R, out, in].

    R = 1 is one F.linear (addmm) call; R > 1 makes the same call once per replica
    (_PerReplicaLinear), so that replica k and the single run with its seed agree bit for bit.
    """

    def __init__(self, replicas: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(replicas, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(replicas, out_features)) if bias else None

    def reset_parameters(self, scheme: str, std: float, generators: list[torch.Generator]) -> None:
        init_weight_(self.weight, self.bias, self.in_features, scheme, std, generators)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return replica_linear(x, self.weight, self.bias)


def replica_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, B, in] @ weight[r]^T (+ bias[r]) for each replica r -> [R, B, out], weight [R, out, in].

    Use this rather than torch.bmm/baddbmm wherever replica k must reproduce its single run
    (e.g. a masked weight: replica_linear(x, weight * mask)).
    """
    if x.shape[0] == 1:  # the same addmm/mm calls as _PerReplicaLinear, with autograd's own (C++) backward
        return F.linear(x.squeeze(0), weight.squeeze(0), bias.squeeze(0) if bias is not None else None).unsqueeze(0)
    return _PerReplicaLinear.apply(x, weight, bias)


# The CPU allocator aligns every new tensor to 64 bytes, so in a single run every matmul operand
# is 64-byte aligned. BLAS kernels for small matrices can round differently on operands that are
# not (a replica's slice [k] of an [R, ...] tensor starts wherever the previous replicas end), so
# such slices are copied to fresh, aligned memory first: replica k then computes bit for bit what
# the single run computes.
_ALIGN = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its data start on a 64-byte boundary, else a copy that does (autograd-tracked).

    Pass a replica's slice x[k] through this before a per-replica matmul/conv of your own."""
    return t if t.data_ptr() % _ALIGN == 0 else t.clone()


def _matmul_into(out: torch.Tensor, fn, *args) -> None:
    """out = fn(*args) computed in `out` itself when aligned, else in fresh memory and copied."""
    if out.data_ptr() % _ALIGN == 0:
        fn(*args, out=out)
    else:
        out.copy_(fn(*args))


class _PerReplicaLinear(torch.autograd.Function):
    """x [R, B, in], weight [R, out, in], bias [R, out] or None -> x W^T + b per replica: [R, B, out].

    Every matmul is a separate mm/addmm call per replica on 64-byte-aligned operands with the
    same shapes and strides whatever R is, so replica k computes exactly what a single run
    computes. One batched matmul (bmm/baddbmm) over R does not guarantee that: the BLAS picks its
    kernel and threading by batch size, and for some shapes (e.g. widths 13 and 7, or batch 17)
    replica k of R = 3 then differs from the single run in the last bits. The weight gradient
    g^T x is computed straight into the weight's own [out, in] layout (as autograd does for
    F.linear, the R = 1 path), where autograd's formula for baddbmm gives (x^T g)^T and then
    copies every weight gradient once more to accumulate it into weight.grad.
    """

    @staticmethod
    def forward(x, weight, bias):
        R, B = x.shape[:2]
        y = x.new_empty(R, B, weight.shape[1])
        for k, (xk, wk, yk) in enumerate(zip(x.unbind(0), weight.unbind(0), y.unbind(0))):
            xk, wk = aligned(xk), aligned(wk)
            if bias is None:
                _matmul_into(yk, torch.mm, xk, wk.t())
            else:
                _matmul_into(yk, torch.addmm, bias[k], xk, wk.t())
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        R = x.shape[0]
        grad_x = grad_w = grad_b = None
        if torch.is_grad_enabled():  # create_graph=True (double backward): differentiable ops
            if need_x:
                grad_x = torch.stack([grad[k].mm(weight[k]) for k in range(R)])
            if need_w:
                grad_w = torch.stack([grad[k].t().mm(x[k]) for k in range(R)])
        elif need_x or need_w:
            grad_x = x.new_empty(x.shape) if need_x else None
            grad_w = weight.new_empty(weight.shape) if need_w else None
            gs, xs, ws = grad.unbind(0), x.unbind(0), weight.unbind(0)
            for k in range(R):
                gk = aligned(gs[k])
                if need_x:
                    _matmul_into(grad_x[k], torch.mm, gk, aligned(ws[k]))
                if need_w:
                    _matmul_into(grad_w[k], torch.mm, gk.t(), aligned(xs[k]))
        if ctx.has_bias and need_b:
            grad_b = grad.sum(1)
        return grad_x, grad_w, grad_b


class ReplicaConv(nn.Module):
    """A 1-D or 2-D convolution per replica: x [R, B, C, *spatial] -> [R, B, C', *spatial'].

    One convolution call per replica (groups=1, on 64-byte-aligned input), so replica k computes
    exactly what a single run computes. A single grouped convolution over R replicas (groups=R,
    the obvious batched form) runs a different algorithm than groups=1 and gives a replica
    numbers that differ from its single run in the last bits.
    """

    def __init__(self, replicas: int, dims: int, in_channels: int, out_channels: int,
                 kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.replicas, self.dims = replicas, dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(replicas, out_channels, in_channels, *([kernel_size] * dims)))
        self.bias = nn.Parameter(torch.empty(replicas, out_channels))
        self.conv = F.conv1d if dims == 1 else F.conv2d

    def reset_parameters(self, scheme: str, std: float, generators: list[torch.Generator]) -> None:
        fan_in = self.weight[0, 0].numel()
        init_weight_(self.weight, self.bias, fan_in, scheme, std, generators)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.conv(aligned(xk), wk, bk, self.stride, self.padding)
                for xk, wk, bk in zip(x.unbind(0), self.weight.unbind(0), self.bias.unbind(0))]
        return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)


def output_shape(conv: ReplicaConv, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-example output shape [C, *spatial] of `conv` for an input of per-example shape `shape`."""
    k = conv.weight.shape[-1]
    spatial = tuple((s + 2 * conv.padding - k) // conv.stride + 1 for s in shape[1:])
    return (conv.out_channels, *spatial)
