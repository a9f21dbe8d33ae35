"""The search space: a :class:`~hposvc.spec.StudySpec` turned into Optuna suggestions.

Parameter names in Optuna follow the TrialConfig fields: "optimizer", "lr", "init",
"norm", "batch_size", ... Every optimizer number other than a shared lr is conditional
and named "<optimizer>.<param>" ("adam.beta1", "momentum.momentum"), so a trial only
suggests the numbers of the optimizer it drew, and each optimizer's numbers are modelled
on their own; lr is "lr" unless the spec's ``[space.optimizers.NAME]`` (or a default
range, see :mod:`hposvc.spec`) gives that optimizer its own ("adam.lr"). Fixed dimensions
are never suggested: they go straight into the TrialConfig.

>>> import optuna
>>> from hposvc.spec import parse_spec
>>> spec = parse_spec({"study": {"name": "s", "task": "digits"},
...                    "space": {"optimizer": ["sgd", "adam"], "lr": {"low": 1e-3, "high": 0.1, "log": True}}})
>>> trial = optuna.create_study(sampler=build_sampler(spec)).ask()
>>> config = suggest_config(trial, spec)
>>> config_in_space(config, spec)
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import optuna

from hposvc.config import CONDITIONAL, ONE_SHOT_DEFAULTS, OPTIMIZER_PARAMS, TrialConfig
from hposvc.errors import InvalidInputError, SpecError, invalid
from hposvc.spec import PRUNERS, SAMPLERS, Dim, StudySpec

__all__ = [
    "build_pruner",
    "build_sampler",
    "config_in_space",
    "epoch_bounds",
    "first_config",
    "grid_search_space",
    "params_for_config",
    "suggest_config",
]

# TPE's random start-up trials: Optuna's 10, but at most a third of a small budget, so the
# 12-trial quickstart still gets some model-guided trials.
TPE_MAX_STARTUP = 10
TPE_MIN_STARTUP = 5
# Median pruner: compare against at least this many finished trials, and never prune in
# the first MEDIAN_WARMUP_FRACTION of the epochs, where learning curves still cross.
MEDIAN_STARTUP_TRIALS = 5
MEDIAN_WARMUP_FRACTION = 0.3
# Successive halving / Hyperband keep 1/3 of the trials at each rung (Optuna's default).
REDUCTION_FACTOR = 3


# -- trial -> TrialConfig ------------------------------------------------------------------


def suggest_config(
    trial: optuna.trial.BaseTrial,
    spec: StudySpec,
    *,
    task_defaults: Mapping[str, int] | None = None,
) -> TrialConfig:
    """Suggest one TrialConfig from ``spec``'s space through ``trial``.

    ``task_defaults`` gives depth/width for a user-factory task (its Task.default_depth /
    default_width); built-in tasks use :data:`~hposvc.config.TASK_MODEL_DEFAULTS`.
    The trial seed is the spec's seed unless the spec sets one.

    >>> import optuna
    >>> from hposvc.spec import parse_spec
    >>> spec = parse_spec({"study": {"name": "s", "task": "digits"}, "space": {"optimizer": "sgd", "lr": [0.1]}})
    >>> suggest_config(optuna.create_study().ask(), spec).lr
    0.1
    """
    values = spec.implicit_values(task_defaults)
    # 1) the optimizer, then only the numbers it uses (conditional parameters)
    optimizer = TrialConfig.optimizer
    if "optimizer" in spec.dims:
        optimizer = _suggest(trial, "optimizer", spec.dims["optimizer"])
    values["optimizer"] = optimizer
    for param, (name, dim) in spec.optimizer_space(optimizer).items():
        values[param] = _suggest(trial, name, dim)
    # 2) everything else, in TrialConfig order, which puts each owner (init, norm, schedule)
    #    before the fields that only apply for some of its values (init_std, norm_groups, warmup)
    for name, dim in spec.dims.items():
        if name == "optimizer" or name in OPTIMIZER_PARAMS or not _applies(name, values):
            continue
        values[name] = _suggest(trial, name, dim)
    # 3) the user's own dimensions ([space.params]), under their plain names
    values["params"] = {name: _suggest(trial, name, dim) for name, dim in spec.params.items()}
    return TrialConfig(**values)


class _FirstValues:
    """A stand-in trial that answers every suggestion with a dimension's first value (a
    choice's first, a range's low end): :func:`first_config`."""

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return choices[0]

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return low

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        return low


def first_config(spec: StudySpec, *, task_defaults: Mapping[str, int] | None = None) -> TrialConfig:
    """A config from ``spec``'s space without a study: each dimension's first value. What
    hposvc builds a model from to check a spec before any trial runs.

    >>> from hposvc.spec import parse_spec
    >>> spec = parse_spec({"study": {"name": "s", "task": "digits"}, "space": {"norm": ["group", "none"], "lr": {"low": 0.01, "high": 0.1}}})
    >>> c = first_config(spec); c.norm, c.norm_groups, c.lr
    ('group', 4, 0.01)
    """
    return suggest_config(_FirstValues(), spec, task_defaults=task_defaults)  # type: ignore[arg-type]


def _suggest(trial: optuna.trial.BaseTrial, name: str, dim: Dim) -> Any:
    if dim.kind == "fixed":
        return dim.value
    if dim.kind == "choice":
        return trial.suggest_categorical(name, list(dim.choices))
    if dim.integer:
        return trial.suggest_int(name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(name, float(dim.low), float(dim.high), step=dim.step, log=dim.log)


def _applies(name: str, values: Mapping[str, Any]) -> bool:
    """Whether a conditional field applies given the values chosen so far."""
    if name not in CONDITIONAL:
        return True
    owner, active = CONDITIONAL[name]
    return values.get(owner, getattr(TrialConfig, owner)) in active


# -- TrialConfig -> space ------------------------------------------------------------------


def config_in_space(
    config: TrialConfig,
    spec: StudySpec,
    *,
    task_defaults: Mapping[str, int] | None = None,
) -> bool:
    """Whether ``suggest_config`` could have produced ``config`` for ``spec``.

    >>> from hposvc.spec import parse_spec
    >>> spec = parse_spec({"study": {"name": "s", "task": "digits"}, "space": {"optimizer": ["sgd", "adam"]}})
    >>> config_in_space(TrialConfig(optimizer="adam", depth=2, width=128), spec)
    True
    >>> config_in_space(TrialConfig(optimizer="rmsprop", depth=2, width=128), spec)
    False
    """
    return _mismatch(config, spec, task_defaults) is None


def params_for_config(
    config: TrialConfig,
    spec: StudySpec,
    *,
    task_defaults: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The Optuna params that make ``suggest_config`` return ``config`` (for
    ``study.enqueue_trial``, e.g. to warm-start a study with a known good config).

    Raises :class:`~hposvc.errors.InvalidInputError` naming the first field outside the space.

    >>> from hposvc.spec import parse_spec
    >>> spec = parse_spec({"study": {"name": "s", "task": "digits"},
    ...                    "space": {"optimizer": ["sgd", "adam"], "lr": {"low": 1e-4, "high": 1.0, "log": True}}})
    >>> params_for_config(TrialConfig(optimizer="sgd", lr=0.05, depth=2, width=128), spec)
    {'optimizer': 'sgd', 'lr': 0.05}
    """
    reason = _mismatch(config, spec, task_defaults)
    if reason is not None:
        allowed = f"a config inside the search space of study {spec.name!r}"
        raise invalid("config", config.to_dict(), allowed, hint=reason)
    params: dict[str, Any] = {}
    if "optimizer" in spec.dims and spec.dims["optimizer"].searched:
        params["optimizer"] = _param_value(spec.dims["optimizer"], config.optimizer)
    for param, (name, dim) in spec.optimizer_space(config.optimizer).items():
        if dim.searched:
            params[name] = _param_value(dim, getattr(config, param))
    values = config.to_dict()
    for name, dim in spec.dims.items():
        if name == "optimizer" or name in OPTIMIZER_PARAMS or not dim.searched or not _applies(name, values):
            continue
        params[name] = _param_value(dim, getattr(config, name))
    for name, dim in spec.params.items():
        if dim.searched:
            params[name] = _param_value(dim, config.params[name])
    return params


