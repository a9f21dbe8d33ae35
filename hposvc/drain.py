"""The tracking process: sends the outbox to MLflow, beside training.

One runs per data directory and tracking URI (it holds ``tracking.lock`` in the outbox
folder; :func:`hposvc.tracking.ensure_tracking_process` starts it), shared by every worker
of the host that writes there. Each pass reads the records written since its cursors
(:mod:`hposvc.outbox`), groups them by run, and sends each run's new params, tags and
metrics in one ``log_batch`` (its text artifacts in one upload, its end in one call), then
saves its cursors. A pass that cannot reach MLflow changes nothing it has not sent and is
retried after a pause, so an outage is only a wait. ``hposvc sync`` is the same drain,
run once.

Where things happen (what the study looks like in MLflow is :mod:`hposvc.dashboard`'s):

- :meth:`Drain.open_study`: the experiment and the parent run exist; the experiment is
  set up to open on its training runs (:func:`hposvc.dashboard.setup_experiment`).
- :meth:`Drain.trials_finished`: trials' runs were closed in MLflow: the parent run's
  ``best_value`` at each of their numbers (the live optimisation history; every
  :data:`BEST_VALUE_SECONDS` at most, and at the study's end).
- :meth:`Drain.study_finished`: the study has all its trials: its summary and plots on
  the parent run (:func:`hposvc.dashboard.summarise_study`; plotly and matplotlib are
  imported here only, never in a training process).

Run as ``python -m hposvc.drain OUTBOX_FOLDER [--once]``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hposvc import dashboard, outbox, records
from hposvc.errors import TrackingError
from hposvc.tracking import ensure_experiment, experiment_name, find_study_run, find_trial_run, mlflow_client

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

__all__ = ["Drain", "drain_once", "main"]

log = logging.getLogger("hposvc.drain")

# How often the tracking process looks for new records while nobody wakes it (seconds):
# BUSY_POLL_SECONDS while records keep coming (it stays a few runs behind the workers at
# most, so a study's last runs are in MLflow a moment after its last trial), POLL_SECONDS
# once BUSY_SECONDS passed without any.
POLL_SECONDS = 0.5
BUSY_POLL_SECONDS = 0.1
BUSY_SECONDS = 2.0
# The parent run's best_value points are sent at most this often (seconds), and at a
# study's end: each send reads the study and is one log_batch, too much for every pass.
BEST_VALUE_SECONDS = 2.0
# After a pass could not reach MLflow: the first pause, doubled up to the last (seconds).
RETRY_SECONDS = (1.0, 30.0)
# With nothing left to send and nothing new for this long, the process exits (seconds); a
# study started later starts a new one. Long enough that back-to-back studies share one.
IDLE_SECONDS = float(os.environ.get("HPOSVC_TRACKING_IDLE", "300"))
# A study's "done" waits at most this long for its trials' last records (seconds): another
# worker may tell Optuna a trial's result a moment before it writes the run's end.
DONE_GRACE_SECONDS = 5.0
# MLflow's caps for one log_batch.
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100


class Refused(Exception):
    """MLflow answered that it will not take this data (retrying would not help)."""


def is_refusal(e: BaseException) -> bool:
    """Whether MLflow refused the data (a 4xx answer, or hposvc's own TrackingError for a
    deleted experiment) rather than being out of reach (connection errors, 5xx, a locked
    SQLite store), by the error's type and code, never its text."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, (TrackingError, Refused)):
        return True
    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return False


@dataclass
class RunBatch:
    """One trial run's records of this pass, merged in writing order."""

    study: str
    uid: str
    trial: int
    start: int | None = None  # start time (ms), from ``start`` or a stale ``end``
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[list[Any]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    status: str | None = None
    end: int | None = None
    raw: list[dict[str, Any]] = field(default_factory=list)  # kept aside if MLflow refuses them
    has_start: bool = False  # this pass holds the run's start record

    @property
    def key(self) -> str:
        return outbox.run_key(self.uid, self.study, self.trial)

    def add(self, rec: dict[str, Any]) -> None:
        self.raw.append(rec)
        kind = rec["k"]
        if kind == "start":
            self.has_start = True
            self.start = rec["ts"]
            self.tags.update(rec.get("tags", {}))
            self.params.update(rec.get("params", {}))
        elif kind == "metrics":
            self.metrics.extend(rec["m"])
        elif kind == "text":
            self.texts[rec["path"]] = rec["text"]
        elif kind == "end":
            if self.start is None and rec.get("start") is not None:
                self.start = rec["start"]
                self.tags = {**rec.get("base", {}), **self.tags}
            self.tags.update(rec.get("tags", {}))
            self.metrics.extend(rec.get("m", []))
            self.status, self.end = rec["status"], rec["ts"]


@dataclass
class StudyKey:
    study: str
    uid: str
    tags: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] | None = None
    storage: str | None = None


