"""The launcher: one ``hposvc worker`` process per device slot, on this machine.

``hposvc study run SPEC --workers auto`` prepares the study (creating it and topping up
its trial queue), plans the slots (:func:`hposvc.devices.plan_slots`), and starts one
worker process per slot. It shows one progress bar read from the study database and
waits. Scaling out is the same worker command on other hosts.

Start-up is paid once: this process imports torch and what trials need (and loads the
task's data) once, then forks one worker per slot, which inherits all of it. Forking is
safe here because nothing has started a thread that matters or initialised CUDA yet:
CUDA is never touched in this process (GPUs are counted through NVML), and each child
sets its slot's ``CUDA_VISIBLE_DEVICES`` and thread counts before its first CUDA call, so
every CUDA worker creates its own clean context on its own GPU. Where that cannot be
guaranteed (CUDA already initialised here, Python threads running, a ``grpc://``
storage whose client runs threads, or no ``fork`` on the platform) each slot starts as a
fresh ``hposvc worker`` process instead, as a worker on another host does.

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
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hposvc import outbox, queue, records
from hposvc.errors import HposvcError, Interrupted, InvalidInputError
from hposvc.records import StudyRun
from hposvc.storage import resolve_data_dir, resolve_storage_url, resolve_tracking_uri
from hposvc.study import WarmStart, prepare_study
from hposvc.tracking import close_journals, ensure_tracking_process, open_tracker
from hposvc.worker import Progress

if TYPE_CHECKING:
    import optuna

    from hposvc.devices import Slot
    from hposvc.spec import StudySpec

__all__ = ["Plan", "plan_run", "run_planned", "run_slots", "worker_command"]

# How often the coordinator refreshes the progress bar from the database (seconds).
REFRESH_SECONDS = 1.0
# How often it looks whether its workers have exited (seconds).
EXIT_POLL_SECONDS = 0.02
# After forwarding a stop signal, how long workers get before they are killed (seconds).
STOP_GRACE_SECONDS = 60.0
# Whether slots may be forked from this process: set by the CLI in a fresh process. A
# process that has trained already (a test runner, a notebook) may hold thread pools a
# forked child would inherit half-alive, so there each slot starts as a fresh process.
FORK_SLOTS = False


def worker_command(study: str, *, storage: str, tracking_uri: str, data_dir: str | None, slot: "Slot", population: int | str | None = None) -> list[str]:
    """The command line that runs one slot's worker (what a user runs on another host)."""
    cmd = [sys.executable, "-m", "hposvc.cli", "worker", study, "--storage", storage, "--tracking-uri", tracking_uri,
           "--device", slot.device, "--worker-id", f"{os.uname().nodename}:slot{slot.index}", "--quiet"]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    if population is not None:
        cmd += ["--population", str(population)]
    return cmd


@dataclass(frozen=True)
class Plan:
    """How ``study run`` executes a study on this machine (:func:`plan_run`)."""

    slots: "tuple[Slot, ...]"  # worker processes; empty: trials run in this process
    device: str  # the device of trials run in this process
    population: int | str | None  # trials trained at once per process (None: one at a time)
    why: str  # what the choice was made from, for the plan line

    def describe(self) -> str:
        """The plan in one line, e.g. ``plan: 2 worker processes x 1 CPU thread (...)``."""
        pop = "" if self.population in (None, 1) else f", populations of {self.population}"
        if not self.slots:
            return f"plan: 1 process on {self.device}{pop} ({self.why})"
        s = self.slots[0]
        where = f"{s.threads} CPU thread{'s' if s.threads != 1 else ''}" if s.cuda_visible_devices is None else "1 GPU"
        n = len(self.slots)
        return f"plan: {n} worker process{'es' if n != 1 else ''} x {where} each{pop} ({self.why})"


