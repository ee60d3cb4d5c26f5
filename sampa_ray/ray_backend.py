"""The Ray backend: a coordinator actor and two gradient-worker actors.

    driver (CLI / `ray job submit` entrypoint)
      └─ Coordinator actor (asyncio): algorithm state, schedules, evaluation, outputs
           ├─ GradientWorker "perturbed"    (bundle 0): model replica, data, ∇f at a point
           └─ GradientWorker "extrapolated" (bundle 1)

Workers compute gradients and know nothing of the algorithm; the coordinator decides and runs no
model. Points go down and gradients come up through Ray's object store as numpy arrays (zero-copy
reads on the same node). Both workers exist for every algorithm, so SGD and SAM (which use only
the first) run on exactly the actors SAMPa uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from .algorithms import AlgoState, GradRequest
from .checkpoint import Checkpoint
from .config import TrainConfig
from .engine import EvalResult, GradientEngine, GradResult
from .errors import UserError
from .metrics import RoundProbe, RunMetrics
from .replicated import PeerGrads, Pending, Replica
from .results import Recorder, write_outputs
from .trainer import (
    ROLES,
    Checkpointer,
    Executor,
    Plan,
    Progress,
    build_result,
    find_resume,
    finite,
    make_algorithm,
    slot_for,
    train_loop,
)
from .transport.codec import from_array, to_array
from .transport.collective import CollectiveError, PeerGroup, choose_backend, rendezvous_address
from .transport.collective import leave as leave_group
from .transport.grpc_client import PointClient
from .transport.grpc_server import ProgressHub, RoundBoard, start_server, stop_server

# Arrays read from the object store are read-only; they are only ever copied from.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only) numpy array, without copying."""
    return torch.from_numpy(a)


class Link:
    """An emulated link: each message waits latency + bytes / bandwidth before it counts as
    delivered (applied by the receiving or sending worker, so it lands in the transfer time)."""

    def __init__(self, latency_ms: float, gbit_s: float | None) -> None:
        self.latency_s = latency_ms / 1e3
        self.bytes_per_s = gbit_s * 1e9 / 8 if gbit_s else None

    def delay(self, nbytes: int) -> float:
        if not nbytes:
            return 0.0
        return self.latency_s + (nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)

    def wait(self, nbytes: int) -> None:
        d = self.delay(nbytes)
        if d > 0:
            time.sleep(d)


# -- placement ----------------------------------------------------------------------------------
@dataclass
class Placement:
    """Where the two workers go. ``mode`` is gpu-spread, gpu-pack, gpu-shared or cpu."""

    mode: str
    strategy: str
    bundles: list[dict[str, float]]
    threads: int
    gpus_per_worker: float

    def describe(self) -> str:
        what = {"gpu-spread": "one GPU each on two GPU nodes (STRICT_SPREAD)",
                "gpu-pack": "one GPU each on one node",
                "gpu-shared": "both workers share one GPU (fractional GPUs)",
                "cpu": f"CPUs only, {self.threads} torch thread(s) per worker"}[self.mode]
        return f"placement: {what}; bundles {self.bundles}, strategy {self.strategy}"


