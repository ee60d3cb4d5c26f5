"""The training loop every backend shares, and the one rule that decides a round.

    state = algo.init(x0)
    while state.step < T:
        reqs    = algo.requests(state)
        results = await executor.round(reqs)     # the requests of a round run in parallel
        state   = algo.update(state, grads)      # or algo.skip(state): see round_applies

An :class:`Executor` evaluates requests: ``sampa_ray.local`` in this process, one after the other;
the Ray data paths (``sampa_ray.ray.paths``) on two worker actors at once. The loop, the
schedules, the recording and the outputs are the same code for all of them, so their trajectories
can be compared bit for bit. The loop tells the world what happens through progress events
(``round``, ``epoch``, ``eval``, ``info``); metrics, the progress bar and the control API listen
to them and never reach into the loop.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from . import algorithms
from .algorithms import Algorithm, AlgoState, GradRequest
from .checkpoint import Checkpoint
from .config import TrainConfig
from .engine import EvalResult, GradResult, Snapshot
from .errors import UserError
from .results import Recorder

Progress = Callable[[dict[str, Any]], None]


def make_algorithm(cfg: TrainConfig, total_steps: int,
                   batches_per_epoch: int | None = None) -> Algorithm:
    """The configured algorithm (from the registry) with its learning-rate schedule over
    ``total_steps`` updates (``cosine-epoch`` needs ``batches_per_epoch``) and the run's
    BatchNorm policy (``bn_stats``; an algorithm without a perturbed role keeps its own)."""
    def lr(step: int) -> float:
        return cfg.lr_at(step, total_steps, batches_per_epoch)

    algo = algorithms.create(cfg.algo, lr, cfg.model_dump())
    if cfg.bn_stats == "perturbed" and "perturbed" in algo.slots:
        algo.keep_stats_of("perturbed")
    return algo


def _number(value: float) -> float | None:
    """A finite value, or None where there is none (an accuracy the loss does not report)."""
    return value if math.isfinite(value) else None


# -- the round verdict -------------------------------------------------------------------------
def usable(loss: float, grad: torch.Tensor | None = None, norm: float | None = None) -> bool:
    """Whether one gradient can be used: its loss and every entry finite. Give the gradient
    (one reduction: NaN and ±Inf survive a sum, and an overflowing sum of huge finite values
    counts as non-finite too, which is what we want) or its norm where it is already known."""
    if not math.isfinite(loss):
        return False
    if norm is not None:
        return math.isfinite(norm)
    assert grad is not None
    return bool(torch.isfinite(grad.sum()))


def finite(r: GradResult) -> bool:
    """:func:`usable` for a result, using the worker's verdict on a gradient it kept."""
    if r.finite is not None:
        return r.finite and math.isfinite(r.loss)
    return usable(r.loss, r.grad)


def round_applies(verdicts: Iterable[bool]) -> bool:
    """THE rule, used by the loop and by every worker that applies a round on its own: a round's
    update is applied only when every gradient (and loss) of the round is usable; otherwise it is
    skipped (parameters and the algorithm's memory unchanged, the step moves on)."""
    return all(verdicts)


class NonFiniteError(UserError):
    """Too many rounds in a row with a non-finite loss or gradient."""


# -- what the loop drives ----------------------------------------------------------------------
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


