"""The study service end to end: spec → Optuna (SQLite / PostgreSQL) → MLflow → results/CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import hposvc
from contract_spec import CONTRACT_SPEC
from hposvc.cli import main
from hposvc.tracking import experiment_name

ROOT = Path(__file__).resolve().parents[1]



def _write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _trial_runs(client: MlflowClient, study: str) -> list:
    exp = client.get_experiment_by_name(experiment_name(study))
    assert exp is not None, f"no MLflow experiment for {study}"
    return client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'trial'", max_results=1000)


def _parent_runs(client: MlflowClient, study: str) -> list:
    exp = client.get_experiment_by_name(experiment_name(study))
    return client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'study'")


@pytest.mark.slow
def test_contract_spec_end_to_end_on_sqlite(tmp_path: Path) -> None:
    spec = _write(tmp_path, CONTRACT_SPEC)
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["n_done"] == 12 and run["ran"] == 12

    storage = f"sqlite:///{data / 'hposvc.db'}"
    study = optuna.load_study(study_name="digits-quick", storage=storage)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 12 and len(study.trials) == 12
    assert study.best_value >= 0.9

    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    runs = _trial_runs(client, "digits-quick")  # there when `study run` returns
    assert len(runs) == 12
    # the parent run's summary and plots follow a moment later; `hposvc sync` waits for them
    synced = CliRunner().invoke(main, ["sync", "--data-dir", str(data)])
    assert synced.exit_code == 0, synced.output
    assert sorted(int(r.data.tags["hposvc.trial_number"]) for r in runs) == list(range(12))
    parent = _parent_runs(client, "digits-quick")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in runs)
    by_number = {int(r.data.tags["hposvc.trial_number"]): r for r in runs}
    for t in finished:
        r = by_number[t.number]
        expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        assert r.info.status == expected
        assert r.data.tags["hposvc.state"] == t.state.name
        assert r.data.params["optimizer"] == t.user_attrs["hposvc.config"]["optimizer"]
        history = client.get_metric_history(r.info.run_id, "val_accuracy")
        assert [m.step for m in history] == sorted(t.intermediate_values)
        assert [m.value for m in history] == pytest.approx([t.intermediate_values[s] for s in sorted(t.intermediate_values)])
    # The parent run carries the best value, the best config and plots.
    best = hposvc.best_config("digits-quick", storage=storage)
    assert parent[0].data.metrics["best_value"] == pytest.approx(best.value)
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"best_config.json", "spec.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent[0].info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots

    # hposvc's answers match plain Optuna and MLflow's client.
    assert best.value == pytest.approx(study.best_value)
    assert best.trial_number == study.best_trial.number
    assert best.config.to_dict() == study.best_trial.user_attrs["hposvc.config"]
    df = hposvc.trials("digits-quick", storage=storage)
    assert len(df) == 12
    assert set(df["optimizer"]) <= {"sgd", "momentum", "adam", "rmsprop"}
    for row in df.itertuples():
        r = by_number[row.number]
        assert r.data.params["lr"] == str(row.lr)
        if row.state == "COMPLETE":
            assert r.data.metrics["final_val_accuracy"] == pytest.approx(row.value)

    # The CLI read commands agree and offer JSON.
    out = CliRunner().invoke(main, ["best", "digits-quick", "--data-dir", str(data), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["value"] == pytest.approx(best.value)
    out = CliRunner().invoke(main, ["study", "show", "digits-quick", "--data-dir", str(data), "--json"])
    assert len(json.loads(out.stdout)) == 12
    out = CliRunner().invoke(main, ["study", "list", "--data-dir", str(data), "--json"])
    listed = json.loads(out.stdout)
    assert listed[0]["name"] == "digits-quick" and listed[0]["complete"] + listed[0]["pruned"] == 12

    # Plain Optuna's own CLI reads it as a normal study.
    optuna_cli = str(Path(sys.executable).with_name("optuna"))  # the script Optuna installs
    p = subprocess.run([optuna_cli, "trials", "--study-name", "digits-quick", "--storage", storage, "-f", "json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(r["number"] for r in json.loads(p.stdout)) == list(range(12))

    # Running again is a no-op: the study already has its trials.
    again = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["ran"] == 0
    assert len(_trial_runs(client, "digits-quick")) == 12


def test_export_and_delete(tmp_path: Path) -> None:
    spec = _write(tmp_path, CONTRACT_SPEC.replace("n_trials = 12", "n_trials = 2").replace("epochs = 10", "epochs = 2"))
    data = tmp_path / "data"
    assert CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"]).exit_code == 0
    for fmt in ("csv", "parquet", "json"):
        out = tmp_path / f"trials.{fmt}"
        r = CliRunner().invoke(main, ["study", "export", "digits-quick", "--format", fmt, "--out", str(out), "--data-dir", str(data)])
        assert r.exit_code == 0, r.output
        import pandas as pd

        df = {"csv": pd.read_csv, "parquet": pd.read_parquet, "json": pd.read_json}[fmt](out)
        assert len(df) == 2 and "optimizer" in df.columns
    r = CliRunner().invoke(main, ["study", "delete", "digits-quick", "--data-dir", str(data)], input="n\n")
    assert r.exit_code == 1  # declined
    r = CliRunner().invoke(main, ["study", "delete", "digits-quick", "--yes", "--data-dir", str(data)])
    assert r.exit_code == 0
    r = CliRunner().invoke(main, ["best", "digits-quick", "--data-dir", str(data)])
    assert r.exit_code == 2 and "digits-quick" in r.stderr


def test_different_spec_under_same_name_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small = CONTRACT_SPEC.replace("n_trials = 12", "n_trials = 1").replace("epochs = 10", "epochs = 1")
    assert CliRunner().invoke(main, ["study", "run", str(_write(tmp_path, small)), "--data-dir", str(data), "--quiet"]).exit_code == 0
    other = _write(tmp_path, small.replace('"adam", "rmsprop"]', '"adam"]'), "other.toml")
    r = CliRunner().invoke(main, ["study", "run", str(other), "--data-dir", str(data), "--quiet"])
    assert r.exit_code == 2
    assert "different spec" in r.stderr and "--name" in r.stderr
    # A larger --n-trials is the same spec: it resumes.
    r = CliRunner().invoke(main, ["study", "run", str(_write(tmp_path, small)), "--n-trials", "2", "--data-dir", str(data), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ran"] == 1


def _storage_snapshot(data: Path) -> list[str]:
    return sorted(str(p.relative_to(data)) for p in data.rglob("*")) if data.exists() else []


BAD_SPECS = {
    "unknown key": (CONTRACT_SPEC.replace("seed = 0", "seed = 0\nsamplr = 'tpe'"), ["samplr"]),
    "wrong type": (CONTRACT_SPEC.replace("n_trials = 12", 'n_trials = "twelve"'), ["n_trials", "twelve"]),
    "unknown optimizer": (CONTRACT_SPEC.replace('"rmsprop"]', '"rmsprops"]'), ["optimizer", "rmsprops", "adamw"]),
    "unknown init": (CONTRACT_SPEC.replace('"he_normal"]', '"he_normall"]'), ["init", "he_normall", "xavier_normal"]),
    "unknown norm": (CONTRACT_SPEC.replace('norm = ["none", "batch"]', 'norm = ["none", "batchnorm"]'), ["norm", "batchnorm", "group"]),
    "unknown activation": (CONTRACT_SPEC.replace('"tanh"]', '"tanhh"]'), ["activation", "tanhh", "gelu"]),
    "unknown task": (CONTRACT_SPEC.replace('task = "digits"', 'task = "digitz"'), ["task", "digitz", "mnist1d"]),
    "empty range": (CONTRACT_SPEC.replace("low = 1e-4, high = 0.5", "low = 0.5, high = 0.5"), ["lr", "0.5"]),
    "lr <= 0": (CONTRACT_SPEC.replace("low = 1e-4, high = 0.5, log = true", "low = -1.0, high = 0.5"), ["lr", "-1.0"]),
    "toml syntax": (CONTRACT_SPEC.replace("n_trials = 12", "n_trials = = 12"), ["line"]),
    "grid smaller than n_trials": (
        CONTRACT_SPEC.replace('sampler = "tpe"', 'sampler = "grid"').replace("lr = { low = 1e-4, high = 0.5, log = true }", "lr = [0.01, 0.1]").replace("n_trials = 12", "n_trials = 5000"),
        ["n_trials", "5000", "points of this grid"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_exits_2_and_writes_nothing(tmp_path: Path, case: str) -> None:
    text, needles = BAD_SPECS[case]
    spec = _write(tmp_path, text)
    data = tmp_path / "data"
    for command in ("validate", "run"):
        args = ["study", command, str(spec)] + (["--data-dir", str(data), "--quiet"] if command == "run" else [])
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (case, r.output)
        assert str(spec) in r.stderr, r.stderr
        for needle in needles:
            assert needle in r.stderr, (needle, r.stderr)
        assert r.stdout == ""
    assert _storage_snapshot(data) == []


def test_bad_spec_as_subprocess(tmp_path: Path) -> None:
    spec = _write(tmp_path, BAD_SPECS["unknown optimizer"][0])
    data = tmp_path / "data"
    p = subprocess.run([sys.executable, "-m", "hposvc.cli", "study", "run", str(spec), "--data-dir", str(data)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "rmsprops" in p.stderr and str(spec) in p.stderr and p.stdout == ""
    assert _storage_snapshot(data) == []


@pytest.mark.slow
def test_sigint_then_resume_gives_exactly_n_trials(tmp_path: Path) -> None:
    text = CONTRACT_SPEC.replace("n_trials = 12", "n_trials = 8").replace("epochs = 10", "epochs = 150").replace('pruner = "median"', 'pruner = "none"')
    spec = _write(tmp_path, text)
    data = tmp_path / "data"
    storage = f"sqlite:///{data / 'hposvc.db'}"
    cmd = [sys.executable, "-m", "hposvc.cli", "study", "run", str(spec), "--data-dir", str(data), "--quiet"]
    env = {**os.environ, "HPOSVC_HEARTBEAT_INTERVAL": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # Interrupt once at least two trials are done, i.e. in the middle of a later one.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if proc.poll() is not None:
            raise AssertionError(f"the study ended ({proc.returncode}) before it could be interrupted:\n{proc.stderr.read().decode()[-3000:]}")
        if (data / "hposvc.db").exists():
            try:
                done = [t for t in optuna.load_study(study_name="digits-quick", storage=storage).trials if t.state.name in ("COMPLETE", "PRUNED")]
            except Exception:  # noqa: BLE001 (study not created yet)
                continue
            if len(done) >= 2:
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    study = optuna.load_study(study_name="digits-quick", storage=storage)
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states
    assert 2 <= states.count("COMPLETE") < 8

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr
    study = optuna.load_study(study_name="digits-quick", storage=storage)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 8
    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    runs = _trial_runs(client, "digits-quick")
    numbers = [int(r.data.tags["hposvc.trial_number"]) for r in runs]
    assert len(numbers) == len(set(numbers)), "a trial has two MLflow runs"
    assert all(r.info.status != "RUNNING" for r in runs)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    for t in failed:
        assert t.user_attrs["hposvc.reason"].startswith("interrupted")


@pytest.mark.slow
def test_quickstart_against_mlflow_server(tmp_path: Path, mlflow_server) -> None:
    spec = _write(tmp_path, CONTRACT_SPEC.replace("n_trials = 12", "n_trials = 4").replace("epochs = 10", "epochs = 3"))
    data = tmp_path / "data"
    r = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--tracking-uri", mlflow_server.uri, "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    client = MlflowClient(mlflow_server.uri)
    runs = _trial_runs(client, "digits-quick")
    assert len(runs) == 4
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    assert all(client.get_metric_history(r.info.run_id, "val_loss") for r in runs)
    synced = CliRunner().invoke(main, ["sync", "--data-dir", str(data), "--tracking-uri", mlflow_server.uri])
    assert synced.exit_code == 0, synced.output
    parent = _parent_runs(client, "digits-quick")
    assert parent[0].info.status == "FINISHED"
    assert {"best_config.json", "spec.json"} <= {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    from hposvc.outbox import folder_for

    assert folder_for(data, mlflow_server.uri).pending() == 0  # every record sent
    # study run ends by pointing at the study's runs page on the server (the dashboard's link)
    exp_id = client.get_experiment_by_name(experiment_name("digits-quick")).experiment_id
    assert f"Inspect it in MLflow: {mlflow_server.uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning&orderByKey=" in r.stderr


def test_python_api_round_trip(tmp_path: Path) -> None:
    spec = {
        "study": {"name": "api", "task": "moons", "n_trials": 3, "sampler": "random", "seed": 1},
        "train": {"epochs": 3},
        "space": {"optimizer": ["adam", "sgd"], "lr": {"low": 1e-3, "high": 1e-1, "log": True}},
    }
    run = hposvc.run_study(spec, data_dir=tmp_path)
    assert run.n_done == 3 and run.best_value is not None
    best = hposvc.best_config("api", storage=run.storage)
    t = hposvc.build_training(best.config, "moons", seed=1)
    out = t.model(t.task.x_train[:5].to(t.device))
    assert out.shape[0] == 5
    t.optimizer.zero_grad()
    out.sum().backward()
    t.optimizer.step()
    summary = hposvc.studies(storage=run.storage)
    assert list(summary["name"]) == ["api"]


def test_a_signal_a_library_wraps_still_stops_the_worker(tmp_path: Path) -> None:
    # SIGTERM can land inside a storage write and come out of SQLAlchemy and Optuna as a
    # StorageInternalError (seen in CI). That must stop the worker like any SIGTERM, not
    # fail one trial as a storage error and go on with the next.
    import sqlalchemy
    from sqlalchemy import event

    from hposvc.storage import open_storage
    from hposvc.errors import Interrupted

    spec = {
        "study": {"name": "wrapped", "task": "moons", "n_trials": 4, "sampler": "random", "pruner": "none", "seed": 1},
        "train": {"epochs": 6},
        "space": {"optimizer": ["adam", "sgd"], "lr": {"low": 1e-3, "high": 1e-1, "log": True}},
    }
    storage = f"sqlite:///{tmp_path / 'hposvc.db'}"
    reports = []

    def signal_inside_the_write(conn, cursor, statement, *args) -> None:
        # (the first trial's epochs, stored by its flush before its result is told: a signal
        # is handled in the main thread)
        if statement.startswith("INSERT INTO trial_intermediate_values") and threading.current_thread() is threading.main_thread():
            reports.append(statement)
            if len(reports) == 1:
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler raises Interrupted here
                except Interrupted:
                    raise sqlalchemy.exc.OperationalError(statement, None, Exception("disk I/O error")) from None

    engine = open_storage(storage).engine
    event.listen(engine, "after_cursor_execute", signal_inside_the_write)
    try:
        with pytest.raises(Interrupted):
            hposvc.run_study(spec, storage=storage, data_dir=tmp_path)
    finally:
        event.remove(engine, "after_cursor_execute", signal_inside_the_write)
    started = [t for t in optuna.load_study(study_name="wrapped", storage=storage).trials if t.state.name != "WAITING"]
    assert [t.state.name for t in started] == ["FAIL"], "the worker went on after SIGTERM"
    assert started[0].user_attrs["hposvc.reason"].startswith("interrupted")
    assert len(reports) == 1


def test_ui_serves_the_configured_store(tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hposvc.cli", "ui", "--data-dir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("hposvc ui did not come up")
        assert (tmp_path / "mlflow.db").exists()  # the embedded store of this data dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_study_records_the_versions_that_made_it(tmp_path: Path) -> None:
    from importlib.metadata import version

    spec = {"study": {"name": "versioned", "task": "moons", "n_trials": 1, "pruner": "none"}, "train": {"epochs": 1}, "space": {"optimizer": "adam"}}
    hposvc.run_study(spec, data_dir=tmp_path)
    stored = optuna.load_study(study_name="versioned", storage=f"sqlite:///{tmp_path / 'hposvc.db'}").user_attrs["hposvc.versions"]
    assert stored["hposvc"] == version("hposvc") and stored["torch"] == version("torch")
    assert set(stored) == {"hposvc", "torch", "optuna", "mlflow", "python"}
    assert hposvc.studies(storage=f"sqlite:///{tmp_path / 'hposvc.db'}")["hposvc_version"].tolist() == [version("hposvc")]


def test_enqueued_configs_are_queued_once_and_not_again_on_resume(tmp_path: Path) -> None:
    from hposvc.config import TrialConfig
    from hposvc.spec import parse_spec
    from hposvc.study import prepare_study

    spec = parse_spec({"study": {"name": "enq", "task": "moons", "n_trials": 6, "sampler": "random"},
                       "space": {"optimizer": ["adam", "sgd"], "lr": {"low": 1e-3, "high": 1e-1, "log": True}}})
    configs = [TrialConfig(optimizer=o, lr=1e-2, width=32) for o in ("adam", "sgd", "adam")]
    storage = f"sqlite:///{tmp_path / 'enq.db'}"

    def fixed() -> list[dict]:
        study = optuna.load_study(study_name="enq", storage=storage)
        return [t.system_attrs["fixed_params"] for t in study.trials if "fixed_params" in t.system_attrs]

    prepare_study(spec, storage=storage, enqueue=configs)
    assert [p["optimizer"] for p in fixed()] == ["adam", "sgd"]  # the repeated config once
    prepare_study(spec, storage=storage, enqueue=[*configs, TrialConfig(optimizer="sgd", lr=3e-2, width=32)])
    assert [(p["optimizer"], p["lr"]) for p in fixed()] == [("adam", 1e-2), ("sgd", 1e-2), ("sgd", 3e-2)]  # a resume adds only the new one
