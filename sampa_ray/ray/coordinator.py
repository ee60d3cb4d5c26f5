"""The coordinator actor: the run's owner. It creates the workers (two role groups of
``workers_per_role``), serves the metrics endpoint
and the gRPC server (control API; data plane with ``--transport grpc``), picks the data path,
drives the loop on it, and writes the outputs. It runs no model and never branches on which data
path or algorithm runs. Several runs (SGD, SAM, SAMPa) can use the same workers one after the
other, so comparisons are like for like.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..algorithms import AlgoState
from ..checkpoint import Checkpoint, Checkpointer, find_resume
from ..config import TrainConfig
from ..data.sources import check_same_data
from ..errors import UserError
from ..loop import Plan, make_algorithm, train_loop
from ..plugins import install_shipped
from ..results import Recorder, build_result, earlier_wall_s, write_outputs
from ..security import read_tls, read_token
from ..selection import write_best
from ..settings import check_shared_workers
from ..telemetry.listener import MetricsListener
from ..telemetry.metrics import RoundProbe, RunMetrics
from ..transport.grpc.control_plane import ProgressHub
from ..transport.grpc.data_plane import RoundBoard
from ..transport.grpc.server import start_server, stop_server
from . import live, paths
from .placement import Placement, worker_names
from .recovery import WorkerPool, with_replay
from .worker import GradientWorker, as_tensor, untracked

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shown_host(host: str) -> str:
    """An address others can use for a server listening on ``host``."""
    shown = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
    return f"[{shown}]" if ":" in shown else shown


@ray.remote(num_cpus=0, max_restarts=0)
class Coordinator:
    """Owns the run: dispatches rounds through the data path, decides every round, writes
    outputs; answers the control API."""

    def __init__(self, cfg: dict[str, Any], placement: dict[str, Any], pg: PlacementGroup,
                 plugins: dict[str, dict[str, Any]] | None = None) -> None:
        self.plugins = plugins or {}
        install_shipped(self.plugins)  # algorithms and plug-ins registered in the driver
        self.base = TrainConfig(**cfg)
        self.placement = Placement(**placement)
        self.pg = pg
        self.workers: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.stop_requested = False
        self.path: paths.DataPath | None = None  # of the run in progress
        # gRPC: the control API (always) and the data plane (--transport grpc)
        self.session = uuid.uuid4().hex[:12]
        self.server: Any = None
        self.control_port: int | None = None
        self.control_target: str | None = None
        self.token: str | None = None
        self.tls: tuple[bytes, bytes] | None = None
        self.board: RoundBoard | None = None
        self.hub = ProgressHub()
        self.live: dict[str, Any] = {"state": "starting"}
        self.checkpoint_waiters: list[asyncio.Future[str]] = []
        # metrics: served from this process once start() runs (sampa_ray/telemetry)
        self.run_cfg = self.base  # the run in progress (per-run worker settings)
        self.metrics = RunMetrics()
        self.probe = RoundProbe(self.metrics, transport="ray")
        self.metrics_port: int | None = None

    # -- progress: to the driver, the control API's watchers and the live status --------------
    def _progress(self, ev: dict[str, Any]) -> None:
        ev = live.on_event(self.live, ev)  # the status's picture; the event gets its gaps filled
        if ev["kind"] == "eval":  # the status reports it; the driver shows epochs
            return
        if ev["kind"] == "round" and ev.get("round_s"):
            ev["comm_share"] = max(0.0, 1.0 - ev.get("compute_s", 0.0) / ev["round_s"])
        self.hub.publish(ev)
        live.enqueue(self.events, ev)  # for the driver's next poll

    def _say(self, text: str) -> None:
        self._progress({"kind": "info", "text": text})

    @untracked  # four times a second
    def poll(self) -> list[dict[str, Any]]:
        """Progress events since the last poll (the driver shows them)."""
        evs, self.events = self.events, []
        return evs

    # -- the control API (the gRPC CoordinatorService's handler) ------------------------------
    def stop(self) -> None:
        """Finish the current round, then write outputs and return."""
        self.stop_requested = True
        self.live["state"] = "stopping"

    def status(self) -> dict[str, Any]:
        """The run as the control API reports it (:func:`.live.status`); ``run_id`` is the data
        plane's run id."""
        pool = self.path.pool if self.path is not None else None
        return {**live.status(self.live, self.infos,
                              pool.busy_for if pool is not None else lambda slot: None),
                "transport": self.base.transport, "metrics_port": self.metrics_port or 0}

    def progress(self) -> Any:
        return self.hub.subscribe()

    async def checkpoint(self) -> str:
        """Write a checkpoint after the next update; returns its path."""
        if self.live.get("state") != "running":
            raise RuntimeError("no run in progress")
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.checkpoint_waiters.append(fut)
        return await fut

    # -- services ------------------------------------------------------------------------------
    def _serve_metrics(self) -> None:
        """Start the Prometheus endpoint (once) and announce it."""
        if self.metrics_port is not None:
            return
        cfg = self.base
        host, port = cfg.metrics_host, cfg.metrics_port
        try:
            self.metrics_port = self.metrics.serve(host, port, token=read_token(cfg),
                                                   certfile=cfg.metrics_cert,
                                                   keyfile=cfg.metrics_key)
        except OSError as err:
            raise UserError(f"metrics_port: cannot listen on {host}:{port}: "
                            f"{err.strerror or err}") from None
        self._say(f"metrics: {self.metrics.scheme}://{shown_host(host)}:{self.metrics_port}"
                  "/metrics")

    async def _serve_grpc(self) -> None:
        """Start the gRPC server in this process (once): control API, and the data plane."""
        if self.server is not None:
            return
        cfg = self.base
        self.token = read_token(cfg)
        self.tls = read_tls(cfg)
        self.board = RoundBoard(self.session, self.infos[0]["num_params"])
        try:
            self.server, self.control_port = await start_server(
                self.board, self, cfg.control_host, cfg.control_port, token=self.token,
                tls=self.tls)
        except ValueError as err:
            raise UserError(f"control_host: {err}") from None
        self.control_target = f"{shown_host(cfg.control_host)}:{self.control_port}"
        self._say(f"control: {self.control_target} (sampa-ray status --target "
                  f"{self.control_target})")

    def _grpc_endpoint(self) -> paths.GrpcEndpoint | None:
        if self.board is None or self.control_target is None:
            return None
        return paths.GrpcEndpoint(self.board, self.control_target, self.session, self.token,
                                  self.tls[0] if self.tls else None)

    async def shutdown(self) -> None:
        """Report NOT_SERVING, end watches and stop the gRPC server."""
        self.hub.close()
        if self.server is not None:
            await stop_server(self.server, grace=1.0)
            self.server = None

    # -- the workers ---------------------------------------------------------------------------
    async def start(self) -> list[dict[str, Any]]:
        """Create the workers in their bundles; returns what each reports about itself."""
        self._serve_metrics()
        pl = self.placement
        self.workers = [GradientWorker.options(
            num_cpus=pl.cpus_per_worker, num_gpus=pl.gpus_per_worker,
            max_restarts=self.base.max_restarts, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, pl.bundle_of[i]),
        ).remote(self.base.model_dump(), name, i, pl.threads, self.plugins)
            for i, name in enumerate(worker_names(self.base.workers_per_role))]
        self.infos = list(await asyncio.gather(*[w.info.remote() for w in self.workers]))
        for info in self.infos:
            if "error" in info:
                raise UserError(info["error"])
        check_same_data({i["name"]: i["data_fingerprint"] for i in self.infos},
                        self.base.dataset)
        self._say("workers: " + ", ".join(f"{i['name']} pid {i['pid']} ({i['device']})"
                                          for i in self.infos))
        await self._serve_grpc()
        return self.infos

    def _force_kill(self, slot: int) -> None:
        """A worker that missed the deadline may not even answer Ray's kill (a frozen
        process): on this node, end its process directly; Ray then restarts the actor."""
        info = self.infos[slot]
        if info.get("node_id") == ray.get_runtime_context().get_node_id() and info.get("pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(info["pid"]), signal.SIGKILL)

    async def _on_restart(self, slot: int) -> None:
        """A worker came back (a new process, with the defaults): the run's settings and its
        data path's worker half again."""
        self._say(f"worker {self.infos[slot].get('name', slot)} restarted")
        await self._configure(self.workers[slot])
        if self.path is not None:
            await self.path.attach(slot)

    async def _configure(self, worker: Any) -> None:
        c = self.run_cfg
        await worker.configure.remote(c.link_latency_ms, c.link_gbit_s, c.wire_dtype)

    # -- a run ---------------------------------------------------------------------------------
    async def run(self, cfg_dict: dict[str, Any], out: str) -> dict[str, Any]:
        """Train one configuration on the workers from their initial state; write outputs."""
        t0 = time.time()
        cfg = TrainConfig(**cfg_dict)
        check_shared_workers(self.base, cfg)
        if not self.workers:
            await self.start()
        workers = self.workers
        await asyncio.gather(*[w.reset.remote() for w in workers])
        self.run_cfg = cfg
        await asyncio.gather(*[self._configure(w) for w in workers])
        if self.board is not None:
            self.board.set_grad_dtype(WIRE_DTYPES[cfg.wire_dtype])
        x0 = as_tensor(await workers[0].initial_point.remote()).clone()
        plan = Plan.of(cfg, self.infos[0]["batches_per_epoch"])
        algo = make_algorithm(cfg, plan.total_steps, plan.batches_per_epoch)
        pool = WorkerPool(workers, self.infos, deadline_s=cfg.round_timeout,
                          max_retries=cfg.max_restarts, on_restart=self._on_restart,
                          on_deadline=self._force_kill, pg=self.pg,
                          node_wait_s=cfg.node_loss_wait_s)
        ctx = paths.PathContext(cfg, algo, plan.total_steps, self.probe, self._say,
                                self._grpc_endpoint())
        path = self.path = paths.select(cfg)(pool, ctx)
        await path.attach_all()
        num_params = self.infos[0]["num_params"]
        resume = find_resume(cfg, num_params, self._say) if cfg.resume else None
        recorder = Recorder(algo.stats_role, started=t0, earlier_s=earlier_wall_s(
            resume.meta.get("record", {})) if resume else 0.0)
        self.probe.begin_run(f"{cfg.algo}-{cfg.hash()[:8]}-{int(t0)}", cfg.algo, cfg.model,
                             algo.stats_role, cfg.batch_size, transport=cfg.transport,
                             data_path=cfg.resolved_data_path)
        listener = MetricsListener(self.probe, self.metrics)
        self.stop_requested = False
        live.begin_run(self.live, cfg.algo, plan.total_steps, plan.batches_per_epoch,
                       self.session)

        def progress(ev: dict[str, Any]) -> None:
            ev["algo"] = cfg.algo
            listener(ev)
            self._progress(ev)

        checkpointer = Checkpointer(cfg, Path(out) / "checkpoints", path, recorder, num_params)

        async def after_update(state: AlgoState) -> None:
            if self.checkpoint_waiters:  # requested through the control API
                waiters, self.checkpoint_waiters = self.checkpoint_waiters, []
                await checkpointer(await path.full_state(state))
                written = str((await checkpointer.flush())[-1])
                for w in waiters:
                    w.set_result(written)

        if resume is None:  # the starting point, in memory: a lost replica replays from here
            checkpointer.last = Checkpoint.of(algo.init(x0), await path.all_buffers(),
                                              {"record": recorder.state_dict()})

        async def train(start: Checkpoint | None) -> AlgoState:
            await path.prepare()  # the workers' process group, (re-)formed
            return await train_loop(cfg, path, x0, plan, recorder, progress,
                              lambda: self.stop_requested, resume=start,
                              checkpoint=checkpointer, after_update=after_update,
                              hold=lambda: bool(self.checkpoint_waiters))

        state = await with_replay(train, resume, pool, checkpointer, cfg.max_restarts,
                                  self._say)
        await checkpointer.flush()
        self.metrics.worker_restarts.inc(pool.restarts)
        self.metrics.retried_rounds.inc(pool.retried_rounds)
        self.metrics.nonfinite_rounds.inc(recorder.nonfinite_rounds)
        for w in self.checkpoint_waiters:
            w.set_exception(RuntimeError("the run ended before the checkpoint"))
        self.checkpoint_waiters = []
        buffers = await path.buffers()
        best = await path.best()
        infos = self.infos
        result = build_result(
            cfg, algo, recorder, state, plan.total_steps, plan.batches_per_epoch, infos[0],
            recorder.wall_s(), backend="ray", placement=asdict(self.placement),
            device=infos[0]["device"],
            workers=[{k: i[k] for k in ("name", "pid", "node_id", "gpu_ids", "device", "threads")}
                     for i in infos],
            stopped_early=state.step < plan.total_steps, metrics_port=self.metrics_port,
            transport=cfg.transport, data_path=cfg.resolved_data_path,
            control_port=self.control_port, control_target=self.control_target,
            worker_restarts=pool.restarts, retried_rounds=pool.retried_rounds,
            **path.summary())
        await asyncio.to_thread(write_best, Path(out), result, best)
        await asyncio.to_thread(write_outputs, Path(out), result, state.x, buffers)
        self.live["state"] = "stopped" if self.stop_requested else "finished"
        self.path = None
        return result
