"""Running a study: spec → Optuna study in SQL storage → trials → MLflow.

The trial queue is how hposvc keeps ``n_trials`` exact with any number of workers: the
process that creates (or resumes) a study tops its queue up to ``n_trials`` WAITING trials
(counting COMPLETE, PRUNED, RUNNING and WAITING ones), and workers only ever claim WAITING
trials (Optuna's atomic RUNNING transition), so two workers can never both start the
"last" trial. Trials of dead workers are failed by heartbeat and re-queued with the same
parameters by the storage (see :mod:`hposvc.storage`), which keeps the count exact too.

Each trial: the sampler fills a :class:`~hposvc.config.TrialConfig` from the spec's space,
:func:`hposvc.train.train` trains it, each epoch's metric is reported to the trial (so
pruners work) and buffered for MLflow, and the trial ends COMPLETE (final metric), PRUNED
(pruner, or diverged — the reason is stored as ``hposvc.reason``) or FAIL (an error).
"""

from __future__ import annotations

import logging
import os
import signal
import zlib
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from hposvc.errors import HposvcError, InvalidInputError
from hposvc.storage import open_storage, resolve_storage_url, resolve_tracking_uri, with_retries

from hposvc.config import TrialConfig

if TYPE_CHECKING:
    import optuna
    from hposvc.spec import StudySpec
    from hposvc.tasks import Task

__all__ = ["Interrupted", "StudyRun", "load_study", "prepare_study", "run_study", "run_worker"]

log = logging.getLogger(__name__)

# States that count toward n_trials: a pruned trial reached a decision as much as a
# completed one; failed trials are retried instead.
DONE_STATES = ("COMPLETE", "PRUNED")
# How often an idle worker looks for re-queued trials while others still run (seconds).
POLL_SECONDS = 1.0


