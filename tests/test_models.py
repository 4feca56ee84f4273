"""Models: output shapes, initialization, one-line errors, build_model on built-in and custom targets,
and R stacked copies under torch.func.vmap giving each copy's own outputs, gradients and BatchNorm
statistics."""

from __future__ import annotations

import copy
import math
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dropbench.config import UserError
from dropbench.models import (
    CNN,
    GRU,
    MLP,
    ResNet,
    Transformer,
    build_model,
    model_label,
    torchvision_model,
)

SEQ, IMG = (1, 40), (3, 32, 32)

# tiny widths: the properties checked do not depend on size
TINY = {
    "mlp": (MLP, {"hidden": [8, 8]}),
    "logreg": (MLP, {"hidden": []}),
    "cnn": (CNN, {"channels": [4, 4], "kernel_sizes": [3, 3], "strides": [2, 2], "paddings": [1, 1], "hidden": [8]}),
    "resnet": (ResNet, {"depth": 8, "width": 4}),
    "gru": (GRU, {"hidden": 3}),
    "transformer": (Transformer, {"d_model": 8, "heads": 2, "layers": 1, "ff_dim": 16}),
}
SEQUENCE_MODELS = ["mlp", "logreg", "cnn", "gru", "transformer"]
IMAGE_MODELS = ["mlp", "logreg", "cnn", "resnet"]


def tiny(name, in_shape, num_classes=10):
    kind, kwargs = TINY[name]
    return kind(in_shape, num_classes, **kwargs)


@pytest.mark.parametrize("name, in_shape", [(n, SEQ) for n in SEQUENCE_MODELS] + [(n, IMG) for n in IMAGE_MODELS])
def test_output_shapes(name, in_shape):
    assert tiny(name, in_shape)(torch.randn(5, *in_shape)).shape == (5, 10)


@pytest.mark.parametrize("name, in_shape", [("mlp", SEQ), ("cnn", SEQ), ("cnn", IMG), ("resnet", IMG),
                                            ("resnet", (1, 28, 28)), ("gru", SEQ), ("transformer", SEQ)])
def test_default_settings_give_logits(name, in_shape):
    kind = TINY[name][0]
    assert kind(in_shape, 10)(torch.randn(2, *in_shape)).shape == (2, 10)


def test_resnet20_has_the_papers_parameter_count():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters
    assert round(sum(p.numel() for p in ResNet(IMG, 10).parameters()) / 1e6, 2) == 0.27
    blocks = [m for m in ResNet(IMG, 10, depth=32).modules() if type(m).__name__ == "_BasicBlock"]
    assert len(blocks) == 15  # 3 stages of n = (32 - 2) / 6


def test_gru_defaults_are_the_mnist1d_papers():
    # GRUBase in github.com/greydanus/mnist1d: bidirectional, 6 units, all 40 steps into Linear(480, 10)
    model = GRU(SEQ, 10)
    assert len(model.directions) == 2 and model.head.in_features == 2 * 6 * 40
    assert sum(p.numel() for p in model.parameters()) == 2 * (3 * 6 * (1 + 6) + 2 * 3 * 6) + 480 * 10 + 10


def test_gru_direction_computes_what_nn_gru_computes():
    gru = GRU((2, 7), 10, hidden=3)
    reference = nn.GRU(2, 3, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for suffix, direction in zip(("", "_reverse"), gru.directions):
            getattr(reference, f"weight_ih_l0{suffix}").copy_(direction.input.weight)
            getattr(reference, f"bias_ih_l0{suffix}").copy_(direction.input.bias)
            getattr(reference, f"weight_hh_l0{suffix}").copy_(direction.recurrent.weight)
            getattr(reference, f"bias_hh_l0{suffix}").copy_(direction.recurrent.bias)
    x = torch.randn(4, 2, 7)
    ours = torch.cat([d(x.transpose(1, 2)) for d in gru.directions], dim=-1)
    torch.testing.assert_close(ours, reference(x.transpose(1, 2))[0])


def test_mlp_parameter_count_matches_a_plain_mlp():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    count = sum(p.numel() for p in MLP((1, 28, 28), 10, hidden=[256, 256]).parameters())
    assert count == sum(p.numel() for p in plain.parameters())


def test_default_init_draws_what_pytorch_layers_draw():
    torch.manual_seed(3)
    mlp = MLP(SEQ, 10, hidden=[8])
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 10))
    torch.manual_seed(4)
    cnn = CNN(SEQ, 10, channels=[4], kernel_sizes=[5], strides=[2], paddings=[1])
    torch.manual_seed(4)
    plain_cnn = nn.Sequential(nn.Conv1d(1, 4, 5, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 19, 10))
    for ours, theirs in ((mlp, plain), (cnn, plain_cnn)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


@pytest.mark.parametrize("name, in_shape", [("mlp", SEQ), ("cnn", IMG), ("resnet", IMG), ("gru", SEQ),
                                            ("transformer", SEQ)])
def test_the_same_seed_builds_the_same_weights(name, in_shape):
    torch.manual_seed(11)
    a = tiny(name, in_shape).state_dict()
    torch.manual_seed(11)
    b = tiny(name, in_shape).state_dict()
    torch.manual_seed(12)
    c = tiny(name, in_shape).state_dict()
    first = next(iter(a))  # the first layer's weight
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a[first], c[first])


