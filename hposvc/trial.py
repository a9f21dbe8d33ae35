"""One claimed trial, from its config to its end in Optuna and MLflow.

A :class:`TrialJob` samples the trial's :class:`~hposvc.config.TrialConfig`, opens its
MLflow run, and hands a :class:`~hposvc.context.TrialContext` to what trains it: hposvc's
own loop (:func:`train_trial`), the spec's trainer function, or its command
(:mod:`hposvc.script`). Each epoch reported through the context goes to the trial (so
pruners work) and to MLflow. The trial ends COMPLETE (final metric), PRUNED (pruner, or
diverged in hposvc's loop — the reason is stored) or FAIL (an error, an out-of-memory, an
interruption). :func:`run_population` trains several claimed trials as one vectorised
model (:func:`hposvc.population.train_population`) where they share a structure.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hposvc import interrupts, plugins, queue, records
from hposvc.config import TrialConfig
from hposvc.context import TrialContext
from hposvc.dashboard import VALUE_METRIC
from hposvc.errors import TrainingError, TrialPruned
from hposvc.interrupts import STOPS
from hposvc.storage import OUTAGE, with_retries

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from hposvc.spec import StudySpec
    from hposvc.tasks import Task
    from hposvc.tracking import Tracker, TrialRun
    from hposvc.train import TrainResult

__all__ = ["CompletedTrials", "Outcome", "TrialEnv", "TrialJob", "run_population", "run_trial", "train_trial"]

log = logging.getLogger(__name__)

# Per study and model structure: why its trials cannot train as one population (None:
# they can). Checked once per process, and the reason logged once.
_VMAP_VERDICTS: dict[tuple[str, Any], str | None] = {}
# How stale the completed trials a local pruning decision reads may get (seconds): other
# workers' results reach a long trial's decisions at most this late.
SNAPSHOT_SECONDS = 10.0


@dataclass(frozen=True)
class TrialEnv:
    """What every trial a worker runs shares."""

    study: "optuna.Study"
    spec: "StudySpec"
    task: "Task | None"
    tracker: "Tracker"
    device: Any  # a torch.device (hposvc.devices.resolve_device)
    worker_id: str = ""
    trials_dir: Path | None = None  # checkpoints and logs, one folder per trial
    writes: "queue.WriteBehind" = field(default_factory=lambda: queue.WriteBehind())
    snapshot: "CompletedTrials | None" = None  # for pruning without a read per epoch


class TrialJob:
    """One claimed trial from config to its end in Optuna and MLflow.

    :meth:`start` samples the config and opens the MLflow run; :attr:`ctx` is the
    :class:`~hposvc.context.TrialContext` the training code reports through
    (:meth:`on_report`); :meth:`finish` and :meth:`fail` end the trial.
    """

    def __init__(self, env: "TrialEnv", trial: "optuna.Trial") -> None:
        self.env, self.trial = env, trial
        self.study, self.spec, self.tracker, self.device = env.study, env.spec, env.tracker, env.device
        self.worker_id, self.trials_dir, self.writes = env.worker_id, env.trials_dir, env.writes
        # Pruners that read only completed trials decide here, on a snapshot, without a
        # database read per epoch; the others (successive halving, hyperband) go through
        # Optuna's should_prune, which reads and writes the study's rungs.
        self.snapshot = env.snapshot if env.snapshot is not None and env.snapshot.serves(env.study.pruner) else None
        self.frozen: Any = None  # this trial as the local pruner sees it
        self.run: TrialRun | None = None
        self.task: Task | None = env.task  # the task this trial trains on (start may load its own)
        self.ctx: TrialContext | None = None
        self.ended = False
        self.init_std: list[float | None] | None = None
        self.prunes = self.spec.pruner != "none"  # no pruner: skip the per-epoch storage read

    def start(self, task: "Task | None") -> TrialConfig:
        """Sample the config, open the MLflow run, record where the trial runs, and make
        the trial's context."""
        from hposvc.space import suggest_config

        trial, dev = self.trial, self.device
        defaults = {} if task is None else {"depth": task.default_depth, "width": task.default_width}
        queue.seed_sampler(self.study.sampler, queue.trial_seed(self.spec.seed, trial.number))
        config = suggest_config(trial, self.spec, task_defaults=defaults)
        task = self.task = plugins.trial_task(self.spec, task, config.params)  # a task factory may take a searched dimension
        self.run = self.tracker.start_trial(trial.number, config, tags={"hposvc.device": str(dev), "hposvc.worker": self.worker_id})
        frozen = queue.frozen_copy(trial)  # (before the attribute writes below update the trial from a thread)
        if self.snapshot is not None:
            self.snapshot.refresh()  # (before those writes too: the write thread would hold the GIL)
            self.frozen = frozen
        attrs = {
            records.CONFIG: config.to_dict(),
            records.DEVICE: str(dev),
            records.HOST: socket.gethostname(),
            records.WORKER: self.worker_id,
        }
        for key, value in attrs.items():
            self.writes.user_attr(trial, key, value)
        # A retry shares the folder of the trial it retries, so it finds that one's checkpoint.
        first = frozen.system_attrs.get("failed_trial", trial.number)
        self.ctx = TrialContext(
            config,
            on_report=self.on_report,
            task=task,
            device=dev,
            trial_number=trial.number,
            study_name=self.study.study_name,
            metric=self.spec.metric,
            trial_dir=None if self.trials_dir is None else self.trials_dir / f"trial-{first}",
            logger=logging.getLogger(f"hposvc.trial.{trial.number}"),
            model_factory=plugins.model_factory(self.spec, task, config, on_built=self.log_model),
            # [train] timeout: the trial's clock starts now, with its config
            timeout=self.spec.timeout,
            deadline=None if self.spec.timeout is None else time.monotonic() + self.spec.timeout,
        )
        return config

    def log_model(self, model: Any, report: Any) -> None:
        """What the trial trains, on its MLflow run: ``model.txt`` (``str(model)`` after
        conversion), ``n_params``, and what conversion changed (``conversion.txt``)."""
        from hposvc.nn import count_parameters

        conversion = report.describe() if report is not None else None
        self.log_model_text(str(model), count_parameters(model), conversion, list(report.notes) if report is not None else [])

    def log_model_text(self, text: str, n_params: int, conversion: str | None, notes: list[str]) -> None:
        """:meth:`log_model` for a model described already (one a trainer's child process built)."""
        self.run.add_text("model.txt", text)
        self.run.log_epoch({"n_params": n_params}, step=0)
        if conversion is not None:
            self.run.add_text("conversion.txt", conversion)
        for note in notes:
            self.ctx.logger.info("%s", note)

    def on_report(self, epoch: int, metrics: "dict[str, float]") -> bool:
        """Report an epoch to the trial (pruners) and MLflow; True when it should stop."""
        value = metrics[self.spec.metric]
        self.run.log_epoch(metrics, step=epoch)
        if self.snapshot is not None or not self.prunes:
            self.writes.intermediate(self.trial, epoch, value)
            interrupts.check()  # a signal some library caught and wrapped: stop here
            if not self.prunes:
                return False
            self.frozen.intermediate_values.setdefault(epoch, value)  # (a step reported twice keeps its first value, as in Optuna)
            return bool(self.study.pruner.prune(self.snapshot, self.frozen))
        with_retries(lambda: self.trial.report(value, epoch), what="reporting an epoch")
        interrupts.check()
        return with_retries(self.trial.should_prune, what="asking the pruner")

    def on_epoch(self, m: Any) -> bool:
        """hposvc's own loop (and the population's): one epoch's EpochMetrics."""
        return self.ctx.should_stop(m.epoch, **m.metrics())

    def probe_init(self, task: "Task") -> None:
        """Each hidden layer's activation std at init, on the model training starts from."""
        from hposvc.probes import PROBE_SAMPLES, activation_std_per_layer

        model = self.ctx.model if self.ctx.model is not None else self.ctx.build_model()
        x = task.x_val[:PROBE_SAMPLES].to(self.device)
        self.init_std = [records.finite_or_none(v) for v in activation_std_per_layer(model, x)]
        # stored now, while the trial trains, rather than with the result
        self.writes.user_attr(self.trial, records.ACTIVATION_STD, self.init_std)

    def finish(self, outcome: "Outcome") -> str:
        """Tell Optuna and MLflow how training ended: COMPLETE, or PRUNED with the reason."""
        import optuna

        # Probes the guide's claims are judged on: activation std per layer at init (stored
        # by probe_init), and whether training broke the symmetry between hidden units.
        if outcome.model is not None:
            from hposvc.probes import unit_symmetry

            symmetry = records.finite_or_none(unit_symmetry(outcome.model))
            self.writes.user_attr(self.trial, records.UNIT_SYMMETRY, symmetry)
        self.writes.flush()  # the intermediate values and attributes land before the result
        if outcome.completed:
            state, reason = "COMPLETE", None
            value = outcome.final[self.spec.metric]
            with_retries(lambda: self.study.tell(self.trial, value, skip_if_finished=True), what="storing the trial's result")
            if self.snapshot is not None:
                self.snapshot.add(self.frozen, value)
        else:
            state = "PRUNED"
            reason = outcome.reason or f"pruned by {type(self.study.pruner).__name__}"
            with_retries(lambda: self.trial.set_user_attr(records.REASON, reason), what="storing the prune reason")
            with_retries(lambda: self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True), what="storing the trial's result")
        for path, text in outcome.artifacts.items():
            self.run.add_text(path, text)
        final = {f"final_{k}": v for k, v in outcome.final.items()}
        if outcome.completed:
            final[VALUE_METRIC] = outcome.final[self.spec.metric]  # what Optuna was told, under one name
        self.run.end(state, reason=reason, metrics=final)  # the tracking process logs the study's best_value then
        self.ended = True
        return state

    def fail(self, e: BaseException) -> str:
        """The trial ends FAIL with the reason (interruptions, OOM and errors).

        An error that hides an interruption (a signal a library caught and wrapped) fails
        the trial as interrupted and raises the interruption, so the worker stops. A job
        that has ended already is left as it is. An interrupted trial is re-queued (the
        study's next run resumes it); one that failed on its own is not: it would fail again.
        """
        import traceback

        import optuna

        from hposvc.devices import free_device_memory, is_out_of_memory

        if self.ended:
            return "FAIL"
        try:
            self.writes.flush()
        except Exception as flush_error:  # noqa: BLE001 (the trial fails either way; say why below)
            log.warning("trial %s: storing its epochs failed too: %s", self.trial.number, flush_error)
        if (stop := interrupts.interruption(e)) is not None and stop is not e:
            self.fail(stop)
            raise stop from e
        self.ended = True
        if isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
            # Another process finished this trial (e.g. failed it as stale): its state is
            # final and its retry, if any, is queued already.
            log.warning("trial %s was finished elsewhere: %s", self.trial.number, e)
            if self.run is not None:
                self.run.end("FAIL", reason=f"finished elsewhere: {e}")
            return "FAIL"
        if isinstance(e, STOPS):
            reason = "interrupted: " + (str(e) or "SIGINT")
        elif is_out_of_memory(e):
            free_device_memory(self.device)  # the worker goes on with the next trial
            reason = f"out of memory on {self.device}: {e}"
        else:
            reason = f"{type(e).__name__}: {e}"
            log.error("trial %s failed: %s", self.trial.number, reason)
            if self.run is not None:
                # a trainer's child process sends its own traceback (hposvc.isolate)
                self.run.add_text("traceback.txt", getattr(e, "child_traceback", None) or "".join(traceback.format_exception(e)))
        queue.tell_fail(self.study, self.trial, reason)
        if self.run is not None:
            self.run.end("FAIL", reason=reason)
        # Retry only what can succeed: an interrupted trial runs again (from its checkpoint)
        # when the study is run again; one whose code raised, whose command exited non-zero
        # or which timed out would fail the same way. (A dead worker's trial is re-queued by
        # whoever finds it stale: queue.StaleWatch.)
        frozen = self.trial.storage.get_trial(queue.trial_id(self.trial))
        if frozen.state.name == "FAIL" and isinstance(e, STOPS):
            queue.requeue(self.study, frozen)
        return "FAIL"


