"""Tests of the statistics shared by report/ and recommendation/ (hposvc.stats) and of
the building blocks of the recommendation's statistics, against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from hposvc.errors import InvalidInputError
from hposvc.recommendation import _stats
from hposvc.stats import expected_best_of_k, expected_max_curve, expected_max_weights, holm

# -- the one best-of-k estimator ----------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 4, 6])
def test_expected_best_of_k_is_the_mean_best_over_all_subsets(N: int) -> None:
    values = np.random.default_rng(N).normal(size=N).round(1)  # ties must not matter
    for k in range(1, N + 1):
        subsets = list(itertools.combinations(values, k))
        assert expected_best_of_k(values, k) == pytest.approx(np.mean([max(c) for c in subsets]), abs=1e-12)
        assert expected_best_of_k(values, k, maximize=False) == pytest.approx(np.mean([min(c) for c in subsets]), abs=1e-12)
    np.testing.assert_allclose(expected_max_curve(values), [expected_best_of_k(values, k) for k in range(1, N + 1)])


@pytest.mark.parametrize("k", [4, 10])
def test_the_estimator_refuses_k_greater_than_n(k: int) -> None:
    with pytest.raises(InvalidInputError, match=rf"expected_best_of_k\(\): the 'k' parameter must be at most 3, the number of trials that ran\. Got {k} instead\. .*run more trials"):
        expected_best_of_k([0.1, 0.5, 0.9], k)
    with pytest.raises(InvalidInputError, match="at most 3"):
        expected_max_weights(3, k)
    with pytest.raises(InvalidInputError, match="the 'k' parameter must be an integer >= 1"):
        expected_best_of_k([0.1, 0.5], 0)
    with pytest.raises(InvalidInputError, match="the 'values' parameter must be finite numbers"):
        expected_best_of_k([0.1, math.nan, 0.5], 1)


def test_report_and_recommendation_use_the_same_estimator() -> None:
    from hposvc.recommendation import expected_max
    from hposvc.report import claims

    values = [0.31, 0.9, 0.52, 0.77, 0.6]
    assert claims.budget_curves(values) == pytest.approx(expected_max_curve(values).tolist())
    assert claims.budget_curves(values, maximize=False)[1] == pytest.approx(expected_best_of_k(values, 2, maximize=False))
    assert expected_max(values, 3) == expected_best_of_k(values, 3)
    # The report's curves stop at N, as the estimator does; nothing is extrapolated.
    assert len(claims.budget_curves(values)) == len(values)
    with pytest.raises(InvalidInputError):
        expected_max(values, 6)


def test_holm_matches_the_step_down_definition() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # Sorted: 0.005·4, 0.01·3, 0.03·2, 0.04·1 → 0.02, 0.03, 0.06, 0.06 (monotone).
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02, np.nan])
    assert holm([]).size == 0


# -- building blocks of the recommendation --------------------------------------------------------


def test_complete_matrix_drops_the_optimizer_or_task_that_costs_fewest_cells() -> None:
    m = pd.DataFrame(True, index=[f"t{i}" for i in range(4)], columns=list("abcdefgh"))
    m.loc[["t1", "t2", "t3"], "h"] = False  # h: one task only
    assert _stats.complete_matrix(m) == ([f"t{i}" for i in range(4)], list("abcdefg"))
    m = pd.DataFrame(True, index=[f"t{i}" for i in range(4)], columns=list("abc"))
    m.loc["t3", ["a", "b"]] = False  # t3: only c ran there
    assert _stats.complete_matrix(m) == (["t0", "t1", "t2"], list("abc"))
    m = pd.DataFrame({"a": [True, True], "b": [True, False]}, index=["t0", "t1"])
    assert _stats.complete_matrix(m) == (["t0"], ["a", "b"])  # a tie keeps the optimizers


def test_noise_ranks_tie_within_the_seed_noise_without_chaining() -> None:
    x = np.array([[0.90, 0.89, 0.88, 0.87, 0.50]])
    # Leader 0.90 takes 0.89 and 0.88 (within 0.02); 0.87 starts a new group.
    assert _stats.noise_ranks(x, np.array([0.02])).tolist() == [[2.0, 2.0, 2.0, 4.0, 5.0]]
    assert _stats.noise_ranks(x, np.array([np.nan])).tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0]]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_median_best_time_matches_all_subsets(k: int) -> None:
    times = np.array([2.0, 7.0, 3.0, math.inf, 5.0])
    best = sorted(min(c) for c in itertools.combinations(times, k))
    # The smallest t with P(fastest <= t) >= 1/2.
    want = next(t for t in best if np.mean(np.array(best) <= t) >= 0.5)
    assert _stats.median_best_time(times, k) == want
    with pytest.raises(InvalidInputError):
        _stats.median_best_time(times, 6)


def test_compare_with_top_needs_the_whole_step_down_to_name_a_best() -> None:
    rng = np.random.default_rng(0)
    # a is clearly ahead of everyone; b and c are indistinguishable from each other.
    boot = np.column_stack([rng.normal(m, 0.02, 2000) for m in (0.9, 0.6, 0.59)])
    cmp = _stats.compare_with_top(np.array([0.9, 0.6, 0.59]), boot)
    assert cmp.best == 0 and cmp.tied.tolist() == [True, False, False] and cmp.runner_up == 1
    assert cmp.low[1] > 0 and cmp.p_adj[1] <= 0.05
    # Without a: b is the top but cannot be told apart from c.
    cmp = _stats.compare_with_top(np.array([0.6, 0.59]), boot[:, 1:])
    assert cmp.best is None and cmp.tied.tolist() == [True, True] and cmp.low[1] < 0 < cmp.high[1]


def test_the_default_optimizer_claim_uses_budgets_up_to_the_smaller_arm() -> None:
    from hposvc.report.claims import claim_for_study
    from hposvc.report.data import StudyData

    # Adam (6 trials) against momentum (4 trials) on two tasks: budgets stop at k = 4,
    # where the estimator is defined for both arms; nothing beyond is made up.
    rng = np.random.default_rng(0)
    data = {}
    for task in ("digits", "moons"):
        rows = [{"optimizer": "adam", "score": 0.9 + rng.normal(0, 0.01)} for _ in range(6)]
        rows += [{"optimizer": "momentum", "score": 0.8 + rng.normal(0, 0.05)} for _ in range(4)]
        f = pd.DataFrame(rows).assign(state="COMPLETE", reason=None)
        data[f"guide-default-{task}"] = StudyData(f"guide-default-{task}", "val_accuracy", "maximize", task, task, 0.1, f, {})
    result = claim_for_study("guide-default-digits").evaluate(data)
    table = result.table.set_index("task")
    assert table["k_max"].eq(4).all()
    adam = data["guide-default-moons"].trials.query("optimizer == 'adam'")["score"]
    assert table.at["moons", "adam_best_of_k_max"] == pytest.approx(expected_best_of_k(adam, 4))
    assert all(np.isfinite(v.estimate) for v in result.verdicts)