def plan_run(
    spec: "StudySpec",
    *,
    n_left: int,
    workers: int | str | None = None,
    device: str = "auto",
    devices: str | None = "auto",
    trials_per_device: int = 1,
    cpu_count: int | None = None,
    cuda_count: int | None = None,
    fork: bool = True,
) -> Plan:
    """Choose how to run ``n_left`` more trials of ``spec`` here: the fastest plan by default.

    In order, the first rule that applies wins:

    1. ``workers`` given: 1 runs the trials in this process; N or ``"auto"`` runs that many
       worker processes (:func:`hposvc.devices.plan_slots`).
    2. A population (``--population K`` or the spec's): this process trains K at a time;
       ``--population 1`` is the plain plan.
    3. A device named (``--device cuda:1``), one GPU, fewer than two trials or usable
       cores, or a process worker slots cannot be forked from (``fork=False``: then each
       would pay the start-up again): this process.
    4. Several GPUs: one worker process per GPU.
    5. The CPU with C >= 2 usable cores: min(C, n_left) worker processes sharing the cores
       (one thread each on a machine of as many cores). Small models use a thread poorly
       — one epoch of the MLP on digits is a few milliseconds of many tiny operations —
       and trials are independent, so a core per trial beats all cores on one trial.

    >>> from hposvc.spec import parse_spec
    >>> spec = parse_spec({"study": {"name": "s", "task": "digits"}})
    >>> plan_run(spec, n_left=24, cpu_count=2, cuda_count=0).describe()
    'plan: 2 worker processes x 1 CPU thread each (2 usable CPU cores, 24 trials to run, no GPU; --workers 1 for one process)'
    >>> plan_run(spec, n_left=24, workers=1, cpu_count=2, cuda_count=0).describe()
    'plan: 1 process on auto (--workers 1)'
    """
    from hposvc.devices import cuda_device_count, plan_slots, usable_cpu_count

    if workers is not None and str(workers).strip() == "1":
        return Plan((), device, spec.population, "--workers 1")
    if workers is not None:
        slots = plan_slots(devices, trials_per_device=trials_per_device, workers=workers, cpu_count=cpu_count, cuda_count=cuda_count)
        return Plan(tuple(slots), device, spec.population, f"--workers {workers}")
    if spec.population is not None:
        return Plan((), device, spec.population, f"population {spec.population}; --population 1 for one trial at a time")
    cores = usable_cpu_count() if cpu_count is None else cpu_count
    gpus = (cuda_device_count() if cuda_count is None else cuda_count) if device in ("auto", "cuda") else 0
    if device not in ("auto", "cpu", "cuda"):
        return Plan((), device, None, f"--device {device}")
    if not fork:
        return Plan((), device, None, "worker processes would each start afresh here")
    if gpus >= 2 and n_left >= 2:
        slots = plan_slots("cuda", cpu_count=cores, cuda_count=gpus)[:n_left]
        return Plan(tuple(slots), device, None, f"{gpus} GPUs, {n_left} trials to run; --workers 1 for one process")
    if gpus == 1 or cores < 2 or n_left < 2:
        why = "1 GPU" if gpus == 1 else f"{cores} usable CPU core{'s' if cores != 1 else ''}, {n_left} trial{'s' if n_left != 1 else ''} to run"
        return Plan((), device, None, why)
    n = min(cores, n_left)
    slots = plan_slots("cpu", workers=n, cpu_count=cores, cuda_count=0)
    return Plan(tuple(slots), "cpu", None, f"{cores} usable CPU cores, {n_left} trials to run, no GPU; --workers 1 for one process")


