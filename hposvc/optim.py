"""Optimizers and learning-rate schedules built from a TrialConfig.

Every number a ``torch.optim`` optimizer uses is passed explicitly from
``config.optimizer_params`` (never left to the framework default), so a stored trial
means the same thing whichever PyTorch version replays it.

>>> import torch
>>> from hposvc.config import TrialConfig
>>> cfg = TrialConfig(optimizer="nesterov", lr=0.05, schedule="warmup_cosine")
>>> opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg)
>>> type(opt).__name__, opt.defaults["momentum"], opt.defaults["nesterov"]
('SGD', 0.9, True)
>>> sched = build_scheduler(opt, cfg, total_steps=100)
>>> round(lr_factor(cfg, 55, 100), 3)
0.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from hposvc.config import TrialConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]

# NAdam's momentum-decay ψ (Dozat 2016) is not a search dimension; it is still written out
# as a number so the optimizer never depends on a framework default.
NADAM_MOMENTUM_DECAY = 4e-3


def build_optimizer(params: Iterable[Any], config: TrialConfig) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer ``config.optimizer`` names, with its explicit numbers.

    ``rho`` is Adadelta's ρ and RMSprop's α (both decay the squared-gradient average);
    ``momentum``/``nesterov`` are SGD with heavy-ball or Nesterov momentum μ; AdamW's
    ``weight_decay`` is decoupled, the others' is L2 added to the gradient.

    >>> from hposvc.config import TrialConfig
    >>> p = [torch.nn.Parameter(torch.zeros(2))]
    >>> build_optimizer(p, TrialConfig(optimizer="rmsprop")).defaults["alpha"]
    0.99
    """
    p = config.optimizer_params
    name = config.optimizer
    wd = p["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=p["lr"], momentum=0.0, dampening=0.0, weight_decay=wd, nesterov=False)
    if name in ("momentum", "nesterov"):
        return torch.optim.SGD(
            params, lr=p["lr"], momentum=p["momentum"], dampening=0.0, weight_decay=wd, nesterov=name == "nesterov"
        )
    if name == "adagrad":
        return torch.optim.Adagrad(
            params, lr=p["lr"], lr_decay=0.0, weight_decay=wd, initial_accumulator_value=0.0, eps=p["eps"]
        )
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=p["lr"], rho=p["rho"], eps=p["eps"], weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=p["lr"], alpha=p["rho"], eps=p["eps"], weight_decay=wd, momentum=0.0, centered=False
        )
    betas = (p["beta1"], p["beta2"]) if "beta1" in p else None
    if name == "adam":
        return torch.optim.Adam(params, lr=p["lr"], betas=betas, eps=p["eps"], weight_decay=wd, amsgrad=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=p["lr"], betas=betas, eps=p["eps"], weight_decay=wd, amsgrad=False)
    if name == "nadam":
        return torch.optim.NAdam(
            params, lr=p["lr"], betas=betas, eps=p["eps"], weight_decay=wd, momentum_decay=NADAM_MOMENTUM_DECAY
        )
    # TrialConfig validates the name, so reaching here means OPTIMIZERS grew without us.
    raise NotImplementedError(f"hposvc.optim has no builder for optimizer {name!r}")


def lr_factor(config: TrialConfig, step: int, total_steps: int) -> float:
    """The multiplier of ``config.lr`` at optimizer step ``step`` (0-based) of ``total_steps``.

    - ``constant``: 1.
    - ``cosine``: ½(1 + cos(π·step/total)), from 1 at step 0 to 0 at ``total_steps``.
    - ``warmup_cosine``: the first ``w = round(warmup·total)`` steps rise linearly,
      (step+1)/(w+1) as in nanoGPT so the first step is not wasted at lr 0; then a cosine
      from 1 to 0 over the remaining ``total - w`` steps.

    >>> from hposvc.config import TrialConfig
    >>> cfg = TrialConfig(schedule="cosine")
    >>> lr_factor(cfg, 0, 10), lr_factor(cfg, 5, 10), lr_factor(cfg, 10, 10)
    (1.0, 0.5, 0.0)
    """
    if config.schedule == "constant" or total_steps <= 0:
        return 1.0
    warmup_steps = round((config.warmup or 0.0) * total_steps) if config.schedule == "warmup_cosine" else 0
    # 1) linear warm-up
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    # 2) cosine decay to 0 over what is left; past the end it stays at 0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrialConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A ``LambdaLR`` applying :func:`lr_factor`; call ``.step()`` after every optimizer step.

    >>> from hposvc.config import TrialConfig
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> sched = build_scheduler(opt, TrialConfig(optimizer="sgd", schedule="cosine"), total_steps=4)
    >>> opt.step(); sched.step(); opt.step(); sched.step()
    >>> opt.param_groups[0]["lr"]  # 0.1 · ½(1 + cos(π/2))
    0.05
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step, total_steps))
