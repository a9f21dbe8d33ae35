"""Does a warm start pay off on tasks the recommendation never saw? Measured, per method.

Everything here is measured on the survey's held-out tasks, from trials that already ran:
each held-out task has an lr sweep of every optimizer (the *pool*, all at seed 0), so a
random search over the task's space is a random ordering of its pool, and a configuration
a method proposes is scored by its own run in the pool (the sweep shares one lr grid
across tasks). The target is 95 % of the best value in the pool (a loss: best / 0.95);
the cost of a method is the expected number of trials until the first one reaches it.

Methods (the protocol tasks are the only source; a held-out task never informs itself):

- ``random``: random search over the pool, (P + 1) / (M + 1) for P trials of which M hit.
- ``shortlist``: the shipped ``--warm-start`` queue (each optimizer's lr cell with the best
  mean anchored score over all protocol tasks, best first, :data:`WARM_TOP` of them),
  then random search over the rest.
- ``shortlist (same kind)``: the same list computed from the protocol tasks of the
  held-out task's kind of model only (all tasks when the kind has none).
- ``narrowed space`` / ``narrowed space (same kind)``: Perrone et al. (2019)'s learned
  search space: the smallest box around the best configuration of each source task
  (per optimizer that was best somewhere: the range of its best lrs); random search
  inside it, then outside when nothing inside reaches the target.
- ``CMA-ES (same kind)``: Optuna's ``CmaEsSampler(source_trials=...)`` warm-started with
  the same-kind protocol trials. Optuna warm-starts CMA-ES only from source trials whose
  every parameter is continuous (a categorical one makes them "incompatible"), so the
  optimizer is fixed to the same-kind shortlist's first and CMA-ES searches its lr (in
  decades from the one-shot default), warm-started from that optimizer's source trials;
  each proposal is scored by the nearest sweep point. Averaged over seeds; a run that
  never reaches the target counts :data:`CMA_MAX_TRIALS` trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hposvc.config import ONE_SHOT_DEFAULTS
from hposvc.recommendation._warm import WARM_TOP

__all__ = ["FRACTION", "METHODS", "WARM_TOP", "evaluate_warm_starts", "expected_first_hit"]

FRACTION = 0.95  # "good enough": 95 % of the best value in the pool
CMA_SEEDS = 20  # independent CMA-ES runs per held-out task
CMA_MAX_TRIALS = 150  # a run that has not reached the target by then counts this many
CMA_MIN_SOURCE = 10  # warm starting fits the best 10 % of the source trials (cmaes' gamma = 0.1)
METHODS = ("random", "shortlist", "shortlist (same kind)", "narrowed space", "narrowed space (same kind)", "CMA-ES (same kind)")


def expected_first_hit(n_pool: int, n_hits: int) -> float:
    """Expected 1-based position of the first hit in a random ordering of ``n_pool``
    items of which ``n_hits`` are hits (without replacement); n_pool + 1 when none is.

    >>> expected_first_hit(72, 8), expected_first_hit(10, 0)
    (8.11111111111111, 11.0)
    """
    return (n_pool + 1) / (n_hits + 1)


def evaluate_warm_starts(proto: pd.DataFrame, held: pd.DataFrame, *, cma_seeds: int = CMA_SEEDS) -> dict[str, Any]:
    """Per held-out task and method, the expected trials to the target and the ratio
    random / method; per method the geometric mean of the ratios; and the best method.

    ``proto`` and ``held`` are :func:`~hposvc.recommendation.survey_frame` rows of the
    protocol and held-out tasks (columns task, kind, optimizer, lr, value, score,
    direction, at_defaults, floor)."""
    rows = []
    for task, g in held.groupby("task", sort=True):
        kind = str(g["kind"].iloc[0])
        same = proto[proto["kind"] == kind]
        same = same if len(same) else proto
        pool = _Pool(g)
        costs = {
            "random": pool.random(),
            "shortlist": pool.after_first(_shortlist(proto)),
            "shortlist (same kind)": pool.after_first(_shortlist(same)),
            "narrowed space": pool.inside(_box(proto)),
            "narrowed space (same kind)": pool.inside(_box(same)),
            "CMA-ES (same kind)": pool.cma(same, cma_seeds),
        }
        rows.append(
            {
                "task": str(task),
                "kind": kind,
                "same_kind_tasks": sorted(same["task"].unique()),
                "pool": pool.n,
                "reaching": pool.hits,
                "target": pool.target,
                "trials": costs,
                "ratio": {m: costs["random"] / c for m, c in costs.items()},
                "notes": dict(pool.notes),
            }
        )
    geo = {m: float(np.exp(np.mean([math.log(r["ratio"][m]) for r in rows]))) for m in METHODS} if rows else {}
    best = max((m for m in METHODS if m != "random"), key=lambda m: geo[m]) if rows else None
    return {"fraction": FRACTION, "top": WARM_TOP, "methods": list(METHODS), "tasks": rows, "geometric_mean": geo, "best": best}


def _shortlist(source: pd.DataFrame) -> list[tuple[str, float]]:
    """(optimizer, lr) of the shipped warm-start list computed from ``source``, first WARM_TOP."""
    from hposvc.recommendation._results import survey_warm_list

    return [(w["optimizer"], float(w["lr"])) for w in survey_warm_list(source)[:WARM_TOP]]


def _box(source: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Perrone et al.'s box: per optimizer that gave some source task its best sweep
    trial, the range of those best lrs."""
    search = source[~source["at_defaults"]]
    best = search.loc[search.groupby("task")["score"].idxmax()]
    return {str(o): (float(g["lr"].min()), float(g["lr"].max())) for o, g in best.groupby("optimizer")}


