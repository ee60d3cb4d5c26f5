"""Data paths: how points, gradients and state move between the coordinator and the workers.

Each path is one module holding both halves (see ``base``): the coordinator half the loop drives
as an executor, and the worker half each worker actor hosts. The coordinator picks one with
:func:`select` and never branches on which runs.

| module | points | gradients | update |
|---|---|---|---|
| ``points`` | coordinator → worker (object store) | worker → coordinator | coordinator |
| ``grpc`` | gRPC stream from the coordinator | gRPC stream back | coordinator |
| ``replicated`` | none (replicas) | worker → peer (object store) | every worker |
| ``collective`` | none (replicas) | torch.distributed broadcast | every worker |
"""

from __future__ import annotations

from ...config import TrainConfig
from .base import DataPath, GrpcEndpoint, PathContext
from .collective import CollectivePath
from .grpc import GrpcPath
from .points import PointsPath
from .replicated import ReplicatedPath

PATHS: dict[str, type[DataPath]] = {"points": PointsPath, "replicated": ReplicatedPath,
                                    "collective": CollectivePath}


def select(cfg: TrainConfig) -> type[DataPath]:
    """The coordinator half for the configured data path and transport."""
    if cfg.transport == "grpc":
        return GrpcPath
    return PATHS[cfg.resolved_data_path]


__all__ = ["PATHS", "DataPath", "GrpcEndpoint", "PathContext", "select"]
