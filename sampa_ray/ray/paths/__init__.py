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
| ``free`` | none (replicas) | torch.distributed, rounds run by the workers | every worker |
"""

from __future__ import annotations

import importlib

from ... import datapaths
from ...config import TrainConfig
from .base import DataPath, GrpcEndpoint, PathContext


def select(cfg: TrainConfig) -> type[DataPath]:
    """The coordinator half of the configured data path on the configured transport (the one
    list of them: :mod:`sampa_ray.datapaths`)."""
    half = datapaths.check(cfg.data_path, cfg.transport).half
    if isinstance(half, str):
        module, _, name = half.partition(":")
        half = getattr(importlib.import_module(module), name)
    return half


__all__ = ["DataPath", "GrpcEndpoint", "PathContext", "select"]
