"""The optimisation guide's claims: what each says, which shipped studies test it, and how
its verdicts are computed from the stored trials.

A claim is tested by one or more studies (``studies/guide/*.toml``; a claim about several
tasks needs one study per task). Each claim splits into hypotheses; each hypothesis gets
a :class:`Verdict` from a statistic on the trials' scores (see :mod:`hposvc.report.data`
for ``score``) and a decision rule fixed here, before any study ran:

- an *effect* (a difference of mean accuracies, of spreads, of expected best-of-k ...)
  with a 95 % percentile bootstrap interval (:mod:`hposvc.report.stats`); the claim is
  *supported* when the interval lies wholly on its side of the threshold, *not
  supported* when it lies wholly on the other side, and *inconclusive* otherwise or when
  a group has fewer than two replicates;
- or, for properties that are exact rather than noisy (identical hidden units, identical
  activations across seeds), an exact check with a stated tolerance.

Comparisons are paired by seed where the design crosses seeds with the compared arms
(each seed is one replicate), and two-sample otherwise. Where a claim says "at its best
learning rate", the best value is chosen on the mean over seeds, and the interval does
not include that selection's uncertainty.

A claim's overall verdict: *supported* when every hypothesis is, *not supported* when
any is not, otherwise *inconclusive*.

>>> claim_for_study("guide-init-deep").number
'2'
>>> [c.number for c in CLAIMS]
['1', '2', '3', '4', '5', '6a', '6b', '7', '8']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hposvc.config import ONE_SHOT_DEFAULTS
from hposvc.report.data import StudyData
from hposvc.report.stats import (
    INCONCLUSIVE,
    MIN_REPLICATES,
    NOT_SUPPORTED,
    SUPPORTED,
    Estimate,
    bootstrap,
    decide,
)
from hposvc.stats import expected_best_of_k

__all__ = [
    "CLAIMS",
    "Claim",
    "ClaimResult",
    "GUIDE_STUDIES",
    "Verdict",
    "claim_for_study",
    "combine",
]

# -- decision thresholds (fixed before running the studies) ---------------------------------

SYMMETRY_TOL = 1e-5  # unit symmetry at or below this: the layer's units are identical (float32 rounding)
SYMMETRY_BROKEN = 1e-3  # unit symmetry above this: random init broke the symmetry
CHANCE_MARGIN = 0.05  # "at chance": accuracy within 5 points of the commonest-class rate
LINEAR_MARGIN = 0.01  # "no better than a linear model": at most 1 point above it
SIGNAL_DECADES = 1.0  # "the signal shrinks": activation std falls > 10x from first to last layer
TARGET_FRACTION = 0.75  # "trains": accuracy at least 3/4 of the way from chance to 1
ADAM_DEFAULT_MARGIN = 0.01  # "close to tuned": tuned Adam at most 1 point better than defaults
ZERO_NONINFERIORITY = 0.02  # ZerO "trains as well": at most 2 points below He init
RELU_FAMILY = ("relu", "leaky_relu", "prelu", "gelu", "mish")


# -- result types ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The outcome of one hypothesis, with the statistic behind it."""

    key: str  # short id, e.g. "relu-he-beats-xavier"
    hypothesis: str  # what is tested, one sentence
    verdict: str  # "supported" | "not supported" | "inconclusive"
    statistic: str  # what the estimate is and how its interval was computed
    rule: str  # the decision rule
    estimate: float | None = None  # the statistic's value on the stored trials
    ci_low: float | None = None  # 95 % bootstrap interval (None for exact checks)
    ci_high: float | None = None
    n: int = 0  # trials or paired replicates behind it
    note: str = ""  # anything a reader needs to weigh it (e.g. too few replicates)

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class ClaimResult:
    """The verdicts of a claim and the numbers behind them."""

    verdict: str  # overall: see combine()
    verdicts: tuple[Verdict, ...]
    table: pd.DataFrame  # the numbers a reader checks the verdicts against


@dataclass(frozen=True)
class Claim:
    """One claim of the guide and the studies that test it."""

    key: str  # e.g. "zero-init"
    number: str  # the claim's number in the guide (6a/6b: two studies of claim 6)
    title: str
    text: str  # the claim as the guide makes it
    studies: tuple[str, ...]  # study names (the same at CI and full scale)
    evaluate: Callable[[Mapping[str, StudyData]], ClaimResult] = field(repr=False)
    figures: tuple[str, ...] = ()  # figure kinds (hposvc.report.figures.FIGURES)

    @property
    def spec_files(self) -> tuple[str, ...]:
        """The specs in ``studies/guide/`` (``studies/guide/full/`` for the full budget)."""
        return tuple(f"{s.removeprefix('guide-')}.toml" for s in self.studies)


def combine(verdicts: Sequence[str]) -> str:
    """The overall verdict of several hypotheses.

    >>> combine(["supported", "inconclusive"]), combine(["supported", "not supported"])
    ('inconclusive', 'not supported')
    """
    if not verdicts:
        return INCONCLUSIVE
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return INCONCLUSIVE