def _param_value(dim: Dim, value: Any) -> Any:
    # A choice's own element, so a float read back from JSON still matches the categorical.
    if dim.kind == "choice":
        return next(c for c in dim.choices if Dim.fixed(c).contains(value))
    return int(value) if dim.integer else value


def _mismatch(config: TrialConfig, spec: StudySpec, task_defaults: Mapping[str, int] | None) -> str | None:
    """Why ``config`` is outside ``spec``'s space, or None when it is inside."""
    values: dict[str, Any] = dict(spec.implicit_values(task_defaults))
    for name, expected in values.items():
        if getattr(config, name) != expected:
            return f"{name}={getattr(config, name)!r}, but the spec gives every trial {name}={expected!r}."
    optimizer_dim = spec.dims.get("optimizer", Dim.fixed(TrialConfig.optimizer))
    if not optimizer_dim.contains(config.optimizer):
        return f"optimizer={config.optimizer!r} is not among the spec's optimizers {spec.optimizers}."
    values["optimizer"] = config.optimizer
    space = spec.optimizer_space(config.optimizer)
    for param in ONE_SHOT_DEFAULTS[config.optimizer]:
        value = getattr(config, param)
        if param in space:
            name, dim = space[param]
            if not dim.contains(value):
                return f"{param}={value!r} is outside {name} = {dim.to_json()!r}."
            values[param] = value
        elif not math.isclose(value, default := ONE_SHOT_DEFAULTS[config.optimizer][param], rel_tol=1e-12):
            return f"{param}={value!r}, but the spec leaves it at the one-shot default {default!r}."
    for name, dim in spec.dims.items():
        if name == "optimizer" or name in OPTIMIZER_PARAMS or not _applies(name, config.to_dict()):
            continue
        if not dim.contains(getattr(config, name)):
            return f"{name}={getattr(config, name)!r} is outside space.{name} = {dim.to_json()!r}."
        values[name] = getattr(config, name)
    if set(config.params) != set(spec.params):
        return f"params={dict(config.params)!r}, but the spec's [space.params] are {sorted(spec.params)}."
    for name, dim in spec.params.items():
        if not dim.contains(config.params[name]):
            return f"{name}={config.params[name]!r} is outside space.params.{name} = {dim.to_json()!r}."
    values["params"] = config.params
    # Whatever the spec does not set must be what TrialConfig fills in by itself.
    try:
        rebuilt = TrialConfig(**values)
    except InvalidInputError as e:
        return str(e)
    if rebuilt != config:
        diff = [k for k, v in config.to_dict().items() if rebuilt.to_dict()[k] != v]
        name = diff[0]
        return f"{name}={getattr(config, name)!r}, but the spec leaves it at {getattr(rebuilt, name)!r}."
    return None


