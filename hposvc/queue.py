"""The trial queue: how ``n_trials`` stays exact with any number of workers.

Workers only ever claim WAITING trials, with the storage's atomic WAITING → RUNNING
transition. The queue is kept short: :func:`top_up` adds plain WAITING trials a few at a
time (:data:`LOOKAHEAD`), never past ``n_trials`` counting COMPLETE, PRUNED, RUNNING and
WAITING ones — a long queue would make every read of the study re-read every waiting trial
(Optuna re-reads unfinished trials), which grows with ``n_trials``. Two workers topping up
at once can add a few trials too many; :func:`claim` then lets only the lowest-numbered
claims run (the others go back to WAITING), so the finished count is exactly ``n_trials``. A claimed trial carries a heartbeat; a trial whose
heartbeat stops (its worker died) is failed by whichever worker notices and re-queued with
the same parameters, at most :data:`MAX_RETRY` times, which keeps the count exact too.

The heartbeat is a trial system attribute (``hposvc.heartbeat``, the worker's clock) that
changes every :data:`HEARTBEAT_INTERVAL` seconds. A :class:`StaleWatch` calls a trial
stale when it has seen that value unchanged for :data:`GRACE_PERIOD` seconds of its *own*
clock, so hosts need no synchronised clocks, and it works through every storage, Optuna's
gRPC proxy included (whose client has no heartbeat API of its own). Time the storage was
unreachable does not count: after an outage every trial gets a full grace period to beat
again, so a live trial is not failed because its beats could not land. A trial hposvc
queued (``hposvc.queued``) that is RUNNING without any heartbeat counts as stale too: a
claim whose reply was lost to a broken connection would otherwise stay RUNNING forever.

Everything here goes through Optuna's public storage API, except the few reads Optuna has
no public accessor for (and one it has only at a cost: trial states alone, read per claim),
kept in the adapter at the bottom of this module (and pinned by ``tests/test_queue.py``,
which fails when Optuna changes them).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from hposvc.errors import InvalidInputError
from hposvc.records import DONE_STATES, HEARTBEAT, QUEUED, REASON, WORKER, Counts
from hposvc.storage import OUTAGE, with_retries

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = [
    "GRACE_PERIOD",
    "HEARTBEAT_INTERVAL",
    "MAX_RETRY",
    "StaleWatch",
    "WriteBehind",
    "backend_of",
    "claim",
    "counts",
    "grid_exhausted",
    "heartbeat",
    "requeue",
    "storage_of",
    "tell_fail",
    "top_up",
    "trial_id",
    "trial_states",
]

log = logging.getLogger(__name__)


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.strip().isdigit() or int(value) < 1:
        raise InvalidInputError(f"the {name!r} environment variable must be a whole number of seconds >= 1. Got {value!r} instead.")
    return int(value)


# Workers record a heartbeat for their running trials this often (seconds).
HEARTBEAT_INTERVAL = _env_seconds("HPOSVC_HEARTBEAT_INTERVAL", 10)
# A trial whose heartbeat has not changed for this long is failed and retried by whoever
# notices. Long enough to outlast a database restart or a busy SQLite writer, so a live
# trial is not failed while its heartbeat waits.
GRACE_PERIOD = _env_seconds("HPOSVC_GRACE_PERIOD", max(6 * HEARTBEAT_INTERVAL, 60))
# A trial killed with its worker is retried this many times with the same parameters.
MAX_RETRY = 2
# How many WAITING trials the queue holds ahead of the workers (at least a population).
LOOKAHEAD = 4
# How long a trial's attribute and epoch writes gather before they are stored together.
WRITE_BATCH_SECONDS = 1.0


def counts(study: "optuna.Study") -> Counts:
    """The study's trials counted by state (one light read: :func:`trial_states`)."""
    from collections import Counter

    return Counts(dict(Counter(state for _, _, state in trial_states(study))))


