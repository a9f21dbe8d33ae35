"""Create or resume a study from its spec, and run it in this process.

:func:`prepare_study` turns a :class:`~hposvc.spec.StudySpec` into an Optuna study in SQL
storage: created with hposvc's attributes (:mod:`hposvc.records`), or loaded to resume
when the same spec made it, and its trial queue topped up (:mod:`hposvc.queue`).
:func:`run_study` prepares the study and runs one worker (:mod:`hposvc.worker`) here; the
launcher (:mod:`hposvc.launcher`) runs one worker process per device slot instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from hposvc import queue, records
from hposvc.errors import InvalidInputError
from hposvc.records import StudyRun
from hposvc.storage import open_storage, resolve_storage_url, resolve_tracking_uri, with_retries
from hposvc.worker import run_worker

if TYPE_CHECKING:
    import optuna

    from hposvc.config import TrialConfig
    from hposvc.spec import StudySpec

__all__ = ["StudyRun", "WarmStart", "as_spec", "prepare_study", "run_study"]



class WarmStart(Protocol):
    """Configurations to queue first in a fresh study, e.g. :func:`hposvc.warm_start_configs`
    (from the other studies in its storage)."""

    def __call__(self, spec: "StudySpec", *, storage: str) -> "Sequence[TrialConfig]": ...


def prepare_study(
    spec: "StudySpec",
    *,
    storage: str,
    warm_start: WarmStart | None = None,
    enqueue: "Sequence[TrialConfig]" = (),
    checked: bool = False,
) -> "optuna.Study":
    """Create the study or load it for resuming, and top its trial queue up.

    ``warm_start`` is called for a fresh study only, and what it returns is queued first
    (inside the spec's space). ``enqueue`` puts known configurations first in the queue
    (each must lie in the spec's space; one already in the study is not queued twice);
    both count toward ``n_trials``.

    ``checked``: the caller has run :func:`hposvc.plugins.check_runnable` on ``spec``.

    A study of the same name made from a different spec is refused (its spec hash is stored
    on the study), since mixing trials of two searches would make its results meaningless.
    """
    import optuna

    from hposvc.plugins import check_runnable
    from hposvc.space import build_pruner, build_sampler, params_for_config

    if not checked:  # (the caller ran it already)
        check_runnable(spec)  # grid size, the user's code: before anything is written
    rdb = open_storage(storage)
    study = with_retries(
        lambda: optuna.create_study(
            storage=rdb,
            study_name=spec.name,
            direction=spec.direction,
            sampler=build_sampler(spec),
            pruner=build_pruner(spec),
            load_if_exists=True,
        ),
        what=f"creating study {spec.name!r}",
    )
    info = records.study_info(study)
    if not info.is_hposvc:
        if study.trials:
            raise InvalidInputError(
                f"study {spec.name!r} already exists in {storage} but was not created by hposvc. "
                "Choose another [study] name, or delete it with `optuna delete-study`."
            )
        for key, value in {
            records.SPEC: spec.to_dict(),
            records.SPEC_HASH: spec.spec_hash,
            records.STUDY_UID: uuid.uuid4().hex,
            records.TASK: spec.task_key,
            records.METRIC: spec.metric,
            records.VERSIONS: records.versions(),
        }.items():
            study.set_user_attr(key, value)
    elif info.spec_hash != spec.spec_hash:
        raise InvalidInputError(
            f"study {spec.name!r} in {storage} was created from a different spec "
            f"(stored hash {info.spec_hash[:12]}, this spec {spec.spec_hash[:12]}). "
            f"Give this spec a new [study] name (API: run_study(..., name='new-name'); CLI: --name NEW), "
            f"or delete the old study first (`hposvc study delete {spec.name}`)."
        )
    if info.n_trials != spec.n_trials:
        study.set_user_attr(records.N_TRIALS, spec.n_trials)
    if warm_start is not None:
        _enqueue_warm_start(study, spec, warm_start, storage=storage)
    # Known configurations, each once: a study with trials already (a resume) has Optuna skip
    # those it holds; a new one needs no look at its trials (one read per enqueue, growing).
    fresh, seen = not study.get_trials(deepcopy=False), []
    for config in enqueue:
        params = params_for_config(config, spec)
        if fresh and params in seen:
            continue
        seen.append(params)
        study.enqueue_trial(params, skip_if_exists=not fresh)
    queue.top_up(study, spec.n_trials)
    return study


def _enqueue_warm_start(study: "optuna.Study", spec: "StudySpec", warm_start: WarmStart, *, storage: str) -> int:
    """Queue the warm-start configurations (inside the spec's space) first, once."""
    from hposvc.space import config_in_space, params_for_config

    if any(t.state.name != "WAITING" for t in study.get_trials(deepcopy=False)) or study.user_attrs.get(records.WARM_STARTED):
        return 0  # only a fresh study is warm-started
    configs = [c for c in warm_start(spec, storage=storage) if config_in_space(c, spec)]
    for config in configs[: spec.n_trials]:
        study.enqueue_trial(params_for_config(config, spec), user_attrs={records.WARM_START: True})
    study.set_user_attr(records.WARM_STARTED, True)
    return len(configs)


def as_spec(spec: "StudySpec | str | os.PathLike[str] | Mapping[str, Any]") -> "StudySpec":
    """A parsed spec from a spec, a TOML path, or a dict in the spec's shape."""
    from hposvc.spec import StudySpec, load_spec, parse_spec

    if isinstance(spec, StudySpec):
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(spec)
    return load_spec(spec)


def run_study(
    spec: "StudySpec | str | os.PathLike[str] | Mapping[str, Any]",
    *,
    n_trials: int | None = None,
    name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    warm_start: WarmStart | None = None,
    population: int | str | None = None,
    progress: bool = False,
) -> StudyRun:
    """Run (or resume) the study a spec describes, in this process.

    ``spec`` is a path to a TOML spec, a parsed :class:`~hposvc.spec.StudySpec`, or a dict
    in the spec's shape. Re-running after an interruption runs only the missing trials.
    ``warm_start=hposvc.warm_start_configs`` queues the configurations that did best in
    the other studies of the storage first.

    >>> import hposvc
    >>> result = hposvc.run_study("studies/quickstart.toml", n_trials=4)  # doctest: +SKIP
    >>> result.best_value                                                  # doctest: +SKIP
    0.97
    """
    parsed = as_spec(spec).with_overrides(n_trials=n_trials, name=name)  # None leaves a setting as is
    url = resolve_storage_url(storage, data_dir=data_dir)
    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    study = prepare_study(parsed, storage=url, warm_start=warm_start)
    return run_worker(study, spec=parsed, storage=url, tracking_uri=uri, data_dir=data_dir, device=device, population=population, progress=progress)
