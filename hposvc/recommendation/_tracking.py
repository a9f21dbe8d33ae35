"""Logging a recommendation to MLflow, with its table and plots as artifacts.

Everything goes through an explicit ``mlflow.MlflowClient`` and an explicit run id; no
fluent "active run" state. mlflow and matplotlib are imported lazily (both are slow).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hposvc.errors import TrackingError
from hposvc.recommendation import _stats
from hposvc.recommendation._core import Recommendation
from hposvc.storage import resolve_tracking_uri
from hposvc.tracking import ensure_experiment, mlflow_client

__all__ = ["EXPERIMENT", "log_recommendation", "write_plots"]

EXPERIMENT = "hposvc-recommendations"
# Per-task panels drawn beside the aggregate budget curve; more would be unreadable.
MAX_TASK_PANELS = 8


def log_recommendation(
    rec: Recommendation, tracking_uri: str | None = None, *, data_dir: str | os.PathLike[str] | None = None
) -> str:
    """Log ``rec`` as a run in the "hposvc-recommendations" experiment; return the run id.

    Params: budget, studies, settings; metrics: score/ci/p_best/profile_area/rank per
    optimizer; artifacts: recommendation.csv, task_scores.csv, budget_curves.csv,
    recommendation.json and plots/{budget_curves,performance_profiles,score_distributions}.png.
    The run ends FINISHED, or FAILED if anything raises while logging. ``tracking_uri`` and
    ``data_dir`` resolve as everywhere in hposvc (:mod:`hposvc.storage`).

    >>> log_recommendation(rec, "sqlite:///hposvc-data/mlflow.db")  # doctest: +SKIP
    'a1b2c3...'
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    try:
        client = mlflow_client(uri)
        exp_id = ensure_experiment(client, EXPERIMENT, uri=uri, data_dir=data_dir)
        run = client.create_run(
            exp_id,
            run_name=f"recommend-{rec.best or 'none'}-budget{rec.budget}",
            tags={"hposvc.kind": "recommendation", "hposvc.best": str(rec.best)},
        )
    except MlflowException as e:
        raise TrackingError(f"cannot start an MLflow run in {uri!r}: {e}") from e
    run_id = run.info.run_id
    try:
        ts = int(rec.created_at.timestamp() * 1000)
        params = {
            "budget": rec.budget,
            "studies": ",".join(rec.studies)[:6000] or "(none)",
            "n_studies": len(rec.studies),
            "n_trials": rec.n_trials,
            "best": rec.best,
            **{k: v for k, v in rec.settings.items() if k != "budget"},
        }
        metrics = []
        for row in rec.table.itertuples(index=False):
            for name in ("score", "ci_low", "ci_high", "p_best", "profile_area", "rank"):
                value = getattr(row, name)
                if value is not None and np.isfinite(value):
                    metrics.append(Metric(f"{name}/{row.optimizer}", float(value), ts, 0))
        if rec.friedman.get("p") is not None:
            metrics.append(Metric("friedman_p", float(rec.friedman["p"]), ts, 0))
        tags = [RunTag("hposvc.summary", rec.summary[:5000])]
        if rec.id is not None:
            tags.append(RunTag("hposvc.recommendation_id", str(rec.id)))
        client.log_batch(
            run_id,
            metrics=metrics,
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=tags,
        )
        with tempfile.TemporaryDirectory(prefix="hposvc-rec-") as tmp:
            out = Path(tmp)
            rec.table.to_csv(out / "recommendation.csv", index=False)
            rec.task_scores.to_csv(out / "task_scores.csv", index=False)
            rec.budget_curves.to_csv(out / "budget_curves.csv", index=False)
            if not rec.by.empty:
                rec.by.to_csv(out / f"by_{rec.by_key}.csv", index=False)
            (out / "recommendation.json").write_text(json.dumps(rec.to_dict(), indent=1))
            write_plots(rec, out / "plots")
            client.log_artifacts(run_id, str(out))
    except BaseException as e:
        _terminate(client, run_id, "FAILED")
        if isinstance(e, (MlflowException, OSError)):
            raise TrackingError(f"logging the recommendation to MLflow run {run_id} failed: {e}") from e
        raise
    _terminate(client, run_id, "FINISHED")
    return run_id