# -- samplers and pruners ------------------------------------------------------------------


def grid_search_space(spec: StudySpec) -> dict[str, list]:
    """Every searched Optuna parameter with all its values, for ``GridSampler``.

    Conditional parameters are in the grid too (GridSampler needs every name a trial may
    suggest), so a trial that draws sgd ignores the grid's "adam.beta1" column.

    >>> from hposvc.spec import parse_spec
    >>> grid_search_space(parse_spec({"study": {"name": "s", "task": "digits", "sampler": "grid"},
    ...                               "space": {"batch_size": {"low": 32, "high": 96, "step": 32}}}))
    {'batch_size': [32, 64, 96]}
    """
    out: dict[str, list] = {}
    for name, dim in spec.search_space().items():
        values = dim.values()
        if values is None:
            raise invalid(
                name, dim.to_json(), "a list, or a range with a step", source=spec.source,
                hint="A grid needs a finite set of values for every searched dimension.", cls=SpecError,
            )
        out[name] = list(values)
    return out


def check_grid_budget(spec: StudySpec) -> None:
    """A grid study may not ask for more trials than its grid has points: past them the
    grid sampler re-runs configurations it already ran. Raises :class:`SpecError`."""
    if spec.sampler != "grid":
        return
    size = math.prod(len(values) for values in grid_search_space(spec).values())
    if spec.n_trials > size:
        raise invalid(
            "study.n_trials",
            spec.n_trials,
            f"at most {size}, the number of points of this grid",
            source=spec.source,
            hint="Lower n_trials (or --n-trials), or add values to the grid.",
            cls=SpecError,
        )