class CompletedTrials:
    """The completed trials of a study, as a pruner that reads nothing else sees them
    (Optuna's median and percentile pruners): read once per trial and at most every
    :data:`SNAPSHOT_SECONDS` while it runs, instead of at every epoch."""

    def __init__(self, study: "optuna.Study") -> None:
        self.study = study
        self.direction = study.direction
        self.directions = study.directions
        self._trials: list = []
        self._read_at = -math.inf

    @staticmethod
    def serves(pruner: Any) -> bool:
        import optuna

        return type(pruner) in (optuna.pruners.MedianPruner, optuna.pruners.PercentilePruner, optuna.pruners.NopPruner)

    def refresh(self) -> None:
        """Read the completed trials again, unless the light read of the study's states
        shows that none completed since the last read (other than this worker's own,
        :meth:`add`): a worker alone on a study then reads only states between trials."""
        import optuna

        complete = {tid for tid, _, state in queue.trial_states(self.study) if state == "COMPLETE"}
        if complete != {queue.trial_id(t) for t in self._trials}:
            self._trials = with_retries(lambda: self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), what="reading completed trials")
        self._read_at = time.monotonic()

    def add(self, trial: "FrozenTrial", value: float) -> None:
        """This worker's trial, just told COMPLETE with ``value``, as the storage now holds it."""
        import optuna

        trial.state, trial.value = optuna.trial.TrialState.COMPLETE, value
        self._trials = [*self._trials, trial]

    def get_trials(self, deepcopy: bool = False, states: Any = None) -> list:
        if time.monotonic() - self._read_at > SNAPSHOT_SECONDS and not OUTAGE.active:
            self.refresh()  # other workers' results, during a long trial (not while the storage is away: training goes on)
        return [t for t in self._trials if states is None or t.state in states]


