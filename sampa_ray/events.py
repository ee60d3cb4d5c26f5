"""Progress events: what a run tells the world, one type per kind of news.

The loop (and the backend around it) makes them; the progress bar (:mod:`sampa_ray.ui`), the
metrics (:mod:`sampa_ray.telemetry.listener`), the live status and the control API's watchers
(:mod:`sampa_ray.ray.live`) consume them, each dispatching on the type, so a field a listener
reads is a field the event declares. They are plain dataclasses: they cross from the Ray
coordinator to the driver by pickle, and :func:`sampa_ray.ray.live.on_event` turns them into
the control API's ``ProgressEvent`` fields (where ``kind`` names them, as it did before types).
Nothing here imports torch, Ray or gRPC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(kw_only=True)
class RoundEvent:
    """A gradient round finished (and its update, where it completed one)."""

    kind: ClassVar[str] = "round"
    step: int
    total: int
    loss: float = math.nan  # the trajectory gradient's (NaN before one reported it)
    accuracy: float | None = None  # its batch's training accuracy; None where the loss has none
    round_s: float = 0.0  # requests dispatched to the last gradient in
    update_s: float = 0.0  # the update (or skip) after it
    compute_s: float = 0.0  # the slowest worker's compute in the round
    steps_per_s: float | None = None  # this session's updates over its time
    lr: float = 0.0  # of the update the round belongs to
    #: the share of the round not spent computing: given by backends whose rounds travel
    #: (Ray), None where both gradients run one after the other in one process
    comm_share: float | None = None
    algo: str | None = None  # the run's algorithm, where one view shows several runs
    loss_scale: float | None = None  # fp16: the loss scale after the round's verdict


@dataclass(kw_only=True)
class EpochEvent:
    """An epoch ended: the recorder's row for it, as it stood then."""

    kind: ClassVar[str] = "epoch"
    epoch: float
    step: int
    lr: float
    wall_s: float
    train_loss: float | None = None
    train_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None  # where an evaluation of this epoch finished already
    algo: str | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> EpochEvent:
        """The event for an epoch row of :class:`~sampa_ray.results.Recorder` (a copy: the
        row fills in later, when its evaluation finishes)."""
        return cls(epoch=row["epoch"], step=row["step"], lr=row["lr"], wall_s=row["wall_s"],
                   train_loss=row.get("train_loss"), train_accuracy=row.get("train_accuracy"),
                   test_loss=row.get("test_loss"), test_accuracy=row.get("test_accuracy"))


@dataclass(kw_only=True)
class EvalEvent:
    """An evaluation (started at update ``step``) finished."""

    kind: ClassVar[str] = "eval"
    step: int
    test_accuracy: float | None
    test_loss: float
    algo: str | None = None


@dataclass(kw_only=True)
class InfoEvent:
    """One line for the user: where the services listen, a worker restarted, a skipped
    round."""

    kind: ClassVar[str] = "info"
    text: str
    algo: str | None = None


Event = RoundEvent | EpochEvent | EvalEvent | InfoEvent
#: a listener of a run's events
Progress = Callable[[Event], None]


def fields_of(ev: Event) -> dict[str, Any]:
    """An event as the control API's fields: ``kind`` and the fields it has (None left out:
    a watcher is told only what is known)."""
    return {"kind": ev.kind, **{k: v for k, v in asdict(ev).items() if v is not None}}


def ignore(ev: Event) -> None:
    """The listener of a run nobody watches."""


__all__ = ["EpochEvent", "EvalEvent", "Event", "InfoEvent", "Progress", "RoundEvent",
           "fields_of", "ignore"]
