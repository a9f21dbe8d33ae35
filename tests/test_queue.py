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
    assert queue.top_up(study, 5) == 5
    assert queue.top_up(study, 5) == 0  # idempotent: a resume adds nothing
    claimed = []
    while (t := queue.claim(study)) is not None:
        claimed.append(t)
    assert sorted(t.number for t in claimed) == [0, 1, 2, 3, 4]
    assert records.counts(study)["RUNNING"] == 5 and queue.claim(study) is None
    study.tell(claimed[0], 1.0)
    queue.tell_fail(study, claimed[1], "boom")
    c = records.counts(study)
    assert (c.done, c["FAIL"], c["RUNNING"]) == (1, 1, 3)
    assert study.trials[1].user_attrs[records.REASON] == "boom"
    assert queue.top_up(study, 5) == 1  # the failed trial is replaced, the running ones are not


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
    assert isinstance(queue.backend_of(storage), optuna.storages.RDBStorage)
    assert queue._stale_trial_ids(storage, study_id) == []  # noqa: SLF001  (its heartbeat is fresh)


def test_stale_trials_are_failed_once_and_retried_with_their_parameters(sqlite_url: str) -> None:
    # A storage with a 1 s grace period, as a worker's would be with HPOSVC_GRACE_PERIOD=1.
    storage = optuna.storages.RDBStorage(sqlite_url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="stale", storage=storage)
    queue.top_up(study, 1)
    dead = queue.claim(study)
    dead.suggest_float("lr", 1e-4, 1.0, log=True)
    lr = dead.params["lr"]
    time.sleep(2.5)  # the claim's heartbeat is now older than the grace period

    closed: list[int] = []
    assert len(queue.fail_stale(study, on_stale=lambda t: closed.append(t.number))) == 1
    assert queue.fail_stale(study, on_stale=lambda t: closed.append(t.number)) == []  # only once
    assert closed == [dead.number]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    retry = study.trials[1]
    assert retry.params == {"lr": lr} and retry.system_attrs["failed_trial"] == dead.number


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