def build_sampler(spec: StudySpec, *, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded with ``seed`` (default ``spec.seed``).

    Parallel workers pass their own seed: samplers seeded alike would propose the same
    configurations in every worker.

    * tpe: multivariate, grouped TPE (models parameters jointly, and splits the
      conditional optimizer numbers into groups that occur together); constant liar so
      parallel workers and populations do not pile onto one point.
    * random, nsga2, qmc (scrambled Sobol), gp: Optuna's with the seed.
    * cmaes: CMA-ES over the numeric parameters (categorical ones are sampled at random);
      needs the ``cmaes`` package.
    * grid: every combination of :func:`grid_search_space`, shuffled by the seed. Runners
      should stop when ``sampler.is_exhausted(study)``: past that, Optuna re-runs grid points.

    >>> from hposvc.spec import parse_spec
    >>> type(build_sampler(parse_spec({"study": {"name": "s", "task": "digits"}}))).__name__
    'TPESampler'
    """
    s = spec.sampler
    seed = spec.seed if seed is None else seed
    # Multivariate/group TPE, QMC and GP are marked experimental; the warning is noise to users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s == "tpe":
            startup = max(TPE_MIN_STARTUP, min(TPE_MAX_STARTUP, spec.n_trials // 3))
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=startup
            )
        if s == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s == "cmaes":
            try:
                import cmaes  # noqa: F401  (Optuna imports it lazily, mid-study)
            except ImportError as e:
                raise invalid(
                    "study.sampler", "cmaes", "a sampler this installation supports", source=spec.source,
                    hint="CMA-ES needs the 'cmaes' package: pip install cmaes.", cls=SpecError,
                ) from e
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if s == "gp":
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
        if s == "grid":
            return _GridSampler(grid_search_space(spec), seed=seed)
        if s == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if s == "qmc":
            return optuna.samplers.QMCSampler(
                seed=seed, qmc_type="sobol", scramble=True, warn_independent_sampling=False,
                warn_asynchronous_seeding=False,
            )
    raise invalid("study.sampler", s, SAMPLERS, source=spec.source, cls=SpecError)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, usable from ask/tell runners.

    Once the grid is exhausted, GridSampler.after_trial calls ``study.stop()``, which
    raises RuntimeError outside ``study.optimize`` — that is, inside ``study.tell`` of an
    ask/tell runner (the trial itself is stored all the same). Runners stop on
    ``is_exhausted(study)`` instead; inside ``optimize`` the study still stops.
    """

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        try:
            super().after_trial(study, trial, state, values)
        except RuntimeError as e:
            if "Study.stop" not in str(e):
                raise


def epoch_bounds(spec: StudySpec) -> tuple[int, int]:
    """The fewest and most epochs a trial of ``spec`` can train (its pruning resource)."""
    dim = spec.dims.get("epochs")
    if dim is None:
        return TrialConfig.epochs, TrialConfig.epochs
    if dim.kind == "range":
        return int(dim.low), int(dim.high)
    values = dim.values()
    return min(values), max(values)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner, sized by its epochs (steps are epochs, starting at 1).

    * none: never prunes (diverged trials still end PRUNED; training detects that itself).
    * median: after MEDIAN_STARTUP_TRIALS finished trials, prunes a trial whose metric is
      worse than the median of earlier trials at the same epoch, from 30 % of the epochs on.
    * successive_halving / hyperband: rungs at min_resource * 3**k epochs, with
      min_resource = max(1, max_epochs // 9) so a 10-epoch study has rungs at 1, 3, 9.

    >>> from hposvc.spec import parse_spec
    >>> type(build_pruner(parse_spec({"study": {"name": "s", "task": "digits", "pruner": "hyperband"}}))).__name__
    'HyperbandPruner'
    """
    low, high = epoch_bounds(spec)
    min_resource = max(1, high // REDUCTION_FACTOR**2)
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=MEDIAN_STARTUP_TRIALS,
            n_warmup_steps=max(1, math.ceil(MEDIAN_WARMUP_FRACTION * low - 1e-9)),  # 0.3 * 10 is 3, not 4
        )
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=REDUCTION_FACTOR)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource=high, reduction_factor=REDUCTION_FACTOR
        )
    raise invalid("study.pruner", spec.pruner, PRUNERS, source=spec.source, cls=SpecError)
