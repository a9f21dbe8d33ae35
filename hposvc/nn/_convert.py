"""Swap the normalisation and activation layers of any ``nn.Module`` and initialise it:
how hposvc applies a trial's norm, activation and init to a user's own model."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from hposvc.config import ACTIVATIONS, NORMS
from hposvc.errors import invalid
from hposvc.nn._init import INIT_SCHEMES, WEIGHT_TYPES, initialise
from hposvc.nn._layers import (
    ACTIVATION_TYPES,
    DEFAULT_NORM_GROUPS,
    NORM_TYPES,
    ChannelsLast,
    activation_layer,
    negative_slope,
    norm_layer,
)

__all__ = ["ConversionReport", "convert", "convert_with_report"]

_FIXED_DIMS = {  # norm classes whose input layout says how many spatial axes there are
    1: (nn.BatchNorm1d, nn.LazyBatchNorm1d, nn.InstanceNorm1d, nn.LazyInstanceNorm1d),
    2: (nn.BatchNorm2d, nn.LazyBatchNorm2d, nn.InstanceNorm2d, nn.LazyInstanceNorm2d),
    3: (nn.BatchNorm3d, nn.LazyBatchNorm3d, nn.InstanceNorm3d, nn.LazyInstanceNorm3d),
}
_LAYER_DIMS = (  # weight layers and the spatial axes of their output
    (nn.Linear, 0),
    ((nn.Conv1d, nn.ConvTranspose1d), 1),
    ((nn.Conv2d, nn.ConvTranspose2d), 2),
    ((nn.Conv3d, nn.ConvTranspose3d), 3),
)
# Activation calls in a forward's source that no module swap can reach.
_FUNCTIONAL = re.compile(
    r"\b(?:F|functional|torch)\.(?:relu6?|leaky_relu|prelu|rrelu|elu|celu|selu|gelu|silu|mish|hardswish|"
    r"hardsigmoid|hardtanh|sigmoid|logsigmoid|tanh|softsign|softplus)_?(?=\s*\()"
    r"|\.(?:relu|sigmoid|tanh)_?\(\)"
)


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_with_report` changed, for a trial's record."""

    norms: tuple[str, ...] = ()  # normalisation layers replaced (names in the converted model)
    activations: tuple[str, ...] = ()  # activation modules replaced
    initialised: tuple[str, ...] = ()  # Linear / Conv layers whose weight the init scheme set
    norm_groups: Mapping[str, int] = field(default_factory=dict)  # group-norm layer -> groups used
    notes: tuple[str, ...] = ()  # sentences for the trial's log, e.g. a group count that had to change

    @property
    def effective_norm_groups(self) -> tuple[int, ...]:
        """The distinct group counts the group-norm layers use, e.g. ``(3, 4)``."""
        return tuple(sorted(set(self.norm_groups.values())))

    def describe(self) -> str:
        """A few lines for a trial's record (``conversion.txt``).

        >>> print(ConversionReport(norms=("1",), norm_groups={"1": 3}, notes=("3 groups, not 4",)).describe())
        norm layers replaced: 1 (1)
        activation modules replaced: 0
        weight layers initialised: 0
        group norm groups: 3
        note: 3 groups, not 4
        """

        def listing(names: tuple[str, ...]) -> str:
            shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
            return f"{len(names)} ({shown})" if names else "0"

        lines = [
            f"norm layers replaced: {listing(self.norms)}",
            f"activation modules replaced: {listing(self.activations)}",
            f"weight layers initialised: {listing(self.initialised)}",
        ]
        if self.norm_groups:
            lines.append("group norm groups: " + ", ".join(map(str, self.effective_norm_groups)))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _output_dims(module: nn.Module) -> int | None:
    for types, dims in _LAYER_DIMS:
        if isinstance(module, types):
            return dims
    return None


def _norm_geometry(module: nn.Module, previous: int | None) -> tuple[int, int, bool]:
    """(channels, spatial axes, channels_last) of the input a norm layer normalises.
    ``previous`` is the output layout of the nearest weight layer before it."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        shape = tuple(module.normalized_shape)
        if len(shape) == 1:  # over the last axis: an MLP's features or a transformer's tokens
            return shape[0], 0, True
        return shape[0], min(len(shape) - 1, 3), False  # over (C, *spatial)
    channels = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
    for dims, types in _FIXED_DIMS.items():
        if isinstance(module, types):
            # BatchNorm1d takes (N, C) features as well as (N, C, L): after a Linear, the former.
            features = dims == 1 and previous == 0 and isinstance(module, nn.modules.batchnorm._BatchNorm)
            return channels, 0 if features else dims, False
    # GroupNorm and SyncBatchNorm take any layout: that of the layer before (images if none).
    return channels, 2 if previous is None else previous, False


def _place(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on the device and in the float dtype of the layer it replaces."""
    for t in (*old.parameters(recurse=True), *old.buffers(recurse=True)):
        if t.is_floating_point():
            return new.to(device=t.device, dtype=t.dtype)
    return new


