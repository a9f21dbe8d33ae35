"""Where hposvc keeps its data, and the Optuna SQL storage it opens.

Resolution order, the same for the Python API and the CLI:

1. data directory: the ``data_dir`` argument (``--data-dir``), else ``$HPOSVC_DATA_DIR``,
   else ``./hposvc-data``;
2. study storage: the ``storage`` argument (``--storage``), else ``$HPOSVC_STORAGE``, else
   the embedded SQLite file ``<data dir>/hposvc.db``;
3. tracking: the ``tracking_uri`` argument (``--tracking-uri``), else
   ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store ``<data dir>/mlflow.db`` with
   artifacts in ``<data dir>/mlruns``.

PostgreSQL (``postgresql+psycopg://user@host/db``) is the multi-worker, multi-host backend:
connections are pooled and pre-pinged so a restarted server is reconnected to. The
embedded SQLite file runs in WAL mode with a long busy timeout so that several local
worker processes can share it without "database is locked" failures.
"""

from __future__ import annotations

import functools
import os
import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar
from urllib.parse import urlsplit

from hposvc.errors import InvalidInputError, StorageError, invalid

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_DATA_DIR",
    "artifact_location",
    "grpc_storage",
    "load_study",
    "open_storage",
    "redact",
    "resolve_data_dir",
    "resolve_storage_url",
    "resolve_tracking_uri",
    "with_retries",
]

DEFAULT_DATA_DIR = "hposvc-data"


# Optuna's own default port for its storage proxy, so plain-Optuna clients find it too.
GRPC_DEFAULT_PORT = 13000
# How long a worker waits for its storage proxy to answer (seconds): one started together
# with its proxy (a Kubernetes pod, docker compose) waits instead of failing.
GRPC_READY_TIMEOUT = 30.0
# SQLite waits this long (seconds) for a competing writer before "database is locked".
SQLITE_BUSY_TIMEOUT = 120

T = TypeVar("T")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory (not created here)."""
    return Path(data_dir or os.environ.get("HPOSVC_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().absolute()


def resolve_storage_url(storage: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The study database URL; see the module docstring for the order."""
    url = storage or os.environ.get("HPOSVC_STORAGE")
    if url:
        if not url.startswith("grpc://"):
            _check_url(url, "storage", "--storage / HPOSVC_STORAGE")
        return url
    return f"sqlite:///{resolve_data_dir(data_dir) / 'hposvc.db'}"