@dataclass(frozen=True)
class Outcome:
    """How a trial's training ended, whatever trained it."""

    completed: bool  # False: pruned (by the pruner, or diverged in hposvc's own loop)
    final: dict[str, float]  # final metrics, logged as final_* on the MLflow run
    reason: str | None = None
    model: Any = None  # the trained model, for the unit-symmetry probe (hposvc's own loop)
    artifacts: dict[str, str] = field(default_factory=dict)  # MLflow artifact path -> text

    @classmethod
    def of_train(cls, result: Any) -> "Outcome":
        """From :class:`hposvc.train.TrainResult`: stopped and diverged trials are PRUNED."""
        return cls(result.status == "completed", dict(result.final), result.reason, result.model)


def train_trial(ctx: TrialContext) -> "TrainResult":
    """hposvc's own trainer, written against the same :class:`~hposvc.context.TrialContext`
    as a user's: the model from ``ctx.build_model()`` (or the one built already), every
    epoch through ``ctx.should_stop`` (Optuna and MLflow), stopped when the pruner says so."""
    from hposvc.train import train

    model = ctx.model if ctx.model is not None else ctx.build_model()
    every = ctx.config.checkpoint_every and ctx.trial_dir is not None  # [train] checkpoint_every
    return train(
        ctx.config, ctx.task, device=ctx.device, model=model, keep_model=True,
        on_epoch=lambda m: ctx.should_stop(m.epoch, **m.metrics()),
        checkpoint=ctx.checkpoint if every else None,
        resume=ctx.restore() if every else None,
        on_batch=ctx.check_time if ctx.deadline is not None else None,  # [train] timeout: checked every batch
    )


