"""Metrics that listen: the loop's progress events feed :class:`~.metrics.RunMetrics`.

The loop announces what happened (``round`` with its timings, step, loss and learning rate;
``epoch``; ``eval`` with the test accuracy); this listener turns that into Prometheus series, with
the per-round detail a data path's :class:`~.metrics.RoundProbe` collected. Nothing here reaches
into the loop or its recorder.
"""

from __future__ import annotations

from typing import Any

from .metrics import RoundProbe, RunMetrics


class MetricsListener:
    """A progress callback that feeds the metrics."""

    def __init__(self, probe: RoundProbe, metrics: RunMetrics) -> None:
        self.probe = probe
        self.metrics = metrics

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        if kind == "round":
            self.probe.publish(ev["round_s"], ev.get("update_s", 0.0), ev["step"], ev["loss"],
                               ev["lr"])
        elif kind == "epoch":
            self.probe.end_epoch()
        elif kind == "eval" and ev.get("test_accuracy") is not None:
            self.metrics.observe_eval("test", ev["test_accuracy"])
