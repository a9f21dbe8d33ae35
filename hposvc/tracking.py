"""MLflow tracking, written by hposvc through an explicit ``MlflowClient``.

Layout: one experiment per study (``hposvc/<study>``), one parent run for the study (tag
``hposvc.role=study``) and one nested run per trial (tag ``hposvc.role=trial``) with the
TrialConfig as params and as ``config.json``, per-epoch metrics with steps, and a status
that tells the truth: COMPLETE → FINISHED, PRUNED → KILLED, FAIL → FAILED.

Outages: every write of a trial goes through a :class:`TrialRun`. When the tracking store
cannot be reached, the trial keeps running and what it would have written is kept in a
JSON record under ``<data dir>/outbox/``; :meth:`Tracker.sync` (called after each trial
and by ``hposvc sync``) replays the records once the store is back, so MLflow loses
nothing. A replay first looks for the trial's run, so a trial never gets two runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hposvc import records
from hposvc.errors import TrackingError
from hposvc.storage import artifact_location, resolve_data_dir

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from hposvc.config import TrialConfig

__all__ = [
    "Tracker",
    "TrialRun",
    "ensure_experiment",
    "experiment_artifact_location",
    "experiment_name",
    "find_study_run",
    "mlflow_client",
    "open_tracker",
    "sync_outbox",
]

log = logging.getLogger(__name__)

RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# Buffered epoch metrics are sent at most this often (seconds) while a trial runs, so the
# MLflow UI shows live curves for long trials without one call per value for short ones.
FLUSH_SECONDS = 10.0
# After a failed call the tracker stays offline this long (seconds) before trying again,
# so an outage costs one timeout, not one per trial.
OFFLINE_BACKOFF = 20.0


def experiment_name(study_name: str) -> str:
    """The MLflow experiment of study ``study_name``."""
    return f"hposvc/{study_name}"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def mlflow_client(uri: str) -> "MlflowClient":
    """An MlflowClient for ``uri``; an embedded SQLite store's folder is created first."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


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
    of the deleted one. If two workers raced to create it, the first one is the run.
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


def _uid_filter(uid: str) -> str:
    return f" and tags.`hposvc.study_uid` = '{uid}'" if uid else ""


@dataclass
class _Record:
    """Everything one trial writes to MLflow; the unit of buffering and replay."""

    study: str
    trial_number: int
    parent_run_id: str | None
    run_name: str
    study_uid: str = ""  # tells this study's runs from those of a deleted namesake
    run_id: str | None = None
    start_time: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, ts, step
    artifacts: dict[str, str] = field(default_factory=dict)  # path -> text
    status: str | None = None  # terminal MLflow status once the trial ended
    end_time: int | None = None
    sent: dict[str, int] = field(default_factory=lambda: {"params": 0, "metrics": 0, "tags": 0, "artifacts": 0})


