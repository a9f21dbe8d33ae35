"""From a frame of finished trials to a :class:`Recommendation`.

The steps, per task w (a workload plus its fixed settings) and optimizer s:

1. anchors per task: 0 = a fixed floor (the ``floor`` column, e.g. chance level; or
   the reference optimizer at its defaults), 1 = the best result known on the task;
   the task's seed noise from configurations that ran more than once;
2. budget score: the expected best of ``budget`` random-search trials of s on w
   (k ≤ N only), on the anchored scale; runs marked ``at_defaults`` are kept apart and
   reported as the one-shot default point;
3. the complete task × optimizer block: only optimizers measured on every task of it
   are ranked; the others are reported separately;
4. ranks with ties inside the seed noise, and a Friedman test on the block;
5. a two-level bootstrap (tasks, then trials) and a step-down test of the top
   optimizer against every other (its last step: the interval of top − runner-up):
   ``best`` only when all of them reject, else ``tied`` and "No detectable difference
   among …"; Holm-corrected Wilcoxon tests against the top follow Friedman;
6. performance profiles on epochs to a per-task target, where per-epoch data exists;
7. recommended numbers: the lr (and β/μ where searched) cell of a shared grid that is
   best on average across tasks, with its leave-one-task-out regret;
8. optionally the same ranking within each norm type or activation family;
9. a decision per kind of model (mlp, linear, cnn, resnet, transformer): the same
   statistics on each kind's tasks, and whether the kinds disagree.

Each step is a function of a screen or less; :func:`recommend_from_frame` calls them in
this order and :func:`_analyse` runs steps 2–6 on one frame.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hposvc.config import ONE_SHOT_DEFAULTS, OPTIMIZER_PARAMS, OPTIMIZERS, TrialConfig
from hposvc.errors import HposvcError, invalid
from hposvc.recommendation import _stats

__all__ = ["ACTIVATION_FAMILIES", "BY_CHOICES", "DEFAULT_BUDGET", "MIN_KIND_TASKS", "Recommendation", "recommend_from_frame"]

# Budget used when none is given: a light tuning run. Lowered to half the fewest trials
# an optimizer has on a task of the complete block: the best of k of N trials is an
# average over many subsets only when k is well below N (at k = N it is the single
# observed maximum, whose bootstrap is degenerate), and k > N is never estimated.
DEFAULT_BUDGET = 10
# Epochs-to-target: a task's target is this far from its floor to its best known result.
TARGET_FRACTION = 0.9
# Hyper-parameters searched on a shared grid for the recommended numbers; lr on log10,
# the decays on log10(1 − x), both in half-decades unless the runs share a finer grid.
GRID_PARAMS = ("lr", "momentum", "beta1", "beta2", "rho")
HALF_DECADES = 2  # grid points per decade when the runs share no grid
# Hyper-parameters whose typical value is taken in log space (searched on a log scale).
LOG_PARAMS = ("lr", "eps")
# Decay rates close to 1 are rounded on 1 − x, to 2 significant digits (0.99937 becomes
# 0.9994 and 0.9011 becomes 0.901, never 1.0); everything else to 3 significant digits.
DECAY_PARAMS = ("momentum", "beta1", "beta2", "rho")
SIGNIFICANT_DIGITS = 3
DECAY_DIGITS = 2
# Keys of Recommendation.numbers[opt] that describe the numbers rather than being one.
NUMBER_META = ("grid", "grid_tasks", "grid_score", "loto_regret")
# Activation families for `by="activation"`: pooling similar activations keeps enough
# trials per context to rank optimizers at all.
ACTIVATION_FAMILIES: dict[str, str] = {
    "relu": "relu-like",
    "leaky_relu": "relu-like",
    "prelu": "relu-like",
    "gelu": "smooth",
    "mish": "smooth",
    "sigmoid": "saturating",
    "tanh": "saturating",
    "softsign": "saturating",
}
BY_CHOICES = ("norm", "activation")
# Grid on which profiles are kept in the result (the plots use a finer one).
PROFILE_TAUS = np.round(np.linspace(1.0, _stats.R_MAX, 61), 6)

# Table statuses: ranked on the complete block; measured but not on all of its tasks;
# enough trials but no second optimizer to rank against; too few trials anywhere.
OK, INCOMPLETE, NO_COMPARISON, INSUFFICIENT = "ok", "incomplete", "no comparison", "insufficient data"
# A decision for one kind of model needs this many of its tasks: with one, it would be a
# statement about that task (its bootstrap over tasks cannot vary), not about the kind.
MIN_KIND_TASKS = 2
TOO_FEW_TASKS = "too few tasks"  # a kind's status when it has fewer than MIN_KIND_TASKS

TABLE_COLUMNS = (
    "optimizer",
    "status",
    "score",
    "ci_low",
    "ci_high",
    "p_best",
    "diff_to_top",
    "diff_low",
    "diff_high",
    "p_adj",
    "p_wilcoxon_holm",
    "tied",
    "rank",
    "profile_area",
    "default_score",
    "partial_score",
    "n_tasks",
    "n_trials",
    "insufficient_tasks",
)
NUMBER_COLUMNS = (*OPTIMIZER_PARAMS, "schedule", "warmup")


@dataclass(frozen=True, eq=False)
class Recommendation:
    """Which optimizer to use by default, with which numbers, and how sure that is.

    ``best`` names an optimizer only when the data can tell it apart from every other
    ranked one; otherwise it is None and ``tied`` lists the optimizers that cannot be
    told apart from the top ("No detectable difference among …" in ``summary``).

    ``table`` has one row per optimizer, the ranked ones first (best first): status
    ("ok" = ranked on the complete block of tasks, "incomplete" = measured on only some
    of them, reported with ``partial_score`` over its own tasks but never ranked, "no
    comparison", "insufficient data"); score (mean anchored expected best at the budget
    over the block's tasks; 0 = the task's floor, 1 = its best known result) with its
    bootstrap interval (ci_low, ci_high) and p_best; the top minus this optimizer
    (diff_to_top) with the interval that decides it (diff_low, diff_high) and the
    step-down adjusted p (p_adj) of the bootstrap comparison, and ``tied`` (p_adj > α);
    the Holm-corrected Wilcoxon test against the top over tasks (p_wilcoxon_holm); rank (average over tasks, ties within seed noise);
    profile_area (epochs to target, where per-epoch data exists); default_score (the
    one-shot defaults' mean over seeds, same scale, where default runs exist); n_tasks,
    n_trials, insufficient_tasks; and the recommended numbers (lr, momentum, …, schedule).
    """

    best: str | None  # None unless the top is detectably better than every other ranked one
    config: TrialConfig | None  # the best optimizer with its recommended numbers
    numbers: dict[str, dict[str, Any]]  # optimizer -> recommended hyper-parameters (+ grid, loto_regret)
    budget: int  # number of random trials the scores assume (≤ the trials of every ranked cell)
    table: pd.DataFrame
    budget_curves: pd.DataFrame  # long form: task, optimizer, metric, direction, n, expected_best (n ≤ N)
    task_scores: pd.DataFrame  # long form: one row per task and optimizer
    profiles: pd.DataFrame  # long form: optimizer, tau, rho (empty without per-epoch data)
    bootstrap_scores: pd.DataFrame  # resample × optimizer aggregate scores (ranked optimizers)
    friedman: dict[str, Any]  # statistic, p, n_tasks, optimizers, reason
    by: pd.DataFrame  # context tables in long form (empty when by is None)
    by_key: str | None  # "norm" | "activation" | None
    summary: str  # the one-line recommendation
    settings: dict[str, Any]  # the arguments it was computed with
    tied: list[str] = field(default_factory=list)  # indistinguishable from the top (top first); [] when best is set
    decision: dict[str, Any] = field(default_factory=dict)  # top, runner_up, difference and interval, alpha, n_tasks
    defaults: pd.DataFrame = field(default_factory=pd.DataFrame)  # one-shot default runs: task, optimizer, n_runs, mean, sd, score
    anchors: pd.DataFrame = field(default_factory=pd.DataFrame)  # per task: metric, floor, best, floor_source, noise, target
    studies: list[str] = field(default_factory=list)  # studies the trials came from
    n_trials: int = 0  # finished trials used
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load_s, compute_s, store_s
    id: int | None = None  # row id in hposvc_recommendations once stored
    mlflow_run_id: str | None = None  # the MLflow run it was logged to
    kind: str | None = None  # the kind of model it was computed for (None: every task)
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> its decision object (see _kind_decision)

    @property
    def insufficient(self) -> pd.DataFrame:
        """Task/optimizer pairs with fewer than ``max(min_trials, budget)`` search trials."""
        ts = self.task_scores
        return ts.loc[ts["status"] == INSUFFICIENT, ["task", "optimizer", "n_trials"]].reset_index(drop=True)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-safe Python (NaN becomes None).

        >>> json.dumps(rec.to_dict())  # doctest: +SKIP
        """
        curves = []
        if not self.budget_curves.empty:
            keys = ["task", "optimizer", "metric", "direction"]
            for (task, opt, metric, direction), g in self.budget_curves.groupby(keys, sort=False):
                curves.append(
                    {
                        "task": task,
                        "optimizer": opt,
                        "metric": metric,
                        "direction": direction,
                        "expected_best": g["expected_best"].tolist(),
                    }
                )
        out = {
            "schema": 2,  # 2: anchored scores, complete-block ranking, best/tied decision
            "best": self.best,
            "tied": list(self.tied),
            "summary": self.summary,
            "budget": self.budget,
            "decision": self.decision,
            "config": self.config.to_dict() if self.config is not None else None,
            "numbers": self.numbers,
            "table": _records(self.table),
            "friedman": self.friedman,
            "by_key": self.by_key,
            "by": _records(self.by),
            "task_scores": _records(self.task_scores),
            "defaults": _records(self.defaults),
            "anchors": _records(self.anchors),
            "profiles": _records(self.profiles),
            "budget_curves": curves,  # expected_best[k] is for n = k + 1
            "settings": self.settings,
            "studies": list(self.studies),
            "n_trials": self.n_trials,
            "created_at": self.created_at.isoformat(),
            "timings": self.timings,
            "id": self.id,
            "mlflow_run_id": self.mlflow_run_id,
            "kind": self.kind,
            "kinds": self.kinds,
        }
        return _json_safe(out)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (pd.Timestamp, dt.datetime)):
        return x.isoformat()
    if x is pd.NA or x is pd.NaT:
        return None
    return x


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return _json_safe(df.astype(object).where(df.notna(), None).to_dict("records"))


