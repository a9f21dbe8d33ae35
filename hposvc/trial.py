"""One claimed trial, from its config to its end in Optuna and MLflow.

A :class:`TrialJob` samples the trial's :class:`~hposvc.config.TrialConfig`, opens its
MLflow run, reports each epoch's metric to the trial (so pruners work) and to MLflow, and
ends it COMPLETE (final metric), PRUNED (pruner, or diverged — the reason is stored) or
FAIL (an error, an out-of-memory, an interruption). :func:`run_trial` drives one job
through :func:`hposvc.train.train`; :func:`run_population` drives several claimed trials
through :func:`hposvc.population.train_population` where they share a structure.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hposvc import interrupts, queue, records
from hposvc.config import TrialConfig
from hposvc.interrupts import STOPS
from hposvc.storage import with_retries

if TYPE_CHECKING:
    import optuna

    from hposvc.spec import StudySpec
    from hposvc.tasks import Task
    from hposvc.tracking import Tracker, TrialRun

__all__ = ["TrialJob", "run_population", "run_trial"]

log = logging.getLogger(__name__)


class TrialJob:
    """One claimed trial from config to its end in Optuna and MLflow."""

    def __init__(self, study: "optuna.Study", trial: "optuna.Trial", *, spec: "StudySpec", tracker: "Tracker", device: Any, worker_id: str) -> None:
        self.study, self.trial, self.spec, self.tracker = study, trial, spec, tracker
        self.device, self.worker_id = device, worker_id
        self.run: TrialRun | None = None
        self.ended = False
        self.prunes = spec.pruner != "none"  # no pruner: skip the per-epoch storage read

    def start(self, task: "Task") -> TrialConfig:
        """Sample the config, open the MLflow run and record where the trial runs."""
        from hposvc.space import suggest_config

        trial, dev = self.trial, self.device
        config = suggest_config(trial, self.spec, task_defaults={"depth": task.default_depth, "width": task.default_width})
        trial_id = queue.trial_id(trial)

        def remember_run(run_id: str) -> None:
            # From the MLflow writer thread: lets whoever finds this trial stale close its run.
            trial.storage.set_trial_user_attr(trial_id, records.RUN_ID, run_id)

        self.run = self.tracker.start_trial(trial.number, config, tags={"hposvc.device": str(dev), "hposvc.worker": self.worker_id}, on_created=remember_run)
        attrs = {
            records.CONFIG: config.to_dict(),
            records.DEVICE: str(dev),
            records.HOST: socket.gethostname(),
            records.WORKER: self.worker_id,
        }
        for key, value in attrs.items():
            with_retries(lambda: trial.set_user_attr(key, value), what="storing trial attributes")
        self.init_std = _probe_init(config, task)
        return config

    def on_epoch(self, m: Any) -> bool:
        """Report an epoch to the trial (pruners) and MLflow; True when it should stop."""
        value = getattr(m, self.spec.metric)
        with_retries(lambda: self.trial.report(value, m.epoch), what="reporting an epoch")
        self.run.log_epoch({"train_loss": m.train_loss, "val_loss": m.val_loss, "val_accuracy": m.val_accuracy, "lr": m.lr}, step=m.epoch)
        interrupts.check()  # a signal some library caught and wrapped: stop here
        return self.prunes and with_retries(self.trial.should_prune, what="asking the pruner")

    def finish(self, result: Any) -> str:
        """Tell Optuna and MLflow how training ended: COMPLETE, or PRUNED with the reason."""
        import optuna

        from hposvc.probes import unit_symmetry

        # Probes the guide's claims are judged on: activation std per layer at init, and
        # whether training broke the symmetry between hidden units.
        probes = {records.ACTIVATION_STD: self.init_std}
        if result.model is not None:
            probes[records.UNIT_SYMMETRY] = records.finite_or_none(unit_symmetry(result.model))
        for key, value in probes.items():
            with_retries(lambda: self.trial.set_user_attr(key, value), what="storing probes")
        if result.status == "completed":
            state, reason = "COMPLETE", None
            with_retries(lambda: self.study.tell(self.trial, result.final[self.spec.metric], skip_if_finished=True), what="storing the trial's result")
        else:
            state = "PRUNED"
            reason = result.reason or f"pruned by {type(self.study.pruner).__name__}"
            with_retries(lambda: self.trial.set_user_attr(records.REASON, reason), what="storing the prune reason")
            with_retries(lambda: self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True), what="storing the trial's result")
        self.run.end(state, reason=reason, metrics={f"final_{k}": v for k, v in result.final.items()})
        self.ended = True
        return state

    def fail(self, e: BaseException) -> str:
        """The trial ends FAIL with the reason (interruptions, OOM and errors).

        An error that hides an interruption (a signal a library caught and wrapped) fails
        the trial as interrupted and raises the interruption, so the worker stops. A job
        that has ended already is left as it is. A trial that failed on its own (not by
        an interruption) is re-queued; an interrupted study is topped up by its next run.
        """
        import optuna

        from hposvc.devices import free_device_memory, is_out_of_memory

        if self.ended:
            return "FAIL"
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
        queue.tell_fail(self.study, self.trial, reason)
        if self.run is not None:
            self.run.end("FAIL", reason=reason)
        frozen = self.trial.storage.get_trial(queue.trial_id(self.trial))
        if frozen.state.name == "FAIL" and not isinstance(e, STOPS):
            queue.requeue(self.study, frozen)
        return "FAIL"


def _probe_init(config: TrialConfig, task: "Task") -> list[float | None]:
    """Each hidden layer's activation std at init, on the model ``train`` starts from."""
    from hposvc.nn import build_model
    from hposvc.probes import PROBE_SAMPLES, activation_std_per_layer
    from hposvc.train import seed_everything

    seed_everything(config.seed)  # train() seeds the same way, so these are its weights
    model = build_model(task, config)
    return [records.finite_or_none(v) for v in activation_std_per_layer(model, task.x_val[:PROBE_SAMPLES])]


