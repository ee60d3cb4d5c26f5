"""The data plane, ``sampa.v1.ParameterService``: points of a round out, gradients in.

A :class:`RoundBoard` publishes the points of the current round; workers fetch them
(``FetchPoint``) and stream their gradients back (``PushGradient``), which land in one
preallocated buffer per role and resolve that role's future. :class:`ParameterServicer` answers
the two calls on a board; :mod:`.server` hosts it.

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
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch

from ...proto.sampa.v1 import parameter_service_pb2 as ppb
from ...proto.sampa.v1 import parameter_service_pb2_grpc as pgrpc
from ...proto.sampa.v1 import tensor_pb2
from ..codec import MAX_CHUNK_BYTES, CodecError, Receiver, byte_view, dtype_name

PARAMETER_SERVICE = "sampa.v1.ParameterService"
SC = grpc.StatusCode


class Rejection(Exception):
    """A request the board refuses, with the status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
        first = await self._header(it)
        h = first.header
        role, round_id = h.role, b.round_id
        b.check_open(role, round_id)
        async with b.lock(role):
            b.check_open(role, round_id)  # another push for this role may have finished
            rx = await self._receive(first, it, role, round_id)
            meta = {"step": int(h.step), "role": role, "loss": float(h.loss),
                    "accuracy": float(h.accuracy), "timings": dict(h.timings),
                    "bytes": rx.total, "chunks": rx.chunks,
                    "receive_s": time.perf_counter() - t0}
            b.commit(role, round_id, meta)
            return ppb.PushReply(bytes=rx.total, chunks=rx.chunks)

    async def _header(self, it: AsyncIterator[ppb.GradientChunk]) -> ppb.GradientChunk:
        """The stream's first message, whose header must name a role of the open round and
        describe the gradient this board expects (dtype, shape, size) with a finite loss."""
        b = self.board
        try:
            first = await anext(it)
        except StopAsyncIteration:
            raise Rejection(SC.INVALID_ARGUMENT, "empty stream: the first message must carry "
                                                 "the header") from None
        if not first.HasField("header"):
            raise Rejection(SC.INVALID_ARGUMENT, "the first message carries no header")
        h = first.header
        b.check(h.run_id, h.step, h.role)
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
        return first

    async def _receive(self, first: ppb.GradientChunk, it: AsyncIterator[ppb.GradientChunk],
                       role: str, round_id: int) -> Receiver:
        """The gradient's chunks, from the first message on, into the role's buffer: each
        checked for non-finite values as it completes (the first one found is named), the
        round checked still open between messages."""
        b = self.board
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
        return rx


__all__ = [
    "PARAMETER_SERVICE",
    "ParameterServicer",
    "Rejection",
    "RoundBoard",
]
