"""The coordinator's gRPC server (grpc.aio, in the coordinator's event loop).

Hosts the data plane (:mod:`.data_plane`, ``sampa.v1.ParameterService``) and the control plane
(:mod:`.control_plane`, ``sampa.v1.CoordinatorService``) on one port, with the standard health
service and server reflection alongside.

Security: the server binds only where told (default 127.0.0.1). A bind to a non-loopback address
requires a bearer token; with a token every call except the health checks must carry
``authorization: Bearer <token>`` metadata, else UNAUTHENTICATED. TLS is used when a certificate
and key are given.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ...errors import UserError, error_line
from ...proto.sampa.v1 import coordinator_service_pb2_grpc as cgrpc
from ...proto.sampa.v1 import parameter_service_pb2_grpc as pgrpc
from ...security import bearer_ok, is_loopback
from ..codec import GRPC_OPTIONS
from .control_plane import COORDINATOR_SERVICE, ControlServicer
from .data_plane import PARAMETER_SERVICE, ParameterServicer, RoundBoard

HEALTH_SERVICE = health.SERVICE_NAME
SC = grpc.StatusCode


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but the health checks unless it carries the bearer token."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(f"/{HEALTH_SERVICE}/") or handler is None:
            return handler
        got: str | bytes = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value
        # exactly "Bearer <token>": the clients build it with auth_metadata
        if bearer_ok(got, self._token, strict=True):
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or wrong bearer token"

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(SC.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    # a refused call is never decoded: nothing from an unauthenticated caller is parsed
    return make(deny, request_deserializer=None,
                response_serializer=handler.response_serializer)


def _address(host: str, port: int) -> str:
    h = host.strip("[]")
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


_HEALTH: weakref.WeakKeyDictionary[grpc.aio.Server, health.aio.HealthServicer] = (
    weakref.WeakKeyDictionary())


async def start_server(board: RoundBoard | None, handler: Any | None, host: str = "127.0.0.1",
                       port: int = 0, *, token: str | None = None,
                       tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server in the running event loop; returns ``(server, bound port)``.

    Registers ParameterService (when ``board`` is given), CoordinatorService (when ``handler``
    is given), grpc.health.v1 (each service SERVING) and reflection. Binds ``host:port`` only
    (``port=0``: any free port). A non-loopback ``host`` requires ``token``. ``tls`` is
    ``(certificate PEM, private key PEM)``.
    """
    if not is_loopback(host) and not token:
        raise ValueError(f"host: binding {host} (not loopback) requires a token")
    if token is not None and not token:
        raise ValueError("token: must not be empty")
    interceptors = [_TokenInterceptor(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors,
                             options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
    names = []
    if board is not None:
        pgrpc.add_ParameterServiceServicer_to_server(ParameterServicer(board), server)
        names.append(PARAMETER_SERVICE)
    if handler is not None:
        cgrpc.add_CoordinatorServiceServicer_to_server(ControlServicer(handler), server)
        names.append(COORDINATOR_SERVICE)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME],
                                        server)
    addr = _address(host, port)
    try:
        if tls is not None:
            cert, key = tls
            bound = server.add_secure_port(addr, grpc.ssl_server_credentials([(key, cert)]))
        else:
            bound = server.add_insecure_port(addr)
    except RuntimeError as err:
        raise UserError(f"port: cannot bind {addr} ({error_line(err)})") from None
    if not bound:
        raise UserError(f"port: cannot bind {addr}")
    await server.start()
    for name in ["", *names]:
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    _HEALTH[server] = hs
    return server, bound


async def set_not_serving(server: grpc.aio.Server) -> None:
    """Report NOT_SERVING for every service (health checks keep answering)."""
    hs = _HEALTH.get(server)
    if hs is not None:
        await hs.enter_graceful_shutdown()


async def stop_server(server: grpc.aio.Server, grace: float | None = 1.0) -> None:
    """Flip health to NOT_SERVING, then stop, letting calls in flight finish for ``grace`` s."""
    await set_not_serving(server)
    await server.stop(grace)
    _HEALTH.pop(server, None)


__all__ = [
    "COORDINATOR_SERVICE",
    "HEALTH_SERVICE",
    "PARAMETER_SERVICE",
    "set_not_serving",
    "start_server",
    "stop_server",
]
