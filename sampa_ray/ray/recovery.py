"""Worker loss: deadlines, restarts, and replaying rounds after a lost replica.

Ray restarts a dead worker actor (``max_restarts``), which reloads the model and the data. What
is ours: noticing a worker that is dead or missed ``--round-timeout`` (it is killed, then
restarted), giving a restarted worker its model buffers and its data path back, and, where a lost
worker took algorithm state along (replicated and collective paths), rebuilding every replica from
the newest snapshot and replaying the rounds since. Either way the trajectory is the one an
uninterrupted run takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import ObjectLostError, RayActorError

from ..algorithms import AlgoState
from ..checkpoint import Checkpoint, Checkpointer
from ..data.sources import check_same_data
from ..errors import UserError
from ..telemetry.metrics import RoundProbe
from ..transport.collective import PeerFailed


class NodeLost(Exception):
    """Workers' node died and no node took its place within ``--node-loss-wait-s``: ``workers``
    (their names) were on node ``node_id`` (address ``node_ip``). It leaves the coordinator (the
    driver decides: stop with one line, or go on on the nodes left), so its arguments are its
    fields (it pickles)."""

    def __init__(self, workers: list[str], node_id: str, node_ip: str, waited_s: float) -> None:
        super().__init__(workers, node_id, node_ip, waited_s)
        self.workers, self.node_id, self.node_ip, self.waited_s = (workers, node_id, node_ip,
                                                                     waited_s)

    def __str__(self) -> str:
        many = "s" if len(self.workers) > 1 else ""
        return (f"node {self.node_id} ({self.node_ip}) was lost with worker{many} "
                f"{', '.join(self.workers)} and no node took its place within "
                f"{self.waited_s:g}s")


class WorkerLost(Exception):
    """A gradient worker died or missed the round deadline (``slot``: its index)."""

    def __init__(self, slot: int, why: str, name: str | None = None) -> None:
        super().__init__(f"worker {name or slot} {why}")
        self.slot = slot


@dataclass
class Fan:
    """One call on every member of a role group, the group's first rank (whose result is the
    group's) first: worker indices and their object references. ``fan[i]``: the ``i``-th
    return value of each (calls with ``num_returns``)."""

    members: list[int]
    refs: list[Any]

    @property
    def lead(self) -> Any:
        """The first rank's reference: what a peer is handed."""
        return self.refs[0]

    def __getitem__(self, i: int) -> Fan:
        return Fan(self.members, [r[i] for r in self.refs])


def raise_lost(outcomes: Sequence[Any]) -> None:
    """Raise the first failure among a round's outcomes, a lost worker before anything else (a
    peer's broken exchange or missing input follows from the lost one), and a worker's own
    failure before the peers' word that it failed (:class:`PeerFailed`)."""
    lost = [o for o in outcomes if isinstance(o, WorkerLost)]
    own = [o for o in outcomes if isinstance(o, BaseException)
           and not isinstance(getattr(o, "cause", o), PeerFailed)]
    for o in lost + own + list(outcomes):
        if isinstance(o, BaseException):
            raise o


