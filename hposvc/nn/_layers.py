"""The layer builders every model uses: activations and normalisation layers.

Built-in families and :func:`hposvc.nn.convert` both build their layers here, so a
"group" norm or a "prelu" activation is the same module whichever way a model got it.
"""

from __future__ import annotations

import torch
from torch import nn

from hposvc.config import ACTIVATIONS, NORMS
from hposvc.errors import invalid

__all__ = [
    "ACTIVATION_TYPES",
    "DEFAULT_NORM_GROUPS",
    "NORM_TYPES",
    "NORM_EPS",
    "ChannelsFirst",
    "ChannelsLast",
    "MapRMSNorm",
    "activation_layer",
    "group_count",
    "negative_slope",
    "norm_layer",
]

DEFAULT_NORM_GROUPS = 4  # TrialConfig's norm_groups when a spec searches group norm without one
# The eps of every norm layer hposvc builds, rms included: torch's default for batch,
# instance, group and layer norm. Not torch.nn.RMSNorm's own default (None: the dtype's
# machine epsilon, 1.2e-7 in float32) nor LLaMA's 1e-6, so that a search over norm kinds
# compares normalisations, not epsilons. convert() carries a replaced layer's eps over.
NORM_EPS = 1e-5

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=0.01),
    "prelu": nn.PReLU,  # one learnable slope shared by all channels, starting at 0.25
    "gelu": nn.GELU,
    "mish": nn.Mish,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softsign": nn.Softsign,
}
# Slope on the negative side at init, for He's gain sqrt(2 / (1 + a²)) (He et al. 2015).
_NEGATIVE_SLOPES = {"leaky_relu": 0.01, "prelu": 0.25}

# Element-wise activation modules that convert() replaces (subclasses included; ReLU6 is
# a Hardtanh). Softmax/LogSoftmax (outputs), GLU (halves a dimension), Threshold and
# MultiheadAttention are not element-wise activations of a hidden layer and stay.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.LogSigmoid,
    nn.Tanh,
    nn.Softsign,
    nn.Softplus,
)
# Normalisation layers that convert() replaces, subclasses (SyncBatchNorm, the lazy
# variants) included. torch has no public base class for batch / instance norm.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)  # and hposvc's MapRMSNorm, added below

_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def activation_layer(kind: str) -> nn.Module:
    """A fresh activation module of ``kind`` (one of :data:`hposvc.config.ACTIVATIONS`).

    Pass it where torchvision-style factories take an ``activation_layer``:

    >>> activation_layer("leaky_relu")
    LeakyReLU(negative_slope=0.01)
    >>> [type(activation_layer(k)).__name__ for k in ("prelu", "gelu", "softsign")]
    ['PReLU', 'GELU', 'Softsign']
    """
    if kind not in _ACTIVATIONS:
        raise invalid("activation", kind, ACTIVATIONS)
    return _ACTIVATIONS[kind]()


def negative_slope(activation: str | nn.Module | None) -> float:
    """The slope ``a`` of an activation's negative side at init, for He's gain
    ``sqrt(2 / (1 + a²))``: 0.01 for leaky ReLU, PReLU's current slope (0.25 when new),
    0 for everything else (He's scheme is ReLU's for any other activation).

    >>> negative_slope("prelu"), negative_slope(nn.LeakyReLU(0.2)), negative_slope("tanh")
    (0.25, 0.2, 0.0)
    """
    if isinstance(activation, nn.LeakyReLU):
        return float(activation.negative_slope)
    if isinstance(activation, nn.PReLU):
        return float(activation.weight.detach().mean())
    if isinstance(activation, str):
        return _NEGATIVE_SLOPES.get(activation, 0.0)
    return 0.0