class _Pool:
    """One held-out task's lr-sweep trials and its target."""

    def __init__(self, g: pd.DataFrame) -> None:
        self.maximize = g["direction"].iloc[0] == "maximize"
        self.search = g[~g["at_defaults"]].reset_index(drop=True)
        self.defaults = g[g["at_defaults"]]
        values = self.search["value"].astype(float).fillna(-math.inf if self.maximize else math.inf)
        best = values.max() if self.maximize else values.min()
        self.target = float(FRACTION * best if self.maximize else best / FRACTION)
        self.reached = (values >= self.target) if self.maximize else (values <= self.target)
        self.n, self.hits = len(self.search), int(self.reached.sum())
        self.optimizers = [o for o in ONE_SHOT_DEFAULTS if o in set(self.search["optimizer"])]
        self.notes: dict[str, str] = {}  # method -> what it did on this task

    def random(self) -> float:
        return expected_first_hit(self.n, self.hits)

    def _index(self, optimizer: str, lr: float) -> int:
        """The pool trial of ``optimizer`` nearest ``lr`` in log space."""
        mine = self.search.index[self.search["optimizer"] == optimizer]
        lrs = self.search.loc[mine, "lr"].to_numpy(dtype=float)
        return int(mine[int(np.argmin(np.abs(np.log(lrs) - math.log(lr))))])

    def after_first(self, first: Sequence[tuple[str, float]]) -> float:
        """The configurations ``first`` in order, then random search over the rest."""
        used: set[int] = set()
        for i, (opt, lr) in enumerate(first, start=1):
            j = self._index(opt, lr)
            if self.reached.iloc[j]:
                return float(i)
            used.add(j)
        rest = self.reached.drop(index=list(used))
        return len(first) + expected_first_hit(len(rest), int(rest.sum()))

    def inside(self, box: dict[str, tuple[float, float]]) -> float:
        """Random search inside the box, then over the rest of the pool."""
        lr = self.search["lr"].astype(float)
        tol = 1e-6
        mask = pd.Series(False, index=self.search.index)
        for opt, (lo, hi) in box.items():
            mask |= (self.search["optimizer"] == opt) & (lr >= lo * (1 - tol)) & (lr <= hi * (1 + tol))
        n_in, hits_in = int(mask.sum()), int(self.reached[mask].sum())
        if hits_in:
            return expected_first_hit(n_in, hits_in)
        return n_in + expected_first_hit(self.n - n_in, self.hits)

    def cma(self, source: pd.DataFrame, seeds: int) -> float:
        """Mean over ``seeds`` runs of Optuna's warm-started CMA-ES on the lr of the
        same-kind shortlist's first optimizer (capped)."""
        optimizer = _shortlist(source)[0][0]
        trials = _source_trials(source[source["optimizer"] == optimizer], optimizer)
        # Warm starting fits the best 10 % of the source trials: with fewer than 10 there
        # is nothing to fit, and CMA-ES starts cold (the table says so).
        self.notes["CMA-ES (same kind)"] = f"{optimizer}'s lr" + ("" if len(trials) >= CMA_MIN_SOURCE else f"; cold: {len(trials)} source trials < {CMA_MIN_SOURCE}")
        warm = trials if len(trials) >= CMA_MIN_SOURCE else None
        return float(np.mean([_cma_run(warm, self, optimizer, seed) for seed in range(seeds)]))

    def value_at(self, optimizer: str, decades: float) -> tuple[float, bool]:
        j = self._index(optimizer, ONE_SHOT_DEFAULTS[optimizer]["lr"] * 10.0**decades)
        return float(self.search.at[j, "score"]), bool(self.reached.iloc[j])


_DECADES = (-1.5, 1.5)  # lr / one-shot default, log10: the sweep's three decades


def _source_trials(source: pd.DataFrame, optimizer: str) -> list[Any]:
    """``optimizer``'s sweep trials on the source tasks as finished Optuna trials on the
    space {decades}, each valued by its anchored score on its own task."""
    import optuna

    from hposvc.recommendation import _stats

    space = {"decades": optuna.distributions.FloatDistribution(*_DECADES)}
    out = []
    search = source[~source["at_defaults"]]
    for _, g in search.groupby("task"):
        floor = float(g["floor"].iloc[0]) * (1.0 if g["direction"].iloc[0] == "maximize" else -1.0)
        best = float(g["score"].max())
        if not math.isfinite(floor) or floor >= best:
            floor = float(g["score"].min())
        values = _stats.anchored(g["score"].to_numpy(dtype=float), np.full(len(g), floor), np.full(len(g), best))
        for lr, v in zip(g["lr"].astype(float), values):
            decades = min(max(math.log10(lr / ONE_SHOT_DEFAULTS[optimizer]["lr"]), _DECADES[0]), _DECADES[1])
            out.append(optuna.trial.create_trial(params={"decades": decades}, distributions=space, value=float(v)))
    return out


def _cma_run(source_trials: list[Any] | None, pool: _Pool, optimizer: str, seed: int) -> int:
    """Trials one warm-started CMA-ES run needs to reach the pool's target (capped)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler = optuna.samplers.CmaEsSampler(source_trials=source_trials, seed=seed, warn_independent_sampling=False)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    space = {"decades": optuna.distributions.FloatDistribution(*_DECADES)}
    for i in range(1, CMA_MAX_TRIALS + 1):
        trial = study.ask(space)
        score, hit = pool.value_at(optimizer, trial.params["decades"])
        study.tell(trial, score)
        if hit:
            return i
    return CMA_MAX_TRIALS
