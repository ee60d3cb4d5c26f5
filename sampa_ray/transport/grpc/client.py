"""The clients of the coordinator's gRPC server: the worker's data plane and the control API.

:class:`PointClient` is the worker's side of the data plane (sync gRPC): fetch a point, push a
gradient. Create it inside the process that uses it (gRPC channels do not survive a fork), e.g.
in a worker actor's ``__init__``.

:func:`get_status`, :func:`watch`, :func:`request_checkpoint` and :func:`request_stop` talk to a
running coordinator over its control plane (``sampa.v1.CoordinatorService``); they back
``sampa-ray status|watch|checkpoint|stop --target HOST:PORT``. Every failure a user can cause
there (bad target, nothing listening, wrong token) raises :class:`UserError` with one line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from ...errors import UserError
from ...proto.sampa.v1 import coordinator_service_pb2 as cpb
from ...proto.sampa.v1 import coordinator_service_pb2_grpc as cgrpc
from ...proto.sampa.v1 import parameter_service_pb2 as ppb
from ...proto.sampa.v1 import parameter_service_pb2_grpc as pgrpc
from ...proto.sampa.v1 import tensor_pb2
from ..codec import GRPC_OPTIONS, MAX_CHUNK_BYTES, CodecError, Receiver, dtype_name, encode_chunks

T = TypeVar("T")


class TransportError(RuntimeError):
    """A call the coordinator refused or that failed; ``code`` is the gRPC status name."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (str(self), self.code)

    @classmethod
    def from_rpc(cls, what: str, err: grpc.RpcError) -> TransportError:
        code = err.code() if isinstance(err, grpc.Call) else None
        name = code.name if code is not None else "UNKNOWN"
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        return cls(f"{what}: {name}: {details}", name)


