"""Warm start: the current recommendations as concrete configurations for a new study.

``hposvc.study`` calls :func:`warm_start_configs` for ``hposvc study run --warm-start``
and keeps only the configurations ``hposvc.space.config_in_space`` accepts, so this
module builds them to fit the spec's space but does not have to be the last word on it.

The few warm trials hedge. The first is the recommendation itself: the best allowed
optimizer with its recommended numbers, in the best *context* (the joint value of the
spec's other searched choices, such as norm and activation). Each next one takes the next
ranked optimizer *and* the next ranked context. Why both: on an unseen task the finished
studies can be wrong on either axis, and in the survey data the context (norm ×
activation) moves accuracy far more than the optimizer once its lr is tuned, so a queue
that only varied the optimizer would spend every warm trial on the same possibly wrong
context.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd

from hposvc.config import ONE_SHOT_DEFAULTS, TrialConfig
from hposvc.errors import HposvcError, StorageError
from hposvc.recommendation._core import NUMBER_COLUMNS, _prepare, recommend_from_frame, top_trials
from hposvc.recommendation._data import SURVEY_HELD_OUT, SURVEY_SCALE, collect_trials, open_storage

if TYPE_CHECKING:
    from hposvc.spec import Dim, StudySpec

WARM_TOP = 3  # configurations --warm-start queues first (one per optimizer: they hedge)

__all__ = [
    "WARM_TOP",
    "ranked_contexts",
    "shipped_warm_start_configs",
    "survey_warm_start_configs",
    "warm_start_configs",
    "warm_start_configs_from_frame",
]


def warm_start_configs(
    spec: "StudySpec",
    *,
    storage: "str | optuna.storages.BaseStorage | optuna.Study | None" = None,
    data_dir: "str | os.PathLike[str] | None" = None,
    top: int = WARM_TOP,
    min_trials: int = 3,
) -> list[TrialConfig]:
    """Recommended configurations to run first in a new study of ``spec``, best first.

    Where a survey ran in ``storage`` (``hposvc survey run``): the configurations that did
    best across its protocol tasks (:func:`survey_warm_start_configs`). Otherwise computed
    from the finished trials of every *other* study in ``storage`` (all tasks: transfer to
    an unseen task is the point) by :func:`warm_start_configs_from_frame`; and when that
    gives nothing (a fresh install), from the survey result that ships with hposvc
    (:func:`shipped_warm_start_configs`). Held-out survey studies are never used. Nothing
    is stored.

    ``storage`` is the study database URL (None: resolved from ``data_dir`` and the
    environment by :mod:`hposvc.storage`), an optuna storage, or the new study itself.

    >>> configs = warm_start_configs(spec, storage="sqlite:///hposvc-data/hposvc.db")  # doctest: +SKIP
    >>> [(c.optimizer, c.norm, c.activation) for c in configs]                         # doctest: +SKIP
    [('nesterov', 'batch', 'tanh'), ('adam', 'batch', 'relu'), ('rmsprop', 'layer', 'tanh')]
    """
    store = open_storage(storage, data_dir=data_dir)
    try:
        # Held-out survey studies only test recommendations: they never feed one.
        frozen = [s for s in store.get_all_studies() if not s.user_attrs.get(SURVEY_HELD_OUT) and s.study_name != spec.name]
    except Exception as e:  # noqa: BLE001 (driver errors)
        raise StorageError(f"cannot list the studies in the storage: {e}") from e
    scales = {s.user_attrs.get(SURVEY_SCALE) for s in frozen} - {None}
    if scales:
        # A survey ran here: its configurations, computed as `survey report` computes them.
        return survey_warm_start_configs(spec, storage=store, scale="full" if "full" in scales else sorted(scales)[0], top=top)
    others = [s.study_name for s in frozen]
    configs = warm_start_configs_from_frame(collect_trials(store, studies=others), spec, top=top, min_trials=min_trials) if others else []
    return configs or shipped_warm_start_configs(spec, top=top)


def survey_warm_start_configs(
    spec: "StudySpec", *, storage: "str | optuna.storages.BaseStorage | None" = None, scale: str = "full", top: int = WARM_TOP
) -> list[TrialConfig]:
    """Warm-start configurations from a survey run in ``storage``: each optimizer's best
    configuration across the protocol tasks of the spec's kind of model (all protocol
    tasks when the survey has none of that kind; never the held-out ones), best first by
    its mean anchored score over them, filtered to the spec's optimizers and fitted into
    its space. By kind only while the shipped survey measured the same-kind list ahead of
    the list over every task on its held-out tasks (RESULTS.md, "Warm start")."""
    from hposvc.recommendation._results import survey_warm_list
    from hposvc.recommendation._survey import spec_kind, survey_frame

    df = survey_frame(storage, scale=scale)
    proto = df[~df["held_out"]]
    same = proto[proto["kind"] == spec_kind(spec)] if _by_kind() else proto.iloc[:0]
    ranked = [(w["optimizer"], {k: v for k, v in w.items() if k not in ("optimizer", "score")}) for w in survey_warm_list(same if len(same) else proto)]
    return _build(spec, [(o, n) for o, n in ranked if o in set(spec.optimizers)], contexts=[], best_rows=None, top=top)


def shipped_warm_start_configs(spec: "StudySpec", *, top: int = WARM_TOP) -> list[TrialConfig]:
    """Warm-start configurations from the survey result that ships with hposvc (what a
    fresh install, whose storage has no other study, warm-starts from); [] when none ships.

    The shipped lists are each optimizer's best configuration across the survey's tasks,
    over every task (``warm_start``) and per kind of model (``warm_start_by_kind``; the
    spec's kind is used when the survey measured that ahead, see :func:`_by_kind`), in the
    survey's order; here the list is filtered to the spec's optimizers and fitted into its
    space like :func:`warm_start_configs_from_frame` does.
    """
    from hposvc.recommendation._results import load_shipped_survey
    from hposvc.recommendation._survey import spec_kind

    try:
        shipped = load_shipped_survey()
    except HposvcError:
        return []
    chosen = shipped.warm_start_by_kind.get(spec_kind(spec) or "", shipped.warm_start) if _by_kind() else shipped.warm_start
    ranked = [(w["optimizer"], {k: v for k, v in w.items() if k not in ("optimizer", "score")}) for w in chosen]
    return _build(spec, [(o, n) for o, n in ranked if o in set(spec.optimizers)], contexts=[], best_rows=None, top=top)


def _by_kind() -> bool:
    """Whether warm starts use the list of the new study's kind of model: when the shipped
    survey measured the same-kind list ahead of the list over every task on its held-out
    tasks (RESULTS.md, "Warm start"); else the list over every task."""
    from hposvc.recommendation._results import load_shipped_survey

    try:
        geo = load_shipped_survey().warm_start_eval.get("geometric_mean", {})
    except HposvcError:
        return False
    return geo.get("shortlist (same kind)", 0.0) > geo.get("shortlist", 0.0)


def warm_start_configs_from_frame(
    df: pd.DataFrame, spec: "StudySpec", *, top: int = WARM_TOP, min_trials: int = 3
) -> list[TrialConfig]:
    """Warm-start configurations for ``spec`` from a frame of finished trials.

    - Optimizers: the allowed ones, ranked by the recommendation computed over the
      allowed optimizers only; one with enough trials but nothing to rank it against
      ("no comparison") comes after the ranked ones, after those measured on only some
      tasks ("incomplete"). Each gets its recommended numbers — the cell of a shared lr
      (β/μ) grid that did best on average across the tasks, a configuration that ran,
      not medians of separate numbers — clipped and snapped into the spec's ranges;
      numbers the spec does not search keep the one-shot defaults.
    - Contexts: :func:`ranked_contexts` (all trials, any optimizer). The i-th
      configuration pairs the i-th optimizer with the i-th context (cycling when there
      are fewer contexts than optimizers).
    - Any other searched field: the recommended value when the spec allows it, else the
      value most common among that optimizer's top-quartile trials, else the dimension's
      first choice or the middle of its range.

    At most ``top`` configurations, one per optimizer.

    >>> warm_start_configs_from_frame(collect_trials(url), spec)  # doctest: +SKIP
    """
    contexts = ranked_contexts(df, spec, min_trials=min_trials)
    df = df[df["optimizer"].isin(set(spec.optimizers))]
    if df.empty:
        return []
    rec = recommend_from_frame(df, n_bootstrap=0, min_trials=min_trials)
    status = rec.table["status"]
    # Ranked first; then measured on only some tasks of the block; then nothing to compare with.
    order = [o for s in ("ok", "incomplete", "no comparison") for o in rec.table.loc[status == s, "optimizer"]]
    return _build(spec, [(o, rec.numbers.get(o, {})) for o in order], contexts=contexts, best_rows=top_trials(df, min_trials=min_trials), top=top)


def _build(
    spec: "StudySpec",
    ranked: list[tuple[str, Mapping[str, Any]]],
    *,
    contexts: list[dict[str, Any]],
    best_rows: pd.DataFrame | None,
    top: int,
) -> list[TrialConfig]:
    """The i-th ranked optimizer with its numbers (fitted into the spec's ranges) in the
    i-th context; other searched fields from ``_pick``. At most ``top``, in order."""
    from hposvc.config import CONDITIONAL

    fixed = spec.implicit_values()
    configs: list[TrialConfig] = []
    for opt, numbers in ranked:
        if len(configs) >= top:
            break
        values: dict[str, Any] = {**fixed, "optimizer": opt}
        if contexts:
            values.update(contexts[len(configs) % len(contexts)])
        for param, (_, dim) in spec.optimizer_space(opt).items():
            values[param] = _fit(dim, numbers.get(param, ONE_SHOT_DEFAULTS[opt][param]))
        mine = best_rows[best_rows["optimizer"] == opt] if best_rows is not None else None
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


def ranked_contexts(df: pd.DataFrame, spec: "StudySpec", *, min_trials: int = 3) -> list[dict[str, Any]]:
    """The joint values of the spec's searched context choices, best first.

    Context fields: the spec's searched choice dimensions other than the optimizer, its
    numbers, the schedule (part of the recommended numbers) and conditional fields, e.g.
    norm and activation. A context's score is the mean, over all trials that used it (any
    optimizer, any task), of the trial's percentile rank among the trials of its task, so
    tasks with different accuracy levels weigh alike and no optimizer is needed to
    compare. Only contexts the spec allows and with at least ``min_trials`` trials are
    ranked; ties go to more trials. Empty when no context qualifies.

    >>> ranked_contexts(collect_trials(url), spec)  # doctest: +SKIP
    [{'norm': 'batch', 'activation': 'tanh'}, {'norm': 'batch', 'activation': 'relu'}, ...]
    """
    from hposvc.config import CONDITIONAL

    names = [
        name
        for name, dim in spec.dims.items()
        if dim.kind == "choice"
        and name != "optimizer"
        and name not in _ALL_OPT_PARAMS
        and name not in NUMBER_COLUMNS
        and name not in CONDITIONAL
        and name in df.columns
    ]
    if not names or df.empty:
        return []
    f = _prepare(df)
    f = f.assign(pct=f.groupby("unit")["score"].rank(pct=True, method="average"))
    for name in names:
        f = f[f[name].map(lambda v, dim=spec.dims[name]: v is not None and _allowed(dim, v))]
    if f.empty:
        return []
    g = f.groupby(names, sort=False)["pct"].agg(["mean", "size"]).reset_index()
    g = g[g["size"] >= min_trials].sort_values(["mean", "size"], ascending=False, kind="stable")
    return [{n: _plain(row[n]) for n in names} for _, row in g.iterrows()]


def _allowed(dim: "Dim", value: Any) -> bool:
    try:
        return bool(dim.contains(_plain(value)))
    except (TypeError, ValueError):
        return False


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


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
