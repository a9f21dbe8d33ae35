"""The figures of the report: one PNG per figure, drawn with matplotlib's Agg backend
from the same frames the verdicts are computed from.

Each figure kind answers one kind of question (:data:`FIGURES`): learning curves,
accuracy against a hyper-parameter, activation std per layer at init, budget curves.
:func:`draw` writes one kind for one claim (or a study without a claim) and returns the
:class:`Figure` entries the HTML page shows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hposvc.config import INITS
from hposvc.report.data import StudyData

__all__ = ["FIGURES", "Figure", "draw"]

DPI = 110  # sharp on a laptop screen, small files
WIDTH = 10.0  # inches; the HTML scales images to the column width
PANEL_HEIGHT = 3.6


@dataclass(frozen=True)
class Figure:
    """One PNG of the report."""

    file: str  # file name, relative to the report folder
    title: str
    caption: str  # what it shows and how to read it

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)


def _usable(d: StudyData) -> pd.DataFrame:
    return d.trials[d.trials["score"].notna()]


def _label(metric: str) -> str:
    return {"val_accuracy": "validation accuracy", "val_loss": "validation loss"}.get(metric, metric)


def _chance_line(ax, d: StudyData) -> None:
    if d.chance is not None and d.metric == "val_accuracy":
        ax.axhline(d.chance, color="grey", ls=":", lw=1, label=f"chance ({d.chance:.2f})")


def _mean_curve(curves: Sequence[Sequence[float]]) -> np.ndarray:
    """Mean over trials per epoch (trials that stopped early count up to their last epoch)."""
    n = max((len(c) for c in curves), default=0)
    arr = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        arr[i, : len(c)] = c
    with np.errstate(all="ignore"):
        return np.nanmean(arr, axis=0) if len(curves) else np.array([])


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _legend(ax, **kw) -> None:
    """A legend when something is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **kw)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} stored", transform=ax.transAxes, ha="center", va="center", color="grey")


def _group_label(keys: Sequence[str], values: object) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(f"{v}" for k, v in zip(keys, values))


# -- figure kinds -----------------------------------------------------------------------------


def curves(d: StudyData, path: Path, *, by: Sequence[str] = (), where: Callable[[pd.DataFrame], pd.Series] | None = None, title: str = "") -> Figure:
    """Learning curves: the metric per epoch, mean over trials of each group (thin lines:
    the trials)."""
    plt = _plt()
    f = d.trials[d.trials.curve.map(len) > 0]
    if where is not None:
        f = f[where(f)]
    fig, ax = plt.subplots(figsize=(WIDTH, PANEL_HEIGHT + 0.6))
    groups = f.groupby(list(by)) if by else [((), f)]
    colors = plt.cm.tab10.colors
    for i, (key, g) in enumerate(groups):
        color = colors[i % len(colors)]
        for c in g.curve:
            ax.plot(range(1, len(c) + 1), c, color=color, alpha=0.25, lw=0.8)
        m = _mean_curve(list(g.curve))
        ax.plot(range(1, len(m) + 1), m, color=color, lw=2.2, label=_group_label(by, key) if by else f"{len(g)} trials")
    _chance_line(ax, d)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel(_label(d.metric))
    ax.set_title(title or f"{d.name}: learning curves")
    ax.grid(alpha=0.3)
    _legend(ax, ncol=2)
    _save(fig, path)
    caption = "Per-epoch validation metric (the trial's intermediate values); thick lines are group means, thin lines single trials."
    return Figure(path.name, title or "Learning curves", caption)