class Drain:
    """Sends the records of one outbox folder to its tracking URI."""

    def __init__(self, folder: outbox.OutboxFolder) -> None:
        self.folder = folder
        self.uri = folder.uri
        self.data_dir = folder.path.parent.parent
        self.state = folder.state()
        self.state.pid = os.getpid()
        self._client: MlflowClient | None = None
        self._experiments: dict[str, str] = {}
        self._parents: dict[str, str] = {}  # uid (or name) -> parent run id
        self._studies: dict[str, StudyKey] = {}
        self._opened: set[str] = set()  # studies whose parent run this process has opened
        self._writers: dict[str, tuple[str, int]] = {}  # journal name -> (host, pid)
        self._waiting_done: dict[str, tuple[float, dict[str, Any]]] = {}  # study key -> (since, record)
        self._open_runs: dict[str, str] = {}  # run key -> study key, runs started and not ended
        self._ended: set[str] = set()  # runs ended in this pass: forgotten with the cursors past their end
        self._artifact_uris: dict[str, str] = {}  # run id -> artifact URI, of the open runs this process created
        self._finished: dict[str, list[int]] = {}  # study key -> trials closed COMPLETE/PRUNED, best_value not sent yet
        self._best_sent_at = -math.inf
        self._optuna: dict[str, Any] = {}  # study key -> its Optuna study, read for best values and summaries

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    # -- one pass -----------------------------------------------------------------------

    def run_pass(self) -> int:
        """Send everything written so far; returns how many records were read.

        Raises the MLflow error when it cannot be reached; what was sent stays sent (its
        cursors are saved) and the rest is sent by a later pass.
        """
        new = list(outbox.iter_new(self.folder, self.state))
        order: list[str] = []  # run keys in first-seen order
        runs: dict[str, RunBatch] = {}
        studies: list[dict[str, Any]] = []
        ends: dict[str, int] = {}  # journal -> offset after its last record read
        done_at: dict[str, tuple[int, set[str]]] = {}  # journal -> (offset before its first "done", study keys)
        n = 0
        for path, recs, end in new:
            ends[path.name] = end
            before = self.state.offsets.get(path.name, 0)
            for pos, rec in recs:
                n += 1
                kind = rec.get("k")
                if kind == "journal":
                    self._writers[path.name] = (rec.get("host", ""), int(rec.get("pid", 0)))
                    if rec.get("v", 1) > outbox.FORMAT:
                        raise TrackingError(f"outbox journal {path.name} has format {rec['v']}; this hposvc reads {outbox.FORMAT}. Upgrade hposvc.")
                elif kind == "study":
                    studies.append(rec)
                elif kind in ("start", "metrics", "text", "end"):
                    key = outbox.run_key(rec["uid"], rec["study"], rec["trial"])
                    if key not in runs:
                        runs[key] = RunBatch(rec["study"], rec["uid"], rec["trial"])
                        order.append(key)
                    runs[key].add(rec)
                elif kind == "done":
                    key = rec.get("uid") or rec["study"]
                    first, keys = done_at.get(path.name, (before, set()))
                    done_at[path.name] = (first if keys else before, keys | {key})
                    if key not in self._waiting_done:
                        self._waiting_done[key] = (time.monotonic(), rec)
                elif kind == "garbled":
                    log.error("skipped a garbled line in %s: %s", path.name, rec["line"])
                before = pos
        # 1) studies (experiments, parent runs), 2) trial runs, 3) studies that finished.
        for rec in studies:
            self.open_study(rec)
        for key in order:
            self.send_run(runs[key])
        self._send_best_values(now=bool(self._waiting_done))
        if n == 0 and not self._waiting_done and self.state.online:
            if self._drop_finished_journals():  # (nothing new: no cursor moved)
                self._save(online=True)
            return 0
        # A journal's cursor stops before a "done" whose study is not finished in MLflow
        # yet: a tracking process killed while drawing the plots draws them again.
        for name, end in ends.items():
            self.state.offsets[name] = done_at[name][0] if name in done_at else end
        # An ended run is forgotten in the same save that moves the cursors past its end: a
        # resend (after a crash before this save) still finds it noted, so never creates it twice.
        for key in self._ended:
            self.state.runs.pop(key, None)
        self._ended.clear()
        self._save(online=True)
        self._finish_studies()
        moved = False
        for name, (_, keys) in done_at.items():
            if not keys & self._waiting_done.keys():
                self.state.offsets[name] = ends[name]
                moved = True
        if self._drop_finished_journals() or moved:
            self._save(online=True)
        return n

    def _send_best_values(self, *, now: bool = False) -> None:
        if self._finished and (now or time.monotonic() - self._best_sent_at >= BEST_VALUE_SECONDS):
            for key, numbers in self._finished.items():
                self.trials_finished(key, numbers)
            self._finished.clear()
            self._best_sent_at = time.monotonic()

    def _finish_studies(self, *, now: bool = False) -> None:
        for key, (since, rec) in list(self._waiting_done.items()):
            open_runs = [k for k, s in self._open_runs.items() if s == key]
            if open_runs and not now and time.monotonic() - since < DONE_GRACE_SECONDS:
                continue  # a trial's end is still on its way
            self.study_finished(rec)
            del self._waiting_done[key]

    def _save(self, *, online: bool, error: str = "") -> None:
        self.state.online, self.state.error, self.state.updated = online, error, time.time()
        self.state.save(self.folder.state_file)

    # -- studies ------------------------------------------------------------------------

    def experiment(self, study: str, tags: dict[str, str] | None = None) -> str:
        if study not in self._experiments:
            self._experiments[study] = ensure_experiment(self.client, experiment_name(study), uri=self.uri, data_dir=self.data_dir, tags=tags)
        return self._experiments[study]

    def parent(self, study: str, uid: str, tags: dict[str, str] | None = None) -> str:
        """The study's parent run: found by uid, else created."""
        key = uid or study
        if key not in self._parents:
            experiment_id = self.experiment(study, tags)
            run = find_study_run(self.client, study, uid=uid)
            if run is not None:
                self._parents[key] = run.info.run_id
                if run.info.status != "RUNNING":
                    self.client.update_run(run.info.run_id, status="RUNNING")
            else:
                all_tags = {"hposvc.role": "study", "hposvc.study": study, **(tags or {}), **({"hposvc.study_uid": uid} if uid else {})}
                self._parents[key] = self.client.create_run(experiment_id, tags=all_tags, run_name=study).info.run_id
        return self._parents[key]

    def open_study(self, rec: dict[str, Any]) -> None:
        key = rec.get("uid") or rec["study"]
        self._studies[key] = StudyKey(rec["study"], rec.get("uid", ""), rec.get("tags", {}), rec.get("spec"), rec.get("storage"))
        if key in self._opened:
            return
        try:
            run_id = self.parent(rec["study"], rec.get("uid", ""), rec.get("tags"))
            if rec.get("spec") is not None:
                self.client.log_dict(run_id, rec["spec"], "spec.json")
            experiment_id = self.experiment(rec["study"])
            dashboard.setup_experiment(self.client, experiment_id, study=rec["study"], metric=rec.get("metric"), direction=rec.get("direction"))
            self.state.experiments[experiment_name(rec["study"])] = [experiment_id, rec.get("direction") or ""]
        except Exception as e:  # noqa: BLE001
            if not is_refusal(e):
                raise
            self._refused([rec], e)
        self._opened.add(key)

    # -- trial runs ---------------------------------------------------------------------

    def send_run(self, r: RunBatch) -> None:
        """Send one run's new records: create (or find) the run, one log_batch, one upload
        of its texts, and its end. Every part may be sent twice without a duplicate."""
        from mlflow.entities import Metric, Param, RunTag

        try:
            exp_id = self.experiment(r.study)
            run_id = self.state.runs.get(r.key)
            if run_id is None and (not r.has_start or r.key in self.state.creating):
                # No start record here (a dead worker's trial closed by another, maybe on
                # another host), or a create this folder's last tracking process may have
                # sent before it died: the run may exist; find it by its tags.
                run_id = find_trial_run(self.client, exp_id, uid=r.uid, trial_number=r.trial)
            tags = dict(r.tags)
            if run_id is None:
                parent = self.parent(r.study, r.uid)
                self.state.creating.append(r.key)
                self.state.save(self.folder.state_file)  # written ahead: see just above
                run = self.client.create_run(exp_id, start_time=r.start or r.end, tags={**tags, "mlflow.parentRunId": parent}, run_name=f"trial-{r.trial}")
                run_id = run.info.run_id
                self._artifact_uris[run_id] = run.info.artifact_uri
                tags = {}  # sent with the run
            self.state.runs[r.key] = run_id
            if r.key in self.state.creating:
                self.state.creating.remove(r.key)
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in r.metrics]
            params = [Param(k, str(v)) for k, v in r.params.items()]
            tag_list = [RunTag(k, str(v)) for k, v in tags.items()]
            while metrics or params or tag_list:
                self.client.log_batch(run_id, metrics=metrics[:MAX_METRICS], params=params[:MAX_PARAMS], tags=tag_list[:MAX_TAGS])
                metrics, params, tag_list = metrics[MAX_METRICS:], params[MAX_PARAMS:], tag_list[MAX_TAGS:]
            if r.texts:
                _log_texts(self.client, run_id, r.texts, artifact_uri=self._artifact_uris.get(run_id), tracking_uri=self.uri)
            if r.status is not None:
                self.client.set_terminated(run_id, r.status, end_time=r.end)
        except Exception as e:  # noqa: BLE001
            if not is_refusal(e):
                raise
            self._refused(r.raw, e)
            return
        study_key = r.uid or r.study
        if r.status is None:
            self._open_runs[r.key] = study_key
        else:
            self._open_runs.pop(r.key, None)
            self._artifact_uris.pop(run_id, None)
            self._ended.add(r.key)
            if r.status in ("FINISHED", "KILLED"):  # COMPLETE or PRUNED
                self._finished.setdefault(study_key, []).append(r.trial)

    def trials_finished(self, study_key: str, numbers: list[int]) -> None:
        """Trials ``numbers`` of a study ended COMPLETE or PRUNED and their runs are closed
        in MLflow: the parent run's ``best_value`` at step = each trial's number, read from
        the study's storage (one read for all of them). Points missed here (a tracking
        process that did not see the study's start) are filled at the study's end."""
        from mlflow.entities import Metric

        known = self._studies.get(study_key)
        study = self._study(study_key)
        if known is None or study is None:
            return
        try:
            trials = study.get_trials(deepcopy=False)
        except Exception as e:  # noqa: BLE001 (the storage is the workers' business; the study's end fills the gap)
            log.warning("could not read study %s for its best values: %s", known.study, _short(e))
            return
        done = {t.number for t in trials if t.state.name in records.DONE_STATES}
        now = int(time.time() * 1000)
        points = [Metric("best_value", float(best), now, n) for n in sorted(set(numbers) & done)
                  if (best := dashboard.best_so_far(study, n, trials=trials)) is not None]
        if points:
            self.client.log_batch(self.parent(known.study, known.uid), metrics=points[:MAX_METRICS])

    def _study(self, study_key: str) -> "optuna.Study | None":
        known = self._studies.get(study_key)
        if study_key not in self._optuna and known is not None and known.storage:
            try:
                self._optuna[study_key] = _load_study(known.study, known.storage)
            except Exception as e:  # noqa: BLE001
                log.warning("could not open study %s in %s: %s", known.study, known.storage, _short(e))
                return None
        return self._optuna.get(study_key)

    # -- the study's end ----------------------------------------------------------------

    def study_finished(self, rec: dict[str, Any]) -> None:
        """The study has all its trials: end its parent run with the best value, counts,
        the best config and plots (read from the study's storage)."""
        study_name, uid, storage = rec["study"], rec.get("uid", ""), rec.get("storage")
        try:
            run_id = self.parent(study_name, uid)
            if storage:
                study = _load_study(study_name, storage)
                dashboard.summarise_study(self.client, run_id, study, plan=rec.get("plan"), plots=rec.get("plots", True))
            self.client.set_terminated(run_id, "FINISHED")
        except Exception as e:  # noqa: BLE001
            if not is_refusal(e):
                raise
            self._refused([rec], e)

    # -- bookkeeping --------------------------------------------------------------------

    def _refused(self, raw: list[dict[str, Any]], e: BaseException) -> None:
        self.folder.failed.mkdir(exist_ok=True)
        target = self.folder.failed / f"refused-{os.getpid()}.jsonl"
        with open(target, "a") as f:
            for rec in raw:
                f.write(json.dumps({**rec, "refused": _short(e)}) + "\n")
        log.error(
            "MLflow at %s refused %d tracking record(s) of study %r: %s. They are kept in %s; fix the "
            "cause (e.g. restore or permanently delete a deleted experiment) and run `hposvc sync`.",
            self.uri, len(raw), raw[0].get("study") if raw else "?", _short(e), target,
        )

    def _drop_finished_journals(self) -> bool:
        """Remove journals sent to their end whose writer closed them or is gone; True when
        one was (its cursor went with it: save the state)."""
        host = socket.gethostname()
        dropped = False
        for path in outbox.journals(self.folder.path):
            offset = self.state.offsets.get(path.name, 0)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            writer = self._writers.get(path.name) or _read_writer(path)
            if writer is None:
                continue
            self._writers[path.name] = writer
            closed = size == offset and _ends_with_eof(path)
            dead = writer[0] == host and not _alive(writer[1]) and size - offset < 4096 and _no_complete_line_after(path, offset)
            if closed or dead:
                if dead and size > offset:
                    log.warning("journal %s ends in half a record (its writer was killed mid-write); dropped", path.name)
                path.unlink(missing_ok=True)
                self.state.offsets.pop(path.name, None)
                self._writers.pop(path.name, None)
                dropped = True
        return dropped

    def pending(self) -> int:
        return self.folder.pending()