def run_planned(
    spec: "StudySpec",
    *,
    workers: int | str | None = None,
    device: str = "auto",
    devices: str | None = "auto",
    trials_per_device: int = 1,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_dir: str | None = None,
    warm_start: WarmStart | None = None,
    drain: bool = False,
    progress: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
) -> StudyRun:
    """Create or resume the study, choose the plan (:func:`plan_run`) and run it.

    ``on_plan`` is told the plan before anything trains (the CLI prints its line).
    """
    from hposvc.plugins import check_runnable
    from hposvc.worker import run_worker

    url = resolve_storage_url(storage, data_dir=data_dir)
    uri = resolve_tracking_uri(tracking_uri, data_dir=data_dir)
    # 1) bad input fails before anything is written
    check_runnable(spec)
    options = {"workers": workers, "device": device, "devices": devices, "trials_per_device": trials_per_device, "fork": can_fork(url)}
    if drain and not plan_run(spec, n_left=spec.n_trials, **options).slots:
        raise InvalidInputError("the '--drain' option needs worker processes, and this machine's plan runs one. Add --workers N.")
    # 2) the tracking process: it imports MLflow and opens (or creates) its store on the
    #    core this process leaves free while it prepares the study
    ensure_tracking_process(outbox.folder_for(resolve_data_dir(data_dir), uri))
    # 3) the study, the plan, and the trials
    study = prepare_study(spec, storage=url, warm_start=warm_start, checked=True)
    n_trials = records.study_info(study).n_trials or spec.n_trials
    plan = plan_run(spec, n_left=max(0, n_trials - queue.counts(study).done), **options)
    if on_plan is not None:
        on_plan(plan)
    tracker = open_tracker(study, spec=spec.to_dict(), tracking_uri=uri, data_dir=data_dir, storage=url)
    if not plan.slots:
        return run_worker(study, spec=spec, storage=url, tracking_uri=uri, data_dir=data_dir, device=plan.device,
                          population=plan.population, progress=progress, tracker=tracker, plan=plan.describe())
    return run_slots(study, plan.slots, storage=url, tracking_uri=uri, data_dir=data_dir, population=plan.population, drain=drain, progress=progress, plan=plan.describe())


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
    plan: str | None = None,
) -> StudyRun:
    """Run one ``hposvc worker`` process per slot on an existing study and wait.

    ``plan``: the plan line, for the study's summary in MLflow (forked slots pass it on).

    What ``study run --workers`` does after preparing the study, and what ``hposvc worker
    NAME --workers auto`` does on a host that joins a study (one process per GPU there).
    """
    from hposvc.devices import slot_env

    n_trials = records.study_info(study).n_trials or 0
    before = queue.counts(study).done
    procs: list[Any] = []  # subprocess.Popen or _Forked: poll(), send_signal(), kill(), returncode
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop_signal:
            stop_signal.append(signum)
            forward = signal.SIGUSR1 if drain else signum
            for p in procs:
                if p.poll() is None:
                    p.send_signal(forward)

    fork = can_fork(storage)
    if fork:
        preload(study.study_name, storage=storage)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in slots:
            if stop_signal:
                break
            if fork:
                procs.append(_Forked.start(slot, lambda slot=slot: _slot_worker(study.study_name, slot, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, population=population, plan=plan)))
                continue
            cmd = worker_command(study.study_name, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, slot=slot, population=population)
            # Own session: a terminal's Ctrl-C reaches this process only, which forwards it
            # once, so a worker never sees the signal twice. Workers' stdout is not data.
            procs.append(subprocess.Popen(cmd, env={**os.environ, **slot_env(slot)}, start_new_session=True, stdout=subprocess.DEVNULL))
        with Progress(study, n_trials, enabled=progress) as bar:
            deadline = None
            refreshed = time.monotonic()
            while any(p.poll() is None for p in procs):
                time.sleep(EXIT_POLL_SECONDS)  # notice the last worker's exit at once
                if time.monotonic() - refreshed >= REFRESH_SECONDS:
                    refreshed = time.monotonic()
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
    n_done = queue.counts(study).done
    if failed and n_done < n_trials:
        raise HposvcError(f"{len(failed)} worker(s) exited with codes {failed}; the study has {n_done} of {n_trials} trials. Re-run to resume.")
    return StudyRun.of(study, storage=storage, tracking_uri=tracking_uri, n_trials=n_trials, n_done=n_done, ran=n_done - before)


# -- slots forked from this process ------------------------------------------------------


def can_fork(storage: str) -> bool:
    """Whether slots may be forked from this process (see the module docstring)."""
    if not FORK_SLOTS or not hasattr(os, "fork") or os.environ.get("HPOSVC_SLOT_START", "fork") != "fork":
        return False
    if storage.startswith("grpc://") or threading.active_count() > 1:
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def preload(study_name: str, *, storage: str) -> None:
    """Import what every trial needs, and load the study's task, once, before forking.

    ``torch._dynamo`` is what the first optimizer step would import (a second or more);
    the task's tensors stay in the loader's cache, shared with the children copy-on-write.
    """
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    import hposvc.space  # noqa: F401
    import hposvc.train  # noqa: F401
    import hposvc.trial  # noqa: F401
    from hposvc.tasks import load_task
    from hposvc.worker import load_spec_of

    try:
        _, spec = load_spec_of(study_name, storage=storage)
        if spec.task and spec.trainer is None and spec.command is None:
            load_task(spec.task, seed=spec.seed, options=spec.task_options)
    except Exception:  # noqa: BLE001 (the worker meets the same error and reports it)
        pass


class _Forked:
    """A slot's worker, forked from this process; quacks like the Popen it replaces."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, slot: "Slot", run: Callable[[], int]) -> "_Forked":
        from hposvc.devices import slot_env

        pid = os.fork()
        if pid:
            return cls(pid)
        # The child: never returns into the parent's frames.
        code = 1
        try:
            os.setsid()  # like the Popen path: only the coordinator forwards a Ctrl-C
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)  # a worker's stdout is not data
            os.environ.update(slot_env(slot))  # before the child's first CUDA call
            code = run()
            close_journals()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
        raise AssertionError("unreachable")

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _slot_worker(study_name: str, slot: "Slot", *, storage: str, tracking_uri: str, data_dir: str | None, population: int | str | None, plan: str | None = None) -> int:
    """In a forked slot: what ``hposvc worker NAME --device D --quiet`` does; its exit code."""
    from hposvc.devices import apply_slot_threads
    from hposvc.worker import run_worker

    apply_slot_threads()  # (storages the parent opened were forgotten at the fork: hposvc.storage)
    try:
        run_worker(study_name, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, device=slot.device,
                   worker_id=f"{os.uname().nodename}:slot{slot.index}", population=population, plan=plan)
        return 0
    except Interrupted as e:
        print(f"Interrupted: {e}.", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except InvalidInputError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    except HposvcError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1

