"""MLflow tracking: what a training process writes, and hposvc's thin MLflow front end.

Training processes never import MLflow. A :class:`Tracker` appends each write of a study
and its trials (run start, params, per-epoch metrics, tags, text artifacts, the run's end)
as a record to the local outbox (:mod:`hposvc.outbox`), which costs a ``json.dumps`` and a
``write()``. The tracking process (:mod:`hposvc.drain`; one per data directory and tracking
URI, shared by the host's workers, started here when none runs) sends the records to MLflow
in batches, beside training. An MLflow outage only makes that process wait and retry.

Layout in MLflow: one experiment per study (``hposvc/<study>``), one parent run for the study
(tag ``hposvc.role=study``, found by the study's uid) and one nested run per trial (tag
``hposvc.role=trial``, found by uid and trial number) with the TrialConfig as params and as
``config.json``, per-epoch metrics with steps, and a status that tells the truth:
COMPLETE → FINISHED, PRUNED → KILLED, FAIL → FAILED.

The functions at the bottom (``mlflow_client``, ``ensure_experiment``, ``find_study_run``,
``find_trial_run``) are the MLflow front end the tracking process, reports and
recommendations share; they import MLflow when called.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hposvc import outbox, records
from hposvc.errors import TrackingError
from hposvc.storage import artifact_location, resolve_data_dir

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from hposvc.config import TrialConfig

__all__ = [
    "RUN_STATUS",
    "Tracker",
    "TrialRun",
    "ensure_experiment",
    "ensure_tracking_process",
    "experiment_artifact_location",
    "experiment_name",
    "find_study_run",
    "find_trial_run",
    "mlflow_client",
    "open_tracker",
]

log = logging.getLogger(__name__)

RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# How long `study run` / a worker waits at its end for the tracking process to have sent
# everything it wrote (seconds). The drain runs beside training, so this is the tail of the
# last trial's records; it is cut short when MLflow is unreachable (the records stay in
# the outbox and are sent when it is back).
WAIT_SECONDS = float(os.environ.get("HPOSVC_TRACKING_WAIT", "60"))
# How often that wait looks at the tracking process's cursors (seconds).
WAIT_POLL_SECONDS = 0.02
# "auto": a training process starts the tracking process when none runs; "external": one is
# run separately (`hposvc sync --serve`, e.g. as a sidecar container) and never started here.
PROCESS_MODE = os.environ.get("HPOSVC_TRACKING_PROCESS", "auto")

# One journal per process and outbox folder, shared by every Tracker of the process.
_JOURNALS: dict[Path, outbox.Journal] = {}
# Tracking processes this process started (reaped when they exit; never waited for).
_SPAWNED: list[subprocess.Popen[bytes]] = []


def _forget_journals() -> None:
    _JOURNALS.clear()  # a forked child writes its own journal, never its parent's
    _SPAWNED.clear()


def close_journals() -> None:
    """Close this process's journals (at exit; a forked worker slot calls it before
    ``os._exit``, which skips exit handlers)."""
    for journal in list(_JOURNALS.values()):
        try:
            journal.close()  # "eof": the tracking process may drop it once sent
        except OSError:
            pass


os.register_at_fork(after_in_child=_forget_journals)
atexit.register(close_journals)


def journal_for(folder: outbox.OutboxFolder) -> outbox.Journal:
    """This process's journal in ``folder`` (created on first use)."""
    journal = _JOURNALS.get(folder.path)
    if journal is None or journal.closed:
        journal = _JOURNALS[folder.path] = outbox.Journal(folder.create())
    return journal


def experiment_name(study_name: str) -> str:
    """The MLflow experiment of study ``study_name``."""
    return f"hposvc/{study_name}"


