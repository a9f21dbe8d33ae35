"""Swap the normalisation and activation layers of any ``nn.Module`` and initialise it:
how hposvc applies a trial's norm, activation and init to a user's own model."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from hposvc.config import ACTIVATIONS, NORMS
from hposvc.errors import invalid
from hposvc.nn._init import INIT_SCHEMES, WEIGHT_TYPES, initialise, reset_norm
from hposvc.nn._layers import (
    ACTIVATION_TYPES,
    DEFAULT_NORM_GROUPS,
    ChannelsFirst,
    ChannelsLast,
    activation_layer,
    negative_slope,
    norm_layer,
)
from hposvc.nn._recognise import NormSite, find_norm

__all__ = ["ConversionReport", "convert", "convert_with_report"]

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
    norm_classes: tuple[str, ...] = ()  # per norm class found: how it was recognised and what it became

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
        lines += list(self.norm_classes)
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _output_dims(module: nn.Module) -> int | None:
    for types, dims in _LAYER_DIMS:
        if isinstance(module, types):
            return dims
    return None


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


def _norm_sites(model: nn.Module, named: tuple[type, ...]) -> dict[int, NormSite]:
    """id(module) -> what it normalises, for every normalisation layer of ``model``, in the
    order (and with the layout of the weight layer before each) that the swap walks."""
    weight_dims = [d for d in map(_output_dims, model.modules()) if d is not None]
    previous = weight_dims[0] if weight_dims else None  # layout of the last weight layer seen (first: the first's)
    sites: dict[int, NormSite] = {}
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        nonlocal previous
        if id(module) in seen:
            return
        seen.add(id(module))
        dims = _output_dims(module)
        if dims is not None:
            previous = dims
        site = find_norm(module, previous, named)
        if site is not None:
            sites[id(module)] = site
            return
        for child in module.children():
            visit(child)

    visit(model)
    return sites


def _same_layer(new: nn.Module, old: nn.Module) -> bool:
    """``old`` is already the layer ``new`` would be, its eps aside (kept with its own)."""
    strip = re.compile(r"eps=[^,)]*")
    return type(new) is type(old) and strip.sub("", repr(new)) == strip.sub("", repr(old))


def _built(new: nn.Module) -> str:
    """A replacement layer's class (and eps) for conversion.txt."""
    if isinstance(new, nn.Identity):
        return "Identity"
    inner = new.norm if isinstance(new, (ChannelsLast, ChannelsFirst)) else new
    name = type(inner).__name__ if inner is new else f"{type(new).__name__}({type(inner).__name__})"
    return f"{name}, eps {inner.eps:g}"