def _functional_calls(model: nn.Module) -> list[str]:
    found = []
    for cls in dict.fromkeys(type(m) for m in model.modules()):
        if cls.__module__.startswith("torch."):
            continue
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        calls = sorted(set(_FUNCTIONAL.findall(source)))
        if calls:
            found.append(f"{cls.__name__}.forward calls {', '.join(calls)}")
    return found


def _check_targets(model: nn.Module, *, norm: str | None, activation: str | None, init: str | None) -> None:
    """A dimension that is given must have something to act on, or every trial of a
    search over it would train the same model."""
    name = type(model).__name__
    modules = list(model.modules())
    if norm is not None and not any(isinstance(m, NORM_TYPES) for m in modules):
        raise invalid(
            "norm", norm, f"None for {name}, which has no normalisation layer",
            hint=(
                f"{name} has no BatchNorm, InstanceNorm, GroupNorm, LayerNorm or RMSNorm layer for hposvc "
                "to replace. Put one where each should go (any kind: hposvc swaps it for the trial's), or "
                "build them from the factory's `norm_layer` argument, or leave norm out of the search."
            ),
        )
    if activation is not None and not any(isinstance(m, ACTIVATION_TYPES) for m in modules):
        calls = _functional_calls(model)
        seen = f" ({'; '.join(calls)}, which no module swap can reach)" if calls else ""
        raise invalid(
            "activation", activation, f"None for {name}, which has no activation module",
            hint=(
                f"{name} has no activation module to replace{seen}. Functional calls such as F.relu "
                "inside forward cannot be replaced: use activation modules (self.act = nn.ReLU()) or "
                "accept an `activation_layer` argument in the factory and build them from it."
            ),
        )
    if init not in (None, "default", "pretrained") and not any(isinstance(m, WEIGHT_TYPES) for m in modules):
        raise invalid(
            "init", init, f"'default' or 'pretrained' for {name}, which has no Linear or Conv layer",
            hint="Init schemes set the weights of nn.Linear and nn.Conv1d/2d/3d layers only.",
        )


