"""Which modules of a model are normalisation layers, and what each one normalises:
torch's classes by class, the user's own classes by a rule (structure, then a probe),
classes a spec names by that name. :func:`hposvc.nn.convert` documents the rule."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hposvc.errors import invalid
from hposvc.nn._layers import NORM_TYPES, ChannelsFirst, ChannelsLast, MapRMSNorm

__all__ = ["NormSite", "find_norm"]

_FIXED_DIMS = {  # norm classes whose input layout says how many spatial axes there are
    1: (nn.BatchNorm1d, nn.LazyBatchNorm1d, nn.InstanceNorm1d, nn.LazyInstanceNorm1d),
    2: (nn.BatchNorm2d, nn.LazyBatchNorm2d, nn.InstanceNorm2d, nn.LazyInstanceNorm2d),
    3: (nn.BatchNorm3d, nn.LazyBatchNorm3d, nn.InstanceNorm3d, nn.LazyInstanceNorm3d),
}
_KINDS = (  # torch's (and hposvc's) norm classes and the kind each is
    (nn.modules.batchnorm._BatchNorm, "batch"),
    (nn.modules.instancenorm._InstanceNorm, "instance"),
    (nn.GroupNorm, "group"),
    (nn.LayerNorm, "layer"),
    ((nn.RMSNorm, MapRMSNorm), "rms"),
)
_BIAS_NAMES = ("bias", "b", "beta", "shift", "offset")  # a norm's additive parameter, by its usual names
# Epsilons in common use: a measured eps within 10 % of one is taken to be it.
_COMMON_EPS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-12)
# Attributes a class named by a spec may keep its channel count in, when it has no 1-D parameter.
_CHANNEL_ATTRS = ("normalized_shape", "num_features", "num_channels", "hidden_size", "dim", "d_model", "n_embd", "channels")


@dataclass(frozen=True)
class NormSite:
    """A normalisation layer found in a model and what it normalises, for :func:`norm_layer`."""

    kind: str | None  # batch, instance, group, layer or rms; None: a spec named it and the probe could not tell
    channels: int
    dims: int  # spatial axes of its channels-first input (0: (N, C) features; channels-last: 0)
    channels_last: bool = False  # input (N, ..., C), normalised over the last axis (LayerNorm(C))
    per_position: bool = False  # channels-first input normalised over C at each position (LayerNorm2d)
    eps: float | None = None  # its epsilon, carried over to the layer that replaces it
    how: str = "class"  # "class" (torch's classes), "rule" (hposvc's probe), "spec" ([model] norm_classes)
    detail: str = ""  # how the rule or spec read it, for conversion.txt

    def describe(self) -> str:
        """What the layer normalises, for ``conversion.txt``.

        >>> NormSite("rms", 64, 0, channels_last=True, eps=1e-6, how="rule", detail="attribute variance_epsilon").describe()
        'by rule: rms norm over the last axis, eps 1e-06 (attribute variance_epsilon)'
        """
        if self.how == "class":
            return "by class"
        what = f"{self.kind} norm" if self.kind else "a norm"
        if self.channels_last:
            where = "over the last axis"
        elif self.per_position:
            where = "over the channels (dim 1) at each position"
        else:
            where = "over channels and positions (dim 1 on)"
        how = "by rule" if self.how == "rule" else "by spec (norm_classes)"
        eps = f", eps {self.eps:g}" if self.eps is not None else ""
        return f"{how}: {what} {where}{eps}" + (f" ({self.detail})" if self.detail else "")


def _class_kind(module: nn.Module) -> str:
    return next(kind for types, kind in _KINDS if isinstance(module, types))


def _class_site(module: nn.Module, previous: int | None) -> NormSite:
    """torch's norm classes: the layout from the class, or for the layout-free ones
    (GroupNorm, SyncBatchNorm, a BatchNorm1d after a Linear) from ``previous``, the output
    layout of the nearest weight layer before it."""
    kind, eps = _class_kind(module), getattr(module, "eps", None)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        shape = tuple(module.normalized_shape)
        if len(shape) == 1:  # over the last axis: an MLP's features or a transformer's tokens
            return NormSite(kind, shape[0], 0, channels_last=True, eps=eps)
        return NormSite(kind, shape[0], min(len(shape) - 1, 3), eps=eps)  # over (C, *spatial)
    if isinstance(module, MapRMSNorm):
        return NormSite(kind, module.num_channels, 2 if previous is None else max(previous, 1), eps=eps)
    channels = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
    for dims, types in _FIXED_DIMS.items():
        if isinstance(module, types):
            # BatchNorm1d takes (N, C) features as well as (N, C, L): after a Linear, the former.
            features = dims == 1 and previous == 0 and isinstance(module, nn.modules.batchnorm._BatchNorm)
            return NormSite(kind, channels, 0 if features else dims, eps=eps)
    # GroupNorm and SyncBatchNorm take any layout: that of the layer before (images if none).
    return NormSite(kind, channels, 2 if previous is None else previous, eps=eps)


def _own_forward(module: nn.Module) -> bool:
    """A subclass of torch's LayerNorm / RMSNorm whose ``forward`` is its own (timm's
    ``LayerNorm2d`` permutes NCHW around ``F.layer_norm``): its class does not say its layout."""
    cls = type(module)
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and not cls.__module__.startswith("torch.") and cls.forward not in (
        nn.LayerNorm.forward,
        nn.RMSNorm.forward,
    )


# -- the probe ------------------------------------------------------------------------------


def _layouts(channels: int) -> list[tuple[str, tuple[int, ...], tuple[tuple[int, ...], ...]]]:
    """Probe inputs: (layout, shape, the axes a norm of that layout may normalise over).
    The positions' extent differs from C, so a norm of the other layout fails or misfits."""
    p = next(n for n in (3, 5, 7) if n != channels)
    return [
        ("last", (2, p, channels), ((-1,),)),
        ("first2", (2, channels, p, p), ((1,), (1, 2, 3))),
        ("first1", (2, channels, p), ((1,), (1, 2))),
    ]