# -- argument checks ------------------------------------------------------------------


def check_args(
    *,
    budget: int | None,
    by: str | None,
    reference: str | None,
    n_bootstrap: int,
    seed: int,
    min_trials: int,
) -> None:
    """Validate the arguments shared by recommend() and recommend_from_frame()."""
    src = "recommend()"
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1):
        raise invalid("budget", budget, "an integer >= 1 (the number of random trials to tune with)", source=src)
    if by is not None and by not in BY_CHOICES:
        raise invalid("by", by, BY_CHOICES, source=src)
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise invalid("reference", reference, "an optimizer name", source=src)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise invalid("n_bootstrap", n_bootstrap, "an integer >= 0 (0 skips the confidence intervals)", source=src)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise invalid("seed", seed, "an integer", source=src)
    if isinstance(min_trials, bool) or not isinstance(min_trials, (int, np.integer)) or min_trials < 1:
        raise invalid("min_trials", min_trials, "an integer >= 1", source=src)


# -- preparing the frame --------------------------------------------------------------


def _prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Columns task/optimizer/score/cost/metric/sign/unit/at_defaults, non-finite scores replaced."""
    if not isinstance(df, pd.DataFrame):
        raise invalid("df", type(df).__name__, "a pandas DataFrame such as collect_trials() returns")
    missing = [c for c in ("task", "optimizer") if c not in df.columns]
    if "score" not in df.columns and "value" not in df.columns:
        missing.append("score (or value)")
    if missing:
        raise invalid("df", f"a frame with columns {list(df.columns)}", f"a frame with columns {missing}")
    f = df.copy()
    # pandas deep-copies attrs on every operation; the bookkeeping in them is not needed here.
    f.attrs = {}
    f = f[f["optimizer"].notna()]
    if "direction" not in f.columns:
        f["direction"] = "maximize"
    if "score" not in f.columns:
        value = f["value"].astype(float)
        maximize = f["direction"].eq("maximize")
        f["score"] = np.where(maximize, value, -value)
        f["cost"] = np.where(maximize, 1.0 - value, value)
    if "cost" not in f.columns:
        # Without an explicit cost, treat scores as accuracy-like.
        f["cost"] = 1.0 - f["score"].astype(float)
    if "metric" not in f.columns:
        f["metric"] = "score"
    f["score"] = f["score"].astype(float)
    f["cost"] = f["cost"].astype(float)
    f["task"] = f["task"].astype(str)
    f["optimizer"] = f["optimizer"].astype(str)
    # Runs of the optimizer's one-shot defaults (the survey marks them): the default
    # point, kept out of the random-search pool the budget curves are drawn from.
    f["at_defaults"] = f["at_defaults"].fillna(False).astype(bool) if "at_defaults" in f.columns else False
    # +1: the metric is the score (accuracy-like); −1: the metric is minus the score (loss).
    f["sign"] = np.where(f["direction"].eq("minimize"), -1.0, 1.0)
    # Studies of one task that optimise different metrics cannot be pooled.
    n_metrics = f.groupby("task")["metric"].transform("nunique")
    f["unit"] = np.where(n_metrics > 1, f["task"] + " [" + f["metric"].astype(str) + "]", f["task"])
    # A trial without a finite value (pruned before its first report, diverged) counts as
    # the worst value seen on its task: it cost a trial and produced nothing better.
    finite = np.isfinite(f["score"])
    if not finite.all():
        worst = f["score"].where(finite).groupby(f["unit"]).transform("min")
        offset = (f["cost"] + f["score"]).where(finite).groupby(f["unit"]).transform("median")
        f["score"] = f["score"].where(finite, worst)
        f["cost"] = f["cost"].where(finite, offset - worst)
        f = f[np.isfinite(f["score"])]
    return f


def _optimizer_order(names: Sequence[str]) -> list[str]:
    known = [o for o in OPTIMIZERS if o in names]
    return known + sorted(set(names) - set(known))


def _search_scores(f: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """(unit, optimizer) -> the sorted scores of its random-search trials."""
    search = f[~f["at_defaults"]]
    return {
        (str(u), str(o)): np.sort(g.to_numpy(dtype=float))
        for (u, o), g in search.groupby(["unit", "optimizer"], sort=False)["score"]
    }


def _budget_score(v: np.ndarray, budget: int) -> float:
    return float(_stats.expected_max_weights(v.size, budget) @ v)


# -- 1) anchors --------------------------------------------------------------------------------


def _anchors(
    f: pd.DataFrame, search: dict[tuple[str, str], np.ndarray], *, reference: str | None, budget: int, need: int
) -> pd.DataFrame:
    """Per unit (score units): floor, best, floor_source, noise, target, usable.

    Floor, in order: the reference optimizer's default runs, else its budget score
    (``reference`` given); the frame's ``floor`` column (metric units, e.g. chance level
    1/n_classes); else the median of the task's search trials. Best: the best score of
    any run on the task. Noise: the pooled standard deviation over seeds of
    configurations that ran more than once (nan when none did).
    """
    rows = []
    config_cols = [c for c in (*NUMBER_COLUMNS, "init", "norm", "activation", "batch_size", "epochs", "depth", "width") if c in f.columns]
    for unit, g in f.groupby("unit", sort=True):
        sign = float(g["sign"].iloc[0])
        floor, source = math.nan, ""
        if reference is not None:
            ref_defaults = g.loc[g["at_defaults"] & (g["optimizer"] == reference), "score"]
            ref_search = search.get((str(unit), reference))
            if len(ref_defaults):
                floor, source = float(ref_defaults.mean()), f"{reference} at defaults"
            elif ref_search is not None and ref_search.size >= need:
                floor, source = _budget_score(ref_search, budget), f"{reference} at budget"
        if not math.isfinite(floor) and "floor" in g.columns:
            given = pd.to_numeric(g["floor"], errors="coerce").dropna()
            if len(given):
                floor, source = sign * float(given.iloc[0]), "given"
        if not math.isfinite(floor):
            search = g.loc[~g["at_defaults"], "score"]
            floor, source = float((search if len(search) else g["score"]).median()), "median trial"
        best = float(g["score"].max())
        replicates = g.groupby(["optimizer", *config_cols], dropna=False, sort=False)["score"]
        noise = _stats.pooled_sd([v.to_numpy(dtype=float) for _, v in replicates]) if config_cols else math.nan
        spread = best - floor
        rows.append(
            {
                "unit": str(unit),
                "metric": str(g["metric"].iloc[0]),
                "sign": sign,
                "floor": floor,
                "best": best,
                "floor_source": source,
                "noise": noise,
                "target": floor + TARGET_FRACTION * spread,
                "usable": bool(spread > 1e-12 * max(abs(best), 1.0)),
            }
        )
    return pd.DataFrame(rows).set_index("unit") if rows else pd.DataFrame(
        columns=["metric", "sign", "floor", "best", "floor_source", "noise", "target", "usable"]
    )


def _anchors_public(anchors: pd.DataFrame) -> pd.DataFrame:
    """The anchors in metric units, as users read them."""
    if anchors.empty:
        return pd.DataFrame(columns=["task", "metric", "floor", "best", "floor_source", "noise", "target", "usable"])
    a = anchors.reset_index().rename(columns={"unit": "task"})
    for c in ("floor", "best", "target"):
        a[c] = a[c] * a["sign"]
    return a.drop(columns="sign")


# -- 2–6) one analysis over one frame ----------------------------------------------------------


@dataclass(frozen=True)
class _Analysis:
    table: pd.DataFrame
    task_scores: pd.DataFrame
    costs: pd.DataFrame  # block tasks × ranked optimizers: epochs to target (empty without curves)
    boot: pd.DataFrame  # n_bootstrap × ranked optimizers
    friedman: dict[str, Any]
    ranked: list[str]
    tasks: list[str]  # the complete block's tasks
    tied: list[str]
    best: str | None
    decision: dict[str, Any]


@dataclass(frozen=True)
class _Scores:
    """Step 2 on the anchored scale: units × optimizers."""

    units: list[str]
    usable: set[str]  # units whose runs did not all score the same
    counts: pd.DataFrame  # search trials per cell
    expected: pd.DataFrame  # expected best of ``budget`` search trials (score units; nan: too few)
    anchored: pd.DataFrame  # the same on the task's scale (0 = floor, 1 = best known)


@dataclass(frozen=True)
class _Tests:
    """Steps 4–5 on the complete block."""

    ranks: pd.DataFrame  # block tasks × ranked optimizers, ties within seed noise
    friedman: dict[str, Any]
    boot: np.ndarray  # n_bootstrap × ranked optimizers
    p_best: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    cmp: _stats.Comparison | None
    wilcoxon: pd.Series


def _analyse(
    f: pd.DataFrame,
    *,
    optimizers: list[str],
    anchors: pd.DataFrame,
    budget: int,
    need: int,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> _Analysis:
    """Steps 2–6 on the trials of ``f``, each task on its own ``anchors``."""
    search = _search_scores(f)
    scores = _budget_scores(search, f, optimizers, anchors, budget, need)
    tasks, ranked = _stats.complete_matrix(scores.expected.notna())
    if len(ranked) < 2:
        tasks, ranked = [], []
    block = scores.anchored.loc[tasks, ranked]
    agg = block.mean(axis=0) if ranked else pd.Series(dtype=float)
    tests = _tests(block, agg, search, anchors, budget, n_bootstrap, rng)
    costs = _epochs_to_target(f, anchors, tasks, ranked, budget) if ranked else pd.DataFrame()
    table = _optimizer_table(optimizers, scores, tasks, ranked, agg, tests, costs, need)
    task_scores = _task_scores(scores, anchors, optimizers, tasks, ranked, tests, costs, need)
    best, tied, decision = _decide(tests, agg, ranked, tasks, n_bootstrap)
    return _Analysis(
        table=table,
        task_scores=task_scores,
        costs=costs,
        boot=pd.DataFrame(tests.boot, columns=ranked),
        friedman=tests.friedman,
        ranked=ranked,
        tasks=tasks,
        tied=tied,
        best=best,
        decision=decision,
    )


def _budget_scores(
    search: dict[tuple[str, str], np.ndarray], f: pd.DataFrame, optimizers: list[str], anchors: pd.DataFrame, budget: int, need: int
) -> _Scores:
    """Step 2: the expected best of ``budget`` search trials per cell with at least
    ``need`` of them, on the task's anchored scale."""
    units = [u for u in anchors.index if u in set(f["unit"])]
    usable = {u for u in units if anchors.at[u, "usable"]}
    counts = pd.DataFrame(0, index=units, columns=optimizers, dtype=int)
    expected = pd.DataFrame(np.nan, index=units, columns=optimizers)
    for (u, o), v in search.items():
        if u not in counts.index:
            continue
        counts.at[u, o] = v.size
        if v.size >= need and u in usable:
            expected.at[u, o] = _budget_score(v, budget)
    with np.errstate(invalid="ignore", divide="ignore"):
        on_scale = _stats.anchored(expected.to_numpy(), _col(anchors, units, "floor"), _col(anchors, units, "best"))
    return _Scores(units, usable, counts, expected, pd.DataFrame(on_scale, index=units, columns=optimizers))


