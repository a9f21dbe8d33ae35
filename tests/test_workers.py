"""Many workers: PostgreSQL + a real MLflow server, killed workers, outages, clean stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna
import pytest
from mlflow import MlflowClient

from hposvc.queue import LOOKAHEAD
from hposvc.spec import load_spec
from hposvc.study import prepare_study
from hposvc.tracking import experiment_name, mlflow_client

pytestmark = pytest.mark.slow  # every test runs real studies, most in worker processes

SPEC = """\
[study]
name = "workers"
task = "digits"
n_trials = {n_trials}
sampler = "random"
pruner = "none"
seed = 3

[train]
epochs = {epochs}

[model]
depth = 1
width = 32

[space]
optimizer = ["adam", "momentum"]
lr = {{ low = 1e-3, high = 1e-1, log = true }}
"""

# Fast failure detection for tests: heartbeat every second, stale after three.
FAST_HEARTBEAT = {"HPOSVC_HEARTBEAT_INTERVAL": "1", "HPOSVC_GRACE_PERIOD": "3"}


def _spec(tmp_path: Path, *, n_trials: int, epochs: int) -> Path:
    path = tmp_path / "workers.toml"
    path.write_text(SPEC.format(n_trials=n_trials, epochs=epochs))
    return path


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **FAST_HEARTBEAT, "OMP_NUM_THREADS": "1", **extra}


def _log(tmp_path: Path, name: str):
    """A file for a long-running process's stderr: a pipe nobody reads can fill and block it."""
    return open(tmp_path / f"{name}.stderr", "wb")


def _read(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.stderr").read_text(errors="replace")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hposvc.cli", *args]


def _states(storage: str, name: str = "workers") -> list[optuna.trial.FrozenTrial]:
    # Opening an SQLite storage creates Optuna's tables when they are missing, so a poll
    # that starts before `study run` has created them would race it: read only once the
    # study is there (a read-only look; _wait_for retries until then).
    if storage.startswith("sqlite:///"):
        path = storage.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            if not db.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone():
                raise LookupError(f"study {name!r} not created yet")
    return optuna.load_study(study_name=name, storage=storage).trials


def _wait_for(pred: Callable[[], bool], *, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) while waiting for {what}; see its .stderr file in the test's tmp dir")
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 (storage not ready yet)
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _n_done(storage: str) -> int:
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in _states(storage))


def _trial_runs(uri: str, name: str = "workers") -> list:
    client = mlflow_client(uri)  # (under the lock the tracking process opens the store with)
    exp = client.get_experiment_by_name(experiment_name(name))
    return client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'trial'", max_results=1000)


