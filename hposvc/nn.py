"""Model building blocks: activations, normalisation layers, the two model families and
weight initialisation.

A trial's network is built from its :class:`~hposvc.config.TrialConfig` and its task:

- ``mlp`` (inputs ``(N, features)``): ``[Linear → norm → activation] × depth → Linear head``;
- ``cnn1d`` (inputs ``(N, channels, length)``): ``[Conv1d(k=5) → norm → activation] × depth →
  flatten → Linear head``; a block halves the length (stride 2) while its input is at least
  :data:`CNN_MIN_DOWNSAMPLE_LENGTH` long, so deep nets stay cheap but keep a few positions.

``width`` is the hidden units (MLP) or the channels (CNN). Heads are linear: the softmax or
sigmoid lives in the loss. Modules have readable names (``hidden.0.linear``,
``hidden.0.norm``, ``hidden.0.act``, ``hidden.0.conv``, ``head``) and hold no Python-side
state, so ``torch.func.stack_module_state`` / ``functional_call`` can batch a population.

Initialisation rule, the same for every scheme (:func:`init_weights`):

- the ``init`` scheme is applied to the weight of every Linear and Conv layer, head included;
- every bias starts at 0;
- norm layers start at weight 1 / bias 0 (and fresh running statistics);
- PReLU keeps PyTorch's slope 0.25: it is part of the activation, not a weight;
- ``pretrained`` instead loads the whole state_dict (biases, norm parameters and running
  statistics included) from ``config.pretrained_path``, and the file must fit exactly.

>>> import torch
>>> from hposvc.config import TrialConfig
>>> layer = torch.nn.Linear(2, 4)
>>> init_weights(layer, TrialConfig(init="zero"))
>>> (layer.weight.detach() * 2**0.5).round()  # c = 2^(-1/2) times a Hadamard corner
tensor([[ 1.,  1.],
        [ 1., -1.],
        [ 1.,  1.],
        [ 1., -1.]])
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from hposvc.config import ACTIVATIONS, NORMS, TrialConfig
from hposvc.errors import invalid
from hposvc.tasks import FAMILIES, Task

__all__ = [
    "CNN1d",
    "CNN_KERNEL_SIZE",
    "CNN_MIN_DOWNSAMPLE_LENGTH",
    "MLP",
    "build_model",
    "count_parameters",
    "init_weights",
    "make_activation",
    "make_norm",
    "zero_init_matrix",
]

CNN_KERNEL_SIZE = 5  # odd, so padding k // 2 keeps the length and ZerO has a kernel centre
CNN_MIN_DOWNSAMPLE_LENGTH = 8  # a block halves the length only while it is at least this long

# Layers whose weight an init scheme sets; norms whose affine parameters start at 1 / 0.
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d)
_NORM_LAYERS = (nn.BatchNorm1d, nn.InstanceNorm1d, nn.LayerNorm, nn.GroupNorm)

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


# -- activations and norms -------------------------------------------------------------


def make_activation(name: str) -> nn.Module:
    """A fresh activation module.

    >>> make_activation("leaky_relu")
    LeakyReLU(negative_slope=0.01)
    """
    if name not in _ACTIVATIONS:
        raise invalid("activation", name, ACTIVATIONS)
    return _ACTIVATIONS[name]()


def make_norm(kind: str, channels: int, *, family: str, groups: int | None = None) -> nn.Module:
    """The normalisation layer that follows a hidden Linear (``family="mlp"``, inputs
    ``(N, C)``) or Conv1d (``family="cnn1d"``, inputs ``(N, C, L)``) with ``channels`` outputs.

    What each kind averages over (statistics per ...):

    ======== ================================== =====================================
    kind     mlp ``(N, C)``                     cnn1d ``(N, C, L)``
    ======== ================================== =====================================
    batch    feature, over N (BatchNorm1d)      channel, over N and L (BatchNorm1d)
    layer    sample, over C (LayerNorm)         sample, over C and L (GroupNorm(1, C))
    group    sample and group, over its C/G     sample and group, over its C/G and L
    instance (error: no spatial axis)           sample and channel, over L (InstanceNorm1d)
    ======== ================================== =====================================

    Layer norm on a CNN is ``GroupNorm(1, C)``, not ``nn.LayerNorm``: ``LayerNorm([C, L])``
    would tie the model to one input length and learn a scale per position, and
    ``LayerNorm(C)`` on the channel axis would normalise each position separately. One
    group over (C, L) with a per-channel affine is layer norm as the GroupNorm paper
    (Wu & He 2018) defines it for conv nets, and it works for any length.

    >>> make_norm("layer", 8, family="cnn1d")
    GroupNorm(1, 8, eps=1e-05, affine=True, bias=True)
    """
    if family not in FAMILIES:
        raise invalid("family", family, FAMILIES)
    if kind not in NORMS:
        raise invalid("norm", kind, NORMS)
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(channels)
    if kind == "group":
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
            raise invalid(
                "norm_groups",
                groups,
                f"a divisor of the width ({channels})",
                hint="Group norm splits the channels into equal groups.",
            )
        return nn.GroupNorm(groups, channels)
    if family == "mlp":
        if kind == "instance":
            raise invalid(
                "norm",
                kind,
                ("none", "batch", "layer", "group"),
                hint=(
                    "Instance norm normalises each channel of each sample over a spatial axis, "
                    "but an MLP's hidden layer has one value per channel per sample, so there is "
                    "nothing to average. Use 'layer' or 'group' (per sample) or 'batch' norm, or "
                    "a task whose model is the 1-D CNN (mnist1d), where instance norm is meaningful."
                ),
            )
        return nn.LayerNorm(channels)
    if kind == "instance":
        return nn.InstanceNorm1d(channels, affine=True)
    return nn.GroupNorm(1, channels)  # layer norm over (C, L); see the docstring


# -- models ----------------------------------------------------------------------------


class MLP(nn.Module):
    """``[Linear → norm → activation] × depth → Linear head`` on ``(N, features)`` inputs
    (any trailing shape is flattened)."""

    def __init__(
        self,
        in_features: int,
        n_outputs: int,
        *,
        depth: int,
        width: int,
        norm: str = "none",
        norm_groups: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        blocks = []
        fan_in = in_features
        for _ in range(depth):
            blocks.append(
                nn.Sequential(
                    OrderedDict(
                        linear=nn.Linear(fan_in, width),
                        norm=make_norm(norm, width, family="mlp", groups=norm_groups),
                        act=make_activation(activation),
                    )
                )
            )
            fan_in = width
        self.hidden = nn.Sequential(*blocks)
        self.head = nn.Linear(fan_in, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x.flatten(1)))


class CNN1d(nn.Module):
    """``[Conv1d(k=5) → norm → activation] × depth → flatten → Linear head`` on
    ``(N, channels, length)`` inputs.

    A block uses stride 2 while its input length is at least
    :data:`CNN_MIN_DOWNSAMPLE_LENGTH` (mnist1d's 40 → 20 → 10 → 5 → 5 ...), so compute
    shrinks with depth while the head still sees where features are, which matters for
    mnist1d and is why the head flattens rather than pooling globally.
    """

    def __init__(
        self,
        in_channels: int,
        length: int,
        n_outputs: int,
        *,
        depth: int,
        width: int,
        norm: str = "none",
        norm_groups: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        blocks = []
        channels = in_channels
        for _ in range(depth):
            stride = 2 if length >= CNN_MIN_DOWNSAMPLE_LENGTH else 1
            blocks.append(
                nn.Sequential(
                    OrderedDict(
                        conv=nn.Conv1d(channels, width, CNN_KERNEL_SIZE, stride=stride, padding=CNN_KERNEL_SIZE // 2),
                        norm=make_norm(norm, width, family="cnn1d", groups=norm_groups),
                        act=make_activation(activation),
                    )
                )
            )
            channels = width
            length = (length - 1) // stride + 1  # Conv1d's output length with padding k // 2
        self.hidden = nn.Sequential(*blocks)
        self.head = nn.Linear(channels * length, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x).flatten(1))


def build_model(task: Task, config: TrialConfig) -> nn.Module:
    """The network for ``task`` with ``config``'s depth, width, norm and activation,
    initialised by ``config.init``. Random schemes draw from torch's global generator, so
    the caller seeds torch first.

    >>> from hposvc.tasks import load_task
    >>> task = load_task("digits")  # 64 features, 10 classes
    >>> model = build_model(task, TrialConfig(depth=2, width=32, init="zero"))
    >>> [name for name, _ in model.named_parameters()][:2], count_parameters(model)
    (['hidden.0.linear.weight', 'hidden.0.linear.bias'], 3466)
    """
    sizes = dict(
        depth=config.depth,
        width=config.width,
        norm=config.norm,
        norm_groups=config.norm_groups,
        activation=config.activation,
    )
    shape = tuple(task.input_shape)
    if task.family == "mlp":
        model: nn.Module = MLP(math.prod(shape), task.n_outputs, **sizes)
    elif task.family == "cnn1d":
        if len(shape) != 2:
            raise invalid("input_shape", shape, "(channels, length) for the cnn1d family")
        model = CNN1d(shape[0], shape[1], task.n_outputs, **sizes)
    else:
        raise invalid("family", task.family, FAMILIES)
    init_weights(model, config)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as running statistics excluded).

    >>> count_parameters(torch.nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- initialisation --------------------------------------------------------------------


def _sylvester_hadamard(m: int) -> torch.Tensor:
    """The 2^m × 2^m Sylvester Hadamard matrix of ±1: H_0 = [1], H_k = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1)
    block = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    for _ in range(m):
        h = torch.kron(block, h)
    return h


