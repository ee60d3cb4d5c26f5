"""The free data path: the workers run the rounds themselves.

On the collective path every round is one Ray call per worker: its submission, scheduling and
result handling run on the same cores as the gradients and cost about as much as a small model's
gradient. Here the coordinator starts a *chunk* of rounds with one call per worker (run up to
update ``until``) and each worker loops on its own: its role's gradient, the exchange with its
peers over the process group (one broadcast per role, buffers allocated once), the round applied
to its replica by the loop's one rule, the next round. The round facts (losses, accuracies,
timings, usable flags) come back in one batch per chunk; the coordinator's loop then follows
them round by round on its shadow state, so the progress bar, metrics, the control API and
result.json see the same events as on any other path.

A chunk ends where the coordinator needs the state or may change course: an epoch's end (its
evaluation), a checkpoint by count, the end of the run, and at most ``chunk_s`` seconds of
rounds (as measured so far), so that ``stop`` and an on-demand checkpoint take effect at a round
boundary within that time. A lost worker breaks its peers' exchange (or misses the chunk's
deadline): the pool restarts it and the run replays from the newest snapshot, as on the
collective path. Where no process group forms the run falls back to the replicated path's calls.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from ...algorithms import AlgoState
from ...engine import EvalResult, GradResult
from ..recovery import raise_lost
from .base import kept_gradient
from .collective import CollectivePath, CollectiveWorker

#: one round as a worker reports it: its wall time and the facts of this worker's roles
RoundFacts = tuple[float, dict[str, dict[str, Any]]]
#: a chunk as a worker reports it: ``rounds`` (RoundFacts) and ``evals`` (finished ones)
Chunk = dict[str, Any]


def exchange_split(results: dict[str, GradResult]
                   ) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Per role, a round's transfer (down, up) and wait, from the exchange times its workers
    measured: the worker that finished its gradient last waited for nobody, so its exchange
    is the transfer alone (half each way); what the others' took beyond that, they waited."""
    exchange = {role: r.timings.get("exchange", 0.0) for role, r in results.items()}
    transfer = min(exchange.values(), default=0.0)
    return ({role: (transfer / 2, transfer / 2) for role in results},
            {role: e - transfer for role, e in exchange.items()})


