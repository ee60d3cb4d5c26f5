"""What every data path shares: its context, and the coordinator half's common part.

A data path is one module with two halves:

- the **coordinator half**, a :class:`DataPath` (an :class:`~sampa_ray.loop.Executor`): the loop
  calls ``round``/``commit``/``full_state``/... on it without knowing which path runs;
- the **worker half**, a plain class the coordinator half names in ``worker_half``: every worker
  actor hosts one (``GradientWorker.attach``), built from the worker's
  :class:`~sampa_ray.ray.worker.WorkerHost`, and the coordinator half calls its methods through
  ``GradientWorker.call``. It knows no Ray, so it is tested in-process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ...algorithms import Algorithm, AlgoState
from ...config import TrainConfig
from ...engine import EvalResult, GradResult, Snapshot
from ...loop import Executor
from ...telemetry.metrics import RoundProbe
from ...transport.grpc.data_plane import RoundBoard
from ..recovery import WorkerPool


@dataclass
class GrpcEndpoint:
    """The coordinator's gRPC server, for a path whose workers talk to it."""

    board: RoundBoard
    target: str
    run_id: str
    token: str | None
    root_cert: bytes | None


@dataclass
class PathContext:
    """What a coordinator half is built from: the run's configuration and algorithm (its
    ``slot_of`` says which worker serves each role), the metrics probe, a way to tell the user
    something, and the services it may use."""

    cfg: TrainConfig
    algo: Algorithm
    total_steps: int
    probe: RoundProbe | None = None
    say: Callable[[str], None] = field(default=lambda text: None)
    grpc: GrpcEndpoint | None = None


def kept_gradient(meta: dict[str, Any]) -> GradResult:
    """The result of a gradient that stayed with its worker: the facts the worker sent, no
    tensor (``grad`` is empty)."""
    return GradResult(grad=torch.empty(0), loss=meta["loss"], accuracy=meta["accuracy"],
                      timings=meta["timings"], start=meta["start"], end=meta["end"],
                      finite=meta["finite"], norm=meta.get("norm"), nbytes=meta["nbytes"])


class DataPath(Executor):
    """Coordinator half of a data path: the workers come from the pool, the roles' workers from
    the algorithm. Evaluation and model buffers go to the worker whose BatchNorm statistics the
    run keeps: the one that serves the trajectory role (``stats_role``), or the role
    ``bn_stats`` names (``bn_stats_role``)."""

    #: the worker half each worker hosts for this path
    worker_half: ClassVar[type]
    #: what result.json calls this path
    name: ClassVar[str] = ""

    def __init__(self, pool: WorkerPool, ctx: PathContext) -> None:
        self.pool = pool
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.algo = ctx.algo
        self.probe = ctx.probe
        self.stats_slot = self.algo.slot_of(self.algo.bn_stats_role)
        self.used = self.algo.workers_used()

    @property
    def workers(self) -> list[Any]:
        return self.pool.workers

    def slot_of(self, role: str) -> int:
        return self.algo.slot_of(role)

    # -- the worker halves --------------------------------------------------------------------
    def attach_args(self, slot: int) -> tuple[Any, ...]:
        """Arguments of the worker half's constructor after the host."""
        return ()

    async def attach(self, slot: int) -> None:
        """Give worker ``slot`` this path's worker half (at the start, and after a restart)."""
        await self.workers[slot].attach.remote(self.worker_half, *self.attach_args(slot))

    async def attach_all(self) -> None:
        await asyncio.gather(*[self.attach(s) for s in range(len(self.workers))])

    def call(self, slot: int, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Call the worker half of worker ``slot``; returns the object reference(s)."""
        fn = self.workers[slot].call
        if num_returns != 1:
            fn = fn.options(num_returns=num_returns)
        return fn.remote(method, *args)

    def summary(self) -> dict[str, Any]:
        """What result.json records about the path beyond its name."""
        return {}

    async def ask(self, slot: int, ref: Any) -> Any:
        """The outcome of a call on worker ``slot``, under the round deadline: a worker that
        died or froze between rounds is noticed here too (``WorkerLost``)."""
        return await self.pool.wait(slot, ref)

    # -- evaluation and buffers: the trajectory worker's engine ------------------------------
    async def start_eval(self, step: int, state: AlgoState) -> None:
        s = self.stats_slot
        await self.ask(s, self.workers[s].start_eval.remote(step, state.x.numpy()))

    async def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        ref = self.workers[self.stats_slot].finished_evals.remote(wait)
        # waiting for every evaluation may take longer than a round: no deadline then
        return await ref if wait else await self.ask(self.stats_slot, ref)

    async def buffers(self) -> dict[str, torch.Tensor]:
        s = self.stats_slot
        return await self.ask(s, self.workers[s].buffers.remote())

    async def best(self) -> Snapshot | None:
        s = self.stats_slot
        return await self.ask(s, self.workers[s].best.remote())

    async def all_buffers(self) -> list[dict[str, torch.Tensor]]:
        return list(await asyncio.gather(*[self.ask(s, w.buffers.remote())
                                           for s, w in enumerate(self.workers)]))

    async def load_buffers(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        await asyncio.gather(*[self.ask(s, w.load_buffers.remote(b))
                               for s, (w, b) in enumerate(zip(self.workers, buffers,
                                                              strict=True))])
        self.pool.last_buffers = dict(enumerate(buffers))