class WorkerPool:
    """The run's worker actors and their liveness: awaiting results under the deadline, and
    bringing lost workers back. ``infos`` (one dict per worker, as ``info()`` reports) is kept
    current across restarts. ``on_restart(slot)`` is awaited once a worker is back (the
    coordinator gives it its run settings and data path); ``on_deadline(slot)`` is called before
    a late worker is killed. A worker whose node died comes back only once a node takes that
    node's place in the placement group ``pg``: that is waited for ``node_wait_s`` seconds
    (:class:`NodeLost` after that)."""

    def __init__(self, workers: list[Any], infos: list[dict[str, Any]], *,
                 deadline_s: float | None = None, max_retries: int = 3,
                 on_restart: Callable[[int], Awaitable[None]] | None = None,
                 on_deadline: Callable[[int], None] | None = None,
                 pg: Any = None, node_wait_s: float = 60.0) -> None:
        self.workers = workers
        self.infos = infos
        self.deadline_s = deadline_s
        self.max_retries = max_retries
        self.on_restart = on_restart
        self.on_deadline = on_deadline
        self.pg = pg
        self.node_wait_s = node_wait_s
        #: by slot: the model buffers a restarted worker gets back (its last trajectory pass)
        self.last_buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.restarts = 0
        self.retried_rounds = 0
        #: by slot: when each call being awaited began (the control API's worker states)
        self._waiting: dict[int, dict[int, float]] = {}

    def busy_for(self, slot: int) -> float | None:
        """Seconds the longest-awaited call on worker ``slot`` has been running; None when
        nothing is awaited from it."""
        started = self._waiting.get(slot)
        return time.monotonic() - min(started.values()) if started else None

    def name(self, slot: int) -> str:
        return str(self.infos[slot].get("name", slot)) if slot < len(self.infos) else str(slot)

    async def wait(self, slot: int, ref: Any, roles: str | tuple[str, ...] = (),
                   probe: RoundProbe | None = None, rounds: int = 1) -> Any:
        """The result of one call on worker ``slot`` (``ref``), or of one call on each member
        of a role group (a :class:`Fan`: the first rank's result, once every member is done);
        ``WorkerLost`` when a worker dies or misses the deadline (it is then killed, and Ray
        restarts it): a member's loss before the errors it caused its peers (a broken
        all-reduce). With a ``probe``, the arrival is noted for each role (metrics: transfer
        and wait). A call that runs ``rounds`` rounds has that many round deadlines."""
        fan = ref if isinstance(ref, Fan) else Fan([slot], [ref])
        if len(fan.refs) == 1:
            out = await self._wait_one(fan.members[0], fan.refs[0], rounds)
        else:
            outs = await asyncio.gather(*[self._wait_one(i, r, rounds)
                                          for i, r in zip(fan.members, fan.refs, strict=True)],
                                        return_exceptions=True)
            raise_lost(outs)
            out = outs[0]
        if probe is not None:
            for role in (roles,) if isinstance(roles, str) else roles:
                probe.arrived(role)
        return out

    async def _wait_one(self, slot: int, ref: Any, rounds: int = 1) -> Any:
        waiting = self._waiting.setdefault(slot, {})
        key = id(ref)
        waiting[key] = time.monotonic()
        async def get() -> Any:
            return await ref

        try:
            deadline = None if self.deadline_s is None else self.deadline_s * rounds
            return await asyncio.wait_for(get(), timeout=deadline)
        except TimeoutError:
            if self.on_deadline is not None:
                self.on_deadline(slot)
            ray.kill(self.workers[slot], no_restart=False)  # Ray restarts it
            raise WorkerLost(slot, f"missed the {self.deadline_s * rounds:g}s deadline",
                             self.name(slot)) from None
        except RayActorError:
            raise WorkerLost(slot, "died", self.name(slot)) from None
        finally:
            waiting.pop(key, None)

    async def recover(self, slot: int, timeout_s: float = 180.0) -> None:
        """Wait for Ray to restart the worker, then give it back its buffers and run. When its
        node died, Ray restarts it only where a node takes that node's place: that has
        ``node_wait_s`` (:class:`NodeLost`), the restart there ``timeout_s`` again."""
        w = self.workers[slot]
        deadline = time.time() + timeout_s
        node = NodeWatch(self, slot)
        while True:
            try:
                info = await w.info.remote()
                if "error" in info:
                    raise UserError(info["error"])
                old = self.infos[slot]
                check_same_data({f"{self.name(slot)} before": old["data_fingerprint"],
                                 f"{self.name(slot)} restarted": info["data_fingerprint"]},
                                info["dataset"])
                break
            except RayActorError:
                if node.replaced():  # its node died and another took its place: restart there
                    deadline = time.time() + timeout_s
                if time.time() > deadline:
                    raise UserError(f"worker {self.name(slot)} did not come back within "
                                    f"{timeout_s:.0f}s") from None
                await asyncio.sleep(0.5)
        self.infos[slot] = info
        await w.reset.remote()
        if slot in self.last_buffers:
            await w.load_buffers.remote(self.last_buffers[slot])
        if self.on_restart is not None:
            await self.on_restart(slot)
        self.restarts += 1

    async def restarted(self, slot: int) -> bool:
        """Whether worker ``slot`` is down or is a new process since it was last seen."""
        try:
            info = await self.workers[slot].info.remote()
        except RayActorError:
            return True
        return info.get("pid") != self.infos[slot].get("pid")

    async def bring_back(self, err: BaseException) -> None:
        """After a failure: recover the lost worker and every other that is down or was
        restarted (a collective exchange broken mid-way can take the peer along, noticed here
        or only by a later call)."""
        for slot in range(len(self.workers)):
            if (isinstance(err, WorkerLost) and slot == err.slot) or await self.restarted(slot):
                await self.recover(slot)