def zero_init_matrix(fan_out: int, fan_in: int) -> torch.Tensor:
    """The ZerO matrix (Zhao, Schäfer & Anandkumar 2022, Algorithm 1) for a layer with
    ``fan_in`` inputs and ``fan_out`` outputs, i.e. of shape ``(fan_out, fan_in)``.

    - ``fan_out <= fan_in``: the (partial) identity ``I*(out, in)`` — ones on the main
      diagonal, zeros elsewhere; square layers pass their input through unchanged.
    - ``fan_out > fan_in``: ``c · I*(out, 2^m) · H_m · I*(2^m, in)`` with ``m =
      ceil(log2(out))``, ``H_m`` the Sylvester Hadamard matrix and ``c = 2^(-(m-1)/2)``,
      i.e. the top-left ``out × in`` corner of ``c · H_m``. A plain partial identity would
      leave ``out - in`` units dead at start (the paper's "training degeneracy"); the
      Hadamard spreads every input over all outputs.

    The constant follows the paper's Algorithm 1; the authors' MNIST notebook divides by
    ``2^(m/2)`` instead (an orthonormal H), a factor √2 smaller. Deterministic: no RNG.

    >>> zero_init_matrix(2, 3)
    tensor([[1., 0., 0.],
            [0., 1., 0.]])
    """
    if fan_out <= fan_in:
        return torch.eye(fan_out, fan_in)
    m = math.ceil(math.log2(fan_out))
    c = 2.0 ** (-(m - 1) / 2)
    return c * _sylvester_hadamard(m)[:fan_out, :fan_in]


