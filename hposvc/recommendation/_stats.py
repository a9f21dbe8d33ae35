"""The numbers behind a recommendation: pure numpy/pandas, no storage, no plotting.

Conventions: a *score* is higher-is-better (accuracy, or minus the loss); a *cost* is
lower-is-better and positive (1 − accuracy, or the loss). Tables of per-task results are
DataFrames indexed by task with one column per optimizer; NaN means "no (sufficient) data".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special, stats

__all__ = [
    "R_MAX",
    "average_ranks",
    "expected_max",
    "expected_max_curve",
    "expected_max_weights",
    "friedman",
    "normalise",
    "performance_profile",
    "profile_area",
    "profile_ratios",
]

# Dolan–Moré profiles are integrated up to r_max: an optimizer whose cost is 4× the best
# on a task counts as having failed it (AlgoPerf uses the same cut-off).
R_MAX = 4.0
# Costs are divided by the best cost of a task; a perfect score (error 0) would make every
# other optimizer infinitely worse, so costs are floored at this value before dividing.
COST_FLOOR = 1e-12
# Relative slack when comparing a ratio with τ, so that 0.6/0.15 counts as ≤ 4.
_TAU_SLACK = 1e-9


def expected_max_weights(N: int, n: int) -> np.ndarray:
    """Weights w with E[max of n draws] = w · sorted(values), for N values sorted ascending.

    For n ≤ N this is the unbiased without-replacement estimator
    w_i = C(i−1, n−1) / C(N, n) (Dodge et al. 2019; Tang et al. 2020), computed in log space
    with log-gamma so it stays exact for N in the thousands. For n > N there is no
    without-replacement answer; the weights are then those of n draws *with* replacement
    from the empirical distribution, w_i = (i/N)^n − ((i−1)/N)^n, which extends the curve
    smoothly towards the observed maximum.

    >>> expected_max_weights(3, 1)
    array([0.33333333, 0.33333333, 0.33333333])
    >>> expected_max_weights(3, 3)
    array([0., 0., 1.])
    """
    if N < 1 or n < 1:
        raise ValueError(f"N and n must be >= 1, got N={N}, n={n}")
    i = np.arange(1, N + 1, dtype=float)
    if n > N:
        w = (i / N) ** n - ((i - 1) / N) ** n
        return w / w.sum()
    w = np.zeros(N)
    ok = i >= n
    ii = i[ok]
    log_w = (
        special.gammaln(ii)
        - special.gammaln(n)
        - special.gammaln(ii - n + 1)
        - (special.gammaln(N + 1) - special.gammaln(n + 1) - special.gammaln(N - n + 1))
    )
    w[ok] = np.exp(log_w)
    # The weights sum to 1 exactly (hockey-stick identity); renormalise away rounding.
    return w / w.sum()


def _weight_matrix(N: int) -> np.ndarray:
    """W[n−1, i−1] = C(i−1, n−1) / C(N, n) for n, i = 1..N, built in one vectorised step."""
    i = np.arange(1, N + 1, dtype=float)[None, :]
    n = np.arange(1, N + 1, dtype=float)[:, None]
    with np.errstate(invalid="ignore"):
        log_w = (
            special.gammaln(i)
            - special.gammaln(n)
            - special.gammaln(np.maximum(i - n + 1, 1))
            - (special.gammaln(N + 1) - special.gammaln(n + 1) - special.gammaln(N - n + 1))
        )
    W = np.where(i >= n, np.exp(log_w), 0.0)
    return W / W.sum(axis=1, keepdims=True)


def expected_max_curve(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Expected best score after n = 1 … N random trials, for N observed scores.

    Entry n−1 is E[max of n draws without replacement]; entry 0 is the mean ("untuned")
    and entry N−1 is the observed maximum.

    >>> expected_max_curve([0.2, 0.8, 0.5]).round(3).tolist()
    [0.5, 0.7, 0.8]
    """
    v = np.sort(np.asarray(values, dtype=float))
    if v.size == 0:
        return v
    return _weight_matrix(v.size) @ v


def expected_max(values: Sequence[float] | np.ndarray, n: int) -> float:
    """Expected best of ``n`` random trials drawn from ``values`` (see :func:`expected_max_weights`).

    >>> round(expected_max([0.2, 0.8, 0.5], 2), 3)  # mean of max over the 3 pairs
    0.7
    """
    v = np.sort(np.asarray(values, dtype=float))
    return float(expected_max_weights(v.size, n) @ v)


