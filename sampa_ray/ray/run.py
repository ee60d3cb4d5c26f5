"""One run on the coordinator's workers: a configuration trained from the workers' initial
state, its outputs written.

The coordinator (:mod:`.coordinator`) supervises: it starts the workers, brings lost ones back
and hosts the services (:mod:`.services`). A :class:`Run` is what happens in between: it sets
the workers up for its configuration, picks the data path, drives the loop on it with the
hooks the services need (progress, stop, checkpoints asked for through the control API),
replays from its newest snapshot after a lost worker, and writes the outputs. It never
branches on which data path or algorithm runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..algorithms import AlgoState
from ..checkpoint import Checkpoint, Checkpointer, find_resume
from ..config import TrainConfig
from ..events import Event
from ..executor import Plan
from ..loop import Hooks, make_algorithm, train_loop
from ..results import Recorder, build_result, earlier_wall_s, write_outputs
from ..scaler import LossScale
from ..selection import write_best
from ..telemetry.listener import MetricsListener
from . import live, paths
from .placement import Placement
from .recovery import WorkerPool, with_replay
from .services import Services
from .worker import as_tensor

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: config fields the workers' replicas and data depend on; runs on the same actors share them
@dataclass
class Crew:
    """The coordinator's workers as a run uses them. ``infos`` is the coordinator's own list
    (kept current across restarts); ``on_restart`` and ``on_deadline`` are the coordinator's
    (it brings workers back; the run then gives them its settings: :meth:`Run.reattach`)."""

    workers: list[Any]
    infos: list[dict[str, Any]]
    placement: Placement
    on_restart: Callable[[int], Awaitable[None]]
    on_deadline: Callable[[int], None]
    #: the workers' placement group: a lost node's replacement is waited for in it
    pg: Any = None


class Run:
    """One configuration on the crew's workers, its outputs into ``out``."""

    def __init__(self, cfg: TrainConfig, out: Path, services: Services, crew: Crew) -> None:
        self.started = time.time()
        self.cfg, self.out, self.services, self.crew = cfg, out, services, crew
        self.path: paths.DataPath | None = None

    async def execute(self) -> dict[str, Any]:
        """Set the workers up, train (replaying after a lost worker), write the outputs;
        returns the result (``result.json``)."""
        x0 = await self._reset_workers()
        path, pool, checkpointer, resume = await self._setup(x0)

        async def train(start: Checkpoint | None) -> AlgoState:
            await path.prepare()  # the workers' process group, (re-)formed
            algo = make_algorithm(self.cfg, self.plan.total_steps, self.plan.batches_per_epoch)
            return await train_loop(algo, path, x0, self.plan, self.recorder,
                                    self._hooks(checkpointer), resume=start, scale=self.scale)

        state = await with_replay(train, resume, pool, checkpointer, self.cfg.max_restarts,
                                  self.services.say)
        return await self._finish(state, pool, checkpointer)

    # -- the workers ---------------------------------------------------------------------------
    async def _reset_workers(self) -> torch.Tensor:
        """Every worker back to its initial state with this run's settings; returns the
        initial point."""
        workers = self.crew.workers
        await asyncio.gather(*[w.reset.remote() for w in workers])
        await asyncio.gather(*[self._configure(w) for w in workers])
        if self.services.board is not None:
            self.services.board.set_grad_dtype(WIRE_DTYPES[self.cfg.wire_dtype])
        return as_tensor(await workers[0].initial_point.remote()).clone()

    async def _configure(self, worker: Any) -> None:
        c = self.cfg
        await worker.configure.remote(c.link_latency_ms, c.link_gbit_s, c.wire_dtype)

    async def reattach(self, slot: int) -> None:
        """A worker came back (a new process, with the defaults): this run's settings and
        its data path's worker half again."""
        await self._configure(self.crew.workers[slot])
        if self.path is not None:
            await self.path.attach(slot)

    # -- the run -------------------------------------------------------------------------------
    async def _setup(self, x0: torch.Tensor
                     ) -> tuple[paths.DataPath, WorkerPool, Checkpointer, Checkpoint | None]:
        """The plan, the data path on a pool of the workers, the record (continued from the
        checkpoint to resume from, where one is asked for), the checkpointer, and the services
        told a run begins."""
        cfg, services, infos = self.cfg, self.services, self.crew.infos
        plan = self.plan = Plan.of(cfg, infos[0]["batches_per_epoch"])
        algo = make_algorithm(cfg, plan.total_steps, plan.batches_per_epoch)
        pool = WorkerPool(self.crew.workers, infos, deadline_s=cfg.round_timeout,
                          max_retries=cfg.max_restarts, on_restart=self.crew.on_restart,
                          on_deadline=self.crew.on_deadline, pg=self.crew.pg,
                          node_wait_s=cfg.node_loss_wait_s)
        ctx = paths.PathContext(cfg, algo, plan.total_steps, services.probe, services.say,
                                services.grpc_endpoint())
        path = self.path = paths.select(cfg)(pool, ctx)
        await path.attach_all()
        num_params = infos[0]["num_params"]
        resume = find_resume(cfg, num_params, services.say) if cfg.resume else None
        self.recorder = Recorder(algo.stats_role, started=self.started, earlier_s=earlier_wall_s(
            resume.meta.get("record", {})) if resume else 0.0)
        services.probe.begin_run(f"{cfg.algo}-{cfg.hash()[:8]}-{int(self.started)}", cfg.algo,
                                 cfg.model, algo.stats_role, cfg.batch_size,
                                 transport=cfg.transport, data_path=cfg.resolved_data_path)
        self.listener = MetricsListener(services.probe, services.metrics)
        services.stop_requested = False
        services.busy_for = pool.busy_for
        live.begin_run(services.live, cfg.algo, plan.total_steps, plan.batches_per_epoch,
                       services.session)
        self.scale = LossScale.of(cfg)  # fp16: followed by the loop, saved with each state
        checkpointer = Checkpointer(cfg, self.out / "checkpoints", path, self.recorder,
                                    num_params, self.scale)
        if resume is None:  # the starting point, in memory: a lost replica replays from here
            checkpointer.last = Checkpoint.of(algo.init(x0), await path.all_buffers(),
                                              {"record": self.recorder.state_dict()})
        self.algo = algo
        return path, pool, checkpointer, resume

    def _hooks(self, checkpointer: Checkpointer) -> Hooks:
        """The loop's hooks: events to the metrics and the services; a stop and checkpoints
        asked for through the control API, taken between updates."""
        services = self.services

        async def answer_checkpoints(state: AlgoState) -> None:
            if services.checkpoint_waiters:  # requested through the control API
                waiters = services.checkpoint_requests()
                assert self.path is not None
                await checkpointer(await self.path.full_state(state))
                written = str((await checkpointer.flush())[-1])
                for w in waiters:
                    w.set_result(written)

        return Hooks(progress=self._progress, should_stop=lambda: services.stop_requested,
                     checkpoint=checkpointer, after_update=answer_checkpoints,
                     hold=lambda: bool(services.checkpoint_waiters))

    def _progress(self, ev: Event) -> None:
        ev.algo = self.cfg.algo  # one view may show several runs (compare)
        self.listener(ev)
        self.services.publish(ev)

    async def _finish(self, state: AlgoState, pool: WorkerPool,
                      checkpointer: Checkpointer) -> dict[str, Any]:
        """Wait for the checkpoints, count the faults, write the outputs."""
        services, path = self.services, self.path
        assert path is not None
        await checkpointer.flush()
        services.metrics.worker_restarts.inc(pool.restarts)
        services.metrics.retried_rounds.inc(pool.retried_rounds)
        services.metrics.nonfinite_rounds.inc(self.recorder.nonfinite_rounds)
        services.metrics.scaler_skips.inc(self.recorder.scaler_skips)
        services.refuse_checkpoints()
        buffers = await path.buffers()
        best = await path.best()
        result = self._result(state, pool, path)
        await asyncio.to_thread(write_best, self.out, result, best)
        await asyncio.to_thread(write_outputs, self.out, result, state.x, buffers)
        services.end_run()
        self.path = None
        return result

    def _result(self, state: AlgoState, pool: WorkerPool,
                path: paths.DataPath) -> dict[str, Any]:
        """``result.json``: what every backend records, and the Ray run's own facts."""
        cfg, services, infos, plan = self.cfg, self.services, self.crew.infos, self.plan
        return build_result(
            cfg, self.algo, self.recorder, state, plan.total_steps, plan.batches_per_epoch,
            infos[0], self.recorder.wall_s(), backend="ray",
            placement=asdict(self.crew.placement), device=infos[0]["device"],
            workers=[{k: i[k] for k in ("name", "pid", "node_id", "gpu_ids", "device", "threads")}
                     for i in infos],
            stopped_early=state.step < plan.total_steps, metrics_port=services.metrics_port,
            transport=cfg.transport, data_path=cfg.resolved_data_path,
            control_port=services.control_port, control_target=services.control_target,
            worker_restarts=pool.restarts, retried_rounds=pool.retried_rounds,
            **path.summary())