@torch.no_grad()
def _init_weight(weight: torch.Tensor, config: TrialConfig) -> None:
    scheme = config.init
    if scheme == "zeros":
        nn.init.zeros_(weight)
    elif scheme == "normal":
        nn.init.normal_(weight, mean=0.0, std=config.init_std)
    elif scheme == "uniform":
        nn.init.uniform_(weight, -config.init_std, config.init_std)
    elif scheme == "xavier_uniform":
        nn.init.xavier_uniform_(weight)  # gain 1: Var = 2 / (fan_in + fan_out)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(weight)
    elif scheme == "he_uniform":
        nn.init.kaiming_uniform_(weight, mode="fan_in", nonlinearity="relu")  # Var = 2 / fan_in
    elif scheme == "he_normal":
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
    elif scheme == "zero":
        matrix = zero_init_matrix(weight.shape[0], weight.shape[1])
        if weight.dim() == 2:
            weight.copy_(matrix)
        else:  # conv (out, in, k): the matrix at the kernel centre, zero on the other taps
            weight.zero_()
            weight[:, :, weight.shape[2] // 2] = matrix
    else:  # pretrained is handled by the caller; anything else is a programming error
        raise ValueError(f"no weight rule for init scheme {scheme!r}")


def init_weights(model: nn.Module, config: TrialConfig) -> None:
    """Initialise ``model`` in place by ``config.init`` (see the module docstring for the
    rule on biases and norm layers). ``pretrained`` loads ``config.pretrained_path``.

    >>> layer = torch.nn.Linear(3, 3)
    >>> init_weights(layer, TrialConfig(init="zero"))
    >>> bool((layer.weight == torch.eye(3)).all()), layer.bias.tolist()
    (True, [0.0, 0.0, 0.0])
    """
    if config.init == "pretrained":
        _load_pretrained(model, config.pretrained_path)
        return
    for module in model.modules():
        if isinstance(module, _WEIGHT_LAYERS):
            _init_weight(module.weight, config)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _NORM_LAYERS):
            if getattr(module, "weight", None) is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if getattr(module, "track_running_stats", False):
                module.reset_running_stats()


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _load_pretrained(model: nn.Module, path: str | None) -> None:
    """Load a state_dict file into ``model``; every way it can fail names the path and
    what did not fit."""
    fits = "a state_dict file that fits the model"
    how = (
        "Save one with torch.save(model.state_dict(), path) from a model built with the same "
        "task, depth, width and norm."
    )
    if path is None or not os.path.isfile(path):
        raise invalid("pretrained_path", path, "a path to an existing state_dict file", hint=f"No such file. {how}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a state_dict"
        raise invalid("pretrained_path", path, fits, hint=f"torch.load could not read it: {e}. {how}") from e
    if isinstance(state, nn.Module) or not isinstance(state, Mapping):
        raise invalid("pretrained_path", path, fits, hint=f"It holds a {type(state).__name__}, not a state_dict. {how}")

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise invalid("pretrained_path", path, fits, hint=f"The file's keys differ from the model's ({'; '.join(parts)}). {how}")
    for key, tensor in own.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise invalid("pretrained_path", path, fits, hint=f"{key!r} holds a {type(value).__name__}, not a tensor. {how}")
        if value.shape != tensor.shape:
            raise invalid(
                "pretrained_path",
                path,
                fits,
                hint=(
                    f"Layer {key!r} has shape {tuple(value.shape)} in the file but {tuple(tensor.shape)} "
                    f"in the model. {how}"
                ),
            )
    model.load_state_dict(state, strict=True)
