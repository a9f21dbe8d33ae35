"""hposvc.nn.convert on models hposvc did not build: norm and activation swaps, init
statistics, ``default`` and ``pretrained``, and the errors that say what to change."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hposvc.config import ACTIVATIONS, NORMS
from hposvc.errors import InvalidInputError
from hposvc.nn import (
    ACTIVATION_TYPES,
    NORM_TYPES,
    ChannelsLast,
    MapRMSNorm,
    activation_layer,
    convert,
    convert_with_report,
    zero_init_matrix,
)

try:  # PyPI's torchvision wheels are CUDA builds: beside a CPU-only torch they fail to load
    from torchvision.models import resnet18 as torchvision_resnet18
except Exception:  # ImportError, or RuntimeError "operator torchvision::nms does not exist"
    torchvision_resnet18 = None


# -- models a user might bring ---------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, down to its one ReLU module used twice."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's layout (ImageNet stem, 4 stages of 2 blocks, 64..512
    channels) for machines where torchvision cannot be imported."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, 1 if i == 0 else 2), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's own init, so "default" has something to keep
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10) -> nn.Module:
    return torchvision_resnet18(num_classes=num_classes) if torchvision_resnet18 else ResNet18(num_classes)


class Mixed(nn.Module):
    """Every kind of norm layer, activations of several types, conv and linear parts."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
            nn.Conv2d(8, 12, 3, padding=1), nn.GroupNorm(3, 12), nn.LeakyReLU(0.2),
            nn.Conv2d(12, 12, 3, padding=1), nn.InstanceNorm2d(12), nn.ReLU6(),
            nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.LayerNorm([16, 4, 4]), nn.Hardswish(),
        )
        self.seq = nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ELU())
        self.classifier = nn.Sequential(
            nn.Linear(16 * 16, 32), nn.BatchNorm1d(32), nn.PReLU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU(),
            nn.Linear(32, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 16, 4, 4)
        x = self.seq(x.flatten(2))  # (N, 16, 16)
        return self.classifier(x.flatten(1))


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def activations(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]


# -- norms -----------------------------------------------------------------------------

# Per kind: the norm layer types a converted resnet18 may contain, and its str() names.
RESNET_NORMS = {
    "batch": ({nn.BatchNorm2d}, "BatchNorm2d("),
    "group": ({nn.GroupNorm}, "GroupNorm(4, "),
    "layer": ({nn.GroupNorm}, "GroupNorm(1, "),
    "instance": ({nn.InstanceNorm2d}, "InstanceNorm2d("),
    "rms": ({MapRMSNorm}, "MapRMSNorm("),
    "none": (set(), None),
}


@pytest.mark.parametrize("kind", NORMS)
def test_every_norm_of_a_resnet18_becomes_the_requested_kind(kind: str) -> None:
    torch.manual_seed(0)
    model = resnet18()
    before = len(norm_layers(model))
    assert before == 20
    converted = convert(model, norm=kind, norm_groups=4 if kind == "group" else None)
    types, shown = RESNET_NORMS[kind]
    assert {type(m) for m in norm_layers(converted)} == types
    text = str(converted)
    for other in ("BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm", "RMSNorm"):
        if shown is None or other not in shown:
            assert other not in text, other
    if shown is not None:
        assert text.count(shown) == before
        assert all(m.affine if isinstance(m, nn.InstanceNorm2d) else m.weight is not None for m in norm_layers(converted))
    else:
        assert sum(isinstance(m, nn.Identity) for m in converted.modules()) >= before
    # channel counts follow the layers they replace: bn1 of layer4 has 512 channels
    block = converted.layer4[0]
    if kind != "none":
        assert norm_layers(block)[0].weight.shape == (512,)
    converted.train()  # 64×64, so layer4's maps are 2×2: instance norm needs more than one position
    out = converted(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# kind -> (the layer each norm of Mixed becomes, in order), for kinds valid on all of them
MIXED_NORMS = {
    "batch": [nn.BatchNorm2d] * 4 + [nn.BatchNorm1d, nn.BatchNorm1d, ChannelsLast],
    "group": [nn.GroupNorm] * 6 + [ChannelsLast],
    "layer": [nn.GroupNorm] * 5 + [nn.LayerNorm, nn.LayerNorm],
    "rms": [MapRMSNorm] * 5 + [nn.RMSNorm, nn.RMSNorm],
    "none": [nn.Identity] * 7,
}


@pytest.mark.parametrize("kind", sorted(MIXED_NORMS))
def test_each_norm_kind_and_layout_maps_to_the_right_layer(kind: str) -> None:
    torch.manual_seed(0)
    model = Mixed()
    slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children() if isinstance(child, NORM_TYPES)]
    converted = convert(model, norm=kind, norm_groups=4 if kind == "group" else None)
    got = [type(getattr(parent, name)) for parent, name in slots]
    assert got == MIXED_NORMS[kind]
    if kind == "layer":  # layer norm on maps: one group over (C, H, W); on features: LayerNorm(C)
        assert [m.num_groups for m in converted.modules() if isinstance(m, nn.GroupNorm)] == [1] * 5
    if kind == "batch":  # the BatchNorm1d after a Linear stays a features norm, the one after Conv1d too
        assert type(converted.classifier[1]) is nn.BatchNorm1d and type(converted.seq[1]) is nn.BatchNorm1d
    converted(torch.randn(4, 3, 8, 8)).sum().backward()


def test_instance_norm_on_features_says_which_layer_has_no_spatial_axis() -> None:
    with pytest.raises(InvalidInputError, match="no spatial axis|nothing to average"):
        convert(Mixed(), norm="instance")  # classifier[1] is a BatchNorm1d after a Linear
    convs = nn.Sequential(nn.Conv1d(2, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8))
    out = convert(convs, norm="instance")
    assert [type(m) for m in norm_layers(out)] == [nn.InstanceNorm1d, nn.InstanceNorm2d]
    assert all(m.affine for m in norm_layers(out))


def test_channels_last_norms_normalise_each_channel_over_tokens() -> None:
    # A LayerNorm(C) on (N, T, C) tokens replaced by batch norm: per channel over N and T.
    torch.manual_seed(0)
    tokens = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
    model = convert(tokens, norm="batch").train()
    x = torch.randn(4, 5, 6) * torch.arange(1, 7) + torch.arange(6)
    h = model[0](x)
    expected = (h - h.mean((0, 1))) / torch.sqrt(h.var((0, 1), unbiased=False) + 1e-5)
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert model(x[:, 0]).shape == (4, 6)  # plain (N, C) features work too
    # instance norm needs positions: tokens are fine, (N, C) features fail with a message
    model = convert(nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)), norm="instance")
    assert model(x).shape == x.shape
    with pytest.raises(RuntimeError, match="no position axis"):
        model(x[:, 0])