def group_count(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``: group norm needs
    equal groups, so 4 groups requested on 6 channels become 3.

    >>> group_count(64, 4), group_count(6, 4), group_count(7, 4)
    (4, 3, 1)
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise invalid("norm_groups", groups, "an integer >= 1")
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


class ChannelsLast(nn.Module):
    """Runs a channels-first norm on channels-last input ``(N, ..., C)`` (a transformer's
    tokens, an MLP's features): moves C to dim 1, flattens the positions into one length
    axis, normalises, and moves C back. :func:`norm_layer` builds it with
    ``channels_last=True``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            if isinstance(self.norm, nn.modules.instancenorm._InstanceNorm):
                raise RuntimeError(
                    "instance norm got (N, C) features: each channel has one value per sample, so "
                    "there is no position axis to normalise over. Use 'layer', 'group' or 'batch' norm."
                )
            return self.norm(x)
        y = x.movedim(-1, 1)
        return self.norm(y.flatten(2)).reshape(y.shape).movedim(1, -1)


class ChannelsFirst(nn.Module):
    """Runs a channels-last norm (``nn.LayerNorm(C)``, ``nn.RMSNorm(C)``) on channels-first
    input ``(N, C, *spatial)``, so that it normalises over the C channels at each position:
    what ConvNeXt's and SAM's ``LayerNorm2d`` do. :func:`norm_layer` builds it with
    ``per_position=True``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class MapRMSNorm(nn.Module):
    """RMS norm of channels-first maps ``(N, C, *spatial)``: each sample is divided by the
    root mean square of all its values (over C and the positions, like hposvc's layer norm
    ``GroupNorm(1, C)`` but without subtracting the mean), then scaled per channel.

    >>> norm = MapRMSNorm(3)
    >>> y = norm(torch.full((2, 3, 4, 4), 2.0)).detach()
    >>> y.shape, round(float(y[0, 0, 0, 0]), 4)
    (torch.Size([2, 3, 4, 4]), 1.0)
    """

    def __init__(self, num_channels: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = tuple(range(1, x.dim()))
        y = x * torch.rsqrt(x.pow(2).mean(axes, keepdim=True) + self.eps)
        return y * self.weight.view(-1, *(1,) * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


NORM_TYPES += (MapRMSNorm,)


def norm_layer(
    kind: str,
    channels: int,
    dims: int = 2,
    *,
    groups: int = DEFAULT_NORM_GROUPS,
    channels_last: bool = False,
    per_position: bool = False,
    eps: float | None = None,
) -> nn.Module:
    """The ``kind`` normalisation layer for ``channels`` channels.

    ``dims`` is the number of spatial axes of a channels-first input ``(N, C, *spatial)``:
    0 for ``(N, C)`` features (after a Linear), 1 for ``(N, C, L)``, 2 for images ``(N, C,
    H, W)``, 3 for volumes. What each kind averages over (statistics per ...):

    ======== ========================================== =================================
    kind     features ``(N, C)``                        maps ``(N, C, *spatial)``
    ======== ========================================== =================================
    none     ``nn.Identity``                            ``nn.Identity``
    batch    feature, over N (BatchNorm1d)              channel, over N and positions
    layer    sample, over C (LayerNorm(C))              sample, over C and positions
                                                        (GroupNorm(1, C))
    rms      sample, over C (RMSNorm(C))                sample, over C and positions
                                                        (:class:`MapRMSNorm`)
    group    sample and group of C/G features           sample and group, over C/G and
                                                        positions (GroupNorm(G, C))
    instance (error: no spatial axis)                   sample and channel, over positions
                                                        (InstanceNormNd, affine)
    ======== ========================================== =================================

    Layer norm on feature maps is ``GroupNorm(1, C)``: one group over (C, H, W) with a
    per-channel affine. That is layer norm as Ba et al. define it (all the units of a
    layer) and as the GroupNorm paper (Wu & He 2018) uses it on conv nets; it works for
    any spatial size, it is what hposvc's 1-D CNN has always used, and it is the one
    layer norm that keeps the per-sample, cross-channel statistics that make it differ
    from instance norm. The alternative, per position over channels only (ConvNeXt's
    ``LayerNorm2d``), is a different normalisation that needs permutes around a
    ``nn.LayerNorm(C)``; a ``nn.LayerNorm`` over ``[C, H, W]`` would tie the model to one
    image size and learn a scale per pixel.

    RMS norm (Zhang & Sennrich 2019) is layer norm without subtracting the mean and
    without a bias, over the same values layer norm uses in the same place: a sample's C
    features (``torch.nn.RMSNorm(C)``) or, on maps, a sample's C channels and positions
    (:class:`MapRMSNorm`, a per-channel scale), so that ``layer`` and ``rms`` differ only
    in the centring.

    Group norm uses :func:`group_count` ``(channels, groups)`` groups (the largest
    divisor at most ``groups``); read ``.num_groups`` on the result. Every layer has
    affine parameters (instance norm included) starting at weight 1 / bias 0 (rms: a
    weight only).

    ``channels_last=True`` builds the layer for inputs ``(N, ..., C)`` (a transformer's
    tokens): ``layer`` is ``nn.LayerNorm(C)``, ``rms`` is ``nn.RMSNorm(C)``, other kinds
    are wrapped in :class:`ChannelsLast`. ``per_position=True`` builds ``layer`` and
    ``rms`` for channels-first maps normalised over C at each position (ConvNeXt's
    ``LayerNorm2d``): ``nn.LayerNorm(C)`` / ``nn.RMSNorm(C)`` in :class:`ChannelsFirst`;
    other kinds ignore it.

    ``eps`` is the layer's epsilon; None gives :data:`NORM_EPS` (1e-5) for every kind,
    ``rms`` included (torch's RMSNorm would default to the dtype's machine epsilon).

    >>> norm_layer("batch", 16, 2)
    BatchNorm2d(16, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    >>> norm_layer("layer", 16, 2)  # over (C, H, W): one group
    GroupNorm(1, 16, eps=1e-05, affine=True, bias=True)
    >>> type(norm_layer("layer", 16, 0)).__name__, type(norm_layer("instance", 16, 3)).__name__
    ('LayerNorm', 'InstanceNorm3d')
    >>> norm_layer("rms", 16, 0), norm_layer("rms", 16, 2, eps=1e-6)
    (RMSNorm((16,), eps=1e-05, elementwise_affine=True), MapRMSNorm(16, eps=1e-06))
    >>> norm_layer("rms", 16, 2, per_position=True)  # over C at each pixel
    ChannelsFirst(
      (norm): RMSNorm((16,), eps=1e-05, elementwise_affine=True)
    )
    >>> norm_layer("group", 24, 2, groups=16).num_groups  # 16 does not divide 24
    12
    """
    if kind not in NORMS:
        raise invalid("norm", kind, NORMS)
    if isinstance(dims, bool) or not isinstance(dims, int) or not 0 <= dims <= 3:
        raise invalid("dims", dims, "0 (features), 1, 2 or 3 (spatial axes)")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise invalid(
            "channels", channels, "an integer >= 1",
            hint="A lazy layer has no channel count until its first forward call: run one batch first.",
        )
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
        raise invalid("eps", eps, "a number > 0, or None for 1e-5")
    eps = NORM_EPS if eps is None else float(eps)
    if kind == "none":
        return nn.Identity()
    if kind in ("layer", "rms") and (channels_last or dims == 0 or per_position):
        norm = nn.LayerNorm(channels, eps=eps) if kind == "layer" else nn.RMSNorm(channels, eps=eps)
        return ChannelsFirst(norm) if per_position and not channels_last and dims > 0 else norm
    if channels_last:
        return ChannelsLast(norm_layer(kind, channels, 1, groups=groups, eps=eps))
    if kind == "batch":
        return _BATCH[max(dims, 1)](channels, eps=eps)
    if kind == "group":
        return nn.GroupNorm(group_count(channels, groups), channels, eps=eps)
    if kind == "layer":
        return nn.GroupNorm(1, channels, eps=eps)
    if kind == "rms":
        return MapRMSNorm(channels, eps=eps)
    if dims == 0:
        raise invalid(
            "norm",
            kind,
            ("none", "batch", "layer", "group", "rms"),
            hint=(
                "Instance norm normalises each channel of each sample over a spatial axis, but "
                "features after a Linear layer have one value per channel per sample, so there is "
                "nothing to average. Use 'layer', 'rms' or 'group' (per sample) or 'batch' norm, or a "
                "convolutional model (the 1-D CNN of mnist1d, cnn2d, resnet), where instance norm "
                "is meaningful."
            ),
        )
    return _INSTANCE[dims](channels, affine=True, eps=eps)