def top_up(study: "optuna.Study", n_trials: int, *, lookahead: int = LOOKAHEAD, c: "Counts | None" = None) -> int:
    """Add plain WAITING trials until ``lookahead`` wait, without passing ``n_trials`` live
    or finished ones. Returns how many were added.

    The trials carry no parameters: the sampler fills them when they are claimed, so it
    sees every result finished by then. ``c``: the counts, when the caller has just read them.
    """
    from optuna.trial import TrialState, create_trial

    c = c or counts(study)
    deficit = n_trials - sum(c[s] for s in (*DONE_STATES, "RUNNING", "WAITING"))
    add = min(deficit, lookahead - c["WAITING"])
    if add > 0:
        with_retries(lambda: study.add_trials([create_trial(state=TrialState.WAITING, system_attrs={QUEUED: True}) for _ in range(add)]), what="queueing trials")
    return max(add, 0)


def claim(study: "optuna.Study", n_trials: int | None = None) -> "optuna.Trial | None":
    """Atomically move one WAITING trial to RUNNING and return it, or None.

    ``Study.ask`` would create a new trial when the queue is empty, which lets parallel
    workers overshoot ``n_trials``; this is its queue half alone. With ``n_trials``, a
    claim that would make more than ``n_trials`` trials finished or running goes back to
    WAITING unless it is among the lowest-numbered of the running ones (so of two workers
    claiming the last trial at once, exactly one runs it). The first heartbeat is recorded
    at once: a trial without one is never stale, so a worker dying right after the claim
    would otherwise leave it RUNNING forever.
    """
    import optuna

    storage = _storage(study)

    def pop() -> int | None:
        for tid, _, state in trial_states(study):
            if state != "WAITING":
                continue
            try:
                # False (or UpdateFinishedTrialError) when another worker got there first.
                if storage.set_trial_state_values(tid, state=optuna.trial.TrialState.RUNNING):
                    return tid
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    trial_id = with_retries(pop, what="claiming a trial")
    if trial_id is None:
        return None
    if _unknown_to_cache(storage, trial_id):
        # Queued by another process: Optuna's trial cache learns of it by reading the
        # study's unfinished trials (sampling it writes through that cache).
        with_retries(lambda: storage.get_all_trials(_study_id(study), deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)), what="reading the claimed trial")
    with_retries(lambda: _beat(storage, trial_id), what="recording a heartbeat")
    if n_trials is not None and not _within(study, trial_id, n_trials):
        with_retries(lambda: storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.WAITING), what="returning a claim")
        return None
    return optuna.Trial(study, trial_id)


def _within(study: "optuna.Study", trial_id: int, n_trials: int) -> bool:
    """Whether a just-claimed trial may run: finished + running stays within ``n_trials``,
    the lowest-numbered running trials first."""
    states = trial_states(study)
    done = sum(state in DONE_STATES for _, _, state in states)
    running = sorted(tid for tid, _, state in states if state == "RUNNING")
    return done + len(running) <= n_trials or trial_id in running[: max(n_trials - done, 0)]


def _beat(storage: "optuna.storages.BaseStorage", trial_id: int) -> None:
    storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())


def requeue(study: "optuna.Study", trial: "FrozenTrial") -> bool:
    """Queue a failed trial again with the same parameters, at most MAX_RETRY times.

    Like Optuna's ``RetryFailedTrialCallback``, but the copy carries no user attributes:
    they describe the failed attempt (its MLflow run, device, reason), not the new one.
    """
    from optuna.trial import TrialState, create_trial

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        log.warning("trial %s failed %d times; not retrying it again", trial.number, len(history))
        return False
    system_attrs = {k: v for k, v in trial.system_attrs.items() if k not in ("failed_trial", "retry_history", HEARTBEAT)}
    system_attrs.update({"failed_trial": history[0], "retry_history": history, QUEUED: True})
    with_retries(
        lambda: study.add_trial(create_trial(state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, system_attrs=system_attrs)),
        what="re-queueing a failed trial",
    )
    return True


