"""Train one trial: a TrialConfig on a Task, in one plain loop.

The whole loop is :func:`train`, readable top to bottom. What it does and why:

- Seeds Python, NumPy and torch from ``config.seed`` before building the model, and
  shuffles with its own seeded ``torch.Generator``, so the same config and seed give the
  same numbers on the CPU.
- Moves the task's tensors and the model to the device once, then slices each batch out
  of the device-resident tensors with a shuffled index: no DataLoader, no per-sample
  Python collation. The last partial batch is kept, except a lone sample (batch norm
  cannot train on one).
- Loss: cross-entropy (softmax head) for ``multiclass``, BCE-with-logits (one sigmoid
  output) for ``binary``, MSE for ``regression``. ``train_loss`` is the mean over the
  epoch's batches; validation loss and accuracy are computed under ``no_grad`` in eval
  mode. Accuracy is argmax for multiclass and ``sigmoid > 0.5`` for binary.
- Per-step losses stay on the device and are read once per epoch (one sync), which also
  names the first bad step when training diverges: a non-finite loss, or one above
  :data:`EXPLOSION_FACTOR` × max(first loss, 1). A diverged trial ends with status
  ``"diverged"`` and a reason, not an exception.
- After each epoch ``on_epoch(metrics)`` may return True to stop (status ``"stopped"``);
  the study layer reports to Optuna there and stops pruned trials.

>>> from hposvc.config import TrialConfig
>>> from hposvc.tasks import load_task
>>> result = train(TrialConfig(optimizer="adam", epochs=2, width=16), load_task("moons"), device="cpu")
>>> result.status, len(result.history), sorted(result.final)
('completed', 2, ['test_accuracy', 'test_loss', 'val_accuracy', 'val_loss'])
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hposvc.config import TrialConfig
from hposvc.devices import resolve_device
from hposvc.errors import TrainingError
from hposvc.nn import build_model, count_parameters
from hposvc.optim import build_optimizer, build_scheduler, lr_factor
from hposvc.tasks import Task

__all__ = ["EXPLOSION_FACTOR", "EpochMetrics", "TrainResult", "seed_everything", "train"]

EXPLOSION_FACTOR = 1e4  # a loss this many times the first one (or 1, if larger) has diverged
EVAL_CHUNK = 8192  # samples per forward pass when evaluating, so big splits fit the device


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
) -> TrainResult:
    """Train ``task``'s model family with ``config`` and return curves and final metrics.

    ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:N"`` or a
    ``torch.device``. ``on_epoch`` is called after every epoch; returning True stops
    training. ``keep_model=True`` puts the trained model in ``result.model``. ``model``: a
    model built already (seeded, as :meth:`TrialContext.build_model` does) instead of the
    task's built-in family. The thread
    count is left as it is (the worker layer sets it). Running out of device memory
    raises :class:`~hposvc.errors.TrainingError`.

    >>> from hposvc.config import TrialConfig
    >>> from hposvc.tasks import load_task
    >>> r = train(TrialConfig(optimizer="sgd", lr=100.0, epochs=3), load_task("digits"), device="cpu")
    >>> r.status, r.reason.startswith("diverged: loss"), "at epoch 1 step" in r.reason
    ('diverged', True, True)
    """
    dev = resolve_device(device)
    try:
        return _train(config, task, dev, on_epoch, keep_model, model)
    except torch.OutOfMemoryError as e:
        raise TrainingError(f"out of memory on {dev} training {task.name} with batch size {config.batch_size}") from e


def _train(
    config: TrialConfig,
    task: Task,
    dev: torch.device,
    on_epoch: Callable[[EpochMetrics], bool] | None,
    keep_model: bool,
    model: torch.nn.Module | None,
) -> TrainResult:
    t0 = time.perf_counter()
    # 1) seed, build the model, move it and the data to the device once
    seed_everything(config.seed)
    model = (model if model is not None else build_model(task, config)).to(dev)
    x_train, y_train = task.x_train.to(dev), task.y_train.to(dev)
    x_val, y_val = task.x_val.to(dev), task.y_val.to(dev)
    shuffle = torch.Generator().manual_seed(config.seed)  # CPU: same order on every device

    # 2) optimizer and schedule over all steps
    n = len(x_train)
    batch_size = min(config.batch_size, n)
    n_batches = math.ceil(n / batch_size)
    if n % batch_size == 1 and n_batches > 1:
        n_batches -= 1  # drop a lone last sample: batch norm cannot train on one
    total_steps = n_batches * config.epochs
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_scheduler(optimizer, config, total_steps)

    # 3) the loop
    history: list[EpochMetrics] = []
    status, reason, first_loss = "completed", None, None
    step = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=shuffle).to(dev)
        losses = []
        for i in range(n_batches):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = _loss(task.kind, model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())  # no .item(): one device sync per epoch, below
        step += n_batches
        step_losses = torch.stack(losses).tolist()
        first_loss = step_losses[0] if first_loss is None else first_loss
        val_loss, val_acc = _evaluate(model, task.kind, x_val, y_val)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=sum(step_losses) / n_batches,
            val_loss=val_loss,
            val_accuracy=val_acc,
            lr=config.lr * lr_factor(config, step - 1, total_steps),
            elapsed=time.perf_counter() - t0,
        )
        history.append(metrics)
        reason = _divergence(step_losses, first_loss, epoch) or (
            None if math.isfinite(val_loss) else f"diverged: validation loss is {val_loss} at epoch {epoch}"
        )
        if reason:
            status = "diverged"
            break
        if on_epoch is not None and on_epoch(metrics):
            status, reason = "stopped", f"stopped: on_epoch asked to stop after epoch {epoch}"
            break

    # 4) final metrics with the weights training ended with (validation: the last epoch's)
    test_loss, test_acc = _evaluate(model, task.kind, task.x_test.to(dev), task.y_test.to(dev))
    final = {"val_loss": metrics.val_loss, "test_loss": test_loss}
    if task.kind != "regression":
        final.update(val_accuracy=metrics.val_accuracy, test_accuracy=test_acc)
    return TrainResult(
        status=status,
        reason=reason,
        history=tuple(history),
        final=final,
        wall_time=time.perf_counter() - t0,
        device=str(dev),
        n_params=count_parameters(model),
        model=model if keep_model else None,
    )


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the softmax for multiclass; one logit + BCE for binary; MSE for
    regression (binary and regression heads have one output, squeezed to match ``y``)."""
    if kind == "multiclass":
        return F.cross_entropy(out, y, reduction=reduction)
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction=reduction)
    return F.mse_loss(out.squeeze(-1), y, reduction=reduction)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for regression) of ``model`` in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for start in range(0, len(x), EVAL_CHUNK):
        out, target = model(x[start : start + EVAL_CHUNK]), y[start : start + EVAL_CHUNK]
        loss_sum += _loss(kind, out, target, reduction="sum")
        if kind == "multiclass":
            correct += (out.argmax(dim=-1) == target).sum()
        elif kind == "binary":
            correct += ((out.squeeze(-1) > 0) == (target > 0.5)).sum()  # logit > 0 ⇔ sigmoid > 0.5
    loss, n_correct = torch.stack([loss_sum, correct]).tolist()  # one sync
    return loss / len(x), (None if kind == "regression" else n_correct / len(x))


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
