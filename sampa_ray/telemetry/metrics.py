"""Prometheus metrics of a run: what a round costs, split into compute, host<->device copies,
transfer and waiting, and how training goes (loss, accuracy, learning rate).

One scrape target, on the coordinator. Workers do not serve metrics; their timings travel back
with every gradient (``GradResult.timings``). All names carry the prefix ``sampa_`` and base units
(seconds, bytes); labels are low-cardinality: ``role``, ``direction``, ``transport``, ``split``.

How a round's time is split, per role:

- compute: the worker's forward + backward (``timings["compute"]``)
- copy: host->device of the point and batch (``copy_in``), device->host of the gradient
  (``copy_out``)
- transfer: the rest of that role's round trip (request dispatched -> its result arrived at the
  coordinator) after what the worker accounts for (compute, copies); split evenly between
  ``down`` (data to the worker) and ``up`` (its gradient on its way) unless measured separately
- wait: how long a role's result waited for the slowest role of the round
- update: the coordinator's update math after the round
- allreduce: with role groups (``workers_per_role`` > 1, ``data_parallel``), the group's sum of
  its shard gradients that backward did not hide, beside the bytes each worker put into it;
  the cross-role exchange is the transfer above

Bytes: on the ``points`` data path, down = the point sent to a worker, up = the gradient sent to
the coordinator. On the ``replicated`` path (the algorithm state lives beside the workers),
down = the peers' gradients a worker fetches, up = its gradient times the peers that fetch it.

:class:`RunMetrics` owns the registry and its HTTP endpoint; :class:`RoundProbe` is the small
helper an executor and a progress callback use to feed it. The endpoint itself (HTTP or HTTPS,
its bearer token) is :mod:`.http`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from ..engine import GradResult
from .http import MetricsServer, serve_registry

PREFIX = "sampa_"

#: seconds: from 50 µs (small updates, copies) to a minute (large models on CPUs)
TIME_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: every metric family :class:`RunMetrics` exports (names as they appear in PromQL, without the
#: ``_bucket``/``_sum``/``_count``/``_info`` suffixes the exposition adds)
METRIC_NAMES = (
    "sampa_round_seconds", "sampa_update_seconds", "sampa_worker_compute_seconds",
    "sampa_worker_copy_seconds", "sampa_transfer_seconds", "sampa_transfer_bytes_total",
    "sampa_wait_seconds", "sampa_steps_total", "sampa_samples_total", "sampa_loss",
    "sampa_accuracy", "sampa_lr", "sampa_grad_norm", "sampa_communication_share",
    "sampa_speedup_vs_sequential", "sampa_worker_restarts_total", "sampa_retried_rounds_total",
    "sampa_nonfinite_rounds_total", "sampa_run", "sampa_group_allreduce_seconds",
    "sampa_group_allreduce_bytes_total", "sampa_gradient_rounds_total",
    "sampa_scaler_skips_total", "sampa_loss_scale",
)


def exported_series_names() -> set[str]:
    """Every series name a scrape of :class:`RunMetrics` can show, with the suffixes the
    exposition adds (``_total``, ``_bucket``/``_sum``/``_count``, ``_created``, ``_info``)."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"), "info": ("_info",)}
    return {fam.name + s for fam in RunMetrics().registry.collect() for s in suffixes[fam.type]}


def _clip01(v: float) -> float:
    return 0.0 if not v > 0.0 else min(1.0, v)  # NaN -> 0