def test_group_norm_picks_the_largest_divisor_per_layer_and_reports_it() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8),
        nn.Conv2d(8, 7, 1), nn.BatchNorm2d(7), nn.Conv2d(7, 12, 1), nn.GroupNorm(12, 12),
    )
    converted, report = convert_with_report(model, norm="group", norm_groups=4)
    assert [m.num_groups for m in norm_layers(converted)] == [3, 4, 1, 4]
    assert report.norm_groups == {"1": 3, "3": 4, "5": 1, "7": 4}
    assert report.effective_norm_groups == (1, 3, 4)
    assert report.notes == (
        "group norm: 4 groups do not divide 6 channels, so 1 layer(s) use 3 groups",
        "group norm: 4 groups do not divide 7 channels, so 1 layer(s) use 1 groups",
    )
    assert report.norms == ("1", "3", "5", "7")


def test_a_layer_already_of_the_requested_kind_keeps_its_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.GroupNorm(8, 8))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    bn = model[1]
    converted, report = convert_with_report(model, norm="batch")
    assert converted[1] is bn and torch.all(bn.weight == 3.0)
    assert type(converted[3]) is nn.BatchNorm2d and report.norms == ("3",)


def test_the_root_may_be_replaced_and_dtype_and_device_are_kept() -> None:
    assert isinstance(convert(nn.BatchNorm2d(4), norm="none"), nn.Identity)
    assert isinstance(convert(nn.ReLU(), activation="tanh"), nn.Tanh)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU()).double()
    converted = convert(model, norm="group", activation="prelu", norm_groups=2)
    assert {p.dtype for p in converted.parameters()} == {torch.float64}
    converted(torch.randn(1, 3, 5, 5, dtype=torch.float64))


# -- activations -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_every_activation_module_becomes_the_requested_one(kind: str) -> None:
    model = Mixed()
    assert len({type(m) for m in activations(model)}) == 7
    converted = convert(model, activation=kind)
    want = type(activation_layer(kind))
    assert {type(m) for m in activations(converted)} == {want}
    for other in ("SiLU", "LeakyReLU", "ReLU6", "Hardswish", "ELU", "PReLU", "GELU"):
        if other != want.__name__:
            assert not re.search(rf"\b{other}\(", str(converted)), other
    converted(torch.randn(2, 3, 8, 8))


