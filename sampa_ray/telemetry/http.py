"""The coordinator's metrics endpoint: a registry served over HTTP(S) from a daemon thread.

Security of the endpoint: it listens on 127.0.0.1 unless told otherwise, and listening anywhere
else requires a bearer token (the gRPC server's: ``--token-file`` or ``$SAMPA_RAY_TOKEN``). With a
token, every request must carry ``Authorization: Bearer <token>`` (compared in constant time, by
:func:`sampa_ray.security.bearer_ok`), else 401. With a certificate and key (PEM files) it speaks
HTTPS only.

A thread per request, one request per connection and a timeout on each keep a slow or hostile
client from stalling a scrape, or the training loop the coordinator runs beside it.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from ..errors import UserError
from ..security import bearer_ok, is_loopback

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BearerAuth:
    """WSGI middleware: passes a request on only if it carries ``Authorization: Bearer
    <token>``; anything else gets 401. The token is compared in constant time."""

    def __init__(self, app: WSGIApp, token: str) -> None:
        if not token:
            raise ValueError("token: must not be empty")
        self.app = app
        self._token = token

    def allowed(self, header: str) -> bool:
        """Whether an ``Authorization`` header (as WSGI hands it over) carries the token; the
        scheme is case-insensitive."""
        return bearer_ok(header, self._token)

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.allowed(environ.get("HTTP_AUTHORIZATION", "")):
            return self.app(environ, start_response)
        body = b"missing or wrong bearer token\n"
        start_response("401 Unauthorized", [
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
            ("WWW-Authenticate", 'Bearer realm="metrics"')])
        return [body]


class _Handler(WSGIRequestHandler):
    """One request per connection, no access log; an idle or stalled client is dropped after
    ``timeout`` seconds. On a TLS socket the handshake happens here, in the request's own
    thread, so a client that never completes it cannot hold up the accept loop."""

    timeout = 10.0

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request; connection-level failures (a failed TLS handshake, a reset, a
    timeout) end that connection quietly."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context from PEM files; a file that cannot be loaded is a one-line
    :class:`UserError`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=certfile, keyfile=keyfile)
    except (OSError, ValueError) as err:
        why = getattr(err, "strerror", None) or getattr(err, "reason", None) or err
        raise UserError(f"metrics_cert: cannot load certificate {certfile} with key {keyfile}: "
                        f"{why}") from None
    return ctx


class MetricsServer:
    """A running endpoint: its port and scheme, and :meth:`shutdown`."""

    def __init__(self, server: _Server, thread: threading.Thread, scheme: str) -> None:
        self._server = server
        self._thread = thread
        self.port = int(server.server_address[1])
        self.scheme = scheme

    def shutdown(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_registry(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0, *,
                   token: str | None = None, certfile: str | None = None,
                   keyfile: str | None = None) -> MetricsServer:
    """Serve ``registry`` from a daemon thread on ``host:port`` (``port`` 0 picks a free one).

    Beyond loopback a ``token`` is required (an empty one is no token); with a token every
    request must carry ``Authorization: Bearer <token>``. ``certfile`` and ``keyfile`` (PEM,
    both or neither) switch to HTTPS. A user-caused problem is a one-line :class:`UserError`;
    failing to bind is the ``OSError``.
    """
    token = token or None
    if not is_loopback(host) and token is None:
        raise UserError(f"metrics_host: listening on {host or 'every interface'} (not "
                        "loopback) requires a token (--token-file or $SAMPA_RAY_TOKEN)")
    if bool(certfile) != bool(keyfile):
        missing = "metrics_key" if certfile else "metrics_cert"
        raise UserError(f"{missing}: HTTPS needs both metrics_cert and metrics_key")
    ctx = tls_context(certfile, keyfile) if certfile and keyfile else None
    app: WSGIApp = make_wsgi_app(registry)
    if token is not None:
        app = BearerAuth(app, token)

    class Server(_Server):
        pass

    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    Server.address_family = family
    server = Server((sockaddr[0], port), _Handler)
    try:
        server.set_app(app)
        if ctx is not None:
            server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                            do_handshake_on_connect=False)
    except BaseException:
        server.server_close()
        raise
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(server, thread, "https" if ctx is not None else "http")


__all__ = [
    "BearerAuth",
    "MetricsServer",
    "WSGIApp",
    "serve_registry",
    "tls_context",
]
