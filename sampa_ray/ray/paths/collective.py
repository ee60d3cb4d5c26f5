"""The collective data path: the replicated path with the gradients exchanged over
torch.distributed (``sampa_ray.transport.collective``: NCCL between GPUs, gloo otherwise).

Every worker in use gets one call per round: it computes its requests, exchanges the round's
gradients with its peers (one broadcast per role, from the worker that computed it) and applies
the round by the loop's rule, so no call waits on another's result and the next round can be
queued behind this one. Where no group can be formed the run says why once and uses the object
store instead (the replicated path's calls, on the same worker halves).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch
from ray.exceptions import RayTaskError

from ...algorithms import AlgoState, GradRequest
from ...engine import GradResult
from ...errors import error_line
from ...loop import round_applies
from ...transport.collective import CollectiveError, PeerFailed, PeerGroup
from ..placement import broadcast_fans
from ..recovery import raise_lost
from ..worker import WorkerHost
from .base import kept_gradient
from .replicated import ReplicatedPath, ReplicaWorker

#: the verdict slot of a message whose sender's own work failed this round (no gradient)
FAILED = -1.0


class CollectiveWorker(ReplicaWorker):
    """Worker half: a replica (as on the replicated path) and this process's membership in the
    workers' process group."""

    def __init__(self, host: WorkerHost, leaders: dict[int, int] | None = None,
                 fans: dict[int, list[int]] | None = None) -> None:
        super().__init__(host)
        # by slot: the world rank that speaks for its role group (one worker per role: the
        # slot's own worker, world rank = slot)
        self.leaders = leaders if leaders is not None else {0: 0, 1: 1}
        # by slot: the world ranks its broadcast spans (role groups: the sender and the other
        # roles' workers; none: all of them)
        self.fans = fans or {}
        self.buffers: dict[str, torch.Tensor] = {}  # message buffers, allocated once

    def exchange_round(self, exchange: bool) -> dict[str, dict[str, Any]]:
        """One whole round: compute this worker's requests, exchange the round's gradients with
        the peers (one broadcast per role, from the worker that computed it, in request order:
        every replica derives the same order from the same state), then apply the round by the
        loop's rule. Returns the facts of this worker's roles. Without ``exchange`` (one worker
        in use) there is nothing to exchange."""
        assert self.state is not None
        group = self.host.group if exchange else None
        n = self.engine.flat.numel
        reqs = self.algo.requests(self.state)
        mine = self.mine(reqs)
        facts, sends, failed = self._own_round(mine, group)
        peers: dict[str, torch.Tensor] = {}
        verdicts = list(self.own_ok.values())
        received = 0
        peer_failed = False
        if group is not None:
            t0 = time.perf_counter()
            for req in reqs:
                slot = self.algo.slot_of(req.role)
                src, fan = self.leaders[slot], self.fans.get(slot)
                if src == group.rank:
                    group.broadcast(sends[req.role], src, fan)
                elif slot == self.slot:  # the role's group already holds it (all-reduce)
                    continue
                else:
                    buf = self._buffer(f"recv/{req.role}", n + 1, self.engine.wire,
                                       group.device)
                    group.broadcast(buf, src, fan)
                    peer_failed = peer_failed or bool(buf[n] == FAILED)
                    peers[req.role] = buf[:n].to(self.engine.device, torch.float32)
                    verdicts.append(bool(buf[n] != 0))
                    received += n * buf.element_size()
            exchange_s = time.perf_counter() - t0
            for f in facts.values():
                f["timings"]["exchange"] = exchange_s
        if failed is not None:
            raise failed
        if peer_failed:
            raise PeerFailed("a peer's round failed: its error ends the run")
        self.host.link.wait(received)  # the peers' gradients came over the (emulated) link
        t0 = time.perf_counter()
        self.finish_round(not round_applies(verdicts), peers)
        for f in facts.values():
            f["timings"]["apply"] = time.perf_counter() - t0
        return facts

    def _own_round(self, mine: list[GradRequest], group: PeerGroup | None
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor],
                              Exception | None]:
        """This worker's requests of the round: their facts, the messages its peers get (the
        gradient and its verdict, from a group's first rank) and what failed, if its own work
        did (the user's data, model or loss): the peers are told (verdict ``FAILED``) in the
        exchange, so no one waits on a gradient that never comes, and it is raised after."""
        n = self.engine.flat.numel
        on_host = group is None or group.device.type == "cpu"
        facts: dict[str, dict[str, Any]] = {}
        sends: dict[str, torch.Tensor] = {}
        failed: Exception | None = None
        for req in mine:
            buf = self._buffer(f"send/{req.role}", n + 1, self.engine.wire, group.device) \
                if group is not None and self.host.lead else None
            try:
                if failed is None:
                    r, facts[req.role] = self.own_gradient(req, keep=len(mine) > 1,
                                                           to_host=on_host)
            except Exception as err:  # noqa: BLE001 - said to the peers, then raised
                if buf is None:
                    raise
                failed = err
            if buf is not None:
                if failed is None:
                    buf[:n].copy_(r.grad)
                buf[n] = FAILED if failed is not None else \
                    1.0 if facts[req.role]["finite"] else 0.0
                sends[req.role] = buf
        return facts, sends, failed

    def _buffer(self, name: str, numel: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A message buffer allocated once and reused every round."""
        b = self.buffers.get(name)
        if b is None or b.dtype != dtype or b.device != device or b.numel() != numel:
            b = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return b


class CollectivePath(ReplicatedPath):
    """Coordinator half: forms the group when the state is seeded (each run, each replay),
    queues one call per worker per round, and falls back to the replicated path's calls
    where no group forms."""

    worker_half = CollectiveWorker
    name = "collective"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        # several slots: their gradients are exchanged; one (SGD, SAM): nothing to exchange
        self.group = len(self.used) > 1
        self.fallback: str | None = None  # why the object store is used instead
        self.calls: dict[int, Any] | None = None  # the round queued ahead

    def summary(self) -> dict[str, Any]:
        return {**super().summary(),
                "collective": {"backend": self.backend, "fallback": self.fallback}}

    def attach_args(self, slot: int) -> tuple[Any, ...]:
        # by slot: the world rank that broadcasts that role's gradient, and those it reaches
        return ({s: self.world_rank(self.lead(s)) for s in self.used}, self.fans())

    def fans(self) -> dict[int, list[int]]:
        fans = broadcast_fans({s: self.groups[s] for s in self.used})
        return {s: [self.world_rank(w) for w in f] for s, f in fans.items()}

    @property
    def needs_world(self) -> bool:
        return self.grouped or self.group

    async def prepare(self) -> None:
        if self.grouped:  # the role groups need the process group: no fallback
            await super().prepare()
            return
        self.group = len(self.used) > 1
        if self.group:
            try:
                await self.form_world()
            except (CollectiveError, RayTaskError, TimeoutError) as err:
                cause = err.cause if isinstance(err, RayTaskError) else err
                self.group, self.backend = False, None
                self.fallback = error_line(cause) if str(cause).strip() else \
                    "the workers did not meet in time"
                self.ctx.say(f"collective: no process group ({self.fallback}); the gradients "
                             "go through Ray's object store instead")

    async def init_state(self, state: AlgoState,
                         loss_scale: dict[str, Any] | None = None) -> None:
        self.calls = None
        await super().init_state(state, loss_scale)

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        if not self.group and len(self.used) > 1:
            return await super().round(reqs, ahead)
        slots, probe = self.used, self.probe
        calls = self.calls or self._queue()
        self.calls = None
        if ahead is not None:  # no call waits on another's result: queue the next one now
            self.calls = self._queue()
        roles = self.roles_by_slot([r.role for r in reqs])
        if probe is not None:
            probe.dispatched_peers(self.fetched_from_peers(roles))
        facts = await asyncio.gather(*[self.pool.wait(s, calls[s], roles[s], probe)
                                       for s in slots], return_exceptions=True)
        raise_lost(facts)
        results: dict[str, GradResult] = {}
        for f in facts:
            for role, meta in f.items():
                results[role] = kept_gradient(meta)
        if probe is not None:
            probe.round_done(results, fanout=len(self.in_use) - len(self.groups[slots[0]]))
        return results

    def roles_by_slot(self, roles: list[str]) -> dict[int, tuple[str, ...]]:
        """A round's roles by the slot in use that computes them (a slot may have none)."""
        return {s: tuple(r for r in roles if self.slot_of(r) == s) for s in self.used}

    @staticmethod
    def fetched_from_peers(roles: dict[int, tuple[str, ...]]) -> dict[str, int]:
        """Per slot's first role (metrics): how many of the round's gradients its workers
        receive from the other slots' broadcasts."""
        n = sum(len(rs) for rs in roles.values())
        return {rs[0]: n - len(rs) for rs in roles.values() if rs}

    def _queue(self) -> dict[int, Any]:
        """One round's call on every worker in use."""
        return {s: self.call(s, "exchange_round", self.group) for s in self.used}

    async def full_state(self, state: AlgoState) -> AlgoState:
        if self.calls is not None:
            raise RuntimeError("the state was asked for while a round runs ahead")
        return await super().full_state(state)