# -- the process --------------------------------------------------------------------------


def drain_once(folder: outbox.OutboxFolder) -> tuple[int, int]:
    """Send what the outbox folder holds, in this process: ``(records sent, bytes left)``.

    What ``hposvc sync`` does when no tracking process runs for the folder. Raises the
    MLflow error when it cannot be reached.
    """
    _mlflow_env(folder.uri)
    drain = Drain(folder)
    sent = 0
    while True:
        n = drain.run_pass()
        sent += n
        if n == 0:
            break
    drain._send_best_values(now=True)
    drain._finish_studies(now=True)
    drain._drop_finished_journals()
    drain._save(online=True)
    return sent, drain.pending()


def sync_folder(folder: outbox.OutboxFolder, *, timeout: float = 300.0) -> tuple[int, str]:
    """Send everything in ``folder`` now: ``(bytes left, the last error)``.

    When a tracking process serves the folder, it is woken and waited for; otherwise this
    process takes its lock and drains the folder itself, once (``hposvc sync``).
    """
    from hposvc.tracking import poke, tracking_process_pid

    if not folder.path.is_dir():
        return 0, ""
    deadline = time.monotonic() + timeout
    while True:
        if tracking_process_pid(folder) is not None:
            poke(folder)
            started = time.time()
            while time.monotonic() < deadline and tracking_process_pid(folder) is not None:
                state = folder.state()
                if folder.pending() == 0:
                    return 0, ""
                if not state.online and state.updated >= started:
                    return folder.pending(), state.error
                time.sleep(0.1)
            if time.monotonic() >= deadline:
                return folder.pending(), "timed out"
            continue  # it exited: drain here
        fd = os.open(folder.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # one started just now
        try:
            drain_once(folder)
            return folder.pending(), ""
        except Exception as e:  # noqa: BLE001 (MLflow unreachable: the records stay)
            return folder.pending(), _short(e)
        finally:
            os.close(fd)


def serve(folder: outbox.OutboxFolder, *, idle: float = IDLE_SECONDS) -> int:
    """The tracking process's loop: a pass every :data:`POLL_SECONDS` (:data:`BUSY_POLL_SECONDS`
    while records keep coming, or when a writer wakes it with SIGUSR1), a growing pause while MLflow is unreachable, exit when idle."""
    _mlflow_env(folder.uri)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    drain = Drain(folder)
    try:
        drain.client.search_experiments(max_results=1)  # open (an embedded store: create) the store before records come
    except Exception as e:  # noqa: BLE001 (the first pass retries and reports)
        log.info("MLflow at %s not ready yet: %s", folder.uri, _short(e))
    last_work = time.monotonic()
    pause = RETRY_SECONDS[0]
    while not stop:
        if not folder.path.is_dir():
            return 0  # the data directory was removed
        try:
            if drain.run_pass():
                last_work = time.monotonic()
            wait = BUSY_POLL_SECONDS if time.monotonic() - last_work < BUSY_SECONDS else POLL_SECONDS
            pause = RETRY_SECONDS[0]
        except Exception as e:  # noqa: BLE001 (whatever MLflow raises: retry later)
            log.warning("MLflow at %s unreachable (%s); retrying in %.0f s, records stay in %s", folder.uri, _short(e), pause, folder.path)
            drain._client = None  # a fresh client (and connection pool) for the next try
            try:
                drain._save(online=False, error=_short(e))
            except OSError:
                pass
            wait, pause = pause, min(pause * 2, RETRY_SECONDS[1])
            last_work = time.monotonic()
        if drain._waiting_done:
            wait = min(wait, 0.5)
        elif time.monotonic() - last_work > idle and drain.pending() == 0:
            return 0
        signal.sigtimedwait({signal.SIGUSR1}, wait)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hposvc.drain", description="hposvc's tracking process: send an outbox folder to MLflow.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--once", action="store_true", help="send what is there and exit")
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="exit after this many idle seconds (inf: run until stopped)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s")
    uri_file = args.folder / "uri"
    if not uri_file.is_file():
        print(f"{args.folder} is not an hposvc outbox folder (no 'uri' file)", file=sys.stderr)
        return 2
    folder = outbox.OutboxFolder(args.folder, uri_file.read_text())
    fd = os.open(folder.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another tracking process serves %s; exiting", folder.path)
        return 0
    outbox._atomic_write(folder.pid_file, str(os.getpid()))
    log.info("tracking process for %s started (outbox %s)", folder.uri, folder.path)
    try:
        if args.once:
            drain_once(folder)
            return 0
        return serve(folder, idle=args.idle)
    finally:
        log.info("tracking process for %s exits", folder.uri)
        try:
            folder.pid_file.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)


