"""gRPC transport for points and gradients, and the coordinator's control plane.

- :mod:`.codec`: tensors as chunked raw little-endian bytes, received into preallocated tensors
- :mod:`.grpc`: the coordinator's grpc.aio server (RoundBoard, services, health, reflection,
  token and TLS), the worker's sync client (PointClient) and the control-API client
- :mod:`.link`: an emulated network link (latency and bandwidth per message)
"""

from .codec import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, CodecError, Receiver, assemble, encode_chunks

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "CodecError",
    "Receiver",
    "assemble",
    "encode_chunks",
]
