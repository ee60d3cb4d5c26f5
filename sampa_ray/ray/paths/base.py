"""What every data path shares: its context, and the coordinator half's common part.

A data path is one module with two halves:

- the **coordinator half**, a :class:`DataPath` (an :class:`~sampa_ray.executor.Executor`): the loop
  calls ``round``/``full_state``/... on it without knowing which path runs;
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
from ...errors import UserError, error_line
from ...executor import Executor
from ...telemetry.metrics import RoundProbe
from ...transport.collective import choose_backend
from ...transport.grpc.data_plane import RoundBoard
from ..placement import role_groups
from ..recovery import Fan, WorkerPool


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
                      finite=meta["finite"], norm=meta.get("norm"), nbytes=meta["nbytes"],
                      reduced_bytes=meta.get("reduced_bytes", 0))


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
        #: the algorithm's slots, and each slot's role group (worker indices, first rank first)
        self.used = self.algo.workers_used()
        self.groups = role_groups(self.used, self.cfg.workers_per_role, self.cfg.data_parallel)
        #: every worker in use, in world-rank order; by worker: (slot, rank in its group)
        self.in_use = sorted(w for g in self.groups.values() for w in g)
        self.place = {w: (s, r) for s, g in self.groups.items() for r, w in enumerate(g)}
        #: the slot whose BatchNorm statistics the run keeps, and the worker that holds them
        self.stats_slot = self.algo.slot_of(self.algo.bn_stats_role)
        self.stats_worker = self.lead(self.stats_slot)
        self.backend: str | None = None  # of the workers' process group; None without one

    @property
    def workers(self) -> list[Any]:
        return self.pool.workers

    def slot_of(self, role: str) -> int:
        return self.algo.slot_of(role)

    def lead(self, slot: int) -> int:
        """The worker that speaks for slot ``slot``'s role group (its first rank)."""
        return self.groups[slot][0]

    @property
    def grouped(self) -> bool:
        """Whether some role's gradient is computed by more than one worker."""
        return any(len(g) > 1 for g in self.groups.values())

    # -- the worker halves --------------------------------------------------------------------
    def attach_args(self, slot: int) -> tuple[Any, ...]:
        """Arguments of the worker half's constructor after the host (``slot``: the
        worker's index)."""
        return ()

    async def attach(self, slot: int) -> None:
        """Give worker ``slot`` its place in the run (its role group's slot and its rank
        there; idle workers slot -1) and this path's worker half (at the start, and after a
        restart)."""
        w = self.workers[slot]
        await w.assign.remote(*self.place.get(slot, (-1, 0)))
        await w.attach.remote(self.worker_half, *self.attach_args(slot))

    async def attach_all(self) -> None:
        await asyncio.gather(*[self.attach(s) for s in range(len(self.workers))])

    def call(self, slot: int, method: str, *args: Any, num_returns: int = 1) -> Fan:
        """Call the worker half of every worker in slot ``slot``'s role group, with the same
        arguments; returns the :class:`Fan` of their object reference(s) (``ask`` waits for
        all of them and gives the first rank's result)."""
        members = self.groups[slot]
        refs = []
        for w in members:
            fn = self.workers[w].call
            if num_returns != 1:
                fn = fn.options(num_returns=num_returns)
            refs.append(fn.remote(method, *args))
        return Fan(members, refs)

    # -- the workers' process group -------------------------------------------------------------
    @property
    def needs_world(self) -> bool:
        """Whether the workers in use form a process group: for the role groups' all-reduce."""
        return self.grouped

    async def prepare(self) -> None:
        """Before the loop starts (each run, each replay): form the workers' process group
        where the path needs one (it is re-formed after a lost worker comes back)."""
        if self.needs_world:
            try:
                await self.form_world()
            except Exception as err:  # noqa: BLE001 - a group is required here
                raise UserError(f"workers_per_role: the role groups' process group did not "
                                f"form: {error_line(getattr(err, 'cause', None) or err)}"
                                ) from None

    async def form_world(self) -> None:
        """Every worker in use joins one process group (NCCL between GPUs of their own, gloo
        otherwise, or ``collective_backend``), and its role group inside it."""
        members = self.in_use
        gpu_ids = [self.pool.infos[w].get("gpu_ids") or [] for w in members]
        device = torch.device(self.cfg.device if self.cfg.device != "auto" else
                              ("cuda" if gpu_ids and all(gpu_ids) else "cpu"))
        backend = self.cfg.collective_backend
        if backend == "auto":
            backend = choose_backend(device, gpu_ids)
        host, port = await self.workers[members[0]].address.remote()
        groups = [[self.world_rank(w) for w in self.groups[s]] for s in self.used]
        fans = list(self.fans().values())
        timeout = self.pool.deadline_s or 300.0
        await asyncio.wait_for(asyncio.gather(*[
            self.workers[w].join.remote(self.world_rank(w), len(members), host, port, backend,
                                        timeout, groups, self.cfg.sync_bn, fans)
            for w in members]), timeout=timeout + 30)
        self.backend = backend

    def world_rank(self, worker: int) -> int:
        return self.in_use.index(worker)

    def fans(self) -> dict[int, list[int]]:
        """By slot: the world ranks its gradient is broadcast to, where the path broadcasts
        gradients over the process group (none here)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """What result.json records about the path beyond its name."""
        return {"role_groups": {"workers_per_role": self.cfg.workers_per_role,
                                "data_parallel": self.cfg.data_parallel,
                                "sync_bn": self.cfg.sync_bn, "backend": self.backend,
                                "devices": len(self.in_use),
                                "groups": {str(s): [self.pool.name(w) for w in g]
                                           for s, g in self.groups.items()}}}

    async def ask(self, slot: int, ref: Any) -> Any:
        """The outcome of a call on worker ``slot`` (or of a :class:`Fan`), under the round
        deadline: a worker that died or froze between rounds is noticed here too
        (``WorkerLost``)."""
        return await self.pool.wait(slot, ref)

    # -- evaluation and buffers: the trajectory worker's engine ------------------------------
    async def start_eval(self, step: int, state: AlgoState) -> None:
        s = self.stats_worker
        await self.ask(s, self.workers[s].start_eval.remote(step, state.x.numpy()))

    async def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        ref = self.workers[self.stats_worker].finished_evals.remote(wait)
        # waiting for every evaluation may take longer than a round: no deadline then
        return await ref if wait else await self.ask(self.stats_worker, ref)

    async def buffers(self) -> dict[str, torch.Tensor]:
        s = self.stats_worker
        return await self.ask(s, self.workers[s].buffers.remote())

    async def best(self) -> Snapshot | None:
        s = self.stats_worker
        return await self.ask(s, self.workers[s].best.remote())

    async def all_buffers(self) -> list[dict[str, torch.Tensor]]:
        return list(await asyncio.gather(*[self.ask(s, w.buffers.remote())
                                           for s, w in enumerate(self.workers)]))

    async def load_buffers(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        await asyncio.gather(*[self.ask(s, w.load_buffers.remote(b))
                               for s, (w, b) in enumerate(zip(self.workers, buffers,
                                                              strict=True))])
        self.pool.last_buffers = dict(enumerate(buffers))