class RunMetrics:
    """The metrics of the runs a coordinator executes, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._timing_series(self.registry)
        self._training_series(self.registry)
        self._fault_series(self.registry)
        # labelled children, created once per label set (no per-round allocations after that)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._last_step = self._last_samples = 0
        self._server: MetricsServer | None = None
        self.host: str | None = None
        self.port: int | None = None
        self.scheme = "http"

    def _timing_series(self, r: CollectorRegistry) -> None:
        """Where a round's time and bytes go: per round, per worker, per link."""
        h, b = Histogram, TIME_BUCKETS
        self.round_seconds = h("sampa_round_seconds", "Wall time of a gradient round: requests "
                               "dispatched to the last gradient received", registry=r, buckets=b)
        self.update_seconds = h("sampa_update_seconds", "The coordinator's update math after a "
                                "round", registry=r, buckets=b)
        self.compute_seconds = h("sampa_worker_compute_seconds", "A worker's forward + backward "
                                 "for one request", ["role"], registry=r, buckets=b)
        self.copy_seconds = h("sampa_worker_copy_seconds", "A worker's copies for one request: "
                              "point and batch host_to_device, gradient device_to_host",
                              ["role", "direction"], registry=r, buckets=b)
        self.transfer_seconds = h("sampa_transfer_seconds", "Time a request spent outside the "
                                  "worker's compute and copies: down = data to the worker, up = "
                                  "its gradient back",
                                  ["role", "direction", "transport"], registry=r, buckets=b)
        self.transfer_bytes = Counter("sampa_transfer_bytes", "Payload bytes moved: down = into "
                                      "the worker (a point, or its peers' gradients), up = its "
                                      "gradient on its way", ["role", "direction", "transport"],
                                      registry=r)
        self.wait_seconds = h("sampa_wait_seconds", "How long a role's gradient waited for the "
                              "slowest gradient of its round", ["role"], registry=r, buckets=b)
        self.allreduce_seconds = h("sampa_group_allreduce_seconds", "A role group's all-reduce "
                                   "of one gradient (workers_per_role > 1): what a worker waits "
                                   "for after backward", ["role"], registry=r, buckets=b)
        self.allreduce_bytes = Counter("sampa_group_allreduce_bytes", "Bytes each worker of a "
                                       "role group contributes to its gradient all-reduce",
                                       ["role"], registry=r)

    def _training_series(self, r: CollectorRegistry) -> None:
        """How the training goes: steps, samples, loss, accuracy, learning rate, gradient norms
        and how parallel the rounds are."""
        self.steps = Counter("sampa_steps", "Parameter updates applied", registry=r)
        self.rounds = Counter("sampa_gradient_rounds", "Gradient rounds run one after the other; "
                              "over sampa_steps_total: sequential gradients per update", registry=r)
        self.samples = Counter("sampa_samples", "Training samples consumed by the updates",
                               registry=r)
        self.loss = Gauge("sampa_loss", "Training loss of the latest trajectory gradient",
                          registry=r)
        self.accuracy = Gauge("sampa_accuracy", "Accuracy: train = mean batch accuracy of the "
                              "current epoch so far, test = latest evaluation", ["split"],
                              registry=r)
        self.lr = Gauge("sampa_lr", "Learning rate of the latest update", registry=r)
        self.grad_norm = Gauge("sampa_grad_norm", "Global L2 norm of the latest gradient",
                               ["role"], registry=r)
        self.communication_share = Gauge(
            "sampa_communication_share", "1 - (largest worker compute / round time) of the latest "
            "round, in [0, 1]: the share of a round not spent computing", registry=r)
        self.speedup = Gauge("sampa_speedup_vs_sequential", "Sum of the latest round's compute / "
                             "its wall time: > 1 when gradients were computed in parallel",
                             registry=r)

    def _fault_series(self, r: CollectorRegistry) -> None:
        """What went wrong and was recovered from, and which run this is."""
        self.worker_restarts = Counter("sampa_worker_restarts", "Gradient workers restarted",
                                       registry=r)
        self.retried_rounds = Counter("sampa_retried_rounds", "Rounds retried after a failure",
                                      registry=r)
        self.nonfinite_rounds = Counter("sampa_nonfinite_rounds", "Rounds whose gradient held "
                                        "a NaN or an infinity", registry=r)
        self.scaler_skips = Counter("sampa_scaler_skips", "fp16: rounds skipped because their "
                                    "gradients overflowed at the loss scale", registry=r)
        self.loss_scale = Gauge("sampa_loss_scale", "fp16: the current loss scale", registry=r)
        self.run = Info("sampa_run", "The run being executed", registry=r)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- serving --------------------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
              certfile: str | None = None, keyfile: str | None = None) -> int:
        """Serve ``/metrics`` from a daemon thread; returns the bound port (``port`` 0 picks a
        free one). Listening beyond loopback takes an explicit ``host`` such as 0.0.0.0 and a
        ``token``; with a token every request must carry ``Authorization: Bearer <token>``.
        ``certfile`` and ``keyfile`` (PEM) switch to HTTPS. A user-caused problem is a one-line
        ``UserError``; failing to bind is the ``OSError``. See :func:`.http.serve_registry`."""
        if self._server is not None:
            raise RuntimeError(f"metrics: already serving on {self.host}:{self.port}")
        server = serve_registry(self.registry, host, port, token=token, certfile=certfile,
                                keyfile=keyfile)
        self._server, self.host, self.port, self.scheme = server, host, server.port, server.scheme
        return self.port

    def shutdown(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
        self._server = None

    def text(self) -> str:
        """The exposition, as a scrape would see it."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    # -- observations ---------------------------------------------------------------------------
    def set_run(self, run_id: str, algorithm: str, transport: str, model: str,
                data_path: str = "") -> None:
        """A new run starts: label it, and count its steps from zero on top of earlier runs."""
        self.run.info({"run_id": run_id, "algorithm": algorithm, "transport": transport,
                       "model": model, "data_path": data_path})
        self._last_step = self._last_samples = 0

    def observe_round(self, results: Mapping[str, GradResult], round_s: float, update_s: float,
                      arrivals: Mapping[str, float], point_bytes: Mapping[str, int],
                      grad_bytes: Mapping[str, int], transport: str,
                      started: float | None = None,
                      transfer_split: Mapping[str, tuple[float, float]] | None = None,
                      waits: Mapping[str, float] | None = None) -> None:
        """Record one gradient round.

        ``arrivals``: ``time.perf_counter()`` when each role's result reached the coordinator;
        ``started``: when the requests were dispatched (default: the last arrival − round_s).
        ``transfer_split``: per role, measured (down, up) seconds where the transport knows them;
        otherwise the time outside compute and copies is split evenly between the two.
        ``waits``: per role, measured seconds waited for the round's slowest worker (otherwise:
        from the arrivals).
        """
        child = self._child
        self.rounds.inc()
        self.round_seconds.observe(round_s)
        self.update_seconds.observe(update_s)
        last = max(arrivals.values()) if arrivals else 0.0
        t0 = started if started is not None else last - round_s
        max_compute = 0.0
        sum_compute = 0.0
        for role, r in results.items():
            tm = r.timings
            compute = tm.get("compute", 0.0)
            copy_in = tm.get("copy_in", 0.0)
            copy_out = tm.get("copy_out", 0.0)
            worker_s = sum(tm.values())  # everything the worker accounts for is not transfer
            max_compute = max(max_compute, compute)
            sum_compute += compute
            child(self.compute_seconds, role).observe(compute)
            if r.reduced_bytes:  # computed by a role group: its all-reduce
                child(self.allreduce_seconds, role).observe(tm.get("allreduce", 0.0))
                child(self.allreduce_bytes, role).inc(r.reduced_bytes)
            child(self.copy_seconds, role, "host_to_device").observe(copy_in)
            child(self.copy_seconds, role, "device_to_host").observe(copy_out)
            arrived = arrivals.get(role)
            if transfer_split is not None and role in transfer_split:
                down, up = transfer_split[role]
            elif arrived is not None:
                outside = max(0.0, (arrived - t0) - worker_s)
                down = up = outside / 2
            else:
                down = up = None
            if down is not None and up is not None:
                child(self.transfer_seconds, role, "down", transport).observe(down)
                child(self.transfer_seconds, role, "up", transport).observe(up)
            if waits is not None and role in waits:
                child(self.wait_seconds, role).observe(waits[role])
            elif arrived is not None:
                child(self.wait_seconds, role).observe(max(0.0, last - arrived))
            child(self.transfer_bytes, role, "down", transport).inc(point_bytes.get(role, 0))
            child(self.transfer_bytes, role, "up", transport).inc(grad_bytes.get(role, 0))
        if round_s > 0:
            self.communication_share.set(_clip01(1.0 - max_compute / round_s))
            self.speedup.set(sum_compute / round_s)

    def observe_update(self, step: int, samples: int, loss: float, lr: float,
                       grad_norms: Mapping[str, float]) -> None:
        """After a round: ``step`` updates and ``samples`` training samples consumed so far in
        this run (totals; the counters advance by the difference), the latest trajectory loss,
        the learning rate and whichever gradient norms were measured."""
        if step > self._last_step:
            self.steps.inc(step - self._last_step)
            self._last_step = step
        if samples > self._last_samples:
            self.samples.inc(samples - self._last_samples)
            self._last_samples = samples
        if loss == loss:  # not NaN (no trajectory gradient yet)
            self.loss.set(loss)
        self.lr.set(lr)
        for role, norm in grad_norms.items():
            self._child(self.grad_norm, role).set(norm)

    def observe_eval(self, split: str, accuracy: float) -> None:
        """Accuracy on ``split`` (train / test)."""
        self._child(self.accuracy, split).set(accuracy)


class RoundProbe:
    """Feeds :class:`RunMetrics` from a backend's loop without touching the loop.

    The executor calls :meth:`dispatched` (points path) or :meth:`dispatched_peers`
    (replicated path) when it sends a round's requests, :meth:`arrived` per result, then
    :meth:`round_done`; the progress callback calls :meth:`publish` after the update (it knows
    the round and update times, the step and the loss). Gradient norms the workers report are
    used as they are; otherwise they cost a pass over the gradient here, so they are taken at
    most once per ``norm_interval_s`` (scrapes are seconds apart anyway).
    """

    def __init__(self, metrics: RunMetrics, transport: str, norm_interval_s: float = 1.0) -> None:
        self.metrics = metrics
        self.transport = transport
        self.norm_interval_s = norm_interval_s
        self.stats_role = ""
        self.batch_size = 0
        self._started = 0.0
        self._arrivals: dict[str, float] = {}
        self._split: Mapping[str, tuple[float, float]] | None = None
        self._waits: Mapping[str, float] | None = None
        self._results: Mapping[str, GradResult] = {}
        self._point_bytes: dict[str, int] = {}
        self._grad_bytes: dict[str, int] = {}
        self._norms: dict[str, float] = {}
        self._grad_size = 0  # bytes of one gradient, as last seen
        self._norm_roles: set[str] = set()  # roles whose norm has been taken in this run
        self._last_norm = -math.inf
        self._acc_sum = 0.0
        self._acc_n = 0

    def begin_run(self, run_id: str, algorithm: str, model: str, stats_role: str,
                  batch_size: int, transport: str | None = None, data_path: str = "") -> None:
        """A run starts on this probe (``transport``: the label its traffic gets from now on)."""
        if transport is not None:
            self.transport = transport
        self.metrics.set_run(run_id, algorithm, self.transport, model, data_path)
        self.stats_role = stats_role
        self.batch_size = batch_size
        self._last_norm = -math.inf
        self._norm_roles.clear()
        self._acc_sum, self._acc_n = 0.0, 0
        self._results = {}

    def dispatched(self, roles_points: Sequence[tuple[str, Any]]) -> None:
        """The round's requests left: (role, point tensor) for each."""
        self._arrivals.clear()
        self._point_bytes.clear()
        for role, point in roles_points:
            self._point_bytes[role] = point.numel() * point.element_size()
        self._started = time.perf_counter()

    def dispatched_peers(self, gradients_in: Mapping[str, int]) -> None:
        """The round's requests left (replicated path): per role, how many of its peers'
        gradients the worker serving it fetches for this round."""
        self._arrivals.clear()
        self._point_bytes.clear()
        for role, n in gradients_in.items():
            self._point_bytes[role] = n * self._grad_size
        self._started = time.perf_counter()

    def arrived(self, role: str) -> None:
        self._arrivals[role] = time.perf_counter()

    def round_done(self, results: Mapping[str, GradResult], fanout: int = 1,
                   split: Mapping[str, tuple[float, float]] | None = None,
                   waits: Mapping[str, float] | None = None) -> None:
        """All results are in. ``fanout``: how many processes each gradient goes to (the
        coordinator: 1; on the replicated path, the other workers in use). ``split`` and
        ``waits``: per role, the transfer (down, up) and the wait as the workers measured them,
        where the coordinator saw no arrivals (rounds the workers ran on their own)."""
        self._results = results
        self._split, self._waits = split, waits
        self._grad_bytes.clear()
        reported = True
        for role, r in results.items():
            size = r.nbytes if r.nbytes is not None else r.grad.numel() * r.grad.element_size()
            self._grad_size = size or self._grad_size
            self._grad_bytes[role] = size * fanout
            reported = reported and r.norm is not None
        r = results.get(self.stats_role)
        if r is not None:
            self._acc_sum += r.accuracy
            self._acc_n += 1
        if reported:
            self._norms = {role: r.norm for role, r in results.items() if r.norm is not None}
            return
        now = time.perf_counter()
        due = now - self._last_norm >= self.norm_interval_s
        if due:
            self._last_norm = now
        # every interval, and the first time a role shows up
        self._norms = {role: float(r.grad.float().norm()) for role, r in results.items()
                       if due or role not in self._norm_roles}
        self._norm_roles.update(self._norms)

    def publish(self, round_s: float, update_s: float, step: int, loss: float,
                lr: float) -> None:
        """After the update of the round last passed to :meth:`round_done`."""
        m = self.metrics
        if self._results:
            m.observe_round(self._results, round_s, update_s, self._arrivals, self._point_bytes,
                            self._grad_bytes, self.transport, started=self._started,
                            transfer_split=self._split, waits=self._waits)
            self._results = {}
        m.observe_update(step, step * self.batch_size, loss, lr, self._norms)
        if self._acc_n:
            m.observe_eval("train", self._acc_sum / self._acc_n)

    def end_epoch(self) -> None:
        """The train accuracy averages over the current epoch."""
        self._acc_sum, self._acc_n = 0.0, 0


__all__ = [
    "METRIC_NAMES",
    "PREFIX",
    "TIME_BUCKETS",
    "RoundProbe",
    "RunMetrics",
    "exported_series_names",
]