def zero_init(d: StudyData, path: Path) -> Figure:
    plt = _plt()
    f = _usable(d).assign(model=lambda x: np.where(x.depth == 0, "linear (depth 0)", "MLP"))
    inits = sorted(set(f.init), key=lambda i: INITS.index(i) if i in INITS else len(INITS))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(WIDTH, PANEL_HEIGHT + 0.4))
    width = 0.38
    for j, model in enumerate(["MLP", "linear (depth 0)"]):
        g = f[f.model == model]
        xs = np.arange(len(inits)) + (j - 0.5) * width
        means = [g[g.init == i].score.mean() for i in inits]
        a1.bar(xs, means, width, label=model, alpha=0.8)
        for x, init in zip(xs, inits):
            pts = g[g.init == init].score
            a1.scatter([x] * len(pts), pts, color="black", s=10, zorder=3)
    _chance_line(a1, d)
    a1.set_xticks(range(len(inits)), inits, rotation=15)
    a1.set_ylabel(_label(d.metric))
    a1.set_title("accuracy by init (dots: seeds)")
    _legend(a1)
    mlp = f[f.depth > 0]
    floor = 1e-8
    for k, init in enumerate(inits):
        vals = mlp[mlp.init == init].unit_symmetry.dropna()
        a2.scatter([k] * len(vals), np.maximum(vals, floor), s=30)
    if mlp.unit_symmetry.isna().all():
        _no_data(a2, "unit-symmetry probe (hposvc.probe.unit_symmetry)")
    a2.set_yscale("log")
    a2.axhline(floor, color="grey", ls=":", lw=1)
    a2.text(len(inits) - 0.5, floor * 1.5, "0 (identical units)", ha="right", fontsize=8, color="grey")
    a2.set_xticks(range(len(inits)), inits, rotation=15)
    a2.set_xlim(-0.5, len(inits) - 0.5)
    a2.set_ylabel("unit symmetry after training")
    a2.set_title("how different the hidden units are (MLP)")
    _save(fig, path)
    caption = (
        "Left: final validation accuracy per init scheme, MLP vs linear model. Right: unit symmetry after training "
        "(largest distance of a unit's weights from the layer's mean unit, relative to the weight norm): 0 means "
        "every hidden unit of a layer is the same unit."
    )
    return Figure(path.name, "Zero vs random init: accuracy and unit symmetry", caption)


def activation_std(d: StudyData, path: Path, *, by: Sequence[str] = ("activation", "init")) -> Figure:
    plt = _plt()
    f = d.trials[d.trials.activation_std.map(lambda s: isinstance(s, list) and len(s) > 0)]
    by = [b for b in by if b in f.columns and f[b].nunique() > 1] or ["init"]
    fig, ax = plt.subplots(figsize=(WIDTH, PANEL_HEIGHT + 0.8))
    colors = plt.cm.tab10.colors
    for i, (key, g) in enumerate(f.groupby(by)):
        color = colors[i % len(colors)]
        for j, s in enumerate(g.activation_std):
            ax.plot(range(1, len(s) + 1), np.maximum(np.asarray(s, dtype=float), 1e-30), color=color, lw=1.2, alpha=0.6,
                    label=_group_label(by, key) + f" ({len(g)} seeds)" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("hidden layer")
    ax.set_ylabel("std of the layer's output at init")
    ax.set_title(f"{d.name}: activation std per layer at initialisation")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    if f.empty:
        _no_data(ax, "activation-std probe (hposvc.probe.activation_std)")
    _save(fig, path)
    caption = (
        "Standard deviation of each hidden block's output at initialisation on a fixed batch, one line per trial "
        "(seed). A flat line keeps the signal's scale through the network; a falling line means it vanishes."
    )
    return Figure(path.name, "Activation std per layer at init", caption)


def acc_vs_lr(d: StudyData, path: Path) -> Figure:
    from hposvc.report.claims import target_accuracy

    plt = _plt()
    f = _usable(d)
    norms = list(dict.fromkeys(f.norm))
    fig, axes = plt.subplots(1, len(norms), figsize=(WIDTH, PANEL_HEIGHT + 0.4), sharey=True, squeeze=False)
    for ax, norm in zip(axes[0], norms):
        g = f[f.norm == norm]
        for init, h in g.groupby("init"):
            m = h.groupby("lr").score.mean()
            ax.plot(m.index, m.values, marker="o", label=init)
            ax.scatter(h.lr, h.score, s=8, color="black", alpha=0.4)
        ax.axhline(target_accuracy(d.chance), color="red", ls="--", lw=1, label="target")
        _chance_line(ax, d)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"norm = {norm}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(_label(d.metric))
    _legend(axes[0][-1])
    _save(fig, path)
    caption = "Final accuracy against learning rate, per init scheme (lines: mean over seeds; dots: trials), without and with batch norm; diverged trials count at chance."
    return Figure(path.name, "Accuracy vs learning rate, with and without batch norm", caption)


def acc_vs_batch(d: StudyData, path: Path) -> Figure:
    plt = _plt()
    f = _usable(d)
    fig, ax = plt.subplots(figsize=(WIDTH, PANEL_HEIGHT + 0.4))
    for norm, g in f.groupby("norm"):
        m = g.groupby("batch_size").score.mean()
        ax.plot(m.index, m.values, marker="o", lw=2, label=f"{norm} norm")
        ax.scatter(g.batch_size, g.score, s=10, alpha=0.4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(_label(d.metric))
    ax.set_title(f"{d.name}: accuracy vs batch size per norm")
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, path)
    return Figure(path.name, "Accuracy vs batch size", "Final accuracy per norm type and batch size (lines: mean over seeds; dots: trials), same epochs for every batch size.")


def acc_vs_depth(d: StudyData, path: Path) -> Figure:
    plt = _plt()
    f = _usable(d)
    best = f.groupby(["activation", "depth", "seed"]).score.max().reset_index()
    fig, ax = plt.subplots(figsize=(WIDTH, PANEL_HEIGHT + 0.4))
    for act, g in best.groupby("activation"):
        m = g.groupby("depth").score.mean()
        ax.plot(m.index, m.values, marker="o", lw=2, ls="--" if act in ("sigmoid", "tanh", "softsign") else "-", label=act)
    _chance_line(ax, d)
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel(_label(d.metric))
    ax.set_title(f"{d.name}: accuracy vs depth per activation (better init of Xavier/He)")
    ax.grid(alpha=0.3)
    _legend(ax, ncol=2)
    _save(fig, path)
    return Figure(path.name, "Accuracy vs depth per activation", "Mean over seeds of each activation's accuracy with its better init scheme, per depth; dashed: saturating activations.")


def acc_vs_lr_optimizer(d: StudyData, path: Path) -> Figure:
    plt = _plt()
    f = _usable(d)
    fig, ax = plt.subplots(figsize=(WIDTH, PANEL_HEIGHT + 0.4))
    for opt, g in f.groupby("optimizer"):
        m = g.groupby("lr").score.mean()
        ax.plot(m.index, m.values, marker="o", lw=2, label=opt)
    _chance_line(ax, d)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(_label(d.metric))
    ax.set_title(f"{d.name}: accuracy vs learning rate per optimizer")
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, path)
    return Figure(path.name, "Accuracy vs learning rate per optimizer", "Final accuracy (mean over seeds) on the shared learning-rate grid.")


