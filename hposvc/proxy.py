"""Optuna's gRPC storage proxy in front of hposvc's SQL storage: serve it, and connect to it.

With hundreds of workers, one PostgreSQL connection pool per worker runs the server out of
connections and every worker re-reads the study's trials. Optuna's proxy
(:func:`optuna.storages.run_grpc_proxy_server`) holds one small pool and one incremental
trial cache; workers talk to it with :class:`optuna.storages.GrpcStorageProxy`, named in
hposvc by a ``grpc://host:port`` storage URL (:func:`hposvc.storage.grpc_storage`).

Optuna's proxy has no authentication of its own: whoever reaches its port can read and
change every study. So :func:`serve` binds to loopback unless ``allow_remote=True``
(``--allow-remote``), and beyond loopback it requires a shared token (``--token-file FILE``
or ``$HPOSVC_STORAGE_TOKEN``) that a server interceptor checks on every call; clients send
it from the same variables (:class:`hposvc.storage.TokenSource`). A call without it, or
with a wrong one, is refused with UNAUTHENTICATED before Optuna's servicer sees it.

The same interceptor turns a database that went away behind the proxy (a PostgreSQL
restart) into UNAVAILABLE, which clients retry; the pool's pre-ping reconnects by itself.

Example::

    # one process, next to the database
    python -c 'import secrets; print(secrets.token_urlsafe(32))' > token
    hposvc storage serve --storage postgresql+psycopg://hposvc@db/hposvc --host 0.0.0.0 --allow-remote --token-file token
    # every worker
    HPOSVC_STORAGE_TOKEN_FILE=token hposvc worker NAME --storage grpc://proxy-host:13000
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
from hposvc.storage import TOKEN_ENV, TOKEN_HEADER, TokenSource, import_grpc, is_connection_error, open_storage, read_pem, redact

if TYPE_CHECKING:
    import optuna

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "is_loopback", "serve"]

# Loopback only unless asked: beyond it a token is required (see the module docstring).
DEFAULT_HOST = "127.0.0.1"
# Shortest token accepted: a guessable one would be no credential at all.
MIN_TOKEN_LENGTH = 16
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


def _guard(tokens: TokenSource | None):  # -> grpc.ServerInterceptor
    """The server interceptor: the token on every call, and a lost database as UNAVAILABLE."""
    import grpc

    def deny(message: str):  # noqa: ANN202
        def abort(request, context):  # noqa: ANN001, ANN202
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(abort)

    class Guard(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201 (grpc's interface)
            if tokens is not None:
                sent = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
                if not sent:
                    return deny("no storage token was sent")
                if not sent.startswith("Bearer ") or not tokens.accepts(sent[len("Bearer "):]):
                    return deny("the storage token is wrong")
            handler = continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler
            inner = handler.unary_unary

            def call(request, context):  # noqa: ANN001, ANN202
                try:
                    return inner(request, context)
                except Exception as e:
                    # context.abort's own exception carries no text, so it passes through.
                    if is_connection_error(e):
                        context.abort(grpc.StatusCode.UNAVAILABLE, f"the database behind the storage proxy is unavailable: {e}")
                    raise

            return grpc.unary_unary_rpc_method_handler(
                call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )

    return Guard()


def _check_credentials(tokens: TokenSource | None, *, host: str, client_ca: bool) -> None:
    source = "hposvc storage serve"
    if tokens is None and not client_ca and not is_loopback(host):
        raise invalid(
            "token_file", None,
            f"a file holding the shared token (--token-file FILE, or {TOKEN_ENV}) when the proxy listens beyond loopback "
            "without client certificates (--tls-client-ca)",
            source=source, hint="Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > token",
        )
    for token in tokens.tokens() if tokens is not None else ():
        if len(token) < MIN_TOKEN_LENGTH:
            raise invalid(
                "token", f"<{len(token)} characters from {tokens.source}>", f"at least {MIN_TOKEN_LENGTH} characters",
                source=source, hint="Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            )


def serve(
    storage_url: str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allow_remote: bool = False,
    threads: int = DEFAULT_THREADS,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
) -> None:
    """Serve the SQL storage at ``storage_url`` to ``grpc://host:port`` clients until stopped.

    Blocks until the process is interrupted. Refuses a ``host`` that is not loopback unless
    ``allow_remote`` is true, and then requires a token: ``token_file`` (one token per
    line, re-read when it changes), else ``$HPOSVC_STORAGE_TOKEN_FILE`` or
    ``$HPOSVC_STORAGE_TOKEN``. On loopback a token is optional, and checked when given.

    TLS: ``tls_cert`` and ``tls_key`` (PEM files) make the proxy speak TLS; with
    ``tls_client_ca`` it also requires a client certificate signed by that CA (mutual TLS),
    which counts as the credential beyond loopback (a token may be required on top).

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
            hint="Beyond loopback the proxy needs a credential as well (--token-file FILE, or --tls-client-ca); keep it on a private network.",
        )
    tokens = TokenSource.from_env(token_file)
    if (tls_cert is None) != (tls_key is None) or (tls_client_ca is not None and tls_cert is None):
        raise invalid(
            "tls_cert", tls_cert, "given together with --tls-key (and both with --tls-client-ca)",
            source="hposvc storage serve", hint="A TLS server needs its certificate and its key.",
        )
    tls = None if tls_cert is None else (read_pem(tls_key, "tls_key"), read_pem(tls_cert, "tls_cert"), read_pem(tls_client_ca, "tls_client_ca") if tls_client_ca else None)
    _check_credentials(tokens, host=host, client_ca=tls is not None and tls[2] is not None)
    if threads < 1:
        raise invalid("threads", threads, "an int >= 1", source="hposvc storage serve")
    import_grpc()

    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import optuna
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    # 2) One storage for every request, wrapped in Optuna's trial cache as its docs advise:
    #    a bare RDBStorage re-reads every trial of the study on each request.
    backend = optuna.storages.get_storage(open_storage(storage_url))
    _check_port_free(host, port)
    # 3) Serve until interrupted: Optuna's servicer behind hposvc's guard (what
    #    optuna.storages.run_grpc_proxy_server builds, with an interceptor). Said on stderr
    #    because the CLI keeps Optuna's own lines at INFO (-v); the URL without its password.
    auth = ", ".join(
        filter(None, [tokens and f"token from {tokens.source}", tls and ("TLS, client certificates required" if tls[2] else "TLS")])
    ) or "no authentication: keep it on loopback"
    print(f"Serving {redact(storage_url)} on grpc://{host}:{port} ({auth})", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        server = grpc.server(ThreadPoolExecutor(max_workers=threads), interceptors=[_guard(tokens)])
        api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(backend), server)
    try:
        if tls is None:
            server.add_insecure_port(f"{host}:{port}")
        else:
            key, cert, client_ca = tls
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)
            server.add_secure_port(f"{host}:{port}", creds)
    except RuntimeError as e:  # grpcio: "Failed to bind to address"
        raise StorageError(f"the storage proxy cannot listen on {host}:{port}: {e}. Pick another port with --port.") from e
    server.start()
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=None)
