"""The replicated data path: the algorithm's state lives beside the workers.

With the points path the coordinator holds x, sends every point down and takes every gradient up,
so each SAMPa round moves four full vectors through the coordinator and waits for its update.
Here each worker that serves a role keeps a replica of the algorithm state (x, momentum buffer,
g_y) on its own device and applies the same deterministic update; a round moves one gradient from
each worker to its peer (the object store hands over a reference; the bytes move once, worker to
worker) and no points at all. The coordinator follows the same algorithm on a 0-length shadow
state (so it knows every round's roles, batches and phases) and pulls the real state from a
replica for checkpoints, evaluation and the final outputs.

The verdict travels once: each gradient goes to the peers with its usable flag, and every
replica applies or skips a round by the loop's one rule (:func:`~sampa_ray.loop.round_applies`)
on those flags, the same facts the coordinator decides its shadow on. No decision comes back
down; the coordinator keeps only what needs the whole run: the non-finite streak and the abort.

Workers still know no algorithm: :class:`ReplicaWorker` composes an algorithm replica with the
gradient engine inside the worker process; the engine only ever computes ∇f at a point on a batch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import torch

from ...algorithms import AlgoState, GradRequest
from ...config import TrainConfig
from ...engine import GradResult
from ...loop import make_algorithm, round_applies, usable
from ...scaler import LossScale
from ...transport.codec import from_array, to_array
from ..recovery import raise_lost
from ..worker import WorkerHost
from .base import DataPath, kept_gradient

#: one pending round for a worker: the roles whose gradients (and usable flags) come from its
#: peers; the worker applies it by the loop's rule (:func:`round_applies`)
Pending = list[str]
#: what a worker hands its peers: per role, the gradient (a wire array) and whether it is usable
PeerGrads = dict[str, tuple[np.ndarray, bool]]


class ReplicaWorker:
    """Worker half: a replica of the algorithm state next to the worker's gradient engine."""

    def __init__(self, host: WorkerHost) -> None:
        self.host = host
        self.engine = host.engine
        self.state: AlgoState | None = None
        self.own: dict[str, torch.Tensor] = {}  # this worker's gradients of its last round
        self.own_ok: dict[str, bool] = {}  # and whether each is usable
        self.scale: LossScale | None = None  # fp16: the loss scale, following the verdicts

    def init(self, cfg: dict[str, Any], total_steps: int, tensors: dict[str, np.ndarray],
             step: int, phase: int, loss_scale: dict[str, Any] | None = None) -> None:
        """Seed the replica: the run's algorithm, at the given state, and (fp16) the loss
        scale's state, which it follows on every round's verdict as the loop does."""
        config = TrainConfig(**cfg)
        self.algo = make_algorithm(config, total_steps, self.engine.schedule.batches_per_epoch)
        self.scale = LossScale.of(config)
        if self.scale is not None:
            self.scale.load_state_dict(loss_scale)
        dev = self.engine.device
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev, copy=True)
             for k, v in tensors.items()}
        self.state = AlgoState.from_tensors(t, step, phase)
        self.own, self.own_ok = {}, {}

    @property
    def slot(self) -> int:
        """The algorithm slot this worker's role group serves."""
        return self.host.slot

    def mine(self, reqs: list[GradRequest]) -> list[GradRequest]:
        """The requests this worker serves."""
        return [r for r in reqs if self.algo.slot_of(r.role) == self.slot]

    # -- the calls of the coordinator half ----------------------------------------------------
    def round(self, pending: list[Pending], *peer_grads: PeerGrads
              ) -> tuple[PeerGrads, dict[str, dict[str, Any]]]:
        """Apply the rounds not applied yet, compute this worker's requests of the next one.
        Two objects: the gradients (handed on to the peer) and the facts (for the
        coordinator), so the coordinator never has to fetch a gradient."""
        # each peer gradient crosses the (emulated) link once, into this worker
        self.host.link.wait(sum(g.nbytes for d in peer_grads for g, _ in d.values()))
        t0 = time.perf_counter()
        self.apply(pending, list(peer_grads))
        applied = time.perf_counter() - t0
        out = self.compute()
        for _, meta in out.values():
            meta["timings"]["apply"] = applied  # the pending updates, on this worker
        # the group's gradient goes to the peers from its first rank alone
        return ({r: (g, m["finite"]) for r, (g, m) in out.items()} if self.host.lead else {},
                {r: m for r, (_, m) in out.items()})

    def state_tensors(self, pending: list[Pending], *peer_grads: PeerGrads
                      ) -> dict[str, np.ndarray]:
        """The replica's state after the pending rounds, as host arrays (from a role group's
        first rank; the others only apply the rounds)."""
        self.apply(pending, list(peer_grads))
        return self.tensors() if self.host.lead else {}

    def evaluate(self, step: int, pending: list[Pending], *peer_grads: PeerGrads) -> None:
        """Start evaluating the replica's parameters after the pending rounds."""
        self.apply(pending, list(peer_grads))
        assert self.state is not None
        if self.host.lead:
            self.engine.start_eval(step, self.state.x)

    # -- the work -----------------------------------------------------------------------------
    def apply(self, pending: list[Pending], peer_grads: list[PeerGrads]) -> None:
        """Apply the rounds this replica has not applied yet, in order. Gradients of this
        worker's own roles are still on its device; the peers' arrive as arrays."""
        assert self.state is not None
        dev = self.engine.device
        it = iter(peer_grads)
        for peer_roles in pending:
            # each peer ref resolves to that worker's {role: (gradient, usable)} of the round
            got = {role: next(it)[role] for role in peer_roles}
            # the loop's rule, on the same facts the coordinator sees
            skip = not round_applies([ok for _, ok in got.values()] + list(self.own_ok.values()))
            self.finish_round(skip, {r: from_array(g).to(dev, non_blocking=True)
                                     for r, (g, _) in got.items()})

    def finish_round(self, skip: bool, peers: dict[str, torch.Tensor]) -> None:
        """Apply (or skip) one round with the peers' gradients and this worker's own; the
        loss scale (fp16) follows the verdict."""
        assert self.state is not None
        if self.scale is not None:
            self.scale.follow(not skip)
        if skip:
            self.algo.skip(self.state)
        else:
            self.algo.update(self.state, {**peers, **self.own})
        self.own, self.own_ok = {}, {}

    def compute(self) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """This worker's requests of the next round: gradient (host array) and facts."""
        assert self.state is not None
        mine = self.mine(self.algo.requests(self.state))
        out = {}
        for req in mine:
            r, facts = self.own_gradient(req, keep=len(mine) > 1)
            grad = to_array(r.grad) if self.host.lead else np.empty(0, np.float32)
            out[req.role] = (grad.copy() if len(mine) > 1 else grad, facts)
        return out

    def own_gradient(self, req: GradRequest, keep: bool,
                     to_host: bool = True) -> tuple[GradResult, dict[str, Any]]:
        """Compute one of this worker's requests; remember its device gradient (a copy with
        ``keep``: the engine reuses its buffer) and whether it is usable; return the result
        and the facts the coordinator gets."""
        r = self.engine.gradient(req.point, req.batch, req.track_stats, to_host=to_host,
                                 loss_scale=self.scale.scale if self.scale is not None else None)
        dev_grad = self.engine.flat.grad
        self.own[req.role] = dev_grad.clone() if keep else dev_grad
        norm = float(torch.linalg.vector_norm(dev_grad))
        ok = usable(r.loss, norm=norm)
        self.own_ok[req.role] = ok
        return r, {"loss": r.loss, "accuracy": r.accuracy, "timings": r.timings,
                   "start": r.start, "end": r.end, "norm": norm, "finite": ok,
                   "nbytes": r.grad.numel() * r.grad.element_size(),
                   "reduced_bytes": r.reduced_bytes}

    def tensors(self) -> dict[str, np.ndarray]:
        assert self.state is not None
        return {k: v.detach().to("cpu").numpy() for k, v in self.state.tensors().items()}