def run_trial(
    study: "optuna.Study",
    trial: "optuna.Trial",
    *,
    spec: "StudySpec",
    task: "Task",
    tracker: "Tracker",
    device: str = "auto",
    worker_id: str = "",
) -> str:
    """Train one claimed trial and tell Optuna and MLflow how it ended; returns the state."""
    from hposvc.devices import resolve_device
    from hposvc.train import train

    job = TrialJob(study, trial, spec=spec, tracker=tracker, device=resolve_device(device), worker_id=worker_id)
    # The heartbeat starts before anything else touches the trial: a trial without one
    # could never be recognised as stale if this worker died right now.
    with queue.heartbeat([trial]):
        try:
            config = job.start(task)
            return job.finish(train(config, task, device=job.device, on_epoch=job.on_epoch, keep_model=True))
        except STOPS as e:
            job.fail(e)
            raise
        except Exception as e:  # noqa: BLE001 (one trial's error must not stop the worker)
            return job.fail(e)


def run_population(
    study: "optuna.Study",
    trials: "Sequence[optuna.Trial]",
    *,
    spec: "StudySpec",
    task: "Task",
    tracker: "Tracker",
    device: str = "auto",
    worker_id: str = "",
) -> list[str]:
    """Train several claimed trials together where they share a structure.

    Trials are grouped by :func:`hposvc.population.population_key`; each group of two or
    more trains as one vectorised population, each member reporting to its own trial and
    MLflow run every epoch, pruned and diverged members leaving the population alone. A
    trial that fits no group trains the ordinary way. One heartbeat thread beats for all
    of them, so a dead worker's trials are failed and retried as in sequential mode.
    """
    from hposvc.devices import resolve_device
    from hposvc.population import group_configs, train_population
    from hposvc.train import train

    dev = resolve_device(device)
    jobs = [TrialJob(study, t, spec=spec, tracker=tracker, device=dev, worker_id=worker_id) for t in trials]
    states: dict[int, str] = {}
    with queue.heartbeat(list(trials)):
        try:
            started: list[tuple[TrialJob, TrialConfig]] = []
            for job in jobs:
                try:
                    started.append((job, job.start(task)))
                except STOPS:
                    raise
                except Exception as e:  # noqa: BLE001
                    states[job.trial.number] = job.fail(e)
            for group in group_configs([c for _, c in started]):
                members = [started[i] for i in group]
                try:
                    if len(members) == 1:
                        job, config = members[0]
                        results = [train(config, task, device=dev, on_epoch=job.on_epoch, keep_model=True)]
                    else:
                        results = train_population(
                            [c for _, c in members],
                            task,
                            device=dev,
                            on_epoch=lambda i, m, members=members: members[i][0].on_epoch(m),
                            keep_model=True,
                        )
                except STOPS:
                    raise
                except Exception as e:  # noqa: BLE001 (the group fails, the worker goes on)
                    for job, _ in members:
                        states[job.trial.number] = job.fail(e)
                    continue
                for (job, _), result in zip(members, results):
                    try:
                        states[job.trial.number] = job.finish(result)
                    except Exception as e:  # noqa: BLE001
                        states[job.trial.number] = job.fail(e)
        except STOPS as e:
            for job in jobs:
                if job.trial.number not in states:
                    job.fail(e)
            raise
    return [states.get(t.number, "FAIL") for t in trials]