def curves_best_lr(d: StudyData, path: Path) -> Figure:
    f = _usable(d)
    best = {opt: g.groupby("lr").score.mean().idxmax() for opt, g in f.groupby("optimizer")}
    keep = lambda x: np.array([np.isclose(lr, best.get(o, np.nan)) for o, lr in zip(x.optimizer, x.lr)], dtype=bool)  # noqa: E731
    fig = curves(d, path, by=("optimizer",), where=keep, title=f"{d.name}: learning curves at each optimizer's best lr")
    return Figure(fig.file, "Learning curves at each optimizer's best learning rate", fig.caption + " Best lr: " + ", ".join(f"{o} {lr:g}" for o, lr in best.items()) + ".")


def sensitivity(d: StudyData, path: Path) -> Figure:
    plt = _plt()
    f = _usable(d)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(WIDTH, PANEL_HEIGHT + 0.4), sharey=True)
    sgd, ada = f[f.optimizer == "sgd"], f[f.optimizer == "adadelta"]
    a1.scatter(sgd.lr, sgd.score, s=25)
    a1.set_xscale("log")
    a1.set_xlabel("SGD learning rate")
    a1.set_ylabel(_label(d.metric))
    a1.set_title(f"SGD ({len(sgd)} trials, sd {sgd.score.std():.3f})")
    if not ada.empty:
        sc = a2.scatter(ada.eps, ada.score, c=ada.rho, cmap="viridis", s=25)
        fig.colorbar(sc, ax=a2, label="rho")
    a2.set_xscale("log")
    a2.set_xlabel("Adadelta eps")
    a2.set_title(f"Adadelta ({len(ada)} trials, sd {ada.score.std():.3f})")
    for ax in (a1, a2):
        _chance_line(ax, d)
        ax.grid(alpha=0.3)
    _save(fig, path)
    return Figure(path.name, "Sensitivity: SGD's lr vs Adadelta's eps and rho", "Each dot is one random-search trial; the spread of the dots along the y axis is the sensitivity the verdict compares.")


