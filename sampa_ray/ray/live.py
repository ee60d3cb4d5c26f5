"""What the control API says about a run in progress, kept current from the loop's events.

The coordinator keeps one ``live`` dict per actor. The loop's events each carry part of the
picture (a round: step, total, loss, training accuracy; an epoch: epoch, train loss and
accuracy; an evaluation: test accuracy); :func:`on_event` keeps the whole picture in ``live``
and gives the event's fields for the wire with what it lacks filled in from it, so a watcher
sees every field on every event.
:func:`status` adds how fresh that picture is: the age of the last round, which worker the
coordinator is waiting on and for how long, and whether that is far longer than a round takes
(a frozen worker, which nothing ends without ``--round-timeout``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ..events import EpochEvent, EvalEvent, Event, RoundEvent, fields_of

#: a wait is "stalled" past this many seconds ...
STALL_MIN_S = 10.0
#: ... or this many times the last round's duration, whichever is longer
STALL_ROUNDS = 20.0


def begin_run(live: dict[str, Any], algo: str, total: int, batches_per_epoch: int,
              run_id: str) -> None:
    """A run starts: its fixed facts, and nothing left over from the run before it."""
    for key in ("test_accuracy", "loss", "accuracy", "epoch", "round_s"):
        live.pop(key, None)
    live.update({"state": "running", "algo": algo, "step": 0, "total": total,
                 "bpe": batches_per_epoch, "run_id": run_id, "round_at": time.monotonic()})


def on_event(live: dict[str, Any], ev: Event) -> dict[str, Any]:
    """Update ``live`` from one of the loop's events and return the event's fields for the
    control API (:func:`~sampa_ray.events.fields_of`) with what it lacks (total, epoch, loss,
    training and test accuracy) filled in from ``live``."""
    fields = fields_of(ev)
    if isinstance(ev, EvalEvent):
        live["test_accuracy"] = ev.test_accuracy
    elif isinstance(ev, RoundEvent):
        live["step"], live["round_at"] = ev.step, time.monotonic()
        live["round_s"] = ev.round_s
        for key in ("loss", "accuracy"):
            if fields.get(key) is not None and math.isfinite(fields[key]):
                live[key] = fields[key]
        if live.get("bpe"):
            live["epoch"] = ev.step / live["bpe"]
    elif isinstance(ev, EpochEvent):
        live["step"], live["epoch"] = ev.step, ev.epoch
        for key in ("loss", "accuracy"):  # the epoch's means, not the last round's
            if fields.get(f"train_{key}") is not None:
                fields[key] = fields[f"train_{key}"]
    for key in ("total", "epoch", "loss", "accuracy", "test_accuracy"):
        if fields.get(key) is None and live.get(key) is not None:
            fields[key] = live[key]
    return fields


def enqueue(events: list[Event], ev: Event) -> None:
    """Add ``ev`` to the events the driver takes at its next poll (four times a second): a
    round replaces a round just before it, since the driver only shows the latest; epochs and
    info lines all stay. So the driver gets them in bursts, and a short run in one."""
    if isinstance(ev, RoundEvent) and events and isinstance(events[-1], RoundEvent):
        events[-1] = ev
    else:
        events.append(ev)


def stall_after(live: dict[str, Any]) -> float:
    """Seconds of waiting that count as stalled for this run."""
    return max(STALL_MIN_S, STALL_ROUNDS * float(live.get("round_s") or 0.0))


def status(live: dict[str, Any], infos: list[dict[str, Any]],
           busy_for: Callable[[int], float | None]) -> dict[str, Any]:
    """The keys of ``StatusReply`` that describe the run (the coordinator adds transport and
    metrics port). ``busy_for(slot)``: seconds the coordinator has waited on that worker's
    current call, None when it is not waiting on it."""
    running = live.get("state") == "running"
    age = time.monotonic() - live["round_at"] if "round_at" in live else 0.0
    limit = stall_after(live)
    workers = []
    for slot, info in enumerate(infos):
        busy = busy_for(slot) if running else None
        state = "idle" if busy is None else "stalled" if busy > limit else "computing"
        workers.append({"name": info.get("name", ""), "state": state, "pid": info.get("pid", 0),
                        "device": info.get("device", ""), "busy_seconds": busy or 0.0})
    return {"run_id": live.get("run_id", ""), "algorithm": live.get("algo", ""),
            "step": live.get("step", 0), "total_steps": live.get("total", 0),
            "epoch": live.get("epoch", 0.0), "loss": live.get("loss", math.nan),
            "accuracy": live.get("test_accuracy", math.nan), "state": live.get("state", ""),
            "round_age_seconds": age if running else 0.0,
            "stalled": running and age > limit, "workers": workers}


__all__ = ["STALL_MIN_S", "STALL_ROUNDS", "begin_run", "enqueue", "on_event", "stall_after",
           "status"]
