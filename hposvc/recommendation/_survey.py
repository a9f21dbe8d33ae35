"""The optimizer survey: a declared protocol, run as studies, turned into the shipped result.

The protocol is data: one spec per task in ``studies/survey/protocol/`` (tasks the
recommendation is made from) and ``studies/survey/held-out/`` (tasks that only test it).
Each fixes the task's architecture, epochs, batch size and schedule, lists the optimizers
and gives each an lr range of three decades around its one-shot default. :func:`run_survey`
expands every (task, optimizer) into one study (``survey-<task>-<optimizer>``) whose trials
are queued explicitly, so every optimizer gets the same trials on every task:

1. an lr sweep: ``sweep_points`` values spread evenly in log space over the range (the
   centres of equal log-bins, so none is the default), each at the spec's seed;
2. the one-shot defaults (:data:`~hposvc.config.ONE_SHOT_DEFAULTS`) at each of
   ``default_seeds`` — the default point and the task's seed noise.

A trial is a default run exactly when its seed is one of ``default_seeds``: the protocol
says so, nothing is inferred from the numbers. Trials of one study share an optimizer and
a shape, so a worker trains them as one vectorised population.

:func:`survey_frame` reads the finished trials back with the columns the statistics need
(``at_defaults``, ``floor``, ``curve``, ``held_out``); :mod:`hposvc.recommendation._results`
turns that into the report, RESULTS.md and the shipped ``results.json``.

>>> [s.name for s in SCALES.values()]
['ci', 'full']
>>> sweep(3.16e-5, 3.16e-2, 4)  # adam's range (one-shot lr 1e-3), CI scale
[7.49e-05, 0.000421, 0.00237, 0.0133]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hposvc.config import TrialConfig
from hposvc.errors import HposvcError, InvalidInputError, invalid
from hposvc.recommendation._data import SURVEY_HELD_OUT, SURVEY_KIND, SURVEY_SCALE, SURVEY_TASK, model_kind

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from hposvc.spec import StudySpec

__all__ = ["SCALES", "Scale", "SurveyRun", "SurveyStudy", "SurveyTask", "protocol", "run_survey", "spec_kind", "survey_frame", "survey_studies", "sweep"]

# Where the protocol's specs live among the built-in specs (studies/ is hposvc._studies).
PROTOCOL_GROUP = "survey/protocol"
HELD_OUT_GROUP = "survey/held-out"
SIGNIFICANT_DIGITS = 3  # sweep points read as 0.000316, not 0.00031622776601683794


@dataclass(frozen=True)
class Scale:
    """How much of the protocol one survey run does."""

    name: str
    sweep_points: int  # lr values per task and optimizer (the search; budgets need k <= this)
    default_seeds: tuple[int, ...]  # seeds the one-shot defaults run at (>= 3: the noise estimate)
    budgets: tuple[int, ...]  # tuning budgets the report states (each <= sweep_points)
    tasks: tuple[str, ...] | None = None  # protocol tasks to run (None: all of them)
    held_out: tuple[str, ...] | None = None  # held-out tasks to run (None: all of them)
    optimizers: tuple[str, ...] | None = None  # None: every optimizer the specs list
    max_epochs: int | None = None  # cap on each task's epochs (None: the spec's)
    prefix: str = "survey"  # study names: <prefix>-<task>-<optimizer>


SCALES: dict[str, Scale] = {
    # CI: the whole pipeline on small, quick tasks, in well under 3 minutes on 2 cores.
    "ci": Scale(
        name="ci",
        sweep_points=4,
        default_seeds=(1, 2, 3),
        budgets=(1, 4),
        tasks=("moons", "breast-cancer", "clf-small", "imbalance"),
        held_out=("wine",),
        optimizers=("sgd", "momentum", "adam", "adamw"),
        max_epochs=5,
        prefix="survey-ci",
    ),
    # Full: every task and optimizer, 8 lr points each (budgets up to 8, k <= N). Sized to
    # finish within an hour on 2 busy CPU cores with one worker (16 points, as in the first
    # survey, fit only before the transformer tasks were added).
    "full": Scale(name="full", sweep_points=8, default_seeds=(1, 2, 3), budgets=(1, 4, 8)),
}


@dataclass(frozen=True)
class SurveyTask:
    """One task of the protocol: its spec file and whether it is held out."""

    name: str  # the spec file's stem, e.g. "digits-cnn2d"
    held_out: bool  # True: never enters the recommendation, only tests it
    spec: "StudySpec"
    path: Path

    @property
    def kind(self) -> str:
        """The kind of model the task trains (:func:`spec_kind`)."""
        return spec_kind(self.spec) or "other"


def spec_kind(spec: "StudySpec") -> str | None:
    """The kind of model a spec trains (:data:`~hposvc.recommendation._data.MODEL_KINDS`):
    from its fixed [model] family and depth, else the task's own family (the task is
    loaded for that); None when the family or depth is searched, or the model is the
    user's own.

    >>> from hposvc.spec import parse_spec
    >>> spec_kind(parse_spec({"study": {"name": "s", "task": "digits", "metric": "val_accuracy"}, "model": {"family": "mlp", "depth": 0}}))
    'linear'
    """
    if spec.model is not None or spec.trainer is not None or spec.command is not None:
        return None
    family, depth = (spec.dims[n] if n in spec.dims else None for n in ("family", "depth"))
    if (family is not None and family.kind != "fixed") or (depth is not None and depth.kind != "fixed"):
        return None
    name = family.value if family is not None else None
    if name is None:
        from hposvc.tasks import load_task

        name = load_task(spec.task, seed=spec.seed, options=dict(spec.task_options)).family
    return model_kind(name, depth.value if depth is not None else None)


@dataclass(frozen=True)
class SurveyStudy:
    """One (task, optimizer) study of a survey run: its spec and the trials it queues."""

    task: SurveyTask
    optimizer: str
    spec: "StudySpec"
    configs: tuple[TrialConfig, ...]  # the sweep first, then the defaults over seeds


@dataclass(frozen=True)
class SurveyRun:
    """What :func:`run_survey` did."""

    scale: str
    storage: str
    tracking_uri: str
    studies: list[str]  # every study of the run, protocol and held-out
    n_trials: int  # trials the protocol asks for
    n_done: int  # finished (COMPLETE or PRUNED) trials now
    ran: int  # trials this call trained
    seconds: float  # wall time of this call
    workers: int  # worker processes (1: this process)
    population: int | str | None  # trials trained together per claim


def sweep(low: float, high: float, points: int) -> list[float]:
    """``points`` lr values spread evenly in log space over [low, high]: the centres of
    equal log-bins, rounded to 3 significant digits."""
    if not (0 < low < high):
        raise invalid("lr range", (low, high), "0 < low < high")
    ratio = math.log(high / low)
    return [float(f"{low * math.exp(ratio * (i + 0.5) / points):.{SIGNIFICANT_DIGITS}g}") for i in range(points)]


def protocol() -> list[SurveyTask]:
    """Every task of the shipped protocol, protocol tasks first, each group sorted by name."""
    from hposvc.builtin import builtin_specs
    from hposvc.spec import load_spec

    out = []
    for group, held_out in ((PROTOCOL_GROUP, False), (HELD_OUT_GROUP, True)):
        for builtin in builtin_specs(group):
            out.append(SurveyTask(name=builtin.name.rsplit("/", 1)[1], held_out=held_out, spec=load_spec(builtin.path), path=builtin.path))
    if not out:
        raise HposvcError("hposvc's survey protocol (studies/survey/protocol/) is not installed. Reinstall hposvc.")
    return out


def _scale(scale: str | Scale) -> Scale:
    if isinstance(scale, Scale):
        return scale
    if scale not in SCALES:
        raise invalid("scale", scale, list(SCALES), source="survey", hint="CLI: --scale ci|full.")
    return SCALES[scale]


def _selected(tasks: list[SurveyTask], sc: Scale) -> list[SurveyTask]:
    names = {t.name for t in tasks}
    for wanted, kind in ((sc.tasks, "protocol"), (sc.held_out, "held-out")):
        for name in wanted or ():
            if name not in names:
                raise invalid("tasks", name, sorted(names), source=f"survey scale {sc.name!r}", hint=f"A {kind} task of studies/survey/.")
    return [
        t
        for t in tasks
        if (t.held_out and (sc.held_out is None or t.name in sc.held_out)) or (not t.held_out and (sc.tasks is None or t.name in sc.tasks))
    ]


def survey_studies(scale: str | Scale = "full", *, population: int | str | None = None) -> list[SurveyStudy]:
    """The (task, optimizer) studies of a survey run, with the trials each queues."""
    from hposvc.spec import parse_spec

    sc = _scale(scale)
    out = []
    for task in _selected(protocol(), sc):
        base = task.spec
        optimizers = [o for o in base.optimizers if sc.optimizers is None or o in sc.optimizers]
        for opt in optimizers:
            data = base.to_dict()
            study, space = data["study"], data["space"]
            study.update(name=f"{sc.prefix}-{task.name}-{opt}", n_trials=sc.sweep_points + len(sc.default_seeds))
            study.pop("description", None)
            if population is not None:
                study["population"] = population
            space["optimizer"] = opt
            space["optimizers"] = {opt: space.get("optimizers", {}).get(opt, {})}
            space["seed"] = [base.seed, *sc.default_seeds]
            if sc.max_epochs is not None:
                space["epochs"] = min(int(space.get("epochs", TrialConfig.epochs)), sc.max_epochs)
            spec = parse_spec(data, source=f"{task.path} ({opt})")
            out.append(SurveyStudy(task=task, optimizer=opt, spec=spec, configs=tuple(_configs(spec, opt, sc))))
    return out


def _configs(spec: "StudySpec", opt: str, sc: Scale) -> list[TrialConfig]:
    fixed = {name: dim.value for name, dim in spec.dims.items() if dim.kind == "fixed" and name != "optimizer"}
    fixed.update(spec.implicit_values())
    fixed.pop("seed", None)
    lr_dim = spec.optimizer_space(opt).get("lr", (None, None))[1]
    if lr_dim is None or lr_dim.kind != "range":
        raise invalid("lr", None if lr_dim is None else lr_dim.to_json(), "a range {low, high, log = true}", source=spec.source, hint="The survey sweeps each optimizer's lr over its range.")
    search = [TrialConfig(optimizer=opt, lr=lr, seed=spec.seed, **fixed) for lr in sweep(lr_dim.low, lr_dim.high, sc.sweep_points)]
    defaults = [TrialConfig(optimizer=opt, seed=seed, **fixed) for seed in sc.default_seeds]
    return search + defaults


# -- running -------------------------------------------------------------------------------


def run_survey(
    *,
    scale: str | Scale = "full",
    population: int | str | None = "auto",
    workers: int | str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    progress: bool = False,
) -> SurveyRun:
    """Run (or resume) the survey protocol at ``scale`` ("ci" or "full").

    Every (task, optimizer) study is created first, with its trials queued; then one
    worker per slot (``workers``: a number, "auto" for one per device slot, None for this
    process alone) runs them, each study's trials claimed as populations of
    ``population`` ("auto": a whole study at once; None: one trial at a time).
    Re-running resumes: finished trials are kept.

    >>> run = run_survey(scale="ci", data_dir="survey-data")  # doctest: +SKIP
    >>> run.n_done == run.n_trials                            # doctest: +SKIP
    True
    """
    from hposvc import queue
    from hposvc.config import check_population
    from hposvc.devices import plan_slots
    from hposvc.storage import resolve_storage_url, resolve_tracking_uri
    from hposvc.study import prepare_study
    from hposvc.tracking import open_tracker

    sc = _scale(scale)
    population = check_population(population, key="population", source="survey")
    url = resolve_storage_url(storage, data_dir=data_dir)
    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    slots = plan_slots("cpu" if device == "cpu" else "auto", workers=workers) if workers is not None else []
    t0 = time.perf_counter()
    todo = survey_studies(sc)
    if population == "auto":
        # A study's trials share an optimizer and a shape: train each study as one population.
        population = max(len(c.configs) for c in todo)

    # 1) every study and its queue, before any training (a bad spec fails here, not midway)
    kinds = {c.task.name: c.task.kind for c in todo}
    names, before = [], 0
    for i, one in enumerate(todo):
        study = prepare_study(one.spec, storage=url, enqueue=one.configs)
        attrs = {SURVEY_TASK: one.task.name, SURVEY_HELD_OUT: one.task.held_out, SURVEY_SCALE: sc.name, SURVEY_KIND: kinds[one.task.name]}
        for key, value in attrs.items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        if len(slots) > 1:
            # the MLflow experiment and parent run, once, before workers race to create them
            open_tracker(study, spec=one.spec.to_dict(), tracking_uri=uri, data_dir=data_dir, storage=url)
        before += queue.counts(study).done
        names.append(one.spec.name)
        if progress:
            _say(f"survey {sc.name}: prepared {i + 1}/{len(todo)} studies", end="\r")
    if progress:
        _say(f"survey {sc.name}: {len(todo)} studies, {sum(len(c.configs) for c in todo)} trials")

    # 2) the workers
    if len(slots) <= 1:
        run_share(names, storage=url, tracking_uri=uri, data_dir=data_dir, device=slots[0].device if slots else device, population=population, progress=progress)
    else:
        _run_slots(names, slots, storage=url, tracking_uri=uri, data_dir=data_dir, population=population)
    done = sum(queue.counts(_load(url, n)).done for n in names)
    return SurveyRun(
        scale=sc.name,
        storage=url,
        tracking_uri=uri,
        studies=names,
        n_trials=sum(len(c.configs) for c in todo),
        n_done=done,
        ran=done - before,
        seconds=time.perf_counter() - t0,
        workers=max(1, len(slots)),
        population=population,
    )


def _load(url: str, name: str) -> "optuna.Study":
    from hposvc.storage import load_study

    return load_study(name, storage=url)


def _say(text: str, *, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def run_share(
    names: Sequence[str],
    *,
    storage: str,
    tracking_uri: str,
    data_dir: str | os.PathLike[str] | None,
    device: str = "auto",
    population: int | str | None = "auto",
    offset: int = 0,
    stride: int = 1,
    progress: bool = False,
) -> int:
    """Run the studies ``names[offset::stride]``, then any other study that still has
    waiting trials (a share whose worker died); returns the trials this process ran."""
    from hposvc import queue
    from hposvc.worker import run_worker

    ran = 0
    mine = list(names[offset::stride])
    rest = [n for n in names if n not in set(mine)]
    for i, name in enumerate([*mine, *rest]):
        if i >= len(mine) and queue.counts(_load(storage, name))["WAITING"] == 0:
            continue  # another worker's share, and nothing left to claim in it
        t = time.perf_counter()
        result = run_worker(name, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, device=device, population=population, worker_id=f"survey:{os.getpid()}")
        ran += result.ran
        if progress:
            _say(f"[{i + 1}/{len(mine)}] {name}: {result.ran} trials in {time.perf_counter() - t:.1f} s")
    return ran


def _run_slots(names: list[str], slots: list[Any], *, storage: str, tracking_uri: str, data_dir: Any, population: Any) -> None:
    """One process per slot, each running its share of the studies (pinned and threaded
    as the launcher pins ``hposvc worker`` processes); interrupts are forwarded."""
    import signal

    from hposvc.devices import slot_env
    from hposvc.errors import Interrupted

    procs = []
    for slot in slots:
        job = {
            "names": names,
            "storage": storage,
            "tracking_uri": tracking_uri,
            "data_dir": None if data_dir is None else str(data_dir),
            "device": slot.device,
            "population": population,
            "offset": slot.index,
            "stride": len(slots),
        }
        cmd = [sys.executable, "-m", "hposvc.recommendation._survey", json.dumps(job)]
        procs.append(subprocess.Popen(cmd, env={**os.environ, **slot_env(slot)}, start_new_session=True))
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise Interrupted(signal.SIGINT) from None
    failed = [p.returncode for p in procs if p.returncode != 0]
    if failed:
        raise HposvcError(f"{len(failed)} survey worker(s) exited with codes {failed}. Re-run `hposvc survey run` with the same options to resume.")


# -- reading it back -------------------------------------------------------------------------


def survey_frame(
    storage: "str | optuna.storages.BaseStorage | None" = None,
    *,
    scale: str | Scale = "full",
    data_dir: str | os.PathLike[str] | None = None,
) -> "pd.DataFrame":
    """The finished trials of a survey run, one row each, as :func:`collect_trials` gives
    them plus: ``task`` (the protocol's task name), ``held_out``, ``at_defaults`` (the
    trial ran at a default seed), ``floor`` (chance accuracy; for a loss, predicting the
    training mean or, for classes, the training class frequencies), ``kind`` (the task's
    kind of model) and ``curve`` (the metric per epoch).

    >>> df = survey_frame("sqlite:///survey-data/hposvc.db", scale="ci")  # doctest: +SKIP
    """
    from hposvc.recommendation._data import collect_trials, open_storage

    sc = _scale(scale)
    store = open_storage(storage, data_dir=data_dir)
    wanted = {c.spec.name: c for c in survey_studies(sc)}
    present = [s.study_name for s in store.get_all_studies() if s.study_name in wanted]
    if not present:
        raise InvalidInputError(
            f"the storage has no study of the {sc.name!r} survey. Run it first: `hposvc survey run --scale {sc.name}` "
            f"(API: run_survey(scale={sc.name!r}))."
        )
    df = collect_trials(store, studies=present, held_out=True)
    study_of = df["study"].map(wanted)
    df["task"] = study_of.map(lambda c: c.task.name)
    df["held_out"] = study_of.map(lambda c: c.task.held_out).astype(bool)
    kinds = {name: c.task.kind for name, c in wanted.items() if name in set(present)}
    df["kind"] = df["study"].map(kinds)
    df["at_defaults"] = [int(seed) in sc.default_seeds for seed in df["seed"]]
    floors = {c.spec.name: _floor(c.spec) for c in wanted.values()}
    df["floor"] = df["study"].map(floors).astype(float)
    df.attrs["studies"] = present
    return df


def _floor(spec: "StudySpec") -> float:
    """The task's floor in metric units: chance accuracy (the commonest validation class),
    or for a loss the validation loss of predicting the training mean (regression) or the
    training class frequencies (multiclass)."""
    from hposvc.report.data import chance_accuracy
    from hposvc.tasks import load_task

    if spec.metric == "val_accuracy":
        value = chance_accuracy(spec.task, seed=spec.seed, options=dict(spec.task_options))
        if value is not None:
            return float(value)
    task = load_task(spec.task, seed=spec.seed, options=dict(spec.task_options))
    if task.kind == "regression":
        return float(((task.y_val - task.y_train.mean()) ** 2).mean())
    if task.kind == "multiclass":
        # the cross-entropy of predicting the training class frequencies (a char LM: unigram)
        import torch

        freq = torch.bincount(task.y_train, minlength=task.n_outputs).double() / len(task.y_train)
        return float(-torch.log(freq.clamp_min(1.0 / len(task.y_train))[task.y_val]).mean())
    return math.nan  # a binary loss: the median trial serves


def _main(argv: list[str]) -> int:
    """``python -m hposvc.recommendation._survey JOB``: one slot's share (see _run_slots)."""
    from hposvc.devices import apply_slot_threads
    from hposvc.errors import Interrupted

    apply_slot_threads()
    job = json.loads(argv[0])
    try:
        run_share(**job)
    except (Interrupted, KeyboardInterrupt):
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover - a worker process of _run_slots
    raise SystemExit(_main(sys.argv[1:]))