class FreeWorker(CollectiveWorker):
    """Worker half: the collective path's round, looped here until the coordinator's bound."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        #: a chunk failed (a peer lost, the exchange broken): chunks queued behind it end at
        #: once, until the replica is seeded again
        self.broken = False

    def init(self, *args: Any, **kw: Any) -> None:
        super().init(*args, **kw)
        self.broken = False

    def run_rounds(self, exchange: bool, until: int, evaluate: bool) -> Chunk:
        """Run rounds until the replica's state reaches update ``until``; with ``evaluate``,
        then start evaluating its parameters (the stats worker: each group's first rank).
        Returns each round's wall time and this worker's facts, and the evaluations finished
        so far (as ``finished_evals`` would)."""
        assert self.state is not None
        if self.broken:
            raise RuntimeError("an earlier chunk on this worker failed; the run replays")
        out: list[RoundFacts] = []
        perf = time.perf_counter
        try:
            while self.state.step < until:
                t0 = perf()
                facts = self.exchange_round(exchange)
                out.append((perf() - t0, facts))
        except BaseException:
            self.broken = True
            raise
        if evaluate and self.host.lead:
            self.engine.start_eval(self.state.step, self.state.x)
        return {"rounds": out, "evals": self.engine.finished_evals(False)}


class FreePath(CollectivePath):
    """Coordinator half: one call per worker per chunk of rounds, the next chunk queued behind
    the one running where the loop allows it; the round facts come back in a batch and are
    handed to the loop one round at a time."""

    worker_half = FreeWorker
    name = "free"
    #: the longest a chunk runs (seconds, as estimated from the rounds so far)
    chunk_s = 0.5
    #: the updates of the first chunk, before any round has been timed
    first_chunk = 4

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.update_s: float | None = None  # seconds per update, as measured
        #: the chunk queued behind the running one: (from, until, evaluate, calls by slot)
        self.queued: tuple[int, int, bool, dict[int, Any]] | None = None
        self.started_evals: set[int] = set()  # steps whose evaluation a chunk started
        self.evals: list[tuple[int, EvalResult]] = []  # finished, as chunks reported them
        self.chunk_count = self.chunk_rounds = 0  # chunks run, and the rounds in them

    def summary(self) -> dict[str, Any]:
        return {**super().summary(),
                "chunks": {"count": self.chunk_count, "rounds": self.chunk_rounds}}

    @property
    def chunks(self) -> bool:  # type: ignore[override]
        # without a process group (the fallback) rounds are the replicated path's calls
        return self.group or len(self.used) == 1

    @property
    def runs_ahead(self) -> bool:  # type: ignore[override]
        return not self.chunks  # the replicated path's calls run a round ahead

    def chunk_end(self, step: int, bound: int) -> int:
        most = self.first_chunk if self.update_s is None else \
            max(1, math.floor(self.chunk_s / max(self.update_s, 1e-6)))
        return min(bound, step + most)

    async def init_state(self, state: AlgoState,
                         loss_scale: dict[str, Any] | None = None) -> None:
        self.queued = None  # a replay: what was queued is abandoned (the workers refuse it)
        self.started_evals.clear()
        self.evals.clear()
        await super().init_state(state, loss_scale)

    def _start(self, step: int, until: int, evaluate: bool) -> dict[int, Any]:
        if evaluate:
            self.started_evals.add(until)
        return {s: self.call(s, "run_rounds", self.group, until, evaluate) for s in self.used}

    async def rounds(self, state: AlgoState, until: int, evaluate: bool = False,
                     ahead: tuple[int, bool] | None = None
                     ) -> AsyncIterator[tuple[float, dict[str, GradResult]]]:
        """The rounds from ``state`` until update ``until``: each one's share of the chunk's
        wall time (in proportion to the rounds' own times on the workers, so the chunk's
        call is counted) and its results by role. ``ahead`` (its end, whether it evaluates):
        the next chunk, queued behind this one before its results are awaited."""
        t0 = time.perf_counter()
        queued, self.queued = self.queued, None
        if queued is not None:
            if queued[:3] != (state.step, until, evaluate):
                raise RuntimeError(f"the chunk queued ran {queued[:3]}, the loop asks for "
                                   f"{(state.step, until, evaluate)}")
            calls = queued[3]
        else:
            calls = self._start(state.step, until, evaluate)
        if ahead is not None:
            self.queued = (until, *ahead, self._start(until, *ahead))
        # a chunk has a round deadline for each round it may take (SAM on one worker: two
        # rounds an update)
        chunks: list[Chunk] = await self._collect(calls, 2 * (until - state.step))
        elapsed = time.perf_counter() - t0
        self.update_s = elapsed / max(1, until - state.step)
        self.evals.extend(chunks[self.used.index(self.stats_slot)]["evals"])
        per_slot = [c["rounds"] for c in chunks]
        if len({len(r) for r in per_slot}) != 1:
            raise RuntimeError(f"the workers ran {[len(r) for r in per_slot]} rounds of one "
                               "chunk")
        walls = [max(r[i][0] for r in per_slot) for i in range(len(per_slot[0]))]
        self.chunk_count += 1
        self.chunk_rounds += len(walls)
        scale = elapsed / max(sum(walls), 1e-12)
        probe, fanout = self.probe, len(self.in_use) - len(self.groups[self.used[0]])
        for i, wall in enumerate(walls):
            results = {role: kept_gradient(meta) for r in per_slot
                       for role, meta in r[i][1].items()}
            if probe is not None:
                probe.dispatched_peers(self.fetched_from_peers(self.roles_by_slot(list(results))))
                probe.round_done(results, fanout, *exchange_split(results))
            yield wall * scale, results

    async def _collect(self, calls: dict[int, Any], most: int) -> list[Any]:
        """Every worker's chunk (by slot), under a round deadline for each of ``most`` rounds.
        Once one is done or failed (a lost worker, a broken exchange), the others ran the same
        rounds in lockstep with it, or are stuck in the exchange with it: each has one round
        deadline more to answer (a frozen one is then lost), and a loss comes first
        (:func:`raise_lost`)."""
        slots = list(calls)
        waits = [asyncio.ensure_future(self.pool.wait(s, calls[s], rounds=most))
                 for s in slots]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if any(not w.done() for w in waits):
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            waits = [asyncio.ensure_future(self.pool.wait(s, calls[s])) for s in slots]
        outs = await asyncio.gather(*waits, return_exceptions=True)
        raise_lost(outs)
        return list(outs)

    def _idle(self, what: str) -> None:
        if self.queued is not None:
            raise RuntimeError(f"{what} was asked for while a chunk is queued")

    async def start_eval(self, step: int, state: AlgoState) -> None:
        if step in self.started_evals:  # the chunk that ended there started it
            self.started_evals.discard(step)
            return
        self._idle("an evaluation")
        await super().start_eval(step, state)

    async def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        done, self.evals = self.evals, []
        if wait or not self.chunks:  # nothing queued then: ask the worker
            self._idle("the evaluations")
            done += await super().finished_evals(wait)
        return done

    async def full_state(self, state: AlgoState) -> AlgoState:
        self._idle("the state")
        return await super().full_state(state)
