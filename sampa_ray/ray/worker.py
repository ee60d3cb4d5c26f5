"""The gradient-worker actor: a model replica and the data on one device, and the worker half of
whichever data path the run uses.

The actor itself knows no algorithm and no data path. It owns a :class:`WorkerHost` (the gradient
engine, which worker it is, the emulated link) and hosts one *worker half* at a time: an object of
the class the data path's coordinator half names in :meth:`GradientWorker.attach` (see
``sampa_ray.ray.paths``), whose methods the coordinator half calls through
:meth:`GradientWorker.call`. Adding a data path adds no method here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from ..config import TrainConfig
from ..engine import EvalResult, GradientEngine, Snapshot
from ..errors import UserError
from ..plugins import install_shipped
from ..shards import ALONE
from ..transport.collective import PeerGroup, leave, rendezvous_address
from ..transport.link import Link


@dataclass
class WorkerHost:
    """What a worker half runs on: the engine, the algorithm slot this worker's role group
    serves and its rank in that group (rank 0 speaks for the group), the (emulated) link its
    messages cross, and its process group when it is in one. ``slot``, ``rank``, ``link`` and
    ``group`` change per run, so halves read them when they use them."""

    engine: GradientEngine
    slot: int
    link: Link
    rank: int = 0
    group: PeerGroup | None = None

    @property
    def lead(self) -> bool:
        """Whether this worker speaks for its role group (its results are the group's)."""
        return self.rank == 0


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only) numpy array from the object store, without
    copying; it is only ever copied from."""
    return torch.from_numpy(a)


#: The decorator of the actor methods called every round or every epoch (and of the driver's
#: progress poll): Ray records no task events for their calls. Its GCS server keeps every
#: task's events for the state API and the dashboard (up to 100,000 tasks, then the IDs of
#: those it dropped), about 3.5 KiB per call: a long run's rounds grew it by 7 KiB per step.
#: The setting travels with the actor class, so it holds on any cluster. Such calls are
#: missing from ``ray list tasks`` and ``ray timeline``; their errors reach the caller as ever.
untracked = ray.method(enable_task_events=False)


@ray.remote(max_restarts=0)
class GradientWorker:
    """A model replica and the data on one device: the gradient at a point on a batch, through
    the worker half of the run's data path."""

    def __init__(self, cfg: dict[str, Any], name: str, slot: int, threads: int,
                 plugins: dict[str, dict[str, Any]] | None = None) -> None:
        torch.set_num_threads(threads)
        install_shipped(plugins)  # algorithms and plug-ins registered in the driver
        self.name = name
        self.half: Any = None
        self.error: str | None = None
        try:
            engine = GradientEngine(TrainConfig(**cfg))
        except UserError as err:  # reported by info(): one line, not a traceback
            self.error = str(err)
            return
        self.host = WorkerHost(engine, slot, Link(0.0, None))
        self.engine = engine

    def info(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        ctx = ray.get_runtime_context()
        return {**self.engine.info(), "name": self.name, "pid": os.getpid(),
                "node_id": ctx.get_node_id(), "gpu_ids": ray.get_gpu_ids()}

    def initial_point(self) -> np.ndarray:
        return self.engine.initial_point().numpy()

    def configure(self, latency_ms: float, gbit_s: float | None, wire_dtype: str) -> None:
        """Per-run settings: an emulated slower link between this worker and the others
        (benchmarks), and the gradients' number format on the wire."""
        self.host.link = Link(latency_ms, gbit_s)
        self.engine.set_wire(wire_dtype)

    def reset(self) -> None:
        """A fresh replica at the run's initial parameters and statistics; no data path, no
        group."""
        self.leave()
        self.engine.reset()
        self._detach()

    def assign(self, slot: int, rank: int) -> None:
        """Serve algorithm slot ``slot`` as rank ``rank`` of its role group (per run)."""
        self.host.slot, self.host.rank = slot, rank

    # -- the workers' process group (role groups; the collective path's exchange) ------------
    def address(self) -> tuple[str, int]:
        """Where this worker (world rank 0) hosts the group's rendezvous."""
        return rendezvous_address()

    def join(self, rank: int, world: int, host: str, port: int, backend: str,
             timeout_s: float, groups: list[list[int]], sync_bn: bool,
             fans: list[list[int]] | None = None) -> None:
        """Join the process group of the workers in use, and this worker's role group in it:
        the engine computes its shard of every batch and sums gradients over the group.
        ``fans``: the broadcast groups a data path exchanges gradients in."""
        self.host.group = PeerGroup(rank, world, host, port, backend, self.engine.device,
                                    timeout_s, groups, fans or ())
        self.engine.join_group(self.host.group.comm, sync_bn)

    def leave(self) -> None:
        if self.host.group is not None:
            self.engine.join_group(ALONE)
            self.host.group = None
            leave()

    def attach(self, half: type, *args: Any) -> None:
        """Host a data path's worker half: ``half(host, *args)`` (replacing any other)."""
        self._detach()
        self.half = half(self.host, *args)

    @untracked  # every round
    def call(self, method: str, *args: Any) -> Any:
        """Call the worker half (object references among ``args`` arrive resolved)."""
        if self.half is None:
            raise RuntimeError(f"worker {self.name}: no data path attached")
        return getattr(self.half, method)(*args)

    def _detach(self) -> None:
        close = getattr(self.half, "close", None)
        if close is not None:
            close()
        self.half = None

    # -- what every data path needs of the engine ---------------------------------------------
    def load_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        self.engine.load_buffers(buffers)

    @untracked  # every epoch
    def start_eval(self, step: int, point: np.ndarray) -> None:
        self.engine.start_eval(step, as_tensor(point))

    @untracked  # every epoch
    def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        return self.engine.finished_evals(wait)

    def buffers(self) -> dict[str, torch.Tensor]:
        return self.engine.buffers()

    def best(self) -> Snapshot | None:
        """The best validation evaluation's model (``val_split``), for ``best.pt``."""
        return self.engine.best()
