"""Train a population of trials together: the batched twin of :func:`hposvc.train.train`.

:func:`train_population` takes configs that share a structure (:func:`population_key`)
and trains them as one vectorised model, step for step what :func:`hposvc.train.train`
does for each config alone:

- every member is seeded with :func:`hposvc.train.seed_everything` and built by
  :func:`hposvc.nn.build_model` before stacking, so it starts from its own trial's weights;
- every member shuffles with its own ``torch.Generator`` seeded by its seed, giving its
  trial's batch order; when all seeds are equal the orders are equal and one shared batch
  is fed to all members (cheaper), otherwise each member gets its own gathered batch;
- the same batch count (lone last sample dropped), losses, schedule
  (:func:`hposvc.optim.lr_factor` per member and step), optimizer formulas
  (:class:`~hposvc.population.optim.BatchedOptimizer`), evaluation and divergence rule.

Members that diverge or that ``on_epoch`` stops leave the population at the end of that
epoch (their state is index-selected away, see :meth:`PopulationModel.keep`); the others
carry on. A member that diverges mid-epoch finishes the epoch with non-finite numbers, as
it would alone; members never mix, so the others are unaffected.

Results agree with sequential training up to float rounding: batched kernels sum in
another order, which moves losses by ~1e-7 relative per step, and over a few epochs the
metrics typically agree to ~1e-6 (the tests allow 1e-4). Training can amplify rounding,
so long or high-lr runs may drift apart further (the benchmark prints the largest
difference). One case amplifies it at once: the bias of a layer right before batch norm
has a gradient that is pure rounding noise (the norm removes any shift), and Adam-family
optimizers normalise that noise into ±lr steps; such biases, and the running means that
follow them, then differ between the two modes, which moves eval-mode (validation)
losses by ~1e-3 while the training losses still agree to ~1e-7.

>>> from hposvc.config import TrialConfig
>>> from hposvc.tasks import load_task
>>> cfgs = [TrialConfig(optimizer="momentum", lr=lr, epochs=2, width=16) for lr in (0.01, 0.1)]
>>> [r.status for r in train_population(cfgs, load_task("moons"), device="cpu")]
['completed', 'completed']
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from hposvc.config import TrialConfig
from hposvc.devices import resolve_device
from hposvc.errors import TrainingError, invalid
from hposvc.optim import lr_factor
from hposvc.population.model import PopulationModel
from hposvc.population.optim import BatchedOptimizer
from hposvc.tasks import Task
from hposvc.train import EVAL_CHUNK, EpochMetrics, TrainResult, _divergence, _loss, seed_everything

__all__ = ["group_configs", "population_key", "population_ready", "train_population"]

EVAL_MIN_CHUNK = 256  # smallest evaluation chunk, however large the population

# What must be equal for trials to share a population, and why (see population_key).
KEY_FIELDS = (
    "optimizer",  # one update rule per population: its state tensors differ per rule
    "family",  # the stacked parameters need one architecture ...
    "depth",  # ... and one shape ...
    "width",
    "norm",  # ... and one module structure runs every member (functional_call)
    "norm_groups",
    "activation",
    "batch_size",  # members step in lockstep: same batches per epoch ...
    "epochs",  # ... and the same number of epochs
)


def population_key(config: TrialConfig) -> tuple[Any, ...]:
    """The grouping key: configs with equal keys (on the same task) can train together.

    Must match: the optimizer (one update rule and state layout per population), family,
    depth, width, norm, norm groups and activation (one stacked shape and one module that
    ``functional_call`` runs for all members), batch size and epochs (members step in
    lockstep), and ``extra`` (a user task factory may read it to shape the model).

    Free to differ: every optimizer number (lr, momentum, β, ε, ρ, weight decay are
    per-member tensors), schedule and warm-up (each member's lr factor is looked up per
    step), init scheme, std, pretrained file and zero-init of residual branches (members
    are initialised before they are stacked), and the seed (each member shuffles with its
    own generator).

    >>> a = TrialConfig(optimizer="adam", lr=1e-3, seed=1, schedule="cosine")
    >>> b = TrialConfig(optimizer="adam", lr=3e-2, seed=2, init="zero")
    >>> population_key(a) == population_key(b), population_key(a) == population_key(a.replace(width=64))
    (True, False)
    """
    extra = json.dumps(dict(config.extra), sort_keys=True, default=str)
    return tuple(getattr(config, name) for name in KEY_FIELDS) + (extra,)


def population_ready(config: TrialConfig) -> str | None:
    """Why ``config`` trains alone rather than in a population, or None when it can join
    one: the population runs fp32 on device tensors, eagerly, in the default layout.

    >>> population_ready(TrialConfig()), population_ready(TrialConfig(precision="bf16"))
    (None, "precision 'bf16' (populations train in fp32)")
    """
    if config.precision != "fp32":
        return f"precision {config.precision!r} (populations train in fp32)"
    if config.compile:
        return "compile = true (populations are not compiled)"
    if config.channels_last:
        return "channels_last = true (populations keep the default layout)"
    if config.data == "loader":
        return "data = 'loader' (populations slice device tensors)"
    return None


def group_configs(configs: Sequence[TrialConfig], *, max_size: int | None = None) -> list[list[int]]:
    """Indices of ``configs`` grouped by :func:`population_key`, first-seen order, each
    group cut into chunks of at most ``max_size`` members. A config that cannot join a
    population (:func:`population_ready`) is a group of its own, so it trains alone.

    >>> cfgs = [TrialConfig(optimizer="sgd"), TrialConfig(optimizer="adam"), TrialConfig(optimizer="sgd", lr=0.5)]
    >>> group_configs(cfgs), group_configs(cfgs, max_size=1)
    ([[0, 2], [1]], [[0], [2], [1]])
    """
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise invalid("max_size", max_size, "a positive integer or None")
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, config in enumerate(configs):
        alone = population_ready(config) is not None
        groups.setdefault(("alone", i) if alone else population_key(config), []).append(i)
    size = max_size or max(1, len(configs))
    return [g[start : start + size] for g in groups.values() for start in range(0, len(g), size)]


def train_population(
    configs: Sequence[TrialConfig],
    task: Task,
    *,
    device: str | torch.device = "auto",
    on_epoch: Callable[[int, EpochMetrics], bool] | None = None,
    keep_model: bool = False,
) -> list[TrainResult]:
    """Train ``configs`` (all with one :func:`population_key`) together on ``task``.

    Returns one :class:`~hposvc.train.TrainResult` per config, in order, as
    :func:`hposvc.train.train` would for that config alone (within float rounding).
    ``on_epoch(i, metrics)`` is called after each epoch for every member ``i`` (index into
    ``configs``) still training; True stops that member (status ``"stopped"``). A member
    that diverges ends ``"diverged"`` alone. ``wall_time`` and ``elapsed`` count from the
    start of the population, so they are shared time, not the member's own.

    >>> from hposvc.tasks import load_task
    >>> cfgs = [TrialConfig(optimizer="sgd", lr=lr, epochs=2) for lr in (0.1, 100.0)]
    >>> [r.status for r in train_population(cfgs, load_task("digits"), device="cpu")]
    ['completed', 'diverged']
    """
    configs = list(configs)
    if not configs:
        raise invalid("configs", configs, "a non-empty list of TrialConfig")
    keys = {population_key(c) for c in configs}
    if len(keys) != 1:
        raise invalid(
            "configs",
            f"{len(keys)} different population keys",
            "configs that share one population_key",
            hint="Split them with hposvc.population.group_configs first.",
        )
    dev = resolve_device(device)
    try:
        return _train_population(configs, task, dev, on_epoch, keep_model)
    except torch.OutOfMemoryError as e:
        raise TrainingError(
            f"out of memory on {dev} training a population of {len(configs)} on {task.name} "
            f"with batch size {configs[0].batch_size}; use a smaller population"
        ) from e


def _train_population(
    configs: list[TrialConfig],
    task: Task,
    dev: torch.device,
    on_epoch: Callable[[int, EpochMetrics], bool] | None,
    keep_model: bool,
) -> list[TrainResult]:
    t0 = time.perf_counter()
    shape = configs[0]  # the structure every member shares
    # 1) build each member as train() does (seed, build on the CPU), stack, move once
    model = PopulationModel.build(task, configs, device=dev, seed_fn=seed_everything)
    n_params = model.n_params
    task = task.materialised()  # a dataset task: its tensors (read once per process)
    x_train, y_train = task.x_train.to(dev), task.y_train.to(dev)
    x_val, y_val = task.x_val.to(dev), task.y_val.to(dev)
    x_test, y_test = task.x_test.to(dev), task.y_test.to(dev)
    shuffles = [torch.Generator().manual_seed(c.seed) for c in configs]  # one per member, as train()
    shared_order = len({c.seed for c in configs}) == 1

    # 2) optimizer, and every member's lr factor for every step (float64, like LambdaLR)
    n = len(x_train)
    batch_size = min(shape.batch_size, n)
    n_batches = math.ceil(n / batch_size)
    if n % batch_size == 1 and n_batches > 1:
        n_batches -= 1  # drop a lone last sample, exactly as train() does
    total_steps = n_batches * shape.epochs
    optimizer = BatchedOptimizer([model.flat], configs)
    factors = torch.tensor(
        [[lr_factor(c, s, total_steps) for s in range(total_steps)] for c in configs], dtype=torch.float64
    ).to(dev)

    # 3) the loop; `alive` maps population slots to indices into `configs`
    alive = list(range(len(configs)))
    histories: list[list[EpochMetrics]] = [[] for _ in configs]
    results: list[TrainResult | None] = [None] * len(configs)
    first_loss: list[float | None] = [None] * len(configs)
    step = 0
    for epoch in range(1, shape.epochs + 1):
        model.train()
        orders = [torch.randperm(n, generator=shuffles[i]) for i in alive]
        order = (orders[0] if shared_order else torch.stack(orders)).to(dev)
        losses = []
        for b in range(n_batches):
            idx = order[..., b * batch_size : (b + 1) * batch_size]
            out = model(x_train[idx], per_member=not shared_order)  # (M, B, outputs)
            target = y_train[idx].expand(out.shape[0], idx.shape[-1])
            loss = _loss(task.kind, out.flatten(0, 1), target.flatten(), reduction="none")
            loss = loss.view(out.shape[0], -1).mean(dim=1)  # each member's mean batch loss
            grad = model.backward(loss.sum())  # members are independent: Σ's gradient is each one's
            optimizer.step([model.flat], [grad], lr_scale=factors[:, step + b])
            losses.append(loss.detach())
        step += n_batches
        step_losses = torch.stack(losses).T.tolist()  # (M, n_batches): one sync per epoch
        val_losses, val_accs = _evaluate_population(model, task.kind, x_val, y_val)

        # 4) per member: metrics, divergence, on_epoch; collect who leaves
        leaving: list[tuple[int, str, str]] = []
        for slot, i in enumerate(alive):
            config = configs[i]
            first_loss[i] = step_losses[slot][0] if first_loss[i] is None else first_loss[i]
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=sum(step_losses[slot]) / n_batches,
                val_loss=val_losses[slot],
                val_accuracy=val_accs[slot],
                lr=config.lr * lr_factor(config, step - 1, total_steps),
                elapsed=time.perf_counter() - t0,
            )
            histories[i].append(metrics)
            reason = _divergence(step_losses[slot], first_loss[i], epoch) or (
                None
                if math.isfinite(metrics.val_loss)
                else f"diverged: validation loss is {metrics.val_loss} at epoch {epoch}"
            )
            if reason:
                leaving.append((slot, "diverged", reason))
            elif on_epoch is not None and on_epoch(i, metrics):
                leaving.append((slot, "stopped", f"stopped: on_epoch asked to stop after epoch {epoch}"))
        if epoch == shape.epochs:
            gone = {slot for slot, _, _ in leaving}
            leaving += [(slot, "completed", None) for slot in range(len(alive)) if slot not in gone]

        # 5) final metrics of leaving members (weights unchanged since this epoch's
        # validation, so its numbers are the final val_*), then drop them
        if leaving:
            test_losses, test_accs = _evaluate_population(model, task.kind, x_test, y_test)
        for slot, status, reason in leaving:
            i = alive[slot]
            final = {"val_loss": val_losses[slot], "val_accuracy": val_accs[slot]}
            final.update(test_loss=test_losses[slot], test_accuracy=test_accs[slot])
            results[i] = TrainResult(
                status=status,
                reason=reason,
                history=tuple(histories[i]),
                final={k: v for k, v in final.items() if v is not None},  # no accuracy for regression
                wall_time=time.perf_counter() - t0,
                device=str(dev),
                n_params=n_params,
                model=model.member_module(slot) if keep_model else None,
            )
        if leaving and epoch < shape.epochs:
            gone = {slot for slot, _, _ in leaving}
            keep = [slot for slot in range(len(alive)) if slot not in gone]
            if not keep:
                break
            index = torch.tensor(keep, dtype=torch.long, device=dev)
            model.keep(index)
            optimizer.keep(index)
            factors = factors.index_select(0, index)
            alive = [alive[slot] for slot in keep]
            # A member that leaves no longer shuffles; the others keep their generators.
    return [r for r in results if r is not None]


@torch.no_grad()
def _evaluate_population(
    model: PopulationModel, kind: str, x: Tensor, y: Tensor
) -> tuple[list[float], list[float | None]]:
    """Each member's mean loss and accuracy (None for regression) in eval mode: the
    batched form of :func:`hposvc.train._evaluate`, with one device sync."""
    model.eval()
    m = model.n_members
    # train()'s chunk holds one model's activations; M members hold M times as much, so
    # the chunk shrinks with M (which also keeps a CPU evaluation in cache).
    chunk = max(EVAL_MIN_CHUNK, EVAL_CHUNK // m)
    loss_sum = torch.zeros(m, device=x.device)
    correct = torch.zeros(m, device=x.device)
    for start in range(0, len(x), chunk):
        out, target = model(x[start : start + chunk]), y[start : start + chunk]
        expanded = target.expand(m, len(target))
        loss_sum += _loss(kind, out.flatten(0, 1), expanded.flatten(), reduction="none").view(m, -1).sum(dim=1)
        if kind == "multiclass":
            correct += (out.argmax(dim=-1) == expanded).sum(dim=1)
        elif kind == "binary":
            correct += ((out.squeeze(-1) > 0) == (expanded > 0.5)).sum(dim=1)
    losses, n_correct = torch.stack([loss_sum, correct]).tolist()
    accs = [None if kind == "regression" else c / len(x) for c in n_correct]
    return [v / len(x) for v in losses], accs
