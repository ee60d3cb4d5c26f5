"""The coordinator's gRPC server (grpc.aio, in the coordinator's event loop).

Data plane, ``sampa.v1.ParameterService``: a :class:`RoundBoard` publishes the points of the
current round; workers fetch them (``FetchPoint``) and stream their gradients back
(``PushGradient``), which land in one preallocated buffer per role and resolve that role's future.
Control plane, ``sampa.v1.CoordinatorService``: status, progress, checkpoint and stop, answered by
a handler object (see :class:`ControlHandler`). The standard health service and server reflection
run alongside.

Every push is validated message by message, and a rejected push leaves the round exactly as it was
(the role stays open, its future unresolved; the correct gradient can still be pushed):

    =============================================================  ===================
    run_id is not this board's run                                 NOT_FOUND
    role is not part of the current round                          NOT_FOUND
    step is not the current round's step (or no round is open)     FAILED_PRECONDITION
    the board is closed                                            FAILED_PRECONDITION
    first message without header, header repeated, message
    without chunk, wrong dtype / shape / numel / total_bytes,
    chunk offset out of order, empty or > 1 MiB chunk, bytes past
    the end (oversized stream), stream ending early                INVALID_ARGUMENT
    a non-finite gradient value or loss (NaN, +-Inf)               INVALID_ARGUMENT
    a gradient for a role already received in this round           ALREADY_EXISTS
    a message over the 2 MiB limit (checked by gRPC itself)        RESOURCE_EXHAUSTED
    =============================================================  ===================

Non-finite policy: a gradient holding NaN or Inf (or a non-finite loss) is rejected at the door
and never reaches the algorithm; values are checked as each chunk lands. The worker gets
INVALID_ARGUMENT naming the first bad element, the round stays open, and it is up to the
coordinator (its round timeout) to decide what happens to the run.

Security: the server binds only where told (default 127.0.0.1). A bind to a non-loopback address
requires a bearer token; with a token every call except the health checks must carry
``authorization: Bearer <token>`` metadata, else UNAUTHENTICATED. TLS is used when a certificate
and key are given.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..errors import UserError
from ..net import is_loopback
from ..proto.sampa.v1 import coordinator_service_pb2 as cpb
from ..proto.sampa.v1 import coordinator_service_pb2_grpc as cgrpc
from ..proto.sampa.v1 import parameter_service_pb2 as ppb
from ..proto.sampa.v1 import parameter_service_pb2_grpc as pgrpc
from ..proto.sampa.v1 import tensor_pb2
from .codec import GRPC_OPTIONS, MAX_CHUNK_BYTES, CodecError, Receiver, byte_view, dtype_name

PARAMETER_SERVICE = "sampa.v1.ParameterService"
COORDINATOR_SERVICE = "sampa.v1.CoordinatorService"
HEALTH_SERVICE = health.SERVICE_NAME
SC = grpc.StatusCode


class Rejection(Exception):
    """A request the board refuses, with the status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- the data plane ------------------------------------------------------------------------------
