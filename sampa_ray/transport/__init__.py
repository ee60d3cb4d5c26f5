"""gRPC transport for points and gradients, and the coordinator's control plane.

- :mod:`.codec`: tensors as chunked raw little-endian bytes, received into preallocated tensors
- :mod:`.grpc_server`: the coordinator's grpc.aio server (RoundBoard, services, health,
  reflection, token and TLS)
- :mod:`.grpc_client`: the worker's sync client (PointClient)
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
