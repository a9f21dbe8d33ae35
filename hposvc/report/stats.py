"""The statistics behind a verdict: bootstrap intervals and the rules that turn an
interval into *supported*, *not supported* or *inconclusive*. (Best-of-k budgets are
:func:`hposvc.stats.expected_best_of_k`, shared with the recommendation.)

Every interval here is a percentile bootstrap: the values of each group (the trials of
one arm of the design, e.g. one optimizer on one task; or the per-seed differences of a
comparison paired by seed) are resampled with replacement, the statistic is recomputed
on each resample, and the 2.5 % / 97.5 % quantiles of the recomputed values bound the
95 % interval. Resampling is
seeded, so a report built twice from the same trials says the same thing.

Small samples get wider intervals: the percentile bounds are taken at the *expanded*
tail probabilities of Hesterberg (2015) for the smallest group's size (see
:func:`expanded_tail`), which matches a t interval's width. A verdict needs
replication: when a group holds fewer than :data:`MIN_REPLICATES` values (e.g. a paired
effect measured on two seeds), its interval cannot be trusted, so :func:`decide` calls
the result *inconclusive*.

>>> arms = {"a": [0.9, 0.92, 0.91, 0.93], "b": [0.5, 0.55, 0.52, 0.54]}
>>> est = bootstrap(arms, lambda g: g["a"].mean() - g["b"].mean())
>>> round(est.estimate, 3), est.low > 0, est.n_min
(0.387, True, 4)
>>> decide(est, greater_than=0.0)
'supported'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CONFIDENCE",
    "Estimate",
    "INCONCLUSIVE",
    "N_BOOTSTRAP",
    "NOT_SUPPORTED",
    "SUPPORTED",
    "VERDICTS",
    "bootstrap",
    "decide",
]

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)

N_BOOTSTRAP = 2000  # resamples per interval: enough for stable 95 % percentile bounds
CONFIDENCE = 0.95  # two-sided coverage of every interval
SEED = 0  # resampling seed, so reports are reproducible
MIN_REPLICATES = 3  # fewer values in a group than this and an interval means nothing


@dataclass(frozen=True)
class Estimate:
    """A statistic on the trials and its bootstrap interval."""

    estimate: float  # the statistic on the trials as they are (nan when undefined)
    low: float  # lower bound of the 95 % percentile bootstrap interval
    high: float  # upper bound
    n: int  # trials (or paired units) the statistic used
    n_min: int  # the smallest stratum: below MIN_REPLICATES the interval is not trusted

    @property
    def defined(self) -> bool:
        return all(math.isfinite(v) for v in (self.estimate, self.low, self.high))


def bootstrap(
    groups: Mapping[str, Sequence[float]],
    statistic: Callable[[dict[str, np.ndarray]], float],
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = SEED,
) -> Estimate:
    """``statistic(groups)`` with a percentile bootstrap interval.

    ``groups`` maps a name to the values of one stratum (the trials of one arm, or the
    per-seed effects of a paired comparison); each resample draws every group's values
    with replacement at its own size and recomputes ``statistic`` on them. nan values
    are dropped first. Resamples where the statistic is undefined are skipped; if most
    are, the interval is nan.

    >>> e = bootstrap({"x": [1.0, 2.0, 3.0, 4.0]}, lambda g: g["x"].mean())
    >>> e.estimate, e.low >= 1.0, e.high <= 4.0, e.n
    (2.5, True, True, 4)
    """
    data = {k: np.asarray([v for v in vals if v is not None and math.isfinite(v)], dtype=float) for k, vals in groups.items()}
    n = sum(len(v) for v in data.values())
    n_min = min((len(v) for v in data.values()), default=0)
    estimate = _float(statistic(data)) if n_min > 0 else math.nan
    if not math.isfinite(estimate):
        return Estimate(estimate, math.nan, math.nan, n, n_min)
    rng = np.random.default_rng(seed)
    draws = {k: v[rng.integers(0, len(v), (n_boot, len(v)))] for k, v in data.items()}
    values = []
    for b in range(n_boot):
        value = _float(statistic({k: d[b] for k, d in draws.items()}))
        if math.isfinite(value):
            values.append(value)
    if len(values) < n_boot / 2:
        return Estimate(estimate, math.nan, math.nan, n, n_min)
    tail = expanded_tail(n_min) * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Estimate(estimate, float(low), float(high), n, n_min)


def expanded_tail(n: int) -> float:
    """The tail probability each percentile bound uses for a group of ``n`` values.

    A plain percentile bootstrap is too narrow for small samples (it behaves like a z
    interval with the biased variance). The *expanded percentile* interval (Hesterberg
    2015) widens it to match a t interval: tail = Phi(-sqrt(n / (n - 1)) * t_{0.975, n-1}).
    For 30 values that is about 2 %; for 3 it is the extremes of the resamples.

    >>> round(expanded_tail(30), 4), expanded_tail(3) < 1e-5
    (0.0188, True)
    """
    from scipy.stats import norm, t

    if n < 2:
        return (1.0 - CONFIDENCE) / 2
    return float(norm.cdf(-math.sqrt(n / (n - 1)) * t.ppf(1 - (1.0 - CONFIDENCE) / 2, n - 1)))


def _float(value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return out


def decide(
    est: Estimate,
    *,
    greater_than: float | None = None,
    less_than: float | None = None,
) -> str:
    """The verdict an interval gives on a one-sided hypothesis.

    - ``greater_than=t`` (the claim: the effect is above t): *supported* when the whole
      interval lies above t, *not supported* when it lies at or below t, else
      *inconclusive*.
    - ``less_than=t`` (the claim: the effect is below t, e.g. "within a margin"):
      *supported* when the interval lies below t, *not supported* when it lies at or
      above t, else *inconclusive*.

    Too few replicates (a group under :data:`MIN_REPLICATES` values) or an undefined
    interval is *inconclusive*.

    >>> decide(Estimate(0.2, 0.1, 0.3, 6, 3), greater_than=0.0)
    'supported'
    >>> decide(Estimate(0.0, 0.0, 0.0, 6, 3), greater_than=0.0)
    'not supported'
    >>> decide(Estimate(0.2, 0.1, 0.3, 4, 2), greater_than=0.0)
    'inconclusive'
    """
    if (greater_than is None) == (less_than is None):
        raise ValueError("give exactly one of greater_than and less_than")
    if not est.defined or est.n_min < MIN_REPLICATES:
        return INCONCLUSIVE
    if greater_than is not None:
        if est.low > greater_than:
            return SUPPORTED
        if est.high <= greater_than:
            return NOT_SUPPORTED
        return INCONCLUSIVE
    if est.high < less_than:
        return SUPPORTED
    if est.low >= less_than:
        return NOT_SUPPORTED
    return INCONCLUSIVE