def normalise(scores: pd.DataFrame | np.ndarray, *, reference: int | None = None) -> np.ndarray:
    """Per-task normalised scores: 0 for the task's worst optimizer, 1 for its best.

    ``scores`` is tasks × optimizers (NaN = no data). With ``reference`` (a column index)
    the reference optimizer is 0 instead and the others are measured in units of the task's
    best-minus-worst spread, so +0.5 means "half the spread better than the reference".
    A task where all optimizers tie gives 1 to all of them (0 with a reference).
    Works on any leading batch dimensions: the last axis is the optimizer.
    """
    x = np.asarray(scores, dtype=float)
    if x.shape[-1] == 0:
        return x.copy()
    with np.errstate(invalid="ignore"):
        present = ~np.isnan(x)
        hi = np.max(np.where(present, x, -np.inf), axis=-1, keepdims=True)
        lo = np.min(np.where(present, x, np.inf), axis=-1, keepdims=True)
        spread = hi - lo
        tie = ~(spread > 1e-12 * np.maximum(np.abs(hi), 1.0))
        safe = np.where(tie, 1.0, spread)
        if reference is None:
            out = np.where(tie, 1.0, (x - lo) / safe)
        else:
            base = x[..., reference : reference + 1]
            out = np.where(tie, 0.0, (x - base) / safe)
    return np.where(present, out, np.nan)


def profile_ratios(costs: pd.DataFrame) -> pd.DataFrame:
    """r_{s,w} = c_{s,w} / min_s c_{s,w}: how many times the best cost of the task each
    optimizer pays. NaN stays NaN (no data on that task)."""
    c = costs.astype(float).clip(lower=COST_FLOOR)
    return c.div(c.min(axis=1, skipna=True), axis=0)


def performance_profile(
    costs: pd.DataFrame, taus: Sequence[float] | np.ndarray | None = None, *, r_max: float = R_MAX
) -> pd.DataFrame:
    """Dolan–Moré performance profiles ρ_s(τ): the fraction of tasks on which optimizer s
    is within a factor τ of the best cost.

    ``costs`` is tasks × optimizers. Each optimizer's fraction is over the tasks it has
    data on (missing data is not counted as failure). Returns τ × optimizers.

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
    out = pd.DataFrame(rho, index=pd.Index(taus, name="tau"), columns=costs.columns)
    return out


def profile_area(costs: pd.DataFrame, *, r_max: float = R_MAX) -> pd.Series:
    """Area score B_s = ∫₁^{r_max} ρ_s(τ) dτ / (r_max − 1), computed exactly.

    ρ_s is a step function, so its integral over [1, r_max] is the mean over tasks of
    (r_max − clip(r, 1, r_max)): 1 for an optimizer that is best everywhere, 0 for one
    that is ≥ r_max times the best everywhere.
    """
    r = profile_ratios(costs)
    area = (r_max - r.clip(lower=1.0, upper=r_max)) / (r_max - 1.0)
    return area.mean(axis=0, skipna=True)


def average_ranks(scores: pd.DataFrame) -> pd.Series:
    """Average rank of each optimizer over tasks (1 = best score; ties share the mean
    rank). Each task ranks only the optimizers it has data on."""
    ranks = scores.rank(axis=1, ascending=False, method="average")
    return ranks.mean(axis=0, skipna=True)


def friedman(scores: pd.DataFrame) -> dict[str, object]:
    """Friedman test of "all optimizers perform the same" over the tasks.

    It needs complete blocks, so it uses the optimizers that have data on every task;
    it is only run with ≥ 3 such optimizers and ≥ 3 tasks. Returns statistic, p,
    n_tasks, optimizers and, when it could not run, the reason.
    """
    full = scores.dropna(axis=1, how="any")
    out: dict[str, object] = {
        "statistic": None,
        "p": None,
        "n_tasks": int(full.shape[0]),
        "optimizers": [str(c) for c in full.columns],
        "reason": None,
    }
    if full.shape[0] < 3 or full.shape[1] < 3:
        out["reason"] = (
            f"needs >= 3 tasks and >= 3 optimizers with data on every task; "
            f"have {full.shape[0]} tasks and {full.shape[1]} such optimizers"
        )
        return out
    x = full.to_numpy(dtype=float)
    if np.all(x == x[:, :1]):
        # Every task is a complete tie: no evidence of any difference.
        out.update(statistic=0.0, p=1.0)
        return out
    res = stats.friedmanchisquare(*x.T)
    out.update(statistic=float(res.statistic), p=float(res.pvalue))
    return out
