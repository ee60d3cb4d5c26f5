"""The points data path over Ray's object store: the coordinator holds the algorithm state,
sends every point down and takes every gradient up (numpy arrays; zero-copy reads on the same
node), and applies the update itself.

Fault tolerance here needs no replay: a worker that dies or misses the deadline is restarted,
gets its model buffers back as they were before the round, and only the round's lost requests
are dispatched again; requests already answered are kept. With role groups of several workers
(``workers_per_role``) a lost worker breaks its group's process group: the run then replays
from the newest snapshot, as the replicated paths do, once the group has re-formed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch

from ...algorithms import GradRequest
from ...engine import GradResult
from ...errors import UserError
from ...transport.codec import from_array, to_array
from ..recovery import WorkerLost
from ..worker import WorkerHost, as_tensor
from .base import DataPath


class PointsWorker:
    """Worker half: the gradient at a point that came down the link."""

    def __init__(self, host: WorkerHost) -> None:
        self.host = host

    def gradient(self, point: np.ndarray, batch: int, track_stats: bool,
                 loss_scale: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        engine, link = self.host.engine, self.host.link
        link.wait(point.nbytes)  # the point came down the (emulated) link
        r = engine.gradient(as_tensor(point), batch, track_stats, loss_scale=loss_scale)
        facts = {"loss": r.loss, "accuracy": r.accuracy, "timings": r.timings,
                 "start": r.start, "end": r.end, "reduced_bytes": r.reduced_bytes}
        if not self.host.lead:  # the group's gradient goes up from its first rank
            return np.empty(0, np.float32), {**facts, "buffers": None}
        link.wait(r.grad.numel() * r.grad.element_size())  # the gradient goes up
        # the array is copied into the object store when this method returns, so the engine
        # may reuse its gradient buffer for the next request. A pass on the trajectory also
        # returns the model buffers (small): the coordinator keeps them to restore a restarted
        # worker exactly.
        return to_array(r.grad), {**facts,
                                  "buffers": engine.buffers() if track_stats else None}


class PointsPath(DataPath):
    """Coordinator half: dispatches a round's requests to their workers without blocking;
    returns when all are in, retrying the requests of a lost worker."""

    worker_half = PointsWorker
    name = "points"

    def dispatch(self, req: GradRequest) -> Any:
        """Send one request to its worker; returns the reference of its outcome."""
        return self.call(self.slot_of(req.role), "gradient", req.point.numpy(), req.batch,
                         req.track_stats, req.loss_scale)

    def result(self, req: GradRequest, out: Any) -> GradResult:
        grad, meta = out
        return GradResult(grad=from_array(grad), loss=meta["loss"], accuracy=meta["accuracy"],
                          timings=meta["timings"], start=meta["start"], end=meta["end"],
                          finite=meta.get("finite"), nbytes=grad.nbytes,  # as it travelled
                          reduced_bytes=meta.get("reduced_bytes", 0))

    @staticmethod
    def buffers_of(out: Any) -> dict[str, torch.Tensor] | None:
        """The model buffers a trajectory pass returned, if any."""
        meta = out[1] if isinstance(out, tuple) else out
        return meta.get("buffers")

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        pool, probe = self.pool, self.probe
        if probe is not None:
            probe.dispatched([(r.role, r.point) for r in reqs])
        todo = list(reqs)
        results: dict[str, GradResult] = {}
        new_buffers: dict[int, dict[str, torch.Tensor]] = {}
        for attempt in range(pool.max_retries + 1):
            refs = [self.dispatch(r) for r in todo]
            outs = await asyncio.gather(*[pool.wait(self.slot_of(r.role), ref, r.role, probe)
                                          for r, ref in zip(todo, refs, strict=True)],
                                        return_exceptions=True)
            lost: dict[int, WorkerLost] = {}
            for r, out in zip(todo, outs, strict=True):
                if isinstance(out, WorkerLost) and self.grouped:
                    raise out  # its role group's process group broke: re-formed on replay
                if isinstance(out, WorkerLost):
                    lost[out.slot] = out
                elif isinstance(out, BaseException):
                    raise out
                else:
                    results[r.role] = self.result(r, out)
                    buffers = self.buffers_of(out) if r.track_stats else None
                    if buffers is not None:
                        new_buffers[self.lead(self.slot_of(r.role))] = buffers
            if not lost:
                break
            if attempt == pool.max_retries:
                err = next(iter(lost.values()))
                raise UserError(f"{err} {pool.max_retries + 1} times in one round; giving up")
            pool.retried_rounds += 1
            for slot in lost:
                await pool.recover(slot)
            todo = [r for r in todo if r.role not in results]
        pool.last_buffers.update(new_buffers)
        if probe is not None:
            probe.round_done(results)
        return results