# -- helpers ------------------------------------------------------------------------------


def _mlflow_env(uri: str) -> None:
    # MLflow prints run URLs to stdout (and fetches the run to do it); not wanted here.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if uri.startswith(("http://", "https://")):
        # MLflow's default HTTP retry policy waits minutes; the drain retries itself.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def _log_texts(client: "MlflowClient", run_id: str, texts: dict[str, str], *, artifact_uri: str | None = None, tracking_uri: str | None = None) -> None:
    """All of a run's text artifacts in one upload; to ``artifact_uri`` when the run's
    creation told it (the client would read the run again to learn it)."""
    with tempfile.TemporaryDirectory(prefix="hposvc-artifacts-") as tmp:
        for path, text in texts.items():
            target = Path(tmp) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        if artifact_uri is None or artifact_uri.startswith("dbfs:"):
            client.log_artifacts(run_id, tmp)
        else:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            get_artifact_repository(artifact_uri, tracking_uri=tracking_uri).log_artifacts(tmp)


def _load_study(name: str, storage: str) -> "optuna.Study":
    from hposvc.storage import load_study

    return load_study(name, storage=storage)


def _read_writer(path: Path) -> tuple[str, int] | None:
    try:
        with open(path, "rb") as f:
            first = f.readline()
        rec = json.loads(first)
        return rec.get("host", ""), int(rec.get("pid", 0))
    except (OSError, ValueError):
        return None


def _ends_with_eof(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            return f.read().rstrip().endswith(b'{"k":"eof"}')
    except OSError:
        return False


def _no_complete_line_after(path: Path, offset: int) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return b"\n" not in f.read()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (a child of a process that has not reaped it) is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


if __name__ == "__main__":
    sys.exit(main())
