"""The replicated data path: the algorithm's state lives beside the workers.

With the plain path the coordinator holds x, sends every point down and takes every gradient up,
so each SAMPa round moves four full vectors through the coordinator and waits for its update.
Here each worker that serves a role keeps a replica of the algorithm state (x, momentum buffer,
g_y) on its own device and applies the same deterministic update; a round moves one gradient from
each worker to its peer (the object store hands over a reference; the bytes move once, worker to
worker) and no points at all. The coordinator follows the same algorithm on a 0-length shadow
state (so it knows every round's roles, batches and phases), decides each round (apply or skip),
and pulls the real state from a replica for checkpoints, evaluation and the final outputs.

Workers still know no algorithm: :class:`Replica` composes an algorithm replica with a gradient
engine inside the worker process; the engine only ever computes ∇f at a point on a batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .algorithms import AlgoState, GradRequest
from .config import TrainConfig
from .engine import GradientEngine
from .trainer import make_algorithm, slot_for

#: one pending round for a worker: (skipped?, roles whose gradients come from peers)
Pending = tuple[bool, list[str]]


class Replica:
    """Worker side: a replica of the algorithm state next to one gradient engine."""

    def __init__(self, engine: GradientEngine, slot: int) -> None:
        self.engine = engine
        self.slot = slot
        self.state: AlgoState | None = None
        self.own: dict[str, torch.Tensor] = {}  # this worker's gradients of its last round

    def init(self, cfg: dict[str, Any], total_steps: int, tensors: dict[str, np.ndarray],
             step: int, phase: int) -> None:
        c = TrainConfig(**cfg)
        self.algo = make_algorithm(c, total_steps)
        dev = self.engine.device
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev, copy=True)
             for k, v in tensors.items()}
        state = self.algo.init(t["x"])
        state.step, state.phase = step, phase
        if "buf" in t:
            state.buf = t["buf"]
        if "g_y" in t:
            state.g_y = t["g_y"]
        self.state = state
        self.own = {}

    def apply(self, pending: list[Pending], peer_grads: list[dict[str, np.ndarray]]) -> None:
        """Apply the rounds this replica has not applied yet, in order. Gradients of this
        worker's own roles are still on its device; the peers' arrive as arrays."""
        assert self.state is not None
        dev = self.engine.device
        it = iter(peer_grads)
        for skip, peer_roles in pending:
            # each peer ref resolves to that worker's {role: gradient} of the round
            peers = {role: torch.from_numpy(next(it)[role]) for role in peer_roles}
            if skip:
                self.algo.skip(self.state)
            else:
                grads = {**{r: g.to(dev, non_blocking=True) for r, g in peers.items()},
                         **self.own}
                self.algo.update(self.state, grads)
            self.own = {}

    def compute(self) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """This worker's requests of the next round: gradient (host array) and facts."""
        assert self.state is not None
        mine: list[GradRequest] = [r for r in self.algo.requests(self.state)
                                   if slot_for(r.role) == self.slot]
        out = {}
        for req in mine:
            r = self.engine.gradient(req.point, req.batch, req.track_stats)
            dev_grad = self.engine.flat.grad
            self.own[req.role] = dev_grad.clone() if len(mine) > 1 else dev_grad
            norm = float(torch.linalg.vector_norm(dev_grad))
            out[req.role] = (r.grad.numpy().copy() if len(mine) > 1 else r.grad.numpy(),
                             {"loss": r.loss, "accuracy": r.accuracy, "timings": r.timings,
                              "start": r.start, "end": r.end, "norm": norm,
                              "finite": bool(np.isfinite(norm)) and bool(np.isfinite(r.loss)),
                              "nbytes": r.grad.numel() * r.grad.element_size()})
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        assert self.state is not None
        return {k: v.detach().to("cpu").numpy() for k, v in self.state.tensors().items()}
