"""From a frame of finished trials to a :class:`Recommendation`.

The steps, per task w (a workload plus its fixed settings) and optimizer s:

1. budget score: the expected best score of ``budget`` random trials of s on w;
2. normalised score: 0 for w's worst optimizer, 1 for its best (or relative to a
   reference optimizer), averaged over tasks into the aggregate score;
3. Dolan–Moré performance profile of the costs and its area score;
4. average ranks and a Friedman test;
5. a two-level bootstrap (tasks, then trials within each task and optimizer) for a CI
   on the aggregate score and P(s is best);
6. recommended numbers from each optimizer's best trials;
7. optionally the same ranking within each norm type or activation family.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
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

__all__ = ["ACTIVATION_FAMILIES", "BY_CHOICES", "DEFAULT_BUDGET", "Recommendation", "recommend_from_frame"]

# Budget used when none is given: a light tuning run. Lowered to the median number of
# trials an optimizer has per task so the default rests on measured data, not extrapolation.
DEFAULT_BUDGET = 10
# Optimizer hyper-parameters whose medians are taken in log space (they are searched on a
# log scale, so the geometric middle is the typical value).
LOG_PARAMS = ("lr", "eps")
# Decay rates close to 1 are rounded on 1 − x, to 2 significant digits (0.99937 becomes
# 0.9994 and 0.9011 becomes 0.901, never 1.0); everything else to 3 significant digits.
DECAY_PARAMS = ("momentum", "beta1", "beta2", "rho")
SIGNIFICANT_DIGITS = 3
DECAY_DIGITS = 2
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

TABLE_COLUMNS = (
    "optimizer",
    "score",
    "ci_low",
    "ci_high",
    "p_best",
    "profile_area",
    "rank",
    "n_tasks",
    "n_trials",
    "insufficient_tasks",
    "extrapolated_tasks",
    "status",
)
NUMBER_COLUMNS = (*OPTIMIZER_PARAMS, "schedule", "warmup")


@dataclass(frozen=True, eq=False)
class Recommendation:
    """Which optimizer to use by default, with which numbers, and how sure that is.

    ``table`` has one row per optimizer (best first): optimizer, score (mean normalised
    score at the budget) with its bootstrap CI (ci_low, ci_high), p_best, profile_area,
    rank (average over tasks, 1 = best), n_tasks, n_trials, insufficient_tasks,
    extrapolated_tasks, status, and the recommended numbers (lr, momentum, …, schedule).
    """

    best: str | None  # None when the data cannot rank any optimizer
    config: TrialConfig | None  # the best optimizer with its recommended numbers
    numbers: dict[str, dict[str, Any]]  # optimizer -> recommended hyper-parameters
    budget: int  # number of random trials the scores assume
    table: pd.DataFrame
    budget_curves: pd.DataFrame  # long form: task, optimizer, metric, direction, n, expected_best
    task_scores: pd.DataFrame  # long form: one row per task and optimizer
    profiles: pd.DataFrame  # long form: optimizer, tau, rho
    bootstrap_scores: pd.DataFrame  # resample × optimizer aggregate scores
    friedman: dict[str, Any]  # statistic, p, n_tasks, optimizers, reason
    by: pd.DataFrame  # context tables in long form (empty when by is None)
    by_key: str | None  # "norm" | "activation" | None
    summary: str  # the one-line recommendation
    settings: dict[str, Any]  # the arguments it was computed with
    studies: list[str] = field(default_factory=list)  # studies the trials came from
    n_trials: int = 0  # finished trials used
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load_s, compute_s, store_s
    id: int | None = None  # row id in hposvc_recommendations once stored
    mlflow_run_id: str | None = None  # the MLflow run it was logged to

    @property
    def insufficient(self) -> pd.DataFrame:
        """Task/optimizer pairs with fewer than ``min_trials`` finished trials."""
        ts = self.task_scores
        return ts.loc[ts["status"] == "insufficient data", ["task", "optimizer", "n_trials"]].reset_index(drop=True)

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
            "schema": 1,
            "best": self.best,
            "summary": self.summary,
            "budget": self.budget,
            "config": self.config.to_dict() if self.config is not None else None,
            "numbers": self.numbers,
            "table": _records(self.table),
            "friedman": self.friedman,
            "by_key": self.by_key,
            "by": _records(self.by),
            "task_scores": _records(self.task_scores),
            "profiles": _records(self.profiles),
            "budget_curves": curves,  # expected_best[k] is for n = k + 1
            "settings": self.settings,
            "studies": list(self.studies),
            "n_trials": self.n_trials,
            "created_at": self.created_at.isoformat(),
            "timings": self.timings,
            "id": self.id,
            "mlflow_run_id": self.mlflow_run_id,
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
    """Columns task/optimizer/score/cost/metric/sign/unit, non-finite scores replaced."""
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


@functools.lru_cache(maxsize=4096)
def _weights(N: int, n: int) -> np.ndarray:
    return _stats.expected_max_weights(N, n)


# -- one analysis over one frame ----------------------------------------------------------


@dataclass(frozen=True)
class _Analysis:
    table: pd.DataFrame
    task_scores: pd.DataFrame
    costs: pd.DataFrame  # scorable tasks × optimizers
    boot: np.ndarray  # n_bootstrap × optimizers
    friedman: dict[str, Any]
    optimizers: list[str]


def _analyse(
    f: pd.DataFrame,
    *,
    optimizers: list[str],
    budget: int,
    reference: str | None,
    n_bootstrap: int,
    rng: np.random.Generator,
    min_trials: int,
) -> _Analysis:
    units = sorted(f["unit"].unique())
    S = len(optimizers)
    col = {o: j for j, o in enumerate(optimizers)}
    counts = np.zeros((len(units), S), dtype=int)
    values: dict[tuple[int, int], np.ndarray] = {}
    # Group with numpy (one sort) rather than pandas groupby: hundreds of tiny groups.
    ui = pd.Categorical(f["unit"], categories=units).codes
    oi = f["optimizer"].map(col).to_numpy()
    key = ui.astype(np.int64) * S + oi
    score = f["score"].to_numpy(dtype=float)
    order = np.lexsort((score, key))
    keys, starts, sizes = np.unique(key[order], return_index=True, return_counts=True)
    sorted_scores = score[order]
    for k, a, m in zip(keys, starts, sizes):
        i, j = divmod(int(k), S)
        counts[i, j] = m
        values[i, j] = sorted_scores[a : a + m]
    # Per unit: (metric, cost offset a with cost = a − score, sign with metric = sign·score)
    meta = f.assign(offset=f["cost"] + f["score"]).groupby("unit", sort=False).agg(
        metric=("metric", "first"), offset=("offset", "median"), sign=("sign", "first")
    )
    unit_meta: dict[str, tuple[str, float, float]] = {
        u: (str(r.metric), float(r.offset), float(r.sign)) for u, r in meta.iterrows()
    }
    sufficient = counts >= min_trials

    # 1) budget score per task and optimizer
    E = np.full((len(units), S), np.nan)
    for (i, j), v in values.items():
        if sufficient[i, j]:
            E[i, j] = _weights(v.size, budget) @ v
    ref = col.get(reference) if reference is not None else None
    # A task can compare optimizers only if ≥ 2 have enough data (and the reference does).
    scorable = sufficient.sum(axis=1) >= 2
    if ref is not None:
        scorable &= sufficient[:, ref]
    sc = np.nonzero(scorable)[0]
    Es = pd.DataFrame(E[sc], index=[units[i] for i in sc], columns=optimizers)

    # 2) normalised scores and their mean over tasks
    norm = _stats.normalise(Es.to_numpy(), reference=ref)
    with np.errstate(invalid="ignore"):
        agg = _nanmean(norm, axis=0)

    # 3) performance profile on costs c = a − E
    offsets = np.array([unit_meta[units[i]][1] for i in sc])
    costs = pd.DataFrame(offsets[:, None] - Es.to_numpy(), index=Es.index, columns=optimizers)
    area = _stats.profile_area(costs) if len(sc) else pd.Series(np.nan, index=optimizers)
    ratios = _stats.profile_ratios(costs) if len(sc) else costs

    # 4) ranks and Friedman
    ranks_by_task = Es.rank(axis=1, ascending=False, method="average")
    avg_rank = ranks_by_task.mean(axis=0, skipna=True)
    fried = _stats.friedman(Es.dropna(axis=1, how="all"))

    # 5) bootstrap: draw tasks, then trials within each drawn (task, optimizer)
    boot = _bootstrap(values, sufficient, sc, S, budget, ref, n_bootstrap, rng)
    p_best, ci_low, ci_high = _summarise_boot(boot)

    extrapolated = ((counts < budget) & sufficient)[sc].sum(axis=0) if len(sc) else np.zeros(S, int)
    table = pd.DataFrame(
        {
            "optimizer": optimizers,
            "score": agg,
            "ci_low": ci_low,
            "ci_high": ci_high,
            "p_best": p_best,
            "profile_area": area.reindex(optimizers).to_numpy(dtype=float),
            "rank": avg_rank.reindex(optimizers).to_numpy(dtype=float),
            "n_tasks": (~np.isnan(norm)).sum(axis=0) if len(sc) else np.zeros(S, int),
            "n_trials": counts.sum(axis=0),
            "insufficient_tasks": ((counts > 0) & ~sufficient).sum(axis=0),
            "extrapolated_tasks": extrapolated,
        }
    )
    # "no comparison": enough trials somewhere, but on no task with a second optimizer.
    table["status"] = np.where(
        table["n_tasks"] > 0, "ok", np.where(sufficient.any(axis=0), "no comparison", "insufficient data")
    )
    table = table.sort_values(["score", "p_best"], ascending=False, na_position="last", kind="stable")
    table = table.reset_index(drop=True)

    # Long per-task view (also carries the insufficient pairs).
    rows = []
    pos = {i: k for k, i in enumerate(sc)}
    for i, unit in enumerate(units):
        metric, _, sign = unit_meta[unit]
        for j, opt in enumerate(optimizers):
            if counts[i, j] == 0:
                continue
            k = pos.get(i)
            status = "ok" if sufficient[i, j] and k is not None else (
                "insufficient data" if not sufficient[i, j] else "no comparison"
            )
            rows.append(
                {
                    "task": unit,
                    "optimizer": opt,
                    "metric": metric,
                    "n_trials": int(counts[i, j]),
                    "expected_best": sign * E[i, j],
                    "score": norm[k, j] if k is not None else np.nan,
                    "cost": costs.iat[k, j] if k is not None else np.nan,
                    "ratio": ratios.iat[k, j] if k is not None else np.nan,
                    "rank": ranks_by_task.iat[k, j] if k is not None else np.nan,
                    "status": status,
                }
            )
    task_scores = pd.DataFrame(
        rows,
        columns=["task", "optimizer", "metric", "n_trials", "expected_best", "score", "cost", "ratio", "rank", "status"],
    )
    return _Analysis(table, task_scores, costs, boot, fried, optimizers)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    present = ~np.isnan(x)
    n = present.sum(axis=axis)
    total = np.where(present, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _bootstrap(
    values: dict[tuple[int, int], np.ndarray],
    sufficient: np.ndarray,
    sc: np.ndarray,
    S: int,
    budget: int,
    ref: int | None,
    B: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """B × S aggregate scores. Each resample draws len(sc) tasks with replacement; every
    drawn copy of a task gets its own resample of that task's trials (per optimizer, with
    replacement, same count), so the two levels of uncertainty are both kept exactly."""
    T = len(sc)
    if B == 0 or T == 0:
        return np.full((B, S), np.nan)
    draw = rng.integers(0, T, size=(B, T))
    boot = np.full((B, T, S), np.nan)
    for k, i in enumerate(sc):
        b_idx, slot = np.nonzero(draw == k)
        M = b_idx.size
        if M == 0:
            continue
        E = np.full((M, S), np.nan)
        for j in range(S):
            if not sufficient[i, j]:
                continue
            v = values[i, j]
            sample = v[rng.integers(0, v.size, size=(M, v.size))]
            sample.sort(axis=1)
            E[:, j] = sample @ _weights(v.size, budget)
        boot[b_idx, slot] = _stats.normalise(E, reference=ref)
    return _nanmean(boot, axis=1)


def _summarise_boot(boot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    B, S = boot.shape
    if B == 0 or S == 0:
        nan = np.full(S, np.nan)
        return nan, nan, nan
    filled = np.where(np.isnan(boot), -np.inf, boot)
    top = filled.max(axis=1, keepdims=True)
    win = (filled >= top - 1e-12) & np.isfinite(filled)
    n_win = win.sum(axis=1, keepdims=True)
    # Ties split the win; a resample where nobody has a score counts for nobody.
    p_best = np.where(n_win > 0, win / np.maximum(n_win, 1), 0.0).sum(axis=0) / max(int((n_win > 0).sum()), 1)
    ci_low = np.full(S, np.nan)
    ci_high = np.full(S, np.nan)
    for j in range(S):
        col = boot[:, j][~np.isnan(boot[:, j])]
        if col.size:
            ci_low[j], ci_high[j] = np.percentile(col, [2.5, 97.5])
    return p_best, ci_low, ci_high


# -- recommended numbers ----------------------------------------------------------------


def _round(name: str, x: float) -> float:
    if not math.isfinite(x) or x == 0:
        return float(x)
    if name in DECAY_PARAMS and 0 < x < 1:
        return float(f"{1.0 - float(f'{1.0 - x:.{DECAY_DIGITS}g}'):.12g}")
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def _top_quartile(f: pd.DataFrame, min_trials: int) -> pd.DataFrame:
    """The best quarter (at least one) of each task/optimizer group with enough trials."""
    grouped = f.groupby(["unit", "optimizer"], sort=False)["score"]
    size = grouped.transform("size")
    place = grouped.rank(ascending=False, method="first")
    return f[(size >= min_trials) & (place <= np.maximum(1, np.ceil(size / 4)))]


def top_trials(df: pd.DataFrame, *, min_trials: int = 3) -> pd.DataFrame:
    """The trials the recommended numbers are the medians of: per task and optimizer with
    at least ``min_trials`` trials, the best quarter (at least one)."""
    return _top_quartile(_prepare(df), min_trials)


def _numbers(f: pd.DataFrame, optimizers: list[str], min_trials: int) -> dict[str, dict[str, Any]]:
    """Per optimizer: the median of each hyper-parameter over its top-quartile trials of
    every task (at least one trial per task), pooled across tasks.

    Why this and not "the single best configuration": random and TPE searches never
    repeat a configuration across tasks, so there is no common configuration to score;
    the median of the good trials is robust to the one lucky outlier, it is a value inside
    the searched range, and log-space medians for lr and eps respect how they are searched.
    The schedule is the most common one among those trials.
    """
    out: dict[str, dict[str, Any]] = {opt: {} for opt in optimizers}
    for opt, top in _top_quartile(f, min_trials).groupby("optimizer", sort=False):
        params = list(ONE_SHOT_DEFAULTS.get(str(opt), OPTIMIZER_PARAMS))
        numbers: dict[str, Any] = {}
        for p in params:
            if p not in top.columns:
                continue
            vals = pd.to_numeric(top[p], errors="coerce").dropna().to_numpy(dtype=float)
            if vals.size == 0:
                continue
            if p in LOG_PARAMS and (vals > 0).all():
                med = float(np.exp(np.median(np.log(vals))))
            else:
                med = float(np.median(vals))
            numbers[p] = _round(p, med)
        if "schedule" in top.columns and top["schedule"].notna().any():
            counts = top["schedule"].dropna().value_counts()
            schedule = str(sorted(counts[counts == counts.max()].index)[0])
            numbers["schedule"] = schedule
            if schedule == "warmup_cosine" and "warmup" in top.columns:
                w = pd.to_numeric(top.loc[top["schedule"] == schedule, "warmup"], errors="coerce").dropna()
                if len(w):
                    numbers["warmup"] = _round("warmup", float(np.median(w)))
        numbers["n_top_trials"] = int(len(top))
        out[str(opt)] = numbers
    return out


def _config(best: str | None, numbers: dict[str, dict[str, Any]]) -> TrialConfig | None:
    if best is None or best not in ONE_SHOT_DEFAULTS:
        return None
    kwargs = {k: v for k, v in numbers.get(best, {}).items() if k in (*OPTIMIZER_PARAMS, "schedule", "warmup")}
    try:
        return TrialConfig(optimizer=best, **kwargs)
    except HposvcError:
        # A median outside TrialConfig's range (e.g. a decay rounded to 1) leaves the
        # numbers in the table but no ready-made config.
        return None


# -- text ---------------------------------------------------------------------------------


def _fmt_number(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _context_label(by_key: str, value: str) -> str:
    if by_key == "norm":
        return "without norm" if value == "none" else f"with {value} norm"
    return f"with {value} activations"


def _summary(
    best: str | None,
    table: pd.DataFrame,
    numbers: dict[str, dict[str, Any]],
    budget: int,
    fried: dict[str, Any],
    contexts: list[tuple[str, str | None]],
    by_key: str | None,
    min_trials: int,
    reference: str | None,
) -> str:
    insufficient = table.loc[table["status"] == "insufficient data", "optimizer"].tolist()
    if best is None:
        if table.empty:
            return "No recommendation: the selection has no finished trials."
        text = (
            f"No recommendation: insufficient data (no task has at least two optimizers with "
            f">= {min_trials} finished trials"
            + (f", including the reference {reference!r}" if reference else "")
            + ")."
        )
        alone = table.loc[table["status"] == "no comparison", "optimizer"].tolist()
        if alone:
            text += f" Enough trials but nothing to compare with on the same task: {', '.join(alone)}."
        return text
    row = table.iloc[0]
    nums = ", ".join(f"{k}={_fmt_number(v)}" for k, v in numbers.get(best, {}).items() if k != "n_top_trials")
    conf = row["p_best"]
    word = "" if not math.isfinite(conf) else (" (clear)" if conf >= 0.9 else " (likely)" if conf >= 0.5 else " (uncertain)")
    scale = f"relative to {reference}" if reference else "0 = worst, 1 = best optimizer per task"
    ci = f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if math.isfinite(row["ci_low"]) else ""
    pb = f", P(best) = {conf:.2f}{word}" if math.isfinite(conf) else ""
    text = (
        f"Use {best} by default ({nums}): at a budget of {budget} trial{'s' if budget != 1 else ''} "
        f"its score is {row['score']:.2f}{ci} ({scale}) over {int(row['n_tasks'])} "
        f"task{'s' if int(row['n_tasks']) != 1 else ''}{pb}"
    )
    if len(table) > 1 and table.iloc[1]["status"] == "ok":
        r2 = table.iloc[1]
        text += f"; runner-up {r2['optimizer']} ({r2['score']:.2f}"
        text += f", P(best) = {r2['p_best']:.2f})" if math.isfinite(r2["p_best"]) else ")"
    if fried.get("p") is not None:
        text += f"; Friedman p = {fried['p']:.3g}"
    text += "."
    if by_key and contexts:
        parts = [f"{_context_label(by_key, v)}: {b or 'insufficient data'}" for v, b in contexts]
        text += " " + "; ".join(parts) + "."
    if insufficient:
        text += f" Insufficient data (< {min_trials} trials on every task): {', '.join(insufficient)}."
    return text


# -- public entry point ---------------------------------------------------------------------


def recommend_from_frame(
    df: pd.DataFrame,
    *,
    budget: int | None = None,
    by: str | None = None,
    reference: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_trials: int = 3,
) -> Recommendation:
    """Compute a recommendation from a frame of finished trials (no storage involved).

    ``df`` is what :func:`collect_trials` returns, or any frame with columns task,
    optimizer and either score (+ cost) or value (+ direction, metric); hyper-parameter
    columns (lr, momentum, …, schedule) are used for the recommended numbers and
    norm/activation for ``by``.

    >>> df = pd.DataFrame({"task": ["t1"] * 6, "optimizer": ["adam"] * 3 + ["sgd"] * 3,
    ...                    "value": [0.9, 0.92, 0.95, 0.5, 0.6, 0.7], "direction": "maximize"})
    >>> recommend_from_frame(df, budget=2, n_bootstrap=100).best
    'adam'
    """
    check_args(budget=budget, by=by, reference=reference, n_bootstrap=n_bootstrap, seed=seed, min_trials=min_trials)
    t0 = _now()
    f = _prepare(df)
    optimizers = _optimizer_order(f["optimizer"].unique().tolist())
    if reference is not None and reference not in optimizers:
        raise invalid(
            "reference",
            reference,
            optimizers or "an optimizer that has trials",
            source="recommend()",
            hint="The reference must be one of the optimizers in the selected trials.",
        )
    if budget is None:
        sizes = f.groupby(["unit", "optimizer"]).size()
        sizes = sizes[sizes >= min_trials]
        budget = int(max(1, min(DEFAULT_BUDGET, int(np.median(sizes))))) if len(sizes) else 1
    budget = int(budget)
    rng = np.random.default_rng(seed)

    main = _analyse(
        f, optimizers=optimizers, budget=budget, reference=reference, n_bootstrap=n_bootstrap, rng=rng, min_trials=min_trials
    )
    table = main.table
    best = str(table.iloc[0]["optimizer"]) if len(table) and table.iloc[0]["status"] == "ok" else None
    numbers = _numbers(f, optimizers, min_trials)
    num_frame = pd.DataFrame(
        [{c: numbers.get(o, {}).get(c, np.nan) for c in NUMBER_COLUMNS} for o in table["optimizer"]]
    )
    table = pd.concat([table, num_frame], axis=1)

    # 7) context: the same analysis within each norm type / activation family.
    by_frames = []
    contexts: list[tuple[str, str | None]] = []
    if by is not None:
        source = f[by] if by in f.columns else pd.Series(None, index=f.index, dtype=object)
        key = source.map(ACTIVATION_FAMILIES) if by == "activation" else source
        key = key.fillna("unknown").astype(str)
        for value in sorted(key.unique()):
            sub = _analyse(
                f[key == value],
                optimizers=optimizers,
                budget=budget,
                reference=reference if reference in set(f.loc[key == value, "optimizer"]) else None,
                n_bootstrap=n_bootstrap,
                rng=rng,
                min_trials=min_trials,
            )
            t = sub.table
            t = t[t["n_trials"] > 0]
            t.insert(0, "context", value)
            by_frames.append(t)
            ok = t["status"] == "ok"
            contexts.append((value, str(t.loc[ok, "optimizer"].iloc[0]) if ok.any() else None))
    by_table = (
        pd.concat(by_frames, ignore_index=True) if by_frames else pd.DataFrame(columns=["context", *TABLE_COLUMNS])
    )

    curves = _budget_curves(f, min_trials)
    profiles = _profiles_long(main.costs)
    summary = _summary(best, table, numbers, budget, main.friedman, contexts, by, min_trials, reference)
    settings = {
        "budget": budget,
        "by": by,
        "reference": reference,
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "min_trials": int(min_trials),
        "r_max": _stats.R_MAX,
    }
    return Recommendation(
        best=best,
        config=_config(best, numbers),
        numbers=numbers,
        budget=budget,
        table=table,
        budget_curves=curves,
        task_scores=main.task_scores,
        profiles=profiles,
        bootstrap_scores=pd.DataFrame(main.boot, columns=optimizers),
        friedman=main.friedman,
        by=by_table,
        by_key=by,
        summary=summary,
        settings=settings,
        studies=sorted(f["study"].astype(str).unique()) if "study" in f.columns else [],
        n_trials=int(len(f)),
        timings={"compute_s": _now() - t0},
    )


def _budget_curves(f: pd.DataFrame, min_trials: int) -> pd.DataFrame:
    columns = ["task", "optimizer", "metric", "direction", "n", "expected_best"]
    sizes = f.groupby(["unit", "optimizer"], sort=True).size()
    sizes = sizes[sizes >= min_trials]
    if sizes.empty:
        return pd.DataFrame(columns=columns)
    meta = f.groupby("unit", sort=False).agg(metric=("metric", "first"), sign=("sign", "first"))
    g = f.set_index(["unit", "optimizer"]).sort_index()["score"]
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
