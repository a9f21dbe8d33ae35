"""Weight initialisation: the schemes, ZerO, and loading a pretrained state_dict.

One rule for every model, built-in or the user's (:func:`initialise`):

- the scheme sets the weight of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (heads
  included), with the fan of that layer (a conv's fan counts its kernel and groups);
- every bias of those layers starts at 0;
- every normalisation layer starts at weight 1 / bias 0 with fresh running statistics;
- activations keep their own parameters (PReLU's slope 0.25 is part of the activation);
- other layers (embeddings, transposed convs, attention's packed in-projection) keep
  their own init;
- ``default`` changes nothing; ``pretrained`` instead loads the whole state_dict
  (biases, norm parameters and running statistics included), which must fit exactly.

Gains: He's schemes use ``fan_in`` and the gain ``sqrt(2 / (1 + a²))`` of the chosen
activation's negative slope ``a`` (leaky ReLU 0.01, PReLU 0.25, otherwise 0: He et al.
2015 derive it for rectifiers and that is the gain they give every other activation).
Xavier's use Glorot's gain 1 with ``(fan_in + fan_out) / 2`` whatever the activation:
that is the published scheme, and the guide's studies compare the two as published
(Xavier halving a ReLU signal per layer is one of its claims).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import nn

from hposvc.config import INITS
from hposvc.errors import invalid
from hposvc.nn._layers import NORM_TYPES, negative_slope

__all__ = ["INIT_SCHEMES", "WEIGHT_TYPES", "initialise", "load_pretrained", "reset_norm", "zero_init_matrix"]

# What convert() accepts: TrialConfig's schemes, "default" (leave the model's own init) among them.
INIT_SCHEMES: tuple[str, ...] = INITS
# Layers whose weight a scheme sets. Transposed convs are left out: their weight is laid
# out (in, out, k), so torch's fan computation would swap fan_in and fan_out.
WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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

    Conv layers get this matrix at the kernel centre and zeros on every other tap (the
    paper's convolutional variant), per group for grouped convs, so a square 3×3 conv
    starts as the identity map.

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
def _zero_init_(weight: torch.Tensor, groups: int) -> None:
    if weight.dim() == 2:
        weight.copy_(zero_init_matrix(weight.shape[0], weight.shape[1]))
        return
    # Conv (out, in / groups, *kernel): the ZerO matrix of each group at the kernel centre
    # (k // 2 on each axis, the left of the two middles for an even kernel).
    out, per_in = weight.shape[:2]
    per_out = out // groups
    block = zero_init_matrix(per_out, per_in).to(weight)
    centre = tuple(k // 2 for k in weight.shape[2:])
    weight.zero_()
    for g in range(groups):
        weight[(slice(g * per_out, (g + 1) * per_out), slice(None), *centre)] = block


@torch.no_grad()
def _init_weight_(layer: nn.Module, scheme: str, *, slope: float, std: float | None) -> None:
    weight = layer.weight
    if scheme == "zeros":
        nn.init.zeros_(weight)
    elif scheme == "normal":
        nn.init.normal_(weight, mean=0.0, std=std)
    elif scheme == "uniform":
        nn.init.uniform_(weight, -std, std)
    elif scheme == "xavier_uniform":
        nn.init.xavier_uniform_(weight)  # gain 1: Var = 2 / (fan_in + fan_out)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(weight)
    elif scheme == "he_uniform":  # Var = 2 / ((1 + a²) fan_in)
        nn.init.kaiming_uniform_(weight, a=slope, mode="fan_in", nonlinearity="leaky_relu")
    elif scheme == "he_normal":
        nn.init.kaiming_normal_(weight, a=slope, mode="fan_in", nonlinearity="leaky_relu")
    elif scheme == "zero":
        _zero_init_(weight, getattr(layer, "groups", 1))
    else:  # default / pretrained are handled by initialise; anything else is a bug
        raise ValueError(f"no weight rule for init scheme {scheme!r}")


@torch.no_grad()
def reset_norm(module: nn.Module) -> None:
    """Weight 1, bias 0 and fresh running statistics, for a normalisation layer."""
    if getattr(module, "weight", None) is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    if getattr(module, "track_running_stats", False) and getattr(module, "running_mean", None) is not None:
        module.reset_running_stats()


def initialise(
    model: nn.Module,
    scheme: str,
    *,
    activation: str | nn.Module | None = None,
    std: float | None = None,
    pretrained_path: str | None = None,
) -> list[str]:
    """Initialise ``model`` in place by ``scheme`` (see the module docstring) and return
    the names of the weight layers it set. ``activation`` gives He's gain; ``std`` is
    the normal scheme's std and the uniform scheme's half-width. Random schemes draw from
    torch's global generator, so the caller seeds torch first.

    >>> layer = torch.nn.Linear(3, 3)
    >>> initialise(layer, "zero")
    ['']
    >>> bool((layer.weight == torch.eye(3)).all()), layer.bias.tolist()
    (True, [0.0, 0.0, 0.0])
    """
    if scheme not in INIT_SCHEMES:
        raise invalid("init", scheme, INIT_SCHEMES)
    if scheme in ("normal", "uniform") and not (isinstance(std, (int, float)) and std > 0):
        raise invalid("init_std", std, "a number > 0", hint=f"init {scheme!r} draws with it.")
    if scheme == "default":
        return []
    if scheme == "pretrained":
        load_pretrained(model, pretrained_path)
        return []
    slope = negative_slope(activation)
    done = []
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_TYPES):
            _init_weight_(module, scheme, slope=slope, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            done.append(name)
        elif isinstance(module, NORM_TYPES):
            reset_norm(module)
    return done


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_pretrained(model: nn.Module, path: str | os.PathLike | None) -> None:
    """Load a state_dict file (``torch.load(..., weights_only=True)``) into ``model``;
    every way it can fail names the path and what did not fit: the first layer whose
    shape differs, with both shapes, or the keys one side lacks."""
    fits = "a state_dict file that fits the model"
    how = (
        "Save one with torch.save(model.state_dict(), path) from a model built the same way "
        "(the same architecture, task, depth, width, norm and activation)."
    )
    path = None if path is None else os.fspath(path)
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