def resolve_tracking_uri(tracking_uri: str | None = None, *, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The MLflow tracking URI; see the module docstring for the order."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{resolve_data_dir(data_dir) / 'mlflow.db'}"


def artifact_location(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Artifact root for experiments hposvc creates in the embedded tracking store."""
    return (resolve_data_dir(data_dir) / "mlruns").as_uri()


def _check_url(url: str, key: str, where: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError) as e:
        raise InvalidInputError(
            f"the {key!r} parameter must be an SQLAlchemy URL such as 'sqlite:///path/hposvc.db' or "
            f"'postgresql+psycopg://user@host:5432/db'. Got {url!r} instead (from {where})."
        ) from e


def _sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _on_sqlite_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 (DB-API objects)
    # WAL lets readers and one writer work at once; the busy timeout makes a second writer
    # wait instead of failing. synchronous=NORMAL is durable across process crashes in WAL.
    # hposvc issues BEGIN itself (see _begin_immediate); the driver must not.
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy engine options hposvc uses for ``url`` (Optuna's and its own tables)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    # pre-ping replaces connections a restarted server dropped; recycle bounds their age.
    return {"pool_pre_ping": True, "pool_recycle": 300, "pool_size": 2, "max_overflow": 4}


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.5) -> T:
    """Call ``fn``, retrying database connection errors with exponential backoff.

    Used around storage calls that must survive a database restart; after the last attempt
    the error is raised as :class:`StorageError`.
    """
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError, OperationalError

    for attempt in range(attempts):
        try:
            return fn()
        except (OperationalError, DBAPIError, StorageInternalError) as e:
            if attempt == attempts - 1 or not _is_connection_error(e):
                raise StorageError(f"{what} failed: {e.orig if hasattr(e, 'orig') else e}") from e
            time.sleep(base_delay * 2**attempt * (1 + random.random() / 2))
    raise AssertionError("unreachable")


def _is_connection_error(e: BaseException) -> bool:
    # Optuna wraps SQLAlchemy's errors in StorageInternalError; the cause tells.
    if e.__cause__ is not None and _is_connection_error(e.__cause__):
        return True
    if getattr(e, "connection_invalidated", False):
        return True
    text = str(e).lower()
    return any(
        s in text
        for s in ("connection", "server closed", "terminating", "could not connect", "database is locked", "shutting down")
    )


@functools.lru_cache(maxsize=16)
def open_storage(url: str) -> "optuna.storages.BaseStorage":
    """Open (and create if needed) the Optuna storage at ``url``: an RDB storage for an
    SQLAlchemy URL, a proxy client for ``grpc://``.

    One storage object per URL and process: creating it checks the schema version, which is
    too slow to repeat per trial. ``grpc://host:port`` opens a client of Optuna's storage
    proxy (:func:`grpc_storage`; serve one with ``hposvc storage serve``).
    """
    if url.startswith("grpc://"):
        return grpc_storage(url)
    import optuna
    from sqlalchemy import event

    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # WAL must be on before Optuna's first connection creates the tables.
        import sqlite3

        with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT) as con:
            con.execute("PRAGMA journal_mode=WAL")

    def create() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))

    try:
        storage = with_retries(create, what=f"opening the study storage {redact(url)}")
    except ImportError as e:
        raise InvalidInputError(
            f"the storage URL {redact(url)!r} needs a database driver that is not installed ({e}). "
            "For PostgreSQL: pip install 'hposvc[postgres]'."
        ) from e
    if path is not None:
        event.listen(storage.engine, "connect", _on_sqlite_connect)
        event.listen(storage.engine, "begin", _begin_immediate)
        storage.engine.dispose()  # later connections get the pragmas
    return storage


def load_study(name: str, *, storage: str | None = None, sampler: Any = None, pruner: Any = None) -> "optuna.Study":
    """Load an existing study by name; a missing one is an error listing the others."""
    import optuna

    url = resolve_storage_url(storage)
    rdb = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=rdb, sampler=sampler, pruner=pruner)
    except KeyError as e:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False))
        raise InvalidInputError(
            f"the 'study' parameter must name a study in {redact(url)}. Got {name!r} instead. "
            f"Studies there: {', '.join(names) or '(none)'}."
        ) from e


def _begin_immediate(conn) -> None:  # noqa: ANN001 (SQLAlchemy connection)
    # SQLite ignores SELECT ... FOR UPDATE, and Python's sqlite3 only begins a transaction at
    # the first write: two workers could both read a trial as WAITING and both claim it.
    # BEGIN IMMEDIATE takes the write lock at the start, so claims are serialised.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def redact(url: str) -> str:
    """``url`` with its password hidden, for messages and records."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (only used in messages)
        return url


def import_grpc() -> None:
    """Import grpcio (and check Optuna can use it), or say how to install it."""
    try:
        import grpc  # noqa: F401
        import optuna.storages._grpc.auto_generated.api_pb2_grpc  # noqa: F401  (checks grpcio's version)
    except (ImportError, RuntimeError) as e:
        raise InvalidInputError(f"the gRPC storage proxy needs grpcio: pip install 'hposvc[grpc]' ({e})") from e


def grpc_storage(url: str, *, ready_timeout: float | None = GRPC_READY_TIMEOUT) -> "optuna.storages.GrpcStorageProxy":
    """A :class:`optuna.storages.GrpcStorageProxy` for ``grpc://host[:port]`` (port 13000 by default).

    Waits up to ``ready_timeout`` seconds for the proxy to answer (``None``: do not wait)
    and raises :class:`StorageError` when it does not, so a worker started before its proxy
    waits a little and a missing proxy is named rather than failing on the first request.

    Example::

        storage = grpc_storage("grpc://127.0.0.1:13000")
        optuna.load_study(study_name="quickstart", storage=storage)
    """
    allowed = "a URL of the form 'grpc://HOST:PORT', e.g. 'grpc://127.0.0.1:13000'"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port that is not a number, or out of range
        raise invalid("storage", url, allowed) from e
    if parts.scheme != "grpc" or not parts.hostname or parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise invalid("storage", url, allowed)
    if port == 0:
        raise invalid("storage", url, allowed)
    import_grpc()
    import optuna

    # An IPv6 address keeps its brackets: the client joins host and port with ':'.
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.GrpcStorageProxy(host=host, port=port or GRPC_DEFAULT_PORT)
    if ready_timeout is not None:
        try:
            storage.wait_server_ready(timeout=ready_timeout)
        except ConnectionError as e:
            storage.close()
            raise StorageError(
                f"no storage proxy answered at {url} within {ready_timeout:g} s. "
                "Start one with `hposvc storage serve --storage URL`, or check the host and port."
            ) from e
    return storage
