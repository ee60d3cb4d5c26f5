"""The points data path over gRPC: points down and gradients up as chunked streams between the
workers and the server in the coordinator's process (``sampa_ray.transport.grpc``); Ray only
starts the actors and carries the control call. Recovery as on the object-store points path.
"""

from __future__ import annotations

from typing import Any

import torch

from ...algorithms import GradRequest
from ...engine import GradResult
from ...loop import usable
from ...transport.grpc.client import PointClient
from ..worker import WorkerHost
from .base import GrpcEndpoint
from .points import PointsPath


class GrpcWorker:
    """Worker half: this process's channel to the coordinator's ParameterService."""

    def __init__(self, host: WorkerHost, target: str, run_id: str, token: str | None,
                 root_cert: bytes | None) -> None:
        self.host = host
        self.client = PointClient(target, run_id, token=token, root_cert=root_cert)
        self.point_buf = torch.empty(host.engine.flat.numel)

    def close(self) -> None:
        self.client.close()

    def gradient(self, step: int, role: str, batch: int, track_stats: bool,
                 loss_scale: float | None = None) -> dict[str, Any]:
        """Fetch the point of (step, role), compute, stream the gradient back. An unusable
        gradient is not sent (the server would refuse it); the coordinator learns it here."""
        engine, link = self.host.engine, self.host.link
        fetch_s = self.client.fetch_point(step, role, self.point_buf)
        link.wait(self.point_buf.numel() * self.point_buf.element_size())
        r = engine.gradient(self.point_buf, batch, track_stats, loss_scale=loss_scale)
        ok = usable(r.loss, r.grad)
        link.wait(r.grad.numel() * r.grad.element_size() if ok else 0)
        push_s = self.client.push_gradient(step, role, r.grad, r.loss, r.accuracy,
                                           r.timings) if ok else 0.0
        return {"loss": r.loss, "accuracy": r.accuracy, "start": r.start, "end": r.end,
                "timings": {**r.timings, "fetch": fetch_s, "push": push_s}, "finite": ok,
                "buffers": engine.buffers() if track_stats else None}


class GrpcPath(PointsPath):
    """Coordinator half: opens each round on the server's board, asks the workers to fetch
    their points, and awaits the gradients the server receives."""

    worker_half = GrpcWorker
    name = "points"

    @property
    def endpoint(self) -> GrpcEndpoint:
        assert self.ctx.grpc is not None, "the gRPC path needs the coordinator's server"
        return self.ctx.grpc

    def attach_args(self, slot: int) -> tuple[Any, ...]:
        e = self.endpoint
        return (e.target, e.run_id, e.token, e.root_cert)

    def dispatch(self, req: GradRequest) -> Any:
        return self.call(self.slot_of(req.role), "gradient", self.endpoint.board.step, req.role,
                         req.batch, req.track_stats, req.loss_scale)

    def result(self, req: GradRequest, out: Any) -> GradResult:
        # the gradient itself arrives through the server (round() attaches it); its size is
        # the point's length in the wire's format, and only a usable one was sent
        board = self.endpoint.board
        sent = req.point.numel() * board.grad_dtype.itemsize if out["finite"] else 0
        return GradResult(grad=torch.empty(0), loss=out["loss"], accuracy=out["accuracy"],
                          timings=out["timings"], start=out["start"], end=out["end"],
                          finite=out["finite"], nbytes=sent)

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        board = self.endpoint.board
        step = board.step + 1 if board.step is not None else 1
        futs = board.open_round(step, {r.role: r.point for r in reqs})
        results = await super().round(reqs)
        for role, r in results.items():
            if r.finite:  # the gradient itself came through the server
                r.grad = (await futs[role])[0].float()  # bf16 widened; fp32 as it is
        return results

