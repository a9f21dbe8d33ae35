"""Shared fixtures: isolated data dirs, SQLite and PostgreSQL storages, a real MLflow server.

Nothing here is mocked. PostgreSQL is a throw-away cluster: the one named by the
variables below when they are set, else one this test session starts itself from Debian's
``postgresql-15`` binaries (initdb as user ``postgres`` in a temp dir, a free loopback
port, stopped and removed at the end). The MLflow server is a real ``mlflow server``
process that each test using it gets on its own loopback port.

Environment variables read:
    HPOSVC_TEST_POSTGRES_URL   postgresql+psycopg://postgres@127.0.0.1:PORT/hposvc_test
    HPOSVC_TEST_PG_BIN         PostgreSQL's bin dir (pg_ctl), for ``pg_server.restart()``
    HPOSVC_TEST_PG_DATA        the cluster's data directory
Set for the whole session (and inherited by every subprocess a test starts):
    OMP_NUM_THREADS=MKL_NUM_THREADS=1, MPLBACKEND=Agg, MLFLOW_DISABLE_TELEMETRY=true,
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, NO_PROXY+=127.0.0.1,localhost, and short MLflow
    HTTP retries/timeouts (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, _BACKOFF_FACTOR=1,
    _TIMEOUT=10) so an MLflow outage shows within a few seconds.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
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
# 4) Loopback servers must never be reached through a proxy from the environment.
_no_proxy = [p for p in os.environ.get("NO_PROXY", "").split(",") if p]
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join([*_no_proxy, "127.0.0.1", "localhost"])

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads at import)

torch.set_num_threads(1)

POSTGRES_URL_ENV = "HPOSVC_TEST_POSTGRES_URL"


def _pg_bin_dir() -> Path | None:
    """PostgreSQL 15's bin dir from Debian's package list (``dpkg -L postgresql-15``)."""
    try:
        files = subprocess.run(["dpkg", "-L", "postgresql-15"], capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    initdb = [f for f in files if f.endswith("/bin/initdb")]
    return Path(initdb[0]).parent if initdb else None


def _start_session_postgres() -> tuple[Path, Path] | None:
    """Start a throw-away PostgreSQL cluster for this session; set the three variables.

    Returns (root dir, bin dir) to stop it later, or None when the variables were set
    already (``.ci/run`` or a developer's own server). Fails loudly when PostgreSQL is not
    installed: the multi-worker backend must be tested, not skipped.
    """
    import tempfile

    if os.environ.get(POSTGRES_URL_ENV):
        return None
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        raise pytest.UsageError(
            "PostgreSQL 15 is not installed (dpkg -L postgresql-15 finds no initdb). "
            "Install it (apt-get install postgresql-15) or run `bash .ci/run`, which does."
        )
    root = Path(tempfile.mkdtemp(prefix="hposvc-test-pg."))
    data = root / "data"
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--home-dir", "/var/lib/postgresql", "postgres"], check=True)
        os.chown(root, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    os.chmod(root, 0o700)
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync")
    # Settings in the config file, so the tests' `pg_ctl restart` keeps them; fsync off: a
    # throw-away cluster need not survive a power cut.
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
            "max_connections = 300\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
    run(str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60")
    run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "hposvc_test")
    os.environ[POSTGRES_URL_ENV] = f"postgresql+psycopg://postgres@127.0.0.1:{port}/hposvc_test"
    os.environ["HPOSVC_TEST_PG_BIN"] = str(bin_dir)
    os.environ["HPOSVC_TEST_PG_DATA"] = str(data)
    return root, bin_dir


_SESSION_PG: tuple[Path, Path] | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _SESSION_PG
    _SESSION_PG = _start_session_postgres()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SESSION_PG is None:
        return
    import shutil

    root, bin_dir = _SESSION_PG
    data = root / "data"
    cmd = [str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, capture_output=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)
PG_BIN_ENV = "HPOSVC_TEST_PG_BIN"
PG_DATA_ENV = "HPOSVC_TEST_PG_DATA"
_RUN_CI = "Run the tests with `bash .ci/run` (it installs and starts a throw-away PostgreSQL)."


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: this test needs the PostgreSQL server. {_RUN_CI}", pytrace=False)
    return value


# --- isolation and local storage -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_hposvc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data dir; a developer's storage/tracking settings never leak in."""
    for name in ("HPOSVC_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "hposvc-data"
    monkeypatch.setenv("HPOSVC_DATA_DIR", str(data))
    return data


@pytest.fixture
def data_dir(_isolated_hposvc_env: Path) -> Path:
    """This test's data dir (``$HPOSVC_DATA_DIR``, under tmp_path); not created yet."""
    return _isolated_hposvc_env


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite storage URL in tmp_path, e.g. ``sqlite:////tmp/.../study.db``."""
    return f"sqlite:///{tmp_path / 'study.db'}"


# --- PostgreSQL ---------------------------------------------------------------------------------


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
    raise RuntimeError(f"cannot connect to PostgreSQL at {parsed.render_as_string()}: {last}. {_RUN_CI}") from last


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test; dropped afterwards.

    Made from ``$HPOSVC_TEST_POSTGRES_URL`` (``bash .ci/run`` sets it); the test FAILS without
    it, since a skipped PostgreSQL test would hide a broken multi-worker backend.
    """
    from psycopg import sql
    from sqlalchemy.engine import make_url

    base = _require_env(POSTGRES_URL_ENV)
    name = f"hposvc_t_{uuid.uuid4().hex[:12]}"
    with _pg_connect(base) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE ends what workers of the test left connected (PostgreSQL 13+).
        with _pg_connect(base) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class PgServer:
    """Control of the test PostgreSQL server (the one behind every ``postgres_url``)."""

    bin_dir: Path  # PostgreSQL's bin dir, holding pg_ctl
    data_dir: Path  # the cluster; its owner is the OS user pg_ctl runs as

    @property
    def log_file(self) -> Path:
        # .ci/run starts the server with this log too, so one file tells the whole story.
        return self.data_dir / "server.log"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / "pg_ctl"), *args, "-D", str(self.data_dir)]
        owner = self.data_dir.stat().st_uid
        if os.geteuid() == 0 and owner != 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result

    def is_running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def restart(self) -> None:
        """Restart the server; existing connections are cut (``-m fast``), data is kept."""
        self._pg_ctl("restart", "-m", "fast", "-w", "-t", "60", "-l", str(self.log_file))

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")

    def start(self) -> None:
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file))


@pytest.fixture
def pg_server() -> Iterator[PgServer]:
    """The test PostgreSQL server, to restart (or stop and start) it in the middle of a test."""
    server = PgServer(bin_dir=Path(_require_env(PG_BIN_ENV)), data_dir=Path(_require_env(PG_DATA_ENV)))
    if not (server.bin_dir / "pg_ctl").exists():
        pytest.fail(f"{PG_BIN_ENV}={server.bin_dir} has no pg_ctl. {_RUN_CI}", pytrace=False)
    yield server
    if not server.is_running():  # a failed test must not take the server from the next one
        server.start()


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
