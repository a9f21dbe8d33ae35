"""What a user sees of a study in MLflow: the experiment, the parent run's summary, plots.

Every function takes an explicit :class:`mlflow.MlflowClient` and run ids, and reads the
study from its Optuna storage, so whoever writes MLflow (the tracker today, a tracking
process draining an outbox tomorrow) calls them where it finishes a trial or a study.

- :func:`setup_experiment`: the experiment opens on its training runs, not MLflow 3's
  GenAI overview, and says in its description what the study is.
- :func:`log_best_value`: after each finished trial, the parent run's ``best_value`` at
  step = trial number: MLflow's chart view draws the optimisation history live.
- :func:`summarise_study`: at the study's end, the parent run gets the best trial's config
  as params, counts by state, ``summary.md`` (spec, best config, top 5 trials, the plan
  that ran) and the plots: ``plots/dashboard.html`` (Optuna's interactive plotly
  visualisations and hposvc's own, which MLflow's artifact viewer renders) with a PNG copy
  of each plot.
- :func:`runs_url`: the study's runs page, for ``hposvc study run`` and ``hposvc ui``.

Heavy imports (plotly, matplotlib) happen inside :func:`log_plots` only.
"""

from __future__ import annotations

import html
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from hposvc import queue, records

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

__all__ = [
    "EXPERIMENT_KIND",
    "PLOTS",
    "VALUE_METRIC",
    "best_so_far",
    "log_best_value",
    "log_plots",
    "runs_url",
    "setup_experiment",
    "study_runs_url",
    "study_summary_markdown",
    "summarise_study",
]

log = logging.getLogger(__name__)

# MLflow 3 opens an experiment on its GenAI pages (traces, evaluations) unless the
# experiment says it is about training models; the UI reads this tag (and, from 3.x on,
# the `workflowType` URL parameter, which runs_url() sets too).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
WORKFLOW_TYPE = "machine_learning"  # the UI's "Model training" mode, as its URL names it
# Every trial run's final value of the study's metric, under one name in every study (the
# name Optuna's MLflowCallback uses): the runs table sorts by it, the compare view plots it.
VALUE_METRIC = "value"
DIRECTION_TAG = "hposvc.direction"  # on the experiment: maximize | minimize (runs_url sorts by it)
TOP_K = 5  # trials listed in summary.md
# The plots, in the order dashboard.html shows them: name -> title.
PLOTS = {
    "optimization_history": "Optimisation history",
    "param_importances": "Parameter importances (PED-ANOVA)",
    "parallel_coordinate": "Parallel coordinates",
    "slice": "Slice plots",
    "intermediate_values": "Intermediate values (every trial's learning curve)",
    "lr_optimizer": "Learning rate × optimizer",
    "norm_init": "Normalisation × initialisation",
}


# -- the experiment --------------------------------------------------------------------


def setup_experiment(client: "MlflowClient", experiment_id: str, *, study: str, metric: str | None = None, direction: str | None = None) -> None:
    """Make the experiment open on its training runs and describe the study in it."""
    exp = client.get_experiment(experiment_id)
    wanted = {
        **EXPERIMENT_KIND,
        **({DIRECTION_TAG: direction} if direction else {}),
        "mlflow.note.content": (
            f"hposvc study **{study}**"
            + (f": {direction or 'optimise'} `{metric}`." if metric else ".")
            + f" One run per trial (metric `{VALUE_METRIC}` = its final `{metric or 'objective'}`), nested under"
            f" the parent run `{study}`, whose `summary.md` and `plots/dashboard.html` summarise the study."
        ),
    }
    for key, value in wanted.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)