class Tracker:
    """Writes one study to MLflow.

    >>> tracker = Tracker("sqlite:///hposvc-data/mlflow.db", study="digits-quick")  # doctest: +SKIP
    >>> run = tracker.start_trial(0, config, tags={"hposvc.device": "cpu"})        # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        study: str,
        uid: str = "",
        parent_run_id: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = tracking_uri
        self.study = study
        self.uid = uid
        self.data_dir = resolve_data_dir(data_dir)
        self.outbox = self.data_dir / "outbox"
        self.study_tags = {**dict(tags or {}), **({"hposvc.study_uid": uid} if uid else {})}
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = parent_run_id
        self._writer = None  # single writer thread, created on first trial
        self._offline_until = 0.0
        self._others: dict[tuple[str, str], Tracker] = {}  # namesakes met while syncing
        # MLflow prints run URLs to stdout (and fetches the run to do it); stdout is for data.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        if _is_http(tracking_uri):
            # MLflow's default HTTP retry policy waits minutes; a trial should not.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

    # -- connection ------------------------------------------------------------------

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    @property
    def online(self) -> bool:
        return time.monotonic() >= self._offline_until

    def _went_offline(self, e: Exception) -> bool:
        """Note a failed MLflow call; True when it was an outage (retry later), False when
        the store refused the data (retrying would not help)."""
        if _is_outage(e):
            log.warning("MLflow at %s unreachable (%s); keeping tracking data in %s", self.uri, _short(e), self.outbox)
            self._offline_until = time.monotonic() + OFFLINE_BACKOFF
            return True
        log.error(
            "MLflow at %s refused tracking data of study %r: %s. The record is kept in %s; fix the "
            "cause (e.g. restore or permanently delete a deleted experiment) and run `hposvc sync`.",
            self.uri, self.study, _short(e), self.outbox / "failed",
        )
        return False

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = ensure_experiment(
                self.client, experiment_name(self.study), uri=self.uri, data_dir=self.data_dir, tags=self.study_tags
            )
        return self._experiment_id

    def parent_run_id(self) -> str:
        """The study's parent run, created on first use and reused on resume."""
        if self._parent_run_id is None:
            experiment_id = self.experiment_id()
            run = find_study_run(self.client, self.study, uid=self.uid)
            if run is not None:
                self._parent_run_id = run.info.run_id
                if run.info.status != "RUNNING":
                    self.client.update_run(self._parent_run_id, status="RUNNING")
            else:
                tags = {"hposvc.role": "study", "hposvc.study": self.study, **self.study_tags}
                self._parent_run_id = self.client.create_run(experiment_id, tags=tags, run_name=self.study).info.run_id
        return self._parent_run_id

    def start_study(self, *, spec: Mapping[str, Any]) -> str | None:
        """Open the parent run and attach the spec; None when the store is unreachable."""
        try:
            run_id = self.parent_run_id()
            self.client.log_dict(run_id, dict(spec), "spec.json")
            return run_id
        except TrackingError:
            raise  # the store is reachable but unusable as configured: the user must act
        except Exception as e:  # noqa: BLE001 (an outage must not stop the study)
            self._went_offline(e)
            return None

    # -- trials ----------------------------------------------------------------------

    def start_trial(
        self,
        trial_number: int,
        config: "TrialConfig",
        *,
        tags: Mapping[str, str] | None = None,
        on_created: Callable[[str], None] | None = None,
    ) -> "TrialRun":
        record = self._trial_record(
            trial_number,
            start_time=_now_ms(),
            tags={"hposvc.state": "RUNNING", "hposvc.host": socket.gethostname(), **dict(tags or {})},
        )
        record.params = config.flat_params()
        record.artifacts = {"config.json": config.to_json()}
        run = TrialRun(self, record)
        run.open(on_created)
        return run

    def _trial_record(self, trial_number: int, *, start_time: int, tags: Mapping[str, str]) -> _Record:
        """A trial run's record with the tags every trial run carries (the study uid among
        them, which replays and queries find the run by)."""
        return _Record(
            study=self.study,
            trial_number=trial_number,
            parent_run_id=self._parent_run_id,
            run_name=f"trial-{trial_number}",
            study_uid=self.uid,
            start_time=start_time,
            tags={
                "hposvc.role": "trial",
                "hposvc.study": self.study,
                "hposvc.trial_number": str(trial_number),
                **{k: v for k, v in self.study_tags.items() if k.startswith("hposvc.")},
                **tags,
            },
        )

    def _deliver(self, record: _Record, *, replay: bool = False) -> None:
        """Send a finished record now, or keep it in the outbox (``failed/`` when the store
        refused it rather than being unreachable)."""
        folder = self.outbox
        if self.online:
            try:
                record.parent_run_id = record.parent_run_id or self.parent_run_id()
                _send(self.client, self.experiment_id(), record, replay=replay)
                return
            except Exception as e:  # noqa: BLE001
                if not self._went_offline(e):
                    folder = folder / "failed"
        _write_outbox(folder, record)

    def _submit(self, fn: Callable[[], None]) -> None:
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hposvc-mlflow")
        self._writer.submit(fn).add_done_callback(_log_failure)

    def drain(self) -> None:
        """Wait until the writer thread has sent (or stored in the outbox) all queued work."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()

    def sync(self) -> int:
        """Replay outbox records of this study; returns how many were sent."""
        return sync_outbox(self, study=self.study)

    def sync_soon(self) -> None:
        """Replay this study's outbox on the writer thread (in order with its other work),
        when there is anything to replay and the store looks reachable."""
        if self.online and self.outbox.is_dir() and any(self.outbox.glob("*.json")):
            self._submit(self.sync)

    def tracker_for(self, study: str, uid: str) -> "Tracker":
        """A tracker of the same store for study ``study`` / ``uid`` (this one if it is it).

        Outbox records of a namesake study (an older study of the same name, deleted and
        re-created) are sent under their own uid by their own tracker, never this one.
        """
        if (study, uid) == (self.study, self.uid):
            return self
        key = (study, uid)
        if key not in self._others:
            self._others[key] = Tracker(self.uri, study=study, uid=uid, data_dir=self.data_dir)
        return self._others[key]

    def close_stale_trial(self, trial: "optuna.trial.FrozenTrial") -> None:
        """A trial whose worker died ends FAILED in MLflow too.

        The closing goes through the same record as any trial's end: sent now, or kept in
        the outbox during an MLflow outage and sent by the next sync, so no run stays
        RUNNING. A trial whose run never reached MLflow gets one, FAILED with the reason.
        """
        start = trial.datetime_start.timestamp() * 1000 if trial.datetime_start else _now_ms()
        record = self._trial_record(
            trial.number,
            start_time=int(start),
            tags={"hposvc.state": "FAIL", "hposvc.reason": "worker died: no heartbeat within the grace period; the trial is retried"},
        )
        record.run_id = trial.user_attrs.get(records.RUN_ID)
        record.status, record.end_time = "FAILED", _now_ms()
        self._deliver(record, replay=True)

    def trial_finished(self, study: "optuna.Study", trial_number: int) -> None:
        """After a trial ended (COMPLETE or PRUNED): the parent run's ``best_value`` at
        step ``trial_number`` (the live optimisation history; :mod:`hposvc.dashboard`)."""
        self._submit(lambda: self._log_best_value(study, trial_number))

    def _log_best_value(self, study: "optuna.Study", trial_number: int) -> None:
        from hposvc import dashboard

        if not self.online:
            return  # the study's end fills the points it missed
        try:
            dashboard.log_best_value(self.client, self.parent_run_id(), study, trial_number)
        except Exception as e:  # noqa: BLE001
            self._went_offline(e)

    def finish_study(self, study: "optuna.Study", *, plots: bool = True, plan: str | None = None) -> None:
        """End the parent run with the study's summary (:func:`hposvc.dashboard.summarise_study`)."""
        from hposvc import dashboard

        if not self.online:
            return
        try:
            run_id = self.parent_run_id()
            dashboard.summarise_study(self.client, run_id, study, plan=plan, plots=plots)
            self.client.set_terminated(run_id, "FINISHED")
        except Exception as e:  # noqa: BLE001
            self._went_offline(e)


