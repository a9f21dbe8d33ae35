"""The embedded SQLite storage under parallel workers: WAL, and one claim per trial."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from hposvc.errors import InvalidInputError
from hposvc.storage import open_storage, resolve_storage_url


def _claim_all(url: str, out: "mp.Queue[list[int]]") -> None:
    from hposvc.queue import claim

    study = optuna.load_study(study_name="claims", storage=open_storage(url))
    got = []
    while (trial := claim(study)) is not None:  # what workers claim with
        got.append(trial.number)
    out.put(got)


def test_two_processes_never_claim_the_same_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(study_name="claims", storage=open_storage(url))
    study.add_trials([create_trial(state=TrialState.WAITING) for _ in range(300)])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    claims = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(claims[0]) + len(claims[1]) == 300
    assert not set(claims[0]) & set(claims[1]), "a trial was claimed by both workers"


def test_embedded_database_runs_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    optuna.create_study(study_name="w", storage=open_storage(url))
    with sqlite3.connect(tmp_path / "wal.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_storage_url_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="SQLAlchemy URL"):
        resolve_storage_url("foo://nowhere")
    assert resolve_storage_url(data_dir=tmp_path) == f"sqlite:///{tmp_path.absolute() / 'hposvc.db'}"


_OPEN_AND_CREATE = (
    "import sys, optuna; from hposvc.storage import open_storage; "
    "optuna.create_study(storage=open_storage(sys.argv[1]), study_name=sys.argv[2])"
)


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    # A study run, its workers and a poller may all open a database that does not exist
    # yet; the slower creators of Optuna's tables must not fail (a race a test once lost).
    import subprocess
    import sys

    for round_ in range(4):
        url = f"sqlite:///{tmp_path / f'new{round_}.db'}"
        procs = [
            subprocess.Popen([sys.executable, "-c", _OPEN_AND_CREATE, url, f"s{i}"], stderr=subprocess.PIPE, text=True)
            for i in range(3)
        ]
        errors = [err for p in procs if (err := p.communicate(timeout=120)[1]) and p.returncode]
        assert not errors, errors[0][-800:]
        assert sorted(s.study_name for s in optuna.get_all_study_summaries(url)) == ["s0", "s1", "s2"]