class RoundBoard:
    """Points of the current round out, gradients in; one round at a time.

    ``step`` identifies a round (the update step, or any round counter the coordinator uses).
    Gradients are received into one preallocated buffer per role, reused every round: the tensor a
    future resolves to is that buffer, valid until the next :meth:`open_round` (clone it to keep
    it). The points are served from the given tensors without copying: do not modify them until
    the round's futures have resolved. Use from the event loop the server runs in.
    """

    def __init__(self, run_id: str, numel: int, dtype: torch.dtype = torch.float32,
                 grad_dtype: torch.dtype | None = None) -> None:
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        self.run_id = run_id
        self.numel = int(numel)
        self.dtype = dtype  # of the points
        self.dtype_name = dtype_name(dtype)
        self.set_grad_dtype(grad_dtype or dtype)
        self.shape = (self.numel,)
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.nbytes = self.numel * self.itemsize
        self.step: int | None = None
        self.closed = False
        self.round_id = 0
        self._points: dict[str, torch.Tensor] = {}
        self._point_bytes: dict[str, memoryview] = {}
        self._futures: dict[str, asyncio.Future[tuple[torch.Tensor, dict[str, Any]]]] = {}
        self._received: set[str] = set()
        self._buffers: dict[str, torch.Tensor] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # the coordinator's side
    def set_grad_dtype(self, dtype: torch.dtype) -> None:
        """The gradients' dtype (bf16 with a bf16 wire); between runs only."""
        self.grad_dtype = dtype
        self.grad_dtype_name = dtype_name(dtype)
        self._buffers = {}

    def open_round(self, step: int, points: dict[str, torch.Tensor]
                   ) -> dict[str, asyncio.Future[tuple[torch.Tensor, dict[str, Any]]]]:
        """Publish the points of round ``step`` (one per role); returns one future per role that
        resolves to ``(grad, meta)`` when that role's gradient is in. Futures of an unfinished
        earlier round are cancelled."""
        if self.closed:
            raise RuntimeError("the board is closed")
        if not points:
            raise ValueError("a round needs at least one point")
        for role, p in points.items():
            if p.dtype != self.dtype or p.numel() != self.numel:
                raise ValueError(f"point {role!r}: {p.numel()} x {p.dtype}, expected "
                                 f"{self.numel} x {self.dtype}")
            if p.device.type != "cpu" or not p.is_contiguous():
                raise ValueError(f"point {role!r} must be a contiguous CPU tensor")
        loop = asyncio.get_running_loop()
        self._cancel_pending()
        self.round_id += 1
        self.step = int(step)
        self._points = {role: p.detach().reshape(-1) for role, p in points.items()}
        self._point_bytes = {role: memoryview(byte_view(p)) for role, p in self._points.items()}
        self._received = set()
        self._futures = {role: loop.create_future() for role in points}
        for role in points:
            if role not in self._buffers:
                self._buffers[role] = torch.empty(self.numel, dtype=self.grad_dtype)
                self._locks[role] = asyncio.Lock()
        return dict(self._futures)

    def close(self) -> None:
        """End the run: pending futures are cancelled and every later call is refused."""
        self.closed = True
        self._cancel_pending()
        self._points, self._point_bytes = {}, {}

    def _cancel_pending(self) -> None:
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles of the current round."""
        return tuple(self._futures)

    @property
    def received(self) -> frozenset[str]:
        """Roles whose gradient is in for the current round."""
        return frozenset(self._received)

    # the servicer's side
    def check(self, run_id: str, step: int, role: str) -> None:
        """Raise :class:`Rejection` unless (run_id, step, role) names a role of the open round."""
        if run_id != self.run_id:
            raise Rejection(SC.NOT_FOUND, f"unknown run {run_id!r} (this coordinator serves "
                                          f"{self.run_id!r})")
        if self.closed:
            raise Rejection(SC.FAILED_PRECONDITION, f"run {self.run_id!r} has finished")
        if self.step is None:
            raise Rejection(SC.FAILED_PRECONDITION, f"step {step}: no round is open yet")
        if step != self.step:
            raise Rejection(SC.FAILED_PRECONDITION, f"step {step} is not the current step "
                                                    f"{self.step}")
        if role not in self._futures:
            raise Rejection(SC.NOT_FOUND, f"no role {role!r} in step {step} (roles: "
                                          f"{', '.join(self._futures)})")

    def check_open(self, role: str, round_id: int) -> None:
        """Raise unless the round ``round_id`` is still current and ``role`` still open in it."""
        if self.closed:
            raise Rejection(SC.FAILED_PRECONDITION, f"run {self.run_id!r} has finished")
        if round_id != self.round_id:
            raise Rejection(SC.FAILED_PRECONDITION, "the round moved on while the stream was "
                                                    "open")
        if role in self._received:
            raise Rejection(SC.ALREADY_EXISTS, f"the gradient for role {role!r} at step "
                                               f"{self.step} is already in")

    def point_bytes(self, role: str) -> memoryview:
        return self._point_bytes[role]

    def buffer(self, role: str) -> torch.Tensor:
        return self._buffers[role]

    def lock(self, role: str) -> asyncio.Lock:
        return self._locks[role]

    def commit(self, role: str, round_id: int, meta: dict[str, Any]) -> None:
        """Mark ``role`` received and resolve its future with its buffer."""
        self.check_open(role, round_id)
        self._received.add(role)
        fut = self._futures[role]
        if not fut.done():
            fut.set_result((self._buffers[role], meta))


def _first_nonfinite(v: torch.Tensor) -> int | None:
    if v.numel() == 0 or not v.is_floating_point():
        return None
    ok = torch.isfinite(v)
    if bool(ok.all()):
        return None
    return int((~ok).nonzero()[0, 0])


class ParameterServicer(pgrpc.ParameterServiceServicer):
    """``sampa.v1.ParameterService`` on a :class:`RoundBoard`."""

    def __init__(self, board: RoundBoard, chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.board = board
        self.chunk_bytes = chunk_bytes

    async def FetchPoint(self, request: ppb.PointRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[tensor_pb2.TensorChunk]:
        b = self.board
        try:
            b.check(request.run_id, request.step, request.role)
            round_id = b.round_id
            if request.role in b.received:
                raise Rejection(SC.FAILED_PRECONDITION,
                                f"the gradient for role {request.role!r} at step {request.step} "
                                "is already in; its point is no longer served")
        except Rejection as r:
            await context.abort(r.code, r.message)
        view = b.point_bytes(request.role)
        total = len(view)
        shape = list(b.shape)
        offsets = range(0, total, self.chunk_bytes) if total else range(1)
        for offset in offsets:
            if b.round_id != round_id or b.closed:
                await context.abort(SC.ABORTED, "the round moved on while the point was streamed")
            yield tensor_pb2.TensorChunk(dtype=b.dtype_name, shape=shape, total_bytes=total,
                                         offset=offset,
                                         data=bytes(view[offset:offset + self.chunk_bytes]))

    async def PushGradient(self, request_iterator: AsyncIterator[ppb.GradientChunk],
                           context: grpc.aio.ServicerContext) -> ppb.PushReply:
        try:
            return await self._push(request_iterator)
        except Rejection as r:
            await context.abort(r.code, r.message)
            raise  # unreachable: abort raises

    async def _push(self, messages: AsyncIterator[ppb.GradientChunk]) -> ppb.PushReply:
        b = self.board
        t0 = time.perf_counter()
        it = aiter(messages)
        try:
            first = await anext(it)
        except StopAsyncIteration:
            raise Rejection(SC.INVALID_ARGUMENT, "empty stream: the first message must carry "
                                                 "the header") from None
        if not first.HasField("header"):
            raise Rejection(SC.INVALID_ARGUMENT, "the first message carries no header")
        h = first.header
        b.check(h.run_id, h.step, h.role)
        role = h.role
        if h.dtype != b.grad_dtype_name:
            raise Rejection(SC.INVALID_ARGUMENT, f"header: dtype {h.dtype!r} does not match the "
                                                 f"expected {b.grad_dtype_name!r}")
        if tuple(h.shape) != b.shape:
            raise Rejection(SC.INVALID_ARGUMENT, f"header: shape {list(h.shape)} does not match "
                                                 f"the expected {list(b.shape)}")
        if h.numel != b.numel:
            raise Rejection(SC.INVALID_ARGUMENT, f"header: numel {h.numel} does not match the "
                                                 f"expected {b.numel}")
        if not math.isfinite(h.loss):
            raise Rejection(SC.INVALID_ARGUMENT, f"header: non-finite loss {h.loss}")
        round_id = b.round_id
        b.check_open(role, round_id)
        async with b.lock(role):
            b.check_open(role, round_id)  # another push for this role may have finished
            rx = Receiver(b.buffer(role), max_chunk_bytes=MAX_CHUNK_BYTES)
            msg: ppb.GradientChunk | None = first
            index = 1
            while msg is not None:
                if index > 1 and msg.HasField("header"):
                    raise Rejection(SC.INVALID_ARGUMENT, f"message {index} repeats the header")
                if not msg.HasField("chunk"):
                    raise Rejection(SC.INVALID_ARGUMENT, f"message {index} carries no chunk")
                try:
                    rx.add(msg.chunk)
                except CodecError as err:
                    raise Rejection(SC.INVALID_ARGUMENT, str(err)) from None
                done = rx.take_complete()
                bad = _first_nonfinite(done)
                if bad is not None:
                    at = rx.offset // rx.itemsize - done.numel() + bad
                    raise Rejection(SC.INVALID_ARGUMENT,
                                    f"non-finite gradient value {float(done[bad])} at element "
                                    f"{at}")
                b.check_open(role, round_id)
                msg = await anext(it, None)
                index += 1
            try:
                rx.finish()
            except CodecError as err:
                raise Rejection(SC.INVALID_ARGUMENT, str(err)) from None
            meta = {"step": int(h.step), "role": role, "loss": float(h.loss),
                    "accuracy": float(h.accuracy), "timings": dict(h.timings),
                    "bytes": rx.total, "chunks": rx.chunks,
                    "receive_s": time.perf_counter() - t0}
            b.commit(role, round_id, meta)
            return ppb.PushReply(bytes=rx.total, chunks=rx.chunks)


# -- the control plane ---------------------------------------------------------------------------
class ControlHandler(Protocol):
    """What :class:`ControlServicer` asks of the coordinator. Each method may be sync or async.

    - ``status() -> dict``: keys of ``StatusReply`` (run_id, algorithm, step, epoch, loss,
      accuracy, workers: list of {name, state, pid, device}, transport, metrics_port,
      total_steps, state); missing keys are left at their defaults.
    - ``progress() -> AsyncIterator[dict]``: progress events (keys of ``ProgressEvent``; ``algo``
      and ``round_s`` are accepted for ``algorithm`` and ``round_seconds``). :class:`ProgressHub`
      gives one.
    - ``checkpoint() -> str``: writes a checkpoint, returns its path.
    - ``stop() -> None | bool``: finish the current round, write outputs, exit; ``False``
      declines.

    A method the handler lacks, or one raising NotImplementedError, answers UNIMPLEMENTED;
    LookupError NOT_FOUND; ValueError / UserError / RuntimeError FAILED_PRECONDITION;
    TimeoutError DEADLINE_EXCEEDED; anything else INTERNAL.
    """

    def status(self) -> dict[str, Any] | Awaitable[dict[str, Any]]: ...

    def progress(self) -> AsyncIterator[dict[str, Any]]: ...

    def checkpoint(self) -> str | Awaitable[str]: ...

    def stop(self) -> bool | None | Awaitable[bool | None]: ...


class ProgressHub:
    """Fan-out of progress events to any number of watchers. ``publish`` never blocks: a watcher
    that falls more than ``maxsize`` events behind loses its oldest ones. Use from one event loop.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self.closed = False
        self._queues: set[asyncio.Queue[dict[str, Any] | None]] = set()

    @property
    def watchers(self) -> int:
        return len(self._queues)

    def publish(self, event: dict[str, Any]) -> None:
        """Send ``event`` to every current watcher."""
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

    def close(self) -> None:
        """End every watch (after the events already queued)."""
        self.closed = True
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """Events published from now on, until :meth:`close`."""
        if self.closed:
            return
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self.maxsize)
        self._queues.add(q)
        try:
            while (ev := await q.get()) is not None:
                yield ev
        finally:
            self._queues.discard(q)