def test_two_workers_on_postgres_and_mlflow_server(tmp_path: Path, postgres_url: str, mlflow_server) -> None:
    # The multi-host recipe: create the study once, then `hposvc worker NAME --workers N`
    # on each host (here one host, two worker processes).
    spec = _spec(tmp_path, n_trials=6, epochs=4)
    created = subprocess.run(_cli("study", "create", str(spec), "--storage", postgres_url, "--json"), capture_output=True, text=True, timeout=120, env=_env())
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["waiting"] == LOOKAHEAD  # a short queue; workers top it up
    p = subprocess.run(
        _cli("worker", "workers", "--workers", "2", "--storage", postgres_url, "--tracking-uri", mlflow_server.uri, "--quiet", "--json"),
        capture_output=True, text=True, timeout=400, env=_env(),
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n_done"] == 6
    trials = _states(postgres_url)
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    # exact: 6 finished, none started beyond (two workers topping up at the same moment can
    # leave a queued trial that never runs)
    assert len(done) == 6 and len([t for t in trials if t.state.name != "WAITING"]) == 6
    workers = {t.user_attrs["hposvc.worker"] for t in done}
    assert len(workers) == 2, workers
    assert all(t.user_attrs["hposvc.host"] and t.user_attrs["hposvc.device"] == "cpu" for t in done)
    runs = _trial_runs(mlflow_server.uri)
    assert sorted(int(r.data.tags["hposvc.trial_number"]) for r in runs) == sorted(t.number for t in done)
    assert {r.data.tags["hposvc.worker"] for r in runs} == workers


def test_killed_worker_trial_is_failed_and_retried(tmp_path: Path, postgres_url: str) -> None:
    spec = load_spec(_spec(tmp_path, n_trials=4, epochs=150))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_study(spec, storage=postgres_url)
    args = ("--storage", postgres_url, "--tracking-uri", tracking, "--quiet")
    victim = subprocess.Popen(_cli("worker", "workers", *args, "--worker-id", "victim"), env=_env(), stdout=subprocess.DEVNULL, stderr=_log(tmp_path, "victim"))

    def victim_running() -> bool:
        return any(t.state.name == "RUNNING" and t.user_attrs.get("hposvc.worker") == "victim" and t.intermediate_values for t in _states(postgres_url))

    _wait_for(victim_running, timeout=120, what="the victim worker to be in the middle of a trial", proc=victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    # The trial it was running when it died (read after the kill: it may have finished one
    # more trial between our look and the signal).
    running = [t for t in _states(postgres_url) if t.state.name == "RUNNING"]  # the victim was the only worker
    assert len(running) == 1, running
    killed = running[0]

    survivor = subprocess.run(_cli("worker", "workers", *args, "--worker-id", "survivor"), env=_env(), capture_output=True, text=True, timeout=400)
    assert survivor.returncode == 0, survivor.stderr
    trials = _states(postgres_url)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 4
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    failed = next(t for t in trials if t.number == killed.number)
    assert failed.state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == killed.params
    runs = {int(r.data.tags["hposvc.trial_number"]): r for r in _trial_runs(tracking)}
    assert runs[killed.number].info.status == "FAILED"
    assert "no heartbeat" in runs[killed.number].data.tags["hposvc.reason"]
    assert all(r.info.status != "RUNNING" for r in runs.values())
    # What the killed worker wrote to the outbox reached MLflow: every epoch it reported
    # (at least those Optuna stored), each once, and its config.
    client = MlflowClient(tracking)
    steps = [m.step for m in client.get_metric_history(runs[killed.number].info.run_id, "val_accuracy")]
    assert steps == list(range(1, len(steps) + 1)) and set(killed.intermediate_values) <= set(steps)
    assert runs[killed.number].data.params["optimizer"] == killed.params["optimizer"]
    assert sorted(runs) == sorted(t.number for t in trials if t.state.name != "WAITING")  # one run each


def test_mlflow_outage_loses_nothing(tmp_path: Path, mlflow_server) -> None:
    spec = _spec(tmp_path, n_trials=8, epochs=60)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.Popen(
        _cli("study", "run", str(spec), "--storage", storage, "--tracking-uri", mlflow_server.uri, "--quiet"),
        env=_env(), stdout=subprocess.DEVNULL, stderr=_log(tmp_path, "run"),
    )
    _wait_for(lambda: _n_done(storage) >= 2, timeout=180, what="two trials", proc=proc)
    mlflow_server.stop()
    _wait_for(lambda: _n_done(storage) >= 5, timeout=180, what="trials during the outage", proc=proc)
    mlflow_server.start()
    proc.wait(timeout=400)
    assert proc.returncode == 0, _read(tmp_path, "run")
    done = [t for t in _states(storage) if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 8
    # Whatever the end of the run could not send, `hposvc sync` sends.
    sync = subprocess.run(_cli("sync", "--tracking-uri", mlflow_server.uri), env=_env(), capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr
    runs = {int(r.data.tags["hposvc.trial_number"]): r for r in _trial_runs(mlflow_server.uri)}
    assert sorted(runs) == sorted(t.number for t in done)
    client = MlflowClient(mlflow_server.uri)
    for t in done:
        r = runs[t.number]
        assert r.info.status in ("FINISHED", "KILLED")
        history = client.get_metric_history(r.info.run_id, "val_accuracy")
        assert [m.step for m in history] == sorted(t.intermediate_values)


def test_postgres_restart_during_study(tmp_path: Path, postgres_url: str, pg_server) -> None:
    spec = _spec(tmp_path, n_trials=6, epochs=40)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(
        _cli("study", "run", str(spec), "--workers", "2", "--storage", postgres_url, "--tracking-uri", tracking, "--quiet"),
        env=_env(), stdout=subprocess.DEVNULL, stderr=_log(tmp_path, "run"),
    )
    _wait_for(lambda: _n_done(postgres_url) >= 1, timeout=180, what="a first trial", proc=proc)
    pg_server.restart()
    proc.wait(timeout=400)
    assert proc.returncode == 0, _read(tmp_path, "run")
    trials = _states(postgres_url)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 6
    # A queued trial may stay WAITING (the short queue tops up ahead; a claim past n_trials
    # goes back), but none is left RUNNING.
    assert not [t for t in trials if t.state.name == "RUNNING"]


def test_sigterm_stops_cleanly_and_rerun_completes(tmp_path: Path) -> None:
    # Trials of a few seconds each, so the poll below reliably sees one in flight even on
    # a fast machine (at 40 epochs a trial lasted under half a second and CI missed it).
    spec = _spec(tmp_path, n_trials=6, epochs=300)
    data = tmp_path / "data"
    storage = f"sqlite:///{data / 'hposvc.db'}"
    cmd = _cli("study", "run", str(spec), "--workers", "2", "--data-dir", str(data), "--quiet")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=_log(tmp_path, "run"))
    _wait_for(lambda: any(t.state.name == "RUNNING" and t.intermediate_values for t in _states(storage)), timeout=180, what="a trial in flight", proc=proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 143, _read(tmp_path, "run")
    trials = _states(storage)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert interrupted and all(t.user_attrs["hposvc.reason"].startswith("interrupted") for t in interrupted)
    # the interrupted trials' ends are in the outbox; `hposvc sync` waits until MLflow has them
    sync = subprocess.run(_cli("sync", "--data-dir", str(data)), env=_env(), capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr
    runs = _trial_runs(f"sqlite:///{data / 'mlflow.db'}")
    assert {int(r.data.tags["hposvc.trial_number"]) for r in runs} == {t.number for t in trials if t.state.name != "WAITING"}
    assert all(r.info.status != "RUNNING" for r in runs)

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert _n_done(storage) == 6


def test_a_dead_workers_run_is_closed_through_an_mlflow_outage(tmp_path: Path, mlflow_server) -> None:
    # The survivor finds the dead worker's trial stale while MLflow is down: the closing
    # waits in the outbox and the next sync sends it, so the run does not stay RUNNING.
    from hposvc.config import TrialConfig
    from hposvc.tracking import Tracker

    study = optuna.create_study(study_name="stale", storage=f"sqlite:///{tmp_path / 'study.db'}")
    tracker = Tracker(mlflow_server.uri, study="stale", uid="u1", data_dir=tmp_path)
    tracker.start_study(spec={})
    died_with_run, died_before_run = study.ask(), study.ask()
    tracker.start_trial(died_with_run.number, TrialConfig(optimizer="adam", lr=1e-3))
    assert tracker.wait(timeout=60)
    (run_id,) = [r.info.run_id for r in _trial_runs(mlflow_server.uri, "stale")]

    mlflow_server.stop()
    for t in study.trials:
        tracker.close_stale_trial(t)
    assert not tracker.wait(timeout=60)  # MLflow is down: the closings wait in the outbox
    assert tracker.folder.pending() > 0
    mlflow_server.start()

    sync = subprocess.run(_cli("sync", "--data-dir", str(tmp_path), "--tracking-uri", mlflow_server.uri), env=_env(), capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr
    runs = {int(r.data.tags["hposvc.trial_number"]): r for r in _trial_runs(mlflow_server.uri, "stale")}
    assert sorted(runs) == [died_with_run.number, died_before_run.number]
    assert runs[died_with_run.number].info.run_id == run_id  # closed, not duplicated
    for r in runs.values():
        assert r.info.status == "FAILED"
        assert r.data.tags["hposvc.state"] == "FAIL" and "no heartbeat" in r.data.tags["hposvc.reason"]
        assert r.data.tags["hposvc.study_uid"] == "u1"  # how replays and queries find it
    assert tracker.folder.pending() == 0
