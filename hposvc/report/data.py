"""A study's stored trials as one frame the claims and figures read.

Everything comes from the study database: :func:`hposvc.trials` gives one row per trial
(state, value, every TrialConfig field); the Optuna trials add the per-epoch metric
(``curve``) and the probes the study service records (``activation_std`` at init,
``unit_symmetry`` after training, see :mod:`hposvc.probes`). ``score`` is the number a
claim compares: the trial's value when it completed; for a trial that diverged, the
chance accuracy of the task (a network with NaN weights predicts nothing; leaving such
trials out would hide exactly the failures a claim about learning rates or inits is
about); nan otherwise (pruned by a pruner, failed, still running).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from hposvc.errors import HposvcError
from hposvc.probes import ACTIVATION_STD_ATTR, UNIT_SYMMETRY_ATTR

log = logging.getLogger(__name__)

__all__ = ["StudyData", "chance_accuracy", "frame_from_trials", "load_study_data"]


@dataclass(frozen=True, eq=False)
class StudyData:
    """One study as the report reads it."""

    name: str
    metric: str  # "val_accuracy" | "val_loss"
    direction: str  # "maximize" | "minimize"
    task: str  # workload name, e.g. "digits"
    task_key: str  # workload plus fixed settings, e.g. "digits[depth=2,width=64,epochs=5]"
    chance: float | None  # accuracy of always predicting the commonest class (None: regression)
    trials: pd.DataFrame  # hposvc.trials columns + curve, activation_std, unit_symmetry, score
    spec: dict[str, Any]  # the spec the study was created from
    uid: str = ""  # the study's uid: finds its own MLflow runs, never a deleted namesake's

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


def chance_accuracy(task: str, *, seed: int = 0, options: Mapping[str, Any] | None = None) -> float | None:
    """Validation accuracy of always predicting the commonest validation class (None for
    regression): the floor a network that learned nothing sits at.

    >>> round(chance_accuracy("digits"), 3)
    0.103
    """
    return _chance(task, seed, json.dumps(dict(options or {}), sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _chance(task: str, seed: int, options_json: str) -> float | None:
    import torch

    from hposvc.tasks import load_task

    t = load_task(task, seed=seed, options=json.loads(options_json) or None)
    if t.kind == "regression":
        return None
    y = t.y_val
    if t.kind == "binary":
        p = float((y > 0.5).float().mean())
        return max(p, 1.0 - p)
    counts = torch.bincount(y.long(), minlength=t.n_outputs)
    return float(counts.max()) / len(y)


def frame_from_trials(trials: pd.DataFrame, frozen: list, *, metric: str, chance: float | None) -> pd.DataFrame:
    """Add ``curve``, ``activation_std``, ``unit_symmetry`` and ``score`` to a
    :func:`hposvc.trials` frame from the matching Optuna ``FrozenTrial`` objects."""
    by_number = {t.number: t for t in frozen}
    curves, stds, syms = [], [], []
    for number in trials["number"]:
        t = by_number.get(number)
        inter = dict(t.intermediate_values) if t is not None else {}
        curves.append([inter[k] for k in sorted(inter)])
        attrs = t.user_attrs if t is not None else {}
        std = attrs.get(ACTIVATION_STD_ATTR)
        stds.append([float(v) if v is not None else math.nan for v in std] if std is not None else None)
        sym = attrs.get(UNIT_SYMMETRY_ATTR)
        syms.append(float(sym) if sym is not None else math.nan)
    out = trials.copy()
    out["curve"] = curves
    out["activation_std"] = stds
    out["unit_symmetry"] = syms
    out["score"] = [_score(row, metric, chance) for row in out.itertuples(index=False)]
    return out


def _score(row: Any, metric: str, chance: float | None) -> float:
    if row.state == "COMPLETE" and row.value is not None and math.isfinite(row.value):
        return float(row.value)
    reason = row.reason or ""
    if row.state == "PRUNED" and reason.startswith("diverged") and metric == "val_accuracy" and chance is not None:
        return chance
    return math.nan


def load_study_data(name: str, *, storage: str) -> StudyData:
    """Read study ``name`` from ``storage`` (an SQLAlchemy URL) for the report.

    >>> data = load_study_data("guide-zero-init", storage="sqlite:///hposvc-data/hposvc.db")  # doctest: +SKIP
    >>> data.trials[["init", "depth", "score", "unit_symmetry"]].head()                     # doctest: +SKIP
    """
    from hposvc.records import study_info
    from hposvc.results import trials
    from hposvc.spec import parse_spec
    from hposvc.storage import load_study

    study = load_study(name, storage=storage)
    info = study_info(study)
    spec_dict = info.spec or {}
    metric = info.metric or "val_accuracy"
    chance = None
    task = "?"
    if spec_dict:
        spec = parse_spec(spec_dict, source=f"study {name!r}")
        task = spec.task or "(its own data)"
        if metric == "val_accuracy" and spec.task is not None:
            try:
                chance = chance_accuracy(spec.task, seed=spec.seed, options=spec.task_options)
            except HposvcError as e:  # e.g. a tabular file that moved: the report goes on without it
                log.warning("study %s: no chance level (%s); diverged trials will have no score", name, e)
    frame = frame_from_trials(trials(name, storage=storage), study.get_trials(deepcopy=False), metric=metric, chance=chance)
    return StudyData(
        name=name,
        metric=metric,
        direction=study.direction.name.lower(),
        task=task,
        task_key=info.task or task,
        chance=chance,
        trials=frame,
        spec=spec_dict,
        uid=info.uid,
    )