def tell_fail(study: "optuna.Study", trial: "optuna.Trial", reason: str) -> None:
    """End a claimed trial FAIL with ``reason`` (a trial failed elsewhere is left alone)."""
    import optuna

    try:
        with_retries(lambda: trial.set_user_attr(REASON, reason[:2000]), what="storing the failure reason")
        with_retries(lambda: study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True), what="failing the trial")
    except Exception as e:  # noqa: BLE001 (the trial may already be failed as stale)
        log.warning("could not mark trial %s failed: %s", trial.number, e)


class StaleWatch:
    """Finds the trials of dead workers: RUNNING trials whose heartbeat value has not
    changed for ``grace`` seconds of this process's clock.

    One per worker loop: it remembers each heartbeat value it saw and since when, counting
    only time after the storage's last outage in this process (:data:`hposvc.storage.OUTAGE`).
    A trial that never had a heartbeat is stale only when hposvc queued it (a plain Optuna
    process's trial is never).
    """

    def __init__(self, grace: float = GRACE_PERIOD) -> None:
        self.grace = grace
        self._seen: dict[int, tuple[float, float]] = {}  # trial id -> (heartbeat, first seen)

    def stale(self, study: "optuna.Study") -> "list[FrozenTrial]":
        """The RUNNING trials of ``study`` whose heartbeat stopped."""
        import optuna

        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        now = time.monotonic()
        back = OUTAGE.ended_at  # beats could not land before this: start counting here
        seen: dict[int, tuple[float, float]] = {}
        found = []
        for t in running:
            value = t.system_attrs.get(HEARTBEAT)
            if value is None and not t.system_attrs.get(QUEUED):
                continue
            tid = _trial_id(t)
            last, since = self._seen.get(tid, (value, now))
            if last != value:
                since = now  # it beat since we last looked
            since = max(since, back)
            seen[tid] = (value, since)
            if now - since >= self.grace:
                found.append(t)
        self._seen = seen
        return found

    def fail_stale(self, study: "optuna.Study", *, on_stale: "Callable[[FrozenTrial], None] | None" = None) -> list[int]:
        """Fail the trials whose heartbeat stopped, re-queue them, and call ``on_stale`` for each.

        What ``optuna.storages.fail_stale_trials`` does for Optuna's own heartbeat, with
        the callback passed here: the worker that notices hands in its own tracker, so the
        dead trial's MLflow run is closed under the right study. Of several workers
        noticing at once, only the one whose FAIL transition wins acts on a trial.
        """
        import optuna

        storage = _storage(study)
        failed: list[int] = []
        for t in with_retries(lambda: self.stale(study), what="finding stale trials"):
            worker = t.user_attrs.get(WORKER, "a worker")
            reason = (
                f"{worker} stopped beating for {self.grace:g} s (it died, or lost the storage for longer than "
                "HPOSVC_STORAGE_OUTAGE_LIMIT); the trial is retried"
            )
            try:
                # The reason first: a finished trial takes no more attributes.
                with_retries(lambda: storage.set_trial_user_attr(_trial_id(t), REASON, reason), what="storing the failure reason")
                if storage.set_trial_state_values(_trial_id(t), state=optuna.trial.TrialState.FAIL):
                    failed.append(_trial_id(t))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it first, or its own worker finished it
        for tid in failed:
            frozen = storage.get_trial(tid)
            if on_stale is not None:
                on_stale(frozen)
            requeue(study, frozen)
        return failed


def grid_exhausted(study: "optuna.Study") -> bool:
    """True when a grid study has no unsampled grid point left, nor a re-queued trial
    (which carries its grid point with it) waiting to run."""
    import optuna

    if not isinstance(study.sampler, optuna.samplers.GridSampler) or not study.sampler.is_exhausted(study):
        return False
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return not any(t.params or t.system_attrs.get("fixed_params") for t in waiting)