def runs_url(base: str, experiment_id: str, *, maximize: bool | None = None) -> str:
    """The study's training-runs page in the MLflow UI at ``base`` (``http://host:port``),
    trials sorted best first by their final value when the direction is known."""
    query = f"workflowType={WORKFLOW_TYPE}"
    if maximize is not None:
        query += f"&orderByKey={quote(f'metrics.`{VALUE_METRIC}`')}&orderByAsc={'false' if maximize else 'true'}"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def study_runs_url(client: "MlflowClient", base: str, experiment: str) -> str | None:
    """:func:`runs_url` of the experiment named ``experiment`` (None when there is none)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        return None
    direction = exp.tags.get(DIRECTION_TAG)
    return runs_url(base, exp.experiment_id, maximize=None if direction is None else direction == "maximize")


# -- live history ----------------------------------------------------------------------


def best_so_far(study: "optuna.Study", trial_number: int, *, trials: list | None = None) -> float | None:
    """The best value among the study's COMPLETE trials numbered ``trial_number`` or lower
    (what Optuna's optimisation-history plot draws at that trial); None before any."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    values = [t.value for t in trials if t.number <= trial_number and t.state.name == "COMPLETE" and t.value is not None]
    if not values:
        return None
    return max(values) if study.direction.name == "MAXIMIZE" else min(values)


def log_best_value(client: "MlflowClient", parent_run_id: str, study: "optuna.Study", trial_number: int) -> float | None:
    """Log the parent run's ``best_value`` at step ``trial_number`` once that trial has
    finished (COMPLETE or PRUNED); nothing for a failed trial or before any completed."""
    from mlflow.entities import Metric

    trials = study.get_trials(deepcopy=False)
    if not any(t.number == trial_number and t.state.name in records.DONE_STATES for t in trials):
        return None
    best = best_so_far(study, trial_number, trials=trials)
    if best is not None:
        client.log_batch(parent_run_id, metrics=[Metric("best_value", float(best), _now_ms(), trial_number)])
    return best


def _running_best(study: "optuna.Study", trials: list) -> dict[int, float]:
    """:func:`best_so_far` at every trial number from the first COMPLETE one, in one pass."""
    better = max if study.direction.name == "MAXIMIZE" else min
    out: dict[int, float] = {}
    best = None
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.name == "COMPLETE" and t.value is not None:
            best = t.value if best is None else better(best, t.value)
        if best is not None:
            out[t.number] = best
    return out


def _fill_history(client: "MlflowClient", parent_run_id: str, study: "optuna.Study") -> None:
    """At the study's end: a ``best_value`` point for every finished trial that has none
    (one logged during an MLflow outage, or by an older hposvc), and the last point right.

    Trials finishing out of order (several workers) can leave the last step's live value
    short of the study's best; it is logged again at that step, later, and MLflow's
    latest value is then the study's best.
    """
    from mlflow.entities import Metric

    trials = study.get_trials(deepcopy=False)
    finished = sorted(t.number for t in trials if t.state.name in records.DONE_STATES)
    history: dict[int, Any] = {}
    for m in client.get_metric_history(parent_run_id, "best_value"):
        if m.step not in history or m.timestamp >= history[m.step].timestamp:
            history[m.step] = m  # the latest point of a step is the one MLflow shows
    running = _running_best(study, trials)
    now = _now_ms()
    points = []
    for number in finished:
        if number not in history and (best := running.get(number)) is not None:
            points.append(Metric("best_value", float(best), now, number))
    if finished and finished[-1] in history:
        last, best = history[finished[-1]], running.get(finished[-1])
        if best is not None and last.value != best:
            points.append(Metric("best_value", float(best), max(now, last.timestamp + 1), finished[-1]))
    for i in range(0, len(points), 1000):
        client.log_batch(parent_run_id, metrics=points[i : i + 1000])


# -- the study's end -------------------------------------------------------------------


def summarise_study(
    client: "MlflowClient",
    parent_run_id: str,
    study: "optuna.Study",
    *,
    spec: Mapping[str, Any] | None = None,
    plan: str | None = None,
    plots: bool = True,
) -> None:
    """Write the parent run's summary: best config as params, counts by state, the
    ``best_value`` history completed, ``summary.md``, and (``plots``) the plots.

    ``spec`` defaults to the spec stored on the study; ``plan`` is the one-line plan that
    ran (workers, devices, population), if the caller knows it.
    """
    from mlflow.entities import Metric, RunTag

    info = records.study_info(study)
    spec = dict(spec if spec is not None else info.spec or {})
    best = records.best_trial(study)
    now = _now_ms()
    by_state = queue.counts(study).by_state
    metrics = [Metric(f"n_{state.lower()}", float(n), now, 0) for state, n in sorted(by_state.items())]
    client.log_batch(parent_run_id, metrics=metrics)
    _fill_history(client, parent_run_id, study)
    if best is not None:
        config = best.user_attrs.get(records.CONFIG) or {}
        client.log_dict(parent_run_id, config, "best_config.json")
        client.set_tag(parent_run_id, "hposvc.best_trial", str(best.number))
        _log_best_params(client, parent_run_id, config)
        if best_run := _trial_run_id(client, parent_run_id, best.number):
            client.set_tag(parent_run_id, "hposvc.best_run_id", best_run)
    client.log_batch(parent_run_id, tags=[RunTag("hposvc.direction", study.direction.name.lower())] + ([RunTag("hposvc.metric", info.metric)] if info.metric else []))
    client.log_text(parent_run_id, study_summary_markdown(study, spec=spec, plan=plan), "summary.md")
    if plots:
        log_plots(client, parent_run_id, study)


def _trial_run_id(client: "MlflowClient", parent_run_id: str, trial_number: int) -> str | None:
    """The run of trial ``trial_number`` under this parent run, if it reached MLflow."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`hposvc.trial_number` = '{trial_number}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _log_best_params(client: "MlflowClient", run_id: str, config: Mapping[str, Any]) -> None:
    """The best trial's config as the parent run's params (what the runs table shows).

    MLflow params are write-once: when a resumed study found a new best, the params that
    changed cannot be rewritten; they stay, a tag says so, and ``best_config.json`` (and
    ``hposvc.best_trial``) hold the current best.
    """
    from mlflow.entities import Param

    from hposvc.config import TrialConfig

    flat = TrialConfig.from_dict(dict(config)).flat_params() if config else {}
    have = client.get_run(run_id).data.params
    stale = sorted(k for k, v in flat.items() if k in have and have[k] != v)
    new = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])
    if stale:
        client.set_tag(run_id, "hposvc.params_stale", f"the best trial changed after these params were logged ({', '.join(stale)}); see best_config.json")


def study_summary_markdown(study: "optuna.Study", *, spec: Mapping[str, Any], plan: str | None = None) -> str:
    """``summary.md``: counts, the best config, the top trials, the plan that ran, the spec."""
    info = records.study_info(study)
    trials = study.get_trials(deepcopy=False)
    best = records.best_trial(study)
    maximize = study.direction.name == "MAXIMIZE"
    metric = info.metric or "value"
    lines = [f"# Study `{study.study_name}`", ""]
    counts = Counter(t.state.name for t in trials)
    lines.append(f"{'Maximise' if maximize else 'Minimise'} `{metric}` on task `{info.task}`: "
                 + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + f" (target {info.n_trials} finished).")
    lines.append("")
    lines.append("## Best config")
    lines.append("")
    if best is None:
        lines.append("No trial has completed yet.")
    else:
        lines.append(f"Trial {best.number}: `{metric}` = {best.value:.6g}")
        lines.append("")
        lines += _table(["param", "value"], [[k, v] for k, v in (best.user_attrs.get(records.CONFIG) or {}).items() if v not in (None, {}, [])])
    lines += ["", f"## Top {TOP_K} trials", ""]
    done = sorted((t for t in trials if t.state.name == "COMPLETE" and t.value is not None), key=lambda t: t.value, reverse=maximize)[:TOP_K]
    searched = sorted({k for t in done for k in t.params})
    if done:
        lines += _table(["trial", metric, *searched], [[t.number, f"{t.value:.6g}", *(_fmt(t.params.get(k)) for k in searched)] for t in done])
    else:
        lines.append("None completed.")
    lines += ["", "## The plan that ran", ""]
    if plan:
        lines += [plan, ""]
    lines += _where_trials_ran(trials)
    lines += ["", "## Spec", "", "```json", json.dumps(dict(spec), indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _where_trials_ran(trials: list) -> list[str]:
    """Devices and workers the trials ran on, from what each trial recorded."""
    by_device = Counter(t.user_attrs.get(records.DEVICE, "?") for t in trials if records.DEVICE in t.user_attrs)
    workers = {t.user_attrs.get(records.WORKER) for t in trials if records.WORKER in t.user_attrs}
    hosts = {t.user_attrs.get(records.HOST) for t in trials if records.HOST in t.user_attrs}
    if not by_device:
        return ["No trial has started."]
    devices = ", ".join(f"{d} ({n} trials)" for d, n in sorted(by_device.items()))
    return [f"{len(workers)} worker(s) on {len(hosts)} host(s); devices: {devices}."]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


# -- plots -----------------------------------------------------------------------------


def log_plots(client: "MlflowClient", run_id: str, study: "optuna.Study") -> list[str]:
    """Log ``plots/dashboard.html`` (every plot, interactive; plotly.js inline once, since
    MLflow's viewer shows an HTML artifact without its folder) and ``plots/NAME.png``
    copies; returns the names drawn. A plot the study cannot have yet (importances need
    two completed trials) is left out, with the reason in the log."""
    import tempfile
    from pathlib import Path

    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return []
    figures = _plotly_figures(study)
    pngs = _png_copies(study)
    with tempfile.TemporaryDirectory(prefix="hposvc-plots-") as tmp:
        folder = Path(tmp) / "plots"
        folder.mkdir()
        if figures:
            (folder / "dashboard.html").write_text(_dashboard_html(study, figures), encoding="utf-8")
        for name, png in pngs.items():
            (folder / f"{name}.png").write_bytes(png)
        client.log_artifacts(run_id, str(folder), "plots")
    return list(dict.fromkeys([*figures, *pngs]))


def _quiet(fn: Callable[[], Any], what: str) -> Any:
    """``fn()``, or None (logged) when the study cannot draw it yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's "experimental" and few-trial warnings
            return fn()
    except Exception as e:  # noqa: BLE001 (e.g. importances need >= 2 completed trials)
        log.info("no %s plot: %s", what, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return None


def _configs(study: "optuna.Study") -> list[tuple[Any, dict[str, Any]]]:
    """(trial, config) of every COMPLETE trial that recorded its config."""
    return [
        (t, t.user_attrs[records.CONFIG]) for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and t.value is not None and records.CONFIG in t.user_attrs
    ]  # fmt: skip


def _plotly_figures(study: "optuna.Study") -> dict[str, Any]:
    try:
        import plotly  # noqa: F401 (optuna.visualization draws with it)
    except ImportError:
        log.warning("no plots/dashboard.html: plotly is not installed (pip install 'plotly>=5'); PNG copies only")
        return {}
    import optuna.visualization as ov
    from optuna.importance import PedAnovaImportanceEvaluator

    makers: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ov.plot_optimization_history(study),
        # PED-ANOVA: Optuna's fast evaluator (milliseconds where fANOVA takes seconds)
        "param_importances": lambda: ov.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator()),
        "parallel_coordinate": lambda: ov.plot_parallel_coordinate(study),
        "slice": lambda: ov.plot_slice(study),
        "intermediate_values": lambda: ov.plot_intermediate_values(study),
        "lr_optimizer": lambda: _lr_optimizer(study),
        "norm_init": lambda: _norm_init(study),
    }
    figures = {}
    for name, make in makers.items():
        fig = _quiet(make, name)
        if fig is not None and fig.data:
            fig.update_layout(title=PLOTS[name], template="plotly_white")
            figures[name] = fig
    return figures


def _metric(study: "optuna.Study") -> str:
    return records.study_info(study).metric or "value"


def _lr_optimizer(study: "optuna.Study") -> Any:
    """Final value against learning rate (log), one colour per optimizer."""
    import plotly.graph_objects as go

    fig = go.Figure()
    by_opt: dict[str, list] = {}
    for t, c in _configs(study):
        if c.get("lr") is not None:
            by_opt.setdefault(c.get("optimizer", "?"), []).append((c["lr"], t.value, t.number))
    for opt, pts in sorted(by_opt.items()):
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name=opt, marker={"size": 9},
            text=[f"trial {p[2]}" for p in pts], hovertemplate="%{text}<br>lr=%{x:.3g}<br>value=%{y:.4g}<extra>" + opt + "</extra>",
        ))  # fmt: skip
    fig.update_layout(xaxis={"type": "log", "title": "learning rate"}, yaxis={"title": _metric(study)}, legend={"title": "optimizer"})
    return fig


