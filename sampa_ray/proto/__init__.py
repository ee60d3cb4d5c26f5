"""Generated protobuf and gRPC code for ``protos/sampa/v1`` (regenerate: scripts/gen_protos.sh).

    from sampa_ray.proto import tensor_pb2, parameter_service_pb2_grpc
"""

from .sampa.v1 import (
    coordinator_service_pb2,
    coordinator_service_pb2_grpc,
    parameter_service_pb2,
    parameter_service_pb2_grpc,
    tensor_pb2,
)

__all__ = [
    "coordinator_service_pb2",
    "coordinator_service_pb2_grpc",
    "parameter_service_pb2",
    "parameter_service_pb2_grpc",
    "tensor_pb2",
]
