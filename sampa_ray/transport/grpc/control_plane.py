"""The control plane, ``sampa.v1.CoordinatorService``: status, progress, checkpoint and stop.

The coordinator answers through a handler object (see :class:`ControlHandler`);
:class:`ControlServicer` turns its dicts into messages and its exceptions into precise status
codes, so the coordinator itself knows nothing of gRPC. :class:`ProgressHub` fans progress
events out to any number of watchers without ever blocking the training loop. :mod:`.server`
hosts the servicer; :mod:`.client` holds the calls that talk to it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ...errors import UserError, error_line
from ...proto.sampa.v1 import coordinator_service_pb2 as cpb
from ...proto.sampa.v1 import coordinator_service_pb2_grpc as cgrpc

COORDINATOR_SERVICE = "sampa.v1.CoordinatorService"
SC = grpc.StatusCode


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
            await context.abort(_code_for(err), f"{name}: {error_line(err)}")

    async def GetStatus(self, request: cpb.StatusRequest, context: grpc.aio.ServicerContext
                        ) -> cpb.StatusReply:
        d = await self._call("status", context)
        try:
            return status_message(d)
        except (TypeError, ValueError, AttributeError) as err:
            await context.abort(SC.INTERNAL, f"status: bad status from the coordinator: "
                                             f"{error_line(err)}")
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


__all__ = [
    "COORDINATOR_SERVICE",
    "ControlHandler",
    "ControlServicer",
    "ProgressHub",
    "event_message",
    "status_message",
]