def convert_with_report(
    model: nn.Module,
    *,
    norm: str | None = None,
    activation: str | None = None,
    init: str | None = None,
    norm_groups: int | None = None,
    init_std: float | None = None,
    pretrained_path: str | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """:func:`convert`, also returning a :class:`ConversionReport` of what changed.

    >>> net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    >>> net, report = convert_with_report(net, norm="group", norm_groups=4)
    >>> net[1], report.norm_groups, report.notes
    (GroupNorm(3, 6, eps=1e-05, affine=True, bias=True), {'1': 3}, ('group norm: 4 groups do not divide 6 channels, so 1 layer(s) use 3 groups',))
    """
    if norm is not None and norm not in NORMS:
        raise invalid("norm", norm, (*NORMS, None))
    if activation is not None and activation not in ACTIVATIONS:
        raise invalid("activation", activation, (*ACTIVATIONS, None))
    if init is not None and init not in INIT_SCHEMES:
        raise invalid("init", init, (*INIT_SCHEMES, None))
    if norm_groups is not None and norm != "group":
        raise invalid("norm_groups", norm_groups, "None", hint=f"It only applies to norm='group'; norm is {norm!r}.")
    if pretrained_path is not None and init != "pretrained":
        raise invalid("pretrained_path", pretrained_path, "None", hint=f"It only applies to init='pretrained'; init is {init!r}.")
    groups = DEFAULT_NORM_GROUPS if norm_groups is None else norm_groups
    _check_targets(model, norm=norm, activation=activation, init=init)

    weight_dims = [d for d in map(_output_dims, model.modules()) if d is not None]
    previous = weight_dims[0] if weight_dims else None  # layout of the last weight layer seen (first: the first's)
    memo: dict[int, nn.Module] = {}
    norms: list[str] = []
    acts: list[str] = []
    used_groups: dict[str, int] = {}
    group_channels: dict[str, int] = {}

    def swap(module: nn.Module, path: str) -> nn.Module:
        nonlocal previous
        dims = _output_dims(module)
        if dims is not None:
            previous = dims
        new = None
        if norm is not None and isinstance(module, NORM_TYPES):
            channels, spatial, last = _norm_geometry(module, previous)
            new = norm_layer(norm, channels, spatial, groups=groups, channels_last=last)
            inner = new.norm if isinstance(new, ChannelsLast) else new
            if norm == "group":
                used_groups[path], group_channels[path] = inner.num_groups, channels
            if type(new) is not type(module) or repr(new) != repr(module):
                norms.append(path)
            else:
                new = module  # already the requested layer: keep its parameters
        elif activation is not None and isinstance(module, ACTIVATION_TYPES):
            new = activation_layer(activation)
            if type(new) is not type(module) or repr(new) != repr(module):
                acts.append(path)
            else:
                new = module
        if new is not None:
            return _place(new, module) if new is not module else module
        for name, child in module.named_children():
            key = id(child)
            if key not in memo:  # a module registered twice is swapped once and stays shared
                memo[key] = swap(child, f"{path}.{name}" if path else name)
            if memo[key] is not child:
                setattr(module, name, memo[key])
        return module

    model = swap(model, "")
    activation_for_gain: str | nn.Module | None = activation
    if activation is None:  # He's gain from the model's own activations, when they agree
        found = [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]
        if found and len({negative_slope(m) for m in found}) == 1:
            activation_for_gain = found[0]
    initialised = (
        initialise(model, init, activation=activation_for_gain, std=init_std, pretrained_path=pretrained_path)
        if init is not None
        else []
    )

    notes = []
    fallbacks: dict[tuple[int, int], int] = {}  # (channels, groups used) -> layers
    for path, g in used_groups.items():
        if g != groups:
            key = (group_channels[path], g)
            fallbacks[key] = fallbacks.get(key, 0) + 1
    for (channels, g), count in sorted(fallbacks.items()):
        notes.append(f"group norm: {groups} groups do not divide {channels} channels, so {count} layer(s) use {g} groups")
    report = ConversionReport(tuple(norms), tuple(acts), tuple(initialised), used_groups, tuple(notes))
    return model, report


def convert(
    model: nn.Module,
    *,
    norm: str | None = None,
    activation: str | None = None,
    init: str | None = None,
    norm_groups: int | None = None,
    init_std: float | None = None,
    pretrained_path: str | None = None,
) -> nn.Module:
    """Give ``model`` the ``norm``, ``activation`` and ``init`` of a trial, in place, and
    return it. ``None`` leaves that dimension as the model has it.

    - ``norm`` (one of :data:`hposvc.config.NORMS`): every normalisation layer (BatchNorm
      1d/2d/3d, SyncBatchNorm, InstanceNorm 1d/2d/3d, GroupNorm, LayerNorm, RMSNorm and
      their subclasses) becomes :func:`norm_layer` ``(norm, channels, dims)`` for the same
      channel count and layout; ``none`` gives ``nn.Identity``. The layout comes from the
      layer (``BatchNorm2d`` → images) or, for the layout-free ones (GroupNorm,
      SyncBatchNorm, a BatchNorm1d after a Linear), from the nearest Linear/Conv before
      it. A ``LayerNorm(C)`` / ``RMSNorm(C)`` normalises the last axis (an MLP's features,
      a transformer's tokens), so its replacement works channels-last. ``layer`` on
      feature maps is ``GroupNorm(1, C)`` (see :func:`norm_layer` for why). ``group``
      uses the largest divisor of the channels at most ``norm_groups`` (default 4), per
      layer: :func:`convert_with_report` tells which.
    - ``activation`` (one of :data:`hposvc.config.ACTIVATIONS`): every activation module
      (:data:`ACTIVATION_TYPES`: ReLU, LeakyReLU, PReLU, GELU, SiLU, Mish, ELU, ReLU6,
      Hardswish, Sigmoid, Tanh, Softsign, ...) becomes :func:`activation_layer`
      ``(activation)``. Functional calls (``F.relu`` in ``forward``) cannot be replaced.
    - ``init`` (a scheme of :data:`hposvc.config.INITS` or ``default``): the scheme sets
      every Linear and Conv weight with that layer's fan and the activation's gain, zeroes
      their biases and resets the norm layers to 1 / 0 (see :mod:`hposvc.nn`); ZerO puts
      its identity / Hadamard matrix at each conv kernel's centre. ``init_std`` is the
      normal / uniform schemes' scale. ``default`` keeps the model's own weights
      bit-identical; ``pretrained`` loads the state_dict at ``pretrained_path`` (with
      ``weights_only=True``) into the converted model and names the first key or shape
      that does not fit.

    A layer already of the requested kind is kept with its parameters. A module shared by
    several parents is replaced once and stays shared. The root itself may be replaced
    (like ``nn.SyncBatchNorm.convert_sync_batchnorm``), so use the return value. A
    dimension that is given but has nothing to act on (``activation`` for a model whose
    ``forward`` calls ``F.relu``) raises :class:`~hposvc.errors.InvalidInputError` saying
    what to change.

    >>> import torch
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    >>> net = convert(net, norm="layer", activation="gelu", init="he_normal")
    >>> net[1], net[2]
    (GroupNorm(1, 8, eps=1e-05, affine=True, bias=True), GELU(approximate='none'))
    >>> convert(nn.BatchNorm1d(4), norm="none")  # the root is replaced
    Identity()
    """
    return convert_with_report(
        model,
        norm=norm,
        activation=activation,
        init=init,
        norm_groups=norm_groups,
        init_std=init_std,
        pretrained_path=pretrained_path,
    )[0]
