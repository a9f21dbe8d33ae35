"""Default-optimizer recommendations derived from finished studies.

Which optimizer should a user reach for by default, with which numbers, how sure is
that, and how does the answer change with the tuning budget, the norm type and the
activation? :func:`recommend` reads finished trials from Optuna storage and ranks the
optimizers measured on every task of a complete block, on a per-task anchored scale
(0 = a fixed floor, 1 = the best known result), at a tuning budget k ≤ the trials that
ran. It names a ``best`` optimizer only when a two-level bootstrap (tasks, then trials)
with Holm-corrected comparisons tells the top apart from every other one; otherwise
``tied`` lists the indistinguishable ones and the summary says "No detectable difference
among …". It stores the result in an ``hposvc_recommendations`` table beside Optuna's
and logs it to MLflow.

>>> rec = recommend(storage="sqlite:///hposvc-data/hposvc.db", budget=10)  # doctest: +SKIP
>>> rec.best, rec.tied                                                      # doctest: +SKIP
(None, ['adam', 'nadam', 'rmsprop'])
>>> print(rec.summary)                                                      # doctest: +SKIP
No detectable difference among adam, nadam, rmsprop at a budget of 10 trials over 8 tasks ...
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import optuna

from hposvc.recommendation._core import (
    ACTIVATION_FAMILIES,
    BY_CHOICES,
    DEFAULT_BUDGET,
    MIN_KIND_TASKS,
    Recommendation,
    check_args,
    recommend_from_frame,
    with_updates,
)
from hposvc.recommendation._data import MODEL_KINDS, collect_trials, model_kind, open_storage
from hposvc.recommendation._stats import (
    R_MAX,
    anchored,
    average_ranks,
    compare_with_top,
    complete_matrix,
    expected_max,
    expected_max_curve,
    expected_max_weights,
    friedman,
    hierarchical_bootstrap,
    noise_ranks,
    normalise,
    performance_profile,
    profile_area,
)
from hposvc.recommendation._results import SurveyResult, load_shipped_survey, survey_report
from hposvc.recommendation._survey import SCALES, SurveyRun, protocol, run_survey, survey_frame
from hposvc.recommendation._store import (
    SCHEMA_VERSION,
    load_recommendation,
    recommendation_history,
    save_recommendation,
    set_mlflow_run_id,
)
from hposvc.recommendation._tracking import EXPERIMENT, log_recommendation, write_plots
from hposvc.recommendation._warm import (
    ranked_contexts,
    shipped_warm_start_configs,
    warm_start_configs,
    warm_start_configs_from_frame,
)

__all__ = [
    "ACTIVATION_FAMILIES",
    "BY_CHOICES",
    "DEFAULT_BUDGET",
    "EXPERIMENT",
    "MIN_KIND_TASKS",
    "MODEL_KINDS",
    "R_MAX",
    "SCALES",
    "SCHEMA_VERSION",
    "Recommendation",
    "SurveyResult",
    "SurveyRun",
    "anchored",
    "average_ranks",
    "collect_trials",
    "compare_with_top",
    "complete_matrix",
    "expected_max",
    "expected_max_curve",
    "expected_max_weights",
    "friedman",
    "hierarchical_bootstrap",
    "load_shipped_survey",
    "load_recommendation",
    "log_recommendation",
    "model_kind",
    "noise_ranks",
    "normalise",
    "performance_profile",
    "profile_area",
    "protocol",
    "ranked_contexts",
    "recommend",
    "recommend_from_frame",
    "recommendation_history",
    "run_survey",
    "save_recommendation",
    "shipped_warm_start_configs",
    "survey_frame",
    "survey_report",
    "warm_start_configs",
    "warm_start_configs_from_frame",
    "write_plots",
]


def recommend(
    *,
    storage: str | optuna.storages.BaseStorage | optuna.Study | None = None,
    studies: str | Sequence[str] | None = None,
    tasks: str | Sequence[str] | None = None,
    budget: int | None = None,
    by: str | None = None,
    kind: str | None = None,
    reference: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_trials: int = 3,
    store: bool = True,
    tracking_uri: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> Recommendation:
    """Recommend a default optimizer from the finished trials of the selected studies.

    Args:
        storage: SQLAlchemy URL, optuna storage or study; default $HPOSVC_STORAGE, else
            ``<data dir>/hposvc.db`` (resolved by :mod:`hposvc.storage`, as everywhere).
        studies / tasks: restrict to these study names / task keys (all when None).
        budget: number of random trials the user will tune with; a (task, optimizer)
            pair with fewer search trials is not ranked. Default :data:`DEFAULT_BUDGET`,
            lowered to half the fewest trials of a pair in the complete block.
        by: "norm" or "activation": also rank within each norm type / activation family.
        kind: decide on the tasks of this kind of model only ("mlp", "linear", "cnn",
            "resnet", "transformer"; each trial's ``kind`` in :func:`collect_trials`): the
            same statistics on that kind's complete block; a kind with fewer than
            :data:`MIN_KIND_TASKS` tasks says so instead of deciding. Without it, a
            selection of several kinds also gets a decision per kind (``rec.kinds``) and
            the summary says whether they disagree.
        reference: the optimizer whose default runs (else its budget score) are each
            task's floor (0), instead of the frame's ``floor`` or the median trial.
        n_bootstrap: bootstrap resamples for the intervals, P(best) and the comparisons
            with the top (0 skips them, and then no optimizer is named best).
        seed: seed of the bootstrap.
        min_trials: fewer finished trials than this on a task is "insufficient data".
        store: save the result in the ``hposvc_recommendations`` table of ``storage``
            and log it as an MLflow run.
        tracking_uri: MLflow tracking URI; default $MLFLOW_TRACKING_URI, else
            ``<data dir>/mlflow.db`` with artifacts in ``<data dir>/mlruns``.
        data_dir: the data directory the defaults above live in; default
            $HPOSVC_DATA_DIR, else ./hposvc-data.

    >>> rec = recommend(storage="sqlite:///study.db", budget=5, store=False)  # doctest: +SKIP
    >>> rec.table[["optimizer", "score", "ci_low", "ci_high", "p_best"]]      # doctest: +SKIP
    """
    check_args(budget=budget, by=by, reference=reference, n_bootstrap=n_bootstrap, seed=seed, min_trials=min_trials)
    opened = open_storage(storage, data_dir=data_dir)  # cached per URL: not closed here
    t0 = time.perf_counter()
    df = collect_trials(opened, studies=studies, tasks=tasks)
    load_s = time.perf_counter() - t0
    rec = recommend_from_frame(
        df, budget=budget, by=by, kind=kind, reference=reference, n_bootstrap=n_bootstrap, seed=seed, min_trials=min_trials
    )
    rec = with_updates(rec, studies=list(df.attrs.get("studies", rec.studies)), timings={"load_s": load_s, **rec.timings})
    if store:
        # SQL is the record of truth, so it is written first; the MLflow run is a view
        # of it and gets the row id as a tag, the row the run id afterwards.
        t1 = time.perf_counter()
        rec = with_updates(rec, id=save_recommendation(opened, rec))
        t2 = time.perf_counter()
        rec = with_updates(rec, mlflow_run_id=log_recommendation(rec, tracking_uri, data_dir=data_dir))
        t3 = time.perf_counter()
        set_mlflow_run_id(opened, rec.id, rec.mlflow_run_id)
        rec = with_updates(
            rec, timings={**rec.timings, "store_s": t2 - t1 + time.perf_counter() - t3, "track_s": t3 - t2}
        )
    return rec
