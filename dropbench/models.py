"""Models: the built-in networks (MLP, CNN, ResNet, GRU, Transformer, any torchvision classifier) and
`build_model`, which turns a `model` config node, built-in or the user's own, into an `nn.Module`.

A model is an ordinary `nn.Module` mapping float inputs [B, *in_shape] to logits [B, num_classes]; it
knows nothing of regularizers or of replicas (docs/models.md gives the protocol). The built-ins use
activation *modules* and `nn.Sequential` so that regularizers find their places in the module tree,
and only operations that `torch.func.vmap` can batch, so R stacked copies train together.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dropbench.config import UserError, build, one_line, positive_float, positive_int

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
INITS = ("default", "normal", "xavier", "kaiming")


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise UserError(f"model.activation={name!r} is not allowed; choose from {', '.join(ACTIVATIONS)}")


def _ints(name: str, value, minimum: int = 1) -> list[int]:
    """A list of integers >= minimum (layer widths, kernel sizes, ...)."""
    what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    if not isinstance(value, (list, tuple, ListConfig)):
        raise UserError(f"{name}={value!r} is not allowed; it must be a list of {what}, e.g. [100, 100]")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise UserError(f"{name}={list(value)} is not allowed; it must be a list of {what}")
    return list(value)


def _check_init(init: str, init_std: float) -> None:
    if init not in INITS:
        raise UserError(f"model.init={init!r} is not allowed; choose from {', '.join(INITS)}")
    if init == "normal":
        positive_float("model.init_std", init_std)


def _initialize(model: nn.Module, init: str, init_std: float) -> nn.Module:
    """Re-initialize every nn.Linear / nn.Conv* of `model` from the global torch RNG, in module order.

    ``default`` keeps what the layers drew when built: PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weights and biases. ``normal`` is N(0, init_std^2) weights (d2l uses 0.01); ``xavier`` is
    Glorot uniform (Glorot & Bengio 2010); ``kaiming`` is He normal with the ReLU gain, std
    sqrt(2 / fan_in) (He et al. 2015). The last three set biases to zero.
    """
    if init == "default":
        return model
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if init == "normal":
                nn.init.normal_(module.weight, 0.0, init_std)
            elif init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _hidden_linears(widths: list[int], in_features: int, activation: str) -> tuple[list[nn.Module], int]:
    layers = []
    for width in widths:
        layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
        in_features = width
    return layers, in_features


def MLP(in_shape: tuple[int, ...], num_classes: int, hidden=(100, 100), activation: str = "relu",
        init: str = "default", init_std: float = 0.01) -> nn.Sequential:
    """A multi-layer perceptron on flattened inputs: Flatten, (Linear, activation) per hidden width, Linear.

    Args:
        in_shape: per-example input shape; flattened to prod(in_shape) features.
        num_classes: number of logits.
        hidden: hidden widths; `[]` is logistic regression.
        activation: relu, tanh, gelu or sigmoid.
        init: default (PyTorch's), normal, xavier or kaiming (see `_initialize`).
        init_std: standard deviation for init=normal.
    """
    hidden = _ints("model.hidden", hidden)
    _check_activation(activation)
    _check_init(init, init_std)
    layers, width = _hidden_linears(hidden, math.prod(in_shape), activation)
    return _initialize(nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, num_classes)), init, init_std)


def CNN(in_shape: tuple[int, ...], num_classes: int, channels=(25, 25, 25), kernel_sizes=(5, 3, 3),
        strides=(2, 2, 2), paddings=(1, 1, 1), hidden=(), activation: str = "relu", init: str = "default",
        init_std: float = 0.01) -> nn.Sequential:
    """A small CNN: (Conv, activation) per entry of `channels`, Flatten, (Linear, activation) per hidden
    width, Linear. Conv1d on [C, L] signals, Conv2d on [C, H, W] images. The defaults are the MNIST-1D
    paper's CNN (Greydanus & Kobak 2020, "Scaling Down Deep Learning with MNIST-1D").

    Args:
        in_shape: [C, L] or [C, H, W].
        num_classes: number of logits.
        channels, kernel_sizes, strides, paddings: one entry per conv layer.
        hidden: widths of hidden Linear layers between the convs and the head.
        activation: relu, tanh, gelu or sigmoid.
        init: default (PyTorch's), normal, xavier or kaiming (see `_initialize`).
        init_std: standard deviation for init=normal.
    """
    channels, hidden = _ints("model.channels", channels), _ints("model.hidden", hidden)
    kernel_sizes, strides = _ints("model.kernel_sizes", kernel_sizes), _ints("model.strides", strides)
    paddings = _ints("model.paddings", paddings, minimum=0)
    if not len(channels) == len(kernel_sizes) == len(strides) == len(paddings):
        raise UserError("model.channels, kernel_sizes, strides and paddings must have the same length")
    if len(in_shape) not in (2, 3):
        raise UserError(f"model cnn needs [C, L] or [C, H, W] inputs, the dataset gives {list(in_shape)}")
    _check_activation(activation)
    _check_init(init, init_std)
    conv = nn.Conv1d if len(in_shape) == 2 else nn.Conv2d
    shape, layers = tuple(in_shape), []
    for c, k, s, p in zip(channels, kernel_sizes, strides, paddings):
        layers += [conv(shape[0], c, k, s, p), ACTIVATIONS[activation]()]
        shape = (c, *((size + 2 * p - k) // s + 1 for size in shape[1:]))
        if min(shape[1:]) <= 0:
            raise UserError(f"model cnn: the input {list(in_shape)} is too small for {len(channels)} conv layers")
    linears, width = _hidden_linears(hidden, math.prod(shape), activation)
    model = nn.Sequential(*layers, nn.Flatten(), *linears, nn.Linear(width, num_classes))
    return _initialize(model, init, init_std)


class _PadShortcut(nn.Module):
    """Option-A shortcut of He et al. (2016), §4.2: identity, subsampled by `stride`, with the extra
    output channels zero-padded (no parameters)."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a shortcut, ReLU after the sum (He et al. 2016, Fig. 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else _PadShortcut(out_channels - in_channels, stride))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), "Deep Residual Learning for Image Recognition", §4.2.

    A 3x3 conv of `width` channels, three stages of n basic blocks with width, 2*width and 4*width
    channels (stride 2 at the first block of stages 2 and 3), global average pooling and a Linear
    head: depth = 6n + 2 weighted layers (20, 32, 44, 56, 110 in the paper). Shortcuts are option A
    (parameter-free: subsample and zero-pad channels), as in the paper's CIFAR-10 experiments, so
    ResNet-20 has 0.27M parameters.

    Args:
        in_shape: [C, H, W] images, any C.
        num_classes: number of logits.
        depth: 6n + 2.
        width: channels of the first stage (16 in the paper).
        init: default (PyTorch's), normal, xavier or kaiming (He et al. 2015, the paper's choice).
        init_std: standard deviation for init=normal.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, depth: int = 20, width: int = 16,
                 init: str = "kaiming", init_std: float = 0.01):
        super().__init__()
        if len(in_shape) != 3:
            raise UserError(f"model resnet needs [C, H, W] images, the dataset gives {list(in_shape)}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise UserError(f"model.depth={depth!r} is not allowed; it must be 6n+2 for n >= 1 (20, 32, 44, 56, 110)")
        positive_int("model.width", width)
        _check_init(init, init_std)
        layers = [nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
        for stage in range(3):
            for block in range((depth - 2) // 6):
                out = width * 2 ** stage
                layers.append(_BasicBlock(channels, out, 2 if stage > 0 and block == 0 else 1))
                channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)
        _initialize(self, init, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _GRUDirection(nn.Module):
    """One direction of a GRU layer (Cho et al. 2014) with nn.GRU's equations and initialization:
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise, n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    h' = (1 - z) * n + z * h, every parameter U(-1/sqrt(hidden), 1/sqrt(hidden)).

    Written from nn.Linear because torch.func.vmap has no batching rule for nn.GRU's fused kernel.
    """

    def __init__(self, input_size: int, hidden: int, reverse: bool):
        super().__init__()
        self.hidden, self.reverse = hidden, reverse
        self.input = nn.Linear(input_size, 3 * hidden)
        self.recurrent = nn.Linear(hidden, 3 * hidden)
        bound = 1.0 / math.sqrt(hidden)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, input_size] -> hidden states [B, L, hidden]."""
        gates_x = self.input(x)  # every time step's input gates in one matmul
        h = x.new_zeros(*x.shape[:-2], self.hidden)
        steps = range(x.shape[-2])
        states = [None] * len(steps)
        for t in reversed(steps) if self.reverse else steps:
            x_r, x_z, x_n = gates_x[..., t, :].chunk(3, dim=-1)
            h_r, h_z, h_n = self.recurrent(h).chunk(3, dim=-1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
            states[t] = h
        return torch.stack(states, dim=-2)


class GRU(nn.Module):
    """A GRU over sequences: input [C, L] is L time steps of C features (MNIST-1D: [1, 40]); the hidden
    states of every step (both directions) are flattened, then dropout (an nn.Dropout(0.0) place for
    the dropout-family regularizers) and a Linear head.

    The defaults are the MNIST-1D paper's GRU (Greydanus & Kobak 2020, "Scaling Down Deep Learning
    with MNIST-1D"; GRUBase in github.com/greydanus/mnist1d): one bidirectional layer of 6 units, all
    40 steps' outputs into the head; it reports 91% test accuracy.

    Args:
        in_shape: [C, L].
        num_classes: number of logits.
        hidden: GRU units per direction.
        bidirectional: run a second GRU from the last step to the first and concatenate.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 6, bidirectional: bool = True):
        super().__init__()
        if len(in_shape) != 2:
            raise UserError(f"model gru needs [C, L] sequences, the dataset gives {list(in_shape)}")
        positive_int("model.hidden", hidden)
        if not isinstance(bidirectional, bool):
            raise UserError(f"model.bidirectional={bidirectional!r} is not allowed; it must be true or false")
        channels, length = in_shape
        self.directions = nn.ModuleList(_GRUDirection(channels, hidden, reverse)
                                        for reverse in ((False, True) if bidirectional else (False,)))
        self.dropout = nn.Dropout(0.0)
        self.head = nn.Linear(len(self.directions) * hidden * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.transpose(-1, -2)  # [B, L, C]
        states = torch.cat([direction(steps) for direction in self.directions], dim=-1)
        return self.head(self.dropout(states.flatten(-2)))


class _SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (Vaswani et al. 2017): [B, L, d] -> [B, L, d]."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # [B, L, 3, heads, d_head]
        q, k, v = (t.transpose(-2, -3) for t in qkv.unbind(-3))  # each [B, heads, L, d_head]
        # The math backend is made of ordinary batched ops; under torch.func.vmap the fused kernels
        # are not batched (CPU: a slow per-replica loop) or fail (CUDA memory-efficient backward).
        with sdpa_kernel(SDPBackend.MATH):
            attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(-2, -3).flatten(-2))


class _EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block (Xiong et al. 2020): x + Dropout(Attention(LN(x))), then
    x + FFN(LN(x)) with FFN = Linear, activation, Dropout, Linear. Both dropouts start at p = 0."""

    def __init__(self, d_model: int, heads: int, ff_dim: int, activation: str):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = _SelfAttention(d_model, heads)
        self.attn_dropout = nn.Dropout(0.0)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ff_dim), ACTIVATIONS[activation](), nn.Dropout(0.0),
                                 nn.Linear(ff_dim, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn(self.attn_norm(x)))
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """A small Transformer encoder over sequences: input [C, L] is L tokens of C features, projected to
    d_model and added to a learned positional embedding; `layers` pre-norm encoder blocks, a final
    LayerNorm, mean pooling over the tokens and a Linear head.

    Args:
        in_shape: [C, L].
        num_classes: number of logits.
        d_model: token width; a multiple of `heads`.
        heads: attention heads.
        layers: encoder blocks.
        ff_dim: hidden width of each block's feed-forward network.
        activation: of the feed-forward network: gelu, relu, tanh or sigmoid.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, d_model: int = 32, heads: int = 4,
                 layers: int = 2, ff_dim: int = 64, activation: str = "gelu"):
        super().__init__()
        if len(in_shape) != 2:
            raise UserError(f"model transformer needs [C, L] sequences, the dataset gives {list(in_shape)}")
        for key, value in (("d_model", d_model), ("heads", heads), ("layers", layers), ("ff_dim", ff_dim)):
            positive_int(f"model.{key}", value)
        if d_model % heads:
            raise UserError(f"model.d_model={d_model} is not allowed; it must be a multiple of model.heads={heads}")
        _check_activation(activation)
        channels, length = in_shape
        self.embed = nn.Linear(channels, d_model)
        self.position = nn.Parameter(torch.empty(length, d_model))
        nn.init.normal_(self.position, 0.0, 0.02)  # GPT-2's scale for learned position embeddings
        self.blocks = nn.Sequential(*(_EncoderBlock(d_model, heads, ff_dim, activation) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.transpose(-1, -2)) + self.position  # [B, L, d_model]
        return self.head(self.norm(self.blocks(tokens)).mean(dim=-2))


def torchvision_model(in_shape: tuple[int, ...], num_classes: int, name: str = "resnet18", **kwargs) -> nn.Module:
    """Any torchvision classification model by builder name, randomly initialized (weights=None).

    Args:
        in_shape: [3, H, W] images, large enough for the architecture (e.g. vit_b_16 needs 224x224).
        num_classes: number of logits.
        name: a name in torchvision.models.list_models(module=torchvision.models), e.g. resnet18.
        **kwargs: passed on to the builder (e.g. dropout=0.2 for vgg11, aux_logits=False for googlenet).
    """
    import torchvision  # only this model needs it; importing it costs a second

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise UserError(f"model.name={name!r} is not a torchvision classification model; choose e.g. resnet18, "
                        f"resnet50, vgg11_bn, mobilenet_v3_small, convnext_tiny ({len(names)} in "
                        f"torchvision.models.list_models(module=torchvision.models))")
    if len(in_shape) != 3 or in_shape[0] != 3:
        raise UserError(f"model.name={name} (torchvision) needs [3, H, W] images, the dataset gives {list(in_shape)}")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(f"cannot build torchvision model {name} ({type(error).__name__}: {one_line(error)})") from None
    _check_on_meta(model, name, tuple(in_shape), num_classes)
    return model


def _check_on_meta(model: nn.Module, name: str, in_shape: tuple[int, ...], num_classes: int) -> None:
    """Run `model` on shape-only (meta) tensors in both modes, so that an image size it cannot take or
    an output that is not [B, num_classes] logits is a one-line error now, at no compute or memory."""
    state = {k: torch.empty_like(v, device="meta") for k, v in {**dict(model.named_parameters()),
                                                                **dict(model.named_buffers())}.items()}
    x = torch.empty(2, *in_shape, device="meta")
    training = model.training
    try:
        for mode in (True, False):
            model.train(mode)
            try:
                out = torch.func.functional_call(model, state, (x,))
            except Exception as error:  # noqa: BLE001 (the architecture's own check of the input size)
                raise UserError(f"model.name={name} (torchvision) cannot take {list(in_shape)} inputs "
                                f"({type(error).__name__}: {one_line(error)})") from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
                raise UserError(f"model.name={name} (torchvision) returns {type(out).__name__} in "
                                f"{'training' if mode else 'eval'} mode, not logits [B, {num_classes}]; "
                                f"its builder may take an option to drop extra outputs (e.g. +model.aux_logits=false)")
    finally:
        model.train(training)


def _spec(node: DictConfig) -> tuple[DictConfig, str]:
    """The node to instantiate and its config path: `model.module` for a user's model, else `model`."""
    return (node.module, "model.module") if "module" in node else (node, "model")


def _target(spec: DictConfig, key: str):
    """The callable that `spec._target_` names."""
    if "_target_" not in spec or OmegaConf.is_missing(spec, "_target_") or spec._target_ is None:
        raise UserError(f"{key}._target_ is not set; give the import path of a callable returning an nn.Module, "
                        f"e.g. {key}._target_=mypkg.models.Net")
    try:
        return get_object(str(spec._target_))
    except Exception as error:  # noqa: BLE001 (no such module or attribute, or the import itself fails)
        raise UserError(f"{key}._target_={spec._target_!r} cannot be imported "
                        f"({type(error).__name__}: {one_line(error)})") from None


def build_model(node: DictConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The `nn.Module` a `model` config node describes.

    A node with a `module` key (conf/model/custom.yaml) builds `node.module`, else the node itself
    (the built-ins' flat configs). Its keys become keyword arguments of the `_target_` callable;
    `in_shape` (a tuple) and `num_classes` are added when the callable declares parameters of those
    names. Any mistake is a one-line UserError.
    """
    spec, key = _spec(node)
    target = _target(spec, key)
    try:
        declared = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        declared = {}
    given = {k: v for k, v in (("in_shape", tuple(in_shape)), ("num_classes", num_classes)) if k in declared}
    # A partial, called here, hands in_shape over as the tuple itself (instantiate would turn it into a
    # ListConfig); config values arrive as plain Python lists and dicts.
    partial = build(spec, "model", _partial_=True, _convert_="all")
    try:
        model = partial(**given)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 (whatever the user's code raises while building is reported)
        raise UserError(f"cannot build model {model_label(node)} from its config "
                        f"({type(error).__name__}: {one_line(error)})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{key}._target_={spec._target_!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_label(node: DictConfig) -> str:
    """The results' `model` column: the node's `name`, or for a user's model (a `module` key) the last
    dotted component of its `_target_` (mypkg.models.Net -> Net)."""
    if "module" in node or "name" not in node:
        spec, _ = _spec(node)
        if "_target_" in spec and not OmegaConf.is_missing(spec, "_target_"):
            return str(spec._target_).rsplit(".", 1)[-1]
    return str(node.get("name"))