# -- helpers --------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _usable(frame: pd.DataFrame) -> pd.DataFrame:
    """Trials with a score (completed, or diverged: see hposvc.report.data)."""
    return frame[frame["score"].notna()]


def _family(init: str) -> str:
    return "xavier" if init.startswith("xavier") else "he" if init.startswith("he") else init


def _per_seed(frame: pd.DataFrame, mask: pd.Series) -> pd.Series:
    """Mean score per seed of the trials in ``mask``."""
    return frame[mask].groupby("seed")["score"].mean()


def _paired(a: pd.Series, b: pd.Series) -> list[float]:
    """Per-seed differences a - b over the seeds both have."""
    common = sorted(set(a.index) & set(b.index))
    return [float(a[s] - b[s]) for s in common]


def _mean(key: str) -> Callable[[dict[str, np.ndarray]], float]:
    return lambda g: float(np.mean(g[key])) if len(g[key]) else math.nan


def _verdict(
    key: str,
    hypothesis: str,
    est: Estimate,
    *,
    statistic: str,
    greater_than: float | None = None,
    less_than: float | None = None,
    note: str = "",
) -> Verdict:
    if greater_than is not None:
        rule = f"supported if the 95 % interval lies above {greater_than:g}; not supported if it lies at or below it"
    else:
        rule = f"supported if the 95 % interval lies below {less_than:g}; not supported if it lies at or above it"
    verdict = decide(est, greater_than=greater_than, less_than=less_than)
    if est.n_min < MIN_REPLICATES and not note:
        note = f"only {est.n_min} replicate(s) in the smallest group: an interval needs at least {MIN_REPLICATES}"
    return Verdict(
        key=key,
        hypothesis=hypothesis,
        verdict=verdict,
        statistic=statistic,
        rule=rule,
        estimate=_jsonable(est.estimate),
        ci_low=_jsonable(est.low),
        ci_high=_jsonable(est.high),
        n=est.n,
        note=note,
    )


def _missing(key: str, hypothesis: str, statistic: str, note: str) -> Verdict:
    return Verdict(key=key, hypothesis=hypothesis, verdict=INCONCLUSIVE, statistic=statistic, rule="-", note=note)


def _table(frame: pd.DataFrame, index: list[str], columns: list[str] | None = None, *, value: str = "score") -> pd.DataFrame:
    """Mean ``value`` and trial count per cell, as a flat frame."""
    keys = index + (columns or [])
    out = frame.groupby(keys, dropna=False)[value].agg(["mean", "std", "count"]).reset_index()
    return out.rename(columns={"mean": f"mean_{value}", "std": f"std_{value}", "count": "trials"})


NO_DATA = "the study has no usable trials (run it first)"


# -- claim 1: zero vs random init -----------------------------------------------------------