def _vmap_verdict(env: TrialEnv, model: Any, config: TrialConfig) -> str | None:
    """Why trials of ``model``'s structure train one at a time in this study, or None:
    :func:`hposvc.population.vmap_reason` on one built model, once per study and
    structure; a refusal is logged once."""
    from hposvc.population import structure_key, vmap_reason

    key = (env.spec.name, structure_key(model))
    if key not in _VMAP_VERDICTS:
        reason = vmap_reason(model, env.task.x_val[:2].to(env.device))
        _VMAP_VERDICTS[key] = reason
        if reason is not None:
            what = f"model = {env.spec.model!r}" if env.spec.model is not None else f"family {config.family!r}"
            log.warning("study %s: trials of %s (norm %s, activation %s) train one at a time, not as a population: %s",
                        env.spec.name, what, config.norm, config.activation, reason)
    return _VMAP_VERDICTS[key]


def _train_builtin(job: TrialJob, task: "Task") -> Outcome:
    job.probe_init(task)
    return Outcome.of_train(train_trial(job.ctx))


def _train_user(job: TrialJob, task: "Task | None") -> Outcome:
    """The spec's trainer function: ``train(ctx)`` returns the final metrics."""
    import optuna

    from hposvc.plugins import load_callable

    spec, ctx = job.spec, job.ctx
    if ctx.deadline is not None:
        # Under a time limit the trainer runs in a child process the limit can always end,
        # even one that hangs without reporting (hposvc.isolate).
        from hposvc.isolate import run_trainer
        from hposvc.script import DEFAULT_GRACE

        kind, result = run_trainer(
            spec, ctx.config, trial_number=job.trial.number, trial_dir=ctx.trial_dir, device=str(job.device),
            deadline=ctx.deadline, timeout=ctx.timeout, grace=DEFAULT_GRACE,
            on_report=lambda epoch, metrics: ctx.should_stop(epoch, **metrics), on_model=job.log_model_text,
        )
        if kind == "pruned":
            return Outcome(False, dict(ctx.history[-1][1]) if ctx.history else {}, result)
        return Outcome(True, _final_metrics(result, spec.metric, what=f"{spec.trainer}(ctx)"))
    fn = load_callable(spec.trainer, key="study.trainer", code_dir=spec.code_dir, source=spec.source)
    try:
        final = fn(ctx)
    except (TrialPruned, optuna.TrialPruned) as e:
        last = dict(ctx.history[-1][1]) if ctx.history else {}
        return Outcome(False, last, f"pruned: {e}" if str(e) else None)
    return Outcome(True, _final_metrics(final, spec.metric, what=f"{spec.trainer}(ctx)"))