def _norm_classes(classes: Iterable[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    out = tuple(classes)
    for cls in out:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise invalid("norm_classes", cls, "a list of nn.Module subclasses (the model's own norm classes)")
    return out


def _check_targets(
    model: nn.Module, *, norm: str | None, activation: str | None, init: str | None, sites: Mapping[int, NormSite]
) -> None:
    """A dimension that is given must have something to act on, or every trial of a
    search over it would train the same model."""
    name = type(model).__name__
    modules = list(model.modules())
    if norm is not None and not sites:
        raise invalid(
            "norm", norm, f"None for {name}, which has no normalisation layer",
            hint=(
                f"{name} has no BatchNorm, InstanceNorm, GroupNorm, LayerNorm or RMSNorm layer for hposvc "
                "to replace, and no module of its own that hposvc recognises as a layer or RMS norm "
                "(a weight of shape (C,), an optional bias, and a forward that normalises over C). Put one "
                "where each should go (any kind: hposvc swaps it for the trial's), name your norm class "
                "(norm_classes=[MyNorm]; in a spec, [model] norm_classes = [\"module:MyNorm\"]), build them "
                "from the factory's `norm_layer` argument, or leave norm out of the search."
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
    norm_classes: Iterable[type[nn.Module]] = (),
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
    named = _norm_classes(norm_classes)
    sites = _norm_sites(model, named) if norm is not None else {}
    _check_targets(model, norm=norm, activation=activation, init=init, sites=sites)

    memo: dict[int, nn.Module] = {}
    norms: list[str] = []
    acts: list[str] = []
    used_groups: dict[str, int] = {}
    group_channels: dict[str, int] = {}
    by_class: dict[type, list] = {}  # class -> [layers, what it is, what it became]
    kept_own: list[nn.Module] = []  # the user's norm layers kept: an init scheme resets them like torch's

    def swap(module: nn.Module, path: str) -> nn.Module:
        new = None
        site = sites.get(id(module))
        if site is not None:
            if site.how != "class" and site.kind == norm:
                new, became = module, f"kept (already {norm} norm)"
                kept_own.append(module)
            else:
                eps = site.eps if isinstance(site.eps, float) and site.eps > 0 else None
                new = norm_layer(
                    norm, site.channels, site.dims, groups=groups, channels_last=site.channels_last,
                    per_position=site.per_position, eps=eps,
                )
                inner = new.norm if isinstance(new, (ChannelsLast, ChannelsFirst)) else new
                if norm == "group":
                    used_groups[path], group_channels[path] = inner.num_groups, site.channels
                if site.how == "class" and _same_layer(new, module):
                    new, became = module, "kept (already the requested layer)"  # keep its parameters
                else:
                    norms.append(path)
                    became = "-> " + _built(new)
            entry = by_class.setdefault(type(module), [0, site, became])
            entry[0] += 1
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
    if init not in (None, "default", "pretrained"):
        for module in kept_own:
            reset_norm(module)

    notes = []
    fallbacks: dict[tuple[int, int], int] = {}  # (channels, groups used) -> layers
    for path, g in used_groups.items():
        if g != groups:
            key = (group_channels[path], g)
            fallbacks[key] = fallbacks.get(key, 0) + 1
    for (channels, g), count in sorted(fallbacks.items()):
        notes.append(f"group norm: {groups} groups do not divide {channels} channels, so {count} layer(s) use {g} groups")
    found = tuple(
        f"norm class {cls.__qualname__} ({cls.__module__}): {count} layer{'s' * (count != 1)}, {site.describe()}; {became}"
        for cls, (count, site, became) in by_class.items()
    )
    report = ConversionReport(tuple(norms), tuple(acts), tuple(initialised), used_groups, tuple(notes), found)
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
    norm_classes: Iterable[type[nn.Module]] = (),
) -> nn.Module:
    """Give ``model`` the ``norm``, ``activation`` and ``init`` of a trial, in place, and
    return it. ``None`` leaves that dimension as the model has it.

    - ``norm`` (one of :data:`hposvc.config.NORMS`): every normalisation layer (see
      "Which modules are norm layers" below) becomes :func:`norm_layer` ``(norm, channels,
      dims)`` for the same channel count and layout, with the replaced layer's eps (a
      layer without one, or eps ``None``, gets 1e-5); ``none`` gives ``nn.Identity``. The
      layout comes from the layer (``BatchNorm2d`` → images) or, for the layout-free ones
      (GroupNorm, SyncBatchNorm, a BatchNorm1d after a Linear), from the nearest
      Linear/Conv before it. A ``LayerNorm(C)`` / ``RMSNorm(C)`` normalises the last axis
      (an MLP's features, a transformer's tokens), so its replacement works channels-last.
      ``layer`` on feature maps is ``GroupNorm(1, C)`` and ``rms`` is :class:`MapRMSNorm`
      (see :func:`norm_layer` for why), except in place of a norm that normalises each
      position over the channels (``LayerNorm2d``), where they do the same per position.
      ``group`` uses the largest divisor of the channels at most ``norm_groups`` (default
      4), per layer: :func:`convert_with_report` tells which.
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

    Which modules are norm layers (``conversion.txt`` lists each class and how):

    - *by class*: torch's BatchNorm 1d/2d/3d, SyncBatchNorm, InstanceNorm 1d/2d/3d,
      GroupNorm, LayerNorm, RMSNorm and their subclasses (and hposvc's own);
    - *by rule*: a module of the user's own class (or a LayerNorm / RMSNorm subclass with
      its own ``forward``, such as timm's ``LayerNorm2d``) that has no child modules and no
      float buffers (running statistics), one or two 1-D parameters of one length C >= 2
      (a weight, and a bias or not), and whose forward, run on a copy in float64 with the
      weight set to ``1 + ramp`` and the bias to ``0.1 * ramp``, matches a layer norm or an
      RMS norm (``x * rsqrt(mean(x²) + eps) * weight``) within 1e-3 on one of three inputs:
      ``(2, P, C)`` normalised over the last axis (nanoGPT's ``LayerNorm``, LLaMA's
      ``RMSNorm``, Hugging Face's ``LlamaRMSNorm``), ``(2, C, P, P)`` or ``(2, C, P)``
      normalised over C at each position (ConvNeXt's, SAM's and detectron2's
      ``LayerNorm2d``) or over C and the positions. Its eps is measured from a second
      forward on an input 1000 times smaller, where it weighs (solving ``y = x / sqrt(ms +
      eps)`` for it), and named after the float attribute that holds it, whatever its name
      (``eps``, ``variance_epsilon``), or a common value (1e-5, 1e-6, ...) within 10 %: so an
      eps written into ``forward`` (nanoGPT's 1e-5) is found too;
    - *by spec*: instances of the classes in ``norm_classes`` (``[model] norm_classes`` in
      a spec), for norms the rule misses; they are probed as above, and when that fails
      their channel count comes from their 1-D parameter (or an attribute such as
      ``normalized_shape``), their layout from which probe input they accept, their eps
      from their one small float attribute.

    A layer already of the requested kind is kept with its parameters (and its eps): a
    torch layer when it is the layer :func:`norm_layer` would build, a layer recognised by
    rule or spec when the rule recognised it as that kind (a LLaMA ``RMSNorm`` under
    ``norm="rms"``, nanoGPT's ``LayerNorm`` or a ``LayerNorm2d`` under ``"layer"``). A module shared by
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

    A user's own norm classes, recognised by rule:

    >>> class RMSNorm(nn.Module):  # LLaMA's: a weight, eps in an attribute
    ...     def __init__(self, dim, eps=1e-6):
    ...         super().__init__()
    ...         self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))
    ...     def forward(self, x):
    ...         return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
    >>> class LayerNorm(nn.Module):  # nanoGPT's: an optional bias, eps written into forward
    ...     def __init__(self, ndim, bias):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(ndim))
    ...         self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
    ...     def forward(self, x):
    ...         return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)
    >>> net = nn.Sequential(nn.Linear(4, 8), RMSNorm(8), nn.Linear(8, 8), LayerNorm(8, bias=False))
    >>> net, report = convert_with_report(net, norm="layer")
    >>> net[1], net[3]  # the RMS norm becomes a LayerNorm with its eps; the layer norm stays
    (LayerNorm((8,), eps=1e-06, elementwise_affine=True, bias=True), LayerNorm())
    >>> print("\\n".join(report.norm_classes))
    norm class RMSNorm (hposvc.nn._convert): 1 layer, by rule: rms norm over the last axis, eps 1e-06 (attribute eps); -> LayerNorm, eps 1e-06
    norm class LayerNorm (hposvc.nn._convert): 1 layer, by rule: layer norm over the last axis, eps 1e-05 (measured); kept (already layer norm)
    """
    return convert_with_report(
        model,
        norm=norm,
        activation=activation,
        init=init,
        norm_groups=norm_groups,
        init_std=init_std,
        pretrained_path=pretrained_path,
        norm_classes=norm_classes,
    )[0]
