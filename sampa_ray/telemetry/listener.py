"""Metrics that listen: the loop's progress events feed :class:`~.metrics.RunMetrics`.

The loop announces what happened (a :class:`~sampa_ray.events.RoundEvent` with its timings,
step, loss and learning rate; an epoch's end; an evaluation with the test accuracy); this
listener turns that into Prometheus series, with
the per-round detail a data path's :class:`~.metrics.RoundProbe` collected. Nothing here reaches
into the loop or its recorder.
"""

from __future__ import annotations

from ..events import EpochEvent, EvalEvent, Event, RoundEvent
from .metrics import RoundProbe, RunMetrics


class MetricsListener:
    """A progress listener that feeds the metrics."""

    def __init__(self, probe: RoundProbe, metrics: RunMetrics) -> None:
        self.probe = probe
        self.metrics = metrics
        metrics.loss_scale.set(0)  # a run starts: 0 until an fp16 run's round says its scale

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, RoundEvent):
            self.probe.publish(ev.round_s, ev.update_s, ev.step, ev.loss, ev.lr)
            if ev.loss_scale is not None:
                self.metrics.loss_scale.set(ev.loss_scale)
        elif isinstance(ev, EpochEvent):
            self.probe.end_epoch()
        elif isinstance(ev, EvalEvent) and ev.test_accuracy is not None:
            self.metrics.observe_eval("test", ev.test_accuracy)