class TrialRun:
    """The MLflow run of one trial; buffers metrics and falls back to the outbox.

    Every method only queues work for the tracker's writer thread, which alone touches the
    record: MLflow's round trips overlap training instead of adding to each trial.
    """

    def __init__(self, tracker: Tracker, record: _Record) -> None:
        self.tracker = tracker
        self.record = record
        self._last_flush = time.monotonic()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the writer created the run (None before, or offline)."""
        return self.record.run_id

    def open(self, on_created: Callable[[str], None] | None = None) -> None:
        """Create the run; ``on_created(run_id)`` is called from the writer thread."""
        self.tracker._submit(lambda: self._open(on_created))

    def log_epoch(self, metrics: Mapping[str, float | None], *, step: int) -> None:
        now = _now_ms()
        items = [(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.tracker._submit(lambda: self._add(items))

    def add_text(self, path: str, text: str) -> None:
        """Attach ``text`` as the artifact ``path`` (sent with the run's next write, or kept
        in the outbox with the rest of the record)."""
        self.tracker._submit(lambda: self.record.artifacts.__setitem__(path, text))

    def end(self, state: str, *, reason: str | None = None, metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Close the run with the trial's final ``state`` (an Optuna state name)."""
        now = _now_ms()
        final = [(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None]
        extra = {**(tags or {}), "hposvc.state": state, **({"hposvc.reason": reason[:4000]} if reason else {})}
        self.tracker._submit(lambda: self._end(state, final, extra, now))

    # -- writer thread ---------------------------------------------------------------

    def _open(self, on_created: Callable[[str], None] | None) -> None:
        if not self.tracker.online:
            return
        try:
            self.record.parent_run_id = self.record.parent_run_id or self.tracker.parent_run_id()
            _send(self.tracker.client, self.tracker.experiment_id(), self.record)
        except Exception as e:  # noqa: BLE001
            self.tracker._went_offline(e)
            return
        if on_created is not None and self.record.run_id:
            try:
                on_created(self.record.run_id)
            except Exception as e:  # noqa: BLE001 (e.g. the trial already finished)
                log.debug("on_created callback failed: %s", e)

    def _add(self, items: list[tuple[str, float, int, int]]) -> None:
        self.record.metrics.extend(items)
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self._last_flush = time.monotonic()
            if self.record.run_id is not None and self.tracker.online:
                try:
                    _send(self.tracker.client, self.tracker.experiment_id(), self.record)
                except Exception as e:  # noqa: BLE001
                    self.tracker._went_offline(e)

    def _end(self, state: str, final: list, tags: dict[str, str], now: int) -> None:
        self.record.tags.update(tags)
        self.record.metrics.extend(final)
        self.record.status = RUN_STATUS.get(state, "FAILED")
        self.record.end_time = now
        self.tracker._deliver(self.record)


def _log_failure(future: Any) -> None:
    if future.exception() is not None:
        log.error("MLflow writer job failed: %s", future.exception(), exc_info=future.exception())


def _find_trial_run(client: "MlflowClient", experiment_id: str, *, uid: str, trial_number: int) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`hposvc.role` = 'trial' and tags.`hposvc.trial_number` = '{trial_number}'{_uid_filter(uid)}",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _send(client: "MlflowClient", experiment_id: str, record: _Record, *, replay: bool = False) -> None:
    """Send what ``record`` holds that MLflow has not got yet (idempotent per part).

    A replay first looks for the trial's run: the create may have reached the store before
    the connection broke.
    """
    from mlflow.entities import Metric, Param, RunTag

    if record.run_id is None:
        existing = _find_trial_run(client, experiment_id, uid=record.study_uid, trial_number=record.trial_number) if replay else None
        if existing:
            record.run_id = existing
        else:
            tags = dict(record.tags)
            if record.parent_run_id:
                tags["mlflow.parentRunId"] = record.parent_run_id
            run = client.create_run(experiment_id, start_time=record.start_time, tags=tags, run_name=record.run_name)
            record.run_id = run.info.run_id
            record.sent["tags"] = len(record.tags)
    sent = record.sent
    params = list(record.params.items())[sent["params"]:]
    metrics = record.metrics[sent["metrics"]:]
    tag_items = list(record.tags.items())
    # Tags can change (state), so resend all once the run ends; before that only new ones.
    tags = tag_items if record.status else tag_items[sent["tags"]:]
    # MLflow caps one batch at 1000 metrics / 100 params; chunk to stay within it.
    for i in range(0, max(len(metrics), 1), 1000):
        chunk = metrics[i : i + 1000]
        batch_params = params if i == 0 else []
        batch_tags = tags if i == 0 else []
        if chunk or batch_params or batch_tags:
            for j in range(0, max(len(batch_params), 1), 100):
                client.log_batch(
                    record.run_id,
                    metrics=[Metric(k, v, ts, s) for k, v, ts, s in chunk] if j == 0 else [],
                    params=[Param(k, v) for k, v in batch_params[j : j + 100]],
                    tags=[RunTag(k, v) for k, v in batch_tags] if j == 0 else [],
                )
    sent["params"] += len(params)
    sent["metrics"] += len(metrics)
    sent["tags"] = len(tag_items)
    artifacts = list(record.artifacts.items())[sent["artifacts"]:]
    for path, text in artifacts:
        client.log_text(record.run_id, text, path)
        sent["artifacts"] += 1
    if record.status:
        client.set_terminated(record.run_id, record.status, end_time=record.end_time)


def _write_outbox(outbox: Path, record: _Record, path: Path | None = None) -> Path:
    """Write ``record`` atomically (a reader or a crash never leaves half a record)."""
    outbox.mkdir(parents=True, exist_ok=True)
    path = path or outbox / f"{_safe(record.study)}-trial{record.trial_number}-{uuid.uuid4().hex[:8]}.json"
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record.__dict__))
    os.replace(tmp, path)
    return path