def _eval_zero_init(data: Mapping[str, StudyData]) -> ClaimResult:
    d = data.get("guide-zero-init")
    verdicts: list[Verdict] = []
    if d is None or _usable(d.trials).empty:
        return ClaimResult(INCONCLUSIVE, (_missing("zero-init", "zero vs random init", "-", NO_DATA),), pd.DataFrame())
    f = _usable(d.trials)
    mlp, linear = f[f.depth > 0], f[f.depth == 0]
    zeros = mlp[mlp.init == "zeros"]
    rand = mlp[~mlp.init.isin(["zeros", "zero", "pretrained"])]
    chance = d.chance if d.chance is not None else math.nan

    # 1a) identical units: an exact property, so an exact check with a float tolerance
    sym_stat = "largest unit symmetry of a zero-init MLP after training (0 = identical units), and the smallest of a random-init MLP"
    key, hyp = "zero-init-identical-units", "Zero init leaves each hidden layer's units identical after training; random inits do not"
    if zeros.empty or rand.empty or zeros.unit_symmetry.isna().all() or rand.unit_symmetry.isna().all():
        verdicts.append(_missing(key, hyp, sym_stat, "no unit-symmetry probe stored (trial attr hposvc.probe.unit_symmetry) for zero- and random-init MLPs"))
    else:
        z_max, r_min = float(zeros.unit_symmetry.max()), float(rand.unit_symmetry.min())
        ok = z_max <= SYMMETRY_TOL and r_min > SYMMETRY_BROKEN
        bad = z_max > SYMMETRY_BROKEN or r_min <= SYMMETRY_TOL
        verdicts.append(
            Verdict(
                key=key,
                hypothesis=hyp,
                verdict=SUPPORTED if ok else NOT_SUPPORTED if bad else INCONCLUSIVE,
                statistic=sym_stat + " (exact check, no sampling error)",
                rule=f"supported if zero-init symmetry <= {SYMMETRY_TOL:g} and random-init symmetry > {SYMMETRY_BROKEN:g}",
                estimate=z_max,
                n=len(zeros) + len(rand),
                note=f"smallest random-init symmetry {r_min:.3g}",
            )
        )
    # 1b) at chance
    est = bootstrap({"z": zeros.score.tolist()}, lambda g: float(np.mean(g["z"])) - chance)
    verdicts.append(
        _verdict(
            "zero-init-at-chance",
            f"A zero-init MLP stays at chance accuracy (the commonest class, {chance:.3f})",
            est,
            statistic="mean val accuracy of zero-init MLPs minus chance, 95 % bootstrap interval over trials",
            less_than=CHANCE_MARGIN,
        )
    )
    # 1c) no better than linear; 1d) random schemes beat linear. The linear baseline per
    # seed is its best init: softmax regression is convex, so what it can reach is the best
    # any init reaches.
    best_linear = linear.groupby("seed")["score"].max()
    z_seed = zeros.groupby("seed")["score"].mean()
    r_seed = rand.groupby("seed")["score"].mean()
    est = bootstrap({"d": _paired(z_seed, best_linear)}, _mean("d"))
    verdicts.append(
        _verdict(
            "zero-init-no-better-than-linear",
            "A zero-init MLP trains no better than a linear model (depth 0)",
            est,
            statistic="zero-init MLP accuracy minus the best linear model's, paired by seed; 95 % bootstrap interval over seeds",
            less_than=LINEAR_MARGIN,
        )
    )
    est = bootstrap({"d": _paired(r_seed, best_linear)}, _mean("d"))
    verdicts.append(
        _verdict(
            "random-init-beats-linear",
            "MLPs with random init (normal, Xavier, He) train better than a linear model",
            est,
            statistic="mean accuracy of random-init MLPs minus the best linear model's, paired by seed; 95 % bootstrap interval over seeds",
            greater_than=0.0,
        )
    )
    table = _table(f.assign(model=np.where(f.depth == 0, "linear", "mlp")), ["model", "init"])
    sym = f.groupby(["init"], dropna=False)["unit_symmetry"].max().rename("max_unit_symmetry")
    table = table.merge(sym.reset_index(), on="init", how="left")
    table.loc[table.model == "linear", "max_unit_symmetry"] = np.nan
    return ClaimResult(combine([v.verdict for v in verdicts]), tuple(verdicts), table)


# -- claim 2: Xavier for tanh, He for ReLU --------------------------------------------------


def _log_ratio(stds: Any) -> float:
    """log10(std at the last hidden layer / std at the first) at init; -inf when the
    signal vanished completely, nan without probe data."""
    if not isinstance(stds, (list, tuple)) or len(stds) < 2:
        return math.nan
    first, last = float(stds[0]), float(stds[-1])
    if not (math.isfinite(first) and first > 0 and math.isfinite(last)):
        return math.nan
    return math.log10(last / first) if last > 0 else -math.inf


def _eval_init_deep(data: Mapping[str, StudyData]) -> ClaimResult:
    d = data.get("guide-init-deep")
    if d is None or _usable(d.trials).empty:
        return ClaimResult(INCONCLUSIVE, (_missing("init-deep", "Xavier vs He in a deep MLP", "-", NO_DATA),), pd.DataFrame())
    f = _usable(d.trials).assign(family=lambda x: x.init.map(_family))
    f = f.assign(log_ratio=f.activation_std.map(_log_ratio))
    verdicts = []
    depth = int(f.depth.max())
    relu, tanh = f[f.activation == "relu"], f[f.activation == "tanh"]
    paired = "paired by seed; 95 % bootstrap interval over seeds"
    est = bootstrap({"d": _paired(_per_seed(relu, relu.family == "he"), _per_seed(relu, relu.family == "xavier"))}, _mean("d"))
    verdicts.append(
        _verdict(
            "relu-he-beats-xavier",
            f"With ReLU, a {depth}-layer plain MLP trains better with He init than with Xavier",
            est,
            statistic=f"val accuracy with He minus with Xavier (ReLU), {paired}",
            greater_than=0.0,
        )
    )
    key, hyp = "relu-xavier-signal-shrinks", "With ReLU, the activations' std at init shrinks through the layers under Xavier (more than 10x) but not under He"
    stat = "mean log10(std at the last hidden layer / std at the first) at init, Xavier; 95 % bootstrap interval over trials"
    xr = relu[relu.family == "xavier"].log_ratio.replace(-math.inf, -30.0)
    hr = relu[relu.family == "he"].log_ratio.replace(-math.inf, -30.0)
    if xr.isna().all() or hr.isna().all():
        verdicts.append(_missing(key, hyp, stat, "no activation-std probe stored (trial attr hposvc.probe.activation_std)"))
    else:
        ex = bootstrap({"x": xr.tolist()}, _mean("x"))
        eh = bootstrap({"h": hr.tolist()}, _mean("h"))
        vx = decide(ex, less_than=-SIGNAL_DECADES)
        if not eh.defined or eh.n_min < MIN_REPLICATES:
            vh = INCONCLUSIVE
        elif -SIGNAL_DECADES < eh.low and eh.high < SIGNAL_DECADES:
            vh = SUPPORTED
        elif eh.low >= SIGNAL_DECADES or eh.high <= -SIGNAL_DECADES:
            vh = NOT_SUPPORTED
        else:
            vh = INCONCLUSIVE
        verdicts.append(
            Verdict(
                key=key,
                hypothesis=hyp,
                verdict=combine([vx, vh]),
                statistic=stat,
                rule=f"supported if Xavier's interval lies below -{SIGNAL_DECADES:g} and He's inside (-{SIGNAL_DECADES:g}, {SIGNAL_DECADES:g})",
                estimate=_jsonable(ex.estimate),
                ci_low=_jsonable(ex.low),
                ci_high=_jsonable(ex.high),
                n=ex.n + eh.n,
                note=f"He: {eh.estimate:.2f} [{eh.low:.2f}, {eh.high:.2f}]",
            )
        )
    est = bootstrap({"d": _paired(_per_seed(tanh, tanh.family == "xavier"), _per_seed(tanh, tanh.family == "he"))}, _mean("d"))
    verdicts.append(
        _verdict(
            "tanh-xavier-beats-he",
            f"With tanh, the {depth}-layer MLP trains better with Xavier init than with He",
            est,
            statistic=f"val accuracy with Xavier minus with He (tanh), {paired}",
            greater_than=0.0,
        )
    )
    table = _table(f, ["activation", "init"])
    table = table.merge(f.groupby(["activation", "init"])["log_ratio"].mean().rename("log10_std_last_over_first").reset_index(), on=["activation", "init"])
    return ClaimResult(combine([v.verdict for v in verdicts]), tuple(verdicts), table)