class Executor(ABC):
    """Evaluates the gradient requests of a round; the workers behind it know no algorithm.

    By default the caller holds the algorithm's state and the executor moves points and
    gradients. An executor with ``holds_state`` keeps replicas of the state next to the workers
    instead: the loop then follows the algorithm on a 0-length *shadow* state (the same code, so
    the same rounds, batches and phases), and the replicas apply or skip each round by
    :func:`round_applies` on the gradients' usable flags, the same facts the loop decides the
    shadow on, so no decision travels back to them; ``full_state`` returns the real state.
    """

    holds_state: bool = False
    #: may dispatch the next round before this one's results are in (see ``round``)
    runs_ahead: bool = False

    async def init_state(self, state: AlgoState) -> None:
        """Seed the replicas (``holds_state`` executors) with the starting state."""
        return

    async def full_state(self, state: AlgoState) -> AlgoState:
        """The real algorithm state (a replica's, for ``holds_state`` executors)."""
        return state

    @abstractmethod
    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        """The gradients of one round's requests, by role. ``ahead``: the next round's
        requests, given when the workers it needs do not depend on this round's outcome and no
        checkpoint, evaluation or stop comes between: a ``runs_ahead`` executor queues it now
        (its workers apply this round first); the loop's next ``round`` call gets it."""

    @abstractmethod
    async def start_eval(self, step: int, state: AlgoState) -> None:
        """Begin evaluating the state's parameters on the test split (and the validation
        split, where there is one) with the statistics of the worker ``bn_stats_role`` names
        (snapshotting what it needs: the loop goes on at once)."""

    @abstractmethod
    async def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        """Evaluations finished so far (``wait``: block until all are)."""

    @abstractmethod
    async def buffers(self) -> dict[str, torch.Tensor]:
        """The model buffers (BatchNorm statistics) of the worker evaluation uses: the
        trajectory worker's, or the one ``Algorithm.bn_stats_role`` names."""

    async def best(self) -> Snapshot | None:
        """The best validation evaluation's parameters and buffers (``val_split``), from the
        worker that evaluates; None where none is held."""
        return None

    @abstractmethod
    async def all_buffers(self) -> list[dict[str, torch.Tensor]]:
        """Every worker's model buffers, by slot (for checkpoints)."""

    @abstractmethod
    async def load_buffers(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        """Restore every worker's model buffers, by slot."""


def lookahead(algo: Algorithm, state: AlgoState, reqs: list[GradRequest], plan: Plan,
              cfg: TrainConfig, busy: Callable[[], bool],
              timed: bool = False) -> list[GradRequest] | None:
    """The next round's requests (on a 0-length shadow state), if the workers it needs are the
    same whether this round is applied or skipped, and nothing needs the state in between: the
    end of the run, an epoch's end (evaluation), a checkpoint (``timed``: a time-based one is
    due after this round's update), or ``busy()`` (a stop or an on-demand checkpoint is
    waiting)."""
    applied, skipped = state.shadow(), state.shadow()
    algo.update(applied, {r.role: applied.x for r in reqs})
    algo.skip(skipped)
    nexts = []
    for s in (applied, skipped):
        if s.step != state.step:  # this round completes an update: what follows it?
            every = cfg.checkpoint_every
            if s.step >= plan.total_steps or plan.epoch_end(s.step) or \
                    (every and s.step % every == 0) or timed or busy():
                return None
        nexts.append(algo.requests(s))
    slots = [sorted({algo.slot_of(r.role) for r in n}) for n in nexts]
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
    is awaited every ``cfg.checkpoint_every`` updates, after the first update that ends once
    ``cfg.checkpoint_interval_s`` seconds have passed since the last one (or the start: a long
    run is resumable without a choice of N, and loses at most about that much), and at the end
    (and its ``check``, where it has one, after every update: a failed background write ends
    the run there). A checkpoint only reads the state: where one falls never changes the
    trajectory. ``resume``
    continues from a checkpoint (state, worker buffers, the record so far); ``after_update`` is
    awaited after every update (on-demand work such as a requested checkpoint); ``hold`` says
    such work is waiting (the loop then does not run a round ahead of it)."""
    algo = make_algorithm(cfg, plan.total_steps, plan.batches_per_epoch)
    say = progress or (lambda ev: None)
    if resume is not None:
        state = resume.state()
        await executor.load_buffers(resume.buffers)
        recorder.load_state(resume.meta.get("record", {}))
    else:
        state = algo.init(x0)
    if executor.holds_state:  # the replicas hold the numbers; the loop follows a shadow
        await executor.init_state(state)
        state = state.shadow()
    perf = time.perf_counter
    #: a Checkpointer's check: raises when a checkpoint it writes in the background failed
    written: Callable[[], Awaitable[None]] | None = getattr(checkpoint, "check", None)
    epochs_done = len(recorder.epochs)
    nonfinite_streak = 0
    last_update = started = last_checkpoint = perf()
    start_step = state.step  # the rate shown is this session's updates over its time
    interval = cfg.checkpoint_interval_s if checkpoint is not None else 0.0

    def busy() -> bool:
        return (should_stop is not None and should_stop()) or \
            (hold is not None and hold())

    def evals(done: list[tuple[int, EvalResult]]) -> None:
        for step, ev in done:
            recorder.add_eval(step, ev)
            say({"kind": "eval", "step": step, "test_accuracy": ev.accuracy,
                 "test_loss": ev.loss})

    while state.step < plan.total_steps:
        reqs = algo.requests(state)
        # a time-based checkpoint is decided before the round, so that a round run ahead of it
        # (decided now too) never overlaps it
        timed = bool(interval) and perf() - last_checkpoint >= interval
        ahead = lookahead(algo, state, reqs, plan, cfg, busy, timed) \
            if executor.runs_ahead else None
        t0 = perf()
        results = await executor.round(reqs, ahead)
        t1 = perf()
        before = state.step
        verdicts = {role: finite(r) for role, r in results.items()}
        if not round_applies(verdicts.values()):
            # skip the update, count it, and abort after max_nonfinite in a row
            bad = ", ".join(role for role, ok in verdicts.items() if not ok)
            recorder.nonfinite_rounds += 1
            nonfinite_streak += 1
            if nonfinite_streak >= cfg.max_nonfinite:
                raise NonFiniteError(
                    f"nonfinite: {nonfinite_streak} rounds in a row gave a non-finite loss or "
                    f"gradient ({bad}) at step {state.step}; try a lower --lr")
            algo.skip(state)
            say({"kind": "info", "text": f"step {before}: non-finite {bad} gradient; update "
                 "skipped"})
        else:
            nonfinite_streak = 0
            if executor.holds_state:  # the replicas apply it; the shadow follows
                algo.update(state, {role: state.x for role in results})
            else:
                algo.update(state, {role: r.grad for role, r in results.items()})
        t2 = perf()
        recorder.record_round(results, t1 - t0, t2 - t1)
        if state.step != before:
            recorder.record_step(t2 - last_update)
            last_update = t2
        if state.step != before and plan.epoch_end(state.step):
            epochs_done += 1
            row = recorder.end_epoch(state.step / plan.batches_per_epoch, state.step,
                                     algo.lr_at(before))
            if epochs_done % cfg.eval_every == 0 or state.step == plan.total_steps:
                await executor.start_eval(state.step, state)
            evals(await executor.finished_evals(wait=False))
            say({"kind": "epoch", **row})
        say({"kind": "round", "step": state.step, "total": plan.total_steps,
             "loss": recorder.last_loss, "accuracy": _number(recorder.last_accuracy),
             "round_s": t1 - t0, "update_s": t2 - t1,
             "compute_s": max((r.timings.get("compute", 0.0) for r in results.values()),
                              default=0.0),
             "steps_per_s": (state.step - start_step) / (t2 - started)
             if state.step > start_step and t2 > started else None,
             "lr": algo.lr_at(max(state.step - 1, 0))})
        if state.step != before:
            if written is not None:  # a background checkpoint write failed: stop here
                await written()
            every = cfg.checkpoint_every
            if checkpoint is not None and state.step < plan.total_steps and \
                    (timed or (every and state.step % every == 0)):
                await checkpoint(await executor.full_state(state))
                last_checkpoint = perf()
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
    evals(await executor.finished_evals(wait=True))
    state = await executor.full_state(state)
    if checkpoint is not None and state.step > 0:
        await checkpoint(state)
    return state
