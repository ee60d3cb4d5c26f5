"""The worker's side of the data plane (sync gRPC): fetch a point, push a gradient.

Create the :class:`PointClient` inside the process that uses it (gRPC channels do not survive a
fork), e.g. in a worker actor's ``__init__``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import grpc
import torch

from ..proto.sampa.v1 import parameter_service_pb2 as ppb
from ..proto.sampa.v1 import parameter_service_pb2_grpc as pgrpc
from ..proto.sampa.v1 import tensor_pb2
from .codec import GRPC_OPTIONS, MAX_CHUNK_BYTES, CodecError, Receiver, dtype_name, encode_chunks


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