class Interrupted(HposvcError):
    """SIGINT/SIGTERM arrived; ``exit_code`` is 130 or 143."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@dataclass(frozen=True)
class StudyRun:
    """What a finished ``run_study`` call did."""

    study_name: str
    storage: str  # the study database URL
    tracking_uri: str
    n_trials: int  # the study's target of finished trials
    n_done: int  # COMPLETE + PRUNED trials now in the study
    ran: int  # trials this call ran
    best_value: float | None
    best_trial: int | None

    @classmethod
    def of(cls, study: "optuna.Study", *, storage: str, tracking_uri: str, n_trials: int, ran: int) -> "StudyRun":
        """Summarise ``study`` as it is now in storage."""
        from hposvc.results import best_trial

        best = best_trial(study)
        return cls(
            study_name=study.study_name,
            storage=storage,
            tracking_uri=tracking_uri,
            n_trials=n_trials,
            n_done=sum(_counts(study).get(s, 0) for s in DONE_STATES),
            ran=ran,
            best_value=None if best is None else best.value,
            best_trial=None if best is None else best.number,
        )


# -- study creation ------------------------------------------------------------------


def prepare_study(
    spec: "StudySpec",
    *,
    storage: str,
    warm_start: bool = False,
    enqueue: "Sequence[TrialConfig]" = (),
) -> "optuna.Study":
    """Create the study or load it for resuming, and top its trial queue up.

    ``enqueue`` puts known configurations first in the queue (each must lie in the spec's
    space; one already in the study is not queued twice); they count toward ``n_trials``.

    A study of the same name made from a different spec is refused (its spec hash is stored
    on the study), since mixing trials of two searches would make its results meaningless.
    """
    import optuna

    from hposvc.space import build_pruner, build_sampler, check_grid_budget

    check_grid_budget(spec)  # before anything is written
    rdb = open_storage(storage)
    study = with_retries(
        lambda: optuna.create_study(
            storage=rdb,
            study_name=spec.name,
            direction=spec.direction,
            sampler=build_sampler(spec),
            pruner=build_pruner(spec),
            load_if_exists=True,
        ),
        what=f"creating study {spec.name!r}",
    )
    attrs = study.user_attrs
    stored_hash = attrs.get("hposvc.spec_hash")
    if stored_hash is None:
        if study.trials:
            raise InvalidInputError(
                f"study {spec.name!r} already exists in {storage} but was not created by hposvc. "
                "Choose another [study] name, or delete it with `optuna delete-study`."
            )
        import uuid

        for key, value in {
            "hposvc.spec": spec.to_dict(),
            "hposvc.spec_hash": spec.spec_hash,
            "hposvc.study_uid": uuid.uuid4().hex,
            "hposvc.task": spec.task_key,
            "hposvc.metric": spec.metric,
        }.items():
            study.set_user_attr(key, value)
    elif stored_hash != spec.spec_hash:
        raise InvalidInputError(
            f"study {spec.name!r} in {storage} was created from a different spec "
            f"(stored hash {stored_hash[:12]}, this spec {spec.spec_hash[:12]}). "
            f"Give this spec a new [study] name (API: run_study(..., name='new-name'); CLI: --name NEW), "
            f"or delete the old study first (`hposvc study delete {spec.name}`)."
        )
    if attrs.get("hposvc.n_trials") != spec.n_trials:
        study.set_user_attr("hposvc.n_trials", spec.n_trials)
    if warm_start:
        _enqueue_warm_start(study, spec, storage=storage)
    if enqueue:
        from hposvc.space import params_for_config

        for config in enqueue:
            study.enqueue_trial(params_for_config(config, spec), skip_if_exists=True)
    _top_up_queue(study, spec.n_trials)
    return study


def load_study(name: str, *, storage: str | None = None, sampler: Any = None, pruner: Any = None) -> "optuna.Study":
    """Load an existing hposvc study by name; a missing one is an error listing the others."""
    import optuna

    url = resolve_storage_url(storage)
    rdb = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=rdb, sampler=sampler, pruner=pruner)
    except KeyError as e:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False))
        raise InvalidInputError(
            f"the 'study' parameter must name a study in {url}. Got {name!r} instead. "
            f"Studies there: {', '.join(names) or '(none)'}."
        ) from e


def _counts(study: "optuna.Study") -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _top_up_queue(study: "optuna.Study", n_trials: int) -> int:
    from optuna.trial import TrialState, create_trial

    c = _counts(study)
    deficit = n_trials - sum(c.get(s, 0) for s in (*DONE_STATES, "RUNNING", "WAITING"))
    if deficit > 0:
        # Plain WAITING trials without fixed params: the sampler fills them when claimed.
        study.add_trials([create_trial(state=TrialState.WAITING) for _ in range(deficit)])
    return max(deficit, 0)


def _enqueue_warm_start(study: "optuna.Study", spec: "StudySpec", *, storage: str) -> int:
    """Queue the current recommended configurations (inside the spec's space) first."""
    from hposvc.recommendation import warm_start_configs
    from hposvc.space import config_in_space, params_for_config

    if any(t.state.name != "WAITING" for t in study.get_trials(deepcopy=False)) or study.user_attrs.get("hposvc.warm_started"):
        return 0  # only a fresh study is warm-started
    configs = [c for c in warm_start_configs(spec, storage=storage) if config_in_space(c, spec)]
    for config in configs[: spec.n_trials]:
        study.enqueue_trial(params_for_config(config, spec), user_attrs={"hposvc.warm_start": True})
    study.set_user_attr("hposvc.warm_started", True)
    return len(configs)


# -- running -------------------------------------------------------------------------


def run_study(
    spec: "StudySpec | str | os.PathLike[str] | Mapping[str, Any]",
    *,
    n_trials: int | None = None,
    name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    warm_start: bool = False,
    population: int | str | None = None,
    progress: bool = False,
) -> StudyRun:
    """Run (or resume) the study a spec describes, in this process.

    ``spec`` is a path to a TOML spec, a parsed :class:`~hposvc.spec.StudySpec`, or a dict
    in the spec's shape. Re-running after an interruption runs only the missing trials.

    >>> import hposvc
    >>> result = hposvc.run_study("studies/quickstart.toml", n_trials=4)  # doctest: +SKIP
    >>> result.best_value                                                  # doctest: +SKIP
    0.97
    """
    from hposvc.spec import StudySpec, load_spec, parse_spec

    if isinstance(spec, StudySpec):
        parsed = spec
    elif isinstance(spec, Mapping):
        parsed = parse_spec(spec)
    else:
        parsed = load_spec(spec)
    parsed = parsed.with_overrides(n_trials=n_trials, name=name)  # None leaves a setting as is
    url = resolve_storage_url(storage, data_dir=data_dir)
    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    study = prepare_study(parsed, storage=url, warm_start=warm_start)
    return run_worker(study, spec=parsed, storage=url, tracking_uri=uri, data_dir=data_dir, device=device, population=population, progress=progress)


def run_worker(
    study: "optuna.Study | str",
    *,
    spec: "StudySpec | None" = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    max_trials: int | None = None,
    timeout: float | None = None,
    worker_id: str | None = None,
    population: int | str | None = None,
    progress: bool = False,
) -> StudyRun:
    """Run trials of an existing study until it has its ``n_trials`` finished trials.

    This is what ``hposvc worker NAME`` runs on every device slot and host; ``max_trials``
    and ``timeout`` bound this worker alone. ``population`` (default: the spec's
    ``population``) claims up to that many trials at a time and trains those that share a
    structure as one vectorised model (``"auto"``: :func:`population_size`).
    """
    from hposvc.spec import parse_spec
    from hposvc.tasks import load_task

    url = resolve_storage_url(storage, data_dir=data_dir)
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    if isinstance(study, str):
        from hposvc.space import build_pruner, build_sampler

        found = load_study(study, storage=url)
        stored = found.user_attrs.get("hposvc.spec")
        if stored is None:
            raise InvalidInputError(f"study {study!r} was not created by hposvc (it has no stored spec); run it with Optuna directly.")
        spec = spec or parse_spec(stored, source=f"study {study!r}")
        # The spec's sampler and pruner, not Optuna's defaults; each worker seeds its sampler
        # differently, or parallel workers would propose the same configurations.
        seed = (spec.seed + zlib.crc32(worker_id.encode())) % 2**31
        study = load_study(study, storage=url, sampler=build_sampler(spec, seed=seed), pruner=build_pruner(spec))
    elif spec is None:
        raise InvalidInputError("run_worker needs the spec with a study object; pass the study's name to load both.")
    n_trials = int(study.user_attrs.get("hposvc.n_trials", spec.n_trials))
    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    tracker = open_tracker(study, spec, tracking_uri=uri, data_dir=data_dir)
    task = load_task(spec.task, seed=spec.seed, options=spec.task_options)
    k = population_size(population if population is not None else spec.population, device=device, task=task)

    started = time.monotonic()
    ran = 0
    bar = _Progress(study, n_trials, enabled=progress)
    drain = threading.Event()
    with _signals_raise(drain), bar, _draining(tracker):
        while (max_trials is None or ran < max_trials) and not drain.is_set():
            if timeout is not None and time.monotonic() - started >= timeout:
                break
            c = _counts(study)
            if sum(c.get(s, 0) for s in DONE_STATES) >= n_trials or _grid_exhausted(study):
                break  # also when --n-trials was lowered on resume: extra queued trials stay
            if _pending_interrupt:
                raise _pending_interrupt[0]
            want = k if max_trials is None else min(k, max_trials - ran)
            claimed: list[optuna.Trial] = []
            try:
                while len(claimed) < want and (trial := _claim_trial(study)) is not None:
                    claimed.append(trial)
            except BaseException:
                # Interrupted while claiming: claimed trials have no heartbeat yet and would
                # stay RUNNING forever; fail them so a re-run queues replacements.
                for t in claimed:
                    _tell_fail(study, t, "interrupted before training started")
                raise
            if not claimed:
                _fail_stale(study)
                c = _counts(study)
                if c.get("WAITING", 0) == 0 and (c.get("RUNNING", 0) == 0 or sum(c.get(s, 0) for s in DONE_STATES) >= n_trials):
                    break
                time.sleep(POLL_SECONDS)
                continue
            if len(claimed) == 1:
                run_trial(study, claimed[0], spec=spec, task=task, tracker=tracker, device=device, worker_id=worker_id)
            else:
                run_population(study, claimed, spec=spec, task=task, tracker=tracker, device=device, worker_id=worker_id)
            ran += len(claimed)
            bar.update()
            if tracker.online and tracker.outbox.is_dir() and any(tracker.outbox.iterdir()):
                tracker._submit(tracker.sync)  # noqa: SLF001 (on the writer thread, in order)
    c = _counts(study)
    n_done = sum(c.get(s, 0) for s in DONE_STATES)
    if n_done >= n_trials and c.get("RUNNING", 0) == 0:
        tracker.sync()
        tracker.finish_study(study)
    return StudyRun.of(study, storage=url, tracking_uri=uri, n_trials=n_trials, ran=ran)


# Population size "auto" on the CPU: enough members to amortise per-step Python work on a
# small machine without making one epoch of the population very long.
CPU_AUTO_POPULATION = 8


def population_size(value: int | str | None, *, device: str = "auto", task: "Task | None" = None) -> int:
    """How many trials a worker claims at once: 1 (sequential), K, or ``"auto"``.

    ``auto`` on the CPU is :data:`CPU_AUTO_POPULATION`; on a GPU it grows with free memory
    (a rough 256 MiB per member for hposvc's small models, capped at 64).
    """
    from hposvc.devices import resolve_device
    from hposvc.errors import invalid

    if value is None:
        return 1
    if value == "auto":
        dev = resolve_device(device)
        if dev.type != "cuda":
            return CPU_AUTO_POPULATION
        import torch

        free, _ = torch.cuda.mem_get_info(dev)
        return max(1, min(64, int(free // (256 * 2**20))))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid("population", value, "a positive integer or 'auto'")
    return value


def _claim_trial(study: "optuna.Study") -> "optuna.Trial | None":
    """Atomically move one WAITING trial to RUNNING and return it, or None.

    ``Study.ask`` would create a new trial when the queue is empty, which lets parallel
    workers overshoot ``n_trials``; this is its queue half alone. The first heartbeat is
    recorded at once: Optuna never counts a trial without one as stale, so a worker dying
    right after the claim would otherwise leave it RUNNING forever.
    """
    import optuna

    trial_id = with_retries(study._pop_waiting_trial_id, what="claiming a trial")  # noqa: SLF001
    if trial_id is None:
        return None
    with_retries(lambda: study._storage.record_heartbeat(trial_id), what="recording a heartbeat")  # noqa: SLF001
    return optuna.Trial(study, trial_id)


def _grid_exhausted(study: "optuna.Study") -> bool:
    import optuna

    return isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study)


def open_tracker(study: "optuna.Study", spec: "StudySpec", *, tracking_uri: str, data_dir: str | os.PathLike[str] | None = None) -> Any:
    """The study's MLflow tracker, with its experiment and parent run created once.

    The parent run id is stored on the study, so every worker on every host logs its
    trials under the same parent instead of racing to create one each.
    """
    from hposvc.tracking import Tracker

    attrs = study.user_attrs
    tracker = Tracker(
        tracking_uri,
        study=study.study_name,
        uid=attrs.get("hposvc.study_uid", ""),
        parent_run_id=attrs.get("hposvc.mlflow_parent_run_id"),
        data_dir=data_dir,
        tags={"hposvc.spec_hash": spec.spec_hash, "hposvc.task": spec.task_key},
    )
    parent = tracker.start_study(spec=spec.to_dict())
    if parent and attrs.get("hposvc.mlflow_parent_run_id") != parent:
        study.set_user_attr("hposvc.mlflow_parent_run_id", parent)
    return tracker


def requeue(study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> bool:
    """Queue a failed trial again with the same parameters, at most MAX_RETRY times.

    Like Optuna's retry callbacks, but the copy carries no user attributes: they describe
    the failed attempt (its MLflow run, device, reason), not the new one.
    """
    from optuna.trial import TrialState, create_trial

    from hposvc.storage import MAX_RETRY

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        log.warning("trial %s failed %d times; not retrying it again", trial.number, len(history))
        return False
    system_attrs = {k: v for k, v in trial.system_attrs.items() if k not in ("failed_trial", "retry_history")}
    system_attrs.update({"failed_trial": history[0], "retry_history": history})
    with_retries(
        lambda: study.add_trial(create_trial(state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, system_attrs=system_attrs)),
        what="re-queueing a failed trial",
    )
    return True


def _fail_stale(study: "optuna.Study") -> None:
    import warnings

    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" since Optuna 2.9; it is the API
        with_retries(lambda: fail_stale_trials(study), what="failing stale trials")


@contextmanager
def _draining(tracker: Any) -> Iterator[None]:
    """However the loop ends, queued MLflow writes are sent (or kept) before we return."""
    try:
        yield
    finally:
        tracker.drain()


@contextmanager
def _heartbeat(study: "optuna.Study", trials: "Sequence[optuna.Trial]") -> Iterator[None]:
    """Record the trials' heartbeats from a thread while they train.

    Ask/tell has no heartbeat of its own (only ``Study.optimize`` starts one), so hposvc
    beats for every trial it claimed, sequential or population.
    """
    from hposvc.storage import HEARTBEAT_INTERVAL

    storage = study._storage  # noqa: SLF001 (the public heartbeat API lives on the storage)
    ids = [t._trial_id for t in trials]  # noqa: SLF001
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL):
            for trial_id in ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 (a missed beat is retried next interval)
                    log.warning("heartbeat for trial %s failed: %s", trial_id, e)

    for trial_id in ids:
        with_retries(lambda: storage.record_heartbeat(trial_id), what="recording a heartbeat")
    thread = threading.Thread(target=beat, name="hposvc-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _TrialJob:
    """One claimed trial from config to its end in Optuna and MLflow.

    :func:`run_trial` drives one job through :func:`hposvc.train.train`; the population
    executor drives several through :func:`hposvc.population.train_population`.
    """

    def __init__(self, study: "optuna.Study", trial: "optuna.Trial", *, spec: "StudySpec", tracker: Any, device: Any, worker_id: str) -> None:
        self.study, self.trial, self.spec, self.tracker = study, trial, spec, tracker
        self.device, self.worker_id = device, worker_id
        self.run: Any = None
        self.ended = False
        self.prunes = spec.pruner != "none"  # no pruner: skip the per-epoch storage read

    def start(self, task: "Task") -> "TrialConfig":
        """Sample the config, open the MLflow run and record where the trial runs."""
        from hposvc.space import suggest_config

        trial, dev = self.trial, self.device
        config = suggest_config(trial, self.spec, task_defaults={"depth": task.default_depth, "width": task.default_width})
        trial_id = trial._trial_id  # noqa: SLF001

        def remember_run(run_id: str) -> None:
            # From the MLflow writer thread: lets whoever finds this trial stale close its run.
            trial.storage.set_trial_user_attr(trial_id, "hposvc.mlflow_run_id", run_id)

        self.run = self.tracker.start_trial(trial.number, config, tags={"hposvc.device": str(dev), "hposvc.worker": self.worker_id}, on_created=remember_run)
        attrs = {
            "hposvc.config": config.to_dict(),
            "hposvc.device": str(dev),
            "hposvc.host": socket.gethostname(),
            "hposvc.worker": self.worker_id,
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
        if _pending_interrupt:  # a signal some library caught and wrapped: stop here
            raise _pending_interrupt[0]
        return self.prunes and with_retries(self.trial.should_prune, what="asking the pruner")

    def finish(self, result: Any) -> str:
        """Tell Optuna and MLflow how training ended: COMPLETE, or PRUNED with the reason."""
        import optuna

        from hposvc.probes import ACTIVATION_STD_ATTR, UNIT_SYMMETRY_ATTR, unit_symmetry

        # Probes the guide's claims are judged on: activation std per layer at init, and
        # whether training broke the symmetry between hidden units.
        probes = {ACTIVATION_STD_ATTR: self.init_std}
        if result.model is not None:
            probes[UNIT_SYMMETRY_ATTR] = _finite_or_none(unit_symmetry(result.model))
        for key, value in probes.items():
            with_retries(lambda: self.trial.set_user_attr(key, value), what="storing probes")
        if result.status == "completed":
            state, reason = "COMPLETE", None
            with_retries(lambda: self.study.tell(self.trial, result.final[self.spec.metric], skip_if_finished=True), what="storing the trial's result")
        else:
            state = "PRUNED"
            reason = result.reason or f"pruned by {type(self.study.pruner).__name__}"
            with_retries(lambda: self.trial.set_user_attr("hposvc.reason", reason), what="storing the prune reason")
            with_retries(lambda: self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True), what="storing the trial's result")
        self.run.end(state, reason=reason, metrics={f"final_{k}": v for k, v in result.final.items()})
        self.ended = True
        return state

    def fail(self, e: BaseException) -> str:
        """The trial ends FAIL with the reason (interruptions, OOM and errors).

        An error that hides an interruption (a signal a library caught and wrapped) fails
        the trial as interrupted and raises the interruption, so the worker stops. A job
        that has ended already is left as it is.
        """
        import optuna

        from hposvc.devices import free_device_memory, is_out_of_memory

        if self.ended:
            return "FAIL"
        if (stop := _interruption(e)) is not None and stop is not e:
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
        if isinstance(e, (KeyboardInterrupt, Interrupted)):
            reason = "interrupted: " + (str(e) or "SIGINT")
        elif is_out_of_memory(e):
            free_device_memory(self.device)  # the worker goes on with the next trial
            reason = f"out of memory on {self.device}: {e}"
        else:
            reason = f"{type(e).__name__}: {e}"
            log.error("trial %s failed: %s", self.trial.number, reason)
        _tell_fail(self.study, self.trial, reason)
        if self.run is not None:
            self.run.end("FAIL", reason=reason)
        frozen = self.trial.storage.get_trial(self.trial._trial_id)  # noqa: SLF001
        if frozen.state.name == "FAIL" and not isinstance(e, (KeyboardInterrupt, Interrupted)):
            # an interrupted study is re-queued by the next run's top-up instead
            requeue(self.study, frozen)
        return "FAIL"


def _probe_init(config: TrialConfig, task: "Task") -> list[float | None]:
    """Each hidden layer's activation std at init, on the model ``train`` starts from."""
    from hposvc.nn import build_model
    from hposvc.probes import PROBE_SAMPLES, activation_std_per_layer
    from hposvc.train import seed_everything

    seed_everything(config.seed)  # train() seeds the same way, so these are its weights
    model = build_model(task, config)
    return [_finite_or_none(v) for v in activation_std_per_layer(model, task.x_val[:PROBE_SAMPLES])]


def _finite_or_none(value: float) -> float | None:
    # Optuna stores user attributes as JSON, which has no NaN or infinity.
    import math

    return value if math.isfinite(value) else None


def run_trial(
    study: "optuna.Study",
    trial: "optuna.Trial",
    *,
    spec: "StudySpec",
    task: "Task",
    tracker: Any,
    device: str = "auto",
    worker_id: str = "",
) -> str:
    """Train one claimed trial and tell Optuna and MLflow how it ended; returns the state."""
    from hposvc.devices import resolve_device
    from hposvc.train import train

    job = _TrialJob(study, trial, spec=spec, tracker=tracker, device=resolve_device(device), worker_id=worker_id)
    # The heartbeat starts before anything else touches the trial: a trial without one
    # could never be recognised as stale if this worker died right now.
    with _heartbeat(study, [trial]):
        try:
            config = job.start(task)
            return job.finish(train(config, task, device=job.device, on_epoch=job.on_epoch, keep_model=True))
        except (KeyboardInterrupt, Interrupted) as e:
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
    tracker: Any,
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
    jobs = [_TrialJob(study, t, spec=spec, tracker=tracker, device=dev, worker_id=worker_id) for t in trials]
    states: dict[int, str] = {}
    with _heartbeat(study, list(trials)):
        try:
            started: list[tuple[_TrialJob, TrialConfig]] = []
            for job in jobs:
                try:
                    started.append((job, job.start(task)))
                except (KeyboardInterrupt, Interrupted):
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
                except (KeyboardInterrupt, Interrupted):
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
        except (KeyboardInterrupt, Interrupted) as e:
            for job in jobs:
                if job.trial.number not in states:
                    job.fail(e)
            raise
    return [states.get(t.number, "FAIL") for t in trials]


def _tell_fail(study: "optuna.Study", trial: "optuna.Trial", reason: str) -> None:
    import optuna

    try:
        with_retries(lambda: trial.set_user_attr("hposvc.reason", reason[:2000]), what="storing the failure reason")
        with_retries(lambda: study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True), what="failing the trial")
    except Exception as e:  # noqa: BLE001 (the trial may already be failed as stale)
        log.warning("could not mark trial %s failed: %s", trial.number, e)



# The interruption a signal raised in this process, kept because the exception itself can
# land inside a library that wraps it: SIGTERM arriving in the middle of a SQLAlchemy commit
# comes out of Optuna as a StorageInternalError, which alone would read as one trial's
# storage error and let the worker go on with the next trial.
_pending_interrupt: list[BaseException] = []


@contextmanager
def _signals_raise(drain: threading.Event) -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` and SIGINT into KeyboardInterrupt, both
    remembered (see :func:`_interruption`); SIGUSR1 asks the worker to finish its current
    trial and stop (``--drain``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        e: BaseException = KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)
        _pending_interrupt.append(e)
        raise e

    _pending_interrupt.clear()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGUSR1"):
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: drain.set())
    try:
        yield
    finally:
        _pending_interrupt.clear()  # handled by now; must not stop a later run
        for signum, old in previous.items():
            signal.signal(signum, old)


def _interruption(e: BaseException) -> BaseException | None:
    """The interruption behind ``e``, if a signal arrived or ``e`` wraps one."""
    if _pending_interrupt:
        return _pending_interrupt[0]
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (KeyboardInterrupt, Interrupted)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


class _Progress:
    """A rich progress bar on stderr: trials done of n_trials, best value, elapsed."""

    def __init__(self, study: "optuna.Study", n_trials: int, *, enabled: bool) -> None:
        self.study, self.n_trials, self.enabled = study, n_trials, enabled
        self._progress = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("best {task.fields[best]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.study.study_name, total=self.n_trials, best="-")
            self.update()
        return self

    def update(self) -> None:
        if self._progress is None:
            return
        from hposvc.results import best_trial

        c = _counts(self.study)
        best = best_trial(self.study)
        self._progress.update(
            self._task,
            completed=sum(c.get(s, 0) for s in DONE_STATES),
            best="-" if best is None else f"{best.value:.4g}",
        )

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
