"""TrialContext: what a training function gets for one trial, hposvc's own loop included.

A spec's ``trainer = "module:function"`` is called as ``train(ctx)`` for each trial::

    def train(ctx):                                    # ctx: hposvc.TrialContext
        model = ctx.build_model()                       # the trial's model, norm/activation/init applied
        dropout = ctx.params["dropout"]                 # your own dimensions ([space.params])
        opt = ctx.build_optimizer(model.parameters())   # the trial's optimizer and numbers
        state = ctx.restore()                           # last checkpoint of a retried trial, or None
        start = state["epoch"] + 1 if state else 1
        if state:
            model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
        for epoch in range(start, ctx.config.epochs + 1):
            ...                                         # your own loop
            ctx.report(epoch, val_accuracy=acc, val_loss=loss)   # raises hposvc.TrialPruned when pruned
            ctx.checkpoint({"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict()})
        return {"val_accuracy": acc}                    # final metrics; the study's metric among them

:meth:`TrialContext.report` is the one way an epoch reaches Optuna (for the pruner) and
MLflow (with the epoch as step); hposvc's built-in trainer (:func:`hposvc.trial.train_trial`)
reports through it too. Checkpoints are written atomically to the trial's folder, which a
retry of the trial (after its worker died) shares, so the retry resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hposvc.config import TrialConfig
from hposvc.errors import InvalidInputError, TrialPruned, TrialTimedOut

if TYPE_CHECKING:
    import torch

    from hposvc.tasks import Task

__all__ = ["CHECKPOINT_FILE", "TrialContext"]

CHECKPOINT_FILE = "checkpoint.pt"  # in the trial's folder; the last one is kept


@dataclass(eq=False)
class TrialContext:
    """One trial, as a training function sees it.

    >>> ctx = TrialContext(TrialConfig(optimizer="adam", epochs=2), on_report=lambda e, m: False)
    >>> ctx.report(1, val_accuracy=0.5)
    >>> ctx.history
    [(1, {'val_accuracy': 0.5})]
    """

    config: TrialConfig  # the trial's choices; ctx.config.epochs, ctx.config.lr, ...
    on_report: Callable[[int, Mapping[str, float]], bool] = field(repr=False)  # the trial layer: True = prune
    task: "Task | None" = None  # the spec's task, loaded, when it names one
    device: "torch.device | str" = "cpu"  # the slot's device (CUDA_VISIBLE_DEVICES pinning applies)
    trial_number: int = 0
    study_name: str = ""
    metric: str = "val_accuracy"  # the study's metric: required in every report and in the result
    trial_dir: Path | None = None  # this trial's folder (checkpoints); kept across a retry
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("hposvc.trial"), repr=False)
    model_factory: "Callable[[], torch.nn.Module] | None" = field(default=None, repr=False)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list, repr=False)
    model: "torch.nn.Module | None" = field(default=None, repr=False)  # the last model build_model gave
    timeout: float | None = None  # [train] timeout in seconds; None: no limit
    deadline: float | None = field(default=None, repr=False)  # time.monotonic() at which the limit passes

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def params(self) -> dict[str, Any]:
        """The trial's values of the spec's own dimensions (``[space.params]``), e.g.
        ``{"dropout": 0.2, "tied": True}``; empty when the spec has none."""
        return dict(self.config.params)

    # -- reporting ------------------------------------------------------------------------

    def check_time(self) -> None:
        """Raise :class:`hposvc.errors.TrialTimedOut` once the trial's time limit has
        passed. Every report checks it, and hposvc's own loop after every batch; a
        trainer may call it in a long stretch without reports."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TrialTimedOut(f"timed out after {self.timeout:g} s")

    def should_stop(self, epoch: int, **metrics: float) -> bool:
        """Report an epoch and return whether the pruner says stop (no exception)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise InvalidInputError(f"ctx.report: the 'epoch' parameter must be an integer >= 1. Got {epoch!r} instead.")
        if self.metric not in metrics or metrics[self.metric] is None:
            raise InvalidInputError(
                f"ctx.report: the study's metric {self.metric!r} must be reported every epoch. Got {sorted(metrics)} at epoch {epoch}."
            )
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            if value is None:
                continue  # e.g. accuracy of a regression task
            try:
                number = float(value)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"ctx.report: the {key!r} parameter must be a number. Got {value!r} at epoch {epoch}.") from e
            clean[key] = number
        if not math.isfinite(clean[self.metric]):
            raise InvalidInputError(f"ctx.report: {self.metric} is {clean[self.metric]} at epoch {epoch} (diverged).")
        self.history.append((epoch, clean))
        stop = bool(self.on_report(epoch, clean))
        self.check_time()  # the epoch is recorded, then a trial past its limit ends here
        return stop

    def report(self, epoch: int, **metrics: float) -> None:
        """Report one epoch's metrics; raises :class:`hposvc.TrialPruned` when the pruner
        stops the trial. The study's metric is required, every value a finite number."""
        if self.should_stop(epoch, **metrics):
            raise TrialPruned(f"pruned at epoch {epoch}")

    # -- building -------------------------------------------------------------------------

    def build_model(self) -> "torch.nn.Module":
        """The trial's model on its device, seeded: the spec's model factory or the task's
        built-in family, with the trial's norm, activation and init applied."""
        from hposvc.train import seed_everything

        seed_everything(self.config.seed)
        if self.model_factory is not None:
            model = self.model_factory()
        else:
            from hposvc.nn import build_model

            if self.task is None:
                raise InvalidInputError("ctx.build_model() needs a task: name one in [study] task, or a [study] model factory.")
            model = build_model(self.task, self.config)
        self.model = model.to(self.device)
        return self.model

    def build_optimizer(self, params: "Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]") -> "torch.optim.Optimizer":
        """The trial's optimizer with its numbers (lr, momentum, betas, ...)."""
        from hposvc.optim import build_optimizer

        return build_optimizer(params, self.config)

    def build_scheduler(self, optimizer: "torch.optim.Optimizer", total_steps: int) -> Any:
        """The trial's learning-rate schedule over ``total_steps`` (step it once per batch)."""
        from hposvc.optim import build_scheduler

        return build_scheduler(optimizer, self.config, total_steps)

    # -- checkpoints ----------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.trial_dir is None else self.trial_dir / CHECKPOINT_FILE

    def checkpoint(self, state: Any) -> None:
        """Save ``state`` (``torch.save``) as the trial's last checkpoint, atomically: a
        worker killed while writing leaves the previous checkpoint whole."""
        import torch

        path = self.checkpoint_path
        if path is None:
            raise InvalidInputError("ctx.checkpoint: this trial has no folder to write to (run it through hposvc).")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def restore(self) -> Any:
        """The last checkpoint of this trial (from an earlier attempt killed with its
        worker), or None. Loaded with ``weights_only=True`` (tensors, numbers, dicts,
        lists); a checkpoint holding other Python objects is loaded in full, with a warning."""
        import pickle

        import torch

        path = self.checkpoint_path
        if path is None or not path.is_file():
            return None
        try:
            return torch.load(path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError:
            self.logger.warning("checkpoint %s holds objects weights_only cannot load; loading it in full (it is this trial's own file)", path)
            return torch.load(path, map_location=self.device, weights_only=False)