def test_a_shared_activation_module_stays_shared() -> None:
    block = BasicBlock(8, 8)
    converted = convert(block, activation="prelu")
    assert isinstance(converted.relu, nn.PReLU)
    # one module, one slope, for both places the block uses it
    assert [n for n, _ in converted.named_parameters() if n.startswith("relu")] == ["relu.weight"]
    assert converted.relu.weight.numel() == 1


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def test_activation_on_a_model_with_only_functional_calls_says_what_to_do() -> None:
    with pytest.raises(InvalidInputError) as err:
        convert(Functional(), activation="gelu")
    message = str(err.value)
    for words in (
        "the 'activation' parameter must be None for Functional",
        "Got 'gelu' instead.",
        "Functional.forward calls F.relu",
        "use activation modules",
        "`activation_layer` argument",
    ):
        assert words in message, words


def test_norm_and_init_with_nothing_to_act_on_are_errors() -> None:
    with pytest.raises(InvalidInputError, match="Functional has no BatchNorm.*`norm_layer` argument"):
        convert(Functional(), norm="batch")
    with pytest.raises(InvalidInputError, match="'init' parameter must be 'default' or 'pretrained' for ReLU"):
        convert(nn.ReLU(), init="he_normal")
    with pytest.raises(InvalidInputError, match="'norm' parameter must be one of 'none', 'batch'"):
        convert(Functional(), norm="batchnorm")
    with pytest.raises(InvalidInputError, match="'norm_groups' parameter must be None.*norm='group'"):
        convert(Mixed(), norm="batch", norm_groups=4)


# -- init ------------------------------------------------------------------------------


