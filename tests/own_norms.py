"""Norm classes written the way well-known projects write theirs (attribute names and
forward bodies imitated, not copied), and two tiny models built from them: what
hposvc must recognise in a user's own network. Imported by tests/test_own_norms.py and,
as ``own_norms:tiny_gpt``, by the specs those tests write."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GPTLayerNorm(nn.Module):
    """nanoGPT's: LayerNorm with an optional bias (torch's could not turn it off), eps
    written into forward, not kept anywhere."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """LLaMA's reference implementation: a weight only, normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


class LlamaRMSNorm(nn.Module):
    """Hugging Face's: the same sum, with eps kept as ``variance_epsilon``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LayerNorm2d(nn.Module):
    """detectron2's / SAM's: channels-first, normalises dim 1 of (N, C, H, W) at each pixel."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PermutedLayerNorm2d(nn.LayerNorm):
    """timm's: a subclass of nn.LayerNorm(C) whose forward permutes NCHW, so its class says
    "last axis" while it normalises channels-first maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class OffsetRMSNorm(nn.Module):
    """Gemma-style: scales by (1 + weight), weight starting at 0. The rule misses it (with
    its weight read as a scale it is no RMS norm), so a spec must name it."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class LayerScale(nn.Module):
    """Not a norm: a per-channel scale (CaiT, ConvNeXt) with the same structure."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.ln_1 = GPTLayerNorm(dim, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.scale = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale(self.mlp(self.ln_1(x)))


class TinyGPT(nn.Module):
    """digits' 64 pixels as 8 tokens of 8: two nanoGPT blocks (with and without bias), a
    LLaMA RMSNorm, a Hugging Face one; the norms all work on the tokens' last axis."""

    def __init__(self, n_outputs: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.h = nn.ModuleList([Block(dim, bias=True), Block(dim, bias=False)])
        self.norm = RMSNorm(dim)
        self.ln_f = LlamaRMSNorm(dim)
        self.head = nn.Linear(dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(len(x), 8, 8))
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(self.norm(x)).mean(1))


class TinyConvNeXt(nn.Module):
    """digits as 1×8×8 images, with channels-first layer norms of both styles."""

    def __init__(self, n_outputs: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.norm1 = LayerNorm2d(width)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = PermutedLayerNorm2d(width)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.stem(x.reshape(len(x), 1, 8, 8))))
        return self.head(self.norm2(self.conv(x)).mean((2, 3)))


class Gemma(nn.Module):
    def __init__(self, n_outputs: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(64, dim)
        self.norm = OffsetRMSNorm(dim)
        self.head = nn.Linear(dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def tiny_gpt(task, config):
    return TinyGPT(task.n_outputs)


def gemma(task, config):
    return Gemma(task.n_outputs)
