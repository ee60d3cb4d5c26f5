"""What the coordinator serves while runs come and go: the metrics endpoint, the gRPC server
(the control API always, the data plane with ``--transport grpc``), the runs' progress (to the
driver's polls, the control API's watchers and the live status), and the control API's
requests.

:class:`Services` is also the control API's handler (:class:`~sampa_ray.transport.grpc.
control_plane.ControlHandler`): a stop or a checkpoint asked for lands here and waits for the
run in progress to act on it between two updates, so a request never reaches into the loop.
Services outlive a run: ``compare`` runs several on the same coordinator, one endpoint and one
server for all of them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray

from ..config import TrainConfig
from ..errors import UserError
from ..events import EvalEvent, Event, InfoEvent, RoundEvent
from ..security import read_tls, read_token
from ..telemetry.metrics import RoundProbe, RunMetrics
from ..transport.grpc.control_plane import ProgressHub
from ..transport.grpc.data_plane import RoundBoard
from ..transport.grpc.server import start_server, stop_server
from . import live
from .paths import GrpcEndpoint


def shown_host(host: str) -> str:
    """An address others can use for a server listening on ``host``."""
    shown = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
    return f"[{shown}]" if ":" in shown else shown


def _idle(slot: int) -> float | None:
    return None


class Services:
    """The coordinator's services, built from the session's base config."""

    def __init__(self, base: TrainConfig) -> None:
        self.base = base
        self.session = uuid.uuid4().hex[:12]  # the data plane's run id
        # metrics: served from this process once serve_metrics runs (sampa_ray/telemetry)
        self.metrics = RunMetrics()
        self.probe = RoundProbe(self.metrics, transport="ray")
        self.metrics_port: int | None = None
        # gRPC: the control API (always) and the data plane (--transport grpc)
        self.server: Any = None
        self.control_port: int | None = None
        self.control_target: str | None = None
        self.token: str | None = None
        self.tls: tuple[bytes, bytes] | None = None
        self.board: RoundBoard | None = None
        # progress: the live picture, the watchers, the driver's next poll
        self.hub = ProgressHub()
        self.live: dict[str, Any] = {"state": "starting"}
        self.events: list[Event] = []
        # what the status reports on the workers: who they are, how long each call waits
        self.infos: list[dict[str, Any]] = []
        self.busy_for: Callable[[int], float | None] = _idle
        # the control API's requests, for the run in progress
        self.stop_requested = False
        self.checkpoint_waiters: list[asyncio.Future[str]] = []

    # -- progress: to the driver, the control API's watchers and the live status --------------
    def publish(self, ev: Event) -> None:
        """Tell everyone who listens: the live status takes every event; the watchers and
        the driver get all but evaluations (the status reports those; the driver shows
        epochs)."""
        fields = live.on_event(self.live, ev)
        if isinstance(ev, EvalEvent):
            return
        if isinstance(ev, RoundEvent) and ev.round_s:
            ev.comm_share = fields["comm_share"] = max(0.0, 1.0 - ev.compute_s / ev.round_s)
        self.hub.publish(fields)
        live.enqueue(self.events, ev)  # for the driver's next poll

    def say(self, text: str) -> None:
        self.publish(InfoEvent(text=text))

    def poll(self) -> list[Event]:
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
        return {**live.status(self.live, self.infos, self.busy_for),
                "transport": self.base.transport, "metrics_port": self.metrics_port or 0}

    def progress(self) -> AsyncIterator[dict[str, Any]]:
        return self.hub.subscribe()

    async def checkpoint(self) -> str:
        """Write a checkpoint after the next update; returns its path."""
        if self.live.get("state") != "running":
            raise RuntimeError("no run in progress")
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.checkpoint_waiters.append(fut)
        return await fut

    def checkpoint_requests(self) -> list[asyncio.Future[str]]:
        """The checkpoint requests waiting, taken: the run answers each with the path."""
        waiters, self.checkpoint_waiters = self.checkpoint_waiters, []
        return waiters

    def refuse_checkpoints(self) -> None:
        """The run is over: the checkpoint requests it did not answer fail."""
        for w in self.checkpoint_requests():
            w.set_exception(RuntimeError("the run ended before the checkpoint"))

    def end_run(self) -> None:
        """The run wrote its outputs: ``stopped`` (through the control API) or ``finished``."""
        self.busy_for = _idle
        self.live["state"] = "stopped" if self.stop_requested else "finished"

    # -- the servers ---------------------------------------------------------------------------
    def serve_metrics(self) -> None:
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
        self.say(f"metrics: {self.metrics.scheme}://{shown_host(host)}:{self.metrics_port}"
                 "/metrics")

    async def serve_grpc(self, num_params: int) -> None:
        """Start the gRPC server in this process (once): control API, and the data plane for
        gradients of ``num_params`` values."""
        if self.server is not None:
            return
        cfg = self.base
        self.token = read_token(cfg)
        self.tls = read_tls(cfg)
        self.board = RoundBoard(self.session, num_params)
        try:
            self.server, self.control_port = await start_server(
                self.board, self, cfg.control_host, cfg.control_port, token=self.token,
                tls=self.tls)
        except ValueError as err:
            raise UserError(f"control_host: {err}") from None
        self.control_target = f"{shown_host(cfg.control_host)}:{self.control_port}"
        self.say(f"control: {self.control_target} (sampa-ray status --target "
                 f"{self.control_target})")

    def grpc_endpoint(self) -> GrpcEndpoint | None:
        """The server as a data path that talks to it sees it."""
        if self.board is None or self.control_target is None:
            return None
        return GrpcEndpoint(self.board, self.control_target, self.session, self.token,
                            self.tls[0] if self.tls else None)

    async def shutdown(self) -> None:
        """Report NOT_SERVING, end watches and stop the gRPC server."""
        self.hub.close()
        if self.server is not None:
            await stop_server(self.server, grace=1.0)
            self.server = None