class Wide(nn.Module):
    """Layers wide enough that a sampled variance is within 1 % of its expectation."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(100, 400, 3)  # fan_in 900, fan_out 3600, 360k weights
        self.act = act
        self.fc = nn.Linear(500, 2000)  # fan_in 500, fan_out 2000, 1M weights


def expected_var(scheme: str, slope: float, fan_in: int, fan_out: int) -> float:
    if scheme.startswith("xavier"):
        return 2 / (fan_in + fan_out)
    return 2 / ((1 + slope**2) * fan_in)


@pytest.mark.parametrize(
    ("scheme", "activation", "slope"),
    [
        ("he_normal", "relu", 0.0),
        ("he_uniform", "relu", 0.0),
        ("he_normal", "prelu", 0.25),
        ("he_uniform", "leaky_relu", 0.01),
        ("he_normal", "tanh", 0.0),
        ("xavier_normal", "relu", 0.0),
        ("xavier_uniform", "tanh", 0.0),
    ],
)
def test_init_statistics_match_the_scheme_within_10_percent(scheme: str, activation: str, slope: float) -> None:
    torch.manual_seed(0)
    model = convert(Wide(nn.ReLU()), activation=activation, init=scheme)
    for layer, fan_in, fan_out in ((model.conv, 900, 3600), (model.fc, 500, 2000)):
        want = expected_var(scheme, slope, fan_in, fan_out)
        var = layer.weight.var().item()
        assert abs(var / want - 1) < 0.10, f"{scheme}/{activation}: {var:.3e} vs {want:.3e}"
        assert abs(layer.weight.mean().item()) < 0.05 * math.sqrt(want)
        assert torch.count_nonzero(layer.bias) == 0


def test_he_gain_follows_the_models_own_activation_when_not_converting_it() -> None:
    torch.manual_seed(0)
    model = convert(Wide(nn.PReLU()), init="he_normal")  # PReLU's slope 0.25
    assert abs(model.fc.weight.var().item() / expected_var("he_normal", 0.25, 500, 2000) - 1) < 0.10
    assert abs(model.fc.weight.var().item() / expected_var("he_normal", 0.0, 500, 2000) - 1) > 0.04


def test_normal_and_uniform_use_init_std() -> None:
    torch.manual_seed(0)
    normal = convert(Wide(nn.ReLU()), init="normal", init_std=0.02)
    uniform = convert(Wide(nn.ReLU()), init="uniform", init_std=0.02)
    assert abs(normal.fc.weight.std().item() / 0.02 - 1) < 0.05
    assert uniform.fc.weight.abs().max().item() <= 0.02 and abs(uniform.fc.weight.var().item() / (0.02**2 / 3) - 1) < 0.05
    with pytest.raises(InvalidInputError, match="'init_std' parameter must be a number > 0. Got None"):
        convert(Wide(nn.ReLU()), init="normal")


def test_init_resets_norm_layers_and_zeroes_biases() -> None:
    model = Mixed()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
    model = convert(model, init="xavier_uniform")
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, NORM_TYPES):
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    assert torch.count_nonzero(model.features[1].running_mean) == 0
    assert torch.all(model.classifier[2].weight == 0.5)  # PReLU's slope belongs to the activation


def test_zero_puts_the_zero_matrix_at_every_kernel_centre() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),  # square: identity at the centre
        nn.Conv2d(4, 12, 3, padding=1),  # wider: scaled Hadamard at the centre
        nn.Conv2d(12, 12, 3, padding=1, groups=12),  # depthwise: 1 at each channel's centre
        nn.Conv3d(12, 6, 1),  # narrower: partial identity
    )
    torch.manual_seed(1)
    first = convert(model, init="zero")
    weights = [m.weight.detach().clone() for m in first]
    torch.manual_seed(2)
    again = convert(nn.Sequential(*[type(m)(m.in_channels, m.out_channels, m.kernel_size, groups=m.groups) for m in model]), init="zero")
    assert all(torch.equal(a, b.weight) for a, b in zip(weights, again))  # deterministic
    assert torch.equal(weights[0][:, :, 1, 1], torch.eye(4))
    assert torch.allclose(weights[1][:, :, 1, 1], zero_init_matrix(12, 4))
    assert torch.equal(weights[2][:, 0, 1, 1], torch.ones(12))
    assert torch.equal(weights[3][:, :, 0, 0, 0], torch.eye(6, 12))
    for w in weights[:3]:  # off-centre taps are zero
        mask = torch.ones_like(w, dtype=torch.bool)
        mask[:, :, 1, 1] = False
        assert torch.count_nonzero(w[mask]) == 0
    x = torch.rand(2, 4, 5, 5)
    assert torch.equal(first[0](x), x)  # a square ZerO conv starts as the identity map


def test_default_keeps_the_models_weights_bit_identical() -> None:
    torch.manual_seed(0)
    model = resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p, _ in m.named_parameters()]
    converted = convert(model, norm="group", activation="gelu", init="default")
    after = converted.state_dict()
    assert len(weights) == 20 + 2  # 20 convs, the fc's weight and bias
    assert all(torch.equal(before[k], after[k]) for k in weights)
    # nothing but "default": the whole state_dict, norms and running statistics included
    torch.manual_seed(0)
    model = resnet18()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # move the running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = convert(model, init="default").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- pretrained ------------------------------------------------------------------------


def test_pretrained_loads_into_the_converted_model(tmp_path) -> None:
    torch.manual_seed(0)
    source = convert(Mixed(), norm="group", activation="gelu", init="he_normal", norm_groups=4)
    path = tmp_path / "mixed-group.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = convert(Mixed(), norm="group", activation="gelu", init="pretrained", norm_groups=4, pretrained_path=str(path))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(source.eval()(x), loaded.eval()(x))


def test_pretrained_mismatch_names_the_first_key_and_both_shapes(tmp_path) -> None:
    path = tmp_path / "narrow.pt"
    torch.save(ResNet18(width=32).state_dict(), path)
    with pytest.raises(InvalidInputError) as err:
        convert(ResNet18(width=64), init="pretrained", pretrained_path=str(path))
    message = str(err.value)
    for part in (str(path), "Layer 'conv1.weight'", "(32, 3, 7, 7) in the file", "(64, 3, 7, 7) in the model"):
        assert part in message, part

    batch = tmp_path / "batch.pt"
    torch.save(ResNet18(width=8).state_dict(), batch)
    with pytest.raises(InvalidInputError) as err:
        convert(ResNet18(width=8), norm="layer", init="pretrained", pretrained_path=str(batch))
    assert "unexpected keys: bn1.running_mean, bn1.running_var, bn1.num_batches_tracked" in str(err.value)


# -- the user's resnet18, end to end ---------------------------------------------------


def test_resnet18_with_group_norm_gelu_and_he_init_trains_a_step() -> None:
    torch.manual_seed(0)
    model = convert(resnet18(num_classes=10), norm="group", activation="gelu", init="he_normal", norm_groups=32)
    text = str(model)
    assert "BatchNorm" not in text and "ReLU" not in text
    assert text.count("GroupNorm(32, ") == 20 and "GELU(" in text
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if a.dim() > 1)
    with torch.no_grad():
        assert torch.isfinite(F.cross_entropy(model(x), y))
