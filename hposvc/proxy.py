"""Optuna's gRPC storage proxy in front of hposvc's SQL storage: serve it, and connect to it.

With hundreds of workers, one PostgreSQL connection pool per worker runs the server out of
connections and every worker re-reads the study's trials. Optuna's proxy
(:func:`optuna.storages.run_grpc_proxy_server`) holds one small pool and one incremental
trial cache; workers talk to it with :class:`optuna.storages.GrpcStorageProxy`, named in
hposvc by a ``grpc://host:port`` storage URL (:func:`hposvc.storage.grpc_storage`).

The proxy has no authentication and no TLS: whoever reaches its port can read and change
every study. So :func:`serve` binds to loopback unless ``allow_remote=True``
(``--allow-remote``), and the README says to keep it on a private network.

Example::

    # one process, next to the database
    hposvc storage serve --storage postgresql+psycopg://hposvc@db/hposvc --port 13000
    # every worker
    hposvc worker NAME --storage grpc://127.0.0.1:13000
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import warnings
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from hposvc.errors import StorageError, invalid
from hposvc.storage import GRPC_DEFAULT_PORT as DEFAULT_PORT
from hposvc.storage import import_grpc, open_storage, redact

if TYPE_CHECKING:
    import optuna

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "is_loopback", "serve"]

# Loopback only: the proxy has no authentication (see the module docstring).
DEFAULT_HOST = "127.0.0.1"
# Request threads of the proxy; each holds at most one database connection while it works,
# and hposvc's pool (storage.engine_kwargs) has 6, so more threads would only queue.
DEFAULT_THREADS = 10


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address.

    ``""``, ``0.0.0.0`` and ``::`` (every interface) are not loopback; a name that does not
    resolve is not either.
    """
    name = host.strip("[]")
    if not name:
        return False
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _check_port(port: int, source: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise invalid("port", port, "a whole number from 1 to 65535", source=source)


def _check_port_free(host: str, port: int) -> None:
    # gRPC binds with SO_REUSEPORT, so a second proxy on a busy port would start and share
    # the port's traffic with the first instead of failing. A plain bind tells.
    try:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed port in TIME_WAIT is free
            probe.bind((host.strip("[]"), port))
    except OSError as e:
        raise StorageError(f"the storage proxy cannot listen on {host}:{port}: {e.strerror or e}. Pick another port with --port.") from e


def serve(
    storage_url: str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allow_remote: bool = False,
    threads: int = DEFAULT_THREADS,
) -> None:
    """Serve the SQL storage at ``storage_url`` to ``grpc://host:port`` clients until stopped.

    Blocks until the process is interrupted. Refuses a ``host`` that is not loopback unless
    ``allow_remote`` is true: the proxy has no authentication, so only bind it to an
    address on a private network.

    Example::

        hposvc.proxy.serve("postgresql+psycopg://hposvc@db/hposvc", port=13000)
        # CLI: hposvc storage serve --storage postgresql+psycopg://hposvc@db/hposvc
    """
    # 1) Bad input first, before any connection is made.
    if urlsplit(storage_url).scheme == "grpc":
        raise invalid(
            "storage", storage_url, "an SQL storage URL such as 'postgresql+psycopg://user@host/db'",
            source="hposvc storage serve", hint="A proxy serves a database, not another proxy.",
        )
    _check_port(port, "hposvc storage serve")
    if not allow_remote and not is_loopback(host):
        raise invalid(
            "host", host, "a loopback address such as '127.0.0.1' unless allow_remote=True (--allow-remote)",
            source="hposvc storage serve",
            hint="The storage proxy has no authentication: bind it to another address only on a private network.",
        )
    if threads < 1:
        raise invalid("threads", threads, "an int >= 1", source="hposvc storage serve")
    import_grpc()

    from concurrent.futures import ThreadPoolExecutor

    import optuna

    # 2) One storage for every request, wrapped in Optuna's trial cache as its docs advise:
    #    a bare RDBStorage re-reads every trial of the study on each request.
    backend = optuna.storages.get_storage(open_storage(storage_url))
    _check_port_free(host, port)
    # 3) Serve until interrupted. Said on stderr because the CLI keeps Optuna's own
    #    "Server started" line at INFO (-v); the URL without its password, for pod logs.
    print(
        f"Serving {redact(storage_url)} on grpc://{host}:{port} (no authentication: keep it on a private network)",
        file=sys.stderr, flush=True,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.run_grpc_proxy_server(
                backend, host=host, port=port, thread_pool=ThreadPoolExecutor(max_workers=threads)
            )
    except RuntimeError as e:  # grpcio: "Failed to bind to address"
        raise StorageError(f"the storage proxy cannot listen on {host}:{port}: {e}. Pick another port with --port.") from e