def choose_placement(cfg: TrainConfig) -> Placement:
    """Decide the placement from the cluster's live nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = [n for n in nodes if n["Resources"].get("GPU", 0) >= 1]
    total_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    total_cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    if cfg.device == "cpu" or total_gpus < 1:
        if cfg.device == "cuda":
            raise UserError("device: cuda requested but the Ray cluster has no GPU")
        threads = cfg.threads or max(1, int(total_cpus) // 2)
        return Placement("cpu", "PACK", [{"CPU": float(threads)}] * 2, threads, 0.0)
    cpus_per_node = min(n["Resources"].get("CPU", 1) for n in gpu_nodes)
    threads = cfg.threads or max(1, int(cpus_per_node) // 2)
    if len(gpu_nodes) >= 2:
        return Placement("gpu-spread", "STRICT_SPREAD",
                         [{"GPU": 1.0, "CPU": float(threads)}] * 2, threads, 1.0)
    if total_gpus >= 2:
        return Placement("gpu-pack", "PACK", [{"GPU": 1.0, "CPU": float(threads)}] * 2,
                         threads, 1.0)
    return Placement("gpu-shared", "PACK", [{"GPU": 0.5, "CPU": float(threads)}] * 2,
                     threads, 0.5)


# -- the workers --------------------------------------------------------------------------------
@ray.remote(max_restarts=0)
class GradientWorker:
    """A model replica and the data on one device: the gradient at a point on a batch."""

    def __init__(self, cfg: dict[str, Any], name: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.name = name
        self.replica: Replica | None = None
        self.client: PointClient | None = None
        self.group: PeerGroup | None = None
        self.link = Link(0.0, None)
        self.error: str | None = None
        try:
            self.engine = GradientEngine(TrainConfig(**cfg))
        except UserError as err:  # reported by info(): one line, not a traceback
            self.error = str(err)

    def info(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        ctx = ray.get_runtime_context()
        return {**self.engine.info(), "name": self.name, "pid": os.getpid(),
                "node_id": ctx.get_node_id(), "gpu_ids": ray.get_gpu_ids()}

    def initial_point(self) -> np.ndarray:
        return self.engine.initial_point().numpy()

    def configure(self, latency_ms: float, gbit_s: float | None, wire_dtype: str) -> None:
        """Per-run settings: an emulated slower link between this worker and the others
        (benchmarks), and the gradients' number format on the wire."""
        self.link = Link(latency_ms, gbit_s)
        self.engine.set_wire(wire_dtype)

    def gradient(self, point: np.ndarray, batch: int, track_stats: bool
                 ) -> tuple[np.ndarray, dict[str, Any]]:
        self.link.wait(point.nbytes)  # the point came down the (emulated) link
        r = self.engine.gradient(as_tensor(point), batch, track_stats)
        self.link.wait(r.grad.numel() * r.grad.element_size())  # the gradient goes up
        # the array is copied into the object store when this method returns, so the engine
        # may reuse its gradient buffer for the next request. A pass on the trajectory also
        # returns the model buffers (small): the coordinator keeps them to restore a restarted
        # worker exactly.
        return to_array(r.grad), {"loss": r.loss, "accuracy": r.accuracy, "timings": r.timings,
                                "start": r.start, "end": r.end,
                                "buffers": self.engine.buffers() if track_stats else None}

    def reset(self) -> None:
        self.engine.reset()
        self.replica = None

    # -- the gRPC transport: points and gradients as chunked streams ---------------------------
    def connect_grpc(self, target: str, run_id: str, token: str | None,
                     root_cert: bytes | None) -> None:
        """Open this process's channel to the coordinator's ParameterService."""
        if self.client is not None:
            self.client.close()
        self.client = PointClient(target, run_id, token=token, root_cert=root_cert)
        self.point_buf = torch.empty(self.engine.flat.numel)

    def gradient_grpc(self, step: int, role: str, batch: int, track_stats: bool
                      ) -> dict[str, Any]:
        """Fetch the point of (step, role), compute, stream the gradient back. A non-finite
        gradient is not sent (the server would refuse it); the coordinator learns it here."""
        assert self.client is not None
        fetch_s = self.client.fetch_point(step, role, self.point_buf)
        self.link.wait(self.point_buf.numel() * self.point_buf.element_size())
        r = self.engine.gradient(self.point_buf, batch, track_stats)
        ok = finite(r)
        self.link.wait(r.grad.numel() * r.grad.element_size() if ok else 0)
        push_s = self.client.push_gradient(step, role, r.grad, r.loss, r.accuracy,
                                           r.timings) if ok else 0.0
        return {"loss": r.loss, "accuracy": r.accuracy, "start": r.start, "end": r.end,
                "timings": {**r.timings, "fetch": fetch_s, "push": push_s}, "finite": ok,
                "buffers": self.engine.buffers() if track_stats else None}

    # -- the replicated data path: the algorithm state beside the engine ----------------------
    def replica_init(self, cfg: dict[str, Any], total_steps: int,
                     tensors: dict[str, np.ndarray], step: int, phase: int) -> None:
        self.replica = Replica(self.engine, ROLES.index(self.name))
        self.replica.init(cfg, total_steps, tensors, step, phase)

    @ray.method(num_returns=2)
    def replica_round(self, pending: list[Pending], *peer_grads: PeerGrads
                      ) -> tuple[PeerGrads, dict[str, dict[str, Any]]]:
        """Apply the rounds not applied yet, compute this worker's requests of the next one.
        Two objects: the gradients (handed on to the peer) and the facts (for the
        coordinator), so the coordinator never has to fetch a gradient."""
        assert self.replica is not None
        # each peer gradient crosses the (emulated) link once, into this worker
        self.link.wait(sum(g.nbytes for d in peer_grads for g, _ in d.values()))
        t0 = time.perf_counter()
        self.replica.apply(pending, list(peer_grads))
        applied = time.perf_counter() - t0
        out = self.replica.compute()
        for _, meta in out.values():
            meta["timings"]["apply"] = applied  # the pending updates, on this worker
        return ({r: (g, m["finite"]) for r, (g, m) in out.items()},
                {r: m for r, (_, m) in out.items()})

    def replica_state(self, pending: list[Pending], *peer_grads: PeerGrads
                      ) -> dict[str, np.ndarray]:
        assert self.replica is not None
        self.replica.apply(pending, list(peer_grads))
        return self.replica.tensors()

    def replica_eval(self, step: int, pending: list[Pending],
                     *peer_grads: PeerGrads) -> None:
        assert self.replica is not None and self.replica.state is not None
        self.replica.apply(pending, list(peer_grads))
        self.engine.start_eval(step, self.replica.state.x)

    # -- the collective data path: replicas, gradients over torch.distributed ----------------
    def collective_address(self) -> tuple[str, int]:
        """Where this worker (rank 0) hosts the group's rendezvous."""
        return rendezvous_address()

    def collective_join(self, rank: int, world: int, host: str, port: int, backend: str,
                        timeout_s: float) -> None:
        self.group = PeerGroup(rank, world, host, port, backend, self.engine.device, timeout_s)

    def collective_leave(self) -> None:
        leave_group()
        self.group = None

    def collective_round(self, exchange: bool) -> dict[str, dict[str, Any]]:
        """Compute, exchange with the peers (``exchange``: the run uses the group), apply: one
        whole round (see Replica)."""
        assert self.replica is not None
        facts = self.replica.collective_round(self.group if exchange else None)
        self.link.wait(self.replica.received_bytes)  # the peers' gradients came over the link
        return facts

    def load_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        self.engine.load_buffers(buffers)

    def start_eval(self, step: int, point: np.ndarray) -> None:
        self.engine.start_eval(step, as_tensor(point))

    def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        return self.engine.finished_evals(wait)

    def buffers(self) -> dict[str, torch.Tensor]:
        return self.engine.buffers()


class WorkerLost(Exception):
    """A gradient worker died or missed the round deadline."""

    def __init__(self, slot: int, why: str) -> None:
        super().__init__(f"worker {ROLES[slot]} {why}")
        self.slot = slot