# -- claim 3: batch norm, learning rate and init ---------------------------------------------


def epochs_to_target(curve: Sequence[float], target: float) -> float:
    """First epoch (1-based) whose metric reaches ``target``; nan when none does.

    >>> epochs_to_target([0.2, 0.7, 0.9], 0.8), epochs_to_target([0.2], 0.8)
    (3, nan)
    """
    for i, v in enumerate(curve or [], start=1):
        if v is not None and math.isfinite(v) and v >= target:
            return i
    return math.nan


def target_accuracy(chance: float | None) -> float:
    c = 0.0 if chance is None else chance
    return c + TARGET_FRACTION * (1.0 - c)


def _eval_bn_lr(data: Mapping[str, StudyData]) -> ClaimResult:
    d = data.get("guide-bn-lr")
    if d is None or _usable(d.trials).empty:
        return ClaimResult(INCONCLUSIVE, (_missing("bn-lr", "batch norm and learning rate", "-", NO_DATA),), pd.DataFrame())
    f = _usable(d.trials)
    target = target_accuracy(d.chance)
    f = f.assign(trains=f.score >= target, epochs_to_target=f.curve.map(lambda c: epochs_to_target(c, target)))
    lrs = sorted(f.lr.unique())
    index = {lr: i for i, lr in enumerate(lrs)}
    step = lrs[1] / lrs[0] if len(lrs) > 1 else math.nan
    verdicts = []

    # 3a) largest trainable lr, per (init, seed), in grid steps
    diffs = []
    for _, unit in f.groupby(["init", "seed"]):
        best = {}
        for norm in ("batch", "none"):
            ok = unit[(unit.norm == norm) & unit.trains]
            best[norm] = max((index[lr] for lr in ok.lr), default=-1)
        if len(unit[unit.norm == "batch"]) and len(unit[unit.norm == "none"]):
            diffs.append(float(best["batch"] - best["none"]))
    est = bootstrap({"d": diffs}, _mean("d"))
    verdicts.append(
        _verdict(
            "bn-larger-lr",
            "With batch norm, the network still trains at larger learning rates than without",
            est,
            statistic=(
                f"largest lr that reaches the target accuracy ({target:.3f}) with BN minus without, in grid steps "
                f"(x{step:g} in lr per step; -1 if none trains), per init and seed; 95 % bootstrap interval over those pairs"
            ),
            greater_than=0.0,
        )
    )
    # 3b) spread across inits, per (lr, seed)
    diffs = []
    for _, unit in f.groupby(["lr", "seed"]):
        spread = {n: unit[unit.norm == n].score for n in ("none", "batch")}
        if len(spread["none"]) > 1 and len(spread["batch"]) > 1:
            diffs.append(float((spread["none"].max() - spread["none"].min()) - (spread["batch"].max() - spread["batch"].min())))
    est = bootstrap({"d": diffs}, _mean("d"))
    verdicts.append(
        _verdict(
            "bn-less-init-dependent",
            "With batch norm, accuracy depends less on the init scheme",
            est,
            statistic="range of accuracy across inits without BN minus with BN, per lr and seed; 95 % bootstrap interval over those pairs",
            greater_than=0.0,
        )
    )
    table = (
        f.groupby(["norm", "lr"])
        .agg(mean_score=("score", "mean"), trained=("trains", "mean"), median_epochs_to_target=("epochs_to_target", "median"), trials=("score", "count"))
        .reset_index()
    )
    return ClaimResult(combine([v.verdict for v in verdicts]), tuple(verdicts), table)


