"""What the training loop drives: the :class:`Plan` of a run (its length and cadences) and the
:class:`Executor` that evaluates each round's gradient requests (``sampa_ray.local`` in one
process, the Ray data paths on the workers), with :func:`lookahead`, which says when the next
round may be dispatched before this one's results are in. The loop itself is
:mod:`sampa_ray.loop`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from .algorithms import Algorithm, AlgoState, GradRequest
from .config import TrainConfig
from .engine import EvalResult, GradResult, Snapshot


@dataclass
class Plan:
    """What the loop is to do: how many updates, the epochs' length, and the cadences taken
    from the run's config (evaluations, checkpoints, how many non-finite rounds in a row are
    too many)."""

    total_steps: int
    batches_per_epoch: int
    eval_every: int = 1  # epochs
    checkpoint_every: int = 0  # updates; 0: none by count
    checkpoint_interval_s: float = 0.0  # 0: none by time
    max_nonfinite: int = 3

    @classmethod
    def of(cls, cfg: TrainConfig, batches_per_epoch: int) -> Plan:
        total = cfg.steps if cfg.steps is not None else cfg.epochs * batches_per_epoch
        return cls(total_steps=total, batches_per_epoch=batches_per_epoch,
                   eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                   checkpoint_interval_s=cfg.checkpoint_interval_s,
                   max_nonfinite=cfg.max_nonfinite)

    def epoch_end(self, step: int) -> bool:
        return step % self.batches_per_epoch == 0 or step == self.total_steps

    def checkpoint_at(self, step: int) -> bool:
        """Whether update ``step`` is one that ``checkpoint_every`` asks a checkpoint after."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0


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
    #: runs chunks of rounds on its own (see ``rounds``) instead of one ``round`` at a time
    chunks: bool = False

    async def init_state(self, state: AlgoState,
                         loss_scale: dict[str, Any] | None = None) -> None:
        """Seed the replicas (``holds_state`` executors) with the starting state, and with the
        loss scale's (:meth:`sampa_ray.scaler.LossScale.state_dict`; None: no scaling), which
        each replica then follows on the verdicts as the loop does."""
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

    def chunk_end(self, step: int, bound: int) -> int:
        """Where a chunk of rounds from update ``step`` ends (``chunks`` executors): at
        ``bound``, the loop's next boundary, or sooner."""
        return bound

    def rounds(self, state: AlgoState, until: int, evaluate: bool = False,
               ahead: tuple[int, bool] | None = None
               ) -> AsyncIterator[tuple[float, dict[str, GradResult]]]:
        """A ``chunks`` executor's rounds from ``state`` until update ``until``, run by the
        workers on their own (each applies every round by :func:`round_applies`): per round,
        its seconds and its results by role, in order. ``evaluate``: the evaluation at
        ``until`` is due (the workers may start it themselves; ``start_eval`` still follows).
        ``ahead``: the next chunk (its end and ``evaluate``), which nothing comes between:
        it may be queued now."""
        raise NotImplementedError(f"{type(self).__name__} runs one round at a time")

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
              busy: Callable[[], bool], timed: bool = False) -> list[GradRequest] | None:
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
        updates = s.step != state.step  # this round completes an update: what follows it?
        if updates and (s.step >= plan.total_steps or plan.epoch_end(s.step) or
                        plan.checkpoint_at(s.step) or timed or busy()):
            return None
        nexts.append(algo.requests(s))
    slots = [sorted({algo.slot_of(r.role) for r in n}) for n in nexts]
    return nexts[0] if slots[0] == slots[1] else None