def linears(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def test_normal_init_uses_std_and_zero_bias():
    layer = linears(MLP((1, 28, 28), 10, hidden=[256], init="normal", init_std=0.01))[0]
    assert abs(layer.weight.std().item() - 0.01) < 0.0005 and torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("init, std", [("xavier", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
                                       ("kaiming", lambda fan_in, fan_out: math.sqrt(2 / fan_in))])
def test_xavier_and_kaiming_init(init, std):
    layer = linears(MLP((1, 28, 28), 10, hidden=[300], init=init))[0]  # 784 -> 300
    assert abs(layer.weight.std().item() / std(784, 300) - 1) < 0.02 and torch.count_nonzero(layer.bias) == 0


def test_resnet_uses_he_init_by_default():
    conv = linears(ResNet(IMG, 10, depth=8, width=8))[1]  # a 3x3 conv of 8 -> 8 channels: fan_in 72
    assert abs(conv.weight.std().item() / math.sqrt(2 / 72) - 1) < 0.1


@pytest.mark.parametrize("build, match", [
    (lambda: MLP(SEQ, 10, activation="swish"), r"^model.activation='swish' is not allowed; choose from relu"),
    (lambda: MLP(SEQ, 10, hidden=[], activation="swish"), r"^model.activation='swish'"),
    (lambda: MLP(SEQ, 10, init="zeros"), r"^model.init='zeros' is not allowed; choose from default"),
    (lambda: MLP(SEQ, 10, init="normal", init_std=0), r"^model.init_std=0 "),
    (lambda: MLP(SEQ, 10, hidden=100), r"^model.hidden=100 is not allowed; it must be a list"),
    (lambda: MLP(SEQ, 10, hidden=[100, 0]), r"^model.hidden=\[100, 0\] is not allowed"),
    (lambda: CNN((1, 2), 10), "too small for 3 conv layers"),
    (lambda: CNN((40,), 10), r"needs \[C, L\] or \[C, H, W\] inputs, the dataset gives \[40\]"),
    (lambda: CNN(SEQ, 10, channels=[4, 4]), "must have the same length"),
    (lambda: CNN(SEQ, 10, paddings=[1, -1, 1]), r"^model.paddings="),
    (lambda: ResNet(SEQ, 10), r"model resnet needs \[C, H, W\] images, the dataset gives \[1, 40\]"),
    (lambda: ResNet(IMG, 10, depth=21), r"^model.depth=21 is not allowed; it must be 6n\+2"),
    (lambda: GRU(IMG, 10), r"model gru needs \[C, L\] sequences"),
    (lambda: GRU(SEQ, 10, bidirectional="yes"), r"^model.bidirectional='yes'"),
    (lambda: Transformer(SEQ, 10, d_model=10, heads=4), r"^model.d_model=10 is not allowed; it must be a multiple"),
    (lambda: Transformer(SEQ, 10, activation="swish"), r"^model.activation='swish'"),
    (lambda: torchvision_model(IMG, 10, name="resnet7"), r"^model.name='resnet7' is not a torchvision .*resnet18"),
    (lambda: torchvision_model((1, 28, 28), 10), r"needs \[3, H, W\] images, the dataset gives \[1, 28, 28\]"),
    (lambda: torchvision_model(IMG, 10, name="vit_b_16"), r"cannot take \[3, 32, 32\] inputs .*224"),
    pytest.param(lambda: torchvision_model(IMG, 10, name="googlenet"), r"returns GoogLeNetOutputs in training mode",
                 marks=pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")),
    (lambda: torchvision_model(IMG, 10, widht=2), r"cannot build torchvision model resnet18 \(TypeError"),
])
def test_bad_settings_are_one_line_user_errors(build, match):
    with pytest.raises(UserError, match=match) as error:
        build()
    assert "\n" not in str(error.value)


def test_torchvision_resnet18_gives_logits():
    model = torchvision_model(IMG, 10)
    assert model(torch.randn(2, *IMG)).shape == (2, 10)


# --- build_model / model_label ---------------------------------------------------------------------

@pytest.fixture
def user_models(monkeypatch):
    """A module `usermodels` with targets of each kind of signature."""
    module = types.ModuleType("usermodels")

    class Both(nn.Module):
        def __init__(self, in_shape, num_classes, width=4):
            super().__init__()
            self.in_shape, self.widths = in_shape, width
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.ReLU(),
                                     nn.Linear(width, num_classes))

        def forward(self, x):
            return self.net(x)

    def classes_only(num_classes, sizes=(40,)):
        return nn.Sequential(nn.Flatten(), nn.Linear(sizes[0], num_classes))

    def neither(hidden):
        return nn.Sequential(nn.Flatten(), nn.Linear(40, hidden))

    module.Both, module.classes_only, module.neither = Both, classes_only, neither
    module.not_a_module = lambda num_classes: "a string"
    module.raises = lambda: 1 / 0
    monkeypatch.setitem(sys.modules, "usermodels", module)
    return module


def custom(target, **kwargs):
    return OmegaConf.create({"name": "custom", "module": {"_target_": target, **kwargs}})


def test_build_model_passes_in_shape_and_num_classes_only_to_callables_that_declare_them(user_models):
    both = build_model(custom("usermodels.Both", width=6), [1, 40], 10)
    assert both.in_shape == (1, 40) and both.widths == 6 and both(torch.randn(3, *SEQ)).shape == (3, 10)
    only = build_model(custom("usermodels.classes_only", sizes=[40]), SEQ, 7)
    assert only(torch.randn(3, *SEQ)).shape == (3, 7)
    neither = build_model(custom("usermodels.neither", hidden=5), SEQ, 10)
    assert neither(torch.randn(3, *SEQ)).shape == (3, 5)


def test_build_model_on_flat_built_in_nodes():
    node = OmegaConf.create({"_target_": "dropbench.models.MLP", "name": "mlp", "hidden": [8, 8]})
    model = build_model(node, SEQ, 10)
    assert [m.out_features for m in linears(model)] == [8, 8, 10] and model_label(node) == "mlp"
    node = OmegaConf.create({"_target_": "dropbench.models.torchvision_model", "name": "resnet18"})
    assert model_label(node) == "resnet18"


@pytest.mark.parametrize("node, match", [
    (custom("???"), r"^model.module._target_ is not set"),
    (custom("usermodels.Nope"), r"^model.module._target_='usermodels.Nope' cannot be imported"),
    (custom("usermodels.not_a_module"),
     r"^model.module._target_='usermodels.not_a_module' returned str, not a torch.nn.Module"),
    (custom("usermodels.Both", depth=3),
     r"^model.module.depth=3 is not an argument of Both; did you mean model.module.width\?"),
    (custom("usermodels.raises"), r"^cannot build model raises from its config \(ZeroDivisionError"),
    (OmegaConf.create({"_target_": "dropbench.models.MLP", "name": "mlp", "hidden": [8], "activation": "x"}),
     r"^model.activation='x' is not allowed"),
])
def test_build_model_errors_are_one_line(user_models, node, match):
    with pytest.raises(UserError, match=match) as error:
        build_model(node, SEQ, 10)
    assert "\n" not in str(error.value)


def test_model_label_of_a_custom_model_is_the_targets_last_component():
    assert model_label(custom("mypkg.models.Net")) == "Net"


def test_conf_model_yamls_build():
    from pathlib import Path
    conf = Path(__file__).parent.parent / "conf" / "model"
    names = {p.stem for p in conf.glob("*.yaml")}
    assert names >= {"mlp", "logreg", "cnn", "resnet", "gru", "transformer", "torchvision", "custom"}
    for name in ("gru", "transformer", "cnn"):
        node = OmegaConf.load(conf / f"{name}.yaml")
        assert model_label(node) == name and build_model(node, SEQ, 10)(torch.randn(2, *SEQ)).shape == (2, 10)


# --- R stacked copies under vmap --------------------------------------------------------------------

def stacked_forward(models, x, train):
    """R copies as one function of stacked parameters, vmapped over the replica dimension."""
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    base.train(train)

    def one(p, b, xk):
        return torch.func.functional_call(base, (p, b), (xk,))

    out = torch.func.vmap(one, in_dims=(0, 0, 0), randomness="different")(params, buffers, x)
    return out, params, buffers


VMAP_CASES = [("mlp", SEQ), ("cnn", SEQ), ("cnn", IMG), ("resnet", IMG), ("gru", SEQ), ("transformer", SEQ)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, in_shape", VMAP_CASES + [("torchvision", IMG)])
def test_stacked_copies_under_vmap_give_each_copys_own_outputs(name, in_shape, train):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(torchvision_model(in_shape, 10) if name == "torchvision" else tiny(name, in_shape))
    # torchvision's ResNet reaches 1x1 feature maps on 32x32 images: BatchNorm statistics over a batch
    # of 4 values would amplify rounding differences past the tolerance
    x = torch.randn(3, 16 if name == "torchvision" else 4, *in_shape)
    out, _, buffers = stacked_forward(models, x, train)
    for k, model in enumerate(models):
        model.train(train)
        torch.testing.assert_close(out[k], model(x[k]), atol=1e-5, rtol=1e-4)
        # BatchNorm updated replica k's running statistics exactly as the model's own forward did
        for key, value in model.named_buffers():
            torch.testing.assert_close(buffers[key][k], value, atol=1e-5, rtol=1e-4)
    if name in ("resnet", "torchvision") and train:
        assert any("running_mean" in key for key in buffers)


@pytest.mark.parametrize("name, in_shape", VMAP_CASES)
def test_gradients_reach_the_stacked_parameters(name, in_shape):
    models = [tiny(name, in_shape) for _ in range(2)]
    out, params, _ = stacked_forward(models, torch.randn(2, 4, *in_shape), train=True)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params.values())
    assert all(p.grad.abs().sum() > 0 for p in params.values())
