"""Tensors as raw little-endian bytes in chunks, and chunks back into a preallocated tensor.

Sending: :func:`encode_chunks` yields zero-copy ``memoryview`` slices of a tensor's memory, at
most ``chunk_bytes`` each. Receiving: a :class:`Receiver` writes each incoming chunk straight into
its slot of a destination tensor allocated once (no reassembly by concatenation) and checks dtype,
shape, total length and offsets as it goes; any mismatch raises :class:`CodecError` naming it.

Wire layout: the elements in C order, each little-endian. Every supported host is little-endian,
so the bytes on the wire are the tensor's memory as it is.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from ..proto.sampa.v1 import tensor_pb2

#: largest chunk of tensor bytes in one message
MAX_CHUNK_BYTES = 1 << 20
#: largest gRPC message either side sends or accepts: one chunk plus its header
MAX_MESSAGE_BYTES = 2 << 20
#: channel and server options that set both limits
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CodecError(ValueError):
    """A chunk or stream that does not match the tensor it should fill."""


class ChunkMessage(Protocol):
    """What :meth:`Receiver.add` reads from a chunk (``sampa.v1.TensorChunk``)."""

    dtype: str
    total_bytes: int
    offset: int
    data: bytes

    @property
    def shape(self) -> Sequence[int]: ...


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise CodecError("big-endian hosts are not supported (the wire format is little-endian)")


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype, e.g. ``"float32"``."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} is not supported (supported: {', '.join(DTYPES)})"
                         ) from None


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a wire name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CodecError(f"dtype {name!r} is not supported (supported: {', '.join(DTYPES)})"
                         ) from None


def nbytes(t: torch.Tensor) -> int:
    """Length in bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A writable flat ``uint8`` numpy view of a contiguous CPU tensor's memory (no copy)."""
    _require_little_endian()
    if t.device.type != "cpu":
        raise CodecError(f"tensor is on {t.device}, expected a CPU tensor")
    if not t.is_contiguous():
        raise CodecError("tensor is not contiguous")
    dtype_name(t.dtype)
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def to_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array for Ray's object store, without copying. numpy has no
    bfloat16: a bf16 tensor travels as its 16-bit patterns (``int16``), which :func:`from_array`
    reads back as bf16."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_array(a: np.ndarray) -> torch.Tensor:
    """The tensor :func:`to_array` made, as fp32 (a bf16 payload is widened, exactly; an fp32
    one is a view of the array, without copying)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16).float() if t.dtype == torch.int16 else t


def encode_chunks(t: torch.Tensor, chunk_bytes: int = MAX_CHUNK_BYTES
                  ) -> Iterator[tuple[int, memoryview]]:
    """``(offset, bytes)`` of consecutive chunks of ``t``'s memory, at most ``chunk_bytes`` each.

    A contiguous CPU tensor is sliced without copying (the views are valid while ``t`` is not
    modified); any other tensor is first copied to contiguous CPU memory. An empty tensor gives
    one empty chunk, so every stream has at least one message.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    view = memoryview(byte_view(t))
    total = len(view)
    if total == 0:
        yield 0, view
        return
    for offset in range(0, total, chunk_bytes):
        yield offset, view[offset:offset + chunk_bytes]


def chunk_count(total_bytes: int, chunk_bytes: int = MAX_CHUNK_BYTES) -> int:
    """How many chunks :func:`encode_chunks` makes of ``total_bytes`` bytes."""
    return max(1, math.ceil(total_bytes / chunk_bytes))


