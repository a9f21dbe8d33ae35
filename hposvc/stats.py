"""Statistics shared by :mod:`hposvc.report` and :mod:`hposvc.recommendation`.

Pure numpy/scipy; it imports nothing from hposvc but :mod:`hposvc.errors`, so both
packages can use it without reaching into each other (and no core module imports it).

- :func:`expected_best_of_k`: the expected best of ``k`` random trials, estimated
  without bias from the ``N`` trials that ran (``k <= N`` only);
- :func:`expected_max_curve`: the same for every ``k = 1 … N`` at once;
- :func:`holm`: Holm's step-down adjustment of a family of p-values.

>>> round(expected_best_of_k([0.2, 0.8, 0.5], 2), 6)  # the mean of the best of each of the 3 pairs
0.7
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import special

from hposvc.errors import invalid

__all__ = ["expected_best_of_k", "expected_max_curve", "expected_max_weights", "holm"]


def expected_max_weights(N: int, k: int) -> np.ndarray:
    """Weights w with E[max of k draws without replacement] = w · sorted(values), for N
    values sorted ascending: w_i = C(i−1, k−1) / C(N, k) (Dodge et al. 2019; Tang et al.
    2020), computed in log space so it stays exact for N in the thousands.

    ``k`` must be between 1 and ``N``: there is no unbiased estimate of the best of more
    trials than ran, and extrapolating (e.g. by drawing with replacement) silently turns
    the observed maximum into a forecast.

    >>> expected_max_weights(3, 1)
    array([0.33333333, 0.33333333, 0.33333333])
    >>> expected_max_weights(3, 3)
    array([0., 0., 1.])
    """
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
        raise invalid("N", N, "an integer >= 1 (the number of trials that ran)", source="expected_max_weights()")
    _check_k(k, int(N), "expected_max_weights()")
    return _weights(int(N), int(k)).copy()


@functools.lru_cache(maxsize=4096)
def _weights(N: int, k: int) -> np.ndarray:
    i = np.arange(1, N + 1, dtype=float)
    w = np.zeros(N)
    ok = i >= k
    ii = i[ok]
    log_w = (
        special.gammaln(ii)
        - special.gammaln(k)
        - special.gammaln(ii - k + 1)
        - (special.gammaln(N + 1) - special.gammaln(k + 1) - special.gammaln(N - k + 1))
    )
    w[ok] = np.exp(log_w)
    # The weights sum to 1 exactly (hockey-stick identity); renormalise away rounding.
    w /= w.sum()
    w.flags.writeable = False  # cached: callers get a view they cannot corrupt
    return w


def _check_k(k: int, N: int, source: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise invalid("k", k, "an integer >= 1 (the number of random trials)", source=source)
    if k > N:
        raise invalid(
            "k",
            k,
            f"at most {N}, the number of trials that ran",
            source=source,
            hint="The best of more trials than ran cannot be estimated without bias; "
            "cap the budget at the trials available or run more trials.",
        )


def _finite_sorted(values: Sequence[float] | np.ndarray, source: str) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(v).all():
        raise invalid("values", v.tolist()[:10], "finite numbers (drop or score failed trials first)", source=source)
    return np.sort(v)


def expected_best_of_k(values: Sequence[float] | np.ndarray, k: int, *, maximize: bool = True) -> float:
    """Expected best of ``k`` trials drawn without replacement from ``values``: the outcome
    of a random search with budget ``k``, estimated from the trials that ran.

    ``maximize=False`` gives the expected lowest value (a loss). Refuses ``k`` greater
    than the number of values with :class:`~hposvc.errors.InvalidInputError`.

    >>> expected_best_of_k([0.1, 0.5, 0.9], 1)  # one trial: the mean
    0.5
    >>> expected_best_of_k([0.1, 0.5, 0.9], 3)  # all of them: the best
    0.9
    >>> round(expected_best_of_k([0.1, 0.5, 0.9], 2), 4)  # pairs: .5, .9, .9
    0.7667
    >>> round(expected_best_of_k([0.1, 0.5, 0.9], 2, maximize=False), 4)  # pairs: .1, .1, .5
    0.2333
    """
    v = _finite_sorted(values, "expected_best_of_k()")
    _check_k(k, v.size, "expected_best_of_k()")
    if not maximize:
        v = v[::-1]
    return float(_weights(v.size, int(k)) @ v)


def expected_max_curve(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Expected best (highest) of k random trials for every k = 1 … N, for N values.

    Entry k−1 is E[max of k draws without replacement]: entry 0 is the mean and entry
    N−1 the observed maximum. The curve stops at N, never beyond.

    >>> expected_max_curve([0.2, 0.8, 0.5]).round(3).tolist()
    [0.5, 0.7, 0.8]
    """
    v = _finite_sorted(values, "expected_max_curve()")
    if v.size == 0:
        return v
    return _weight_matrix(v.size) @ v


def _weight_matrix(N: int) -> np.ndarray:
    """W[k−1, i−1] = C(i−1, k−1) / C(N, k) for k, i = 1 … N, in one vectorised step."""
    i = np.arange(1, N + 1, dtype=float)[None, :]
    k = np.arange(1, N + 1, dtype=float)[:, None]
    with np.errstate(invalid="ignore"):
        log_w = (
            special.gammaln(i)
            - special.gammaln(k)
            - special.gammaln(np.maximum(i - k + 1, 1))
            - (special.gammaln(N + 1) - special.gammaln(k + 1) - special.gammaln(N - k + 1))
        )
    W = np.where(i >= k, np.exp(log_w), 0.0)
    return W / W.sum(axis=1, keepdims=True)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence).

    The i-th smallest p is multiplied by (m − i + 1) and the results made monotone; a
    hypothesis is rejected at level α when its adjusted p is ≤ α. NaN stays NaN and is
    not counted in m.

    >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    idx = np.flatnonzero(ok)
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = p[order] * (m - np.arange(m))
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out