def sync_outbox(tracker: Tracker, *, study: str | None = None) -> int:
    """Send outbox records (of ``study``, or all) to the tracker's store; keep failures.

    Safe with several syncing processes on one outbox (scaled workers sharing a volume):
    each record is claimed by renaming it before it is sent, so only one sends it.
    """
    if not tracker.outbox.is_dir():
        return 0
    sent = 0
    for path in sorted(tracker.outbox.glob("*.json")):
        claimed = path.with_name(f"{path.name}.sending-{os.getpid()}")
        try:
            os.replace(path, claimed)
        except FileNotFoundError:
            continue  # another process took it
        try:
            data = json.loads(claimed.read_text())
            record = _Record(**data)
        except (ValueError, TypeError) as e:
            log.error("unreadable outbox record %s (%s); moved to %s", path.name, e, tracker.outbox / "failed")
            (tracker.outbox / "failed").mkdir(exist_ok=True)
            os.replace(claimed, tracker.outbox / "failed" / path.name)
            continue
        if study is not None and record.study != study:
            os.replace(claimed, path)
            continue
        target = tracker.tracker_for(record.study, record.study_uid)
        try:
            record.parent_run_id = record.parent_run_id or target.parent_run_id()
            _send(target.client, target.experiment_id(), record, replay=True)
        except Exception as e:  # noqa: BLE001
            outage = target._went_offline(e)
            # keep what was sent so far; a record the store refuses goes aside
            _write_outbox(tracker.outbox if outage else tracker.outbox / "failed", record, path if outage else None)
            claimed.unlink(missing_ok=True)
            if outage:
                break
            continue
        claimed.unlink(missing_ok=True)
        sent += 1
    return sent