class Receiver:
    """Writes the chunks of one tensor, in order, into the preallocated tensor ``out``.

    ``add(chunk)`` (or ``check_meta`` + ``feed``) per message, then ``finish()``. ``out`` must be
    contiguous, on the CPU, and of the dtype and shape the sender announces. On an error the
    content of ``out`` is unspecified (partly written); nothing else changes.
    """

    def __init__(self, out: torch.Tensor, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.out = out
        self.bytes = byte_view(out)
        self.dtype = dtype_name(out.dtype)
        self.shape = tuple(out.shape)
        self.total = nbytes(out)
        self.itemsize = out.element_size()
        self.max_chunk_bytes = max_chunk_bytes
        self.offset = 0
        self.chunks = 0
        self._flat = out.detach().reshape(-1)
        self._taken = 0  # elements handed out by take_complete()

    def check_meta(self, dtype: str, shape: Sequence[int], total_bytes: int) -> None:
        """Check what a chunk says about the whole tensor against ``out``."""
        if dtype != self.dtype:
            raise CodecError(f"dtype {dtype!r} does not match the expected {self.dtype!r}")
        if tuple(shape) != self.shape:
            raise CodecError(f"shape {list(shape)} does not match the expected "
                             f"{list(self.shape)}")
        if total_bytes != self.total:
            raise CodecError(f"total_bytes {total_bytes} does not match the expected "
                             f"{self.total} ({math.prod(self.shape)} x {self.dtype})")

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        """Write one chunk at ``offset``; chunks must arrive in order with no gap or overlap."""
        n = len(data)
        if self.chunks > 0 and self.offset == self.total:
            raise CodecError(f"chunk {self.chunks + 1} arrived after the tensor was complete "
                             f"({self.total} bytes)")
        if offset != self.offset:
            raise CodecError(f"chunk {self.chunks + 1} is at offset {offset}, expected "
                             f"{self.offset}")
        if n > self.max_chunk_bytes:
            raise CodecError(f"chunk {self.chunks + 1} holds {n} bytes, more than the "
                             f"{self.max_chunk_bytes} allowed")
        if n == 0 and self.total > 0:
            raise CodecError(f"chunk {self.chunks + 1} is empty")
        if offset + n > self.total:
            raise CodecError(f"chunk {self.chunks + 1} ends at byte {offset + n}, past the end "
                             f"of the tensor ({self.total} bytes)")
        if n:
            self.bytes[offset:offset + n] = np.frombuffer(data, dtype=np.uint8)
        self.offset += n
        self.chunks += 1

    def add(self, chunk: ChunkMessage) -> None:
        """Check and write one ``TensorChunk`` message."""
        self.check_meta(chunk.dtype, chunk.shape, chunk.total_bytes)
        self.feed(chunk.offset, chunk.data)

    @property
    def complete(self) -> bool:
        return self.chunks > 0 and self.offset == self.total

    def take_complete(self) -> torch.Tensor:
        """A flat view of the elements completed since the last call (for checking values as
        they arrive)."""
        end = self.offset // self.itemsize
        view = self._flat[self._taken:end]
        self._taken = end
        return view

    def finish(self) -> torch.Tensor:
        """Check the stream ended exactly at the end of the tensor; returns ``out``."""
        if self.chunks == 0:
            raise CodecError("the stream held no chunk")
        if self.offset != self.total:
            raise CodecError(f"the stream ended after {self.offset} of {self.total} bytes")
        return self.out


def assemble(chunks: Iterable[ChunkMessage], out: torch.Tensor,
             max_chunk_bytes: int = MAX_CHUNK_BYTES) -> torch.Tensor:
    """Write a stream of ``TensorChunk`` messages into ``out``; returns ``out``."""
    rx = Receiver(out, max_chunk_bytes)
    for chunk in chunks:
        rx.add(chunk)
    return rx.finish()


def tensor_chunks(t: torch.Tensor, chunk_bytes: int = MAX_CHUNK_BYTES,
                  shape: Sequence[int] | None = None) -> Iterator[tensor_pb2.TensorChunk]:
    """``sampa.v1.TensorChunk`` messages of ``t`` (each message holds a copy of its bytes)."""
    name = dtype_name(t.dtype)
    dims = list(t.shape if shape is None else shape)
    total = nbytes(t)
    for offset, data in encode_chunks(t, chunk_bytes):
        yield tensor_pb2.TensorChunk(dtype=name, shape=dims, total_bytes=total, offset=offset,
                                     data=bytes(data))
