"""Warm start: the current recommendations as concrete configurations for a new study.

``hposvc.study`` calls :func:`warm_start_configs` for ``hposvc study run --warm-start``
and keeps only the configurations ``hposvc.space.config_in_space`` accepts, so this
module builds them to fit the spec's space but does not have to be the last word on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna

from hposvc.config import ONE_SHOT_DEFAULTS, TrialConfig
from hposvc.errors import HposvcError, StorageError
from hposvc.recommendation._core import recommend_from_frame, top_trials
from hposvc.recommendation._data import collect_trials, open_storage

if TYPE_CHECKING:
    from hposvc.spec import Dim, StudySpec

__all__ = ["warm_start_configs"]


def warm_start_configs(
    spec: "StudySpec",
    *,
    storage: "str | optuna.storages.BaseStorage | optuna.Study | None" = None,
    data_dir: "str | os.PathLike[str] | None" = None,
    top: int = 3,
    min_trials: int = 3,
) -> list[TrialConfig]:
    """Recommended configurations to run first in a new study of ``spec``, best first.

    One per optimizer the spec allows, in the order of the recommendation computed over
    every *other* study in ``storage`` (all tasks: transfer to an unseen task is the
    point), at most ``top``. Each has the optimizer's recommended numbers, clipped and
    snapped into the spec's ranges; other searched fields get the value most common among
    that optimizer's top-quartile trials when the spec allows it, else the dimension's
    first choice or the middle of its range. Nothing is stored. Empty when no other study
    has enough data.

    ``storage`` is the study database URL (None: resolved from ``data_dir`` and the
    environment by :mod:`hposvc.storage`), an optuna storage, or the new study itself.

    >>> configs = warm_start_configs(spec, storage="sqlite:///hposvc-data/hposvc.db")  # doctest: +SKIP
    >>> [c.optimizer for c in configs]                                                 # doctest: +SKIP
    ['adam', 'nesterov', 'rmsprop']
    """
    from hposvc.spec import CONDITIONAL

    store = open_storage(storage, data_dir=data_dir)
    try:
        names = [s.study_name for s in store.get_all_studies()]
    except Exception as e:  # noqa: BLE001 (driver errors)
        raise StorageError(f"cannot list the studies in the storage: {e}") from e
    others = [n for n in names if n != spec.name]
    if not others:
        return []
    df = collect_trials(store, studies=others)
    allowed = set(spec.optimizers)
    df = df[df["optimizer"].isin(allowed)]
    if df.empty:
        return []
    rec = recommend_from_frame(df, n_bootstrap=0, min_trials=min_trials)
    best_rows = top_trials(df, min_trials=min_trials)
    fixed = spec.implicit_values()
    configs: list[TrialConfig] = []
    for opt in rec.table.loc[rec.table["status"] == "ok", "optimizer"]:
        if len(configs) >= top:
            break
        values: dict[str, Any] = {**fixed, "optimizer": opt}
        numbers = rec.numbers.get(opt, {})
        for param, (_, dim) in spec.optimizer_space(opt).items():
            values[param] = _fit(dim, numbers.get(param, ONE_SHOT_DEFAULTS[opt][param]))
        mine = best_rows[best_rows["optimizer"] == opt]
        for name, dim in spec.dims.items():
            if name == "optimizer" or name in _ALL_OPT_PARAMS or name in values:
                continue  # optimizer numbers the spec does not search keep one-shot defaults
            if name in CONDITIONAL:
                owner, active = CONDITIONAL[name]
                if values.get(owner, getattr(TrialConfig, owner, None)) not in active:
                    continue
            values[name] = _pick(dim, name, numbers, mine)
        try:
            configs.append(TrialConfig(**values))
        except HposvcError:
            continue  # a combination TrialConfig rejects is simply not offered
    return configs


_ALL_OPT_PARAMS = frozenset(p for params in ONE_SHOT_DEFAULTS.values() for p in params)


def _pick(dim: "Dim", name: str, numbers: Mapping[str, Any], top: Any) -> Any:
    """A value for a searched non-optimizer field: recommended, else common among the
    best trials, else a neutral point of the dimension."""
    if name in numbers and dim.contains(numbers[name]):
        return numbers[name]
    if dim.kind == "fixed":
        return dim.value
    if name in getattr(top, "columns", ()):
        for value in top[name].dropna().value_counts().index:
            value = value.item() if hasattr(value, "item") else value
            if dim.contains(value):
                return value
    if dim.kind == "choice":
        return dim.choices[0]
    if dim.log and dim.low > 0:
        middle = math.sqrt(dim.low * dim.high)
    else:
        middle = (dim.low + dim.high) / 2
    return _fit(dim, middle)


def _fit(dim: "Dim", value: Any) -> Any:
    """``value`` moved to the nearest value ``dim`` allows."""
    if dim.kind == "fixed":
        return dim.value
    if dim.kind == "choice":
        if dim.contains(value):
            return value
        numeric = [c for c in dim.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if not numeric or not isinstance(value, (int, float)):
            return dim.choices[0]
        # Nearest in log space when everything is positive (learning rates), else linear.
        if value > 0 and all(c > 0 for c in numeric):
            return min(numeric, key=lambda c: abs(math.log(c) - math.log(value)))
        return min(numeric, key=lambda c: abs(c - value))
    x = min(max(float(value), float(dim.low)), float(dim.high))
    if dim.step is not None:
        k = round((x - dim.low) / dim.step)
        x = min(dim.low + k * dim.step, dim.high)
        x = float(f"{x:.12g}")
    return int(round(x)) if dim.integer else x