_EVENT_ALIASES = {"algo": "algorithm", "round_s": "round_seconds"}
_FD = FieldDescriptor
_CASTS: dict[int, Callable[[Any], Any]] = {
    _FD.CPPTYPE_DOUBLE: float, _FD.CPPTYPE_FLOAT: float, _FD.CPPTYPE_INT64: int,
    _FD.CPPTYPE_INT32: int, _FD.CPPTYPE_UINT64: int, _FD.CPPTYPE_UINT32: int,
    _FD.CPPTYPE_BOOL: bool, _FD.CPPTYPE_STRING: str,
}


def _scalars(cls: type[Message], d: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``d`` that are scalar fields of ``cls``, cast to the field's type (None and
    unknown keys are dropped)."""
    out = {}
    for f in cls.DESCRIPTOR.fields:
        value = d.get(f.name)
        if value is not None and f.cpp_type in _CASTS and not f.is_repeated:
            out[f.name] = _CASTS[f.cpp_type](value)
    return out


def status_message(d: dict[str, Any]) -> cpb.StatusReply:
    """A ``StatusReply`` from a handler's status dict (unknown keys are ignored)."""
    reply = cpb.StatusReply(**_scalars(cpb.StatusReply, d))
    for w in d.get("workers") or ():
        reply.workers.add(**_scalars(cpb.WorkerStatus, w))
    return reply


