"""The training loop every backend shares, and the single-process backend.

    state = algo.init(x0)
    while state.step < T:
        reqs    = algo.requests(state)
        results = await executor.round(reqs)     # the requests of a round run in parallel
        state   = algo.update(state, grads)

An :class:`Executor` evaluates requests: :class:`LocalExecutor` in this process, one after the
other; the Ray backend on two worker actors at once. The loop, the schedules, the recording and
the outputs are the same code for both, so their trajectories can be compared bit for bit.
"""

from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .algorithms import SAM, SGD, Algorithm, AlgoState, GradRequest, SAMPa
from .checkpoint import Checkpoint, load_latest, save_checkpoint
from .config import TrainConfig
from .engine import EvalResult, GradientEngine, GradResult
from .errors import UserError
from .results import Recorder, write_outputs

ROLES = ("perturbed", "extrapolated")


def slot_for(role: str) -> int:
    """Which of the two workers serves a role: ``extrapolated`` runs on the second worker, every
    other role (SGD's ``grad``, SAM's ``ascent`` and ``perturbed``) on the first, so SGD and SAM
    use the same worker that SAMPa's perturbed gradient uses."""
    return 1 if role == "extrapolated" else 0


def make_algorithm(cfg: TrainConfig, total_steps: int) -> Algorithm:
    """The configured algorithm with its learning-rate schedule over ``total_steps`` updates."""
    def lr(step: int) -> float:
        return cfg.lr_at(step, total_steps)

    common = {"lr": lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    if cfg.algo == "sgd":
        return SGD(**common)
    if cfg.algo == "sam":
        return SAM(rho=cfg.rho, **common)
    return SAMPa(rho=cfg.rho, lam=cfg.lam, **common)


@dataclass
class Plan:
    total_steps: int
    batches_per_epoch: int

    @classmethod
    def of(cls, cfg: TrainConfig, batches_per_epoch: int) -> Plan:
        total = cfg.steps if cfg.steps is not None else cfg.epochs * batches_per_epoch
        return cls(total_steps=total, batches_per_epoch=batches_per_epoch)

    def epoch_end(self, step: int) -> bool:
        return step % self.batches_per_epoch == 0 or step == self.total_steps


class NonFiniteError(UserError):
    """Too many rounds in a row with a non-finite loss or gradient."""


def finite(r: GradResult) -> bool:
    """Loss and gradient finite? One reduction: NaN and ±Inf survive a sum (an overflowing sum
    of huge finite values counts as non-finite too, which is what we want)."""
    if r.finite is not None:  # the worker checked the gradient it kept
        return r.finite and math.isfinite(r.loss)
    return math.isfinite(r.loss) and bool(torch.isfinite(r.grad.sum()))


class Executor(ABC):
    """Evaluates the gradient requests of a round; the workers behind it know no algorithm.

    By default the caller holds the algorithm's state and the executor moves points and
    gradients. An executor with ``holds_state`` keeps replicas of the state next to the workers
    instead: the loop then follows the algorithm on a 0-length *shadow* state (the same code, so
    the same rounds, batches and phases) and tells the executor, through ``commit``, whether
    each round's gradients were applied or skipped; ``full_state`` returns the real state.
    """

    holds_state: bool = False
    #: may dispatch the next round before this one's results are in (see ``round``)
    runs_ahead: bool = False

    async def init_state(self, state: AlgoState) -> None:
        """Seed the replicas (``holds_state`` executors) with the starting state."""
        return

    async def commit(self, skip: bool) -> None:
        """The loop's decision on the last round: its gradients were applied, or skipped."""
        return

    async def full_state(self, state: AlgoState) -> AlgoState:
        """The real algorithm state (a replica's, for ``holds_state`` executors)."""
        return state

    @abstractmethod
    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        """The gradients of one round's requests, by role. ``ahead``: the next round's
        requests, given when the workers it needs do not depend on this round's outcome and no
        checkpoint, evaluation or stop comes between: a ``runs_ahead`` executor queues it now,
        and its workers apply this round by the loop's rule (skip when any gradient or loss is
        non-finite) instead of waiting for ``commit``; the loop's next ``round`` call gets it."""

    @abstractmethod
    async def start_eval(self, step: int, state: AlgoState) -> None:
        """Begin evaluating the state's parameters on the test split with the trajectory
        worker's statistics (snapshotting what it needs: the loop goes on at once)."""

    @abstractmethod
    async def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        """Evaluations finished so far (``wait``: block until all are)."""

    @abstractmethod
    async def buffers(self) -> dict[str, torch.Tensor]:
        """The trajectory worker's model buffers (BatchNorm statistics)."""

    @abstractmethod
    async def all_buffers(self) -> list[dict[str, torch.Tensor]]:
        """Every worker's model buffers, by slot (for checkpoints)."""

    @abstractmethod
    async def load_buffers(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        """Restore every worker's model buffers, by slot."""


Progress = Callable[[dict[str, Any]], None]


def lookahead(algo: Algorithm, state: AlgoState, reqs: list[GradRequest], plan: Plan,
              cfg: TrainConfig, busy: Callable[[], bool]) -> list[GradRequest] | None:
    """The next round's requests (on a 0-length shadow state), if the workers it needs are the
    same whether this round is applied or skipped, and nothing needs the state in between: the
    end of the run, an epoch's end (evaluation), a checkpoint, or ``busy()`` (a stop or an
    on-demand checkpoint is waiting)."""
    empty = state.x.new_empty(0)

    def shadow() -> AlgoState:  # a 0-length copy: the same rounds, no arithmetic
        return AlgoState(x=empty, step=state.step, phase=state.phase,
                         g_y=None if state.g_y is None else empty)

    applied, skipped = shadow(), shadow()
    algo.update(applied, {r.role: empty for r in reqs})
    algo.skip(skipped)
    nexts = []
    for s in (applied, skipped):
        if s.step != state.step:  # this round completes an update: what follows it?
            every = cfg.checkpoint_every
            if s.step >= plan.total_steps or plan.epoch_end(s.step) or \
                    (every and s.step % every == 0) or busy():
                return None
        nexts.append(algo.requests(s))
    slots = [sorted({slot_for(r.role) for r in n}) for n in nexts]
    return nexts[0] if slots[0] == slots[1] else None


async def train_loop(cfg: TrainConfig, executor: Executor, x0: torch.Tensor, plan: Plan,
                     recorder: Recorder, progress: Progress | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     resume: Checkpoint | None = None,
                     checkpoint: Callable[[AlgoState], Awaitable[None]] | None = None,
                     after_update: Callable[[AlgoState], Awaitable[None]] | None = None,
                     hold: Callable[[], bool] | None = None) -> AlgoState:
    """Run the requests -> gradients -> update loop to ``plan.total_steps`` updates.
    Evaluation runs in the background on the trajectory worker and overlaps later rounds.
    ``should_stop`` is checked after each parameter update (never inside one); ``checkpoint``
    is awaited every ``cfg.checkpoint_every`` updates and at the end; ``resume`` continues from a
    checkpoint (state, worker buffers, the record so far); ``after_update`` is awaited after
    every update (on-demand work such as a requested checkpoint); ``hold`` says such work is
    waiting (the loop then does not run a round ahead of it)."""
    algo = make_algorithm(cfg, plan.total_steps)
    if resume is not None:
        state = resume.state()
        await executor.load_buffers(resume.buffers)
        recorder.load_state(resume.meta.get("record", {}))
    else:
        state = algo.init(x0)
    if executor.holds_state:
        await executor.init_state(state)
        shadow = algo.init(x0.new_empty(0))
        shadow.step, shadow.phase = state.step, state.phase
        if state.g_y is not None:
            shadow.g_y = x0.new_empty(0)
        state = shadow
    empty = x0.new_empty(0)
    perf = time.perf_counter
    epochs_done = len(recorder.epochs)
    nonfinite_streak = 0
    last_update = perf()
    def busy() -> bool:
        return (should_stop is not None and should_stop()) or \
            (hold is not None and hold())

    while state.step < plan.total_steps:
        reqs = algo.requests(state)
        ahead = lookahead(algo, state, reqs, plan, cfg, busy) if executor.runs_ahead else None
        t0 = perf()
        results = await executor.round(reqs, ahead)
        t1 = perf()
        before = state.step
        bad = [role for role, r in results.items() if not finite(r)]
        if bad:
            # policy: skip the update (x and the algorithm's memory unchanged, step moves on to
            # the next batch), count it, and abort after max_nonfinite in a row
            recorder.nonfinite_rounds += 1
            nonfinite_streak += 1
            if nonfinite_streak >= cfg.max_nonfinite:
                raise NonFiniteError(
                    f"nonfinite: {nonfinite_streak} rounds in a row gave a non-finite loss or "
                    f"gradient ({', '.join(bad)}) at step {state.step}; try a lower --lr")
            algo.skip(state)
            await executor.commit(skip=True)
            if progress is not None:
                progress({"kind": "info", "text": f"step {before}: non-finite {', '.join(bad)}"
                          " gradient; update skipped"})
        else:
            nonfinite_streak = 0
            if executor.holds_state:  # the replicas apply it; the shadow follows
                algo.update(state, {role: empty for role in results})
                await executor.commit(skip=False)
            else:
                algo.update(state, {role: r.grad for role, r in results.items()})
        t2 = perf()
        recorder.record_round(results, t1 - t0, t2 - t1)
        if state.step != before:
            recorder.step_s.append(t2 - last_update)
            last_update = t2
        if state.step != before and plan.epoch_end(state.step):
            epochs_done += 1
            row = recorder.end_epoch(state.step / plan.batches_per_epoch, state.step,
                                     algo.lr_at(before))
            if epochs_done % cfg.eval_every == 0 or state.step == plan.total_steps:
                await executor.start_eval(state.step, state)
            for step, ev in await executor.finished_evals(wait=False):
                recorder.add_eval(step, ev)
            if progress is not None:
                progress({"kind": "epoch", **row})
        if progress is not None:
            progress({"kind": "round", "step": state.step, "total": plan.total_steps,
                      "loss": recorder.last_loss, "round_s": t1 - t0})
        if state.step != before:
            every = cfg.checkpoint_every
            if checkpoint is not None and every and state.step % every == 0 \
                    and state.step < plan.total_steps:
                await checkpoint(await executor.full_state(state))
            if ahead is not None:  # the next round is already under way: finish it first
                continue
            if after_update is not None:
                await after_update(state)
            if should_stop is not None and should_stop():
                break
    if state.step > 0 and (not recorder.epochs or recorder.epochs[-1]["step"] != state.step):
        # stopped early: close the partial epoch and evaluate where the run ended
        recorder.end_epoch(state.step / plan.batches_per_epoch, state.step,
                           algo.lr_at(state.step - 1))
        await executor.start_eval(state.step, state)
    for step, ev in await executor.finished_evals(wait=True):
        recorder.add_eval(step, ev)
    state = await executor.full_state(state)
    if checkpoint is not None and state.step > 0:
        await checkpoint(state)
    return state


class Checkpointer:
    """Snapshots the state and every worker's buffers after an update and writes them in a
    background thread (one write at a time, in order), off the critical path."""

    def __init__(self, cfg: TrainConfig, folder: Path, executor: Executor, recorder: Recorder,
                 num_params: int) -> None:
        self.cfg, self.folder, self.executor, self.recorder = cfg, folder, executor, recorder
        self.num_params = num_params
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending: list[asyncio.Future[Path]] = []
        self.written: list[Path] = []
        self.last: Checkpoint | None = None  # the newest snapshot, kept in memory

    async def __call__(self, state: AlgoState) -> None:
        buffers = await self.executor.all_buffers()
        meta = {"config": self.cfg.model_dump(), "config_hash": self.cfg.hash(),
                "num_params": self.num_params, "record": self.recorder.state_dict()}
        ckpt = Checkpoint.of(state, buffers, meta)
        self.last = ckpt
        loop = asyncio.get_running_loop()
        self.pending.append(loop.run_in_executor(
            self.pool, save_checkpoint, self.folder, ckpt, self.cfg.keep_checkpoints))

    async def flush(self) -> list[Path]:
        """Wait for every write; returns the files written."""
        for fut in self.pending:
            self.written.append(await fut)
        self.pending.clear()
        return self.written


def find_resume(cfg: TrainConfig, num_params: int, warn: Callable[[str], None]) -> Checkpoint:
    """The checkpoint ``cfg.resume`` names: a run folder (its checkpoints/) or a folder of
    checkpoints; the newest valid one, older ones when newer ones are refused."""
    assert cfg.resume is not None
    root = Path(cfg.resume)
    folder = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    return load_latest(folder, cfg.hash(), num_params, warn)


def build_result(cfg: TrainConfig, recorder: Recorder, state: AlgoState, plan: Plan,
                 info: dict[str, Any], wall_s: float, **extra: Any) -> dict[str, Any]:
    """The content of result.json."""
    algo = make_algorithm(cfg, plan.total_steps)
    last = next((r for r in reversed(recorder.epochs) if r["test_accuracy"] is not None), None)
    return {
        "version": __version__,
        "config": cfg.model_dump(),
        "config_hash": cfg.hash(),
        "algorithm": {**algo.config(), "lr": cfg.lr, "lr_schedule": cfg.lr_schedule},
        "num_params": info["num_params"],
        "steps": state.step,
        "planned_steps": plan.total_steps,
        "batches_per_epoch": plan.batches_per_epoch,
        "gradient_rounds": recorder.rounds,
        "rounds_per_update": algo.rounds_per_update(),
        "wall_time_s": wall_s,
        "final_test_accuracy": last["test_accuracy"] if last else None,
        "final_test_loss": last["test_loss"] if last else None,
        "epochs": recorder.epochs,
        "timings": recorder.timing_summary(),
        "trace": recorder.trace,
        **extra,
    }


# -- the single-process backend ---------------------------------------------------------------
class LocalExecutor(Executor):
    """Both workers' engines in this process, evaluated one after the other."""

    def __init__(self, cfg: TrainConfig) -> None:
        algo = make_algorithm(cfg, 1)
        self.engines = [GradientEngine(cfg) for _ in ROLES]  # two, as on Ray
        self.stats = self.engines[slot_for(algo.stats_role)]

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        out = {}
        for r in reqs:
            res = self.engines[slot_for(r.role)].gradient(r.point, r.batch, r.track_stats)
            if res.grad.dtype != torch.float32:  # a bf16 wire: what the other backends receive
                res.grad = res.grad.float()
            out[r.role] = res
        return out

    async def start_eval(self, step: int, state: AlgoState) -> None:
        self.stats.start_eval(step, state.x)  # the engine snapshots x into its eval replica

    async def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        return self.stats.finished_evals(wait)

    async def buffers(self) -> dict[str, torch.Tensor]:
        return self.stats.buffers()

    async def all_buffers(self) -> list[dict[str, torch.Tensor]]:
        return [e.buffers() for e in self.engines]

    async def load_buffers(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        for e, b in zip(self.engines, buffers, strict=True):
            e.load_buffers(b)


def run_local(cfg: TrainConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Train in this process and write the run's outputs into ``out``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    executor = LocalExecutor(cfg)
    engine = executor.engines[0]
    info = engine.info()
    plan = Plan.of(cfg, info["batches_per_epoch"])
    recorder = Recorder(make_algorithm(cfg, 1).stats_role)

    def warn(msg: str) -> None:
        if progress is not None:
            progress({"kind": "info", "text": msg})

    resume = find_resume(cfg, info["num_params"], warn) if cfg.resume else None
    checkpointer = Checkpointer(cfg, out / "checkpoints", executor, recorder, info["num_params"])

    async def go() -> tuple[AlgoState, dict[str, torch.Tensor]]:
        state = await train_loop(cfg, executor, engine.initial_point(), plan, recorder,
                                 progress, resume=resume, checkpoint=checkpointer)
        await checkpointer.flush()
        return state, await executor.buffers()

    state, buffers = asyncio.run(go())
    result = build_result(cfg, recorder, state, plan, info, time.time() - t0,
                          backend="local", device=info["device"])
    write_outputs(out, result, state.x, buffers)
    return result
