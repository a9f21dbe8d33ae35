"""The launcher: one ``hposvc worker`` process per device slot, on this machine.

``hposvc study run SPEC --workers auto`` prepares the study (creating it and topping up
its trial queue), plans the slots (:func:`hposvc.devices.plan_slots`), and starts one
worker process per slot with the slot's environment (``CUDA_VISIBLE_DEVICES`` and thread
counts are set before the worker imports torch). It shows one progress bar read from the
study database and waits. Scaling out is the same worker command on other hosts.

Stopping: SIGINT/SIGTERM are forwarded to every worker, which fails its trial in flight
(closing its MLflow run) and exits; with ``drain`` the workers instead finish the trial
they are running and then stop (SIGUSR1). The coordinator exits 130/143 either way, and
running the same command again resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from hposvc import records
from hposvc.errors import HposvcError, Interrupted
from hposvc.records import StudyRun
from hposvc.storage import resolve_storage_url, resolve_tracking_uri
from hposvc.study import WarmStart, prepare_study
from hposvc.tracking import open_tracker
from hposvc.worker import Progress

if TYPE_CHECKING:
    import optuna

    from hposvc.devices import Slot
    from hposvc.spec import StudySpec

__all__ = ["run_parallel", "run_slots", "worker_command"]

# How often the coordinator refreshes the progress bar from the database (seconds).
REFRESH_SECONDS = 1.0
# After forwarding a stop signal, how long workers get before they are killed (seconds).
STOP_GRACE_SECONDS = 60.0


def worker_command(study: str, *, storage: str, tracking_uri: str, data_dir: str | None, slot: "Slot", population: int | str | None = None) -> list[str]:
    """The command line that runs one slot's worker (what a user runs on another host)."""
    cmd = [sys.executable, "-m", "hposvc.cli", "worker", study, "--storage", storage, "--tracking-uri", tracking_uri,
           "--device", slot.device, "--worker-id", f"{os.uname().nodename}:slot{slot.index}", "--quiet"]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    if population is not None:
        cmd += ["--population", str(population)]
    return cmd


def run_parallel(
    spec: "StudySpec",
    *,
    workers: int | str | None = "auto",
    devices: str | None = "auto",
    trials_per_device: int = 1,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    warm_start: WarmStart | None = None,
    drain: bool = False,
    progress: bool = False,
) -> StudyRun:
    """Create or resume the study, run one worker process per slot, wait for them."""
    from hposvc.devices import plan_slots

    url = resolve_storage_url(storage, data_dir=data_dir)
    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    slots = plan_slots(devices, trials_per_device=trials_per_device, workers=workers)
    study = prepare_study(spec, storage=url, warm_start=warm_start)
    # Start the tracking process now: it opens the experiment and parent run while the
    # workers start.
    open_tracker(study, spec=spec.to_dict(), tracking_uri=uri, data_dir=data_dir, storage=url)
    return run_slots(study, slots, storage=url, tracking_uri=uri, data_dir=data_dir, population=spec.population, drain=drain, progress=progress)


def run_slots(
    study: "optuna.Study",
    slots: "Sequence[Slot]",
    *,
    storage: str,
    tracking_uri: str,
    data_dir: str | None = None,
    population: int | str | None = None,
    drain: bool = False,
    progress: bool = False,
) -> StudyRun:
    """Run one ``hposvc worker`` process per slot on an existing study and wait.

    What ``study run --workers`` does after preparing the study, and what ``hposvc worker
    NAME --workers auto`` does on a host that joins a study (one process per GPU there).
    """
    from hposvc.devices import slot_env

    n_trials = records.study_info(study).n_trials or 0
    before = records.counts(study).done
    procs: list[subprocess.Popen[bytes]] = []
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop_signal:
            stop_signal.append(signum)
            forward = signal.SIGUSR1 if drain else signum
            for p in procs:
                if p.poll() is None:
                    p.send_signal(forward)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in slots:
            if stop_signal:
                break
            cmd = worker_command(study.study_name, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, slot=slot, population=population)
            # Own session: a terminal's Ctrl-C reaches this process only, which forwards it
            # once, so a worker never sees the signal twice. Workers' stdout is not data.
            procs.append(subprocess.Popen(cmd, env={**os.environ, **slot_env(slot)}, start_new_session=True, stdout=subprocess.DEVNULL))
        with Progress(study, n_trials, enabled=progress) as bar:
            deadline = None
            while any(p.poll() is None for p in procs):
                time.sleep(REFRESH_SECONDS)
                bar.update()
                if stop_signal and deadline is None and not drain:
                    deadline = time.monotonic() + STOP_GRACE_SECONDS  # draining waits for the trials
                if deadline is not None and time.monotonic() > deadline:
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
            bar.update()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop_signal:
        raise Interrupted(stop_signal[0])
    failed = [p.returncode for p in procs if p.returncode != 0]
    n_done = records.counts(study).done
    if failed and n_done < n_trials:
        raise HposvcError(f"{len(failed)} worker(s) exited with codes {failed}; the study has {n_done} of {n_trials} trials. Re-run to resume.")
    return StudyRun.of(study, storage=storage, tracking_uri=tracking_uri, n_trials=n_trials, ran=n_done - before)
