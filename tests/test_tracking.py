"""Tracking through the outbox: training writes records, the tracking process sends them.

Real processes and a real MLflow server: the tracking process killed with SIGKILL, MLflow
down for a whole study, the tracking process started before or after the worker, two
workers sharing one. Every test counts MLflow's runs and metric steps exactly: nothing lost,
nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna
import pytest
from mlflow import MlflowClient

from hposvc.config import TrialConfig
from hposvc.drain import Drain, drain_once
from hposvc.outbox import DrainState, folder_for
from hposvc.tracking import Tracker, experiment_name, tracking_process_pid

SPEC = """\
[study]
name = "tracked"
task = "moons"
n_trials = {n_trials}
sampler = "random"
pruner = "none"
seed = 5

[train]
epochs = {epochs}

[model]
depth = 1
width = 16

[space]
optimizer = ["adam", "momentum"]
lr = {{ low = 1e-3, high = 1e-1, log = true }}
"""


def _spec(tmp_path: Path, *, n_trials: int = 6, epochs: int = 6) -> Path:
    path = tmp_path / "tracked.toml"
    path.write_text(SPEC.format(n_trials=n_trials, epochs=epochs))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hposvc.cli", *args]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _wait_for(pred: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 (a file or table not there yet)
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def assert_mlflow_holds_study(uri: str, storage: str, name: str = "tracked") -> list:
    """MLflow has exactly one run per started trial, each with exactly the trial's epochs
    as metric steps (no step twice), the trial's status, and one parent run."""
    trials = [t for t in optuna.load_study(study_name=name, storage=storage).trials if t.state.name != "WAITING"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name(name))
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'trial'", max_results=1000)
    numbers = [int(r.data.tags["hposvc.trial_number"]) for r in runs]
    assert sorted(numbers) == sorted(t.number for t in trials), "a trial has no run, or two"
    by_number = dict(zip(numbers, runs))
    for t in trials:
        run = by_number[t.number]
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[t.state.name]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        if t.state.name == "FAIL":
            assert len(steps) == len(set(steps)) and set(t.intermediate_values) <= set(steps)
        else:
            assert steps == sorted(t.intermediate_values), f"trial {t.number}: steps {steps}"
        assert run.data.params["optimizer"] == t.params["optimizer"]
        assert "config.json" in [a.path for a in client.list_artifacts(run.info.run_id)]  # through the server's artifact proxy
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'study'")
    assert len(parents) == 1
    return runs


def test_records_sent_twice_make_no_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tracking process killed after sending but before saving its cursors: the next one
    # sends the same records again, including a run it created but had not noted yet.
    monkeypatch.setattr("hposvc.tracking.PROCESS_MODE", "external")  # drained here, below
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, study="tracked", uid="u1", data_dir=tmp_path)
    tracker.start_study(spec={"study": {"name": "tracked"}})
    for number in (0, 1):
        run = tracker.start_trial(number, TrialConfig(optimizer="adam", lr=1e-3))
        for epoch in (1, 2, 3):
            run.log_epoch({"val_accuracy": 0.5 + epoch / 10, "val_loss": 1.0 / epoch}, step=epoch)
        if number == 0:
            run.end("COMPLETE", metrics={"final_val_accuracy": 0.8})

    class DiesBeforeItsCursorsAreSaved(Drain):
        def _save(self, **kwargs: object) -> None:
            raise KeyboardInterrupt  # as a kill -9 would: only what was saved before stays

    with pytest.raises(KeyboardInterrupt):
        DiesBeforeItsCursorsAreSaved(tracker.folder).run_pass()
    assert not DrainState.load(tracker.folder.state_file).offsets  # nothing noted as sent
    assert drain_once(tracker.folder)[1] == 0  # so all of it is sent again

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name("tracked"))
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'trial'")
    assert sorted(r.data.tags["hposvc.trial_number"] for r in runs) == ["0", "1"]
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")] == [1, 2, 3]
        assert sorted(a.path for a in client.list_artifacts(r.info.run_id)) == ["config.json"]
    assert {r.data.tags["hposvc.trial_number"]: r.info.status for r in runs} == {"0": "FINISHED", "1": "RUNNING"}
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'study'")) == 1


