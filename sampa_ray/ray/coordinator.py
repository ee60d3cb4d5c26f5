"""The coordinator actor: it supervises. It creates the workers (two role groups of
``workers_per_role``) in their bundles and brings lost ones back, hosts the services (metrics
endpoint, gRPC server with the control API and, with ``--transport grpc``, the data plane:
:mod:`.services`), and runs configurations one after the other on the same workers, each a
:class:`~.run.Run` of its own, so comparisons (SGD, SAM, SAMPa) are like for like. It runs no
model and never branches on which data path or algorithm runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import TrainConfig
from ..data.sources import check_same_data
from ..errors import UserError
from ..events import Event
from ..plugins import install_shipped
from ..settings import check_shared_workers
from .placement import Placement, worker_names
from .run import Crew, Run
from .services import Services
from .worker import GradientWorker, untracked


@ray.remote(num_cpus=0, max_restarts=0)
class Coordinator:
    """Supervises the workers and the services; runs configurations on them."""

    def __init__(self, cfg: dict[str, Any], placement: dict[str, Any], pg: PlacementGroup,
                 plugins: dict[str, dict[str, Any]] | None = None) -> None:
        self.plugins = plugins or {}
        install_shipped(self.plugins)  # algorithms and plug-ins registered in the driver
        self.base = TrainConfig(**cfg)
        self.placement = Placement(**placement)
        self.pg = pg
        self.workers: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.services = Services(self.base)
        self.current: Run | None = None  # the run in progress

    # -- the driver's calls and the control API: the services answer --------------------------
    @untracked  # four times a second: no task events kept by the GCS
    def poll(self) -> list[Event]:
        """Progress events since the last poll (the driver shows them)."""
        return self.services.poll()

    def stop(self) -> None:
        self.services.stop()

    def status(self) -> dict[str, Any]:
        return self.services.status()

    def progress(self) -> AsyncIterator[dict[str, Any]]:
        return self.services.progress()

    async def checkpoint(self) -> str:
        return await self.services.checkpoint()

    async def shutdown(self) -> None:
        """Report NOT_SERVING, end watches and stop the gRPC server."""
        await self.services.shutdown()

    # -- the workers ---------------------------------------------------------------------------
    async def start(self) -> list[dict[str, Any]]:
        """Create the workers in their bundles and start the services; returns what each
        worker reports about itself."""
        self.services.serve_metrics()
        pl = self.placement
        self.workers = [GradientWorker.options(
            num_cpus=pl.cpus_per_worker, num_gpus=pl.gpus_per_worker,
            max_restarts=self.base.max_restarts, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, pl.bundle_of[i]),
        ).remote(self.base.model_dump(), name, i, pl.threads, self.plugins)
            for i, name in enumerate(worker_names(self.base.workers_per_role))]
        self.infos = list(await asyncio.gather(*[w.info.remote() for w in self.workers]))
        self.services.infos = self.infos  # the status reads them (kept current on restarts)
        for info in self.infos:
            if "error" in info:
                raise UserError(info["error"])
        check_same_data({i["name"]: i["data_fingerprint"] for i in self.infos},
                        self.base.dataset)
        self.services.say("workers: " + ", ".join(f"{i['name']} pid {i['pid']} ({i['device']})"
                                                  for i in self.infos))
        await self.services.serve_grpc(self.infos[0]["num_params"])
        return self.infos

    def _force_kill(self, slot: int) -> None:
        """A worker that missed the deadline may not even answer Ray's kill (a frozen
        process): on this node, end its process directly; Ray then restarts the actor."""
        info = self.infos[slot]
        if info.get("node_id") == ray.get_runtime_context().get_node_id() and info.get("pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(info["pid"]), signal.SIGKILL)

    async def _on_restart(self, slot: int) -> None:
        """A worker came back (a new process, with the defaults): the run in progress gives
        it its settings and its data path's worker half again."""
        self.services.say(f"worker {self.infos[slot].get('name', slot)} restarted")
        if self.current is not None:
            await self.current.reattach(slot)

    # -- a run ---------------------------------------------------------------------------------
    async def run(self, cfg_dict: dict[str, Any], out: str) -> dict[str, Any]:
        """Train one configuration on the workers from their initial state; write outputs."""
        cfg = TrainConfig(**cfg_dict)
        check_shared_workers(self.base, cfg)
        if not self.workers:
            await self.start()
        crew = Crew(self.workers, self.infos, self.placement, self._on_restart,
                    self._force_kill, self.pg)
        self.current = Run(cfg, Path(out), self.services, crew)
        try:
            return await self.current.execute()
        finally:
            self.current = None


__all__ = ["Coordinator"]
