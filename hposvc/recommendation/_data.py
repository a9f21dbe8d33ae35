"""Reading finished trials out of Optuna storage into one flat DataFrame.

Only Optuna's public storage API is used, and only the attributes the study service
promises to write (see the storage attribute contract): study attrs ``hposvc.task`` and
``hposvc.metric``, the study direction, and trial attrs ``hposvc.config`` and
``hposvc.reason``; plus the survey's own study attrs (:data:`SURVEY_TASK`,
:data:`SURVEY_HELD_OUT`, :data:`SURVEY_SCALE`), which :mod:`hposvc.recommendation._survey` writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from hposvc.config import TrialConfig
from hposvc.errors import HposvcError, StorageError, invalid
from hposvc import records
from hposvc import storage as _storage
from hposvc.queue import storage_of
from hposvc.storage import redact, resolve_data_dir, resolve_storage_url

__all__ = [
    "CONFIG_FIELDS",
    "MODEL_KINDS",
    "SURVEY_HELD_OUT",
    "SURVEY_KIND",
    "SURVEY_SCALE",
    "SURVEY_TASK",
    "collect_trials",
    "model_kind",
    "open_storage",
]

CONFIG_FIELDS: tuple[str, ...] = tuple(TrialConfig.__dataclass_fields__)
# Columns every frame from collect_trials has, before the TrialConfig fields. ``curve``:
# the study's metric per reported epoch (what performance profiles need), None without.
BASE_COLUMNS = ("study", "task", "number", "state", "value", "metric", "direction", "score", "cost", "reason", "curve")
# Study attrs the survey sets beside hposvc's own: the protocol's task name, and True on
# the held-out tasks' studies, which only test the recommendation and never enter it.
SURVEY_TASK = "hposvc.survey.task"
SURVEY_HELD_OUT = "hposvc.survey.held_out"
SURVEY_SCALE = "hposvc.survey.scale"  # "ci" | "full": which survey run a study belongs to
SURVEY_KIND = "hposvc.survey.kind"  # the task's kind of model (MODEL_KINDS), which --kind selects by
# Kinds of model a decision can be made for, by built-in family (an MLP without hidden
# layers is a linear model): see model_kind.
MODEL_KINDS = ("mlp", "linear", "cnn", "resnet", "transformer")
# The family a built-in task trains when its spec names none (hposvc.spec's TASK_FAMILY).
_BUILTIN_FAMILY = {"digits": "mlp", "moons": "mlp", "spirals": "mlp", "tabular": "mlp", "mnist1d": "cnn1d", "images": "cnn2d"}
_KIND_OF_FAMILY = {"mlp": "mlp", "cnn1d": "cnn", "cnn2d": "cnn", "resnet": "resnet", "transformer": "transformer"}


def model_kind(family: str | None, depth: int | None) -> str | None:
    """The kind of model a built-in ``family`` with ``depth`` is (None: not a built-in).

    >>> model_kind("mlp", 0), model_kind("cnn2d", 2), model_kind("transformer", 2), model_kind(None, 2)
    ('linear', 'cnn', 'transformer', None)
    """
    kind = _KIND_OF_FAMILY.get(family or "")
    return "linear" if kind == "mlp" and depth == 0 else kind


# Whatever names a study storage: a URL (None: the configured default), a storage, a study.
StorageLike = str | optuna.storages.BaseStorage | optuna.Study | None


def open_storage(storage: StorageLike, *, data_dir: str | os.PathLike[str] | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL (None: the configured default), a study, or ``storage`` itself.

    URLs are opened with :func:`hposvc.storage.open_storage`: the same storage object and
    connection settings as the study service (SQLite in WAL mode with a busy timeout, so
    reading while workers write does not fail with "database is locked"; pooled,
    pre-pinged PostgreSQL). The object is cached per URL and process, so the callers here
    never dispose its engine.

    >>> open_storage("sqlite:///hposvc-data/hposvc.db").get_all_studies()  # doctest: +SKIP
    """
    if isinstance(storage, optuna.Study):
        return storage_of(storage)
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if storage is not None and (not isinstance(storage, str) or not storage):
        raise invalid("storage", storage, "an SQLAlchemy URL, an optuna storage object or an optuna study")
    url = resolve_storage_url(storage, data_dir=data_dir)
    try:
        return _storage.open_storage(url)
    except HposvcError:
        raise
    except Exception as e:  # driver errors before with_retries (e.g. not an SQLite file), schema mismatch
        raise StorageError(f"cannot open the study storage {redact(url)!r}: {e}") from e


