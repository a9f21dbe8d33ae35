"""Train one trial: a TrialConfig on a Task, in one plain loop.

:func:`train` builds what a trial needs and hands it to :func:`run_loop`, the one loop
(readable top to bottom) that populations run too: a trial is a population of one, a
:class:`Learner` with one member. What training does and why:

- Seeds Python, NumPy and torch from ``config.seed`` before building the model, and
  shuffles with its own seeded ``torch.Generator``, so the same config and seed give the
  same numbers on the CPU.
- Batches reach the model one of two ways (``config.data``, :func:`data_path`):

  * ``tensors`` (hposvc's fast path): the task's tensors move to the device once and each
    batch is sliced out of them with a shuffled index: no DataLoader, no per-sample Python
    collation. Tasks of tensors take it, and so do dataset tasks that fit
    (:data:`AUTO_TENSOR_BYTES`; they are read into tensors once per process).
  * ``loader``: a ``torch.utils.data.DataLoader`` over the task's datasets (or its tensors,
    when forced), with a seeded sampler (the same order every run), ``num_workers``
    processes (persistent across epochs, seeded), and on CUDA pinned memory with
    non-blocking copies. Dataset tasks too big for the device take it.

  The last partial batch is kept, except a lone sample (batch norm cannot train on one).
- ``precision``: ``bf16`` / ``fp16`` run forward passes under ``torch.autocast``; fp16
  scales the loss (``torch.amp.GradScaler``) so small gradients do not underflow.
  ``channels_last`` (CUDA, models with 2-D convs) stores activations channels-last, which
  tensor cores prefer. ``compile`` wraps the model in ``torch.compile``; where compiling
  fails, the trial trains eagerly and the reason is logged and kept in ``result.notes``.
- Loss: cross-entropy (softmax head) for ``multiclass``, BCE-with-logits (one sigmoid
  output) for ``binary``, MSE for ``regression``. ``train_loss`` is the mean over the
  epoch's batches; validation loss and accuracy are computed under ``no_grad`` in eval
  mode. Accuracy is argmax for multiclass and ``sigmoid > 0.5`` for binary.
- Per-step losses stay on the device and are read once per epoch (one sync), which also
  names the first bad step when training diverges: a non-finite loss, or one above
  :data:`EXPLOSION_FACTOR` × max(first loss, 1). A diverged trial ends with status
  ``"diverged"`` and a reason, not an exception.
- After each epoch ``on_epoch(metrics)`` may return True to stop (status ``"stopped"``);
  the study layer reports to Optuna there and stops pruned trials. After each step
  ``on_batch()`` may raise to end training at once (a time limit).

>>> from hposvc.config import TrialConfig
>>> from hposvc.tasks import load_task
>>> result = train(TrialConfig(optimizer="adam", epochs=2, width=16), load_task("moons"), device="cpu")
>>> result.status, len(result.history), sorted(result.final), result.data
('completed', 2, ['test_accuracy', 'test_loss', 'val_accuracy', 'val_loss'], 'tensors')
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from hposvc.config import TrialConfig
from hposvc.devices import resolve_device
from hposvc.errors import TrainingError
from hposvc.nn import build_model, count_parameters
from hposvc.optim import build_optimizer, build_scheduler, lr_factor
from hposvc.tasks import Task

__all__ = [
    "AUTO_TENSOR_BYTES", "EXPLOSION_FACTOR", "EpochMetrics", "Learner", "Start", "TrainResult",
    "batch_plan", "data_path", "make_data", "run_loop", "seed_everything", "stopped_reason", "train",
]

log = logging.getLogger(__name__)

EXPLOSION_FACTOR = 1e4  # a loss this many times the first one (or 1, if larger) has diverged
EVAL_CHUNK = 8192  # samples per forward pass when evaluating tensors, so big splits fit the device
EVAL_LOADER_BATCH = 256  # at least this many samples per evaluation batch of a DataLoader
# data = "auto": a dataset task at most this large (as float32 tensors) is read into
# tensors and trained on the fast path; a larger one streams through a DataLoader.
AUTO_TENSOR_BYTES = 2 * 2**30
CUDA_MAX_WORKERS = 4  # num_workers = None on CUDA: this many loader processes (fewer CPUs: fewer)
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured; ``val_accuracy`` is None for regression."""

    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's batches
    val_loss: float
    val_accuracy: float | None
    lr: float  # learning rate of the epoch's last step
    elapsed: float  # seconds since train() started

    def metrics(self) -> dict[str, float | None]:
        """What an epoch reports to Optuna and MLflow."""
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "val_accuracy": self.val_accuracy, "lr": self.lr}