def _norm_init_cells(study: "optuna.Study") -> tuple[list[str], list[str], list[list[float | None]], list[list[int]]]:
    """Rows (norm), columns (init), the best value per cell (None where none ran), counts."""
    maximize = study.direction.name == "MAXIMIZE"
    cells: dict[tuple[str, str], list[float]] = {}
    for t, c in _configs(study):
        cells.setdefault((str(c.get("norm")), str(c.get("init"))), []).append(t.value)
    norms = sorted({k[0] for k in cells})
    inits = sorted({k[1] for k in cells})
    pick = max if maximize else min
    best = [[pick(cells[(n, i)]) if (n, i) in cells else None for i in inits] for n in norms]
    counts = [[len(cells.get((n, i), [])) for i in inits] for n in norms]
    return norms, inits, best, counts


def _norm_init(study: "optuna.Study") -> Any:
    """The best value of each (norm, init) pair that ran, with how many trials it had."""
    import plotly.graph_objects as go

    norms, inits, best, counts = _norm_init_cells(study)
    if not norms:
        return None
    text = [[("" if v is None else f"{v:.4g}") + f"<br>n={n}" for v, n in zip(row, crow)] for row, crow in zip(best, counts)]
    fig = go.Figure(go.Heatmap(
        z=best, x=inits, y=norms, text=text, texttemplate="%{text}", colorscale="Viridis",
        reversescale=study.direction.name != "MAXIMIZE", colorbar={"title": f"best {_metric(study)}"},
        hovertemplate="norm=%{y}<br>init=%{x}<br>%{text}<extra></extra>",
    ))  # fmt: skip
    fig.update_layout(xaxis={"title": "init", "type": "category"}, yaxis={"title": "norm", "type": "category"})
    return fig