def budget_curves(data: Mapping[str, StudyData], path: Path) -> Figure:
    from hposvc.report.claims import budget_curves as curves_of

    plt = _plt()
    studies = list(data.values())
    fig, axes = plt.subplots(1, max(len(studies), 1), figsize=(WIDTH, PANEL_HEIGHT + 0.4), squeeze=False)
    for ax, d in zip(axes[0], studies):
        f = _usable(d)
        for opt, g in f.groupby("optimizer"):
            c = curves_of(g.score.tolist())
            ax.plot(range(1, len(c) + 1), c, marker="o", ms=3, lw=2, label=opt)
        ax.set_xlabel("tuning budget k (random trials)")
        ax.set_title(d.task)
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[0][0].set_ylabel("expected best " + _label(studies[0].metric if studies else "val_accuracy"))
    _save(fig, path)
    return Figure(path.name, "Budget curves: expected best accuracy after k random trials", "For each task and optimizer, the expected best validation accuracy of k trials drawn at random from its search space, estimated from all its trials.")


def history(d: StudyData, path: Path) -> Figure:
    plt = _plt()
    f = d.trials[d.trials.value.notna()].sort_values("number")
    fig, ax = plt.subplots(figsize=(WIDTH, PANEL_HEIGHT))
    ax.scatter(f.number, f.value, s=15, label="trial")
    best = f.value.cummax() if d.maximize else f.value.cummin()
    ax.step(f.number, best, where="post", color="red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(_label(d.metric))
    ax.set_title(f"{d.name}: optimisation history")
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, path)
    return Figure(path.name, "Optimisation history", "Each completed trial's value in the order the trials ran, and the best value so far.")


# Figure kinds by name; budget_curves draws all of a claim's studies in one figure, the
# others one figure per study.
FIGURES: dict[str, Callable[..., Figure]] = {
    "curves": curves,
    "zero_init": zero_init,
    "activation_std": activation_std,
    "acc_vs_lr": acc_vs_lr,
    "acc_vs_batch": acc_vs_batch,
    "acc_vs_depth": acc_vs_depth,
    "acc_vs_lr_optimizer": acc_vs_lr_optimizer,
    "curves_best_lr": curves_best_lr,
    "sensitivity": sensitivity,
    "budget_curves": budget_curves,
    "history": history,
}
# Grouping of learning curves per claim study (the dimensions it compares).
CURVE_GROUPS: dict[str, tuple[str, ...]] = {
    "guide-zero-init": ("init",),
    "guide-init-deep": ("activation", "init"),
    "guide-zero": ("init",),
}


def draw(kind: str, data: Mapping[str, StudyData], out_dir: Path, *, prefix: str) -> list[Figure]:
    """Draw figure ``kind`` into ``out_dir`` for the studies in ``data`` and return its
    entries (one per study, or one for all of them for multi-study kinds)."""
    if kind not in FIGURES:
        raise ValueError(f"unknown figure kind {kind!r}")
    # matplotlib's default look, whatever style another library (optuna's plots) switched on
    with _plt().style.context("default"):
        return _draw(kind, data, out_dir, prefix=prefix)


def _draw(kind: str, data: Mapping[str, StudyData], out_dir: Path, *, prefix: str) -> list[Figure]:
    if kind == "budget_curves":
        return [budget_curves(data, out_dir / f"{prefix}-{kind}.png")]
    out = []
    for name, d in data.items():
        if d.trials.empty:
            continue
        stem = f"{prefix}-{kind}.png" if len(data) == 1 else f"{prefix}-{name}-{kind}.png"
        path = out_dir / stem
        if kind == "curves":
            by = CURVE_GROUPS.get(name, ())
            where = (lambda x: x.depth > 0) if name == "guide-zero-init" else None
            out.append(curves(d, path, by=by, where=where))
        else:
            out.append(FIGURES[kind](d, path))
    return out