def make_channel(target: str, root_cert: bytes | None = None) -> grpc.Channel:
    """A sync channel to ``target`` (HOST:PORT) with the message limits set; TLS when
    ``root_cert`` (PEM of the CA or self-signed certificate to trust) is given."""
    if root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
        return grpc.secure_channel(target, creds, options=GRPC_OPTIONS)
    return grpc.insecure_channel(target, options=GRPC_OPTIONS)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The ``authorization: Bearer <token>`` metadata, or None without a token."""
    return (("authorization", f"Bearer {token}"),) if token else None


class PointClient:
    """Fetches points from and pushes gradients to the coordinator's ParameterService."""

    def __init__(self, target: str, run_id: str, token: str | None = None,
                 root_cert: bytes | None = None, *, timeout: float | None = 300.0,
                 chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        self.target = target
        self.run_id = run_id
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._metadata = auth_metadata(token)
        self._channel = make_channel(target, root_cert)
        self._stub = pgrpc.ParameterServiceStub(self._channel)
        #: chunks of the last fetch / push
        self.last_chunks = 0

    def fetch_point(self, step: int, role: str, out: torch.Tensor) -> float:
        """Write the point of (step, role) into ``out`` (contiguous CPU, the run's dtype and
        shape); returns the seconds it took. Raises TransportError or CodecError."""
        t0 = time.perf_counter()
        rx = Receiver(out)
        call = self._stub.FetchPoint(ppb.PointRequest(run_id=self.run_id, step=step, role=role),
                                     timeout=self.timeout, metadata=self._metadata)
        try:
            for chunk in call:
                rx.add(chunk)
            rx.finish()
        except grpc.RpcError as err:
            raise TransportError.from_rpc(f"FetchPoint(step {step}, role {role!r})",
                                          err) from None
        except CodecError:
            call.cancel()
            raise
        self.last_chunks = rx.chunks
        return time.perf_counter() - t0

    def _messages(self, step: int, role: str, grad: torch.Tensor, loss: float, accuracy: float,
                  timings: Mapping[str, float]) -> Iterator[ppb.GradientChunk]:
        name = dtype_name(grad.dtype)
        shape = list(grad.shape)
        total = grad.numel() * grad.element_size()
        header = ppb.GradientHeader(run_id=self.run_id, step=step, role=role, dtype=name,
                                    shape=shape, numel=grad.numel(), loss=loss,
                                    accuracy=accuracy, timings=dict(timings))
        for i, (offset, data) in enumerate(encode_chunks(grad, self.chunk_bytes)):
            chunk = tensor_pb2.TensorChunk(dtype=name, shape=shape, total_bytes=total,
                                           offset=offset, data=bytes(data))
            yield ppb.GradientChunk(header=header, chunk=chunk) if i == 0 else \
                ppb.GradientChunk(chunk=chunk)

    def push_gradient(self, step: int, role: str, grad: torch.Tensor, loss: float,
                      accuracy: float, timings: Mapping[str, float] | None = None) -> float:
        """Stream ``grad`` (flat, the run's dtype) for (step, role) with the batch's loss and
        accuracy and the worker's timings; returns the seconds it took. Raises TransportError."""
        t0 = time.perf_counter()
        try:
            reply = self._stub.PushGradient(
                self._messages(step, role, grad, float(loss), float(accuracy), timings or {}),
                timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise TransportError.from_rpc(f"PushGradient(step {step}, role {role!r})",
                                          err) from None
        self.last_chunks = reply.chunks
        return time.perf_counter() - t0

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the control API -------------------------------------------------------------------------------
def check_target(target: str) -> str:
    """``target`` if it reads HOST:PORT (``[v6addr]:PORT`` for IPv6), else UserError."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", target or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UserError(f"target: expected HOST:PORT, got {target!r}")
    return target


def _reason(err: grpc.RpcError) -> str:
    details = (err.details() or "") if isinstance(err, grpc.Call) else str(err)
    low = details.lower()
    if "refused" in low:
        return "connection refused"
    if "dns" in low or "resolve" in low or "name or service not known" in low:
        return "host name not resolved"
    if "handshake" in low or "ssl" in low or "certificate" in low:
        return "TLS handshake failed"
    last = details.strip().splitlines()[0] if details.strip() else "unavailable"
    return last.rsplit(": ", 1)[-1].strip().lower() or "unavailable"


def _user_error(target: str, err: grpc.RpcError, timeout: float | None) -> UserError:
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.UNAVAILABLE:
        return UserError(f"target: cannot reach {target} ({_reason(err)})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f"within {timeout:g}s" if timeout else "in time"
        return UserError(f"target: cannot reach {target} (no answer {within})")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UserError(f"token: {target} refused the call (missing or wrong token)")
    details = (err.details() or "").strip().splitlines() if isinstance(err, grpc.Call) else []
    return UserError(f"target: {target} answered {code.name}: "
                     f"{details[0] if details else 'no details'}")


def _call(target: str, timeout: float | None, token: str | None, root_cert: bytes | None,
          fn: Callable[[cgrpc.CoordinatorServiceStub, Any], T]) -> T:
    check_target(target)
    with make_channel(target, root_cert) as channel:
        stub = cgrpc.CoordinatorServiceStub(channel)
        try:
            return fn(stub, {"timeout": timeout, "metadata": auth_metadata(token)})
        except grpc.RpcError as err:
            raise _user_error(target, err, timeout) from None


def message_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message as a plain dict (unset optional fields are None)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.is_repeated:
            out[f.name] = [message_dict(v) if f.message_type else v for v in value]
        elif f.message_type is not None:
            out[f.name] = message_dict(value) if msg.HasField(f.name) else None
        elif f.has_presence and not msg.HasField(f.name):
            out[f.name] = None
        else:
            out[f.name] = value
    return out


def get_status(target: str, timeout: float = 5.0, token: str | None = None,
               root_cert: bytes | None = None) -> dict[str, Any]:
    """The coordinator's status (keys of ``StatusReply``; ``workers`` a list of dicts)."""
    return _call(target, timeout, token, root_cert,
                 lambda stub, kw: message_dict(stub.GetStatus(cpb.StatusRequest(), **kw)))


def request_stop(target: str, timeout: float = 5.0, token: str | None = None,
                 root_cert: bytes | None = None) -> dict[str, Any]:
    """Ask the coordinator to finish the current round, write its outputs and exit:
    ``{"accepted": bool}``."""
    return _call(target, timeout, token, root_cert,
                 lambda stub, kw: message_dict(stub.Stop(cpb.StopRequest(), **kw)))


def request_checkpoint(target: str, timeout: float = 120.0, token: str | None = None,
                       root_cert: bytes | None = None) -> dict[str, Any]:
    """Ask the coordinator to write a checkpoint: ``{"path": str}`` (on its node)."""
    return _call(target, timeout, token, root_cert,
                 lambda stub, kw: message_dict(stub.Checkpoint(cpb.CheckpointRequest(), **kw)))


def watch(target: str, n_events: int = 0, timeout: float | None = None,
          token: str | None = None, root_cert: bytes | None = None
          ) -> Iterator[dict[str, Any]]:
    """Progress events as they happen (keys of ``ProgressEvent``): ``n_events`` of them, or
    until the run ends when 0. ``timeout`` (seconds) bounds the whole watch."""
    check_target(target)
    with make_channel(target, root_cert) as channel:
        stub = cgrpc.CoordinatorServiceStub(channel)
        call = stub.WatchProgress(cpb.WatchRequest(max_events=max(0, n_events)),
                                  timeout=timeout, metadata=auth_metadata(token))
        try:
            for ev in call:
                yield message_dict(ev)
        except grpc.RpcError as err:
            raise _user_error(target, err, timeout) from None
        finally:
            call.cancel()


__all__ = [
    "PointClient",
    "TransportError",
    "auth_metadata",
    "check_target",
    "get_status",
    "make_channel",
    "message_dict",
    "request_checkpoint",
    "request_stop",
    "watch",
]
