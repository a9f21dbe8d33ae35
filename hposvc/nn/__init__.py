"""Models and what hposvc changes in them: activations, normalisation layers, weight
initialisation, the built-in families, and :func:`convert` for any ``nn.Module``.

Built-in families (:func:`build_model`, from a task and a
:class:`~hposvc.config.TrialConfig`; ``width`` is hidden units or channels):

- ``mlp`` (inputs ``(N, features)``): ``[Linear → norm → activation] × depth → Linear head``;
- ``cnn1d`` (``(N, C, L)``): ``[Conv1d(k=5) → norm → activation] × depth → flatten → Linear``,
  halving the length while it is at least :data:`CNN_MIN_DOWNSAMPLE_LENGTH`;
- ``cnn2d`` (``(N, C, H, W)``, or flat square vectors as 1-channel images): the same with
  3×3 Conv2d;
- ``resnet``: a CIFAR-style ResNet (3 stages of ``depth`` basic blocks, ``width`` base
  channels), optionally with every residual branch starting at 0.

Heads are linear: the softmax or sigmoid lives in the loss. Modules have readable names
(``hidden.0.linear``, ``hidden.0.norm``, ``hidden.0.act``, ``stages.1.0.conv1``, ``head``)
and hold no Python-side state, so ``torch.func.stack_module_state`` / ``functional_call``
can batch a population.

A user's own model gets the same layers through :func:`convert`, which swaps every
normalisation and activation module and applies the init scheme;
:func:`norm_layer` and :func:`activation_layer` are the builders both use, for factories
that build their layers themselves (torchvision's ``norm_layer`` convention takes the
channel count: ``functools.partial(norm_layer, "group", dims=2)``).

Initialisation rule, the same for every model (:func:`init_weights`, :func:`convert`):

- the ``init`` scheme sets the weight of every Linear and Conv1d/2d/3d layer, head included,
  with that layer's fan; He's schemes use the activation's gain ``sqrt(2 / (1 + a²))``
  (``a``: leaky ReLU 0.01, PReLU 0.25, else 0), Xavier's Glorot's gain 1;
- every bias starts at 0;
- norm layers start at weight 1 / bias 0 (and fresh running statistics);
- PReLU keeps PyTorch's slope 0.25: it is part of the activation, not a weight;
- ``zero`` (ZerO) is deterministic: identity or scaled Hadamard matrices, at the kernel
  centre of convs;
- ``pretrained`` instead loads the whole state_dict (biases, norm parameters and running
  statistics included) from ``config.pretrained_path``, and the file must fit exactly;
  ``default`` (for :func:`convert`) keeps the model's own weights.

>>> import torch
>>> layer = torch.nn.Linear(2, 4)
>>> init_weights(layer, TrialConfig(init="zero"))
>>> (layer.weight.detach() * 2**0.5).round()  # c = 2^(-1/2) times a Hadamard corner
tensor([[ 1.,  1.],
        [ 1., -1.],
        [ 1.,  1.],
        [ 1., -1.]])
"""

from __future__ import annotations

from torch import nn

from hposvc.config import TrialConfig
from hposvc.nn._convert import ConversionReport, convert, convert_with_report
from hposvc.nn._init import INIT_SCHEMES, WEIGHT_TYPES, initialise, load_pretrained, zero_init_matrix
from hposvc.nn._layers import (
    ACTIVATION_TYPES,
    DEFAULT_NORM_GROUPS,
    NORM_EPS,
    NORM_TYPES,
    ChannelsFirst,
    ChannelsLast,
    MapRMSNorm,
    activation_layer,
    group_count,
    negative_slope,
    norm_layer,
)
from hposvc.nn._models import (
    CNN2D_KERNEL_SIZE,
    CNN_KERNEL_SIZE,
    CNN_MIN_DOWNSAMPLE_LENGTH,
    CNN1d,
    CNN2d,
    MLP,
    MODEL_FAMILIES,
    ResidualBlock,
    ResNet,
    SelfAttention,
    Transformer,
    TransformerBlock,
    TRANSFORMER_NORMS,
    build_model,
    check_family,
    count_parameters,
)

__all__ = [
    "ACTIVATION_TYPES",
    "CNN1d",
    "CNN2d",
    "CNN2D_KERNEL_SIZE",
    "CNN_KERNEL_SIZE",
    "CNN_MIN_DOWNSAMPLE_LENGTH",
    "ChannelsFirst",
    "ChannelsLast",
    "ConversionReport",
    "DEFAULT_NORM_GROUPS",
    "INIT_SCHEMES",
    "MLP",
    "MODEL_FAMILIES",
    "MapRMSNorm",
    "NORM_EPS",
    "NORM_TYPES",
    "ResNet",
    "ResidualBlock",
    "SelfAttention",
    "TRANSFORMER_NORMS",
    "Transformer",
    "TransformerBlock",
    "WEIGHT_TYPES",
    "activation_layer",
    "build_model",
    "check_family",
    "convert",
    "convert_with_report",
    "count_parameters",
    "group_count",
    "init_weights",
    "initialise",
    "load_pretrained",
    "negative_slope",
    "norm_layer",
    "zero_init_matrix",
]


def init_weights(model: nn.Module, config: TrialConfig) -> None:
    """Initialise ``model`` in place by ``config.init`` with ``config``'s activation gain,
    ``init_std`` and ``pretrained_path`` (the rule is in the module docstring).

    >>> import torch
    >>> layer = torch.nn.Linear(3, 3)
    >>> init_weights(layer, TrialConfig(init="zero"))
    >>> bool((layer.weight == torch.eye(3)).all()), layer.bias.tolist()
    (True, [0.0, 0.0, 0.0])
    """
    initialise(
        model, config.init, activation=config.activation, std=config.init_std, pretrained_path=config.pretrained_path
    )
