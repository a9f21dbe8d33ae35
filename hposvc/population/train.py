"""Train a population of trials together: the batched twin of :func:`hposvc.train.train`.

:func:`train_population` takes configs that share a structure (:func:`population_key`)
and trains them as one vectorised model, step for step what :func:`hposvc.train.train`
does for each config alone:

- every member is seeded with :func:`hposvc.train.seed_everything` and built by
  :func:`hposvc.nn.build_model` before stacking, so it starts from its own trial's weights;
- every member shuffles with its own ``torch.Generator`` seeded by its seed, giving its
  trial's batch order; when all seeds are equal the orders are equal and one shared batch
  is fed to all members (cheaper), otherwise each member gets its own gathered batch;
- the same loop (:func:`hposvc.train.run_loop`: batch count, evaluation, metrics,
  divergence and stop rules, one code path for both), with the population's step:
  losses per member, schedule (:func:`hposvc.optim.lr_factor` per member and step) and
  optimizer formulas (:class:`~hposvc.population.optim.BatchedOptimizer`);
- a dataset task through the ``DataLoader`` path feeds one batch stream to every
  member (such members share a seed, :func:`population_key`).

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
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from hposvc.config import TrialConfig
from hposvc.devices import resolve_device
from hposvc.errors import TrainingError, invalid
from hposvc.optim import lr_factor
from hposvc.population.model import PopulationModel
from hposvc.population.optim import BatchedOptimizer
from hposvc.population.vmappable import structure_key
from hposvc.tasks import Task
from hposvc.train import (
    EVAL_CHUNK,
    EpochMetrics,
    TrainResult,
    _loss,
    batch_plan,
    data_path,
    make_data,
    run_loop,
    seed_everything,
)

__all__ = ["group_configs", "population_key", "population_ready", "train_population"]

EVAL_MIN_CHUNK = 256  # smallest evaluation chunk, however large the population

# What must be equal for trials to share a population, and why (see population_key).
STEP_FIELDS = (
    "optimizer",  # one update rule per population: its state tensors differ per rule
    "batch_size",  # members step in lockstep: same batches per epoch ...
    "epochs",  # ... and the same number of epochs
)
MODEL_FIELDS = (  # what shapes one of hposvc's own families; a built model: its structure_key
    "family",  # the stacked parameters need one architecture ...
    "depth",  # ... and one shape ...
    "width",
    "heads",
    "norm",  # ... and one module structure runs every member (functional_call)
    "norm_groups",
    "activation",
)
KEY_FIELDS = STEP_FIELDS + MODEL_FIELDS


def population_key(config: TrialConfig, *, task: Task | None = None, model: torch.nn.Module | None = None) -> tuple[Any, ...]:
    """The grouping key: configs with equal keys (on the same task) can train together.

    Must match: the optimizer (one update rule and state layout per population), batch
    size and epochs (members step in lockstep); the model's structure: for hposvc's
    families family, depth, width, norm, norm groups, activation and ``extra`` (a user
    task factory may read it to shape the model), for a built ``model`` (the user's, after
    conversion) its :func:`~hposvc.population.vmappable.structure_key`; and how batches
    arrive (:func:`hposvc.train.data_path` on ``task``, else ``config.data``): through a
    DataLoader members see one batch stream, so there the seed must match too.

    Free to differ: every optimizer number (lr, momentum, β, ε, ρ, weight decay are
    per-member tensors), schedule and warm-up (each member's lr factor is looked up per
    step), init scheme, std, pretrained file and zero-init of residual branches (members
    are initialised before they are stacked), and, on device tensors, the seed (each
    member shuffles with its own generator).

    >>> a = TrialConfig(optimizer="adam", lr=1e-3, seed=1, schedule="cosine")
    >>> b = TrialConfig(optimizer="adam", lr=3e-2, seed=2, init="zero")
    >>> population_key(a) == population_key(b), population_key(a) == population_key(a.replace(width=64))
    (True, False)
    """
    if model is None:
        structure: tuple[Any, ...] = tuple(getattr(config, name) for name in MODEL_FIELDS)
        structure += (json.dumps(dict(config.extra), sort_keys=True, default=str),)
    else:
        structure = structure_key(model)
    path = config.data if task is None else data_path(config, task)
    stream = (path, config.seed) if path == "loader" else (path,)
    return tuple(getattr(config, name) for name in STEP_FIELDS) + (structure,) + stream


def population_ready(config: TrialConfig) -> str | None:
    """Why ``config`` trains alone rather than in a population, or None when it can join
    one: the population runs fp32, eagerly, in the default layout.

    >>> population_ready(TrialConfig()), population_ready(TrialConfig(precision="bf16"))
    (None, "precision 'bf16' (populations train in fp32)")
    """
    if config.precision != "fp32":
        return f"precision {config.precision!r} (populations train in fp32)"
    if config.compile:
        return "compile = true (populations are not compiled)"
    if config.channels_last:
        return "channels_last = true (populations keep the default layout)"
    return None


def group_configs(
    configs: Sequence[TrialConfig],
    *,
    max_size: int | None = None,
    task: Task | None = None,
    models: Sequence[torch.nn.Module] | None = None,
) -> list[list[int]]:
    """Indices of ``configs`` grouped by :func:`population_key` (on ``task``, and by the
    structure of ``models[i]`` when the members are built already), first-seen order,
    each group cut into chunks of at most ``max_size`` members. A config that cannot join
    a population (:func:`population_ready`) is a group of its own, so it trains alone.

    >>> cfgs = [TrialConfig(optimizer="sgd"), TrialConfig(optimizer="adam"), TrialConfig(optimizer="sgd", lr=0.5)]
    >>> group_configs(cfgs), group_configs(cfgs, max_size=1)
    ([[0, 2], [1]], [[0], [2], [1]])
    """
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise invalid("max_size", max_size, "a positive integer or None")
    if models is not None and len(models) != len(configs):
        raise invalid("models", f"{len(models)} models", f"one built model per config ({len(configs)})")
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, config in enumerate(configs):
        if population_ready(config) is not None:
            key: tuple[Any, ...] = ("alone", i)
        else:
            key = population_key(config, task=task, model=None if models is None else models[i])
        groups.setdefault(key, []).append(i)
    size = max_size or max(1, len(configs))
    return [g[start : start + size] for g in groups.values() for start in range(0, len(g), size)]


def train_population(
    configs: Sequence[TrialConfig],
    task: Task,
    *,
    device: str | torch.device = "auto",
    on_epoch: Callable[[int, EpochMetrics], bool] | None = None,
    keep_model: bool = False,
    on_batch: Callable[[], None] | None = None,
    models: Sequence[torch.nn.Module] | None = None,
) -> list[TrainResult]:
    """Train ``configs`` (all with one :func:`population_key`) together on ``task``.

    Returns one :class:`~hposvc.train.TrainResult` per config, in order, as
    :func:`hposvc.train.train` would for that config alone (within float rounding).
    ``on_epoch(i, metrics)`` is called after each epoch for every member ``i`` (index into
    ``configs``) still training; True stops that member (status ``"stopped"``). A member
    that diverges ends ``"diverged"`` alone. ``wall_time`` and ``elapsed`` count from the
    start of the population, so they are shared time, not the member's own. ``on_batch()``
    is called after every step; an exception raised there ends the population at once.
    ``models``: the members built already (the user's model: one per config, each seeded
    and converted as its trial builds it alone, e.g. by ``TrialContext.build_model``);
    otherwise each is built from its config's family. Check a user's model with
    :func:`~hposvc.population.vmappable.vmap_reason` first: stacking trusts its forward.

    >>> from hposvc.tasks import load_task
    >>> cfgs = [TrialConfig(optimizer="sgd", lr=lr, epochs=2) for lr in (0.1, 100.0)]
    >>> [r.status for r in train_population(cfgs, load_task("digits"), device="cpu")]
    ['completed', 'diverged']
    """
    configs = list(configs)
    if not configs:
        raise invalid("configs", configs, "a non-empty list of TrialConfig")
    if models is not None and len(models) != len(configs):
        raise invalid("models", f"{len(models)} models", f"one built model per config ({len(configs)})")
    keys = {population_key(c, task=task, model=None if models is None else models[i]) for i, c in enumerate(configs)}
    if len(keys) != 1:
        raise invalid(
            "configs",
            f"{len(keys)} different population keys",
            "configs that share one population_key",
            hint="Split them with hposvc.population.group_configs first.",
        )
    dev = resolve_device(device)
    try:
        return _train_population(configs, task, dev, on_epoch, keep_model, models=models, on_batch=on_batch)
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
    models: Sequence[torch.nn.Module] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[TrainResult]:
    t0 = time.perf_counter()
    shape = configs[0]  # the structure every member shares
    # 1) build each member as train() does (seed, build on the CPU), stack, move once
    if models is None:
        model = PopulationModel.build(task, configs, device=dev, seed_fn=seed_everything)
    else:
        model = PopulationModel(models, device=dev)
    path = data_path(shape, task)
    data = make_data(path, task, dev, configs)  # one shuffle per member, as train()

    # 2) optimizer, and every member's lr factor for every step (float64, like LambdaLR)
    _, n_batches = batch_plan(data.n_train, shape.batch_size)
    total_steps = n_batches * shape.epochs
    optimizer = BatchedOptimizer([model.flat], configs)
    factors = torch.tensor(
        [[lr_factor(c, s, total_steps) for s in range(total_steps)] for c in configs], dtype=torch.float64
    ).to(dev)
    learner = _Members(model, optimizer, factors, task.kind, per_member=data.per_member)

    # 3) random draws (dropout): one generator for the whole population, seeded from its
    # members' seeds, so re-running the same population repeats every member's draws
    seed = population_seed(configs)
    seed_everything(seed)
    random_layers = [type(m).__name__ for m in model.template.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]

    # 4) the loop every trial runs (hposvc.train.run_loop)
    results = run_loop(
        learner, data, configs, task.kind, device=dev, t0=t0,
        on_epoch=on_epoch, on_batch=on_batch, keep_model=keep_model,
    )
    notes = [()] * len(configs)
    if random_layers:
        notes = [
            (f"{random_layers[0]} drew member {i}'s masks in a population of {len(configs)} seeded with "
             f"{seed} (population_seed of the members' seeds): the same configs together repeat them, alone they differ",)
            for i in range(len(configs))
        ]
    return [replace(r, data=path, notes=r.notes + n) for r, n in zip(results, notes)]


def population_seed(configs: Sequence[TrialConfig]) -> int:
    """The seed of a population's random draws (dropout, noise in ``forward``): a hash of
    its members' seeds in order. Member ``m``'s draws are the ``m``-th slice of each
    batched draw (``vmap(..., randomness="different")``), so they repeat when the same
    configs train together again; they differ from the draws the trial makes alone.

    >>> population_seed([TrialConfig(seed=1), TrialConfig(seed=2)]) == population_seed([TrialConfig(seed=1), TrialConfig(seed=2)])
    True
    """
    return zlib.crc32(json.dumps([c.seed for c in configs]).encode())


class _Members:
    """A :class:`PopulationModel` and its :class:`BatchedOptimizer` as the
    :class:`~hposvc.train.Learner` that :func:`~hposvc.train.run_loop` trains."""

    def __init__(self, model: PopulationModel, optimizer: BatchedOptimizer, factors: Tensor, kind: str, *, per_member: bool) -> None:
        self.model, self.optimizer, self.factors, self.kind, self.per_member = model, optimizer, factors, kind, per_member
        self.n_params = model.n_params

    @property
    def n_members(self) -> int:
        return self.model.n_members

    @property
    def eval_chunk(self) -> int:
        # train()'s chunk holds one model's activations; M members hold M times as much, so
        # the chunk shrinks with M (which also keeps a CPU evaluation in cache).
        return max(EVAL_MIN_CHUNK, EVAL_CHUNK // self.n_members)

    def train(self, mode: bool = True) -> "_Members":
        self.model.train(mode)
        return self

    def step(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        out = self.model(x, per_member=self.per_member)  # (M, B, outputs)
        target = y.expand(out.shape[0], out.shape[1])
        loss = _loss(self.kind, out.flatten(0, 1), target.flatten(), reduction="none")
        loss = loss.view(out.shape[0], -1).mean(dim=1)  # each member's mean batch loss
        grad = self.model.backward(loss.sum())  # members are independent: Σ's gradient is each one's
        self.optimizer.step([self.model.flat], [grad], lr_scale=self.factors[:, step])
        return loss.detach()

    def outputs(self, x: Tensor) -> Tensor:
        return self.model(x)

    def keep(self, slots: list[int]) -> None:
        index = torch.tensor(slots, dtype=torch.long, device=self.model.device)
        self.model.keep(index)
        self.optimizer.keep(index)
        self.factors = self.factors.index_select(0, index)

    def member_model(self, slot: int) -> torch.nn.Module:
        return self.model.member_module(slot)
