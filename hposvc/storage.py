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
import hmac
import logging
import math
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar
from urllib.parse import urlsplit

from hposvc.errors import InvalidInputError, StorageError, StorageUnavailableError, invalid

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_DATA_DIR",
    "OUTAGE",
    "TlsFiles",
    "TokenSource",
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

log = logging.getLogger(__name__)


# Optuna's own default port for its storage proxy, so plain-Optuna clients find it too.
GRPC_DEFAULT_PORT = 13000
# How long a worker waits for its storage proxy to answer (seconds): one started together
# with its proxy (a Kubernetes pod, docker compose) waits instead of failing.
GRPC_READY_TIMEOUT = 30.0
# SQLite waits this long (seconds) for a competing writer before "database is locked".
SQLITE_BUSY_TIMEOUT = 120
# A grpc:// call that has not answered in this long is retried (seconds): a proxy host that
# vanished without closing its connections would otherwise hang the call forever.
GRPC_CALL_TIMEOUT = 120.0
# Backoff between retries of a grpc:// call while the proxy is away (seconds): first, cap.
GRPC_RETRY_FIRST, GRPC_RETRY_CAP = 0.25, 5.0
# The shared token: the proxy accepts it and clients send it (see TokenSource).
TOKEN_ENV, TOKEN_FILE_ENV = "HPOSVC_STORAGE_TOKEN", "HPOSVC_STORAGE_TOKEN_FILE"
# The request header that carries it.
TOKEN_HEADER = "authorization"
# TLS for clients: the CA that signed the proxy's certificate (turns TLS on), and this
# client's certificate and key when the proxy requires one (--tls-client-ca).
TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV = "HPOSVC_STORAGE_TLS_CA", "HPOSVC_STORAGE_TLS_CERT", "HPOSVC_STORAGE_TLS_KEY"

T = TypeVar("T")


def _outage_limit() -> float:
    name, value = "HPOSVC_STORAGE_OUTAGE_LIMIT", os.environ.get("HPOSVC_STORAGE_OUTAGE_LIMIT", "600")
    try:
        limit = float(value)
    except ValueError:
        limit = math.nan
    if not limit > 0 or math.isinf(limit):
        raise InvalidInputError(f"the {name!r} environment variable must be a number of seconds > 0. Got {value!r} instead.")
    return limit