def _train_command(job: TrialJob, task: "Task | None") -> Outcome:
    """The spec's command, one process per trial; metrics come back as lines on stdout."""
    import json
    import os

    from hposvc import script

    spec, ctx = job.spec, job.ctx
    argv = script.render(list(spec.command), ctx.config)
    trial_dir = ctx.trial_dir or Path.cwd()
    log_dir = trial_dir / f"attempt-{job.trial.number}"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HPOSVC_CONFIG": json.dumps(ctx.config.to_dict()),
        "HPOSVC_TRIAL_DIR": str(trial_dir),
        "HPOSVC_TRIAL_NUMBER": str(job.trial.number),
        "HPOSVC_STUDY": spec.name,
        "HPOSVC_DEVICE": str(job.device),
        # a Python script's prints reach the pipe as they happen, so the pruner sees each epoch
        "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED") or "1",
    }
    result = script.run(
        argv, cwd=spec.code_dir or ".", env=env, log_dir=log_dir,
        on_metrics=lambda epoch, metrics: ctx.should_stop(epoch, **metrics),
        metric=spec.metric, patterns=spec.metrics,  # [metrics]: values read from the output
        on_values=lambda step, values: job.run.log_epoch(values, step=step),
        timeout=None if ctx.deadline is None else max(ctx.deadline - time.monotonic(), 0.0), limit=ctx.timeout,  # [train] timeout
    )
    logs = {f"logs/{p.name}": p.read_text(errors="replace") for p in (result.stdout_path, result.stderr_path) if p and p.is_file()}
    if result.status != "completed":
        return Outcome(False, dict(result.final), f"pruned by {type(job.study.pruner).__name__}: the command was stopped", artifacts=logs)
    return Outcome(True, _final_metrics(result.final, spec.metric, what=" ".join(argv)), artifacts=logs)


def _final_metrics(final: Any, metric: str, *, what: str) -> dict[str, float]:
    """A trainer's result as final metrics; the study's metric must be a finite number."""
    import math

    if not isinstance(final, Mapping):
        raise TrainingError(f"{what} returned {type(final).__name__}; it must return a dict of final metrics with {metric!r} in it.")
    if metric not in final:
        raise TrainingError(f"{what} returned no {metric!r} (the study's metric); it returned {sorted(final)}.")
    try:
        clean = {str(k): float(v) for k, v in final.items() if v is not None}
    except (TypeError, ValueError) as e:
        raise TrainingError(f"{what} returned a metric that is not a number: {e}") from e
    if not math.isfinite(clean[metric]):
        raise TrainingError(f"diverged: {what} returned {metric} = {clean[metric]}")
    return clean