def _reference(kind: str, x: torch.Tensor, axes: tuple[int, ...], eps: float) -> torch.Tensor:
    if kind == "layer":
        x = x - x.mean(axes, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(axes, keepdim=True) + eps)


def _affine(t: torch.Tensor | None, layout: str, ndim: int) -> torch.Tensor | float:
    if t is None:
        return 0.0
    return t if layout == "last" else t.view(-1, *(1,) * (ndim - 2))


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            y = module(x.clone())  # a forward that works in place must not change the probe
    except Exception:  # noqa: BLE001 (the user's forward on an input of the wrong layout: anything can fail)
        return None
    return y if isinstance(y, torch.Tensor) and y.shape == x.shape and y.is_floating_point() else None


def _eps_from_attributes(module: nn.Module) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in vars(module).items()
        if isinstance(value, float) and 0 < value < 1 and not name.startswith("_")
    }


def _name_eps(measured: float, module: nn.Module) -> tuple[float | None, str]:
    """The eps a probe measured, snapped to an attribute holding it or a common value."""
    if not measured == measured or measured < 1e-10:  # NaN, or too small to tell from 0
        attrs = _eps_from_attributes(module)
        if len(attrs) == 1:
            ((name, value),) = attrs.items()
            return value, f"attribute {name}"
        return None, "too small to measure: the replacement uses its default"
    for name, value in _eps_from_attributes(module).items():
        if abs(measured - value) <= 0.1 * value:
            return value, f"attribute {name}"
    for value in _COMMON_EPS:
        if abs(measured - value) <= 0.1 * value:
            return value, "measured"
    return float(f"{measured:.2g}"), "measured"


def _probe(module: nn.Module) -> NormSite | None:
    """Recognise a user's layer or RMS norm by structure, then behaviour (the rule in
    :func:`hposvc.nn.convert`'s docstring)."""
    if next(module.children(), None) is not None:
        return None
    params = dict(module.named_parameters(recurse=False))
    if not 1 <= len(params) <= 2 or any(p.dim() != 1 for p in params.values()):
        return None
    sizes = {p.numel() for p in params.values()}
    channels = sizes.pop()
    if sizes or channels < 2 or any(b.is_floating_point() for b in module.buffers(recurse=False)):
        return None  # running statistics: a batch norm of its own, not a per-sample norm
    try:
        probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    except Exception:  # noqa: BLE001 (a module that cannot be copied to the CPU is not probed)
        return None
    names = sorted(params, key=lambda n: n in _BIAS_NAMES)  # the weight first, then a bias
    roles = [(names[0], None)] if len(names) == 1 else [(names[0], names[1])]
    if len(names) == 2 and names[1] not in _BIAS_NAMES:
        roles.append((names[1], names[0]))
    own = dict(probe.named_parameters(recurse=False))
    ramp = torch.linspace(-1.0, 1.0, channels, dtype=torch.float64)
    weight, bias = 1.0 + 0.25 * ramp, 0.1 * ramp.flip(0)
    gen = torch.Generator().manual_seed(0)
    for layout, shape, axes_options in _layouts(channels):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5  # off-centre: layer and rms differ
        for w_name, b_name in roles:
            with torch.no_grad():
                own[w_name].copy_(weight)
                if b_name is not None:
                    own[b_name].copy_(bias)
            y = _run(probe, x)
            if y is None:
                break  # this layout fails whatever the roles
            w, b = _affine(weight, layout, x.dim()), _affine(bias if b_name else None, layout, x.dim())
            for axes in axes_options:
                for kind in ("layer", "rms"):
                    if not torch.allclose(y, _reference(kind, x, axes, 1e-5) * w + b, rtol=1e-3, atol=1e-3):
                        continue
                    # The eps: from a small input, where it weighs: y = x / sqrt(ms + eps) solved for eps.
                    small = x * 1e-3
                    ys = _run(probe, small)
                    measured = float("nan")
                    if ys is not None:
                        yhat = (ys - b) / w
                        centred = small - small.mean(axes, keepdim=True) if kind == "layer" else small
                        ms = centred.pow(2).mean(axes, keepdim=True)
                        est = (centred / yhat).pow(2) - ms
                        keep = yhat.abs() > 0.1 * yhat.abs().max()
                        measured = float(est[keep].median()) if keep.any() else measured
                    eps, how = _name_eps(measured, module)
                    return NormSite(
                        kind,
                        channels,
                        {"last": 0, "first2": 2, "first1": 1}[layout],
                        channels_last=layout == "last",
                        per_position=layout != "last" and axes == (1,),
                        eps=eps,
                        how="rule",
                        detail=how,
                    )
    return None