def open_tracker(study: "optuna.Study", *, spec: Mapping[str, Any], tracking_uri: str, data_dir: str | os.PathLike[str] | None = None) -> Tracker:
    """The study's tracker, with its experiment and parent run created once.

    The parent run id is stored on the study, so every worker on every host logs its
    trials under the same parent instead of racing to create one each. Done here, in the
    caller's thread: MLflow imported on the writer thread while the caller imports torch
    and the task's libraries could hand either a half-initialised module.
    """
    info = records.study_info(study)
    tracker = Tracker(
        tracking_uri,
        study=info.name,
        uid=info.uid,
        parent_run_id=info.parent_run_id,
        data_dir=data_dir,
        tags={"hposvc.spec_hash": info.spec_hash or "", "hposvc.task": info.task or ""},
    )
    parent = tracker.start_study(spec=spec)
    if parent and info.parent_run_id != parent:
        study.set_user_attr(records.PARENT_RUN_ID, parent)
    if parent:
        _setup_experiment(tracker, study)
    return tracker


def _setup_experiment(tracker: Tracker, study: "optuna.Study") -> None:
    """The experiment opens on its training runs and describes the study (once per study)."""
    from hposvc import dashboard

    try:
        info = records.study_info(study)
        dashboard.setup_experiment(tracker.client, tracker.experiment_id(), study=info.name, metric=info.metric, direction=study.direction.name.lower())
    except Exception as e:  # noqa: BLE001 (an outage must not stop the study)
        tracker._went_offline(e)


def _is_outage(e: BaseException) -> bool:
    """Whether an MLflow error means "cannot reach the store now" (retry later)."""
    import requests

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        text = str(e).lower()
        if any(s in text for s in ("connection", "max retries", "timed out", "database is locked", "503", "502", "504", "500 server error", "unavailable")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]
