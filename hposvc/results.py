"""Reading results straight from the study database, as pandas and TrialConfigs.

>>> import hposvc
>>> best = hposvc.best_config("digits-quick")        # doctest: +SKIP
>>> best.config.optimizer, best.value                # doctest: +SKIP
('adam', 0.975)
>>> df = hposvc.trials("digits-quick")               # doctest: +SKIP
>>> df.groupby("optimizer")["value"].max()           # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from hposvc import queue, records
from hposvc.config import TrialConfig
from hposvc.errors import InvalidInputError
from hposvc.records import best_trial
from hposvc.storage import load_study

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    import torch

    from hposvc.tasks import Task

__all__ = ["Best", "Trainable", "best_config", "best_trial", "build_training", "studies", "top_k", "trials"]

# Columns of the trials table, in order; config fields follow.
TRIAL_COLUMNS = ("number", "state", "value", "duration_s", "reason", "device", "worker")


@dataclass(frozen=True)
class Best:
    """The best trial of a study: its config, value and where to find it."""

    study: str
    metric: str
    value: float
    trial_number: int
    config: TrialConfig
    mlflow_run_id: str | None  # the trial's MLflow run, when it was tracked online

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "metric": self.metric,
            "value": self.value,
            "trial_number": self.trial_number,
            "mlflow_run_id": self.mlflow_run_id,
            "config": self.config.to_dict(),
        }


def best_config(name: str, *, storage: str | None = None) -> Best:
    """The best configuration found by study ``name`` (a :class:`Best`)."""
    study = load_study(name, storage=storage)
    t = best_trial(study)
    if t is None:
        raise InvalidInputError(f"study {name!r} has no completed trial yet; run it first (`hposvc study run SPEC`).")
    config = records.trial_config(t)
    if config is None:
        raise InvalidInputError(f"study {name!r} was not written by hposvc (its trials have no {records.CONFIG}); read it with Optuna.")
    return Best(
        study=name,
        metric=records.study_info(study).metric or "value",
        value=float(t.value),
        trial_number=t.number,
        config=config,
        mlflow_run_id=t.user_attrs.get(records.RUN_ID),
    )


def trials(name: str, *, storage: str | None = None, states: tuple[str, ...] | None = None) -> "pd.DataFrame":
    """One row per trial of study ``name``: number, state, value, duration, reason, device,
    worker, then every TrialConfig field as its own column (``optimizer``, ``lr``, ...),
    then the user's own dimensions (``[space.params]``, e.g. ``dropout``)."""
    import pandas as pd

    study = load_study(name, storage=storage)
    rows = []
    user_columns: list[str] = []  # [space.params] names, after hposvc's own fields
    for t in study.get_trials(deepcopy=False):
        if states is not None and t.state.name not in states:
            continue
        duration = t.duration.total_seconds() if t.duration is not None else None
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "duration_s": duration,
            "reason": t.user_attrs.get(records.REASON),
            "device": t.user_attrs.get(records.DEVICE),
            "worker": t.user_attrs.get(records.WORKER),
        }
        config = t.user_attrs.get(records.CONFIG) or {}
        row.update({k: v for k, v in config.items() if k not in ("extra", "params")})
        own = config.get("params") or {}
        row.update(own)
        for name in own:
            if name not in user_columns:
                user_columns.append(name)
        rows.append(row)
    columns = list(TRIAL_COLUMNS) + [f for f in TrialConfig.__dataclass_fields__ if f not in ("extra", "params")] + user_columns
    return pd.DataFrame(rows, columns=columns)


def top_k(name: str, k: int = 5, *, storage: str | None = None) -> "pd.DataFrame":
    """The ``k`` best COMPLETE trials of study ``name``, best first."""
    study = load_study(name, storage=storage)
    df = trials(name, storage=storage, states=("COMPLETE",))
    ascending = study.direction.name == "MINIMIZE"
    return df.sort_values("value", ascending=ascending).head(k).reset_index(drop=True)