def _spec_site(module: nn.Module) -> NormSite:
    """A class the spec names that the probe does not recognise: its channel count from
    its 1-D parameters (or an attribute such as ``normalized_shape``), its layout from
    which probe input it takes, its eps from its one small float attribute."""
    name = type(module).__qualname__
    lengths = [p.numel() for p in module.parameters(recurse=False) if p.dim() == 1]
    channels = lengths[0] if lengths else None
    for attr in _CHANNEL_ATTRS if channels is None else ():
        value = getattr(module, attr, None)
        value = value[-1] if isinstance(value, (tuple, list)) and value else value
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            channels = value
            break
    if channels is None:
        raise invalid(
            "norm_classes", name, "a normalisation class with a channel count",
            hint=(
                f"{name} has no 1-D parameter and no attribute {', '.join(_CHANNEL_ATTRS)} that says how many "
                "channels it normalises. Give it a weight of shape (C,) or one of those attributes."
            ),
        )
    try:
        probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).train(module.training)
    except Exception as e:  # noqa: BLE001
        raise invalid("norm_classes", name, "a module that can run on the CPU", hint=f"Copying it failed: {e}.") from e
    attrs = _eps_from_attributes(module)
    eps = next(iter(attrs.values())) if len(attrs) == 1 else None
    detail = f"attribute {next(iter(attrs))}" if eps is not None else "eps unknown: the replacement uses its default"
    gen = torch.Generator().manual_seed(0)
    for layout, shape, _ in _layouts(channels):
        if _run(probe, torch.randn(shape, generator=gen, dtype=torch.float64)) is not None:
            dims = {"last": 0, "first2": 2, "first1": 1}[layout]
            return NormSite(None, channels, dims, channels_last=layout == "last", eps=eps, how="spec", detail=detail)
    raise invalid(
        "norm_classes", name, "a normalisation class hposvc can run",
        hint=(
            f"{name} ({channels} channels) returned no tensor of its input's shape for channels-last (N, L, C) "
            "nor channels-first (N, C, H, W) / (N, C, L) input, so hposvc cannot tell what it normalises."
        ),
    )


def find_norm(module: nn.Module, previous: int | None, named: Iterable[type] = ()) -> NormSite | None:
    """What ``module`` normalises, or None when it is not a normalisation layer.
    ``previous`` is the output layout of the nearest Linear / Conv before it (0: features,
    1, 2, 3: spatial axes), ``named`` the classes a spec names as norms."""
    named = tuple(named)
    if named and isinstance(module, named):
        site = _probe(module)
        if site is not None:
            return NormSite(site.kind, site.channels, site.dims, site.channels_last, site.per_position, site.eps, "spec", site.detail)
        return _spec_site(module)
    if isinstance(module, ChannelsLast):
        inner = _class_site(module.norm, 1)
        return NormSite(inner.kind, inner.channels, 0, channels_last=True, eps=inner.eps)
    if isinstance(module, ChannelsFirst):
        inner = _class_site(module.norm, 0)
        dims = 2 if previous is None or previous == 0 else previous
        return NormSite(inner.kind, inner.channels, dims, per_position=True, eps=inner.eps)
    if isinstance(module, NORM_TYPES):
        site = _probe(module) if _own_forward(module) else None
        return site if site is not None else _class_site(module, previous)
    if type(module).__module__.startswith("torch."):
        return None
    site = _probe(module)
    if site is not None and site.dims > 0 and previous not in (None, 0):
        # a channels-first norm takes any spatial rank: that of the layer before
        return NormSite(site.kind, site.channels, previous, site.channels_last, site.per_position, site.eps, site.how, site.detail)
    return site