@contextmanager
def heartbeat(trials: "Sequence[optuna.Trial]") -> Iterator[None]:
    """Record the trials' heartbeats from a thread while they train.

    Ask/tell has no heartbeat of its own (only ``Study.optimize`` starts one), so hposvc
    beats for every trial it claimed (:func:`claim` records the first beat), sequential or
    population.
    """
    beats = [(t.storage, _trial_id(t)) for t in trials]
    stop = threading.Event()

    def beat() -> None:
        import optuna

        live = list(beats)
        while live and not stop.wait(HEARTBEAT_INTERVAL):
            for storage, trial_id in list(live):
                try:
                    _beat(storage, trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    live.remove((storage, trial_id))  # it ended (a population member pruned early)
                except Exception as e:  # noqa: BLE001 (a missed beat is retried next interval)
                    log.warning("heartbeat for trial %s failed: %s", trial_id, e)

    # (each trial's first beat was recorded when it was claimed: queue.claim)
    thread = threading.Thread(target=beat, name="hposvc-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class WriteBehind:
    """A running trial's storage writes (attributes, intermediate values), gathered for up
    to :data:`WRITE_BATCH_SECONDS` and stored together from one background thread, so that
    training never waits for the database and a trial's dozen small writes cost one
    transaction instead of a dozen.

    :meth:`flush` before a trial's result is told: everything the result depends on is
    stored by then. A worker killed before that loses only the last moments of writes of
    the trial it was running, which ends FAIL anyway (its epochs reach MLflow through the
    outbox regardless). As Optuna's ``Trial.report``, a step reported twice keeps its
    first value; an attribute set twice keeps its last.
    """

    def __init__(self, *, interval: float | None = None) -> None:
        self.interval = WRITE_BATCH_SECONDS if interval is None else interval
        self._pending: dict[int, _TrialWrites] = {}
        self._lock = threading.Lock()  # guards _pending
        self._writing = threading.Lock()  # one batch at a time, in the order they were taken
        self._queued = threading.Event()
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None  # started by the first write (never before a fork)

    def user_attr(self, trial: "optuna.Trial", key: str, value: Any) -> None:
        self._add(trial, lambda w: w.attrs.__setitem__(key, value))

    def intermediate(self, trial: "optuna.Trial", step: int, value: float) -> None:
        step, value = int(step), float(value)
        if step < 0:
            raise ValueError(f"an epoch's step must be non-negative, got {step}")
        self._add(trial, lambda w: w.steps.setdefault(step, value))

    def flush(self) -> None:
        """Store every write queued so far, here and now; raise the first error a write met."""
        self._write_pending()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Store what is left and stop the thread."""
        self._closed.set()
        self._queued.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 (closing after the trials ended: say it, go on)
            log.warning("storing a trial's last attributes failed: %s", e)

    def _add(self, trial: "optuna.Trial", change: "Callable[[_TrialWrites], object]") -> None:
        # (changed under the lock: a batch the thread has taken is never changed after)
        with self._lock:
            writes = self._pending.get(_trial_id(trial))
            if writes is None:
                writes = self._pending[_trial_id(trial)] = _TrialWrites(trial)
            change(writes)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hposvc-storage", daemon=True)
            self._thread.start()
        self._queued.set()

    def _loop(self) -> None:
        while not self._closed.is_set():
            self._queued.wait()
            self._closed.wait(self.interval)  # let the trial's next writes join this batch
            try:
                self._write_pending()
            except BaseException as e:  # noqa: BLE001 (raised by the next flush)
                self._error = self._error or e

    def _write_pending(self) -> None:
        with self._writing:
            with self._lock:
                batch, self._pending = list(self._pending.values()), {}
                self._queued.clear()
            if batch:
                with_retries(lambda: write_trial_batch(batch), what="storing trial attributes and epochs")


class _TrialWrites:
    """One trial's writes waiting in a :class:`WriteBehind`."""

    __slots__ = ("attrs", "steps", "trial")

    def __init__(self, trial: "optuna.Trial") -> None:
        self.trial = trial
        self.attrs: dict[str, Any] = {}
        self.steps: dict[int, float] = {}


def trial_id(trial: "optuna.Trial | FrozenTrial") -> int:
    """The storage id of a trial (what storage calls take, unlike ``trial.number``)."""
    return _trial_id(trial)


def storage_of(study: "optuna.Study") -> "optuna.storages.BaseStorage":
    """The storage a study lives in (Optuna has no public accessor)."""
    return _storage(study)


def seed_sampler(sampler: "optuna.samplers.BaseSampler", seed: int) -> None:
    """Make ``sampler`` draw its next numbers from ``seed`` (every random stream in it,
    those of the samplers it delegates to included).

    Called with a seed of the study's seed and the trial's number before each trial is
    sampled, so a trial's configuration does not depend on which worker (or how many)
    sampled it: only on what the sampler knows of the other trials at that moment.
    """
    from optuna.samplers import BaseSampler

    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, value in vars(obj).items():
            if isinstance(value, _lazy_random_state()):
                setattr(obj, name, _lazy_random_state()(seed))
            elif isinstance(value, BaseSampler):
                visit(value)

    visit(sampler)


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The seed trial ``trial_number`` of a study seeded ``study_seed`` is sampled with."""
    return (study_seed * 1_000_003 + trial_number) % 2**32


# -- the adapter: the only reads of Optuna's private names in hposvc ------------------
# Optuna has no public accessor for a study's storage and id, a trial's storage id, the
# random streams of its samplers, the RDBStorage inside its trial cache, which trials that
# cache knows, or the frozen trial an optuna.Trial holds; no read of trial states alone
# (trial_states reads three columns of its `trials` table), and no write of several
# attributes and intermediate values at once (write_trial_batch writes Optuna's rows). tests/test_queue.py checks each
# against what the public API says, so an Optuna upgrade that moves them fails there, not
# in a worker.


def _storage(study: "optuna.Study") -> "optuna.storages.BaseStorage":
    return study._storage  # noqa: SLF001


def _study_id(study: "optuna.Study") -> int:
    return study._study_id  # noqa: SLF001


def _trial_id(trial: "optuna.Trial | FrozenTrial") -> int:
    return trial._trial_id  # noqa: SLF001


def trial_states(study: "optuna.Study") -> "list[tuple[int, int, str]]":
    """``(storage id, number, state name)`` of every trial of ``study``, by number.

    What counting trials and finding WAITING ones need, and nothing else. ``get_trials``
    re-reads every unfinished trial whole (parameters, attributes, intermediate values:
    six queries, ~8 ms on SQLite); on an RDB storage this is one query of three columns of
    Optuna's ``trials`` table, which on SQLite takes no write lock. Other storages (the
    gRPC proxy) get the public ``get_trials``.
    """
    import optuna

    from hposvc.storage import READ_ONLY

    rdb = backend_of(_storage(study))
    if not isinstance(rdb, optuna.storages.RDBStorage):
        return [(_trial_id(t), t.number, t.state.name) for t in study.get_trials(deepcopy=False)]
    sql = f"SELECT trial_id, number, state FROM trials WHERE study_id = {int(_study_id(study))} ORDER BY number"

    def read() -> "list[tuple[int, int, str]]":
        with rdb.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return [(int(i), int(n), str(s)) for i, n, s in conn.exec_driver_sql(sql)]

    return with_retries(read, what="reading the study's trial states")


def write_trial_batch(batch: "Sequence[_TrialWrites]") -> None:
    """Store trials' queued attributes and intermediate values.

    On an RDB storage on SQLite or PostgreSQL: one transaction, three statements whatever
    the number of writes, into Optuna's ``trial_user_attributes`` and
    ``trial_intermediate_values`` tables in Optuna's own representation (what its
    ``set_trial_user_attr`` and ``set_trial_intermediate_value`` store, at ~0.7 ms a call,
    one transaction each). Elsewhere, those public calls one by one. As Optuna does, a
    finished trial's writes are refused with ``UpdateFinishedTrialError`` (the others'
    are stored).
    """
    import optuna

    refused: list[int] = []
    by_storage: dict[int, list[_TrialWrites]] = {}
    for w in batch:
        by_storage.setdefault(id(w.trial.storage), []).append(w)
    for group in by_storage.values():
        storage = group[0].trial.storage
        rdb = backend_of(storage)
        if isinstance(rdb, optuna.storages.RDBStorage) and rdb.engine.dialect.name in ("sqlite", "postgresql"):
            refused += _write_rdb(rdb, group)
            continue
        for w in group:
            tid = _trial_id(w.trial)
            try:
                for key, value in w.attrs.items():
                    storage.set_trial_user_attr(tid, key, value)
                for step, value in w.steps.items():
                    storage.set_trial_intermediate_value(tid, step, value)
            except optuna.exceptions.UpdateFinishedTrialError:
                refused.append(w.trial.number)
    if refused:
        raise optuna.exceptions.UpdateFinishedTrialError(f"trial(s) {sorted(refused)} finished already: their last attributes and epochs were not stored")


def _write_rdb(rdb: "optuna.storages.RDBStorage", group: "Sequence[_TrialWrites]") -> list[int]:
    """:func:`write_trial_batch` on one RDB storage; the numbers of finished trials refused."""
    import importlib
    import json

    import sqlalchemy as sa
    from optuna.storages._rdb import models  # noqa: PLC2701

    insert = importlib.import_module(f"sqlalchemy.dialects.{rdb.engine.dialect.name}").insert  # (with ON CONFLICT)
    ids = {_trial_id(w.trial): w for w in group}
    attr_table, step_table = models.TrialUserAttributeModel.__table__, models.TrialIntermediateValueModel.__table__
    with rdb.engine.begin() as conn:
        states = dict(conn.execute(sa.select(models.TrialModel.trial_id, models.TrialModel.state).where(models.TrialModel.trial_id.in_(ids))).all())
        finished = {tid for tid, state in states.items() if state.is_finished()}
        live = [w for tid, w in ids.items() if tid not in finished]
        attrs = [{"trial_id": _trial_id(w.trial), "key": k, "value_json": json.dumps(v)} for w in live for k, v in w.attrs.items()]
        if attrs:
            stmt = insert(attr_table).values(attrs)
            conn.execute(stmt.on_conflict_do_update(index_elements=["trial_id", "key"], set_={"value_json": stmt.excluded.value_json}))
        steps = []
        for w in live:
            for step, value in w.steps.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                steps.append({"trial_id": _trial_id(w.trial), "step": step, "intermediate_value": stored, "intermediate_value_type": kind})
        if steps:
            conn.execute(insert(step_table).values(steps).on_conflict_do_nothing(index_elements=["trial_id", "step"]))
    return [ids[tid].trial.number for tid in finished]


def _unknown_to_cache(storage: "optuna.storages.BaseStorage", trial_id: int) -> bool:
    """Whether Optuna's trial cache (``_CachedStorage``, in front of every RDB storage)
    has not seen trial ``trial_id`` yet: it must have before the trial's parameters are set."""
    known = getattr(storage, "_trial_id_to_study_id_and_number", None)
    return known is not None and trial_id not in known


def frozen_copy(trial: "optuna.Trial") -> "FrozenTrial":
    """A copy of the trial as its ``optuna.Trial`` knows it (read when it was claimed, kept
    up to date by its own suggestions): no storage read."""
    import copy

    return copy.deepcopy(trial._cached_frozen_trial)  # noqa: SLF001


def _lazy_random_state() -> type:
    from optuna.samplers._lazy_random_state import LazyRandomState  # noqa: PLC2701

    return LazyRandomState


def backend_of(storage: "optuna.storages.BaseStorage") -> "optuna.storages.BaseStorage":
    """The storage behind Optuna's trial cache (an RDBStorage, whose engine hposvc's own
    tables share), or ``storage`` itself when it is not wrapped."""
    import optuna

    if isinstance(storage, optuna.storages._CachedStorage):  # noqa: SLF001
        return storage._backend  # noqa: SLF001
    return storage