# -- claim 4: norms and batch size -----------------------------------------------------------


def _eval_norm_batch(data: Mapping[str, StudyData]) -> ClaimResult:
    d = data.get("guide-norm-batch")
    if d is None or _usable(d.trials).empty:
        return ClaimResult(INCONCLUSIVE, (_missing("norm-batch", "norms and batch size", "-", NO_DATA),), pd.DataFrame())
    f = _usable(d.trials)
    small, large = int(f.batch_size.min()), int(f.batch_size.max())

    def drop(norm: str) -> pd.Series:
        g = f[f.norm == norm]
        return g[g.batch_size == large].groupby("seed").score.mean() - g[g.batch_size == small].groupby("seed").score.mean()

    verdicts = []
    bn = drop("batch")
    for other, label in (("group", "group"), ("layer", "layer"), ("rms", "RMS")):
        if not (f.norm == other).any():
            continue
        est = bootstrap({"d": _paired(bn.dropna(), drop(other).dropna())}, _mean("d"))
        verdicts.append(
            _verdict(
                f"bn-drop-vs-{other}",
                f"Going from batch size {large} to {small} costs batch norm more accuracy than {label} norm",
                est,
                statistic=(
                    f"(accuracy at batch {large} - at batch {small}) with batch norm minus the same with {label} norm, "
                    "paired by seed; 95 % bootstrap interval over seeds. Every batch size trains the same epochs, so "
                    "small batches take more steps; that effect is common to all norms and cancels in this difference"
                ),
                greater_than=0.0,
            )
        )
    table = _table(f, ["norm", "batch_size"])
    return ClaimResult(combine([v.verdict for v in verdicts]), tuple(verdicts), table)


# -- claim 5: activations across depths ------------------------------------------------------


def _eval_activations(data: Mapping[str, StudyData]) -> ClaimResult:
    d = data.get("guide-activations")
    if d is None or _usable(d.trials).empty:
        return ClaimResult(INCONCLUSIVE, (_missing("activations", "activations across depths", "-", NO_DATA),), pd.DataFrame())
    f = _usable(d.trials)
    # each activation with its better init, per depth and seed
    best = f.groupby(["activation", "depth", "seed"]).score.max().reset_index()
    shallow, deep = int(best.depth.min()), int(best.depth.max())
    fam = best[best.activation.isin(RELU_FAMILY)]
    sig = best[best.activation == "sigmoid"]
    verdicts = []
    at = lambda g, depth: g[g.depth == depth].groupby("seed").score.mean()  # noqa: E731
    est = bootstrap({"d": _paired(at(fam, deep), at(sig, deep))}, _mean("d"))
    verdicts.append(
        _verdict(
            "relu-family-beats-sigmoid-deep",
            f"At depth {deep}, the ReLU family trains better than sigmoid",
            est,
            statistic=f"mean accuracy of {', '.join(sorted(set(fam.activation)))} minus sigmoid's at depth {deep} (each with its better init), paired by seed; 95 % bootstrap interval over seeds",
            greater_than=0.0,
        )
    )
    drop_sig = at(sig, shallow) - at(sig, deep)
    drop_fam = at(fam, shallow) - at(fam, deep)
    est = bootstrap({"d": _paired(drop_sig.dropna(), drop_fam.dropna())}, _mean("d"))
    verdicts.append(
        _verdict(
            "depth-hurts-sigmoid-more",
            f"Going from depth {shallow} to {deep} costs sigmoid more accuracy than the ReLU family",
            est,
            statistic=f"accuracy drop from depth {shallow} to {deep}, sigmoid minus the ReLU family's mean, paired by seed; 95 % bootstrap interval over seeds",
            greater_than=0.0,
        )
    )
    table = best.groupby(["activation", "depth"]).score.agg(["mean", "count"]).reset_index()
    table = table.rename(columns={"mean": "mean_best_init_score", "count": "seeds"})
    return ClaimResult(combine([v.verdict for v in verdicts]), tuple(verdicts), table)


# -- claim 6: adaptive learning rates --------------------------------------------------------


def _at_best_lr(f: pd.DataFrame, optimizer: str) -> tuple[float | None, pd.DataFrame]:
    g = f[f.optimizer == optimizer]
    if g.empty:
        return None, g
    lr = float(g.groupby("lr").score.mean().idxmax())
    return lr, g[np.isclose(g.lr, lr)]


