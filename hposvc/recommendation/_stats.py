"""The numbers behind a recommendation: pure numpy/scipy/pandas, no storage, no plotting.

Conventions: a *score* is higher-is-better (accuracy, or minus the loss); a *cost* is
lower-is-better and positive (here: epochs to reach a task's target). Tables of
per-task results are tasks × optimizers (rows × columns); NaN means "no (sufficient) data".

The pieces, in the order :mod:`hposvc.recommendation._core` uses them:

1. :func:`complete_matrix` picks the tasks × optimizers block measured everywhere;
2. :func:`anchored` puts every task on one scale: 0 = its fixed floor, 1 = its best known;
3. :func:`noise_ranks` ranks within a task, calling differences inside the task's seed
   noise ties, and :func:`friedman` tests the ranks;
4. :func:`hierarchical_bootstrap` resamples tasks, then trials, and
   :func:`compare_with_top` turns the resamples into a step-down test of the top
   optimizer against each other one: "best" or "no detectable difference";
   :func:`wilcoxon_vs_top` is the rank-based (Holm-corrected) follow-up to Friedman;
5. :func:`epochs_to_target` and :func:`median_best_time` give the cost that
   :func:`performance_profile` compares.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats

from hposvc.errors import invalid
from hposvc.stats import expected_best_of_k, expected_max_curve, expected_max_weights, holm

__all__ = [
    "ALPHA",
    "R_MAX",
    "Comparison",
    "anchored",
    "average_ranks",
    "compare_with_top",
    "complete_matrix",
    "epochs_to_target",
    "expected_max",
    "expected_max_curve",
    "expected_max_weights",
    "friedman",
    "hierarchical_bootstrap",
    "holm",
    "median_best_time",
    "noise_ranks",
    "normalise",
    "performance_profile",
    "pooled_sd",
    "profile_area",
    "profile_ratios",
    "wilcoxon_vs_top",
]

# Dolan–Moré profiles are integrated up to r_max: an optimizer that needs 4× the epochs
# of the fastest on a task counts as having failed it (AlgoPerf uses the same cut-off).
R_MAX = 4.0
# Costs are divided by the best cost of a task; floored so a zero cost cannot divide.
COST_FLOOR = 1e-12
# Relative slack when comparing a ratio with τ, so that 0.6/0.15 counts as ≤ 4.
_TAU_SLACK = 1e-9
# Family-wise error rate of the comparisons with the top optimizer (and 1 − the
# coverage of every interval).
ALPHA = 0.05


def expected_max(values: Sequence[float] | np.ndarray, n: int) -> float:
    """Expected best of ``n`` random trials drawn from ``values`` without replacement;
    refuses ``n`` > len(values) (:func:`hposvc.stats.expected_best_of_k`).

    >>> round(expected_max([0.2, 0.8, 0.5], 2), 3)  # mean of max over the 3 pairs
    0.7
    """
    return expected_best_of_k(values, n)


# -- 1) which optimizers can be ranked ------------------------------------------------------


def complete_matrix(measured: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The tasks and optimizers of a complete block of ``measured`` (tasks × optimizers, bool).

    Optimizers are only compared on the same tasks, so the ranking uses a block in which
    every optimizer was measured on every task. Greedy: while a cell is missing, drop the
    task or optimizer (among those with a missing cell) whose removal loses the fewest
    measured cells; on a tie drop a task (optimizers are what is ranked). An optimizer
    measured on one task of many is dropped, never ranked on that task alone.

    >>> m = pd.DataFrame({"a": [1, 1, 1], "b": [1, 1, 1], "c": [1, 0, 0]}, index=["t1", "t2", "t3"]).astype(bool)
    >>> complete_matrix(m)
    (['t1', 't2', 't3'], ['a', 'b'])
    """
    m = measured.astype(bool)
    m = m.loc[m.any(axis=1), m.any(axis=0)]
    while m.size and not m.to_numpy().all():
        x = m.to_numpy()
        rows = np.flatnonzero(~x.all(axis=1))
        cols = np.flatnonzero(~x.all(axis=0))
        row_loss = x[rows].sum(axis=1)
        col_loss = x[:, cols].sum(axis=0)
        if row_loss.min() <= col_loss.min():
            m = m.drop(index=m.index[rows[np.argmin(row_loss)]])
        else:
            m = m.drop(columns=m.columns[cols[np.argmin(col_loss)]])
    return [str(t) for t in m.index], [str(o) for o in m.columns]