def live_nodes() -> dict[str, dict[str, Any]]:
    """The cluster's nodes by id (``ray.nodes()`` entries), dead ones included."""
    return {n["NodeID"]: n for n in ray.nodes()}


class NodeWatch:
    """Whether the node of a worker being waited for died, and whether a node took its place
    in the placement group: then Ray restarts the worker there. Raises :class:`NodeLost` when
    none did within the pool's ``node_wait_s`` of the death being noticed."""

    def __init__(self, pool: WorkerPool, slot: int) -> None:
        self.pool, self.slot = pool, slot
        self.node_id = str(pool.infos[slot].get("node_id", ""))
        self.dead_since: float | None = None  # when the node was seen dead
        self.ip = "?"

    def replaced(self) -> bool:
        """True once, when the dead node's bundles are placed again (a node took its place)."""
        if self.dead_since is None:
            node = live_nodes().get(self.node_id)
            if node is None or node.get("Alive", True):
                return False  # alive (or unknown): an ordinary restart
            self.dead_since = time.monotonic()
            self.ip = str(node.get("NodeManagerAddress", "?"))
        if self.pool.pg is not None and placed(self.pool.pg, self.node_id):
            self.dead_since = None
            self.node_id = ""  # the restart has the ordinary timeout from here
            return True
        waited = time.monotonic() - self.dead_since
        if waited > self.pool.node_wait_s:
            names = [self.pool.name(i) for i, info in enumerate(self.pool.infos)
                     if info.get("node_id") == self.node_id]
            raise NodeLost(names or [self.pool.name(self.slot)], self.node_id, self.ip,
                           self.pool.node_wait_s)
        return False


def placed(pg: Any, dead: str) -> bool:
    """Whether every bundle of placement group ``pg`` has a node again, none of them the dead
    node ``dead`` (Ray may mark the node dead a moment before it moves the group)."""
    from ray.util import placement_group_table

    table = placement_group_table(pg)
    return table.get("state") == "CREATED" and dead not in table.get(
        "bundles_to_node_id", {}).values()


async def with_replay(train: Callable[[Checkpoint | None], Awaitable[AlgoState]],
                      resume: Checkpoint | None, pool: WorkerPool, checkpointer: Checkpointer,
                      max_restarts: int, say: Callable[[str], None]) -> AlgoState:
    """Run ``train`` (the loop, from ``resume``); when a worker is lost with state that lived
    only in the workers, bring the workers back and replay from the newest snapshot
    (``checkpointer.last``), at most ``max_restarts`` times. A lost node that nothing
    replaced (:class:`NodeLost`) ends the run with its newest snapshot on disk."""
    replays = 0
    while True:
        try:
            try:
                return await train(resume)
            except (WorkerLost, RayActorError, ObjectLostError) as err:
                # ObjectLostError: a result that lived on a lost node, needed by a peer or by
                # the coordinator after the worker that made it had returned
                replays += 1
                if replays > max_restarts:
                    raise UserError(f"{err}; {replays} times in this run, giving up") from None
                await pool.bring_back(err)
                what = (err if isinstance(err, WorkerLost) else "a worker went down"
                        if isinstance(err, RayActorError) else "a result was lost with its node")
        except NodeLost:  # the run stops here: what goes on resumes from disk
            with contextlib.suppress(UserError):  # a failed write: the older ones are left
                await checkpointer.keep_last()
            raise
        pool.retried_rounds += 1
        resume = checkpointer.last
        assert resume is not None
        say(f"{what}: restarted; replaying from step {resume.step}")
