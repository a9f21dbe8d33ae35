"""The trial queue on real storages: exact claims, stale trials failed and retried once,
and the adapter over Optuna's private names pinned against the public API."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

from hposvc import queue, records
from hposvc.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(url: str, name: str = "q") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize")


def test_top_up_and_claims_are_exact(storage_url: str) -> None:
    study = _study(storage_url)
    assert queue.top_up(study, 5, lookahead=5) == 5
    assert queue.top_up(study, 5, lookahead=5) == 0  # idempotent: a resume adds nothing
    claimed = []
    while (t := queue.claim(study)) is not None:
        claimed.append(t)
    assert sorted(t.number for t in claimed) == [0, 1, 2, 3, 4]
    assert queue.counts(study)["RUNNING"] == 5 and queue.claim(study) is None
    study.tell(claimed[0], 1.0)
    queue.tell_fail(study, claimed[1], "boom")
    c = queue.counts(study)
    assert (c.done, c["FAIL"], c["RUNNING"]) == (1, 1, 3)
    assert study.trials[1].user_attrs[records.REASON] == "boom"
    assert queue.top_up(study, 5) == 1  # the failed trial is replaced, the running ones are not


def test_the_queue_stays_short(sqlite_url: str) -> None:
    # Every read of a study re-reads its unfinished trials: a queue of n_trials would cost
    # O(n_trials) per claim. It holds LOOKAHEAD, and never more than n_trials in all.
    study = _study(sqlite_url, "short")
    assert queue.top_up(study, 1000) == queue.LOOKAHEAD
    assert queue.top_up(study, 2, lookahead=10) == 0  # already past n_trials: nothing


def test_of_two_claims_of_the_last_trial_exactly_one_runs(sqlite_url: str) -> None:
    # Two workers topped up at once: one trial too many waits. Both claim; the one with the
    # lower number runs, the other goes back to WAITING, so n_trials stays exact.
    study = _study(sqlite_url, "race")
    queue.top_up(study, 2, lookahead=2)
    queue.top_up(study, 3, lookahead=3)  # the other worker's top-up, counted a moment earlier
    first = queue.claim(study, 2)
    study.tell(first, 1.0)
    a, b = queue.claim(study, 2), queue.claim(study, 2)
    assert a is not None and a.number == 1
    assert b is None  # trial 2 would be the third of two
    assert queue.counts(study)["WAITING"] == 1 and queue.counts(study)["RUNNING"] == 1


def test_adapter_agrees_with_the_public_api(storage_url: str) -> None:
    # Fails when an Optuna upgrade renames or changes the private names hposvc reads.
    study = _study(storage_url, "adapter")
    queue.top_up(study, 2)
    trial = queue.claim(study)
    storage = queue.storage_of(study)
    study_id = storage.get_study_id_from_name("adapter")
    assert queue._study_id(study) == study_id  # noqa: SLF001
    assert queue.trial_id(trial) == storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    frozen = study.trials[trial.number]
    assert queue.trial_id(frozen) == queue.trial_id(trial)
    backend = queue.backend_of(storage)
    if not storage_url.startswith("grpc://"):
        assert isinstance(backend, optuna.storages.RDBStorage)
    # the light read of Optuna's trials table says what get_trials says, for every state
    assert queue.frozen_copy(trial) == storage.get_trial(queue.trial_id(trial))
    study.tell(trial, 1.0)
    failed = queue.claim(study)
    queue.tell_fail(study, failed, "on purpose")
    queue.top_up(study, 4)
    queue.claim(study)
    public = [(queue.trial_id(t), t.number, t.state.name) for t in study.get_trials()]
    assert {s for *_, s in public} == {"COMPLETE", "FAIL", "RUNNING", "WAITING"}
    assert queue.trial_states(study) == public


def test_batched_writes_store_what_optunas_own_calls_store(storage_url: str) -> None:
    # WriteBehind stores a trial's attributes and epochs in one transaction (Optuna's rows,
    # written by hposvc on SQLite and PostgreSQL); the result must read back as what
    # Trial.set_user_attr and Trial.report store: JSON values, NaN and ±inf epochs, a step
    # reported twice keeping its first value, an attribute set twice keeping its last.
    study = _study(storage_url, "batch")
    queue.top_up(study, 3)
    mine, theirs, done = queue.claim(study), queue.claim(study), queue.claim(study)
    study.tell(done, 0.5)
    attrs = [("config", {"optimizer": "adam", "lr": 1e-3, "hidden": [64, 64]}), ("std", [0.5, None]), ("config", {"optimizer": "sgd"}), ("host", "h1")]
    steps = [(1, 0.25), (2, float("nan")), (3, float("inf")), (4, float("-inf")), (1, 0.75), (0, 0.125)]
    writes = queue.WriteBehind(interval=60)  # (nothing before flush: it stores them all at once)
    for key, value in attrs:
        writes.user_attr(mine, key, value)
        theirs.set_user_attr(key, value)
    with pytest.warns(UserWarning):  # Optuna says it ignores the repeated step; hposvc ignores it too
        for step, value in steps:
            writes.intermediate(mine, step, value)
            theirs.report(value, step)
    writes.user_attr(done, "late", 1)  # a finished trial refuses writes, as in Optuna
    assert queue.counts(study)["RUNNING"] == 2 and study.trials[mine.number].intermediate_values == {}
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        writes.flush()
    writes.close()
    stored, expected = study.trials[mine.number], study.trials[theirs.number]
    assert stored.user_attrs == expected.user_attrs == {"config": {"optimizer": "sgd"}, "std": [0.5, None], "host": "h1"}
    assert repr(stored.intermediate_values) == repr(expected.intermediate_values)  # (repr: nan == nan)
    assert stored.intermediate_values[1] == 0.25 and "late" not in study.trials[done.number].user_attrs


def test_a_trial_another_process_queued_can_be_claimed_and_sampled(sqlite_url: str) -> None:
    # Another process's storage object (its own trial cache) queues; this one claims. The
    # claim reads states only, yet Optuna's cache must know a trial before it is sampled.
    study = optuna.create_study(study_name="other", storage=open_storage(sqlite_url), sampler=optuna.samplers.RandomSampler(seed=0))
    other = optuna.load_study(study_name="other", storage=optuna.storages.RDBStorage(sqlite_url))
    queue.top_up(other, 3)
    assert queue._unknown_to_cache(queue.storage_of(study), queue.trial_id(other.trials[0]))  # noqa: SLF001
    trial = queue.claim(study, 3)
    assert trial.suggest_float("lr", 1e-3, 1e-1, log=True) == study.trials[0].params["lr"]
    assert not queue._unknown_to_cache(queue.storage_of(study), queue.trial_id(trial))  # noqa: SLF001


def test_stale_trials_are_failed_once_and_retried_with_their_parameters(storage_url: str) -> None:
    study = _study(storage_url, "stale")
    queue.top_up(study, 2)
    dead, alive = queue.claim(study), queue.claim(study)
    dead.suggest_float("lr", 1e-4, 1.0, log=True)
    lr = dead.params["lr"]
    watch = queue.StaleWatch(grace=1.0)
    closed: list[int] = []
    assert watch.fail_stale(study, on_stale=lambda t: closed.append(t.number)) == []  # first sight: not stale yet
    with queue.heartbeat([alive]):  # beats every HEARTBEAT_INTERVAL; the dead one never again
        time.sleep(0.5)
        queue._beat(queue.storage_of(study), queue.trial_id(alive))  # noqa: SLF001 (a beat, now)
        time.sleep(0.8)
        assert len(watch.fail_stale(study, on_stale=lambda t: closed.append(t.number))) == 1
        assert watch.fail_stale(study, on_stale=lambda t: closed.append(t.number)) == []  # only once
    assert closed == [dead.number]
    states = {t.number: t.state for t in study.trials}
    assert states == {dead.number: TrialState.FAIL, alive.number: TrialState.RUNNING, 2: TrialState.WAITING}
    retry = study.trials[2]
    assert retry.params == {"lr": lr} and retry.system_attrs["failed_trial"] == dead.number
    assert records.HEARTBEAT not in retry.system_attrs  # the retry starts without the dead one's beat


def test_a_trial_without_a_heartbeat_is_never_stale(sqlite_url: str) -> None:
    # A RUNNING trial of a plain Optuna process (no hposvc heartbeat) is not hposvc's to fail.
    study = _study(sqlite_url, "plain")
    study.ask()
    watch = queue.StaleWatch(grace=0.1)
    watch.stale(study)
    time.sleep(0.2)
    assert watch.fail_stale(study) == [] and study.trials[0].state == TrialState.RUNNING


def test_a_queued_trial_running_without_a_heartbeat_is_stale(sqlite_url: str) -> None:
    # A claim whose reply was lost to a broken connection: the trial is RUNNING, nobody beats
    # for it, and no worker knows it holds it. It must not stay RUNNING forever.
    study = _study(sqlite_url, "lost")
    queue.top_up(study, 1)
    storage = queue.storage_of(study)
    lost = study.trials[0]
    assert storage.set_trial_state_values(queue.trial_id(lost), TrialState.RUNNING)
    watch = queue.StaleWatch(grace=0.2)
    assert watch.stale(study) == []
    time.sleep(0.3)
    assert watch.fail_stale(study) == [queue.trial_id(lost)]
    failed, retry = study.trials
    assert failed.state == TrialState.FAIL and failed.user_attrs[records.REASON].startswith("a worker stopped beating for 0.2 s")
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == 0


def test_retries_stop_after_max_retry(sqlite_url: str) -> None:
    study = _study(sqlite_url, "retries")
    queue.top_up(study, 1)
    for attempt in range(queue.MAX_RETRY + 1):
        t = queue.claim(study)
        assert t is not None, f"attempt {attempt} was not re-queued"
        queue.tell_fail(study, t, "boom")
        queued = queue.requeue(study, study.trials[t.number])
        assert queued == (attempt < queue.MAX_RETRY)
    assert queue.claim(study) is None
    assert [t.system_attrs.get("retry_history") for t in study.trials][-1] == [0, 1]