class Tracker:
    """Writes one study's tracking records to the outbox.

    >>> tracker = Tracker("sqlite:///hposvc-data/mlflow.db", study="digits-quick", uid="4f…")  # doctest: +SKIP
    >>> run = tracker.start_trial(0, config, tags={"hposvc.device": "cpu"})                     # doctest: +SKIP
    >>> run.log_epoch({"val_loss": 0.4}, step=1); run.end("COMPLETE")                           # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        study: str,
        uid: str = "",
        data_dir: str | os.PathLike[str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = tracking_uri
        self.study = study
        self.uid = uid
        self.data_dir = resolve_data_dir(data_dir)
        self.folder = outbox.folder_for(self.data_dir, tracking_uri)
        self.study_tags = {**dict(tags or {}), **({"hposvc.study_uid": uid} if uid else {})}

    @property
    def journal(self) -> outbox.Journal:
        return journal_for(self.folder)

    def _write(self, kind: str, *, sync: bool = False, **fields: Any) -> None:
        self.journal.write({"k": kind, "study": self.study, "uid": self.uid, **fields}, sync=sync)

    def start_study(self, *, spec: Mapping[str, Any], storage: str | None = None, metric: str | None = None, direction: str | None = None) -> None:
        """Open the study's experiment (described: ``metric``, ``direction``) and parent run
        (with ``spec.json``), and make sure a tracking process sends this outbox.
        ``storage``: where that process reads the study (best values, summary and plots)."""
        self._write("study", spec=dict(spec), tags=self.study_tags, storage=storage, metric=metric, direction=direction)
        ensure_tracking_process(self.folder)

    def _base_tags(self, trial_number: int) -> dict[str, str]:
        """The tags every trial run carries (the study uid among them: replays and queries
        find the run by it)."""
        return {
            "hposvc.role": "trial",
            "hposvc.study": self.study,
            "hposvc.trial_number": str(trial_number),
            **{k: v for k, v in self.study_tags.items() if k.startswith("hposvc.")},
        }

    def start_trial(self, trial_number: int, config: "TrialConfig", *, tags: Mapping[str, str] | None = None) -> "TrialRun":
        """The run of trial ``trial_number``, with the config as params and ``config.json``."""
        self._write(
            "start",
            trial=trial_number,
            ts=_now_ms(),
            tags={**self._base_tags(trial_number), "hposvc.state": "RUNNING", "hposvc.host": socket.gethostname(), **dict(tags or {})},
            params=config.flat_params(),
        )
        run = TrialRun(self, trial_number)
        run.add_text("config.json", config.to_json())
        return run

    def close_stale_trial(self, trial: "optuna.trial.FrozenTrial") -> None:
        """A trial whose worker died ends FAILED in MLflow too (its run is created FAILED
        when it never reached MLflow), so no run stays RUNNING."""
        start = trial.datetime_start.timestamp() * 1000 if trial.datetime_start else _now_ms()
        self._write(
            "end",
            sync=True,
            trial=trial.number,
            status="FAILED",
            ts=_now_ms(),
            start=int(start),
            base=self._base_tags(trial.number),
            tags={"hposvc.state": "FAIL", "hposvc.reason": "worker died: no heartbeat within the grace period; the trial is retried"},
            m=[],
        )

    def finish_study(self, storage: str, *, plots: bool = True, plan: str | None = None) -> None:
        """The study has all its trials: the tracking process ends its parent run with the
        study's summary (:func:`hposvc.dashboard.summarise_study`, read from ``storage``;
        ``plan``: the plan line that ran it)."""
        self._write("done", storage=storage, plots=plots, plan=plan, sync=True)

    def wait(self, timeout: float = WAIT_SECONDS, *, upto: int | None = None) -> bool:
        """Wait until MLflow holds what this process wrote (up to byte ``upto`` of its
        journal: default all); False when it does not within ``timeout`` or MLflow is
        unreachable (the records then wait in the outbox and are sent later)."""
        journal = _JOURNALS.get(self.folder.path)
        if journal is None:
            return True
        return wait_sent(self.folder, journal, timeout=timeout, upto=upto)


class TrialRun:
    """The MLflow run of one trial, as records in the outbox (no MLflow call here)."""

    def __init__(self, tracker: Tracker, trial_number: int) -> None:
        self.tracker = tracker
        self.trial_number = trial_number

    def log_epoch(self, metrics: Mapping[str, float | None], *, step: int) -> None:
        now = _now_ms()
        rows = [[k, float(v), now, step] for k, v in metrics.items() if v is not None]
        if rows:
            self.tracker._write("metrics", trial=self.trial_number, m=rows)

    def add_text(self, path: str, text: str) -> None:
        """Attach ``text`` as the artifact ``path``."""
        self.tracker._write("text", trial=self.trial_number, path=path, text=text)

    def end(self, state: str, *, reason: str | None = None, metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Close the run with the trial's final ``state`` (an Optuna state name). The
        journal is fsynced here: a finished trial's records survive a machine crash."""
        now = _now_ms()
        self.tracker._write(
            "end",
            sync=True,
            trial=self.trial_number,
            status=RUN_STATUS.get(state, "FAILED"),
            ts=now,
            tags={**(tags or {}), "hposvc.state": state, **({"hposvc.reason": reason[:4000]} if reason else {})},
            m=[[k, float(v), now, 0] for k, v in (metrics or {}).items() if v is not None],
        )