def _late_gain(curve: Sequence[float]) -> float:
    """Metric gain over the second half of training."""
    if not curve or len(curve) < 2:
        return math.nan
    return float(curve[-1] - curve[(len(curve) - 1) // 2])


def _eval_adaptive_lr(data: Mapping[str, StudyData]) -> ClaimResult:
    d = data.get("guide-adaptive-lr")
    if d is None or _usable(d.trials).empty:
        return ClaimResult(INCONCLUSIVE, (_missing("adaptive-lr", "Adagrad and Adam", "-", NO_DATA),), pd.DataFrame())
    f = _usable(d.trials)
    verdicts = []
    lr_ada, ada = _at_best_lr(f, "adagrad")
    lr_rms, rms = _at_best_lr(f, "rmsprop")
    hyp = "Adagrad, whose step size only shrinks, ends a run behind RMSprop (the same method with a moving average)"
    if lr_ada is None or lr_rms is None:
        verdicts.append(_missing("adagrad-stalls", hyp, "-", "the study has no adagrad or rmsprop trials"))
    else:
        est = bootstrap({"d": _paired(rms.groupby("seed").score.mean(), ada.groupby("seed").score.mean())}, _mean("d"))
        verdicts.append(
            _verdict(
                "adagrad-stalls",
                hyp,
                est,
                statistic=f"final accuracy of RMSprop (best lr {lr_rms:g}) minus Adagrad (best lr {lr_ada:g}), paired by seed; 95 % bootstrap interval over seeds",
                greater_than=0.0,
            )
        )
    default_lr = ONE_SHOT_DEFAULTS["adam"]["lr"]
    lr_adam, adam = _at_best_lr(f, "adam")
    dflt = f[(f.optimizer == "adam") & np.isclose(f.lr, default_lr)]
    if lr_adam is None or dflt.empty:
        verdicts.append(_missing("adam-defaults-close", "Adam's one-shot defaults are close to tuned Adam", "-", f"no Adam trials at lr {default_lr:g}"))
    else:
        est = bootstrap({"d": _paired(adam.groupby("seed").score.mean(), dflt.groupby("seed").score.mean())}, _mean("d"))
        verdicts.append(
            _verdict(
                "adam-defaults-close",
                f"Adam's one-shot defaults (lr {default_lr:g}) land within {ADAM_DEFAULT_MARGIN:g} accuracy of Adam with a tuned lr",
                est,
                statistic=f"accuracy of Adam at its best lr ({lr_adam:g}) minus at lr {default_lr:g}, paired by seed; 95 % bootstrap interval over seeds",
                less_than=ADAM_DEFAULT_MARGIN,
            )
        )
    f = f.assign(late_gain=f.curve.map(_late_gain))
    table = f.groupby(["optimizer", "lr"]).agg(mean_score=("score", "mean"), late_gain=("late_gain", "mean"), trials=("score", "count")).reset_index()
    return ClaimResult(combine([v.verdict for v in verdicts]), tuple(verdicts), table)


def _eval_adadelta(data: Mapping[str, StudyData]) -> ClaimResult:
    d = data.get("guide-adadelta")
    if d is None or _usable(d.trials).empty:
        return ClaimResult(INCONCLUSIVE, (_missing("adadelta", "Adadelta vs SGD sensitivity", "-", NO_DATA),), pd.DataFrame())
    f = _usable(d.trials)
    sgd, ada = f[f.optimizer == "sgd"].score, f[f.optimizer == "adadelta"].score
    sd = lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else math.nan  # noqa: E731
    est = bootstrap({"sgd": sgd.tolist(), "adadelta": ada.tolist()}, lambda g: sd(g["sgd"]) - sd(g["adadelta"]))
    verdict = _verdict(
        "adadelta-insensitive",
        "Adadelta's accuracy varies less over its eps/rho ranges than SGD's over its learning-rate range",
        est,
        statistic="standard deviation of accuracy across SGD's trials minus across Adadelta's (random search); 95 % bootstrap interval resampling each optimizer's trials",
        greater_than=0.0,
    )
    table = f.groupby("optimizer").score.agg(["mean", "std", "min", "max", "count"]).reset_index()
    return ClaimResult(verdict.verdict, (verdict,), table)


# -- claim 7: the default optimizer ----------------------------------------------------------

DEFAULT_STUDIES = ("guide-default-digits", "guide-default-moons", "guide-default-spirals")


def budget_curves(scores: Sequence[float], *, maximize: bool = True) -> list[float]:
    """Expected best of k random trials, k = 1 ... len(scores)."""
    return [expected_best_of_k(scores, k, maximize=maximize) for k in range(1, len(scores) + 1)]


def _eval_default(data: Mapping[str, StudyData]) -> ClaimResult:
    present = [data[s] for s in DEFAULT_STUDIES if s in data and not _usable(data[s].trials).empty]
    present += [d for n, d in data.items() if n not in DEFAULT_STUDIES and n.startswith("guide-default-") and not _usable(d.trials).empty]
    if not present:
        return ClaimResult(INCONCLUSIVE, (_missing("default-optimizer", "Adam as the default", "-", NO_DATA),), pd.DataFrame())
    groups: dict[str, list[float]] = {}
    rows = []
    budgets = {}
    for d in present:
        f = _usable(d.trials)
        a, m = f[f.optimizer == "adam"].score.tolist(), f[f.optimizer == "momentum"].score.tolist()
        groups[f"{d.task}:adam"], groups[f"{d.task}:momentum"] = a, m
        k_max = min(len(a), len(m))
        budgets[d.task] = k_max
        ca, cm = budget_curves(a), budget_curves(m)
        catch = next((k for k in range(1, k_max + 1) if cm[k - 1] >= ca[k - 1]), None)
        rows.append(
            {
                "task": d.task,
                "adam_trials": len(a),
                "momentum_trials": len(m),
                "adam_best_of_1": ca[0] if ca else math.nan,
                "momentum_best_of_1": cm[0] if cm else math.nan,
                "adam_best_of_k_max": ca[k_max - 1] if k_max else math.nan,
                "momentum_best_of_k_max": cm[k_max - 1] if k_max else math.nan,
                "k_max": k_max,
                "momentum_catches_up_at_k": catch if catch is not None else f"> {k_max}",
            }
        )
    tasks = [d.task for d in present]

    def gap(g: dict[str, np.ndarray], task: str, k: int) -> float:
        return expected_best_of_k(g[f"{task}:adam"], k) - expected_best_of_k(g[f"{task}:momentum"], k)

    verdicts = []
    est = bootstrap(groups, lambda g: float(np.mean([gap(g, t, 1) for t in tasks])))
    verdicts.append(
        _verdict(
            "adam-better-untuned",
            "With no tuning budget (one random trial from each search space), Adam beats SGD + momentum",
            est,
            statistic=f"expected accuracy of one random trial, Adam minus momentum, mean over tasks ({', '.join(tasks)}); 95 % bootstrap interval resampling trials within task and optimizer",
            greater_than=0.0,
        )
    )
    est = bootstrap(groups, lambda g: float(np.mean([gap(g, t, 1) - gap(g, t, budgets[t]) for t in tasks])))
    verdicts.append(
        _verdict(
            "momentum-catches-up",
            "Adam's lead over SGD + momentum shrinks as the tuning budget grows",
            est,
            statistic="(Adam minus momentum at budget 1) minus (the same at the largest budget k_max both have), expected best-of-k accuracy, mean over tasks; 95 % bootstrap interval resampling trials within task and optimizer",
            greater_than=0.0,
            note="" if min(budgets.values()) >= 2 else "k_max is 1 for some task: no budget curve",
        )
    )
    return ClaimResult(combine([v.verdict for v in verdicts]), tuple(verdicts), pd.DataFrame(rows))


# -- claim 8: ZerO -------------------------------------------------------------------------


def _seed_spread(stds: Sequence[Any]) -> float:
    """Largest relative spread across trials of a per-layer std list (0 = identical)."""
    lists = [s for s in stds if isinstance(s, (list, tuple)) and s]
    if len(lists) < 2:
        return math.nan
    arr = np.asarray(lists, dtype=float)
    mean = np.abs(arr).mean(axis=0)
    mean[mean == 0] = 1.0
    return float(((arr.max(axis=0) - arr.min(axis=0)) / mean).max())


def _eval_zero(data: Mapping[str, StudyData]) -> ClaimResult:
    d = data.get("guide-zero")
    if d is None or _usable(d.trials).empty:
        return ClaimResult(INCONCLUSIVE, (_missing("zero", "ZerO init", "-", NO_DATA),), pd.DataFrame())
    f = _usable(d.trials)
    zero, he = f[f.init == "zero"], f[f.init != "zero"]
    depth = int(f.depth.max())
    verdicts = []
    key, hyp = "zero-deterministic", "ZerO starts every seed from the same network (per-layer activation std at init identical across seeds); a random init does not"
    stat = "largest relative spread across seeds of the per-layer activation std at init, ZerO (0 = identical) and the random init (exact check)"
    sz, sr = _seed_spread(zero.activation_std.tolist()), _seed_spread(he.activation_std.tolist())
    if not (math.isfinite(sz) and math.isfinite(sr)):
        verdicts.append(_missing(key, hyp, stat, "no activation-std probe stored for two or more seeds (trial attr hposvc.probe.activation_std)"))
    else:
        ok, bad = sz <= SYMMETRY_TOL and sr > SYMMETRY_BROKEN, sz > SYMMETRY_BROKEN
        verdicts.append(
            Verdict(
                key=key,
                hypothesis=hyp,
                verdict=SUPPORTED if ok else NOT_SUPPORTED if bad else INCONCLUSIVE,
                statistic=stat,
                rule=f"supported if ZerO's spread <= {SYMMETRY_TOL:g} and the random init's > {SYMMETRY_BROKEN:g}",
                estimate=sz,
                n=len(zero) + len(he),
                note=f"random init spread {sr:.3g}",
            )
        )
    chance = d.chance if d.chance is not None else 0.0
    mid = (chance + 1.0) / 2
    est = bootstrap({"z": zero.score.tolist()}, lambda g: float(np.mean(g["z"])) - mid)
    verdicts.append(
        _verdict(
            "zero-trains-deep",
            f"ZerO trains a {depth}-layer MLP without normalisation (accuracy more than halfway from chance to 1, i.e. above {mid:.3f})",
            est,
            statistic=f"mean val accuracy of ZerO trials minus {mid:.3f}; 95 % bootstrap interval over trials",
            greater_than=0.0,
        )
    )
    est = bootstrap({"d": _paired(zero.groupby("seed").score.mean(), he.groupby("seed").score.mean())}, _mean("d"))
    verdicts.append(
        _verdict(
            "zero-as-good-as-he",
            f"ZerO trains the deep MLP as well as He init (at most {ZERO_NONINFERIORITY:g} accuracy worse)",
            est,
            statistic="accuracy with ZerO minus with He, paired by seed; 95 % bootstrap interval over seeds",
            greater_than=-ZERO_NONINFERIORITY,
        )
    )
    table = _table(f, ["init", "seed"])
    return ClaimResult(combine([v.verdict for v in verdicts]), tuple(verdicts), table)


# -- the claims -----------------------------------------------------------------------------

CLAIMS: tuple[Claim, ...] = (
    Claim(
        key="zero-init",
        number="1",
        title="Zero vs random initialisation",
        text=(
            "Zero init leaves the hidden units of a layer identical (symmetry never breaks) and trains no "
            "better than a linear model; random schemes do."
        ),
        studies=("guide-zero-init",),
        evaluate=_eval_zero_init,
        figures=("zero_init", "curves"),
    ),
    Claim(
        key="init-deep",
        number="2",
        title="Xavier for sigmoid/tanh, He for ReLU",
        text=(
            "In a deep plain MLP (>= 20 layers, no norm): with ReLU, He init trains while Xavier's signal shrinks "
            "layer by layer and training stalls; with tanh, Xavier is the one that keeps activations in range."
        ),
        studies=("guide-init-deep",),
        evaluate=_eval_init_deep,
        figures=("activation_std", "curves"),
    ),
    Claim(
        key="bn-lr",
        number="3",
        title="Batch norm allows larger learning rates and depends less on init",
        text=(
            "Batch norm lets a network train at larger learning rates (and reach a target accuracy in fewer steps) "
            "and makes its accuracy depend less on the init scheme."
        ),
        studies=("guide-bn-lr",),
        evaluate=_eval_bn_lr,
        figures=("acc_vs_lr",),
    ),
    Claim(
        key="norm-batch",
        number="4",
        title="Batch norm is sensitive to small batches; layer/group norm are not",
        text="Accuracy of batch norm falls as the batch shrinks (2 ... 64); layer and group norm do not depend on the batch size.",
        studies=("guide-norm-batch",),
        evaluate=_eval_norm_batch,
        figures=("acc_vs_batch",),
    ),
    Claim(
        key="activations",
        number="5",
        title="Activations across depths",
        text=(
            "ReLU, Leaky ReLU, GELU and Mish keep training as depth grows; sigmoid's saturating gradient vanishes "
            "with depth; tanh sits in between."
        ),
        studies=("guide-activations",),
        evaluate=_eval_activations,
        figures=("acc_vs_depth",),
    ),
    Claim(
        key="adaptive-lr",
        number="6a",
        title="Adaptive learning rates: Adagrad stalls, Adam's defaults work",
        text=(
            "Adagrad's effective step size only shrinks, so it stalls on long runs; Adam's one-shot defaults land "
            "close to tuned Adam."
        ),
        studies=("guide-adaptive-lr",),
        evaluate=_eval_adaptive_lr,
        figures=("acc_vs_lr_optimizer", "curves_best_lr"),
    ),
    Claim(
        key="adadelta",
        number="6b",
        title="Adadelta is insensitive to its eps and rho",
        text="Adadelta is insensitive to its eps and rho, compared with SGD's sensitivity to its learning rate.",
        studies=("guide-adadelta",),
        evaluate=_eval_adadelta,
        figures=("sensitivity",),
    ),
    Claim(
        key="default-optimizer",
        number="7",
        title="The default optimizer",
        text=(
            "Adam is the right default optimizer: with little tuning it beats SGD with momentum, and tuned "
            "SGD + momentum only catches up at a larger tuning budget."
        ),
        studies=DEFAULT_STUDIES,
        evaluate=_eval_default,
        figures=("budget_curves",),
    ),
    Claim(
        key="zero",
        number="8",
        title="ZerO initialisation",
        text=(
            "ZerO init is deterministic (identical results across seeds apart from data order) and trains a deep "
            "MLP without normalisation."
        ),
        studies=("guide-zero",),
        evaluate=_eval_zero,
        figures=("activation_std", "curves"),
    ),
)

# Every study the guide ships, in claim order.
GUIDE_STUDIES: tuple[str, ...] = tuple(s for c in CLAIMS for s in c.studies)


def claim_for_study(name: str) -> Claim | None:
    """The guide claim study ``name`` tests, or None for any other study."""
    return next((c for c in CLAIMS if name in c.studies), None)
