"""hposvc's built-in model families and :func:`build_model`."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from hposvc.config import FAMILIES, TRANSFORMER_NORMS, TrialConfig, check_family
from hposvc.errors import invalid
from hposvc.nn._init import initialise
from hposvc.nn._layers import DEFAULT_NORM_GROUPS, activation_layer, norm_layer

if TYPE_CHECKING:
    from hposvc.tasks import Task

__all__ = [
    "CNN1d",
    "CNN2d",
    "CNN_KERNEL_SIZE",
    "CNN2D_KERNEL_SIZE",
    "CNN_MIN_DOWNSAMPLE_LENGTH",
    "MLP",
    "MODEL_FAMILIES",
    "ResNet",
    "ResidualBlock",
    "SelfAttention",
    "TRANSFORMER_NORMS",
    "Transformer",
    "TransformerBlock",
    "build_model",
    "check_family",
    "count_parameters",
]

MODEL_FAMILIES = FAMILIES  # hposvc.config's: specs check them without importing torch
CNN_KERNEL_SIZE = 5  # cnn1d; odd, so padding k // 2 keeps the length and ZerO has a kernel centre
CNN2D_KERNEL_SIZE = 3  # cnn2d and resnet: 3×3, as in VGG and ResNet
CNN_MIN_DOWNSAMPLE_LENGTH = 8  # a conv block halves each spatial axis only while it is at least this long
MLP_RATIO = 4  # transformer: the MLP's hidden width is this times the model width (Vaswani et al. 2017)
EMBEDDING_STD = 0.02  # transformer: token and position embeddings start N(0, 0.02²), as GPT-2's


def _layers(norm: str, norm_groups: int | None, activation: str, channels: int, dims: int) -> dict[str, nn.Module]:
    return {
        "norm": norm_layer(norm, channels, dims, groups=norm_groups or DEFAULT_NORM_GROUPS),
        "act": activation_layer(activation),
    }


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
            linear = nn.Linear(fan_in, width)
            blocks.append(nn.Sequential(OrderedDict(linear=linear, **_layers(norm, norm_groups, activation, width, 0))))
            fan_in = width
        self.hidden = nn.Sequential(*blocks)
        self.head = nn.Linear(fan_in, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x.flatten(1)))


class _ConvNet(nn.Module):
    """``[ConvNd → norm → activation] × depth → flatten → Linear head``; a block uses
    stride 2 while its input is at least :data:`CNN_MIN_DOWNSAMPLE_LENGTH` long on every
    spatial axis, so compute shrinks with depth while the head still sees where features
    are (it flattens rather than pooling globally)."""

    _dims: int
    _kernel: int

    def __init__(
        self,
        in_shape: tuple[int, ...],
        n_outputs: int,
        *,
        depth: int,
        width: int,
        norm: str = "none",
        norm_groups: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)  # flat square inputs (digits' 64 pixels) are reshaped to it
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[self._dims]
        channels, spatial = in_shape[0], list(in_shape[1:])
        blocks = []
        for _ in range(depth):
            stride = 2 if min(spatial) >= CNN_MIN_DOWNSAMPLE_LENGTH else 1
            layer = conv(channels, width, self._kernel, stride=stride, padding=self._kernel // 2)
            blocks.append(nn.Sequential(OrderedDict(conv=layer, **_layers(norm, norm_groups, activation, width, self._dims))))
            channels = width
            spatial = [(s - 1) // stride + 1 for s in spatial]  # output size with padding k // 2
        self.hidden = nn.Sequential(*blocks)
        self.head = nn.Linear(channels * math.prod(spatial), n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unflatten(1, self.in_shape)
        return self.head(self.hidden(x).flatten(1))


class CNN1d(_ConvNet):
    """The 1-D CNN (``(N, channels, length)`` inputs, kernel 5): mnist1d's 40 → 20 → 10 →
    5 → 5 keeps the positions the head needs.

    >>> CNN1d(1, 40, 10, depth=2, width=4).head
    Linear(in_features=40, out_features=10, bias=True)
    """

    _dims, _kernel = 1, CNN_KERNEL_SIZE

    def __init__(self, in_channels: int, length: int, n_outputs: int, **kw) -> None:
        super().__init__((in_channels, length), n_outputs, **kw)


class CNN2d(_ConvNet):
    """The plain 2-D CNN (``(N, C, H, W)`` inputs, 3×3 kernels): 32×32 images go 16 → 8
    → 8 ..., digits' 8×8 go 4 → 4 ...

    >>> CNN2d((3, 32, 32), 10, depth=2, width=8).head
    Linear(in_features=512, out_features=10, bias=True)
    """

    _dims, _kernel = 2, CNN2D_KERNEL_SIZE


class ResidualBlock(nn.Module):
    """He et al. (2016)'s basic block: ``conv3×3 → norm → act → conv3×3 → norm``, plus
    the shortcut (identity, or a 1×1 conv and norm where the shape changes), then act."""

    def __init__(self, in_channels: int, channels: int, stride: int, *, norm: str, norm_groups: int | None, activation: str) -> None:
        super().__init__()
        bias = norm == "none"  # a norm's shift makes a conv bias redundant
        groups = norm_groups or DEFAULT_NORM_GROUPS
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = norm_layer(norm, channels, 2, groups=groups)
        self.act1 = activation_layer(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.norm2 = norm_layer(norm, channels, 2, groups=groups)
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, channels, 1, stride=stride, bias=bias),
                    norm=norm_layer(norm, channels, 2, groups=groups),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = activation_layer(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016, §4.2): a 3×3 stem with ``width`` channels,
    three stages of ``depth`` :class:`ResidualBlock` each with ``width``, ``2·width`` and
    ``4·width`` channels (the 2nd and 3rd stage halve the image), global average pooling
    and a linear head: ``6·depth + 2`` weight layers (depth 3 is ResNet-20).

    >>> model = ResNet((3, 32, 32), 10, depth=1, width=8, norm="batch")
    >>> model(torch.randn(2, 3, 32, 32)).shape, model.head
    (torch.Size([2, 10]), Linear(in_features=32, out_features=10, bias=True))
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        n_outputs: int,
        *,
        depth: int,
        width: int,
        norm: str = "none",
        norm_groups: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)  # flat square inputs (digits' 64 pixels) are reshaped to it
        kw = dict(norm=norm, norm_groups=norm_groups, activation=activation)
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_shape[0], width, 3, padding=1, bias=norm == "none"),
                **_layers(norm, norm_groups, activation, width, 2),
            )
        )
        stages, channels = [], width
        for i, out in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(depth):
                blocks.append(ResidualBlock(channels, out, 2 if (i > 0 and j == 0) else 1, **kw))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unflatten(1, self.in_shape)
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))

    @torch.no_grad()
    def zero_init_residual_(self) -> None:
        """Start every residual branch at 0, so each block begins as its shortcut (Goyal
        et al. 2017): the last norm's weight is 0, or, without norm, the last conv's."""
        for block in self.modules():
            if isinstance(block, ResidualBlock):
                last = block.norm2 if getattr(block.norm2, "weight", None) is not None else block.conv2
                nn.init.zeros_(last.weight)


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: q, k, v and output projections (plain
    ``nn.Linear``, so every init scheme sets them), scaled dot products and, when
    ``causal``, a mask that hides later positions. Written out rather than
    ``nn.MultiheadAttention`` so that a population runs it under ``torch.func.vmap``."""

    def __init__(self, width: int, heads: int, *, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        split = lambda t: t.view(n, length, self.heads, width // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))  # (n, heads, length, width / heads)
        scores = q @ k.transpose(-2, -1) / math.sqrt(width // self.heads)
        if self.causal:
            later = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(later, float("-inf"))
        mixed = scores.softmax(dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(n, length, width))


class _PerToken(nn.Module):
    """A norm of ``(N, C)`` features (group norm) applied to each token of ``(N, L, C)``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(0, -2)).view(x.shape)


def _token_norm(kind: str, width: int, groups: int | None) -> nn.Module:
    if kind not in TRANSFORMER_NORMS:
        raise invalid(
            "norm", kind, TRANSFORMER_NORMS,
            hint="A transformer normalises each token over its features; batch and instance norm average over positions, which lets a causal model see later tokens.",
        )
    if kind == "group":
        return _PerToken(norm_layer("group", width, 0, groups=groups or DEFAULT_NORM_GROUPS))
    return norm_layer(kind, width, 0)


class TransformerBlock(nn.Module):
    """Pre-norm block (Xiong et al. 2020): ``x + attn(norm(x))``, then ``x + mlp(norm(x))``
    with ``mlp = Linear(width, 4·width) → activation → Linear(4·width, width)``."""

    def __init__(self, width: int, heads: int, *, norm: str, norm_groups: int | None, activation: str, causal: bool) -> None:
        super().__init__()
        self.norm1 = _token_norm(norm, width, norm_groups)
        self.attn = SelfAttention(width, heads, causal=causal)
        self.norm2 = _token_norm(norm, width, norm_groups)
        hidden = MLP_RATIO * width
        self.mlp = nn.Sequential(OrderedDict(fc=nn.Linear(width, hidden), act=activation_layer(activation), proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A small pre-norm transformer over ``(N, L)`` token ids (given as floats, as every
    task's inputs are): token and learned position embeddings of ``width``, ``depth``
    :class:`TransformerBlock` s with ``heads`` heads, a final norm and a linear head that
    reads the last position. ``causal=True`` (the family's) makes it a decoder: each
    position sees itself and earlier ones, so the last one predicts what comes next;
    ``causal=False`` is the encoder. The vocabulary is ``vocab`` tokens (the family uses
    the task's ``n_outputs``: inputs and outputs share one vocabulary).

    >>> model = Transformer(12, 10, 10, depth=1, width=16, heads=2, norm="rms")
    >>> model(torch.randint(0, 10, (3, 12)).float()).shape, type(model.norm).__name__
    (torch.Size([3, 10]), 'RMSNorm')
    """

    def __init__(
        self,
        length: int,
        vocab: int,
        n_outputs: int,
        *,
        depth: int,
        width: int,
        heads: int = 4,
        norm: str = "layer",
        norm_groups: int | None = None,
        activation: str = "gelu",
        causal: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
            raise invalid("heads", heads, f"a divisor of width={width}", hint="Each head gets width / heads features.")
        self.vocab = vocab
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        for emb in (self.tokens, self.positions):
            nn.init.normal_(emb.weight, std=EMBEDDING_STD)
        kw = dict(norm=norm, norm_groups=norm_groups, activation=activation, causal=causal)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads, **kw) for _ in range(depth)))
        self.norm = _token_norm(norm, width, norm_groups)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        where = torch.arange(ids.shape[-1], device=ids.device)
        h = self.blocks(self.tokens(ids) + self.positions(where))
        return self.head(self.norm(h)[:, -1])


def build_model(task: Task, config: TrialConfig, *, family: str | None = None, zero_init_residual: bool | None = None) -> nn.Module:
    """The network for ``task`` with ``config``'s depth, width, norm and activation,
    initialised by ``config.init``. The family is ``family``, else ``config.family``, else
    the task's own (``task.family``), any of :data:`MODEL_FAMILIES`; ``zero_init_residual``
    (default ``config.zero_init_residual``) starts every residual branch of a ``resnet``
    at 0. Random schemes draw from torch's global generator, so the caller seeds torch
    first; ``init="default"`` keeps PyTorch's own init of each layer.

    >>> from hposvc.tasks import load_task
    >>> task = load_task("digits")  # 64 features, 10 classes
    >>> model = build_model(task, TrialConfig(depth=2, width=32, init="zero"))
    >>> [name for name, _ in model.named_parameters()][:2], count_parameters(model)
    (['hidden.0.linear.weight', 'hidden.0.linear.bias'], 3466)
    >>> resnet = build_model(task, TrialConfig(depth=1, width=8, norm="batch"), family="resnet")
    >>> resnet(task.x_val[:2]).shape  # digits' 64 pixels as 1×8×8 images
    torch.Size([2, 10])
    """
    family = family or config.family or task.family
    if zero_init_residual is None:
        zero_init_residual = bool(config.zero_init_residual)
    shape = check_family(family, task.input_shape)
    sizes = dict(
        depth=config.depth,
        width=config.width,
        norm=config.norm,
        norm_groups=config.norm_groups,
        activation=config.activation,
    )
    if family == "mlp":
        model: nn.Module = MLP(math.prod(shape), task.n_outputs, **sizes)
    elif family == "cnn1d":
        model = CNN1d(shape[0], shape[1], task.n_outputs, **sizes)
    elif family == "cnn2d":
        model = CNN2d(shape, task.n_outputs, **sizes)
    elif family == "transformer":
        _check_token_ids(task)
        model = Transformer(shape[0], task.n_outputs, task.n_outputs, heads=config.heads, **sizes)
    else:
        model = ResNet(shape, task.n_outputs, **sizes)
    if zero_init_residual and not isinstance(model, ResNet):
        raise invalid("zero_init_residual", True, f"False for the {family!r} family", hint="Only 'resnet' has residual blocks.")
    initialise(model, config.init, activation=config.activation, std=config.init_std, pretrained_path=config.pretrained_path)
    if zero_init_residual and config.init != "pretrained":
        model.zero_init_residual_()
    return model


def _check_token_ids(task: Task) -> None:
    """The transformer embeds its inputs: they must be token ids of the task's vocabulary
    (whole numbers in [0, n_outputs)). Checked on the training split when it is a tensor."""
    x = task.x_train
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        return
    if not (torch.equal(x, x.round()) and float(x.min()) >= 0 and float(x.max()) < task.n_outputs):
        raise invalid(
            "family", "transformer", "a family whose inputs this task has",
            source=f"task {task.name!r}",
            hint=f"The transformer reads token ids (whole numbers in [0, {task.n_outputs}), its vocabulary is the task's outputs); "
            "this task's inputs are not. Sequence tasks: hposvc.sequences.",
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as running statistics excluded).

    >>> count_parameters(torch.nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
