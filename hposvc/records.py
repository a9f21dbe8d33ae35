"""The stored schema: what hposvc writes on an Optuna study and its trials, and how to read it.

An hposvc study is a plain Optuna study; everything hposvc adds is a user attribute (JSON)
with one of the keys below, so ``optuna`` alone can read it. This module is the one place
that names them.

============================  =======  ==========================================================
key                           on       value
============================  =======  ==========================================================
``hposvc.spec``               study    the parsed spec as a dict (what workers rebuild it from)
``hposvc.spec_hash``          study    hash of the spec; a different spec under the same name is refused
``hposvc.study_uid``          study    random id that tells this study from a deleted namesake (MLflow tags)
``hposvc.task``               study    the task key (``digits``, ``module:function``, …)
``hposvc.metric``             study    the metric the study optimises (``val_accuracy``, …)
``hposvc.n_trials``           study    target number of finished (COMPLETE + PRUNED) trials
``hposvc.mlflow_parent_run_id`` study  the study's MLflow parent run, shared by every worker
``hposvc.warm_started``       study    True once warm-start configurations were queued
``hposvc.versions``           study    hposvc / torch / optuna / mlflow versions that created it
``hposvc.config``             trial    the TrialConfig as a dict
``hposvc.device``             trial    device it trained on (``cpu``, ``cuda:0``)
``hposvc.host``               trial    host name of the worker
``hposvc.worker``             trial    worker id (``host:pid`` or ``host:slotN``)
``hposvc.reason``             trial    why it was PRUNED or FAILED
``hposvc.mlflow_run_id``      trial    its MLflow run (set once the run exists)
``hposvc.warm_start``         trial    True for a queued warm-start configuration
``hposvc.probe.*``            trial    probes (:mod:`hposvc.probes`)
============================  =======  ==========================================================

Trial *system* attributes: ``hposvc.heartbeat`` (the claiming worker's clock, rewritten
every few seconds while the trial runs: :mod:`hposvc.queue`), and on re-queued trials
Optuna's own ``failed_trial`` / ``retry_history``, as ``RetryFailedTrialCallback`` writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hposvc.config import TrialConfig

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DONE_STATES",
    "StudyInfo",
    "StudyRun",
    "best_trial",
    "finite_or_none",
    "study_info",
    "trial_config",
    "versions",
]

# -- study attributes
SPEC = "hposvc.spec"
SPEC_HASH = "hposvc.spec_hash"
STUDY_UID = "hposvc.study_uid"
TASK = "hposvc.task"
METRIC = "hposvc.metric"
N_TRIALS = "hposvc.n_trials"
PARENT_RUN_ID = "hposvc.mlflow_parent_run_id"
WARM_STARTED = "hposvc.warm_started"
VERSIONS = "hposvc.versions"
# -- trial attributes
HEARTBEAT = "hposvc.heartbeat"  # a system attribute: hposvc.queue's liveness signal
QUEUED = "hposvc.queued"  # a system attribute: queued by hposvc, so it must beat once claimed
CONFIG = "hposvc.config"
DEVICE = "hposvc.device"
HOST = "hposvc.host"
WORKER = "hposvc.worker"
REASON = "hposvc.reason"
RUN_ID = "hposvc.mlflow_run_id"
WARM_START = "hposvc.warm_start"
ACTIVATION_STD = "hposvc.probe.activation_std"
UNIT_SYMMETRY = "hposvc.probe.unit_symmetry"

# States that count toward n_trials: a pruned trial reached a decision as much as a
# completed one; failed trials are retried instead.
DONE_STATES = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class Counts:
    """How many trials of a study are in each state."""

    by_state: dict[str, int]

    def __getitem__(self, state: str) -> int:
        return self.by_state.get(state, 0)

    @property
    def done(self) -> int:
        """COMPLETE + PRUNED: what counts toward ``n_trials``."""
        return sum(self[s] for s in DONE_STATES)


def best_trial(study: "optuna.Study") -> "optuna.trial.FrozenTrial | None":
    """The best COMPLETE trial, or None when there is none yet (Optuna raises instead)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done or len(study.directions) != 1:
        return None  # nothing yet, or multi-objective (not an hposvc study): no single best
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: t.value)


@dataclass(frozen=True)
class StudyInfo:
    """What hposvc stored on a study (None where it is not an hposvc study)."""

    name: str
    uid: str
    spec: dict[str, Any] | None
    spec_hash: str | None
    task: str | None
    metric: str | None
    n_trials: int | None
    parent_run_id: str | None
    versions: dict[str, str]  # what created it (empty for studies made before hposvc 0.1 recorded it)

    @property
    def is_hposvc(self) -> bool:
        return self.spec_hash is not None


def study_info(study: "optuna.Study") -> StudyInfo:
    """Read hposvc's study attributes (one storage read)."""
    attrs = study.user_attrs
    n = attrs.get(N_TRIALS)
    return StudyInfo(
        name=study.study_name,
        uid=attrs.get(STUDY_UID, ""),
        spec=attrs.get(SPEC),
        spec_hash=attrs.get(SPEC_HASH),
        task=attrs.get(TASK),
        metric=attrs.get(METRIC),
        n_trials=None if n is None else int(n),
        parent_run_id=attrs.get(PARENT_RUN_ID),
        versions=attrs.get(VERSIONS) or {},
    )


def trial_config(trial: "optuna.trial.FrozenTrial") -> TrialConfig | None:
    """The TrialConfig a trial trained, or None before it started (or not hposvc's)."""
    data = trial.user_attrs.get(CONFIG)
    return None if data is None else TrialConfig.from_dict(data)


# Packages whose versions every study records, so a stored result can be reproduced.
VERSIONED = ("hposvc", "torch", "optuna", "mlflow")


def versions() -> dict[str, str]:
    """The versions of hposvc, the libraries its results depend on, and Python."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return {**found, "python": platform.python_version()}


def finite_or_none(value: float) -> float | None:
    """``value``, or None for NaN/infinity: user attributes are JSON, which has neither."""
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class StudyRun:
    """What a ``run_study`` / ``run_worker`` call did."""

    study_name: str
    storage: str  # the study database URL
    tracking_uri: str
    n_trials: int  # the study's target of finished trials
    n_done: int  # COMPLETE + PRUNED trials now in the study
    ran: int  # trials this call ran
    best_value: float | None
    best_trial: int | None

    @classmethod
    def of(cls, study: "optuna.Study", *, storage: str, tracking_uri: str, n_trials: int, n_done: int, ran: int) -> "StudyRun":
        """Summarise ``study`` as it is now in storage (``n_done``: :func:`hposvc.queue.counts`)."""
        best = best_trial(study)
        return cls(
            study_name=study.study_name,
            storage=storage,
            tracking_uri=tracking_uri,
            n_trials=n_trials,
            n_done=n_done,
            ran=ran,
            best_value=None if best is None else best.value,
            best_trial=None if best is None else best.number,
        )