def _terminate(client: Any, run_id: str, status: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.set_terminated(run_id, status)
    except MlflowException as e:
        raise TrackingError(f"cannot mark MLflow run {run_id} {status}: {e}") from e


# -- plots ----------------------------------------------------------------------------------


def write_plots(rec: Recommendation, folder: Path) -> list[Path]:
    """Write the three PNG plots of ``rec`` into ``folder``; return their paths."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas

    folder.mkdir(parents=True, exist_ok=True)
    optimizers = [o for o in rec.table["optimizer"] if o in set(rec.task_scores["optimizer"])]
    colours = {o: f"C{k % 10}" for k, o in enumerate(optimizers)}
    paths = []

    # 1) budget curves: aggregate (each task scaled 0..1 by its observed range) + per task
    curves = rec.budget_curves
    tasks = sorted(curves["task"].unique()) if not curves.empty else []
    panels = 1 + min(len(tasks), MAX_TASK_PANELS)
    ncols = min(panels, 3)
    nrows = int(np.ceil(panels / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    ax = axes[0]
    if tasks:
        scaled = curves.copy()
        g = scaled.groupby("task")["expected_best"]
        lo, hi = g.transform("min"), g.transform("max")
        sign = np.where(scaled["direction"] == "minimize", -1.0, 1.0)
        scaled["scaled"] = np.where(hi > lo, (scaled["expected_best"] - lo) / (hi - lo).where(hi > lo, 1.0), 1.0)
        scaled.loc[sign < 0, "scaled"] = 1.0 - scaled.loc[sign < 0, "scaled"]
        for opt in optimizers:
            c = scaled[scaled["optimizer"] == opt]
            if c.empty:
                continue
            # Only up to the n every task of this optimizer reaches, so the mean is over
            # the same tasks at every point.
            n_max = c.groupby("task")["n"].max().min()
            m = c[c["n"] <= n_max].groupby("n")["scaled"].mean()
            ax.plot(m.index, m.to_numpy(), label=opt, color=colours[opt])
        ax.axvline(rec.budget, color="grey", ls="--", lw=0.8)
        ax.legend(fontsize=7)
    ax.set(title="all tasks (scaled per task)", xlabel="trials n", ylabel="expected best (0–1)")
    for ax, task in zip(axes[1:], tasks[:MAX_TASK_PANELS]):
        c = curves[curves["task"] == task]
        for opt, g in c.groupby("optimizer", sort=False):
            ax.plot(g["n"], g["expected_best"], color=colours.get(opt), label=opt)
        ax.axvline(rec.budget, color="grey", ls="--", lw=0.8)
        ax.set(title=task, xlabel="trials n", ylabel=f"expected best {c['metric'].iloc[0]}")
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(f"Budget curves (expected best of n random trials); budget = {rec.budget}")
    paths.append(_save(fig, folder / "budget_curves.png"))

    # 2) performance profiles
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ts = rec.task_scores[rec.task_scores["status"] == "ok"]
    if not ts.empty:
        costs = ts.pivot(index="task", columns="optimizer", values="cost")
        taus = np.linspace(1.0, _stats.R_MAX, 601)
        prof = _stats.performance_profile(costs, taus)
        area = rec.table.set_index("optimizer")["profile_area"]
        for opt in optimizers:
            if opt in prof.columns:
                ax.step(taus, prof[opt].to_numpy(), where="post", color=colours[opt], label=f"{opt} (B={area.get(opt, np.nan):.2f})")
        ax.legend(fontsize=7)
    ax.set(xlabel="τ (cost / best cost on the task)", ylabel="ρ(τ): fraction of tasks", ylim=(-0.02, 1.02), xlim=(1, _stats.R_MAX))
    ax.set_title(f"Performance profiles at budget {rec.budget}")
    paths.append(_save(fig, folder / "performance_profiles.png"))

    # 3) score distributions: per-task normalised scores and the bootstrap of the mean
    fig = Figure(figsize=(max(6, 0.9 * len(optimizers) + 2), 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    data = [ts.loc[ts["optimizer"] == o, "score"].dropna().to_numpy() for o in optimizers]
    if any(len(d) for d in data):
        ax1.boxplot([d if len(d) else [np.nan] for d in data], tick_labels=optimizers)
        rng = np.random.default_rng(0)
        for k, d in enumerate(data, start=1):
            ax1.scatter(k + rng.uniform(-0.15, 0.15, len(d)), d, s=8, alpha=0.6, color=colours[optimizers[k - 1]])
    ax1.set(title="per-task normalised score", ylabel="score at budget")
    boot = rec.bootstrap_scores
    bdata = [boot[o].dropna().to_numpy() if o in boot else np.array([]) for o in optimizers]
    if any(len(d) for d in bdata):
        ax2.violinplot([d if len(d) else [0.0] for d in bdata], showmedians=True)
        ax2.set_xticks(range(1, len(optimizers) + 1), optimizers)
    ax2.set(title="bootstrap of the mean score", ylabel="aggregate score")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    paths.append(_save(fig, folder / "score_distributions.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path