class ReplicatedPath(DataPath):
    """Coordinator half: dispatches rounds to the replica-holding workers and hands each
    worker's gradient reference on to its peers, so gradients move worker to worker and the
    coordinator fetches none of them."""

    worker_half = ReplicaWorker
    name = "replicated"
    holds_state = True
    runs_ahead = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        # per worker: the rounds it has not applied yet, each {role: gradient ref}
        self.pending: dict[int, list[dict[str, Any]]] = {s: [] for s in self.used}
        # the next round, dispatched before this one's results came back: (slots, calls,
        # peer gradients each worker fetches); its call applies this round first
        self.ahead: tuple[list[int], dict[int, Any], dict[int, int]] | None = None

    async def init_state(self, state: AlgoState,
                         loss_scale: dict[str, Any] | None = None) -> None:
        self.ahead = None  # a replay: what ran ahead is abandoned
        tensors = {k: v.detach().cpu().numpy() for k, v in state.tensors().items()}
        await asyncio.gather(*[self.ask(s, self.call(s, "init", self.cfg.model_dump(),
                                                     self.ctx.total_steps, tensors, state.step,
                                                     state.phase, loss_scale))
                               for s in self.used])
        for s in self.used:
            self.pending[s].clear()

    def _take_pending(self, slot: int) -> tuple[list[Pending], list[Any]]:
        """The rounds a worker has not applied: specs, and the peers' gradient refs in order."""
        specs: list[Pending] = []
        refs: list[Any] = []
        for by_role in self.pending[slot]:
            peer = [role for role in by_role if self.slot_of(role) != slot]
            specs.append(peer)
            refs.extend(by_role[role] for role in peer)
        self.pending[slot] = []
        return specs, refs

    def _dispatch(self, slots: list[int], reqs: list[GradRequest] | None = None,
                  calls: dict[int, Any] | None = None) -> tuple[dict[int, Any], dict[int, int]]:
        """One call per slot with its pending rounds; with ``reqs`` and their ``calls`` (a
        round still running), that round too."""
        out, fetched = {}, {}
        for s in slots:
            specs, refs = self._take_pending(s)
            if reqs is not None and calls is not None:
                peer = [r.role for r in reqs if self.slot_of(r.role) != s]
                specs.append(peer)
                refs.extend(calls[self.slot_of(role)][0].lead for role in peer)
            out[s] = self.call(s, "round", specs, *refs, num_returns=2)
            fetched[s] = len(refs)
        return out, fetched

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        slots = sorted({self.slot_of(r.role) for r in reqs})
        probe = self.probe
        if self.ahead is not None:  # dispatched during the last round
            ahead_slots, calls, fetched = self.ahead
            self.ahead = None
            if ahead_slots != slots:
                raise RuntimeError(f"the round run ahead used workers {ahead_slots}, the loop "
                                   f"asks for {slots}")
        else:
            calls, fetched = self._dispatch(slots)
        roles = {s: tuple(r.role for r in reqs if self.slot_of(r.role) == s) for s in slots}
        if probe is not None:  # metrics: gradients fetched from peers, by the slot's role
            probe.dispatched_peers({roles[s][0]: fetched[s] for s in slots})
        queued: list[int] = []  # slots whose next call (run ahead) applies this round
        if ahead is not None:  # queue the next round behind this one on every worker
            queued = sorted({self.slot_of(r.role) for r in ahead})
            ncalls, nfetched = self._dispatch(queued, reqs, calls)
            self.ahead = (queued, ncalls, nfetched)
        facts = await asyncio.gather(*[self.pool.wait(s, calls[s][1], roles[s], probe)
                                       for s in slots], return_exceptions=True)
        raise_lost(facts)  # a lost worker takes its replica along: the coordinator replays
        results: dict[str, GradResult] = {}
        refs: dict[str, Any] = {}
        for s, f in zip(slots, facts, strict=True):
            for role, meta in f.items():
                results[role] = kept_gradient(meta)
                # that group's first rank's {role: (gradient, usable)} object
                refs[role] = calls[s][0].lead
        for s in self.used:  # every other worker applies the round with its next call
            if s not in queued:
                self.pending[s].append(refs)
        if probe is not None:  # each gradient goes to every worker of the other groups
            probe.round_done(results, fanout=len(self.in_use) - len(self.groups[slots[0]]))
        return results

    async def full_state(self, state: AlgoState) -> AlgoState:
        if self.ahead is not None:
            raise RuntimeError("the state was asked for while a round runs ahead")
        s = self.stats_slot
        specs, refs = self._take_pending(s)
        t = await self.ask(s, self.call(s, "state_tensors", specs, *refs))
        return AlgoState.from_tensors({k: torch.from_numpy(v) for k, v in t.items()},
                                      state.step, state.phase)

    async def start_eval(self, step: int, state: AlgoState) -> None:
        s = self.stats_slot
        specs, refs = self._take_pending(s)
        await self.ask(s, self.call(s, "evaluate", step, specs, *refs))
