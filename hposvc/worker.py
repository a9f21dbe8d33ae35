"""The worker loop: claim trials of a study and run them until it has ``n_trials``.

What ``hposvc worker NAME`` runs on every device slot and host, and what ``run_study``
runs in-process. The loop claims one trial (or a population of K) at a time from the
queue, runs it (:mod:`hposvc.trial`), fails and re-queues the trials of dead workers
while it waits, and stops on SIGINT/SIGTERM (failing the trial in flight) or, with
SIGUSR1, after the trial in flight (drain). Progress goes to stderr.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from hposvc import interrupts, queue, records
from hposvc.config import check_population
from hposvc.errors import InvalidInputError, TrainingError
from hposvc.records import StudyRun
from hposvc.storage import load_study, resolve_data_dir, resolve_storage_url, resolve_tracking_uri
from hposvc.tracking import Tracker, open_tracker

if TYPE_CHECKING:
    import optuna

    from hposvc.spec import StudySpec
    from hposvc.tasks import Task

__all__ = ["Progress", "load_spec_of", "population_size", "run_worker"]

# A worker stops (error) after this many failed trials in a row, or n_trials if more: a
# cause that fails every trial would otherwise run trials forever.
MIN_FAILURES_TO_STOP = 3
# How often an idle worker looks for re-queued trials while others still run (seconds):
# first after FIRST_POLL_SECONDS, doubling up to POLL_SECONDS, so that it notices soon
# that the study's last trial, run by another worker, ended.
POLL_SECONDS = 0.2
FIRST_POLL_SECONDS = 0.02
# How long a worker stopping on a signal or an error waits for MLflow to hold what it
# wrote (seconds); what is not there by then is sent by the tracking process anyway.
STOP_WAIT_SECONDS = 5.0
# Population size "auto" on the CPU: enough members to amortise per-step Python work on a
# small machine without making one epoch of the population very long.
CPU_AUTO_POPULATION = 8
# Population size "auto" on a GPU: a rough budget of device memory per member for
# hposvc's small models, and a cap.
GPU_BYTES_PER_MEMBER = 256 * 2**20
GPU_MAX_POPULATION = 64


def load_spec_of(name: str, *, storage: str, worker_id: str = "") -> "tuple[optuna.Study, StudySpec]":
    """Load study ``name`` with the spec stored on it, its sampler and its pruner.

    Each worker seeds its sampler differently (from ``worker_id``), or parallel workers
    would propose the same configurations.
    """
    from hposvc.space import build_pruner, build_sampler
    from hposvc.spec import parse_spec

    stored = records.study_info(load_study(name, storage=storage)).spec
    if stored is None:
        raise InvalidInputError(f"study {name!r} was not created by hposvc (it has no stored spec); run it with Optuna directly.")
    spec = parse_spec(stored, source=f"study {name!r}")
    seed = (spec.seed + zlib.crc32(worker_id.encode())) % 2**31
    return load_study(name, storage=storage, sampler=build_sampler(spec, seed=seed), pruner=build_pruner(spec)), spec


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
    tracker: Tracker | None = None,
    plan: str | None = None,
) -> StudyRun:
    """Run trials of an existing study until it has its ``n_trials`` finished trials.

    ``study`` is a loaded study (then ``spec`` is required) or a study name (its stored
    spec, sampler and pruner are used). ``max_trials`` and ``timeout`` bound this worker
    alone. ``population`` (default: the spec's) claims up to that many trials at a time
    and trains those that share a structure as one vectorised model (``"auto"``:
    :func:`population_size`). ``tracker``: the study's tracker when the caller has one;
    ``plan``: the plan line that runs the study (for its summary in MLflow).

    >>> import hposvc
    >>> hposvc.run_worker("digits-quick", max_trials=4)  # doctest: +SKIP
    """
    from hposvc.devices import resolve_device
    from hposvc.plugins import load_spec_task
    from hposvc.trial import CompletedTrials, TrialEnv, run_population, run_trial

    url = resolve_storage_url(storage, data_dir=data_dir)
    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    if isinstance(study, str):
        study, stored_spec = load_spec_of(study, storage=url, worker_id=worker_id)
        spec = spec or stored_spec
    elif spec is None:
        raise InvalidInputError("run_worker needs the spec with a study object; pass the study's name to load both.")
    if population is not None and (spec.trainer is not None or spec.command is not None):
        raise InvalidInputError(
            "the 'population' parameter must be absent for a study with its own trainer or command "
            "(a population trains inside hposvc's own loop). Drop --population; run more workers instead (--workers auto)."
        )
    info = records.study_info(study)
    n_trials = info.n_trials or spec.n_trials
    tracker = tracker or open_tracker(study, spec=spec.to_dict(), tracking_uri=uri, data_dir=data_dir, storage=url)
    task = load_spec_task(spec)  # [task] options, and the [space.params] its factory takes
    k = population_size(population if population is not None else spec.population, device=device, task=task)
    trials_dir = resolve_data_dir(data_dir) / "trials" / (info.uid or study.study_name)

    started = time.monotonic()
    ran = 0
    failed_in_a_row = 0
    watch = queue.StaleWatch()
    idle = FIRST_POLL_SECONDS
    writes = queue.WriteBehind()
    env = TrialEnv(
        study, spec, task, tracker, resolve_device(device),
        worker_id=worker_id, trials_dir=trials_dir, writes=writes, snapshot=CompletedTrials(study),
    )
    drain = threading.Event()
    with interrupts.signals_raise(drain), Progress(study, n_trials, enabled=progress) as bar, _draining(tracker, writes):
        while (max_trials is None or ran < max_trials) and not drain.is_set():
            if timeout is not None and time.monotonic() - started >= timeout:
                break
            c = queue.counts(study)
            if c.done >= n_trials or queue.grid_exhausted(study):
                break  # also when --n-trials was lowered on resume: extra queued trials stay
            interrupts.check()
            want = k if max_trials is None else min(k, max_trials - ran)
            queue.top_up(study, n_trials, lookahead=max(queue.LOOKAHEAD, want), c=c)
            claimed: list[optuna.Trial] = []
            try:
                while len(claimed) < want and (trial := queue.claim(study, n_trials)) is not None:
                    claimed.append(trial)
            except BaseException:
                # Interrupted while claiming: claimed trials have no heartbeat thread yet
                # and would wait out the grace period; fail them so a re-run replaces them.
                for t in claimed:
                    queue.tell_fail(study, t, "interrupted before training started")
                raise
            if not claimed:
                watch.fail_stale(study, on_stale=tracker.close_stale_trial)
                c = queue.counts(study)
                if c["WAITING"] == 0 and c.done + c["RUNNING"] < n_trials:
                    continue  # room for more: the next turn tops the queue up
                if c["WAITING"] == 0 and (c["RUNNING"] == 0 or c.done >= n_trials):
                    break
                # Another worker's last trials are running: look again soon (the study ends
                # when they do, and this worker's exit is on the study's clock), then less often.
                time.sleep(idle)
                idle = min(2 * idle, POLL_SECONDS)
                continue
            idle = FIRST_POLL_SECONDS
            states = [run_trial(env, claimed[0])] if len(claimed) == 1 else run_population(env, claimed)
            ran += len(claimed)
            bar.update()
            # Failed trials are not retried, so a cause that fails every trial (a pattern
            # that never matches, a limit too short) would ask for trials forever.
            failed_in_a_row = failed_in_a_row + len(states) if all(s == "FAIL" for s in states) else 0
            if failed_in_a_row >= max(n_trials, MIN_FAILURES_TO_STOP):
                raise TrainingError(_failing_study(study, claimed[-1], failed_in_a_row))
    # MLflow holds this worker's trials when it returns (bounded: tracking.WAIT_SECONDS, cut
    # short when MLflow is unreachable); the study's summary and plots follow a moment later.
    sent_upto = tracker.journal.size
    c = queue.counts(study)
    if c.done >= n_trials and c["RUNNING"] == 0:
        tracker.finish_study(url, plan=plan)
    tracker.wait(upto=sent_upto)
    return StudyRun.of(study, storage=url, tracking_uri=uri, n_trials=n_trials, n_done=c.done, ran=ran)


def _failing_study(study: "optuna.Study", last: "optuna.Trial", n: int) -> str:
    reason = queue.storage_of(study).get_trial(queue.trial_id(last)).user_attrs.get(records.REASON, "?")
    return (
        f"study {study.study_name!r}: the last {n} trials this worker ran all failed, so it stopped; the last one's reason: "
        f"{reason} Fix the cause and run the study again: it goes on where it stopped."
    )


def population_size(value: int | str | None, *, device: str = "auto", task: "Task | None" = None) -> int:
    """How many trials a worker claims at once: 1 (sequential), K, or ``"auto"``.

    ``auto`` on the CPU is :data:`CPU_AUTO_POPULATION`; on a GPU it grows with free memory
    (:data:`GPU_BYTES_PER_MEMBER` per member, at most :data:`GPU_MAX_POPULATION`).
    """
    from hposvc.devices import resolve_device

    if value is None:
        return 1
    if value == "auto":
        dev = resolve_device(device)
        if dev.type != "cuda":
            return CPU_AUTO_POPULATION
        import torch

        free, _ = torch.cuda.mem_get_info(dev)
        return max(1, min(GPU_MAX_POPULATION, int(free // GPU_BYTES_PER_MEMBER)))
    return check_population(value)


@contextmanager
def _draining(tracker: Tracker, writes: "queue.WriteBehind") -> Iterator[None]:
    """However the loop ends, queued storage writes are sent before we return. Tracking
    records are in the outbox already and the tracking process sends them; a worker that
    stops on a signal or an error gives it :data:`STOP_WAIT_SECONDS` to, so the runs of
    interrupted trials show FAILED at once."""
    try:
        yield
    except BaseException:
        writes.close()
        tracker.wait(timeout=STOP_WAIT_SECONDS)
        raise
    else:
        writes.close()


class Progress:
    """A rich progress bar on stderr: trials done of n_trials, best value, elapsed."""

    def __init__(self, study: "optuna.Study", n_trials: int, *, enabled: bool) -> None:
        self.study, self.n_trials, self.enabled = study, n_trials, enabled
        self._progress: Any = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._progress = RichProgress(
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
        best = records.best_trial(self.study)
        self._progress.update(self._task, completed=queue.counts(self.study).done, best="-" if best is None else f"{best.value:.4g}")

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
