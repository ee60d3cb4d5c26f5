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

import math
import time
from typing import Any

import numpy as np
import torch

from .algorithms import AlgoState, GradRequest
from .config import TrainConfig
from .engine import GradientEngine, GradResult
from .trainer import make_algorithm, slot_for
from .transport.codec import from_array, to_array
from .transport.collective import PeerGroup

#: one pending round for a worker: (skipped?, roles whose gradients come from peers); skipped
#: None: decide by the loop's rule (skip when any of the round's gradients or losses is
#: non-finite), for a round the coordinator ran ahead of (see ``ReplicatedExecutor``)
Pending = tuple[bool | None, list[str]]
#: what a worker hands its peers: per role, the gradient (a wire array) and whether it is usable
PeerGrads = dict[str, tuple[np.ndarray, bool]]


class Replica:
    """Worker side: a replica of the algorithm state next to one gradient engine."""

    def __init__(self, engine: GradientEngine, slot: int) -> None:
        self.engine = engine
        self.slot = slot
        self.state: AlgoState | None = None
        self.own: dict[str, torch.Tensor] = {}  # this worker's gradients of its last round
        self.own_ok: dict[str, bool] = {}  # and whether each is usable
        self.buffers: dict[str, torch.Tensor] = {}  # collective path: message buffers
        self.received_bytes = 0  # collective path: the peers' gradients of the last round

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
        self.own, self.own_ok = {}, {}

    def apply(self, pending: list[Pending], peer_grads: list[PeerGrads]) -> None:
        """Apply the rounds this replica has not applied yet, in order. Gradients of this
        worker's own roles are still on its device; the peers' arrive as arrays."""
        assert self.state is not None
        dev = self.engine.device
        it = iter(peer_grads)
        for skip, peer_roles in pending:
            # each peer ref resolves to that worker's {role: (gradient, usable)} of the round
            got = {role: next(it)[role] for role in peer_roles}
            peers = {role: from_array(g) for role, (g, _) in got.items()}
            if skip is None:  # the loop's rule, on the same facts the coordinator sees
                skip = not (all(ok for _, ok in got.values()) and all(self.own_ok.values()))
            if skip:
                self.algo.skip(self.state)
            else:
                grads = {**{r: g.to(dev, non_blocking=True) for r, g in peers.items()},
                         **self.own}
                self.algo.update(self.state, grads)
            self.own, self.own_ok = {}, {}

    def compute(self) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """This worker's requests of the next round: gradient (host array) and facts."""
        assert self.state is not None
        mine: list[GradRequest] = [r for r in self.algo.requests(self.state)
                                   if slot_for(r.role) == self.slot]
        out = {}
        for req in mine:
            r, facts = self._own_gradient(req, keep=len(mine) > 1)
            out[req.role] = (to_array(r.grad).copy() if len(mine) > 1 else to_array(r.grad),
                             facts)
        return out

    def _own_gradient(self, req: GradRequest, keep: bool,
                      to_host: bool = True) -> tuple[GradResult, dict[str, Any]]:
        """Compute one of this worker's requests; remember its device gradient (a copy with
        ``keep``: the engine reuses its buffer) and whether it is usable; return the result
        and the facts the coordinator gets."""
        r = self.engine.gradient(req.point, req.batch, req.track_stats, to_host=to_host)
        dev_grad = self.engine.flat.grad
        self.own[req.role] = dev_grad.clone() if keep else dev_grad
        norm = float(torch.linalg.vector_norm(dev_grad))
        ok = math.isfinite(norm) and math.isfinite(r.loss)
        self.own_ok[req.role] = ok
        return r, {"loss": r.loss, "accuracy": r.accuracy, "timings": r.timings,
                   "start": r.start, "end": r.end, "norm": norm, "finite": ok,
                   "nbytes": r.grad.numel() * r.grad.element_size()}

    def collective_round(self, group: PeerGroup | None) -> dict[str, dict[str, Any]]:
        """One whole round on the collective path: compute this worker's requests, exchange
        the round's gradients with the peers (one broadcast per role, from the worker that
        computed it, in request order: every replica derives the same order from the same
        state), then apply the round by the loop's rule. Returns the facts of this worker's
        roles. Without a group (one worker in use) there is nothing to exchange."""
        assert self.state is not None
        engine = self.engine
        n = engine.flat.numel
        reqs = self.algo.requests(self.state)
        mine = [r for r in reqs if slot_for(r.role) == self.slot]
        on_host = group is None or group.device.type == "cpu"
        facts: dict[str, dict[str, Any]] = {}
        sends: dict[str, torch.Tensor] = {}
        for req in mine:
            r, facts[req.role] = self._own_gradient(req, keep=len(mine) > 1, to_host=on_host)
            if group is not None:  # the gradient and its verdict in one message
                buf = self._buffer(f"send/{req.role}", n + 1, r.grad.dtype, group.device)
                buf[:n].copy_(r.grad)
                buf[n] = 1.0 if facts[req.role]["finite"] else 0.0
                sends[req.role] = buf
        peers: dict[str, tuple[torch.Tensor, bool]] = {}
        self.received_bytes = 0
        if group is not None:
            t0 = time.perf_counter()
            for req in reqs:
                src = slot_for(req.role)
                if src == self.slot:
                    group.broadcast(sends[req.role], src)
                else:
                    buf = self._buffer(f"recv/{req.role}", n + 1, engine.wire, group.device)
                    group.broadcast(buf, src)
                    peers[req.role] = (buf[:n].to(engine.device, torch.float32),
                                       bool(buf[n] != 0))
                    self.received_bytes += n * buf.element_size()
            exchange = time.perf_counter() - t0
            for f in facts.values():
                f["timings"]["exchange"] = exchange
        t0 = time.perf_counter()
        if all(ok for _, ok in peers.values()) and all(self.own_ok.values()):
            self.algo.update(self.state, {**{r: g for r, (g, _) in peers.items()}, **self.own})
        else:
            self.algo.skip(self.state)
        self.own, self.own_ok = {}, {}
        for f in facts.values():
            f["timings"]["apply"] = time.perf_counter() - t0
        return facts

    def _buffer(self, name: str, numel: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A message buffer allocated once and reused every round."""
        b = self.buffers.get(name)
        if b is None or b.dtype != dtype or b.device != device or b.numel() != numel:
            b = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return b

    def tensors(self) -> dict[str, np.ndarray]:
        assert self.state is not None
        return {k: v.detach().to("cpu").numpy() for k, v in self.state.tensors().items()}