def studies(*, storage: str | None = None) -> "pd.DataFrame":
    """One row per study: name, task, metric, direction, target and state counts, best
    value, when it was created and by which hposvc version (all versions: ``hposvc.versions``
    on the study, see :mod:`hposvc.records`)."""
    import optuna
    import pandas as pd

    from hposvc.storage import open_storage, resolve_storage_url

    rdb = open_storage(resolve_storage_url(storage))
    rows = []
    for s in optuna.get_all_study_summaries(rdb, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=rdb)
        info, counts = records.study_info(study), queue.counts(study)
        best = best_trial(study)
        rows.append(
            {
                "name": s.study_name,
                "task": info.task,
                "metric": info.metric,
                "direction": "/".join(d.name.lower() for d in s.directions),
                "n_trials": info.n_trials,
                "complete": counts["COMPLETE"],
                "pruned": counts["PRUNED"],
                "failed": counts["FAIL"],
                "running": counts["RUNNING"],
                "waiting": counts["WAITING"],
                "best_value": None if best is None else best.value,
                "created": s.datetime_start,
                "hposvc_version": info.versions.get("hposvc"),
            }
        )
    columns = ["name", "task", "metric", "direction", "n_trials", "complete", "pruned", "failed", "running", "waiting", "best_value", "created", "hposvc_version"]
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class Trainable:
    """A model, optimizer and scheduler built from a TrialConfig, ready to train."""

    task: "Task"
    model: "torch.nn.Module"
    optimizer: "torch.optim.Optimizer"
    scheduler: Any  # torch LR scheduler stepping once per batch
    device: "torch.device"


def build_training(
    config: TrialConfig,
    task: "str | Task",
    *,
    seed: int = 0,
    task_options: dict[str, Any] | None = None,
    device: str = "auto",
    model: "str | Callable[..., torch.nn.Module] | None" = None,
    apply: "Iterable[str]" = (),
    code_dir: str | None = None,
    norm_classes: "Iterable[str | type[torch.nn.Module]]" = (),
) -> Trainable:
    """Turn a TrialConfig into a model + optimizer for a task, to train it yourself.

    The model is the built-in family (``config.family``, else the task's), or your factory
    ``model`` (``"module:function"`` or the function, called as ``model(task, config)``)
    with ``config``'s values of the dimensions in ``apply`` put in, as the study's trials
    built it: pass the ones your spec set, e.g. ``apply=("norm", "activation", "init")``,
    and its ``[model] norm_classes`` (``"module:Class"`` or the classes) as ``norm_classes``.

    >>> best = hposvc.best_config("digits-quick")                      # doctest: +SKIP
    >>> t = hposvc.build_training(best.config, "digits")               # doctest: +SKIP
    >>> loss = t.model(t.task.x_train[:8].to(t.device)).sum()           # doctest: +SKIP
    >>> t = hposvc.build_training(best.config, "digits", model="mymodels:small_cnn", apply=["norm"])  # doctest: +SKIP
    """
    import math

    from hposvc.devices import resolve_device
    from hposvc.nn import build_model
    from hposvc.optim import build_optimizer, build_scheduler
    from hposvc.plugins import build_user_model, load_callable
    from hposvc.tasks import Task, load_task
    from hposvc.train import seed_everything

    loaded = task if isinstance(task, Task) else load_task(task, seed=seed, options=task_options)
    dev = resolve_device(device)
    seed_everything(config.seed)  # as a trial does before building its model
    if model is None:
        net = build_model(loaded, config)
    else:
        factory = load_callable(model, key="model", code_dir=code_dir) if isinstance(model, str) else model
        classes = [load_callable(c, key="norm_classes", code_dir=code_dir) if isinstance(c, str) else c for c in norm_classes]
        net, _ = build_user_model(
            factory, loaded, config, apply=tuple(apply), name=model if isinstance(model, str) else None, norm_classes=classes
        )
    net = net.to(dev)
    optimizer = build_optimizer(net.parameters(), config)
    steps = config.epochs * math.ceil(len(loaded.x_train) / config.batch_size)
    return Trainable(loaded, net, optimizer, build_scheduler(optimizer, config, steps), dev)