class RayExecutor(Executor):
    """Dispatches a round's requests to the workers without blocking; returns when all are in.

    Fault tolerance: a worker that dies (its actor is restarted by Ray, which reloads the model
    and the data) or misses ``deadline_s`` (it is killed, then restarted) gets its model buffers
    back as they were before the round, and the round's lost requests are dispatched again;
    requests already answered are kept. The trajectory is the one an uninterrupted run takes.
    """

    def __init__(self, workers: list[Any], stats_slot: int,
                 probe: RoundProbe | None = None, *, deadline_s: float | None = None,
                 max_retries: int = 3, on_restart: Any = None,
                 on_deadline: Any = None) -> None:
        self.workers = workers
        self.stats = workers[stats_slot]
        self.probe = probe  # metrics: payload sizes, dispatch and per-role arrival times
        self.deadline_s = deadline_s
        self.max_retries = max_retries
        self.on_restart = on_restart  # async (slot) -> None, after a worker came back
        self.on_deadline = on_deadline  # (slot) -> None, before a late worker is killed
        self.last_buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.restarts = 0
        self.retried_rounds = 0

    # -- one round, with retries --------------------------------------------------------------
    def call(self, req: GradRequest) -> Any:
        """Send one request to its worker; returns the ref of (gradient, facts)."""
        return self.workers[slot_for(req.role)].gradient.remote(req.point.numpy(), req.batch,
                                                                req.track_stats)

    def result(self, req: GradRequest, out: Any) -> GradResult:
        grad, meta = out
        return GradResult(grad=from_array(grad), loss=meta["loss"], accuracy=meta["accuracy"],
                          timings=meta["timings"], start=meta["start"], end=meta["end"],
                          finite=meta.get("finite"), nbytes=grad.nbytes)  # as it travelled

    async def _await(self, slot: int, ref: Any, role: str | tuple[str, ...]) -> Any:
        try:
            coro = _arrival(ref, role, self.probe) if self.probe else _resolve(ref)
            return await asyncio.wait_for(coro, timeout=self.deadline_s)
        except TimeoutError:
            if self.on_deadline is not None:
                self.on_deadline(slot)
            ray.kill(self.workers[slot], no_restart=False)  # Ray restarts it
            raise WorkerLost(slot, f"missed the {self.deadline_s:g}s deadline") from None
        except RayActorError:
            raise WorkerLost(slot, "died") from None

    async def recover(self, slot: int, timeout_s: float = 180.0) -> None:
        """Wait for Ray to restart the worker, then give it back its buffers."""
        w = self.workers[slot]
        deadline = time.time() + timeout_s
        while True:
            try:
                info = await w.info.remote()
                if "error" in info:
                    raise UserError(info["error"])
                break
            except RayActorError:
                if time.time() > deadline:
                    raise UserError(f"worker {ROLES[slot]} did not come back within "
                                    f"{timeout_s:.0f}s") from None
                await asyncio.sleep(0.5)
        await w.reset.remote()
        if slot in self.last_buffers:
            await w.load_buffers.remote(self.last_buffers[slot])
        if self.on_restart is not None:
            await self.on_restart(slot)
        self.restarts += 1

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        if self.probe is not None:
            self.probe.dispatched([(r.role, r.point) for r in reqs])
        todo = list(reqs)
        results: dict[str, GradResult] = {}
        new_buffers: dict[int, dict[str, torch.Tensor]] = {}
        for attempt in range(self.max_retries + 1):
            refs = [self.call(r) for r in todo]
            outs = await asyncio.gather(*[self._await(slot_for(r.role), ref, r.role)
                                          for r, ref in zip(todo, refs, strict=True)],
                                        return_exceptions=True)
            lost: dict[int, WorkerLost] = {}
            for r, out in zip(todo, outs, strict=True):
                if isinstance(out, WorkerLost):
                    lost[out.slot] = out
                elif isinstance(out, BaseException):
                    raise out
                else:
                    results[r.role] = self.result(r, out)
                    if r.track_stats:
                        meta = out[1] if isinstance(out, tuple) else out
                        if meta.get("buffers") is not None:
                            new_buffers[slot_for(r.role)] = meta["buffers"]
            if not lost:
                break
            if attempt == self.max_retries:
                err = next(iter(lost.values()))
                raise UserError(f"{err} {self.max_retries + 1} times in one round; giving up")
            self.retried_rounds += 1
            for slot in lost:
                await self.recover(slot)
            todo = [r for r in todo if r.role not in results]
        self.last_buffers.update(new_buffers)
        if self.probe is not None:
            self.probe.round_done(results)
        return results

    # -- the rest of the executor ------------------------------------------------------------
    async def start_eval(self, step: int, state: AlgoState) -> None:
        await self.stats.start_eval.remote(step, state.x.numpy())

    async def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        return await self.stats.finished_evals.remote(wait)

    async def buffers(self) -> dict[str, torch.Tensor]:
        return await self.stats.buffers.remote()

    async def all_buffers(self) -> list[dict[str, torch.Tensor]]:
        return list(await asyncio.gather(*[w.buffers.remote() for w in self.workers]))

    async def load_buffers(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        await asyncio.gather(*[w.load_buffers.remote(b)
                               for w, b in zip(self.workers, buffers, strict=True)])
        self.last_buffers = dict(enumerate(buffers))


async def _resolve(ref: Any) -> Any:
    return await ref


async def _arrival(ref: Any, roles: str | tuple[str, ...], probe: RoundProbe) -> Any:
    """Await one worker's result and note when it arrived for its role(s) (metrics: transfer
    and wait)."""
    out = await ref
    for role in (roles,) if isinstance(roles, str) else roles:
        probe.arrived(role)
    return out


class GrpcExecutor(RayExecutor):
    """Points down and gradients up as gRPC streams between the workers and the server in the
    coordinator's process; Ray only starts the actors and carries the control call."""

    def __init__(self, workers: list[Any], stats_slot: int, board: RoundBoard,
                 probe: RoundProbe | None = None, **kw: Any) -> None:
        super().__init__(workers, stats_slot, probe, **kw)
        self.board = board
        self.futs: dict[str, asyncio.Future[Any]] = {}

    def call(self, req: GradRequest) -> Any:
        return self.workers[slot_for(req.role)].gradient_grpc.remote(
            self.board.step, req.role, req.batch, req.track_stats)

    def result(self, req: GradRequest, out: Any) -> GradResult:
        # the gradient itself arrives through the server (round() attaches it); its size is
        # the point's length in the wire's format, and only a finite one was sent
        sent = req.point.numel() * self.board.grad_dtype.itemsize if out["finite"] else 0
        return GradResult(grad=torch.empty(0), loss=out["loss"], accuracy=out["accuracy"],
                          timings=out["timings"], start=out["start"], end=out["end"],
                          finite=out["finite"], nbytes=sent)

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        board = self.board
        step = board.step + 1 if board.step is not None else 1
        self.futs = board.open_round(step, {r.role: r.point for r in reqs})
        results = await super().round(reqs)
        for role, r in results.items():
            if r.finite:  # the gradient itself came through the server
                r.grad = (await self.futs[role])[0].float()  # bf16 widened; fp32 as it is
        return results


def raise_lost(outcomes: list[Any]) -> None:
    """Raise the first failure among a round's outcomes, a lost worker before anything else (a
    peer's broken exchange or missing input follows from the lost one)."""
    lost = [o for o in outcomes if isinstance(o, WorkerLost)]
    for o in lost + list(outcomes):
        if isinstance(o, BaseException):
            raise o


def kept_gradient(meta: dict[str, Any]) -> GradResult:
    """The result of a gradient that stayed with its worker: the facts the worker sent, no
    tensor (``grad`` is empty)."""
    return GradResult(grad=torch.empty(0), loss=meta["loss"], accuracy=meta["accuracy"],
                      timings=meta["timings"], start=meta["start"], end=meta["end"],
                      finite=meta["finite"], norm=meta["norm"], nbytes=meta["nbytes"])


class ReplicatedExecutor(RayExecutor):
    """Coordinator side of the replicated data path (see ``sampa_ray.replicated``): dispatches
    rounds to the replica-holding workers and hands each worker's gradient reference on to its
    peers, so gradients move worker to worker and the coordinator fetches none of them."""

    holds_state = True
    runs_ahead = True

    def __init__(self, workers: list[Any], cfg: TrainConfig, total_steps: int,
                 probe: RoundProbe | None = None, **kw: Any) -> None:
        algo = make_algorithm(cfg, total_steps)
        super().__init__(workers, slot_for(algo.stats_role), probe, **kw)
        self.cfg, self.total_steps = cfg, total_steps
        self.stats_slot = slot_for(algo.stats_role)
        self.used = sorted({slot_for(r) for r in algo.all_roles})
        # per worker: the rounds it has not applied yet, (skipped?, {role: gradient ref})
        self.pending: dict[int, list[tuple[bool, dict[str, Any]]]] = {s: [] for s in self.used}
        self.last_refs: dict[str, Any] = {}
        # the next round, dispatched before this one's results came back: (slots, calls,
        # peer gradients each worker fetches); its workers apply this round by the rule
        self.ahead: tuple[list[int], dict[int, Any], dict[str, int]] | None = None
        self.ruled: set[int] = set()  # slots whose queued call applies the last round

    async def init_state(self, state: AlgoState) -> None:
        self.ahead, self.ruled = None, set()  # a replay: what ran ahead is abandoned
        tensors = {k: v.detach().cpu().numpy() for k, v in state.tensors().items()}
        await asyncio.gather(*[self.workers[s].replica_init.remote(
            self.cfg.model_dump(), self.total_steps, tensors, state.step, state.phase)
            for s in self.used])
        for s in self.used:
            self.pending[s].clear()

    def _take_pending(self, slot: int) -> tuple[list[Pending], list[Any]]:
        """The rounds a worker has not applied: specs, and the peers' gradient refs in order."""
        specs: list[Pending] = []
        refs: list[Any] = []
        for skip, by_role in self.pending[slot]:
            peer = [role for role in by_role if slot_for(role) != slot]
            specs.append((skip, peer))
            refs.extend(by_role[role] for role in peer)
        self.pending[slot] = []
        return specs, refs

    def _dispatch(self, slots: list[int], reqs: list[GradRequest] | None = None,
                  calls: dict[int, Any] | None = None) -> tuple[dict[int, Any], dict[int, int]]:
        """One call per slot with its pending rounds; with ``reqs`` and their ``calls`` (a
        round still running), that round too, decided by the rule, on the peers' results."""
        out, fetched = {}, {}
        for s in slots:
            specs, refs = self._take_pending(s)
            if reqs is not None and calls is not None:
                peer = [r.role for r in reqs if slot_for(r.role) != s]
                specs.append((None, peer))
                refs.extend(calls[slot_for(role)][0] for role in peer)
            out[s] = self.workers[s].replica_round.remote(specs, *refs)
            fetched[s] = len(refs)
        return out, fetched

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        slots = sorted({slot_for(r.role) for r in reqs})
        probe = self.probe
        if self.ahead is not None:  # dispatched during the last round
            ahead_slots, calls, fetched = self.ahead
            self.ahead = None
            if ahead_slots != slots:
                raise RuntimeError(f"the round run ahead used workers {ahead_slots}, the loop "
                                   f"asks for {slots}")
        else:
            calls, fetched = self._dispatch(slots)
        roles = {s: tuple(r.role for r in reqs if slot_for(r.role) == s) for s in slots}
        if probe is not None:  # metrics: gradients fetched from peers, by the slot's role
            probe.dispatched_peers({roles[s][0]: fetched[s] for s in slots})
        self.ruled = set()
        if ahead is not None:  # queue the next round behind this one on every worker
            nslots = sorted({slot_for(r.role) for r in ahead})
            ncalls, nfetched = self._dispatch(nslots, reqs, calls)
            self.ahead = (nslots, ncalls, nfetched)
            self.ruled = set(nslots)
        facts = await asyncio.gather(*[self._await(s, calls[s][1], roles[s]) for s in slots],
                                     return_exceptions=True)
        raise_lost(facts)  # a lost worker takes its replica along: the coordinator replays
        results: dict[str, GradResult] = {}
        self.last_refs = {}
        for s, f in zip(slots, facts, strict=True):
            for role, meta in f.items():
                results[role] = kept_gradient(meta)
                self.last_refs[role] = calls[s][0]  # that worker's {role: gradient} object
        if probe is not None:  # each gradient goes to every other worker in use
            probe.round_done(results, fanout=len(self.used) - 1)
        return results

    async def commit(self, skip: bool) -> None:
        for s in self.used:
            if s not in self.ruled:  # a queued call applies it by the same rule
                self.pending[s].append((skip, dict(self.last_refs)))
        self.ruled = set()

    async def full_state(self, state: AlgoState) -> AlgoState:
        if self.ahead is not None:
            raise RuntimeError("the state was asked for while a round runs ahead")
        s = self.stats_slot
        specs, refs = self._take_pending(s)
        t = await self.workers[s].replica_state.remote(specs, *refs)
        return AlgoState(x=torch.from_numpy(t["x"]), step=state.step, phase=state.phase,
                         buf=torch.from_numpy(t["buf"]) if "buf" in t else None,
                         g_y=torch.from_numpy(t["g_y"]) if "g_y" in t else None)

    async def start_eval(self, step: int, state: AlgoState) -> None:
        s = self.stats_slot
        specs, refs = self._take_pending(s)
        await self.workers[s].replica_eval.remote(step, specs, *refs)


class CollectiveExecutor(ReplicatedExecutor):
    """The replicated data path with the gradients exchanged over torch.distributed (see
    ``sampa_ray.transport.collective``): every worker in use gets one call per round, computes
    its requests, exchanges the round's gradients with its peers and applies the round by the
    loop's rule, so no call waits on another's result and the next round can be queued behind
    this one. Where no group can be formed it says why and uses the object store instead."""

    def __init__(self, workers: list[Any], cfg: TrainConfig, total_steps: int,
                 probe: RoundProbe | None = None, *, gpu_ids: list[list[str]],
                 say: Any = None, **kw: Any) -> None:
        super().__init__(workers, cfg, total_steps, probe, **kw)
        self.gpu_ids = gpu_ids
        self.say = say or (lambda text: None)
        self.group = len(self.used) > 1  # one worker in use: nothing to exchange
        self.backend: str | None = None  # of the group; None without one
        self.fallback: str | None = None  # why the object store is used instead
        self.calls: dict[int, Any] | None = None  # the round queued ahead

    async def init_state(self, state: AlgoState) -> None:
        self.calls = None
        if self.group:
            try:
                await self._form_group()
            except (CollectiveError, RayTaskError, TimeoutError) as err:
                cause = err.cause if isinstance(err, RayTaskError) else \
                    err if str(err) else "the workers did not meet in time"
                self.group, self.backend = False, None
                self.fallback = str(cause).strip().splitlines()[0]
                self.say(f"collective: no process group ({self.fallback}); the gradients go "
                         "through Ray's object store instead")
        await super().init_state(state)

    async def _form_group(self) -> None:
        device = torch.device(self.cfg.device if self.cfg.device != "auto" else
                              ("cuda" if self.gpu_ids and all(self.gpu_ids) else "cpu"))
        backend = self.cfg.collective_backend
        if backend == "auto":
            backend = choose_backend(device, [self.gpu_ids[s] for s in self.used])
        host, port = await self.workers[self.used[0]].collective_address.remote()
        timeout = self.deadline_s or 300.0
        await asyncio.wait_for(asyncio.gather(*[
            self.workers[s].collective_join.remote(rank, len(self.used), host, port, backend,
                                                   timeout)
            for rank, s in enumerate(self.used)]), timeout=timeout + 30)
        self.backend = backend

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        if not self.group and len(self.used) > 1:
            return await super().round(reqs, ahead)
        slots, probe = self.used, self.probe
        calls = self.calls or self._queue()
        self.calls = None
        if ahead is not None:  # no call waits on another's result: queue the next one now
            self.calls = self._queue()
        roles = {s: tuple(r.role for r in reqs if slot_for(r.role) == s) for s in slots}
        if probe is not None:
            probe.dispatched_peers({roles[s][0]: len(reqs) - len(roles[s])
                                    for s in slots if roles[s]})
        facts = await asyncio.gather(*[self._await(s, calls[s], roles[s]) for s in slots],
                                     return_exceptions=True)
        raise_lost(facts)
        results: dict[str, GradResult] = {}
        for f in facts:
            for role, meta in f.items():
                results[role] = kept_gradient(meta)
        if probe is not None:
            probe.round_done(results, fanout=len(self.used) - 1)
        return results

    def _queue(self) -> dict[int, Any]:
        """One round's call on every worker in use."""
        return {s: self.workers[s].collective_round.remote(self.group) for s in self.used}

    async def commit(self, skip: bool) -> None:
        if self.group or len(self.used) == 1:
            return  # the workers applied the round by the same rule
        await super().commit(skip)

    async def full_state(self, state: AlgoState) -> AlgoState:
        if self.calls is not None:
            raise RuntimeError("the state was asked for while a round runs ahead")
        return await super().full_state(state)


# -- the coordinator ----------------------------------------------------------------------------
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: config fields the workers' replicas and data depend on; runs on the same actors share them
WORKER_FIELDS = ("model", "dropout", "dataset", "data_dir", "synthetic_size", "batch_size",
                 "seed", "label_smoothing", "device")


@ray.remote(num_cpus=0, max_restarts=0)
class Coordinator:
    """Owns the algorithm state and the run: dispatches rounds, applies updates, writes outputs.
    Runs no model. Several runs (SGD, SAM, SAMPa) can use the same two workers one after the
    other, so comparisons are like for like."""

    def __init__(self, cfg: dict[str, Any], placement: dict[str, Any],
                 pg: PlacementGroup) -> None:
        self.base = TrainConfig(**cfg)
        self.placement = Placement(**placement)
        self.pg = pg
        self.workers: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.stop_requested = False
        # gRPC: the control API (always) and the data plane (--transport grpc)
        self.session = uuid.uuid4().hex[:12]
        self.server: Any = None
        self.control_port: int | None = None
        self.control_target: str | None = None
        self.tls: tuple[bytes, bytes] | None = None
        self.board: RoundBoard | None = None
        self.hub = ProgressHub()
        self.live: dict[str, Any] = {"state": "starting"}
        self.checkpoint_waiters: list[asyncio.Future[str]] = []
        # metrics: served from this process once start() runs; see sampa_ray/metrics.py
        self.run_cfg = self.base  # the run in progress (per-run worker settings)
        self.metrics = RunMetrics()
        self.probe = RoundProbe(self.metrics, transport="ray")
        self.metrics_port: int | None = None

    def _progress(self, ev: dict[str, Any]) -> None:
        self.hub.publish(ev)
        if ev["kind"] in ("round", "epoch"):
            self.live.update({k: ev[k] for k in ("step", "total", "loss", "epoch") if k in ev})
        if ev["kind"] == "round" and self.events and self.events[-1]["kind"] == "round":
            self.events[-1] = ev  # the driver only needs the latest round
        else:
            self.events.append(ev)

    def poll(self) -> list[dict[str, Any]]:
        """Progress events since the last poll (the driver shows them)."""
        evs, self.events = self.events, []
        return evs

    def stop(self) -> None:
        """Finish the current round, then write outputs and return."""
        self.stop_requested = True
        self.live["state"] = "stopping"

    # -- the control API (CoordinatorService handler) -----------------------------------------
    def status(self) -> dict[str, Any]:
        """The run as the control API reports it; ``run_id`` is the data plane's run id."""
        live = self.live
        return {"run_id": live.get("run_id", ""), "algorithm": live.get("algo", ""),
                "step": live.get("step", 0), "total_steps": live.get("total", 0),
                "epoch": live.get("epoch", 0.0), "loss": live.get("loss", float("nan")),
                "accuracy": live.get("test_accuracy", float("nan")),
                "transport": self.base.transport, "metrics_port": self.metrics_port or 0,
                "state": live.get("state", ""),
                "workers": [{"name": i.get("name", ""), "state": "alive", "pid": i.get("pid", 0),
                             "device": i.get("device", "")} for i in self.infos]}

    def progress(self) -> Any:
        return self.hub.subscribe()

    async def checkpoint(self) -> str:
        """Write a checkpoint after the next update; returns its path."""
        if self.live.get("state") != "running":
            raise RuntimeError("no run in progress")
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.checkpoint_waiters.append(fut)
        return await fut

    async def _serve_grpc(self) -> None:
        """Start the gRPC server in this process (once): control API, and the data plane."""
        if self.server is not None:
            return
        cfg = self.base
        token = read_token(cfg)
        self.tls = read_tls(cfg)
        self.board = RoundBoard(self.session, self.infos[0]["num_params"])
        try:
            self.server, self.control_port = await start_server(
                self.board, self, cfg.control_host, cfg.control_port, token=token, tls=self.tls)
        except ValueError as err:
            raise UserError(f"control_host: {err}") from None
        host = cfg.control_host
        shown = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
        self.control_target = f"{shown}:{self.control_port}"
        self._progress({"kind": "info", "text": f"control: {self.control_target} "
                        f"(sampa-ray status --target {self.control_target})"})
        if cfg.transport == "grpc":
            target = self.control_target
            cert = self.tls[0] if self.tls else None
            await asyncio.gather(*[w.connect_grpc.remote(target, self.session, token, cert)
                                   for w in self.workers])

    def _force_kill(self, slot: int) -> None:
        """A worker that missed the deadline may not even answer Ray's kill (a frozen
        process): on this node, end its process directly; Ray then restarts the actor."""
        info = self.infos[slot]
        if info.get("node_id") == ray.get_runtime_context().get_node_id() and info.get("pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(info["pid"]), signal.SIGKILL)

    async def _on_restart(self, slot: int) -> None:
        """A worker came back (a new process): reopen its gRPC channel if the run uses one."""
        self._progress({"kind": "info", "text": f"worker {ROLES[slot]} restarted"})
        if self.base.transport == "grpc" and self.control_target is not None:
            await self.workers[slot].connect_grpc.remote(
                self.control_target, self.session, read_token(self.base),
                self.tls[0] if self.tls else None)
        await self._configure(self.workers[slot])  # the new process has the defaults
        self.infos[slot] = await self.workers[slot].info.remote()

    async def _configure(self, worker: Any) -> None:
        c = self.run_cfg
        await worker.configure.remote(c.link_latency_ms, c.link_gbit_s, c.wire_dtype)

    async def shutdown(self) -> None:
        """Report NOT_SERVING, end watches and stop the gRPC server."""
        self.hub.close()
        if self.server is not None:
            await stop_server(self.server, grace=1.0)
            self.server = None

    async def start(self) -> list[dict[str, Any]]:
        """Create the two workers in their bundles; returns what each reports about itself."""
        self._serve_metrics()
        pl = self.placement
        self.workers = [GradientWorker.options(
            num_cpus=pl.bundles[i].get("CPU", 0), num_gpus=pl.gpus_per_worker,
            max_restarts=self.base.max_restarts, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i),
        ).remote(self.base.model_dump(), ROLES[i], pl.threads) for i in range(2)]
        self.infos = await asyncio.gather(*[w.info.remote() for w in self.workers])
        for info in self.infos:
            if "error" in info:
                raise UserError(info["error"])
        self._progress({"kind": "info", "text": "workers: " + ", ".join(
            f"{i['name']} pid {i['pid']} ({i['device']})" for i in self.infos)})
        await self._serve_grpc()
        return self.infos

    # -- metrics ------------------------------------------------------------------------------
    def _serve_metrics(self) -> None:
        """Start the Prometheus endpoint (once) and announce it as a progress event."""
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
        shown = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self._progress({"kind": "info",
                        "text": f"metrics: {self.metrics.scheme}://{shown}:"
                        f"{self.metrics_port}/metrics"})

    def _observe(self, ev: dict[str, Any], cfg: TrainConfig, recorder: Recorder,
                 plan: Plan) -> None:
        """Feed the metrics from a progress event of the training loop."""
        if ev["kind"] == "round":
            step = ev["step"]
            self.probe.publish(ev["round_s"], recorder.update_s[-1] if recorder.update_s else 0.0,
                               step, ev["loss"], cfg.lr_at(max(step - 1, 0), plan.total_steps))
        elif ev["kind"] == "epoch":
            self.probe.end_epoch()
            test = next((r["test_accuracy"] for r in reversed(recorder.epochs)
                         if r["test_accuracy"] is not None), None)
            if test is not None:
                self.metrics.observe_eval("test", test)

    async def run(self, cfg_dict: dict[str, Any], out: str) -> dict[str, Any]:
        """Train one configuration on the workers from their initial state; write outputs."""
        t0 = time.time()
        cfg = TrainConfig(**cfg_dict)
        for f in WORKER_FIELDS:
            if getattr(cfg, f) != getattr(self.base, f):
                raise UserError(f"{f}: differs from the workers' configuration")
        if not self.workers:
            await self.start()
        workers = self.workers
        await asyncio.gather(*[w.reset.remote() for w in workers])
        self.run_cfg = cfg
        await asyncio.gather(*[self._configure(w) for w in workers])
        if self.board is not None:
            self.board.set_grad_dtype(WIRE_DTYPES[cfg.wire_dtype])
        x0 = as_tensor(await workers[0].initial_point.remote()).clone()
        stats_role = make_algorithm(cfg, 1).stats_role
        plan = Plan.of(cfg, self.infos[0]["batches_per_epoch"])
        kw = {"deadline_s": cfg.round_timeout, "max_retries": cfg.max_restarts,
              "on_restart": self._on_restart, "on_deadline": self._force_kill}
        if cfg.resolved_data_path == "collective":
            executor: RayExecutor = CollectiveExecutor(
                workers, cfg, plan.total_steps, self.probe,
                gpu_ids=[i["gpu_ids"] for i in self.infos],
                say=lambda text: self._progress({"kind": "info", "text": text}), **kw)
        elif cfg.resolved_data_path == "replicated":
            executor = ReplicatedExecutor(workers, cfg, plan.total_steps, self.probe, **kw)
        elif cfg.transport == "grpc":
            assert self.board is not None
            executor = GrpcExecutor(workers, slot_for(stats_role), self.board, self.probe,
                                    **kw)
        else:
            executor = RayExecutor(workers, slot_for(stats_role), self.probe, **kw)
        recorder = Recorder(stats_role)
        self.probe.begin_run(f"{cfg.algo}-{cfg.hash()[:8]}-{int(t0)}", cfg.algo, cfg.model,
                             stats_role, cfg.batch_size, transport=cfg.transport,
                             data_path=cfg.resolved_data_path)
        self.stop_requested = False
        self.live.update({"state": "running", "algo": cfg.algo, "step": 0,
                          "total": plan.total_steps, "run_id": self.session})

        def progress(ev: dict[str, Any]) -> None:
            ev["algo"] = cfg.algo
            if ev["kind"] == "round":
                comp = max((v[-1] for d in recorder.worker.values()
                            for k, v in d.items() if k == "compute"), default=0.0)
                ev["comm_share"] = max(0.0, 1.0 - comp / ev["round_s"]) if ev["round_s"] else 0
            self._observe(ev, cfg, recorder, plan)
            self._progress(ev)

        num_params = self.infos[0]["num_params"]
        resume = None
        if cfg.resume:
            resume = find_resume(cfg, num_params,
                                 lambda msg: self._progress({"kind": "info", "text": msg}))
        checkpointer = Checkpointer(cfg, Path(out) / "checkpoints", executor, recorder,
                                    num_params)
        async def after_update(state: AlgoState) -> None:
            if self.checkpoint_waiters:  # requested through the control API
                waiters, self.checkpoint_waiters = self.checkpoint_waiters, []
                await checkpointer(await executor.full_state(state))
                path = str((await checkpointer.flush())[-1])
                for w in waiters:
                    w.set_result(path)

        if resume is None:  # the starting point, in memory: a lost replica replays from here
            checkpointer.last = Checkpoint.of(
                make_algorithm(cfg, plan.total_steps).init(x0), await executor.all_buffers(),
                {"record": recorder.state_dict()})
        replays = 0
        while True:
            try:
                state = await train_loop(cfg, executor, x0, plan, recorder, progress,
                                         lambda: self.stop_requested, resume=resume,
                                         checkpoint=checkpointer, after_update=after_update,
                                         hold=lambda: bool(self.checkpoint_waiters))
                break
            except (WorkerLost, RayActorError) as err:
                # replicated path: the lost worker took its replica along; every replica is
                # rebuilt from the newest snapshot and the rounds since are replayed exactly.
                # A peer may go down with it (a collective exchange broken mid-way), noticed
                # here or only by a later call (RayActorError): every worker that is down comes
                # back before the replay.
                replays += 1
                if replays > cfg.max_restarts:
                    raise UserError(f"{err}; {replays} times in this run, giving up") from None
                for slot in range(len(workers)):
                    if isinstance(err, WorkerLost) and slot == err.slot:
                        await executor.recover(slot)
                        continue
                    try:  # down, or already restarted by Ray (a new process)
                        info = await workers[slot].info.remote()
                        lost = info.get("pid") != self.infos[slot].get("pid")
                    except RayActorError:
                        lost = True
                    if lost:
                        await executor.recover(slot)
                executor.retried_rounds += 1
                resume = checkpointer.last
                assert resume is not None
                what = err if isinstance(err, WorkerLost) else "a worker went down"
                self._progress({"kind": "info", "text": f"{what}: restarted; replaying from "
                                f"step {resume.step}"})
        await checkpointer.flush()
        self.metrics.worker_restarts.inc(executor.restarts)
        self.metrics.retried_rounds.inc(executor.retried_rounds)
        self.metrics.nonfinite_rounds.inc(recorder.nonfinite_rounds)
        for w in self.checkpoint_waiters:
            w.set_exception(RuntimeError("the run ended before the checkpoint"))
        self.checkpoint_waiters = []
        buffers = await executor.buffers()
        infos = self.infos
        result = build_result(
            cfg, recorder, state, plan, infos[0], time.time() - t0, backend="ray",
            placement=asdict(self.placement), device=infos[0]["device"],
            workers=[{k: i[k] for k in ("name", "pid", "node_id", "gpu_ids", "device", "threads")}
                     for i in infos],
            stopped_early=state.step < plan.total_steps, metrics_port=self.metrics_port,
            transport=cfg.transport, data_path=cfg.resolved_data_path,
            control_port=self.control_port, control_target=self.control_target,
            worker_restarts=executor.restarts, retried_rounds=executor.retried_rounds,
            **({"collective": {"backend": executor.backend, "fallback": executor.fallback}}
               if isinstance(executor, CollectiveExecutor) else {}))
        if result["final_test_accuracy"] is not None:
            self.metrics.observe_eval("test", result["final_test_accuracy"])
        await asyncio.to_thread(write_outputs, Path(out), result, state.x, buffers)
        self.live["state"] = "stopped" if self.stop_requested else "finished"
        return result


def read_tls(cfg: TrainConfig) -> tuple[bytes, bytes] | None:
    """(certificate PEM, key PEM) for the gRPC server, from --control-cert/--control-key."""
    if not cfg.control_cert or not cfg.control_key:
        return None
    out = []
    for field, path in (("control_cert", cfg.control_cert), ("control_key", cfg.control_key)):
        try:
            out.append(Path(path).read_bytes())
        except OSError as err:
            raise UserError(f"{field}: cannot read {path}: {err.strerror}") from None
    return out[0], out[1]


def read_token(cfg: TrainConfig) -> str | None:
    """The bearer token for the gRPC server: --token-file, else $SAMPA_RAY_TOKEN, else none."""
    if cfg.token_file:
        try:
            token = Path(cfg.token_file).read_text().strip()
        except OSError as err:
            raise UserError(f"token_file: cannot read {cfg.token_file}: {err.strerror}") from None
        if not token:
            raise UserError(f"token_file: {cfg.token_file} is empty")
        return token
    return os.environ.get("SAMPA_RAY_TOKEN") or None


# -- the driver ---------------------------------------------------------------------------------
def connect(cfg: TrainConfig) -> bool:
    """Join the cluster at cfg.address / $RAY_ADDRESS, or start an embedded local instance.
    Returns True when this call started Ray (and so should shut it down)."""
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        else:
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = address or "a new local instance"
        raise UserError(f"address: cannot connect to Ray at {where}: {first}") from None
    return True


def run_ray(cfg: TrainConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Run on Ray and write the outputs into ``out`` (from the coordinator, on this node)."""
    return run_ray_many([(cfg, out)], progress)[0]


def run_ray_many(runs: list[tuple[TrainConfig, Path]], progress: Progress | None = None,
                 placement_timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Run several configurations one after the other on the same coordinator and workers."""
    base = runs[0][0]
    started = connect(base)
    pg = None
    coord = None
    show = progress or (lambda ev: None)
    try:
        placement = choose_placement(base)
        show({"kind": "info", "text": placement.describe()})
        pg = placement_group(placement.bundles, strategy=placement.strategy)
        ready, _ = ray.wait([pg.ready()], timeout=placement_timeout_s)
        if not ready:
            raise UserError(f"placement: the cluster cannot fit {placement.bundles} "
                            f"({placement.strategy}) within {placement_timeout_s:.0f}s")
        here = ray.get_runtime_context().get_node_id()
        coord = Coordinator.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(base.model_dump(), asdict(placement), pg)
        ray.get(coord.start.remote())
        results = []
        for cfg, out in runs:
            run_ref = coord.run.remote(cfg.model_dump(), str(out.resolve()))
            while True:
                done, _ = ray.wait([run_ref], timeout=0.25)
                for ev in ray.get(coord.poll.remote()):
                    show(ev)
                if done:
                    break
            results.append(ray.get(run_ref))
            if results[-1].get("stopped_early"):
                break  # stopped through the control API: no further runs
        return results
    except RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise UserError(str(err.cause)) from None
        raise
    finally:
        if coord is not None:
            with contextlib.suppress(Exception):  # best effort: health goes NOT_SERVING first
                ray.get(coord.shutdown.remote(), timeout=10)
            ray.kill(coord)  # the workers it owns die with it
        if pg is not None:
            remove_placement_group(pg)
        if started:
            ray.shutdown()