def _runner(spec: "StudySpec") -> "Callable[[TrialJob, Task | None], Outcome]":
    if spec.trainer is not None:
        return _train_user
    if spec.command is not None:
        return _train_command
    return _train_builtin


def run_trial(env: TrialEnv, trial: "optuna.Trial") -> str:
    """Train one claimed trial and tell Optuna and MLflow how it ended; returns the state.

    What trains it: hposvc's own loop, the spec's trainer function, or its command.
    """
    job = TrialJob(env, trial)
    # The heartbeat starts before anything else touches the trial: a trial without one
    # could never be recognised as stale if this worker died right now.
    with queue.heartbeat([trial]):
        try:
            job.start(env.task)
            return job.finish(_runner(env.spec)(job, job.task))
        except STOPS as e:
            job.fail(e)
            raise
        except Exception as e:  # noqa: BLE001 (one trial's error must not stop the worker)
            return job.fail(e)


def run_population(env: TrialEnv, trials: "Sequence[optuna.Trial]") -> list[str]:
    """Train several claimed trials together where they share a structure.

    Every trial builds its own model first (seeded, converted: its own init), as it would
    alone. Trials are grouped by :func:`hposvc.population.population_key` on their built
    models (hposvc's families and the user's own alike); the first time this study meets
    a structure, one of its models is checked for vectorising
    (:func:`hposvc.population.vmap_reason`), and a structure that fails the check trains
    one trial at a time, its reason logged once. Each group of two or more trains as one
    vectorised population, each member reporting to its own trial and MLflow run every
    epoch, pruned and diverged members leaving the population alone. One heartbeat
    thread beats for all of them, so a dead worker's trials are failed and retried as in
    sequential mode.
    """
    from hposvc.population import group_configs, train_population

    task, dev = env.task, env.device
    jobs = [TrialJob(env, t) for t in trials]
    states: dict[int, str] = {}
    with queue.heartbeat(list(trials)):
        try:
            started: list[tuple[TrialJob, TrialConfig]] = []
            for job in jobs:
                try:
                    config = job.start(task)
                    job.probe_init(task)  # builds the trial's model (job.ctx.model)
                    started.append((job, config))
                except STOPS:
                    raise
                except Exception as e:  # noqa: BLE001
                    states[job.trial.number] = job.fail(e)
            models = [job.ctx.model for job, _ in started]
            groups: list[list[int]] = []
            for group in group_configs([c for _, c in started], task=task, models=models):
                alone = len(group) > 1 and _vmap_verdict(env, models[group[0]], started[group[0]][1]) is not None
                groups += [[i] for i in group] if alone else [group]
            for group in groups:
                members = [started[i] for i in group]
                try:
                    if len(members) == 1:
                        results = [train_trial(members[0][0].ctx)]
                    else:
                        log.info("study %s: trials %s train as one population", env.spec.name, [job.trial.number for job, _ in members])
                        results = train_population(
                            [c for _, c in members],
                            task,
                            device=dev,
                            on_epoch=lambda i, m, members=members: members[i][0].on_epoch(m),
                            keep_model=True,
                            models=[job.ctx.model for job, _ in members],
                        )
                except STOPS:
                    raise
                except Exception as e:  # noqa: BLE001 (the group fails, the worker goes on)
                    for job, _ in members:
                        states[job.trial.number] = job.fail(e)
                    continue
                for (job, _), result in zip(members, results):
                    try:
                        states[job.trial.number] = job.finish(Outcome.of_train(result))
                    except Exception as e:  # noqa: BLE001
                        states[job.trial.number] = job.fail(e)
        except STOPS as e:
            for job in jobs:
                if job.trial.number not in states:
                    job.fail(e)
            raise
    return [states.get(t.number, "FAIL") for t in trials]