def _col(anchors: pd.DataFrame, units: list[str], name: str) -> np.ndarray:
    return anchors.loc[units, name].to_numpy(dtype=float) if units else np.zeros(0)


def _tests(
    block: pd.DataFrame,
    agg: pd.Series,
    search: dict[tuple[str, str], np.ndarray],
    anchors: pd.DataFrame,
    budget: int,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> _Tests:
    """Steps 4–5: ranks with ties inside the seed noise and Friedman; the two-level
    bootstrap (tasks, then trials), P(best), intervals and the step-down comparison with
    the top; Holm-corrected Wilcoxon tests against the top."""
    tasks, ranked = list(block.index), list(block.columns)
    spread = _col(anchors, tasks, "best") - _col(anchors, tasks, "floor")
    noise = _col(anchors, tasks, "noise") / spread if tasks else np.zeros(0)
    ranks = pd.DataFrame(_stats.noise_ranks(block.to_numpy(), noise), index=tasks, columns=ranked)
    boot = _stats.hierarchical_bootstrap(
        [[search[(t, o)] for o in ranked] for t in tasks],
        _col(anchors, tasks, "floor"),
        _col(anchors, tasks, "best"),
        budget,
        n_bootstrap if ranked else 0,
        rng,
    )
    S = len(ranked)
    p_best = ci_low = ci_high = np.full(S, np.nan)
    if n_bootstrap and S:
        win = boot >= boot.max(axis=1, keepdims=True) - 1e-12
        p_best = (win / win.sum(axis=1, keepdims=True)).mean(axis=0)  # ties split the win
        ci_low, ci_high = np.percentile(boot, [2.5, 97.5], axis=0)
    cmp = _stats.compare_with_top(agg.to_numpy(), boot) if S else None
    wilcoxon = _stats.wilcoxon_vs_top(block, ranked[cmp.top], noise) if cmp is not None else pd.Series(dtype=float)
    return _Tests(ranks, _stats.friedman(ranks), boot, p_best, ci_low, ci_high, cmp, wilcoxon)


def _status(ranked_here: bool, measured: bool, any_ranked: bool) -> str:
    if ranked_here:
        return OK
    if measured:
        return INCOMPLETE if any_ranked else NO_COMPARISON
    return INSUFFICIENT


def _optimizer_table(
    optimizers: list[str],
    scores: _Scores,
    tasks: list[str],
    ranked: list[str],
    agg: pd.Series,
    tests: _Tests,
    costs: pd.DataFrame,
    need: int,
) -> pd.DataFrame:
    """One row per optimizer: the ranked ones in score order, then the others."""
    sufficient = scores.expected.notna()
    area = _stats.profile_area(costs) if not costs.empty and costs.notna().any().any() else pd.Series(np.nan, index=ranked)
    rows = []
    for o in optimizers:
        j = ranked.index(o) if o in ranked else None
        status = _status(j is not None, bool(sufficient[o].any()), bool(ranked))
        own = scores.anchored.loc[sufficient[o], o]
        row = dict.fromkeys(TABLE_COLUMNS, np.nan)
        row.update(
            optimizer=o,
            status=status,
            tied=False,
            partial_score=float(own.mean()) if status == INCOMPLETE and len(own) else np.nan,
            n_tasks=len(tasks) if j is not None else int(sufficient[o].sum()),
            n_trials=int(scores.counts[o].sum()),
            insufficient_tasks=int(((scores.counts[o] > 0) & (scores.counts[o] < need)).sum()),
        )
        if j is not None:
            cmp = tests.cmp
            row.update(
                score=float(agg[o]),
                ci_low=tests.ci_low[j],
                ci_high=tests.ci_high[j],
                p_best=tests.p_best[j],
                diff_to_top=cmp.diff[j],
                diff_low=cmp.low[j],
                diff_high=cmp.high[j],
                p_adj=cmp.p_adj[j],
                p_wilcoxon_holm=tests.wilcoxon.get(o, np.nan),
                tied=bool(cmp.tied[j]),
                rank=float(tests.ranks[o].mean()),
                profile_area=float(area.get(o, np.nan)),
            )
        rows.append(row)  # default_score is filled by recommend_from_frame from the default runs
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    order = {OK: 0, INCOMPLETE: 1, NO_COMPARISON: 2, INSUFFICIENT: 3}
    table = table.assign(_g=table["status"].map(order)).sort_values(
        ["_g", "score", "partial_score"], ascending=[True, False, False], na_position="last", kind="stable"
    )
    return table.drop(columns="_g").reset_index(drop=True)


def _task_scores(
    scores: _Scores,
    anchors: pd.DataFrame,
    optimizers: list[str],
    tasks: list[str],
    ranked: list[str],
    tests: _Tests,
    costs: pd.DataFrame,
    need: int,
) -> pd.DataFrame:
    """The long per-task view, one row per measured cell (insufficient ones included)."""
    columns = ["task", "optimizer", "metric", "n_trials", "expected_best", "score", "cost", "ratio", "rank", "status"]
    ratios = _stats.profile_ratios(costs) if not costs.empty else costs
    rows = []
    for u in scores.units:
        sign = float(anchors.at[u, "sign"])
        for o in optimizers:
            n = int(scores.counts.at[u, o])
            if n == 0:
                continue
            in_block = u in tasks and o in ranked
            if in_block or n < need:
                status = OK if in_block else INSUFFICIENT
            elif u not in scores.usable:
                status = "no spread"  # every run on the task scored the same: nothing to compare
            else:
                status = INCOMPLETE if ranked else NO_COMPARISON
            rows.append(
                {
                    "task": u,
                    "optimizer": o,
                    "metric": str(anchors.at[u, "metric"]),
                    "n_trials": n,
                    "expected_best": sign * scores.expected.at[u, o],
                    "score": scores.anchored.at[u, o],
                    # a task no optimizer reached the target on has no row in costs
                    "cost": costs.at[u, o] if in_block and u in costs.index else np.nan,
                    "ratio": ratios.at[u, o] if in_block and u in ratios.index else np.nan,
                    "rank": tests.ranks.at[u, o] if in_block else np.nan,
                    "status": status,
                }
            )
    return pd.DataFrame(rows, columns=columns)


def _decide(tests: _Tests, agg: pd.Series, ranked: list[str], tasks: list[str], n_bootstrap: int) -> tuple[str | None, list[str], dict[str, Any]]:
    """``best`` (only when the top is told apart from every other one), ``tied`` (the
    top group, top first; empty when best is set) and the decision object."""
    cmp = tests.cmp
    decision: dict[str, Any] = {"alpha": _stats.ALPHA, "n_tasks": len(tasks), "tasks": tasks, "n_bootstrap": int(n_bootstrap)}
    if cmp is None:
        return None, [], decision
    tied = [ranked[j] for j in np.argsort(-agg.to_numpy(), kind="stable") if cmp.tied[j]]
    best = ranked[cmp.best] if cmp.best is not None and n_bootstrap else None
    ru = cmp.runner_up
    decision.update(
        top=ranked[cmp.top],
        runner_up=ranked[ru] if ru is not None else None,
        difference=float(cmp.diff[ru]) if ru is not None else None,
        low=float(cmp.low[ru]) if ru is not None else None,
        high=float(cmp.high[ru]) if ru is not None else None,
        p_adj=float(cmp.p_adj[ru]) if ru is not None else None,
    )
    return best, ([] if best is not None else tied), decision


def _epochs_to_target(f: pd.DataFrame, anchors: pd.DataFrame, tasks: list[str], ranked: list[str], budget: int) -> pd.DataFrame:
    """Block tasks × ranked optimizers: the median, over budget-sized random searches, of
    the epochs the fastest trial needs to reach the task's target (inf: not reached).
    Empty when the frame has no per-epoch ``curve`` column; NaN for a cell with a trial
    that has no curve."""
    if "curve" not in f.columns or not f["curve"].map(_has_curve).any():
        return pd.DataFrame()
    search = f[~f["at_defaults"] & f["unit"].isin(tasks) & f["optimizer"].isin(ranked)]
    out = pd.DataFrame(np.nan, index=tasks, columns=ranked)
    for (u, o), g in search.groupby(["unit", "optimizer"], sort=False):
        if not g["curve"].map(_has_curve).all():
            continue
        sign, target = float(anchors.at[u, "sign"]), float(anchors.at[u, "target"])
        times = [_stats.epochs_to_target(sign * np.asarray(c, dtype=float), target) for c in g["curve"]]
        out.at[u, o] = _stats.median_best_time(times, budget)
    # A task on which no optimizer reaches the target says nothing about speed.
    return out[~np.isinf(out).all(axis=1)]


def _has_curve(c: Any) -> bool:
    return isinstance(c, (list, tuple, np.ndarray)) and len(c) > 0


def _defaults(f: pd.DataFrame, anchors: pd.DataFrame) -> pd.DataFrame:
    """One row per task and optimizer with runs at the one-shot defaults (over seeds)."""
    columns = ["task", "optimizer", "metric", "n_runs", "mean", "sd", "score"]
    d = f[f["at_defaults"]]
    if d.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (u, o), g in d.groupby(["unit", "optimizer"], sort=True):
        a = anchors.loc[u]
        mean = float(g["score"].mean())
        rows.append(
            {
                "task": u,
                "optimizer": o,
                "metric": str(a["metric"]),
                "n_runs": len(g),
                "mean": float(a["sign"]) * mean,
                "sd": float(g["score"].std(ddof=1)) if len(g) > 1 else np.nan,
                "score": float(_stats.anchored(np.array([mean]), a["floor"], a["best"])[0]) if a["usable"] else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=columns)


# -- 7) recommended numbers ----------------------------------------------------------------------


def _round(name: str, x: float) -> float:
    if not math.isfinite(x) or x == 0:
        return float(x)
    if name in DECAY_PARAMS and 0 < x < 1:
        return float(f"{1.0 - float(f'{1.0 - x:.{DECAY_DIGITS}g}'):.12g}")
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def _grid_key(g: pd.DataFrame, p: str) -> tuple[pd.Series, str]:
    """Grid cell of each run for hyper-parameter ``p``, and how the grid was made.

    The runs' own values when every task ran the same set of them (a shared grid, e.g.
    the survey's lr sweep); otherwise half-decades: round(2·log10 lr), or
    round(2·log10(1 − x)) for a decay."""
    x = pd.to_numeric(g[p], errors="coerce")
    exact = x.map(lambda v: float(f"{v:.10g}") if math.isfinite(v) else math.nan)
    per_task = [frozenset(v.dropna()) for _, v in exact.groupby(g["unit"])]
    shared = len(set(per_task)) == 1 and len(per_task[0]) > 1 and (len(per_task) > 1 or exact.duplicated().any())
    if shared:
        return exact, f"{p}: the runs' shared grid"
    t = x if p not in DECAY_PARAMS else 1.0 - x
    if not (t > 0).all():
        return exact, f"{p}: the runs' values"
    return np.round(HALF_DECADES * np.log10(t)), f"{p}: half-decades"


def _grid_value(p: str, key: float, how: str, run: pd.Series) -> float:
    """The recommended value of ``p`` for a grid cell: the grid point, inside the range of
    the runs that fell in the cell (never a value outside what was run)."""
    x = key if not how.endswith("half-decades") else (
        10 ** (key / HALF_DECADES) if p not in DECAY_PARAMS else 1.0 - 10 ** (key / HALF_DECADES)
    )
    lo, hi = float(run.min()), float(run.max())
    return min(max(_round(p, float(x)), lo), hi)


def _numbers(f: pd.DataFrame, optimizers: list[str], anchors: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per optimizer: the grid cell of lr (and β/μ where searched) that is best on average
    over the tasks, each run scored on its task's anchored scale.

    Why a shared grid and not per-hyper-parameter medians of good trials: medians of
    several numbers may never have been run together, and a cell's average over tasks is
    a configuration that was. The cell must be measured on every task the optimizer ran
    on (else: lr alone; else the cells measured on most tasks). ``loto_regret`` is the
    mean over tasks of what choosing the cell from the *other* tasks loses on the held-out
    one (anchored units; nan with one task). Numbers not on the grid are the median of the
    winning cell's runs (constant when not searched); the schedule is the most common one.
    """
    out: dict[str, dict[str, Any]] = {opt: {} for opt in optimizers}
    usable = anchors.index[anchors["usable"].astype(bool)] if not anchors.empty else []
    f = f[f["unit"].isin(usable)]
    if f.empty:
        return out
    a = anchors.loc[f["unit"]]
    f = f.assign(_norm=_stats.anchored(f["score"].to_numpy(), a["floor"].to_numpy(), a["best"].to_numpy()))
    for opt, g in f.groupby("optimizer", sort=False):
        search = g[~g["at_defaults"]]
        out[str(opt)] = _numbers_of(str(opt), search if len(search) else g)
    return out


def _numbers_of(opt: str, g: pd.DataFrame) -> dict[str, Any]:
    """One optimizer's numbers from its runs ``g`` (each with its anchored ``_norm``)."""
    params = [p for p in ONE_SHOT_DEFAULTS.get(opt, dict.fromkeys(OPTIMIZER_PARAMS)) if p in g.columns]
    searched = [p for p in GRID_PARAMS if p in params and pd.to_numeric(g[p], errors="coerce").nunique() > 1]
    keys = {p: _grid_key(g, p) for p in searched}
    chosen, M, cell = [], None, None
    for dims in (searched, searched[:1]):
        if not dims:
            break
        K = pd.DataFrame({p: keys[p][0] for p in dims}, index=g.index)
        cell = pd.Series(["|".join(map(repr, row)) for row in K.to_numpy(dtype=float).tolist()], index=g.index)
        M = g.assign(_cell=cell).pivot_table(index="unit", columns="_cell", values="_norm", aggfunc="mean")
        chosen = dims
        if M.notna().all(axis=0).any():
            break
    numbers: dict[str, Any] = {}
    if M is not None and chosen:
        coverage = M.notna().sum(axis=0)
        cols = coverage.index[coverage == coverage.max()]
        cell_means = M[cols].mean(axis=0)
        win = cell_means.idxmax()
        runs = g[(cell == win).to_numpy()]
        for p in chosen:
            numbers[p] = _grid_value(p, float(keys[p][0].loc[runs.index[0]]), keys[p][1], pd.to_numeric(runs[p], errors="coerce"))
        meta = {
            "grid": "; ".join(keys[p][1] for p in chosen),
            "grid_tasks": int(coverage.max()),
            "grid_score": float(cell_means.max()),  # the chosen cell's mean anchored score over the tasks
            "loto_regret": _loto_regret(M, cols) if coverage.max() == len(M) else math.nan,
        }
    else:
        runs = g
        meta = {"grid": "nothing searched", "grid_tasks": int(g["unit"].nunique()), "grid_score": float(g.groupby("unit")["_norm"].mean().mean()), "loto_regret": math.nan}
    numbers.update(_other_numbers(runs, params, numbers))
    return {**numbers, **meta}


def _loto_regret(M: pd.DataFrame, cols: pd.Index) -> float:
    """Mean over tasks of what choosing the cell from the other tasks loses on this one."""
    if len(M) < 2:
        return math.nan
    regrets = []
    for w in M.index:
        pick = M.drop(index=w)[cols].mean(axis=0).idxmax()
        regrets.append(float(M.loc[w, cols].max() - M.at[w, pick]))
    return float(np.mean(regrets))


def _other_numbers(runs: pd.DataFrame, params: list[str], chosen: dict[str, Any]) -> dict[str, Any]:
    """Numbers off the grid: the winning cell's median (geometric for log-scale ones), and
    its most common schedule (with the median warm-up)."""
    out: dict[str, Any] = {}
    for p in params:
        if p in chosen:
            continue
        vals = pd.to_numeric(runs[p], errors="coerce").dropna().to_numpy(dtype=float)
        if vals.size == 0:
            continue
        med = float(np.exp(np.median(np.log(vals)))) if p in LOG_PARAMS and (vals > 0).all() else float(np.median(vals))
        out[p] = _round(p, med)
    if "schedule" in runs.columns and runs["schedule"].notna().any():
        counts = runs["schedule"].dropna().value_counts()
        schedule = str(sorted(counts[counts == counts.max()].index)[0])
        out["schedule"] = schedule
        if schedule == "warmup_cosine" and "warmup" in runs.columns:
            w = pd.to_numeric(runs.loc[runs["schedule"] == schedule, "warmup"], errors="coerce").dropna()
            if len(w):
                out["warmup"] = _round("warmup", float(np.median(w)))
    return out


def _top_quartile(f: pd.DataFrame, min_trials: int) -> pd.DataFrame:
    """The best quarter (at least one) of each task/optimizer group with enough trials."""
    grouped = f.groupby(["unit", "optimizer"], sort=False)["score"]
    size = grouped.transform("size")
    place = grouped.rank(ascending=False, method="first")
    return f[(size >= min_trials) & (place <= np.maximum(1, np.ceil(size / 4)))]


def top_trials(df: pd.DataFrame, *, min_trials: int = 3) -> pd.DataFrame:
    """Per task and optimizer with at least ``min_trials`` trials, the best quarter (at
    least one): where warm start looks for the values of fields it does not rank."""
    return _top_quartile(_prepare(df), min_trials)


def _config(best: str | None, numbers: dict[str, dict[str, Any]]) -> TrialConfig | None:
    if best is None or best not in ONE_SHOT_DEFAULTS:
        return None
    kwargs = {k: v for k, v in numbers.get(best, {}).items() if k in (*OPTIMIZER_PARAMS, "schedule", "warmup")}
    try:
        return TrialConfig(optimizer=best, **kwargs)
    except HposvcError:
        # A number outside TrialConfig's range (e.g. a decay rounded to 1) leaves the
        # numbers in the table but no ready-made config.
        return None


# -- text ---------------------------------------------------------------------------------


def _fmt_number(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _fmt_numbers(numbers: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt_number(v)}" for k, v in numbers.items() if k not in NUMBER_META)


def _context_label(by_key: str, value: str) -> str:
    if by_key == "norm":
        return "without norm" if value == "none" else f"with {value} norm"
    return f"with {value} activations"


def _context_verdict(best: str | None, tied: list[str]) -> str:
    if best is not None:
        return best
    if tied:
        return "no detectable difference among " + ", ".join(tied)
    return "insufficient data"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _gap(d: dict[str, Any]) -> str | None:
    """"0.12 [0.03, 0.20]": the decision's top − runner-up with its interval."""
    if d.get("runner_up") is None or d.get("low") is None or not math.isfinite(d["low"]):
        return None
    return f"{d['difference']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"


def _no_ranking(table: pd.DataFrame, budget: int, need: int) -> str:
    if table.empty:
        return "No recommendation: the selection has no finished trials."
    text = (
        f"No recommendation: insufficient data (no task has at least two optimizers with "
        f">= {need} finished random-search trials" + (", the budget" if need == budget and budget > 1 else "") + ")."
    )
    alone = table.loc[table["status"] == NO_COMPARISON, "optimizer"].tolist()
    if alone:
        text += f" Enough trials but nothing to compare with on the same task: {', '.join(alone)}."
    return text


def _verdict(main: _Analysis, table: pd.DataFrame, numbers: dict[str, dict[str, Any]], budget: int, scale: str, n_bootstrap: int) -> str:
    """The decision sentence: "Use X …" or "No detectable difference among …"."""
    d, rows = main.decision, table.set_index("optimizer")
    top, ru, gap = d["top"], d.get("runner_up"), _gap(main.decision)
    row = rows.loc[top]
    trials, tasks = _plural(budget, "trial"), _plural(len(main.tasks), "task")
    if main.best is not None:
        ci = f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if math.isfinite(row["ci_low"]) else ""
        return (
            f"Use {top} by default ({_fmt_numbers(numbers.get(top, {}))}): at a budget of {trials} its anchored "
            f"score is {row['score']:.2f}{ci} ({scale}) over {tasks}, ahead of the runner-up {ru} by {gap}, "
            f"P(best) = {row['p_best']:.2f}"
        )
    text = f"No detectable difference among {', '.join(main.tied)} at a budget of {trials} over {tasks}"
    if n_bootstrap == 0:
        text += " (n_bootstrap=0: no intervals, so no optimizer can be told apart)"
    elif gap is not None:
        text += f": the top, {top} ({row['score']:.2f}; {scale}), minus the runner-up, {ru}, is {gap}"
    behind = [o for o in main.ranked if o not in main.tied]
    if behind:
        text += f"; detectably behind: {', '.join(o for o in table['optimizer'] if o in behind)}"
    return text + f"; {top}'s numbers: {_fmt_numbers(numbers.get(top, {}))}"


def _summary(
    main: _Analysis,
    table: pd.DataFrame,
    numbers: dict[str, dict[str, Any]],
    *,
    budget: int,
    need: int,
    reference: str | None,
    n_bootstrap: int,
    contexts: list[tuple[str, str]],
    by_key: str | None,
    kinds: dict[str, dict[str, Any]],
    kind: str | None,
) -> str:
    """The one-paragraph recommendation: the verdict, then what qualifies it."""
    if kind is not None and kinds.get(kind, {}).get("status") == TOO_FEW_TASKS:
        return kinds[kind]["summary"]
    if not main.ranked:
        return _no_ranking(table, budget, need)
    scale = f"relative to {reference}: 0 = {reference}, 1 = the best known result per task" if reference else "0 = the task's floor, 1 = the best known result"
    text = _verdict(main, table, numbers, budget, scale, n_bootstrap)
    if kind is not None:
        text = f"On {kind} tasks: {text[0].lower()}{text[1:]}"
    if main.friedman.get("p") is not None:
        text += f"; Friedman p = {main.friedman['p']:.3g}"
    text += "."
    defaults = table.set_index("optimizer").loc[main.ranked, "default_score"].dropna()
    if len(defaults):
        text += f" At one-shot defaults the top is {defaults.idxmax()} ({defaults.max():.2f})."
    if by_key and contexts:
        text += " " + "; ".join(f"{_context_label(by_key, v)}: {verdict}" for v, verdict in contexts) + "."
    if kinds and kind is None:
        text += " " + kinds_sentence(main.best, main.tied, main.ranked, kinds)
    incomplete = table.loc[table["status"] == INCOMPLETE]
    if len(incomplete):
        parts = [f"{r.optimizer} ({int(r.n_tasks)} of {len(main.tasks)})" for r in incomplete.itertuples()]
        text += f" Not ranked, measured on only some of the {_plural(len(main.tasks), 'task')}: {', '.join(parts)}."
    insufficient = table.loc[table["status"] == INSUFFICIENT, "optimizer"].tolist()
    if insufficient:
        text += f" Insufficient data (< {need} trials on every task): {', '.join(insufficient)}."
    return text


# -- 9) a decision per kind of model ------------------------------------------------------------


def _select_kind(f: pd.DataFrame, kind: str | None) -> pd.DataFrame:
    """The trials of tasks of ``kind`` (all of them when None)."""
    if kind is None:
        return f
    kinds = sorted(f["kind"].dropna().astype(str).unique()) if "kind" in f.columns else []
    if kind not in kinds:
        raise invalid(
            "kind", kind, kinds or "a kind the trials record (they record none)", source="recommend()",
            hint="Kinds come from each task's model: mlp, linear (an MLP without hidden layers), cnn, resnet, transformer. CLI: --kind.",
        )
    return f[f["kind"].astype(str) == kind]


def _kind_decision(kind: str, a: _Analysis, n_tasks: int, budget: int) -> dict[str, Any]:
    """The decision object of one kind: as the overall one, plus its status, the
    optimizers detectably behind the top with each gap, and a sentence."""
    out: dict[str, Any] = {"kind": kind, "n_tasks": n_tasks, **a.decision, "best": a.best, "tied": list(a.tied)}
    if n_tasks < MIN_KIND_TASKS:
        out.update(
            status=TOO_FEW_TASKS, best=None, tied=[], behind=[], gaps={},
            phrase=f"on {kind} tasks ({n_tasks}): too few to decide",
            summary=(
                f"Too few {kind} tasks to decide: {_plural(n_tasks, 'task')} (a decision for a kind of model needs at "
                f"least {MIN_KIND_TASKS}, so that it is about the kind, not one task); the per-task scores are in the table."
            ),
        )
        return out
    if not a.ranked:
        out.update(status="insufficient data", behind=[], gaps={}, phrase=f"on {kind} tasks: insufficient data", summary=f"On {kind} tasks: insufficient data.")
        return out
    rows = a.table.set_index("optimizer")
    behind = [o for o in a.table["optimizer"] if o in a.ranked and o != a.best and o not in a.tied]
    gaps = {o: {"difference": float(rows.at[o, "diff_to_top"]), "low": float(rows.at[o, "diff_low"]), "high": float(rows.at[o, "diff_high"])} for o in behind}
    top = a.best or ", ".join(a.tied)
    lead = f"{a.best} best" if a.best else f"no detectable difference among {top}"
    worst = f"; {a.decision['top']} ahead of " + ", ".join(f"{o} by {g['difference']:.2f} [{g['low']:.2f}, {g['high']:.2f}]" for o, g in gaps.items()) if gaps else ""
    phrase = f"on {kind} tasks ({n_tasks}, budget {budget}): {lead}{worst}"
    out.update(status="decided", behind=behind, gaps=gaps, phrase=phrase, summary=phrase[0].upper() + phrase[1:] + ".")
    return out


def _they(names: set[str]) -> str:
    return ", ".join(sorted(names)) + (" leads" if len(names) == 1 else " lead")


def kinds_sentence(best: str | None, tied: list[str], ranked: list[str], kinds: dict[str, dict[str, Any]]) -> str:
    """Whether the kinds of model disagree, and how. Two decisions (the overall one or a
    kind's) disagree when each puts in its top group an optimizer the other finds
    detectably behind its own top group: a reversal. A kind whose top group is merely
    larger (fewer tasks, less power to tell optimizers apart) does not disagree."""
    if not kinds:
        return ""
    decided = {k: d for k, d in kinds.items() if d["status"] == "decided"}
    top_of = {k: ({d["best"]} if d["best"] else set(d["tied"])) for k, d in decided.items()}
    behind_of = {k: set(d["behind"]) for k, d in decided.items()}
    top_of["all"], behind_of["all"] = ({best} if best else set(tied)), {o for o in ranked if o != best and o not in tied}
    where = lambda k: "over all tasks" if k == "all" else f"on {k} tasks"  # noqa: E731
    clashes = [
        f"{_they(top_of[a] & behind_of[b])} {where(a)} but detectably behind {where(b)}, where {_they(top_of[b] & behind_of[a])}"
        for a in sorted(top_of) for b in sorted(top_of) if a < b and top_of[a] & behind_of[b] and top_of[b] & behind_of[a]
    ]
    parts = "; ".join(kinds[k]["phrase"] for k in sorted(kinds))
    if clashes:
        return f"The kinds of model disagree ({'; '.join(clashes)}): {parts}."
    return f"The kinds of model do not contradict each other or the overall decision (they differ only in what their tasks can tell apart): {parts}."


# -- public entry point ---------------------------------------------------------------------


def recommend_from_frame(
    df: pd.DataFrame,
    *,
    budget: int | None = None,
    by: str | None = None,
    kind: str | None = None,
    reference: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_trials: int = 3,
) -> Recommendation:
    """Compute a recommendation from a frame of finished trials (no storage involved).

    ``df`` is what :func:`collect_trials` returns, or any frame with columns task,
    optimizer and either score (+ cost) or value (+ direction, metric). Optional columns:
    hyper-parameters (lr, momentum, …, schedule) for the recommended numbers,
    norm/activation for ``by``, ``kind`` (the task's kind of model: mlp, linear, cnn,
    resnet, transformer), ``at_defaults`` (bool: a run of the optimizer's one-shot
    defaults, e.g. one of several seeds), ``floor`` (the task's floor in metric units,
    e.g. chance accuracy) and ``curve`` (the metric per epoch, for profiles).

    ``kind``: decide on that kind's tasks only (the same statistics on its complete
    block); a kind with fewer than :data:`MIN_KIND_TASKS` tasks says so instead of
    deciding. Without it, a frame with several kinds also gets a decision per kind
    (``kinds``), and the summary says whether they disagree.

    A (task, optimizer) pair needs ``max(min_trials, budget)`` random-search trials; the
    default budget is half the fewest trials of a pair in the complete block, at most
    :data:`DEFAULT_BUDGET`.

    >>> rng = np.random.default_rng(0)
    >>> df = pd.DataFrame({"task": np.repeat(["t1", "t2", "t3"], 16), "optimizer": np.tile(np.repeat(["adam", "sgd"], 8), 3),
    ...                    "value": np.tile(np.repeat([0.9, 0.7], 8), 3) + rng.normal(0, 0.02, 48)})
    >>> rec = recommend_from_frame(df, n_bootstrap=200)
    >>> rec.best, rec.budget
    ('adam', 4)
    """
    check_args(budget=budget, by=by, reference=reference, n_bootstrap=n_bootstrap, seed=seed, min_trials=min_trials)
    t0 = _now()
    # 1) the trials, their anchors and the budget
    f = _select_kind(_prepare(df), kind)
    optimizers = _optimizer_order(f["optimizer"].unique().tolist())
    _check_reference(reference, optimizers)
    search = _search_scores(f)
    budget = int(budget if budget is not None else _default_budget(search, min_trials))
    need = max(int(min_trials), budget)
    rng = np.random.default_rng(seed)
    anchors = _anchors(f, search, reference=reference, budget=budget, need=need)
    # 2–6) the analysis of the complete block; the default point and the numbers beside it
    analyse = lambda sub: _analyse(sub, optimizers=optimizers, anchors=anchors, budget=budget, need=need, n_bootstrap=n_bootstrap, rng=rng)  # noqa: E731
    main = analyse(f)
    defaults = _defaults(f, anchors)
    numbers = _numbers(f, optimizers, anchors)
    table = _with_defaults_and_numbers(main, defaults, numbers)
    # 8) within each norm type / activation family; 9) per kind of model
    by_table, contexts = _contexts(f, by, analyse)
    kinds = _kinds(f, kind, main, analyse, budget)
    deciding = kinds.get(kind or "", {}).get("status") != TOO_FEW_TASKS
    best, tied = (main.best, main.tied) if deciding else (None, [])
    summary = _summary(
        main, table, numbers, budget=budget, need=need, reference=reference, n_bootstrap=n_bootstrap,
        contexts=contexts, by_key=by, kinds=kinds, kind=kind,
    )
    settings = {
        "budget": budget, "by": by, "kind": kind, "reference": reference, "n_bootstrap": int(n_bootstrap), "seed": int(seed),
        "min_trials": int(min_trials), "r_max": _stats.R_MAX, "alpha": _stats.ALPHA, "target_fraction": TARGET_FRACTION,
    }
    return Recommendation(
        best=best,
        config=_config(best, numbers),
        numbers=numbers,
        budget=budget,
        table=table,
        budget_curves=_budget_curves(f, min_trials),
        task_scores=main.task_scores,
        profiles=_profiles_long(main.costs),
        bootstrap_scores=main.boot,
        friedman=main.friedman,
        by=by_table,
        by_key=by,
        summary=summary,
        settings=settings,
        tied=tied,
        decision={**main.decision, **({"status": kinds[kind]["status"]} if kind in kinds else {})},
        defaults=defaults,
        anchors=_anchors_public(anchors),
        studies=sorted(f["study"].astype(str).unique()) if "study" in f.columns else [],
        n_trials=int(len(f)),
        kind=kind,
        kinds=kinds,
        timings={"compute_s": _now() - t0},
    )


def _check_reference(reference: str | None, optimizers: list[str]) -> None:
    if reference is not None and reference not in optimizers:
        raise invalid(
            "reference", reference, optimizers or "an optimizer that has trials", source="recommend()",
            hint="The reference must be one of the optimizers in the selected trials.",
        )


def _with_defaults_and_numbers(main: _Analysis, defaults: pd.DataFrame, numbers: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The analysis table with the one-shot defaults' score (over the block's tasks, for
    optimizers with default runs on all of them) and the recommended numbers."""
    table = main.table.copy()
    if not defaults.empty and main.tasks:
        d = defaults[defaults["task"].isin(main.tasks)].pivot(index="task", columns="optimizer", values="score")
        complete = d.reindex(main.tasks).dropna(axis=1, how="any")
        table["default_score"] = table["optimizer"].map(complete.mean(axis=0)).astype(float)
    num_frame = pd.DataFrame([{c: numbers.get(o, {}).get(c, np.nan) for c in NUMBER_COLUMNS} for o in table["optimizer"]])
    return pd.concat([table, num_frame], axis=1)


def _contexts(f: pd.DataFrame, by: str | None, analyse: Any) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """8) The same analysis within each norm type / activation family, on the tasks' own
    anchors (a context does not move the floor or the best known result)."""
    frames, contexts = [], []
    if by is not None:
        source = f[by] if by in f.columns else pd.Series(None, index=f.index, dtype=object)
        key = (source.map(ACTIVATION_FAMILIES) if by == "activation" else source).fillna("unknown").astype(str)
        for value in sorted(key.unique()):
            sub = analyse(f[key == value])
            t = sub.table[sub.table["n_trials"] > 0]
            t.insert(0, "context", value)
            frames.append(t)
            contexts.append((value, _context_verdict(sub.best, sub.tied)))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["context", *TABLE_COLUMNS])
    return table, contexts


def _kinds(f: pd.DataFrame, kind: str | None, main: _Analysis, analyse: Any, budget: int) -> dict[str, dict[str, Any]]:
    """9) Per kind of model, its decision object: the selected kind's (from the main
    analysis), or, with no kind selected and several in the frame, every kind's."""
    if "kind" not in f.columns:
        return {}
    if kind is not None:
        return {kind: _kind_decision(kind, main, int(f["unit"].nunique()), budget)}
    kinds = sorted(f["kind"].dropna().astype(str).unique())
    if len(kinds) < 2:
        return {}
    out = {}
    for k in kinds:
        sub = f[f["kind"].astype(str) == k]
        out[k] = _kind_decision(k, analyse(sub), int(sub["unit"].nunique()), budget)
    return out


def _default_budget(search: dict[tuple[str, str], np.ndarray], min_trials: int) -> int:
    """Half the fewest search trials of a pair in the complete block at ``min_trials``
    (at least 1), capped at DEFAULT_BUDGET: no pair of the block is dropped, and every
    estimate averages over many subsets of its trials."""
    if not search:
        return 1
    counts = pd.Series({k: v.size for k, v in search.items()})
    counts.index = pd.MultiIndex.from_tuples(counts.index)
    sizes = counts.unstack()
    tasks, ranked = _stats.complete_matrix(sizes.fillna(0) >= min_trials)
    if len(ranked) < 2:
        return max(1, min(DEFAULT_BUDGET, int(min_trials)))
    return int(max(1, min(DEFAULT_BUDGET, sizes.loc[tasks, ranked].to_numpy().min() // 2)))


def _budget_curves(f: pd.DataFrame, min_trials: int) -> pd.DataFrame:
    """Expected best of n random-search trials, n = 1 … N (never beyond N), per pair with
    ≥ ``min_trials`` trials; default runs are not part of the search."""
    columns = ["task", "optimizer", "metric", "direction", "n", "expected_best"]
    search = f[~f["at_defaults"]]
    sizes = search.groupby(["unit", "optimizer"], sort=True).size()
    sizes = sizes[sizes >= min_trials]
    if sizes.empty:
        return pd.DataFrame(columns=columns)
    meta = search.groupby("unit", sort=False).agg(metric=("metric", "first"), sign=("sign", "first"))
    g = search.set_index(["unit", "optimizer"]).sort_index()["score"]
    parts: dict[str, list] = {c: [] for c in columns}
    for (unit, opt), n_trials in sizes.items():
        sign = float(meta.at[unit, "sign"])
        curve = _stats.expected_max_curve(g.loc[(unit, opt)].to_numpy(dtype=float)) * sign
        parts["task"].append(np.repeat(unit, n_trials))
        parts["optimizer"].append(np.repeat(opt, n_trials))
        parts["metric"].append(np.repeat(str(meta.at[unit, "metric"]), n_trials))
        parts["direction"].append(np.repeat("maximize" if sign > 0 else "minimize", n_trials))
        parts["n"].append(np.arange(1, n_trials + 1))
        parts["expected_best"].append(curve)
    return pd.DataFrame({c: np.concatenate(v) for c, v in parts.items()})


def _profiles_long(costs: pd.DataFrame) -> pd.DataFrame:
    if costs.empty:
        return pd.DataFrame(columns=["optimizer", "tau", "rho"])
    prof = _stats.performance_profile(costs.dropna(axis=1, how="all"), PROFILE_TAUS)
    return prof.reset_index().melt(id_vars="tau", var_name="optimizer", value_name="rho")[["optimizer", "tau", "rho"]]


def _now() -> float:
    return time.perf_counter()


def with_updates(rec: Recommendation, **changes: Any) -> Recommendation:
    """A copy of ``rec`` with some fields replaced (it is frozen)."""
    return dataclasses.replace(rec, **changes)