@pytest.mark.slow
def test_tracking_process_killed_mid_study(tmp_path: Path, mlflow_server) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    data = tmp_path / "data"
    folder = folder_for(data, mlflow_server.uri)
    proc = subprocess.Popen(
        _cli("study", "run", str(_spec(tmp_path, n_trials=8, epochs=30)), "--storage", storage, "--data-dir", str(data), "--tracking-uri", mlflow_server.uri, "--quiet"),
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    # once it has sent something (a cursor moved), kill it
    _wait_for(lambda: any(DrainState.load(folder.state_file).offsets.values()), timeout=120, what="the tracking process to send records")
    first = tracking_process_pid(folder)
    assert first and first > 0
    os.kill(first, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    # the study's end waited for a new tracking process, which resumed from the outbox
    assert folder.log_file.read_text().count("started") == 2
    assert_mlflow_holds_study(mlflow_server.uri, storage)


@pytest.mark.slow
def test_mlflow_down_for_the_whole_study_then_up(tmp_path: Path, mlflow_server) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    data = tmp_path / "data"
    mlflow_server.stop()
    run = subprocess.run(
        _cli("study", "run", str(_spec(tmp_path)), "--storage", storage, "--data-dir", str(data), "--tracking-uri", mlflow_server.uri, "--quiet", "--json"),
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["n_done"] == 6  # training never waited for MLflow
    assert "unreachable" in run.stderr and "hposvc sync" in run.stderr
    assert folder_for(data, mlflow_server.uri).pending() > 0
    mlflow_server.start()
    sync = subprocess.run(_cli("sync", "--data-dir", str(data), "--tracking-uri", mlflow_server.uri), env=_env(), capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stderr
    assert_mlflow_holds_study(mlflow_server.uri, storage)
    assert folder_for(data, mlflow_server.uri).pending() == 0


@pytest.mark.slow
def test_tracking_process_first_then_two_workers_share_it(tmp_path: Path, mlflow_server) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    data = tmp_path / "data"
    folder = folder_for(data, mlflow_server.uri)
    serve = subprocess.Popen(_cli("sync", "--serve", "--data-dir", str(data), "--tracking-uri", mlflow_server.uri), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: tracking_process_pid(folder) == serve.pid, timeout=60, what="the tracking process")
        run = subprocess.run(
            _cli("study", "run", str(_spec(tmp_path)), "--workers", "2", "--storage", storage, "--data-dir", str(data), "--tracking-uri", mlflow_server.uri, "--quiet"),
            env=_env(), capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert tracking_process_pid(folder) == serve.pid  # the same one all along
        assert not folder.log_file.exists()  # nobody tried to start another
        runs = assert_mlflow_holds_study(mlflow_server.uri, storage)
        assert len({r.data.tags["hposvc.worker"] for r in runs}) == 2  # both workers' trials, through it
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)


@pytest.mark.slow
def test_worker_first_then_tracking_process(tmp_path: Path, mlflow_server) -> None:
    # A worker that never starts one (HPOSVC_TRACKING_PROCESS=external, as with a sidecar)
    # trains while its records pile up; the tracking process started later sends them all.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    data = tmp_path / "data"
    folder = folder_for(data, mlflow_server.uri)
    proc = subprocess.Popen(
        _cli("study", "run", str(_spec(tmp_path, n_trials=6, epochs=40)), "--storage", storage, "--data-dir", str(data), "--tracking-uri", mlflow_server.uri, "--quiet"),
        env=_env(HPOSVC_TRACKING_PROCESS="external"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    study_done = lambda: sum(t.state.name == "COMPLETE" for t in optuna.load_study(study_name="tracked", storage=storage).trials)  # noqa: E731
    _wait_for(lambda: study_done() >= 2, timeout=120, what="two trials")
    assert tracking_process_pid(folder) is None and folder.pending() > 0
    serve = subprocess.Popen(_cli("sync", "--serve", "--data-dir", str(data), "--tracking-uri", mlflow_server.uri), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        assert_mlflow_holds_study(mlflow_server.uri, storage)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    # MLflow creates and migrates an SQLite store's tables when a client opens it; without
    # hposvc's lock, processes doing that at once fail on each other's half-made schema
    # (the tracking process and `hposvc report` on a new data directory, for instance).
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    code = "import sys; from hposvc.tracking import mlflow_client; print(len(mlflow_client(sys.argv[1]).search_experiments()))"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.strip() == "1"  # MLflow's Default experiment, made once