# dashboard.html's layout in CSS pixels: a header, then one fixed-height band per plot, so
# a screenshot of the page shows plot i at a known place (tests/test_dashboard_browser.py).
HEADER_PX = 64
PLOT_PX = 480
GAP_PX = 24


def _dashboard_html(study: "optuna.Study", figures: Mapping[str, Any]) -> str:
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        div = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"plot-{name}", default_height=f"{PLOT_PX}px", config={"responsive": True})
        parts.append(f'<section id="{name}" class="plot">{div}</section>')
    title = html.escape(f"hposvc study {study.study_name}")
    style = (
        "body{font-family:sans-serif;margin:0;padding:0 16px;background:#fff}"
        f"h1{{height:{HEADER_PX}px;line-height:{HEADER_PX}px;margin:0;font-size:22px}}"
        f"section.plot{{height:{PLOT_PX}px;margin:0 0 {GAP_PX}px;overflow:hidden}}"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style>'
        f"</head><body><h1>{title}</h1>{''.join(parts)}</body></html>"
    )


def _png_copies(study: "optuna.Study") -> dict[str, bytes]:
    """A PNG of each plot drawn, with Optuna's matplotlib backend and matplotlib (plotly's
    own PNG export needs a browser engine, kaleido)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.importance import PedAnovaImportanceEvaluator

    makers: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(study),
        "param_importances": lambda: ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator()),
        "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study),
        "slice": lambda: ovm.plot_slice(study),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
        "lr_optimizer": lambda: _lr_optimizer_png(study, plt),
        "norm_init": lambda: _norm_init_png(study, plt),
    }
    out = {}
    for name, make in makers.items():
        ax = _quiet(make, f"{name} (PNG)")
        if ax is None:
            continue
        fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")  # optuna's labels would be clipped
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def _lr_optimizer_png(study: "optuna.Study", plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_opt: dict[str, list] = {}
    for t, c in _configs(study):
        if c.get("lr") is not None:
            by_opt.setdefault(c.get("optimizer", "?"), []).append((c["lr"], t.value))
    if not by_opt:
        plt.close(fig)
        return None
    for opt, pts in sorted(by_opt.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=opt)
    ax.set(xscale="log", xlabel="learning rate", ylabel=_metric(study), title=PLOTS["lr_optimizer"])
    ax.legend(title="optimizer")
    return ax


def _norm_init_png(study: "optuna.Study", plt: Any) -> Any:
    import numpy as np

    norms, inits, best, counts = _norm_init_cells(study)
    if not norms:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(inits), 1.4 + 0.8 * len(norms)))
    z = np.array([[np.nan if v is None else v for v in row] for row in best], dtype=float)
    im = ax.imshow(z, cmap="viridis" if study.direction.name == "MAXIMIZE" else "viridis_r", aspect="auto")
    for r, row in enumerate(best):
        for c, v in enumerate(row):
            if v is not None:
                ax.text(c, r, f"{v:.3g}\nn={counts[r][c]}", ha="center", va="center", color="white", fontsize=8)
    ax.set(xticks=range(len(inits)), xticklabels=inits, yticks=range(len(norms)), yticklabels=norms, xlabel="init", ylabel="norm", title=PLOTS["norm_init"])
    fig.colorbar(im, ax=ax, label=f"best {_metric(study)}")
    return ax


def _now_ms() -> int:
    return int(time.time() * 1000)