class Outage:
    """Whether this process can reach its study storage, shared by all its threads.

    The first failed call of an outage is logged (once, not once per call and thread) and
    starts the clock; the first successful call after it ends the outage and says how long
    it lasted. ``HPOSVC_STORAGE_OUTAGE_LIMIT`` (seconds, default 600) bounds how long calls
    through ``grpc://`` keep retrying: past it they raise :class:`StorageUnavailableError`
    and the worker stops (exit code 75). :class:`hposvc.queue.StaleWatch` reads
    :attr:`ended_at`: a heartbeat that could not land while the storage was away does not
    make a live trial stale. One per process, as a worker has one study storage.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None  # monotonic start of the current outage
        self.ended_at = -math.inf  # monotonic end of the last one

    @property
    def limit(self) -> float:
        return _outage_limit()

    def failed(self, where: str, error: object, *, retrying: str = "") -> float:
        """Record a failed call; returns how long the storage has been away (seconds)."""
        now = time.monotonic()
        with self._lock:
            if self.since is None:
                self.since = now
                log.warning("the study storage %s is unreachable (%s); retrying%s", where, error, retrying)
            return now - self.since

    def ok(self) -> None:
        """Record a successful call (cheap when there is no outage)."""
        if self.since is None:
            return
        with self._lock:
            if self.since is not None:
                now = time.monotonic()
                log.warning("the study storage is reachable again after %.1f s", now - self.since)
                self.since, self.ended_at = None, now

    @property
    def active(self) -> bool:
        return self.since is not None


OUTAGE = Outage()


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
            result = fn()
        except (OperationalError, DBAPIError, StorageInternalError) as e:
            if attempt == attempts - 1 or not is_connection_error(e):
                raise StorageError(f"{what} failed: {e.orig if hasattr(e, 'orig') else e}") from e
            if "locked" not in str(e):  # a busy SQLite writer is not an outage
                OUTAGE.failed("database", e, retrying=f" ({attempts} attempts)")
            time.sleep(base_delay * 2**attempt * (1 + random.random() / 2))
        else:
            OUTAGE.ok()
            return result
    raise AssertionError("unreachable")


def is_connection_error(e: BaseException) -> bool:
    """Whether a database error means the connection or the server went away (retry it)."""
    # Optuna wraps SQLAlchemy's errors in StorageInternalError; the cause tells.
    if e.__cause__ is not None and is_connection_error(e.__cause__):
        return True
    if getattr(e, "connection_invalidated", False):
        return True
    text = str(e).lower()
    return any(
        s in text
        for s in ("connection", "server closed", "terminating", "could not connect", "database is locked", "shutting down")
    )


# The execution option that marks a connection as reading only (see _begin_immediate).
READ_ONLY = "hposvc_read_only"

# Storages this process opened: a forked child (a worker slot) forgets them and opens its
# own, leaving the parent's pooled connections to the parent.
_OPENED: list[Any] = []


def _forget_storages_in_child() -> None:
    for rdb in _OPENED:
        engine = getattr(rdb, "engine", None)
        if engine is not None:
            engine.dispose(close=False)
    _OPENED.clear()
    open_storage.cache_clear()


os.register_at_fork(after_in_child=_forget_storages_in_child)


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
        from sqlalchemy.exc import DBAPIError

        # Two processes opening a new database at once (a study run and a worker, or a
        # poller) both create Optuna's tables and stamp its schema version; the slower one
        # meets "table ... already exists" or a duplicate alembic_version row mid-way. Its
        # next attempt finds the tables and creates only what is left.
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
            except DBAPIError as e:
                if not any(s in str(e) for s in ("already exists", "alembic_version")) or attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

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
    _OPENED.append(storage)
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
    # BEGIN IMMEDIATE takes the write lock at the start, so claims are serialised. hposvc's
    # own one-statement reads (READ_ONLY) take no lock: in WAL mode they read a snapshot
    # beside the writer.
    if not conn.get_execution_options().get(READ_ONLY):
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


class TokenSource:
    """The shared token of an authenticated storage proxy: a literal (``HPOSVC_STORAGE_TOKEN``)
    or a file (``--token-file`` / ``HPOSVC_STORAGE_TOKEN_FILE``).

    A file holds one token per line: a client sends the first, the proxy accepts any. It is
    re-read when it changes, so a token is rotated without restarting anything (a Kubernetes
    Secret mounted as a volume is updated in place): add the new token as a second line,
    then make it the first, then drop the old one.
    """

    def __init__(self, *, value: str | None = None, path: str | os.PathLike[str] | None = None, source: str = "") -> None:
        self.path = None if path is None else Path(path)
        self.source = source or (f"--token-file {path}" if path is not None else TOKEN_ENV)
        self.key = "token_file" if source == "" and path is not None else (source or TOKEN_ENV)
        self._value = value
        self._stamp: tuple | None = None
        self._tokens: list[str] = []
        self.tokens()  # a missing or empty file is bad input now, not at the first call

    @classmethod
    def from_env(cls, token_file: str | os.PathLike[str] | None = None) -> "TokenSource | None":
        """``token_file``, else ``$HPOSVC_STORAGE_TOKEN_FILE``, else ``$HPOSVC_STORAGE_TOKEN``, else None."""
        if token_file:
            return cls(path=token_file)
        if os.environ.get(TOKEN_FILE_ENV):
            return cls(path=os.environ[TOKEN_FILE_ENV], source=TOKEN_FILE_ENV)
        if os.environ.get(TOKEN_ENV, "").strip():
            return cls(value=os.environ[TOKEN_ENV], source=TOKEN_ENV)
        return None

    def tokens(self) -> list[str]:
        """The tokens, the one to send first."""
        if self.path is None:
            return [self._value.strip()] if self._value and self._value.strip() else []
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                lines = [line.strip() for line in self.path.read_text().splitlines()]
                tokens = [line for line in lines if line and not line.startswith("#")]
                if not tokens:
                    raise invalid(self.key, str(self.path), "a file with a token on its first line", hint="It has none.")
                self._tokens, self._stamp = tokens, stamp
        except OSError as e:
            if self._tokens:  # mid-rotation the file may be briefly away: keep the last tokens
                return self._tokens
            raise invalid(self.key, str(self.path), "a readable file with a token on its first line", hint=f"({e.strerror or e}).") from e
        return self._tokens

    def first(self) -> str:
        return self.tokens()[0]

    def accepts(self, token: str) -> bool:
        # Compare every token in constant time: how much of a guess matched must not show.
        return any([hmac.compare_digest(token.encode(), t.encode()) for t in self.tokens()])


def read_pem(path: str | os.PathLike[str], key: str) -> bytes:
    """A PEM file's bytes, or bad input naming ``key`` (a variable or an option)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise invalid(key, str(path), "a readable PEM file", hint=f"({e.strerror or e}).") from e
    if b"-----BEGIN " not in data:
        raise invalid(key, str(path), "a PEM file (-----BEGIN ...)")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """A client's TLS material for ``grpc://``: the CA that signed the proxy's certificate
    (``None``: the system's roots) and, for a proxy that requires client certificates,
    this client's certificate and key."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_env(cls) -> "TlsFiles | None":
        """From ``$HPOSVC_STORAGE_TLS_CA``, ``_CERT`` and ``_KEY``; None when none is set (plaintext)."""
        ca, cert, key = (os.environ.get(v) or None for v in (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV))
        if ca is None and cert is None and key is None:
            return None
        if (cert is None) != (key is None):
            missing = TLS_KEY_ENV if key is None else TLS_CERT_ENV
            raise InvalidInputError(f"{TLS_CERT_ENV} and {TLS_KEY_ENV} go together: set {missing} too (a client certificate needs its key).")
        return cls(
            ca=read_pem(ca, TLS_CA_ENV) if ca else None,
            cert=read_pem(cert, TLS_CERT_ENV) if cert else None,
            key=read_pem(key, TLS_KEY_ENV) if key else None,
        )


def _tls_refused(details: str) -> bool:
    # A certificate that does not verify is not an outage: retrying cannot help. (Other
    # handshake errors, SSL_ERROR_SYSCALL among them, are what a proxy killed mid-handshake
    # gives, so they are retried.)
    return "certificate" in details.lower()


def _retryable(code: object, details: str) -> bool:
    import grpc

    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    # A connection reset mid-call surfaces as these, depending on where it broke.
    return code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and any(
        s in details for s in ("Stream removed", "RST_STREAM", "Socket closed", "Connection reset")
    )


def _grpc_client_class() -> type:
    """:class:`optuna.storages.GrpcStorageProxy` whose every call retries transient errors.

    Each call (Optuna's trial cache included) goes through one interceptor that adds the
    token, gives the call a deadline (:data:`GRPC_CALL_TIMEOUT`), and retries UNAVAILABLE,
    DEADLINE_EXCEEDED and reset connections with jittered exponential backoff until the
    storage has been away for the outage limit (:class:`Outage`), then raises
    :class:`StorageUnavailableError`. A refused token is a :class:`StorageError` at once.
    It overrides ``GrpcStorageProxy._setup`` (Optuna's channel and stub), pinned by
    tests/test_proxy.py.
    """
    if _GRPC_CLASS:
        return _GRPC_CLASS[0]
    import collections

    import grpc
    import optuna
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.client import GrpcClientCache

    class _Details(
        collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails,
    ):
        pass

    class _Retry(grpc.UnaryUnaryClientInterceptor):
        def __init__(self, owner: "RetryingGrpcStorage") -> None:
            self.owner = owner

        def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201 (grpc's interface)
            owner = self.owner
            metadata = list(details.metadata or [])
            if owner.tokens is not None:
                metadata.append((TOKEN_HEADER, f"Bearer {owner.tokens.first()}"))
            until = getattr(owner.local, "until", None)  # set while grpc_storage waits for the proxy
            timeout = GRPC_CALL_TIMEOUT if until is None else max(until - time.monotonic(), 0.1)
            details = _Details(details.method, details.timeout or timeout, metadata, details.credentials, details.wait_for_ready, details.compression)
            delay, closed = GRPC_RETRY_FIRST, 0
            owner.local.retried = False
            while True:
                call = continuation(details, request)
                code = call.code()
                if until is not None and code == grpc.StatusCode.UNAVAILABLE and _tls_refused(call.details() or ""):
                    raise StorageError(
                        f"the TLS handshake with the storage proxy at {owner.url} failed: {call.details()}. Check "
                        f"{TLS_CA_ENV} (the CA that signed the proxy's certificate) and, when the proxy requires client "
                        f"certificates, {TLS_CERT_ENV} and {TLS_KEY_ENV}."
                    )
                if code == grpc.StatusCode.OK or not _retryable(code, call.details() or ""):
                    if code == grpc.StatusCode.UNAUTHENTICATED:
                        raise StorageError(
                            f"the storage proxy at {owner.url} refused this client: {call.details()}. Set {TOKEN_ENV} "
                            f"(or {TOKEN_FILE_ENV}, a file) to the token the proxy was started with."
                        )
                    if code != grpc.StatusCode.UNKNOWN:  # UNKNOWN: the proxy answered with an error of its own
                        OUTAGE.ok()
                    return call
                if until is not None:  # waiting for the proxy to come up is not an outage
                    # A proxy that requires client certificates closes the connection of a
                    # client it does not accept once TLS 1.3 has finished: a starting proxy
                    # refuses connections instead, so a closed socket again and again is that.
                    closed = closed + 1 if owner.tls is not None and "Socket closed" in (call.details() or "") else 0
                    if closed >= 3:
                        raise StorageError(
                            f"the storage proxy at {owner.url} closed every TLS connection: it requires a client certificate "
                            f"signed by its CA. Set {TLS_CERT_ENV} and {TLS_KEY_ENV} to one (and {TLS_CA_ENV} to the CA of the "
                            "proxy's certificate)."
                        )
                    if time.monotonic() >= until:
                        raise StorageError(
                            f"no storage proxy answered at {owner.url} within {owner.local.ready_timeout:g} s. Start one with "
                            f"`hposvc storage serve --storage URL`, or check the host and port (last error {code.name}: {call.details()})."
                        )
                    time.sleep(min(delay * (0.5 + random.random()), max(until - time.monotonic(), 0.01)))
                    delay = min(delay * 2, 1.0)
                    continue
                limit = OUTAGE.limit
                down = OUTAGE.failed(owner.url, f"{code.name}: {call.details()}", retrying=f" for up to {limit:g} s")
                if down >= limit:
                    raise StorageUnavailableError(
                        f"the study storage {owner.url} has been unreachable for {down:.0f} s, past the outage limit of "
                        f"{limit:g} s (HPOSVC_STORAGE_OUTAGE_LIMIT); last error {code.name}: {call.details()}. This worker stops; "
                        "its running trials are failed and retried by the next worker that finds them stale."
                    )
                owner.local.retried = True
                time.sleep(min(delay * (0.5 + random.random()), limit - down + 0.01))
                delay = min(delay * 2, GRPC_RETRY_CAP)

    class RetryingGrpcStorage(optuna.storages.GrpcStorageProxy):
        def __init__(self, *, host: str, port: int, url: str, tokens: TokenSource | None, tls: TlsFiles | None) -> None:
            self.url, self.tokens, self.tls, self.local = url, tokens, tls, threading.local()
            super().__init__(host=host, port=port)

        def _setup(self) -> None:
            # Optuna's channel options, plus a short reconnect backoff: gRPC's own grows to
            # 2 minutes, which would keep a worker waiting long after its proxy is back.
            target = f"{self._host}:{self._port}"
            options = [
                ("grpc.max_receive_message_length", -1),
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ]
            if self.tls is None:
                self._raw_channel = grpc.insecure_channel(target, options=options)
            else:
                creds = grpc.ssl_channel_credentials(root_certificates=self.tls.ca, private_key=self.tls.key, certificate_chain=self.tls.cert)
                self._raw_channel = grpc.secure_channel(target, creds, options=options)
            self._channel = grpc.intercept_channel(self._raw_channel, _Retry(self))
            self._stub = api_pb2_grpc.StorageServiceStub(self._channel)
            self._cache = GrpcClientCache(self._stub)

        def close(self) -> None:
            self._raw_channel.close()

        def wait_until_answering(self, timeout: float) -> None:
            """One call that reads nothing, retried until the proxy answers or ``timeout``
            passes: it checks the connection, TLS and the token at once."""
            self.local.until, self.local.ready_timeout = time.monotonic() + timeout, timeout
            try:
                self.get_study_id_from_name("hposvc: connection check")
            except KeyError:
                pass
            finally:
                self.local.until = None

        def __getstate__(self) -> dict:
            state = super().__getstate__()
            state.pop("_raw_channel", None)
            state.pop("local", None)
            return state

        def __setstate__(self, state: dict) -> None:
            state["local"] = threading.local()
            super().__setstate__(state)

        def set_trial_state_values(self, trial_id: int, state: "optuna.trial.TrialState", values: "Any" = None) -> bool:
            try:
                return super().set_trial_state_values(trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                # A retried call whose first attempt landed before the connection broke
                # finds the trial finished by itself: that is success, not a conflict.
                if not self.local.retried:
                    raise
                now = self.get_trial(trial_id)
                if now.state == state and (values is None or list(now.values or []) == list(values)):
                    return True
                raise

    _GRPC_CLASS.append(RetryingGrpcStorage)
    return RetryingGrpcStorage


_GRPC_CLASS: list[type] = []


def grpc_storage(
    url: str, *, ready_timeout: float | None = GRPC_READY_TIMEOUT, tokens: TokenSource | None = None, tls: TlsFiles | None = None
) -> "optuna.storages.GrpcStorageProxy":
    """A :class:`optuna.storages.GrpcStorageProxy` for ``grpc://host[:port]`` (port 13000 by default).

    Waits up to ``ready_timeout`` seconds for the proxy to answer (``None``: do not wait)
    and raises :class:`StorageError` when it does not, so a worker started before its proxy
    waits a little and a missing proxy is named rather than failing on the first request.
    That first call carries the credentials: ``tokens`` (default: :meth:`TokenSource.from_env`)
    and ``tls`` (default: :meth:`TlsFiles.from_env`; TLS when a CA or a client certificate
    is set), so a client the proxy refuses fails here, before it reads or writes anything.

    Every call retries transient errors (the proxy restarting, its database restarting)
    for up to ``HPOSVC_STORAGE_OUTAGE_LIMIT`` seconds (default 600); see :class:`Outage`.

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
    tokens = tokens if tokens is not None else TokenSource.from_env()
    tls = tls if tls is not None else TlsFiles.from_env()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = _grpc_client_class()(host=host, port=port or GRPC_DEFAULT_PORT, url=url, tokens=tokens, tls=tls)
    if ready_timeout is not None:
        try:
            storage.wait_until_answering(ready_timeout)
        except BaseException:
            storage.close()
            raise
    return storage