def _as_list(name: str, value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not items or not all(isinstance(v, str) and v for v in items):
        raise invalid(name, value, "a non-empty list of names")
    return items


def _score_cost(value: float, direction: str) -> tuple[float, float]:
    """(higher-is-better score, positive cost) for a metric value.

    Maximised metrics are accuracy-like, in [0, 1]: score = value, cost = 1 − value.
    Minimised metrics are loss-like: score = −value, cost = value.
    """
    if direction == "maximize":
        return value, 1.0 - value
    return -value, value


def _pruned_value(trial: optuna.trial.FrozenTrial) -> float:
    # The last reported epoch is the measured state of the model when it was stopped.
    # A trial pruned (or diverged) before its first report has no value: NaN, which
    # recommend_from_frame scores as the worst value seen on the task.
    if not trial.intermediate_values:
        return math.nan
    value = trial.intermediate_values[max(trial.intermediate_values)]
    return float(value) if value is not None else math.nan


def _config_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    config = trial.user_attrs.get(records.CONFIG)
    if isinstance(config, str):  # tolerate a JSON string as well as a dict
        try:
            config = json.loads(config)
        except ValueError:
            config = None
    if isinstance(config, dict) and config.get("optimizer"):
        return config
    # Not written by hposvc: fall back to Optuna params named like TrialConfig fields.
    params = {k: v for k, v in trial.params.items() if k in CONFIG_FIELDS}
    return params if params.get("optimizer") else None


def collect_trials(
    storage: StorageLike = None,
    *,
    studies: str | Sequence[str] | None = None,
    tasks: str | Sequence[str] | None = None,
    held_out: bool = False,
) -> pd.DataFrame:
    """One row per finished trial of the selected studies (all studies when both are None).

    Columns: study, task, number, state ("COMPLETE" | "PRUNED"), value, metric, direction,
    score (higher is better), cost (1 − accuracy, or the loss), reason, curve (the metric
    per reported epoch, a list), every TrialConfig field (optimizer, lr, …, norm,
    activation, …; ``extra`` as JSON text) and ``kind``: the kind of model (the survey's
    study attr, else :func:`model_kind` of the trial's family and depth; None for a
    model hposvc did not build).

    Studies of the survey's held-out tasks are left out unless ``held_out`` is True or
    they are named in ``studies``: they exist to test a recommendation, not to make one.

    Which value a trial gets:

    - COMPLETE: its final value.
    - PRUNED: its last reported intermediate value (the metric at the last epoch it ran).
      Dropping pruned trials would keep only the configurations that looked good early,
      which flatters the optimizers that were pruned most; and a user who tunes with the
      same pruner gets exactly these truncated trials for their budget. The bias is the
      other way and smaller: a pruned trial might have improved had it run on, so slow
      starters are judged slightly pessimistically. A trial pruned before its first report
      (e.g. diverged in epoch 1) has value NaN and is scored as the task's worst value.
    - FAIL (and RUNNING/WAITING) trials are left out: a crash says nothing about how well
      an optimizer trains.

    A study's task is its ``hposvc.task`` attr (the study name when absent) and its metric
    ``hposvc.metric`` (``"value"`` when absent). Trials without an optimizer (no
    ``hposvc.config`` and no ``optimizer`` param) are skipped; their count is in
    ``df.attrs["skipped"]``.

    >>> df = collect_trials("sqlite:///hposvc-data/hposvc.db", tasks=["digits"])  # doctest: +SKIP
    >>> df.groupby("optimizer").score.max()  # doctest: +SKIP
    """
    study_names = _as_list("studies", studies)
    task_names = _as_list("tasks", tasks)
    return _collect(open_storage(storage), study_names, task_names, held_out=held_out)


def _collect(
    store: optuna.storages.BaseStorage, study_names: list[str] | None, task_names: list[str] | None, *, held_out: bool = False
) -> pd.DataFrame:
    try:
        frozen = store.get_all_studies()
    except Exception as e:
        raise StorageError(f"cannot list the studies in the storage: {e}") from e
    by_name = {s.study_name: s for s in frozen}
    if study_names is not None:
        for name in study_names:
            if name not in by_name:
                known = sorted(by_name)
                raise invalid(
                    "studies",
                    name,
                    known[:20] if known else "the name of an existing study (there are none)",
                    hint="List them with `hposvc study list`.",
                )
        selected = [by_name[n] for n in dict.fromkeys(study_names)]
    else:
        selected = [s for s in frozen if held_out or not s.user_attrs.get(SURVEY_HELD_OUT)]
    if task_names is not None:
        known_tasks = sorted({str(s.user_attrs.get(records.TASK, s.study_name)) for s in selected})
        for name in task_names:
            if name not in known_tasks:
                raise invalid(
                    "tasks",
                    name,
                    known_tasks[:20] if known_tasks else "a task of an existing study (there are none)",
                )
        selected = [s for s in selected if str(s.user_attrs.get(records.TASK, s.study_name)) in task_names]

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    rows: list[dict[str, Any]] = []
    skipped = 0
    for fs in selected:
        if len(fs.directions) != 1:
            continue  # multi-objective studies have no single score to rank by
        direction = "maximize" if fs.directions[0] == optuna.study.StudyDirection.MAXIMIZE else "minimize"
        task = str(fs.user_attrs.get(records.TASK, fs.study_name))
        metric = str(fs.user_attrs.get(records.METRIC, "value"))
        study_kind = fs.user_attrs.get(SURVEY_KIND)
        try:
            study = optuna.load_study(study_name=fs.study_name, storage=store)
            trials = study.get_trials(deepcopy=False, states=states)
        except Exception as e:
            raise StorageError(f"cannot read the trials of study {fs.study_name!r}: {e}") from e
        for t in trials:
            config = _config_of(t)
            if config is None:
                skipped += 1
                continue
            complete = t.state == optuna.trial.TrialState.COMPLETE
            value = float(t.value) if complete and t.value is not None else _pruned_value(t)
            score, cost = _score_cost(value, direction)
            row = {
                "study": fs.study_name,
                "task": task,
                "number": t.number,
                "state": t.state.name,
                "value": value,
                "metric": metric,
                "direction": direction,
                "score": score,
                "cost": cost,
                "reason": t.user_attrs.get(records.REASON),
                "curve": [float(v) for _, v in sorted(t.intermediate_values.items())] or None,
            }
            for name in CONFIG_FIELDS:
                row[name] = config.get(name)
            row["kind"] = study_kind or model_kind(config.get("family") or _BUILTIN_FAMILY.get(task.split("[", 1)[0]), config.get("depth"))
            if row["extra"] is not None:
                row["extra"] = json.dumps(row["extra"], sort_keys=True, default=str)
            rows.append(row)
    df = pd.DataFrame(rows, columns=[*BASE_COLUMNS, *CONFIG_FIELDS, "kind"])
    for col in ("value", "score", "cost", "lr", "momentum", "beta1", "beta2", "eps", "rho", "weight_decay", "warmup", "init_std"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["number"] = df["number"].astype(np.int64)
    df.attrs["skipped"] = skipped
    df.attrs["studies"] = [fs.study_name for fs in selected]
    return df