def open_tracker(
    study: "optuna.Study",
    *,
    spec: Mapping[str, Any],
    tracking_uri: str,
    data_dir: str | os.PathLike[str] | None = None,
    storage: str | None = None,
) -> Tracker:
    """The study's tracker; its parent run is opened by the tracking process (started
    here if none runs for this data directory and tracking URI)."""
    info = records.study_info(study)
    tracker = Tracker(
        tracking_uri,
        study=info.name,
        uid=info.uid,
        data_dir=data_dir,
        tags={"hposvc.spec_hash": info.spec_hash or "", "hposvc.task": info.task or ""},
    )
    tracker.start_study(spec=spec, storage=storage, metric=info.metric, direction=study.direction.name.lower())
    return tracker


# -- the tracking process: started here, waited for here --------------------------------


def tracking_process_pid(folder: outbox.OutboxFolder) -> int | None:
    """The pid of the tracking process of ``folder`` when one runs (it holds the lock)."""
    try:
        fd = os.open(folder.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return int(folder.pid_file.read_text().strip() or 0) or -1
        except (FileNotFoundError, ValueError):
            return -1  # running, pid file not written yet
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return None


def ensure_tracking_process(folder: outbox.OutboxFolder) -> int | None:
    """Start the tracking process of ``folder`` unless one runs; returns the running pid
    (None when one was started just now). Two starters at once start two, and the second
    finds the lock taken and exits."""
    folder.create()
    pid = tracking_process_pid(folder)
    if pid is not None or PROCESS_MODE == "external":
        return pid
    for p in list(_SPAWNED):
        if p.poll() is not None:
            _SPAWNED.remove(p)
    with open(folder.log_file, "ab") as logf:
        _SPAWNED.append(
            subprocess.Popen(
                [sys.executable, "-m", "hposvc.drain", str(folder.path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=logf,
                start_new_session=True,  # outlives this process and its terminal's Ctrl-C
                close_fds=True,
            )
        )
    return None


def poke(folder: outbox.OutboxFolder) -> bool:
    """Wake the tracking process of ``folder`` now (it polls anyway); False when none runs."""
    pid = tracking_process_pid(folder)
    if pid is None or pid <= 0:
        return pid == -1
    try:
        os.kill(pid, signal.SIGUSR1)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_sent(folder: outbox.OutboxFolder, journal: outbox.Journal, *, timeout: float = WAIT_SECONDS, upto: int | None = None) -> bool:
    """Wait until the tracking process has sent ``journal`` up to what was written so far.

    Returns False when that takes longer than ``timeout`` or MLflow is unreachable; the
    records stay in the outbox then and are sent later. A tracking process that is gone
    (killed) is started again.
    """
    target = journal.size if upto is None else upto
    deadline = time.monotonic() + timeout
    started_at = time.time()
    poked = poke(folder) or ensure_tracking_process(folder) is not None
    next_check = time.monotonic() + 1.0
    while True:
        state = folder.state()
        if state.offsets.get(journal.path.name, 0) >= target or not journal.path.exists():
            return True
        if not state.online and state.updated >= started_at:
            log.warning(
                "MLflow at %s is unreachable (%s): this run's tracking records wait in %s and the "
                "tracking process sends them when it is back (or run `hposvc sync`).",
                folder.uri, state.error, folder.path,
            )
            return False
        now = time.monotonic()
        if now >= deadline:
            log.warning(
                "MLflow at %s has not received all of this run's tracking records after %.0f s; "
                "the tracking process keeps sending them from %s (see %s).",
                folder.uri, timeout, folder.path, folder.log_file,
            )
            return False
        if now >= next_check:
            next_check = now + 1.0
            if tracking_process_pid(folder) is None:
                ensure_tracking_process(folder)  # it was killed: the next one resumes
            elif not poked:
                poked = poke(folder)
        time.sleep(WAIT_POLL_SECONDS)


# -- the MLflow front end ---------------------------------------------------------------


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def mlflow_client(uri: str) -> "MlflowClient":
    """An MlflowClient for ``uri``.

    An embedded SQLite store's folder is created first, and the client is made under a
    lock beside the file: MLflow creates and migrates the store's tables when it opens it,
    and two processes doing that at once (the tracking process and ``hposvc report`` on a
    new data directory) both fail on each other's half-made schema.
    """
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return MlflowClient(uri)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{db}.init-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return MlflowClient(uri)
    finally:
        os.close(fd)  # (closing releases the lock)


def experiment_artifact_location(uri: str, data_dir: str | os.PathLike[str] | None = None) -> str | None:
    """Where an experiment hposvc creates keeps its artifacts.

    A tracking server decides itself (None). Otherwise ``<data dir>/mlruns``; when no data
    directory is given and the store is an SQLite file, the data directory is the folder
    that file is in, so ``--tracking-uri sqlite:///D/mlflow.db`` keeps its artifacts in
    ``D/mlruns`` instead of scattering them under the current directory.
    """
    if _is_http(uri):
        return None
    if data_dir is None and uri.startswith("sqlite:///"):
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
        if database and database != ":memory:":
            return artifact_location(Path(database).parent)
    return artifact_location(data_dir)


def ensure_experiment(
    client: "MlflowClient", name: str, *, uri: str, data_dir: str | os.PathLike[str] | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """The id of experiment ``name``, created (with hposvc's artifact location) if missing.

    A deleted experiment of that name is an error that says how to restore or purge it;
    another process creating it at the same moment is not.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"the MLflow experiment {name!r} is deleted. Restore it (`mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}`) or delete it permanently (`mlflow gc`) and run again."
        )
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=experiment_artifact_location(uri, data_dir), tags=dict(tags or {}))
    except Exception:  # noqa: BLE001 (another process created it first)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_study_run(client: "MlflowClient", study: str, *, uid: str) -> "Any | None":
    """The parent run of study ``study`` with study uid ``uid`` (None if there is none).

    Always by uid: a re-created study of the same name must never land on the parent run
    of the deleted one. If two tracking processes raced to create it, the first one is the run.
    """
    exp = client.get_experiment_by_name(experiment_name(study))
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`hposvc.role` = 'study'{_uid_filter(uid)}",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def find_trial_run(client: "MlflowClient", experiment_id: str, *, uid: str, trial_number: int) -> str | None:
    """The run id of trial ``trial_number`` of the study with uid ``uid`` (None if none)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`hposvc.role` = 'trial' and tags.`hposvc.trial_number` = '{trial_number}'{_uid_filter(uid)}",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0].info.run_id if runs else None


def _uid_filter(uid: str) -> str:
    return f" and tags.`hposvc.study_uid` = '{uid}'" if uid else ""


def _now_ms() -> int:
    return int(time.time() * 1000)