def event_message(ev: dict[str, Any]) -> cpb.ProgressEvent:
    """A ``ProgressEvent`` from an event dict (``algo`` and ``round_s`` are accepted for
    ``algorithm`` and ``round_seconds``; unknown keys are ignored)."""
    fields = _scalars(cpb.ProgressEvent, {_EVENT_ALIASES.get(k, k): v for k, v in ev.items()})
    fields.setdefault("time", time.time())
    return cpb.ProgressEvent(**fields)


def _code_for(err: BaseException) -> grpc.StatusCode:
    if isinstance(err, NotImplementedError):
        return SC.UNIMPLEMENTED
    if isinstance(err, LookupError):
        return SC.NOT_FOUND
    if isinstance(err, TimeoutError):
        return SC.DEADLINE_EXCEEDED
    if isinstance(err, UserError | ValueError | RuntimeError):
        return SC.FAILED_PRECONDITION
    return SC.INTERNAL


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ControlServicer(cgrpc.CoordinatorServiceServicer):
    """``sampa.v1.CoordinatorService`` answered by a :class:`ControlHandler`."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def _method(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.handler, name, None)
        if not callable(fn):
            raise NotImplementedError(f"the coordinator does not support {name}")
        return fn

    async def _call(self, name: str, context: grpc.aio.ServicerContext) -> Any:
        try:
            out = self._method(name)()
            if inspect.isawaitable(out):
                out = await out
            return out
        except Exception as err:  # mapped to a status; the message is one line
            await context.abort(_code_for(err), f"{name}: {_one_line(err)}")

    async def GetStatus(self, request: cpb.StatusRequest, context: grpc.aio.ServicerContext
                        ) -> cpb.StatusReply:
        d = await self._call("status", context)
        try:
            return status_message(d)
        except (TypeError, ValueError, AttributeError) as err:
            await context.abort(SC.INTERNAL, f"status: bad status from the coordinator: "
                                             f"{_one_line(err)}")
            raise

    async def WatchProgress(self, request: cpb.WatchRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[cpb.ProgressEvent]:
        events = await self._call("progress", context)
        sent = 0
        try:
            async for ev in events:
                yield event_message(ev)
                sent += 1
                if request.max_events and sent >= request.max_events:
                    break
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def Checkpoint(self, request: cpb.CheckpointRequest,
                         context: grpc.aio.ServicerContext) -> cpb.CheckpointReply:
        path = await self._call("checkpoint", context)
        return cpb.CheckpointReply(path=str(path))

    async def Stop(self, request: cpb.StopRequest, context: grpc.aio.ServicerContext
                   ) -> cpb.StopReply:
        out = await self._call("stop", context)
        return cpb.StopReply(accepted=out is None or bool(out))


# -- the server ----------------------------------------------------------------------------------
class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but the health checks unless it carries the bearer token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(f"/{HEALTH_SERVICE}/") or handler is None:
            return handler
        got = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(got.encode("utf-8", "replace"), self._expected):
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
        raise UserError(f"port: cannot bind {addr} ({_one_line(err)})") from None
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
    "PARAMETER_SERVICE",
    "ControlHandler",
    "ControlServicer",
    "ParameterServicer",
    "ProgressHub",
    "Rejection",
    "RoundBoard",
    "event_message",
    "is_loopback",
    "set_not_serving",
    "start_server",
    "status_message",
    "stop_server",
]
