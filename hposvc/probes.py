"""Probes: numbers that describe a network rather than its score.

The optimisation guide's claims about initialisation are about what happens *inside* the
network, so a trial records two probes beside its accuracy:

- :func:`activation_std_per_layer`, measured at initialisation: the standard deviation of
  each hidden block's output on a fixed batch. A scheme that suits the activation keeps it
  roughly constant with depth; one that does not makes it shrink or grow geometrically
  (Glorot & Bengio 2010; He et al. 2015).
- :func:`unit_symmetry`, measured after training: how different the hidden units of a
  layer are from each other. Zero initialisation gives every unit of a layer the same
  gradient, so they stay identical however long training runs; the value is then 0.

The study service stores them as the trial user attributes
``"hposvc.probe.activation_std"`` (a list) and ``"hposvc.probe.unit_symmetry"`` (a float).

>>> import torch
>>> from hposvc.config import TrialConfig
>>> from hposvc.nn import build_model
>>> from hposvc.tasks import load_task
>>> task = load_task("digits")
>>> model = build_model(task, TrialConfig(init="zeros", depth=2, width=16))
>>> unit_symmetry(model)
0.0
>>> len(activation_std_per_layer(model, task.x_val[:64]))
2
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hposvc import records

__all__ = ["ACTIVATION_STD_ATTR", "PROBE_SAMPLES", "UNIT_SYMMETRY_ATTR", "activation_std_per_layer", "hidden_blocks", "unit_symmetry"]

# Trial user attribute names the study service stores the probes under (hposvc.records).
ACTIVATION_STD_ATTR = records.ACTIVATION_STD
UNIT_SYMMETRY_ATTR = records.UNIT_SYMMETRY
# The activation-std probe runs on the first PROBE_SAMPLES validation samples: a batch that
# depends on the task alone, so a deterministic init gives the same numbers for every seed.
PROBE_SAMPLES = 256
# Layers whose rows are "units": a Linear's output features, a Conv's output channels.
_UNIT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hidden_blocks(model: nn.Module) -> list[nn.Module]:
    """The hidden blocks of ``model`` in forward order.

    hposvc's MLP and CNN keep them in ``model.hidden`` (``[layer → norm → activation]``
    per block). Any other model counts each Linear/Conv layer but the last (its head).
    """
    hidden = getattr(model, "hidden", None)
    if isinstance(hidden, nn.Sequential):
        return list(hidden)
    layers = [m for m in model.modules() if isinstance(m, _UNIT_LAYERS)]
    return layers[:-1]


def _unit_layer(block: nn.Module) -> nn.Module | None:
    if isinstance(block, _UNIT_LAYERS):
        return block
    return next((m for m in block.modules() if isinstance(m, _UNIT_LAYERS)), None)


@torch.no_grad()
def activation_std_per_layer(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Standard deviation of each hidden block's output (all units and samples pooled) on
    the batch ``x``, one number per block, input side first.

    Runs a training-mode forward pass, as the first training step sees the network (batch
    norm normalises with the batch's statistics), on a copy of the model, so the model's
    own running statistics and mode are untouched. Pass a fixed batch (the study service
    uses ``task.x_val[:PROBE_SAMPLES]``) so that a deterministic scheme gives the same
    numbers for every seed. A model without hidden blocks gives ``[]``.

    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> len(activation_std_per_layer(model, torch.randn(8, 4)))
    1
    """
    probe = copy.deepcopy(model).train()
    blocks = hidden_blocks(probe)
    stds: list[float | None] = [None] * len(blocks)

    def hook(index: int):
        def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            stds[index] = float(output.detach().float().std())

        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    try:
        probe(x.to(next(probe.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return [math.nan if s is None else s for s in stds]


@torch.no_grad()
def unit_symmetry(model: nn.Module) -> float:
    """How far the hidden units of the least symmetric layer are from being identical.

    For each hidden Linear/Conv layer, a unit's incoming weights are its weight row
    (a conv's output channel, flattened) plus its bias. The layer's value is the largest
    distance of a row from the layer's mean row, divided by the mean row norm; the result
    is the largest value over layers. 0 means every hidden layer's units are identical
    (a layer whose rows are all zero counts as identical); random inits give values near
    1 or above. ``nan`` for a model without hidden layers (e.g. depth 0: a linear model).

    >>> layer = torch.nn.Linear(3, 4)
    >>> _ = torch.nn.init.constant_(layer.weight, 0.5), torch.nn.init.zeros_(layer.bias)
    >>> unit_symmetry(torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    0.0
    """
    values = []
    for block in hidden_blocks(model):
        layer = _unit_layer(block)
        if layer is None:
            continue
        rows = layer.weight.detach().float().flatten(1)
        if getattr(layer, "bias", None) is not None:
            rows = torch.cat([rows, layer.bias.detach().float()[:, None]], dim=1)
        norm = float(rows.norm(dim=1).mean())
        if norm == 0.0:
            values.append(0.0)
            continue
        spread = float((rows - rows.mean(dim=0, keepdim=True)).norm(dim=1).max())
        values.append(spread / norm)
    return max(values) if values else math.nan
