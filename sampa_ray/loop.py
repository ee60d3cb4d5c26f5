"""The training loop every backend shares, and the one rule that decides a round.

    state = algo.init(x0)
    while state.step < T:
        reqs    = algo.requests(state)
        results = await executor.round(reqs)     # the requests of a round run in parallel
        state   = algo.update(state, grads)      # or algo.skip(state): see round_applies

An :class:`Executor` evaluates requests: ``sampa_ray.local`` in this process, one after the other;
the Ray data paths (``sampa_ray.ray.paths``) on two worker actors at once. The loop, the
schedules, the recording and the outputs are the same code for all of them, so their trajectories
can be compared bit for bit. The loop tells the world what happens through typed progress
events (:mod:`sampa_ray.events`); metrics, the progress bar and the control API listen to them
and never reach into the loop. What its owner plugs in (listeners, checkpoints, a stop) comes
as one :class:`Hooks` object.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import torch

from . import algorithms
from .algorithms import Algorithm, AlgoState
from .checkpoint import Checkpoint
from .config import TrainConfig
from .engine import GradResult
from .errors import UserError
from .events import EpochEvent, EvalEvent, InfoEvent, Progress, RoundEvent, ignore
from .executor import Executor, Plan, lookahead
from .results import Recorder
from .scaler import LossScale, describe


def make_algorithm(cfg: TrainConfig, total_steps: int,
                   batches_per_epoch: int | None = None) -> Algorithm:
    """The configured algorithm (from the registry) with its learning-rate schedule over
    ``total_steps`` updates (``cosine-epoch`` needs ``batches_per_epoch``) and the run's
    BatchNorm policy (``bn_stats``; an algorithm without a perturbed role keeps its own)."""
    def lr(step: int) -> float:
        return cfg.lr_at(step, total_steps, batches_per_epoch)

    algo = algorithms.create(cfg.algo, lr, {**cfg.model_dump(), **cfg.algo_params()})
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
    """Too many rounds in a row with a non-finite loss or gradient, or (fp16) a loss scale
    halved below its floor."""


def _never() -> bool:
    return False


@dataclass
class Hooks:
    """What the loop's owner plugs into it, each optional: the loop calls them and knows
    nothing of who listens or what a checkpoint is.

    - ``progress``: receives every event (:mod:`sampa_ray.events`).
    - ``should_stop``: checked after each update (never inside one): True ends the run there.
    - ``checkpoint``: awaited with the state every ``plan.checkpoint_every`` updates, after the
      first update that ends once ``plan.checkpoint_interval_s`` seconds have passed since the
      last one (or the start: a long run is resumable without a choice of N, and loses at most
      about that much), and at the end. Where it has a ``check`` (a
      :class:`~sampa_ray.checkpoint.Checkpointer`), that is awaited after every update: a failed
      background write ends the run there. A checkpoint only reads the state: where one falls
      never changes the trajectory.
    - ``after_update``: awaited after every update (on-demand work such as a requested
      checkpoint); ``hold`` says such work is waiting (the loop then runs no round ahead of it).
    """

    progress: Progress = ignore
    should_stop: Callable[[], bool] = _never
    checkpoint: Callable[[AlgoState], Awaitable[None]] | None = None
    after_update: Callable[[AlgoState], Awaitable[None]] | None = None
    hold: Callable[[], bool] = _never

    def busy(self) -> bool:
        """A stop or on-demand work is waiting: no round may run ahead of it."""
        return self.should_stop() or self.hold()


async def train_loop(algo: Algorithm, executor: Executor, x0: torch.Tensor, plan: Plan,
                     recorder: Recorder, hooks: Hooks | None = None,
                     resume: Checkpoint | None = None,
                     scale: LossScale | None = None) -> AlgoState:
    """Run the requests -> gradients -> update loop of ``algo`` to ``plan.total_steps``
    updates on ``executor``, from ``x0`` or from the checkpoint ``resume`` (state, worker
    buffers, the record so far, the loss scale). Evaluation runs in the background on the
    trajectory worker and overlaps later rounds; ``hooks`` says who listens and what happens
    between updates. ``scale``: the run's loss scale (``precision: fp16``), which the loop
    follows on every verdict (its owner's checkpointer saves it)."""
    return await _Loop(algo, executor, plan, recorder, hooks or Hooks(), scale).run(x0, resume)


class _Loop:
    """One run of :func:`train_loop`: its state between rounds (clocks, the non-finite
    streak), so that each step of a round is a method of its own."""

    def __init__(self, algo: Algorithm, executor: Executor, plan: Plan, recorder: Recorder,
                 hooks: Hooks, scale: LossScale | None = None) -> None:
        self.algo, self.executor, self.plan = algo, executor, plan
        self.scale = scale
        self.recorder, self.hooks, self.say = recorder, hooks, hooks.progress
        #: a Checkpointer's check: raises when a checkpoint it writes in the background failed
        self.written: Callable[[], Awaitable[None]] | None = getattr(hooks.checkpoint, "check",
                                                                      None)
        self.interval = plan.checkpoint_interval_s if hooks.checkpoint is not None else 0.0
        self.nonfinite_streak = 0
        self.epochs_done = 0
        self.last_update = self.started = self.last_checkpoint = 0.0  # set by _start
        self.start_step = 0  # the rate shown is this session's updates over its time
        #: the chunk of rounds queued behind the running one (its end, whether it evaluates)
        self.queued: tuple[int, bool] | None = None

    async def run(self, x0: torch.Tensor, resume: Checkpoint | None) -> AlgoState:
        state = await self._start(x0, resume)
        step = self._chunk if self.executor.chunks else self._round
        while state.step < self.plan.total_steps:
            if not await step(state):
                break
        return await self._finish(state)

    async def _start(self, x0: torch.Tensor, resume: Checkpoint | None) -> AlgoState:
        """The starting state: the checkpoint's (with its buffers and record) or ``x0``'s; a
        0-length shadow of it where the executor's replicas hold the numbers."""
        if resume is not None:
            state = resume.state()
            await self.executor.load_buffers(resume.buffers)
            self.recorder.load_state(resume.meta.get("record", {}))
        else:
            state = self.algo.init(x0)
        scale = None
        if self.scale is not None:  # the checkpoint's scale, or the run's first
            self.scale.load_state_dict(resume.meta.get("loss_scale") if resume else None)
            self.recorder.loss_scale = self.scale.scale
            scale = self.scale.state_dict()
        if self.executor.holds_state:  # the replicas hold the numbers; the loop follows a shadow
            await self.executor.init_state(state, scale)
            state = state.shadow()
        self.epochs_done = len(self.recorder.epochs)
        self.last_update = self.started = self.last_checkpoint = time.perf_counter()
        self.start_step = state.step
        return state

    async def _round(self, state: AlgoState) -> bool:
        """One round: its gradients, the verdict, the record and the events, and what follows
        an update. False: the run stops here."""
        perf, plan = time.perf_counter, self.plan
        reqs = self.algo.requests(state)
        if self.scale is not None:
            reqs = self.scale.stamp(reqs)
        # a time-based checkpoint is decided before the round, so that a round run ahead of it
        # (decided now too) never overlaps it
        timed = bool(self.interval) and perf() - self.last_checkpoint >= self.interval
        ahead = lookahead(self.algo, state, reqs, plan, self.hooks.busy, timed) \
            if self.executor.runs_ahead else None
        t0 = perf()
        results = await self.executor.round(reqs, ahead)
        t1 = perf()
        before = state.step
        self._decide(state, results)
        t2 = perf()
        self.recorder.record_round(results, t1 - t0, t2 - t1)
        updated = state.step != before
        if updated:
            self.recorder.record_step(t2 - self.last_update)
            self.last_update = t2
            if plan.epoch_end(state.step):
                await self._end_epoch(state, before)
        self._say_round(state, results, t1 - t0, t2 - t1, t2)
        if not updated:
            return True
        return await self._after_update(state, timed, ran_ahead=ahead is not None)

    def bound(self, step: int) -> int:
        """The first update after ``step`` where the loop needs the state: an epoch's end,
        a checkpoint by count, the end of the run."""
        plan = self.plan
        ends = [plan.total_steps, (step // plan.batches_per_epoch + 1) * plan.batches_per_epoch]
        if plan.checkpoint_every:
            ends.append((step // plan.checkpoint_every + 1) * plan.checkpoint_every)
        return min(ends)

    async def _chunk(self, state: AlgoState) -> bool:
        """A chunk of rounds the workers run on their own, up to the next boundary (or
        sooner: the executor's ``chunk_end``), followed here round by round: the verdict on
        the shadow, the record and the events, as :meth:`_round` does for one. False: the
        run stops here."""
        perf, plan, ex = time.perf_counter, self.plan, self.executor
        timed = bool(self.interval) and perf() - self.last_checkpoint >= self.interval
        until = self.queued[0] if self.queued is not None else \
            ex.chunk_end(state.step, self.bound(state.step))
        ahead = None  # the next chunk, where no checkpoint, stop or end comes before it
        if until < plan.total_steps and not (timed or plan.checkpoint_at(until) or
                                             self.hooks.busy()):
            after = ex.chunk_end(until, self.bound(until))
            ahead = (after, self._evaluates(after, 1 + plan.epoch_end(until)))
        self.queued = ahead
        step_s = 0.0
        async for round_s, results in ex.rounds(state, until, self._evaluates(until), ahead):
            t1 = perf()
            before = state.step
            self._decide(state, results)
            t2 = perf()
            self.recorder.record_round(results, round_s, t2 - t1)
            step_s += round_s + t2 - t1
            if state.step != before:
                self.recorder.record_step(step_s)
                step_s = 0.0
                if plan.epoch_end(state.step):
                    await self._end_epoch(state, before)
            self._say_round(state, results, round_s, t2 - t1, t2)
        if state.step != until:
            raise RuntimeError(f"a chunk to update {until} ended at {state.step}")
        self.last_update = perf()
        return await self._after_update(state, timed, ran_ahead=ahead is not None)

    def _evaluates(self, step: int, epochs: int = 1) -> bool:
        """Whether the update ``step`` ends the ``epochs``-th epoch from here with an
        evaluation (as :meth:`_end_epoch` decides it)."""
        plan = self.plan
        return plan.epoch_end(step) and ((self.epochs_done + epochs) % plan.eval_every == 0 or
                                         step == plan.total_steps)

    def _decide(self, state: AlgoState, results: dict[str, GradResult]) -> None:
        """Apply the round's update, or skip it (counted; after ``max_nonfinite`` in a row
        the run aborts) where :func:`round_applies` says no. Under a loss scale (fp16) the
        scale follows the verdict, and a skip is an overflow the scale answers: counted apart
        and never towards ``max_nonfinite``; the run aborts once the scale falls below its
        floor instead."""
        verdicts = {role: finite(r) for role, r in results.items()}
        applies = round_applies(verdicts.values())
        if self.scale is not None:
            self.scale.follow(applies)
            self.recorder.loss_scale = self.scale.scale
        if applies:
            self.nonfinite_streak = 0
            if self.executor.holds_state:  # the replicas apply it; the shadow follows
                self.algo.update(state, {role: state.x for role in results})
            else:
                self.algo.update(state, {role: r.grad for role, r in results.items()})
            return
        bad = ", ".join(role for role, ok in verdicts.items() if not ok)
        if self.scale is not None:
            self._overflow(state, bad)
            return
        self.recorder.nonfinite_rounds += 1
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= self.plan.max_nonfinite:
            raise NonFiniteError(
                f"nonfinite: {self.nonfinite_streak} rounds in a row gave a non-finite loss or "
                f"gradient ({bad}) at step {state.step}; try a lower --lr")
        before = state.step
        self.algo.skip(state)
        self.say(InfoEvent(text=f"step {before}: non-finite {bad} gradient; update skipped"))

    def _overflow(self, state: AlgoState, bad: str) -> None:
        """An fp16 round whose gradients overflowed at the scale: skipped, the scale already
        halved; below its floor the run stops."""
        assert self.scale is not None
        self.recorder.scaler_skips += 1
        if self.scale.exhausted:
            raise NonFiniteError(
                f"nonfinite: the fp16 loss scale fell below 2**-24 at step {state.step} "
                f"({self.recorder.scaler_skips} overflowing rounds, the last in {bad}): the "
                "gradients are not finite at any scale; try a lower --lr or --precision bf16")
        before = state.step
        self.algo.skip(state)
        self.say(InfoEvent(text=f"step {before}: fp16 overflow in the {bad} gradient; update "
                                f"skipped, loss scale now {describe(self.scale.scale)}"))

    async def _end_epoch(self, state: AlgoState, before: int) -> None:
        """Close the epoch's row, start its evaluation when due, record the evaluations
        finished so far."""
        plan = self.plan
        self.epochs_done += 1
        row = self.recorder.end_epoch(state.step / plan.batches_per_epoch, state.step,
                                      self.algo.lr_at(before))
        if self.epochs_done % plan.eval_every == 0 or state.step == plan.total_steps:
            await self.executor.start_eval(state.step, state)
        await self._evals(wait=False)
        self.say(EpochEvent.of(row))

    async def _evals(self, wait: bool) -> None:
        for step, ev in await self.executor.finished_evals(wait):
            self.recorder.add_eval(step, ev)
            self.say(EvalEvent(step=step, test_accuracy=ev.accuracy, test_loss=ev.loss))

    def _say_round(self, state: AlgoState, results: dict[str, GradResult], round_s: float,
                   update_s: float, now: float) -> None:
        done = state.step - self.start_step
        self.say(RoundEvent(
            step=state.step, total=self.plan.total_steps, loss=self.recorder.last_loss,
            accuracy=_number(self.recorder.last_accuracy), round_s=round_s, update_s=update_s,
            compute_s=max((r.timings.get("compute", 0.0) for r in results.values()),
                          default=0.0),
            steps_per_s=done / (now - self.started) if done > 0 and now > self.started
            else None,
            lr=self.algo.lr_at(max(state.step - 1, 0)),
            loss_scale=self.scale.scale if self.scale is not None else None))

    async def _after_update(self, state: AlgoState, timed: bool, ran_ahead: bool) -> bool:
        """What follows an update: a failed background write stops the run; a checkpoint when
        due; unless the next round already runs, on-demand work and the stop check. False: the
        run stops here."""
        hooks = self.hooks
        if self.written is not None:  # a background checkpoint write failed: stop here
            await self.written()
        if hooks.checkpoint is not None and state.step < self.plan.total_steps and \
                (timed or self.plan.checkpoint_at(state.step)):
            await hooks.checkpoint(await self.executor.full_state(state))
            self.last_checkpoint = time.perf_counter()
        if ran_ahead:  # the next round is already under way: finish it first
            return True
        if hooks.after_update is not None:
            await hooks.after_update(state)
        return not hooks.should_stop()

    async def _finish(self, state: AlgoState) -> AlgoState:
        """Close a partial last epoch (a stop) and evaluate where the run ended, wait for the
        evaluations, take the real state, and checkpoint it."""
        rec = self.recorder
        if state.step > 0 and (not rec.epochs or rec.epochs[-1]["step"] != state.step):
            rec.end_epoch(state.step / self.plan.batches_per_epoch, state.step,
                          self.algo.lr_at(state.step - 1))
            await self.executor.start_eval(state.step, state)
        await self._evals(wait=True)
        state = await self.executor.full_state(state)
        if self.hooks.checkpoint is not None and state.step > 0:
            await self.hooks.checkpoint(state)
        return state