@dataclass(frozen=True)
class TrainResult:
    """How a trial ended, its learning curves and final metrics.

    ``final`` has ``val_loss``, ``val_accuracy``, ``test_loss`` and ``test_accuracy``
    (accuracies omitted for regression), measured with the weights training ended with.
    """

    status: str  # "completed" | "diverged" | "stopped" (on_epoch asked to stop)
    reason: str | None  # why it did not complete, e.g. "diverged: loss is nan at epoch 2 step 13"
    history: tuple[EpochMetrics, ...]
    final: dict[str, float]
    wall_time: float  # seconds, model building and final evaluation included
    device: str  # e.g. "cpu", "cuda"
    n_params: int  # trainable parameters
    # The trained model, only when train(..., keep_model=True); not part of equality/repr.
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    data: str = "tensors"  # how batches reached the model: "tensors" | "loader"
    notes: tuple[str, ...] = ()  # what was not as asked, e.g. a torch.compile that fell back to eager


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (all devices), as :func:`train` does
    before building the model.

    >>> seed_everything(3); a = torch.rand(1); seed_everything(3); bool(a == torch.rand(1))
    True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # Not torch.manual_seed: it also queues seeds for MPS/XPU/MTIA, capturing a stack trace
    # for each (~3 ms a call); hposvc trains on CPU or CUDA, and builds models on the CPU.
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def train(
    config: TrialConfig,
    task: Task,
    *,
    device: str | torch.device = "auto",
    on_epoch: Callable[[EpochMetrics], bool] | None = None,
    keep_model: bool = False,
    model: torch.nn.Module | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    on_batch: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``task``'s model family with ``config`` and return curves and final metrics.

    ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:N"`` or a
    ``torch.device``. ``on_epoch`` is called after every epoch; returning True stops
    training. ``keep_model=True`` puts the trained model in ``result.model``. ``model``: a
    model built already (seeded, as :meth:`TrialContext.build_model` does) instead of the
    built-in family (``config.family``, else the task's). ``checkpoint(state)`` is called
    every ``config.checkpoint_every`` epochs with the model, optimizer, schedule and shuffle
    state; ``resume`` (such a state) continues after its epoch. ``on_batch()`` is called
    after every optimizer step; an exception raised there (a time limit) ends training
    at once. The thread count is left as
    it is (the worker layer sets it). Running out of device memory raises
    :class:`~hposvc.errors.TrainingError`.

    >>> from hposvc.config import TrialConfig
    >>> from hposvc.tasks import load_task
    >>> r = train(TrialConfig(optimizer="sgd", lr=100.0, epochs=3), load_task("digits"), device="cpu")
    >>> r.status, r.reason.startswith("diverged: loss"), "at epoch 1 step" in r.reason
    ('diverged', True, True)
    """
    dev = resolve_device(device)
    try:
        return _train(config, task, dev, on_epoch, keep_model, model, checkpoint, resume, on_batch)
    except torch.OutOfMemoryError as e:
        raise TrainingError(f"out of memory on {dev} training {task.name} with batch size {config.batch_size}") from e


def data_path(config: TrialConfig, task: Task) -> str:
    """How batches of ``task`` reach the model under ``config``: ``"tensors"`` or ``"loader"``.

    ``config.data`` decides when it is not ``"auto"``; ``"auto"`` picks tensors for a
    tensor task and for a dataset task of at most :data:`AUTO_TENSOR_BYTES`.

    >>> from hposvc.tasks import load_task
    >>> data_path(TrialConfig(), load_task("digits")), data_path(TrialConfig(data="loader"), load_task("digits"))
    ('tensors', 'loader')
    """
    if config.data != "auto":
        return config.data
    return "tensors" if not task.streams or task.nbytes() <= AUTO_TENSOR_BYTES else "loader"


def _train(
    config: TrialConfig,
    task: Task,
    dev: torch.device,
    on_epoch: Callable[[EpochMetrics], bool] | None,
    keep_model: bool,
    model: torch.nn.Module | None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    on_batch: Callable[[], None] | None = None,
) -> TrainResult:
    t0 = time.perf_counter()
    # 1) seed, build the model and move it to the device; choose how batches get there
    seed_everything(config.seed)
    model = (model if model is not None else build_model(task, config)).to(dev)
    path = data_path(config, task)
    notes: list[str] = []
    channels_last = config.channels_last and dev.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    elif config.channels_last:
        notes.append(f"channels_last ignored: it applies to 2-D convs on CUDA, and this is {dev.type}")
    data = make_data(path, task, dev, [config], channels_last=channels_last)
    amp = _Precision(config.precision, dev)
    forward = _compiled(model, config, data, amp, notes) if config.compile else model
    for note in notes:
        log.warning("%s", note)

    # 2) optimizer and schedule over all steps
    _, n_batches = batch_plan(data.n_train, config.batch_size)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_scheduler(optimizer, config, n_batches * config.epochs)
    learner = _Single(model, forward, optimizer, scheduler, amp, task.kind)

    # 3) from a checkpoint's epoch when a retried trial left one
    start = Start()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        # a checkpoint of the last epoch re-runs that epoch: the loop must run once for its metrics
        start = Start(epoch=min(resume["epoch"] + 1, config.epochs), step=resume["step"], first_loss=resume["first_loss"])
        if resume.get("shuffle") is not None:
            data.shuffle.set_state(resume["shuffle"])
    save = None
    if checkpoint is not None and config.checkpoint_every:

        def save(epoch: int, step: int, first_loss: float) -> None:
            checkpoint({
                "epoch": epoch, "step": step, "first_loss": first_loss,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "shuffle": data.shuffle.get_state() if data.shuffle is not None else None,
            })

    # 4) the loop, shared with populations
    (result,) = run_loop(
        learner, data, [config], task.kind, device=dev, t0=t0, start=start,
        on_epoch=None if on_epoch is None else lambda i, m: on_epoch(m),
        on_batch=on_batch, checkpoint=save, keep_model=keep_model,
    )
    return replace(result, data=path, notes=tuple(notes))


# -- the loop core: one loop for one trial and for a population ---------------------


def batch_plan(n: int, batch_size: int) -> tuple[int, int]:
    """``(batch size, batches per epoch)`` for ``n`` training samples: the last partial
    batch is kept, except a lone sample (batch norm cannot train on one).

    >>> batch_plan(100, 32), batch_plan(97, 32), batch_plan(10, 64)
    ((32, 4), (32, 3), (10, 1))
    """
    batch_size = min(batch_size, n)
    n_batches = math.ceil(n / batch_size)
    if n % batch_size == 1 and n_batches > 1:
        n_batches -= 1
    return batch_size, n_batches


def stopped_reason(epoch: int) -> str:
    """The reason of a trial that ``on_epoch`` stopped (the pruner, in a study)."""
    return f"stopped: on_epoch asked to stop after epoch {epoch}"


class Learner(Protocol):
    """What :func:`run_loop` trains: ``M`` members (one trial: ``M = 1``) that step together.

    ``step`` runs one optimizer step on a batch and returns each member's loss, ``(M,)``,
    on the device; ``outputs`` is every member's output for an evaluation batch,
    ``(M, B, ...)``; ``keep`` drops the members not listed; ``member_model`` is one
    member as an ordinary module.
    """

    n_members: int
    n_params: int
    eval_chunk: int

    def train(self, mode: bool = True) -> object: ...
    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor: ...
    def outputs(self, x: torch.Tensor) -> torch.Tensor: ...
    def keep(self, slots: list[int]) -> None: ...
    def member_model(self, slot: int) -> torch.nn.Module: ...


@dataclass(frozen=True)
class Start:
    """Where :func:`run_loop` starts: epoch 1, or after a checkpoint's epoch."""

    epoch: int = 1
    step: int = 0  # optimizer steps already taken
    first_loss: float | None = None  # the first step's loss, the divergence bound's anchor


def run_loop(
    learner: Learner,
    data: "_Tensors | _Loaders",
    configs: list[TrialConfig],
    kind: str,
    *,
    device: torch.device,
    t0: float,
    start: Start = Start(),
    on_epoch: Callable[[int, EpochMetrics], bool] | None = None,
    on_batch: Callable[[], None] | None = None,
    checkpoint: Callable[[int, int, float], None] | None = None,
    keep_model: bool = False,
) -> list[TrainResult]:
    """Train ``learner``'s members (``configs[i]`` is member ``i``'s trial) to the end:
    the one loop behind :func:`train` (one member) and
    :func:`hposvc.population.train_population` (many).

    Every epoch: one optimizer step per batch (``on_batch()`` after each: the place to
    stop a trial mid-epoch, by raising), the per-step losses read once, validation, then
    for each member its :class:`EpochMetrics`, the divergence check, and ``on_epoch(i,
    metrics)`` (True stops member ``i``). A member that diverges or is stopped leaves
    with its final metrics; the others carry on. ``checkpoint(epoch, step, first_loss)``
    is called every ``checkpoint_every`` epochs (one member only).
    """
    shape = configs[0]  # what every member shares: batch size, epochs
    batch_size, n_batches = batch_plan(data.n_train, shape.batch_size)
    total_steps = n_batches * shape.epochs
    alive = list(range(len(configs)))  # population slot -> index into configs
    histories: list[list[EpochMetrics]] = [[] for _ in configs]
    results: list[TrainResult | None] = [None] * len(configs)
    first_loss = [start.first_loss] * len(configs)
    step = start.step
    for epoch in range(start.epoch, shape.epochs + 1):
        # 1) one pass over the training data; losses stay on the device
        learner.train()
        losses = []
        for x, y in data.train_batches(batch_size, n_batches):
            losses.append(learner.step(x, y, step + len(losses)))
            if on_batch is not None:
                on_batch()  # may raise: a trial's time limit stops it here
        step += n_batches
        step_losses = torch.stack(losses).T.float().tolist()  # (members, batches): one sync
        val_losses, val_accs = _evaluate(learner, kind, data.eval_batches("val", learner.eval_chunk))

        # 2) each member's metrics and verdict: diverged, stopped, or on to the next epoch
        leaving: list[tuple[int, str, str | None]] = []
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
                None if math.isfinite(metrics.val_loss) else f"diverged: validation loss is {metrics.val_loss} at epoch {epoch}"
            )
            if reason:
                leaving.append((slot, "diverged", reason))
            elif on_epoch is not None and on_epoch(i, metrics):
                leaving.append((slot, "stopped", stopped_reason(epoch)))
        if checkpoint is not None and not leaving and epoch % shape.checkpoint_every == 0:
            checkpoint(epoch, step, first_loss[0])
        if epoch == shape.epochs:
            ended = {slot for slot, _, _ in leaving}
            leaving += [(slot, "completed", None) for slot in range(len(alive)) if slot not in ended]

        # 3) members that leave: final metrics with the weights training ended with
        # (unchanged since this epoch's validation, so its numbers are the final val_*)
        if leaving:
            test_losses, test_accs = _evaluate(learner, kind, data.eval_batches("test", learner.eval_chunk))
        for slot, status, reason in leaving:
            i = alive[slot]
            final = {"val_loss": val_losses[slot], "val_accuracy": val_accs[slot], "test_loss": test_losses[slot], "test_accuracy": test_accs[slot]}
            results[i] = TrainResult(
                status=status,
                reason=reason,
                history=tuple(histories[i]),
                final={k: v for k, v in final.items() if v is not None},  # no accuracy for regression
                wall_time=time.perf_counter() - t0,
                device=str(device),
                n_params=learner.n_params,
                model=learner.member_model(slot) if keep_model else None,
            )
        staying = [slot for slot in range(len(alive)) if slot not in {s for s, _, _ in leaving}]
        if not staying:
            break
        if leaving:
            learner.keep(staying)
            data.keep(staying)
            alive = [alive[slot] for slot in staying]
    data.close()
    return [r for r in results if r is not None]


class _Single:
    """One model as a :class:`Learner` of one member: :func:`train`'s step, with its
    precision (autocast, fp16 loss scaling) and per-step schedule."""

    n_members = 1
    eval_chunk = EVAL_CHUNK

    def __init__(self, model: torch.nn.Module, forward: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, amp: "_Precision", kind: str) -> None:
        self.model, self.forward, self.optimizer, self.scheduler, self.amp, self.kind = model, forward, optimizer, scheduler, amp, kind
        self.n_params = count_parameters(model)

    def train(self, mode: bool = True) -> "_Single":
        self.forward.train(mode)  # a compiled model passes it on to the module it wraps
        return self

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        with self.amp.autocast():
            loss = _loss(self.kind, self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.backward_and_step(loss, self.optimizer)
        self.scheduler.step()
        return loss.detach().reshape(1)  # no .item(): run_loop reads all losses once per epoch

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        with self.amp.autocast():
            return self.forward(x).float().unsqueeze(0)

    def keep(self, slots: list[int]) -> None:
        pass  # one member: it leaves when training ends

    def member_model(self, slot: int) -> torch.nn.Module:
        return self.model


# -- how batches reach the model -----------------------------------------------------


def make_data(path: str, task: Task, dev: torch.device, configs: list[TrialConfig], *, channels_last: bool = False) -> "_Tensors | _Loaders":
    """The batches of ``task`` for ``configs`` (one trial, or a population's members) on
    ``dev``, by ``path`` (:func:`data_path`)."""
    if path == "tensors":
        return _Tensors(task, dev, [c.seed for c in configs], channels_last=channels_last)
    return _Loaders(task, dev, configs[0], channels_last=channels_last)


class _Tensors:
    """The fast path: every split on the device once; batches are index slices of it.

    Each member shuffles with its own generator seeded by its trial's seed (on the CPU:
    the same order on every device). Members with one seed share one order and one batch
    ``(B, ...)``; otherwise each gets its own, ``(M, B, ...)`` (:attr:`per_member`).
    """

    def __init__(self, task: Task, dev: torch.device, seeds: list[int], *, channels_last: bool = False) -> None:
        self.task, self.dev, self.channels_last = task.materialised(), dev, channels_last
        self.x_train, self.y_train = self.task.x_train.to(dev), self.task.y_train.to(dev)
        self.x_val, self.y_val = self.task.x_val.to(dev), self.task.y_val.to(dev)
        self.n_train = len(self.x_train)
        self.per_member = len(set(seeds)) > 1
        self.shuffles = [torch.Generator().manual_seed(s) for s in (seeds if self.per_member else seeds[:1])]

    @property
    def shuffle(self) -> torch.Generator:
        """The one batch order's generator (a checkpoint keeps its state)."""
        return self.shuffles[0]

    def train_batches(self, batch_size: int, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        orders = [torch.randperm(self.n_train, generator=g) for g in self.shuffles]
        order = (torch.stack(orders) if self.per_member else orders[0]).to(self.dev)
        for i in range(n_batches):
            idx = order[..., i * batch_size : (i + 1) * batch_size]
            yield _layout(self.x_train[idx], self.channels_last), self.y_train[idx]

    def eval_batches(self, split: str, chunk: int = EVAL_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if split == "val":
            x, y = self.x_val, self.y_val
        else:
            x, y = self.task.x_test.to(self.dev), self.task.y_test.to(self.dev)
        for start in range(0, len(x), chunk):
            yield _layout(x[start : start + chunk], self.channels_last), y[start : start + chunk]

    def keep(self, slots: list[int]) -> None:
        if self.per_member:  # members that leave no longer shuffle; the others keep their generators
            self.shuffles = [self.shuffles[s] for s in slots]

    def close(self) -> None:
        pass


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: seed NumPy and Python from torch's per-worker seed (which the
    loader derives from its seeded generator), so augmentations repeat run to run."""
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _Loaders:
    """The DataLoader path: seeded sampler, worker processes kept across epochs, pinned
    memory and non-blocking copies on CUDA. One batch stream: a population's members all
    see it (they share a seed, :func:`hposvc.population.group_configs`)."""

    per_member = False
    shuffle = None  # the sampler's order is not checkpointed

    def __init__(self, task: Task, dev: torch.device, config: TrialConfig, *, channels_last: bool = False) -> None:
        self.task, self.dev, self.channels_last = task, dev, channels_last
        self.y_dtype = torch.int64 if task.kind == "multiclass" else torch.float32
        workers = config.num_workers
        if workers is None:
            workers = min(CUDA_MAX_WORKERS, os.cpu_count() or 1) if dev.type == "cuda" else 0
        self.options = dict(num_workers=workers, pin_memory=dev.type == "cuda", persistent_workers=workers > 0)
        if workers > 0:
            self.options.update(worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(config.seed + 1))
        train = task.dataset("train")
        self.n_train = len(train)
        self.batch_size = min(config.batch_size, self.n_train)
        sampler = torch.utils.data.RandomSampler(train, generator=torch.Generator().manual_seed(config.seed))
        self.train = torch.utils.data.DataLoader(train, batch_size=self.batch_size, sampler=sampler, **self.options)
        self.eval_size = max(config.batch_size, EVAL_LOADER_BATCH)
        self.val = torch.utils.data.DataLoader(task.dataset("val"), batch_size=self.eval_size, **self.options)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(x).to(self.dev, dtype=torch.float32, non_blocking=True)
        y = torch.as_tensor(y).reshape(-1).to(self.dev, dtype=self.y_dtype, non_blocking=True)
        return _layout(x, self.channels_last), y

    def train_batches(self, batch_size: int, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(self.train):
            if i == n_batches:
                break  # a lone last sample
            yield self._to_device(x, y)

    def eval_batches(self, split: str, chunk: int = EVAL_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # chunk: the loader's batch size decides (eval_size)
        if split == "val":
            loader = self.val
        else:  # at the end: no persistent workers
            options = {**self.options, "persistent_workers": False}
            loader = torch.utils.data.DataLoader(self.task.dataset("test"), batch_size=self.eval_size, **options)
        for x, y in loader:
            yield self._to_device(x, y)

    def keep(self, slots: list[int]) -> None:
        pass  # one stream for every member

    def close(self) -> None:
        # Persistent workers would live until garbage collection; end them with the trial.
        for loader in (self.train, self.val):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# -- precision and compilation -------------------------------------------------------


class _Precision:
    """``fp32`` as it is; ``bf16``/``fp16`` under autocast, fp16 with a gradient scaler."""

    def __init__(self, precision: str, dev: torch.device) -> None:
        self.device_type, self.dtype = dev.type, _AUTOCAST[precision]
        self.scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()


def _compiled(model: torch.nn.Module, config: TrialConfig, data: "_Tensors | _Loaders", amp: _Precision, notes: list[str]) -> torch.nn.Module:
    """``torch.compile(model)``, tried on one batch (forward and backward; compiling happens
    at the first call) with the model's state, gradients and RNG put back after; where it
    fails, the model itself and a note saying why."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    try:
        compiled = torch.compile(model)
        x, y = next(iter(data.eval_batches("val")))
        model.train()
        with amp.autocast():
            loss = _loss(data.task.kind, compiled(x[: config.batch_size]), y[: config.batch_size])
        loss.backward()
    except Exception as e:  # noqa: BLE001 (any compiler error: train eagerly, say why)
        first_line = (str(e).strip().splitlines() or [""])[0]
        notes.append(f"torch.compile failed, trained eagerly: {type(e).__name__}: {first_line}")
        compiled = model
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    torch.random.set_rng_state(rng)
    return compiled


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the softmax for multiclass; one logit + BCE for binary; MSE for
    regression (binary and regression heads have one output, squeezed to match ``y``)."""
    if kind == "multiclass":
        return F.cross_entropy(out, y, reduction=reduction)
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction=reduction)
    return F.mse_loss(out.squeeze(-1), y, reduction=reduction)


@torch.no_grad()
def _evaluate(learner: Learner, kind: str, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[float], list[float | None]]:
    """Each member's mean loss and accuracy (None for regression) in eval mode over
    ``batches``, with one device sync."""
    learner.train(False)
    loss_sum, correct, count = None, None, 0
    for x, target in batches:
        out = learner.outputs(x)  # (M, B, outputs)
        m = out.shape[0]
        expanded = target.expand(m, *target.shape)
        loss = _loss(kind, out.flatten(0, 1), expanded.flatten(0, 1), reduction="none").view(m, -1).sum(dim=1)
        if kind == "multiclass":
            hits = (out.argmax(dim=-1) == expanded).view(m, -1).sum(dim=1)
        elif kind == "binary":
            hits = ((out.squeeze(-1) > 0) == (expanded > 0.5)).view(m, -1).sum(dim=1)  # logit > 0 ⇔ sigmoid > 0.5
        else:
            hits = torch.zeros(m, device=x.device)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct = hits if correct is None else correct + hits
        count += len(target)
    totals, n_correct = torch.stack([loss_sum.float(), correct.float()]).tolist()  # one sync
    return [t / count for t in totals], [None if kind == "regression" else c / count for c in n_correct]


def _divergence(step_losses: list[float], first_loss: float, epoch: int) -> str | None:
    """A reason naming the first bad step of this epoch, or None if training is sane."""
    bound = EXPLOSION_FACTOR * max(first_loss, 1.0) if math.isfinite(first_loss) else 0.0
    for i, value in enumerate(step_losses, start=1):
        if not math.isfinite(value):
            return f"diverged: loss is {value} at epoch {epoch} step {i}"
        if value > bound:
            limit = f"{bound:.3g} ({EXPLOSION_FACTOR:g} × max(first loss, 1))"
            return f"diverged: loss {value:.3g} exceeds {limit} at epoch {epoch} step {i}"
    return None