# -- 2) one scale for all tasks ----------------------------------------------------------------


def anchored(scores: np.ndarray | pd.DataFrame, floor: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Scores on each task's fixed scale: 0 = the task's floor, 1 = the best result known.

    ``scores`` is tasks × … (any trailing axes), ``floor`` and ``best`` one value per
    task. The floor is fixed before the optimizers are compared (chance level, or the
    reference optimizer at its defaults), so adding or removing an optimizer does not move
    anyone else's score. Below the floor is negative.

    >>> anchored(np.array([[0.5, 0.9], [0.2, 0.4]]), floor=np.array([0.1, 0.0]), best=np.array([0.9, 0.4])).tolist()
    [[0.5, 1.0], [0.5, 1.0]]
    """
    x = np.asarray(scores, dtype=float)
    lo = np.asarray(floor, dtype=float).reshape(-1, *([1] * (x.ndim - 1)))
    hi = np.asarray(best, dtype=float).reshape(-1, *([1] * (x.ndim - 1)))
    return (x - lo) / (hi - lo)


def normalise(scores: np.ndarray | pd.DataFrame, *, floor: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Alias of :func:`anchored` (the name earlier versions exported)."""
    return anchored(scores, floor, best)


# -- 3) ranks and the Friedman test ---------------------------------------------------------------


def noise_ranks(scores: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """Per-task ranks (1 = best) in which differences within the task's seed noise tie.

    ``scores`` is tasks × optimizers; ``noise`` one value per task in the same units (NaN
    or 0: only exact ties). Within a task the optimizers are taken best first; each joins
    the group of the one above it when it is within ``noise`` of that group's leader, and
    a group shares the mean of its positions. Grouping by the leader keeps "tie" from
    chaining across a wide spread.

    >>> noise_ranks(np.array([[0.90, 0.89, 0.80, 0.70]]), np.array([0.02])).tolist()
    [[1.5, 1.5, 3.0, 4.0]]
    """
    x = np.asarray(scores, dtype=float)
    out = np.full(x.shape, np.nan)
    eps = np.zeros(x.shape[0]) if noise is None else np.nan_to_num(np.asarray(noise, dtype=float), nan=0.0)
    for i, row in enumerate(x):
        ok = np.flatnonzero(~np.isnan(row))
        order = ok[np.argsort(-row[ok], kind="stable")]
        pos = 0
        while pos < order.size:
            leader = row[order[pos]]
            end = pos + 1
            while end < order.size and leader - row[order[end]] <= eps[i] + 1e-12 * max(abs(leader), 1.0):
                end += 1
            out[i, order[pos:end]] = (pos + 1 + end) / 2
            pos = end
    return out


def average_ranks(scores: pd.DataFrame, noise: np.ndarray | None = None) -> pd.Series:
    """Average rank of each optimizer over the tasks (1 = best), ties by :func:`noise_ranks`."""
    r = noise_ranks(scores.to_numpy(dtype=float), noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is NaN
        return pd.Series(np.nanmean(r, axis=0), index=scores.columns)


def friedman(ranks: pd.DataFrame) -> dict[str, object]:
    """Friedman test of "all optimizers perform the same" on a complete tasks × optimizers
    table of within-task ranks (or scores; they are ranked per task, ties averaged).

    Run with ≥ 3 tasks and ≥ 3 optimizers, the tie-corrected statistic from
    :func:`scipy.stats.friedmanchisquare`. Returns statistic, p, n_tasks, optimizers and,
    when it could not run, the reason.
    """
    full = ranks.dropna(axis=1, how="any")
    out: dict[str, object] = {
        "statistic": None,
        "p": None,
        "n_tasks": int(full.shape[0]),
        "optimizers": [str(c) for c in full.columns],
        "reason": None,
    }
    if full.shape[0] < 3 or full.shape[1] < 3:
        out["reason"] = (
            f"needs >= 3 tasks and >= 3 optimizers measured on all of them; "
            f"have {full.shape[0]} tasks and {full.shape[1]} such optimizers"
        )
        return out
    x = full.to_numpy(dtype=float)
    if np.all(x == x[:, :1]):
        out.update(statistic=0.0, p=1.0)  # every task a complete tie: no evidence at all
        return out
    res = stats.friedmanchisquare(*x.T)
    out.update(statistic=float(res.statistic), p=float(res.pvalue))
    return out


# -- 4) uncertainty: tasks, then trials ----------------------------------------------------------


def hierarchical_bootstrap(
    cells: Sequence[Sequence[np.ndarray]],
    floor: np.ndarray,
    best: np.ndarray,
    budget: int,
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """n_boot × S resampled aggregate scores (mean anchored expected-best-of-``budget``).

    ``cells[i][j]`` holds the trial scores of optimizer j on task i (a complete matrix,
    every cell with ≥ ``budget`` trials). Each resample draws the T tasks with
    replacement, and for every drawn copy of a task draws each optimizer's trials with
    replacement (same count), so both the choice of tasks and the luck of the trials are
    in the spread. The anchors are fixed per task and are not resampled.

    Trial noise enters twice (through the spread of the drawn tasks and again through the
    redrawn trials), which makes the intervals somewhat conservative; that is the side to
    err on when the answer is "use X by default".
    """
    T = len(cells)
    S = len(cells[0]) if T else 0
    if n_boot == 0 or T == 0 or S == 0:
        return np.full((n_boot, S), np.nan)
    draw = rng.integers(0, T, size=(n_boot, T))
    total = np.zeros((n_boot, S))
    for i in range(T):
        b_idx = np.nonzero(draw == i)[0]  # one entry per drawn copy of task i
        M = b_idx.size
        if M == 0:
            continue
        E = np.empty((M, S))
        for j in range(S):
            v = np.asarray(cells[i][j], dtype=float)
            sample = np.sort(v[rng.integers(0, v.size, size=(M, v.size))], axis=1)
            E[:, j] = sample @ expected_max_weights(v.size, budget)
        np.add.at(total, b_idx, (E - floor[i]) / (best[i] - floor[i]))
    return total / T


@dataclass(frozen=True)
class Comparison:
    """The top optimizer against every other one, from the bootstrap resamples."""

    top: int  # column of the optimizer with the highest aggregate score
    runner_up: int | None  # column of the second highest (None with one optimizer)
    diff: np.ndarray  # per optimizer: top minus it (0 for the top)
    low: np.ndarray  # the interval of that difference used to decide (see compare_with_top)
    high: np.ndarray
    p_adj: np.ndarray  # step-down adjusted p of "no difference from the top" (nan for the top)
    tied: np.ndarray  # bool: cannot be told apart from the top (the top included)
    best: int | None  # the top when every comparison rejects, else None


def compare_with_top(scores: np.ndarray, boot: np.ndarray, *, alpha: float = ALPHA) -> Comparison:
    """Which optimizers can be told apart from the top one: a step-down range test with
    bootstrap quantiles.

    ``scores`` are the S aggregate scores, ``boot`` the n_boot × S resamples of them.
    The top is chosen *from the data*, so under "no difference" its lead over the last
    one is the range of S noisy scores, not one difference; a plain per-pair test (even
    Holm-corrected over the S − 1 comparisons) calls that lead real too often. So the
    others are taken in order of their gap to the top, largest first, and the gap to s
    is compared with the (1 − α) quantile of the resampled *range* of the centred scores
    of the set still tied with the top (the top, s and everyone closer): a Tukey-type
    step-down (Romano & Wolf 2005), which controls the chance of calling any difference
    that is not there, with the top's selection included. Its last step, the top and the
    runner-up alone, is the two-sided interval of top − runner-up: ``best`` is the top
    only when that interval, and every step before it, excludes zero. ``tied`` is the
    top and every optimizer not told apart from it; ``p_adj`` the step-down adjusted p.
    """
    x = np.asarray(scores, dtype=float)
    S = x.size
    top = int(np.argmax(np.where(np.isnan(x), -np.inf, x)))
    diff = x[top] - x
    others = sorted((j for j in range(S) if j != top), key=lambda j: (-diff[j], j))
    runner_up = others[-1] if others else None
    low, high, p_adj = (np.full(S, np.nan) for _ in range(3))
    low[top] = high[top] = 0.0
    B = boot.shape[0]
    if B == 0 or not others:
        return Comparison(top, runner_up, diff, low, high, p_adj, np.ones(S, bool), top if not others else None)
    dev = boot - boot.mean(axis=0)
    running = 0.0
    for i, j in enumerate(others):
        still = [top, *others[i:]]
        spread = dev[:, still].max(axis=1) - dev[:, still].min(axis=1)
        q = float(np.quantile(spread, 1 - alpha))
        low[j], high[j] = diff[j] - q, diff[j] + q
        running = max(running, (np.count_nonzero(spread >= diff[j]) + 1) / (B + 1))
        p_adj[j] = min(running, 1.0)
    tied = ~(p_adj <= alpha)
    tied[top] = True
    return Comparison(top, runner_up, diff, low, high, p_adj, tied, top if tied.sum() == 1 else None)


def wilcoxon_vs_top(block: pd.DataFrame, top: str, noise: np.ndarray | None = None) -> pd.Series:
    """Holm-corrected Wilcoxon signed-rank tests (:func:`scipy.stats.wilcoxon`, two-sided)
    of the top optimizer against each other one on the per-task scores of a complete
    block: the rank-based follow-up to :func:`friedman` (Demšar 2006; Benavoli et al.
    2016). Descriptive next to :func:`compare_with_top`, which decides: with few tasks
    these p-values cannot get small (4 tasks: p ≥ 0.125). A difference within the task's
    seed ``noise`` counts as a tie (zero, split by ``zero_method="zsplit"``). NaN for the top."""
    eps = np.zeros(len(block)) if noise is None else np.nan_to_num(np.asarray(noise, dtype=float), nan=0.0)
    p = pd.Series(np.nan, index=block.columns, dtype=float)
    for s in block.columns:
        if s == top:
            continue
        d = (block[top] - block[s]).to_numpy(dtype=float)
        d = np.where(np.abs(d) <= eps, 0.0, d)
        if not np.any(d != 0):
            p[s] = 1.0  # identical on every task: no evidence of a difference
            continue
        p[s] = float(stats.wilcoxon(d, zero_method="zsplit").pvalue)
    return pd.Series(holm(p.to_numpy()), index=block.columns)


# -- 5) performance profiles on epochs to a target --------------------------------------------


def epochs_to_target(curve: Sequence[float] | np.ndarray, target: float) -> float:
    """The first epoch (1-based) at which ``curve`` (scores, higher is better) reaches
    ``target``; inf when it never does.

    >>> epochs_to_target([0.5, 0.8, 0.95, 0.9], 0.9), epochs_to_target([0.5], 0.9)
    (3.0, inf)
    """
    c = np.asarray(curve, dtype=float)
    hit = np.flatnonzero(c >= target)
    return float(hit[0] + 1) if hit.size else math.inf


def median_best_time(times: Sequence[float] | np.ndarray, k: int) -> float:
    """The median, over random draws of ``k`` of the N trials (without replacement), of
    the fastest time to target among the k (inf: never reached).

    The median rather than the mean because a draw in which no trial reaches the target
    has an infinite time; P(fastest ≤ t_(j)) = 1 − C(N − j, k) / C(N, k).

    >>> median_best_time([3, 5, float("inf"), float("inf")], 1), median_best_time([3, 5, float("inf"), float("inf")], 2)
    (5.0, 3.0)
    """
    t = np.sort(np.asarray(times, dtype=float))
    N = t.size
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= N:
        raise invalid("k", k, f"an integer between 1 and {N}, the number of trials that ran", source="median_best_time()")
    j = np.arange(1, N + 1)
    with np.errstate(divide="ignore"):
        log_none = special.gammaln(N - j + 1) - special.gammaln(np.maximum(N - j - k + 1, 1)) - (
            special.gammaln(N + 1) - special.gammaln(N - k + 1)
        )
    p_none = np.where(N - j >= k, np.exp(log_none), 0.0)
    reached = (1.0 - p_none >= 0.5) & np.isfinite(t)
    return float(t[np.argmax(reached)]) if reached.any() else math.inf


def profile_ratios(costs: pd.DataFrame) -> pd.DataFrame:
    """r_{s,w} = c_{s,w} / min_s c_{s,w}: how many times the best cost of the task each
    optimizer pays. NaN stays NaN (no data on that task); inf (never reached) stays inf."""
    c = costs.astype(float).clip(lower=COST_FLOOR)
    return c.div(c.min(axis=1, skipna=True), axis=0)


def performance_profile(
    costs: pd.DataFrame, taus: Sequence[float] | np.ndarray | None = None, *, r_max: float = R_MAX
) -> pd.DataFrame:
    """Dolan–Moré performance profiles ρ_s(τ): the fraction of tasks on which optimizer s
    is within a factor τ of the best cost.

    ``costs`` is tasks × optimizers (lower is better, e.g. epochs to target). Each
    optimizer's fraction is over the tasks it has data on. Returns τ × optimizers.

    >>> c = pd.DataFrame({"a": [1.0, 2.0], "b": [2.0, 1.0]}, index=["t1", "t2"])
    >>> performance_profile(c, [1.0, 2.0]).to_dict("list")
    {'a': [0.5, 1.0], 'b': [0.5, 1.0]}
    """
    r = profile_ratios(costs).to_numpy()
    taus = np.linspace(1.0, r_max, 301) if taus is None else np.asarray(taus, dtype=float)
    measured = ~np.isnan(r)
    within = r[None, :, :] <= taus[:, None, None] * (1 + _TAU_SLACK)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = within.sum(axis=1) / measured.sum(axis=0)[None, :]
    return pd.DataFrame(rho, index=pd.Index(taus, name="tau"), columns=costs.columns)


def profile_area(costs: pd.DataFrame, *, r_max: float = R_MAX) -> pd.Series:
    """Area score B_s = ∫₁^{r_max} ρ_s(τ) dτ / (r_max − 1), computed exactly.

    ρ_s is a step function, so its integral over [1, r_max] is the mean over tasks of
    (r_max − clip(r, 1, r_max)): 1 for an optimizer that is best everywhere, 0 for one
    that is ≥ r_max times the best (or never reaches the target) everywhere.
    """
    r = profile_ratios(costs)
    area = (r_max - r.clip(lower=1.0, upper=r_max)) / (r_max - 1.0)
    return area.mean(axis=0, skipna=True)


def pooled_sd(groups: Mapping[object, np.ndarray] | Sequence[np.ndarray]) -> float:
    """Pooled within-group standard deviation over the groups with ≥ 2 values (nan if none):
    the seed noise, from configurations that ran more than once.

    >>> round(pooled_sd([np.array([1.0, 3.0]), np.array([5.0, 5.0, 5.0]), np.array([7.0])]), 4)
    0.8165
    """
    values = groups.values() if isinstance(groups, Mapping) else groups
    ss, dof = 0.0, 0
    for g in values:
        g = np.asarray(g, dtype=float)
        if g.size >= 2:
            ss += float(((g - g.mean()) ** 2).sum())
            dof += g.size - 1
    return math.sqrt(ss / dof) if dof else math.nan
