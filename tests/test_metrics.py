"""Metrics: RunMetrics' arithmetic, its HTTP endpoint, a live Ray run scraped over HTTP, and a real
Prometheus server evaluating every query of the Grafana dashboard against that run."""

from __future__ import annotations

import http.client
import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, free_port
from prometheus_client.parser import text_string_to_metric_families

from sampa_ray.config import make_config
from sampa_ray.engine import GradResult
from sampa_ray.events import Event, InfoEvent, RoundEvent
from sampa_ray.telemetry.metrics import METRIC_NAMES, RoundProbe, RunMetrics, exported_series_names

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "sampa-communication.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """Names (families and samples: ``sampa_steps`` and ``sampa_steps_total``) and
    {(sample name, labels): value} of an exposition."""
    names: set[str] = set()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        for s in fam.samples:
            names.add(s.name)
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return names, out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def result(compute: float, copy_in: float = 0.0, copy_out: float = 0.0, n: int = 10,
           accuracy: float = 0.5) -> GradResult:
    return GradResult(grad=torch.full((n,), 2.0), loss=1.5, accuracy=accuracy,
                      timings={"compute": compute, "copy_in": copy_in, "copy_out": copy_out})


# -- RunMetrics, unit ----------------------------------------------------------------------------
def test_round_is_split_into_compute_copies_transfer_and_wait():
    m = RunMetrics()
    results = {"perturbed": result(0.10, 0.01, 0.02), "extrapolated": result(0.20, 0.01, 0.03)}
    m.observe_round(results, round_s=0.30, update_s=0.005,
                    arrivals={"perturbed": 100.20, "extrapolated": 100.30},
                    point_bytes={"perturbed": 40, "extrapolated": 40},
                    grad_bytes={"perturbed": 44, "extrapolated": 44}, transport="ray",
                    started=100.0)
    fams, s = parse(m.text())
    assert val(s, "sampa_round_seconds_count") == 1 and val(s, "sampa_round_seconds_sum") == 0.3
    assert val(s, "sampa_update_seconds_sum") == 0.005
    assert val(s, "sampa_worker_compute_seconds_sum", role="extrapolated") == 0.2
    assert val(s, "sampa_worker_copy_seconds_sum", role="extrapolated",
               direction="device_to_host") == 0.03
    assert val(s, "sampa_worker_copy_seconds_sum", role="perturbed",
               direction="host_to_device") == 0.01
    # perturbed: round trip 0.20 - (0.10 + 0.01 + 0.02) = 0.07 outside the worker, half each way
    for d in ("down", "up"):
        assert val(s, "sampa_transfer_seconds_sum", role="perturbed", direction=d,
                   transport="ray") == pytest.approx(0.035)
        assert val(s, "sampa_transfer_seconds_sum", role="extrapolated", direction=d,
                   transport="ray") == pytest.approx(0.03)
    # the faster result waited 0.1 s for the slower one
    assert val(s, "sampa_wait_seconds_sum", role="perturbed") == pytest.approx(0.1)
    assert val(s, "sampa_wait_seconds_sum", role="extrapolated") == 0
    assert val(s, "sampa_transfer_bytes_total", role="perturbed", direction="down",
               transport="ray") == 40
    assert val(s, "sampa_transfer_bytes_total", role="perturbed", direction="up",
               transport="ray") == 44
    assert val(s, "sampa_communication_share") == pytest.approx(1 - 0.2 / 0.3)
    assert val(s, "sampa_speedup_vs_sequential") == pytest.approx(0.3 / 0.3)
    # histogram buckets count the observation where it belongs
    assert val(s, "sampa_worker_compute_seconds_bucket", role="perturbed", le="0.1") == 1
    assert val(s, "sampa_worker_compute_seconds_bucket", role="extrapolated", le="0.1") == 0
    # a second round adds up
    m.observe_round(results, 0.30, 0.005, {"perturbed": 1.2, "extrapolated": 1.3},
                    {"perturbed": 40, "extrapolated": 40}, {"perturbed": 44, "extrapolated": 44},
                    "ray", started=1.0)
    _, s = parse(m.text())
    assert val(s, "sampa_worker_compute_seconds_count", role="perturbed") == 2
    assert total(s, "sampa_transfer_bytes_total", direction="up") == 4 * 44


def test_a_role_groups_all_reduce_is_its_own_series_beside_the_transfer():
    """With role groups a gradient's all-reduce wait and bytes are reported per role; the
    worker accounts for the wait, so it is not counted as transfer. One worker per role
    (``reduced_bytes`` 0) creates no all-reduce series."""
    m = RunMetrics()
    grouped = result(0.10, 0.01, 0.01)
    grouped.timings["allreduce"] = 0.03
    grouped.reduced_bytes = 4_000
    m.observe_round({"perturbed": grouped, "extrapolated": result(0.10)}, round_s=0.25,
                    update_s=0.0, arrivals={"perturbed": 10.2, "extrapolated": 10.2},
                    point_bytes={}, grad_bytes={}, transport="ray", started=10.0)
    _, s = parse(m.text())
    assert val(s, "sampa_group_allreduce_seconds_sum", role="perturbed") == pytest.approx(0.03)
    assert val(s, "sampa_group_allreduce_bytes_total", role="perturbed") == 4_000
    assert ("sampa_group_allreduce_bytes_total", frozenset({("role", "extrapolated")})) \
        not in s
    # 0.2 s round trip - (0.10 compute + 0.02 copies + 0.03 all-reduce) = 0.05 of transfer
    assert val(s, "sampa_transfer_seconds_sum", role="perturbed", direction="up",
               transport="ray") == pytest.approx(0.025)


def test_round_start_defaults_to_last_arrival_minus_round_time_and_share_is_clipped():
    m = RunMetrics()
    # compute longer than the round (clock skew): share clips to 0, no negative transfer
    m.observe_round({"grad": result(0.5)}, round_s=0.4, update_s=0.0,
                    arrivals={"grad": 7.0}, point_bytes={"grad": 8}, grad_bytes={"grad": 8},
                    transport="ray")
    _, s = parse(m.text())
    assert val(s, "sampa_communication_share") == 0.0
    assert val(s, "sampa_transfer_seconds_sum", role="grad", direction="down",
               transport="ray") == 0.0
    assert val(s, "sampa_wait_seconds_sum", role="grad") == 0.0
    m.observe_round({"grad": result(0.1)}, round_s=0.4, update_s=0.0, arrivals={"grad": 9.0},
                    point_bytes={}, grad_bytes={}, transport="ray")
    _, s = parse(m.text())
    assert val(s, "sampa_transfer_seconds_sum", role="grad", direction="up",
               transport="ray") == pytest.approx(0.15)
    assert val(s, "sampa_communication_share") == pytest.approx(0.75)


def test_measured_transfer_split_is_used_as_given():
    m = RunMetrics()
    m.observe_round({"grad": result(0.1)}, 0.5, 0.0, {"grad": 1.5}, {"grad": 4}, {"grad": 4},
                    "grpc", started=1.0, transfer_split={"grad": (0.3, 0.1)})
    _, s = parse(m.text())
    assert val(s, "sampa_transfer_seconds_sum", role="grad", direction="down",
               transport="grpc") == pytest.approx(0.3)
    assert val(s, "sampa_transfer_seconds_sum", role="grad", direction="up",
               transport="grpc") == pytest.approx(0.1)


def test_update_counters_gauges_and_runs():
    m = RunMetrics()
    m.set_run("run-1", "sampa", "ray", "resnet20", "points")
    m.observe_update(0, 0, float("nan"), 0.1, {})  # bootstrap round: no update, no loss yet
    m.observe_update(1, 64, 2.5, 0.1, {"perturbed": 3.0, "extrapolated": 4.0})
    m.observe_update(3, 192, 2.0, 0.09, {})
    m.observe_eval("test", 0.25)
    m.observe_eval("train", 0.5)
    _, s = parse(m.text())
    assert val(s, "sampa_steps_total") == 3 and val(s, "sampa_samples_total") == 192
    assert val(s, "sampa_loss") == 2.0 and val(s, "sampa_lr") == 0.09
    assert val(s, "sampa_grad_norm", role="extrapolated") == 4.0
    assert val(s, "sampa_accuracy", split="test") == 0.25
    assert val(s, "sampa_accuracy", split="train") == 0.5
    assert val(s, "sampa_run_info", run_id="run-1", algorithm="sampa", transport="ray",
               model="resnet20", data_path="points") == 1
    # a second run on the same coordinator counts on top; the info names the new run only
    m.set_run("run-2", "sam", "ray", "resnet20")
    m.observe_update(2, 128, 1.0, 0.1, {})
    _, s = parse(m.text())
    assert val(s, "sampa_steps_total") == 5 and val(s, "sampa_samples_total") == 320
    infos = [ls for (n, ls) in s if n == "sampa_run_info"]
    assert len(infos) == 1 and dict(infos[0])["run_id"] == "run-2"


def test_every_metric_exists_with_low_cardinality_labels():
    m = RunMetrics()
    names, s = parse(m.text())
    unlabelled = {"sampa_worker_compute_seconds", "sampa_worker_copy_seconds",
                  "sampa_transfer_seconds", "sampa_transfer_bytes_total", "sampa_wait_seconds",
                  "sampa_accuracy", "sampa_grad_norm", "sampa_run",
                  "sampa_group_allreduce_seconds",
                  "sampa_group_allreduce_bytes_total"}  # none before a value
    assert set(METRIC_NAMES) - unlabelled <= names
    for name in ("sampa_worker_restarts_total", "sampa_retried_rounds_total",
                 "sampa_nonfinite_rounds_total", "sampa_steps_total"):
        assert val(s, name) == 0
    # every family name is prefixed and in base units
    for fam in text_string_to_metric_families(m.text()):
        assert fam.name.startswith("sampa_")
    m.observe_round({"ascent": result(0.1)}, 0.2, 0.0, {"ascent": 1.0}, {"ascent": 4},
                    {"ascent": 4}, "ray")
    m.observe_eval("test", 0.5)
    _, s = parse(m.text())
    assert val(s, "sampa_gradient_rounds_total") == 1
    allowed = {"role", "direction", "transport", "split", "le", "run_id", "algorithm", "model",
               "data_path"}
    assert {k for (_, ls) in s for k, _ in ls} <= allowed
    assert {n for (n, _) in s} <= exported_series_names()


def test_registries_are_separate_and_serve_on_loopback():
    a, b = RunMetrics(), RunMetrics()
    pa, pb = a.serve(), b.serve()  # port 0: any free port, each its own registry
    try:
        assert pa != pb and a.host == "127.0.0.1"
        a.observe_update(2, 32, 1.0, 0.1, {})
        _, sa = parse(scrape(pa))
        _, sb = parse(scrape(pb))
        assert val(sa, "sampa_steps_total") == 2 and val(sb, "sampa_steps_total") == 0
        with pytest.raises(RuntimeError):
            a.serve()
    finally:
        a.shutdown()
        b.shutdown()
    a.shutdown()  # idempotent
    with pytest.raises(urllib.error.URLError):
        scrape(pa)
    port = free_port()
    c = RunMetrics()
    try:
        assert c.serve("127.0.0.1", port) == port
    finally:
        c.shutdown()


def test_round_probe_feeds_round_update_and_train_accuracy():
    m = RunMetrics()
    probe = RoundProbe(m, transport="ray", norm_interval_s=3600)
    probe.begin_run("r", "sampa", "cnn", stats_role="extrapolated", batch_size=16)
    point = torch.zeros(10)
    for i, acc in enumerate((0.5, 1.0)):
        probe.dispatched([("perturbed", point), ("extrapolated", point)])
        probe.arrived("extrapolated")
        probe.arrived("perturbed")
        probe.round_done({"perturbed": result(0.01), "extrapolated": result(0.01,
                                                                             accuracy=acc)})
        probe.publish(round_s=0.05, update_s=0.001, step=i + 1, loss=1.0, lr=0.1)
    _, s = parse(m.text())
    assert val(s, "sampa_round_seconds_count") == 2
    assert val(s, "sampa_transfer_bytes_total", role="perturbed", direction="down",
               transport="ray") == 2 * 40
    assert val(s, "sampa_steps_total") == 2 and val(s, "sampa_samples_total") == 32
    assert val(s, "sampa_accuracy", split="train") == 0.75  # the epoch's mean so far
    # norms: taken on the first round, then not again within norm_interval_s
    assert val(s, "sampa_grad_norm", role="perturbed") == pytest.approx(2.0 * math.sqrt(10))
    probe.end_epoch()
    probe.publish(0.05, 0.001, 2, 1.0, 0.1)  # nothing new: no second observation of the round
    _, s = parse(m.text())
    assert val(s, "sampa_round_seconds_count") == 2


# -- the endpoint's port in result.json; gone with the coordinator --------------------------------
def test_fixed_metrics_port_is_reported_and_released(ray_local: None, tmp_path: Path):
    """The points data path: points down, gradients up through the coordinator; scraped from
    the progress callback while the coordinator is alive."""
    from sampa_ray.ray import run_ray

    port = free_port()
    cfg = make_config({"steps": 6, "batch_size": 32, "threads": 1, "backend": "ray",
                       "data_path": "points", "metrics_port": port})
    texts: list[str] = []
    scraped: list[str] = []

    def progress(ev: Event) -> None:
        if isinstance(ev, InfoEvent):
            texts.append(ev.text)
        elif isinstance(ev, RoundEvent) and ev.step >= 3 and not scraped:
            scraped.append(scrape(port))

    res = run_ray(cfg, tmp_path / "run", progress=progress)
    assert f"metrics: http://127.0.0.1:{port}/metrics" in texts
    assert res["metrics_port"] == port
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metrics_port"] == port
    assert cfg.hash() == cfg.model_copy(update={"metrics_port": 0}).hash()  # runtime only
    _, s = parse(scraped[0])
    vector = 4 * res["num_params"]  # one fp32 point or gradient
    for role in ("perturbed", "extrapolated"):
        for d in ("down", "up"):
            moved = val(s, "sampa_transfer_bytes_total", role=role, direction=d, transport="ray")
            assert moved > 0 and moved % vector == 0, (role, d, moved, vector)
        assert val(s, "sampa_grad_norm", role=role) > 0
    info = next(dict(ls) for (n, ls) in s if n == "sampa_run_info")
    assert info["data_path"] == "points" and info["transport"] == "ray"

    def released() -> bool:  # the coordinator's process is gone, and its endpoint with it
        try:
            scrape(port)
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
            return True  # refused, reset, or cut off mid-answer as the process went
        return False

    wait_for(released, 30, "the metrics port to be released")


def test_a_taken_metrics_port_is_one_clear_error(ray_local: None, tmp_path: Path):
    import socket

    from sampa_ray.errors import UserError
    from sampa_ray.ray import run_ray

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = make_config({"steps": 3, "threads": 1, "backend": "ray", "metrics_port": port})
        where = rf"^metrics_port: cannot listen on 127\.0\.0\.1:{port}: "
        with pytest.raises(UserError, match=where):
            run_ray(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_round_probe_on_the_replicated_path_counts_worker_to_worker_bytes():
    """The gradients stay with the workers: the facts carry their size and norm; each round a
    worker fetches its peer's gradient of the round before."""
    m = RunMetrics()
    probe = RoundProbe(m, transport="ray")
    probe.begin_run("r", "sampa", "cnn", "extrapolated", 8, transport="ray",
                    data_path="replicated")

    def kept(norm: float) -> GradResult:
        return GradResult(grad=torch.empty(0), loss=1.0, accuracy=0.5,
                          timings={"compute": 0.01, "copy_in": 0.0, "copy_out": 0.0},
                          norm=norm, nbytes=400)

    for first in (True, False):
        n = 0 if first else 1
        probe.dispatched_peers({"perturbed": n, "extrapolated": n})
        probe.arrived("perturbed")
        probe.arrived("extrapolated")
        probe.round_done({"perturbed": kept(3.0), "extrapolated": kept(4.0)}, fanout=1)
        probe.publish(0.05, 0.0, 1, 1.0, 0.1)
    _, s = parse(m.text())
    for role in ("perturbed", "extrapolated"):
        assert val(s, "sampa_transfer_bytes_total", role=role, direction="up",
                   transport="ray") == 2 * 400
        assert val(s, "sampa_transfer_bytes_total", role=role, direction="down",
                   transport="ray") == 400  # nothing to fetch in the first round
    assert val(s, "sampa_grad_norm", role="extrapolated") == 4.0  # as the worker reported
    info = next(dict(ls) for (n, ls) in s if n == "sampa_run_info")
    assert info["data_path"] == "replicated"
    # one worker in use (SGD, SAM): its gradient goes nowhere
    probe.dispatched_peers({"grad": 0})
    probe.arrived("grad")
    probe.round_done({"grad": kept(1.0)}, fanout=0)
    probe.publish(0.05, 0.0, 2, 1.0, 0.1)
    _, s = parse(m.text())
    assert val(s, "sampa_transfer_bytes_total", role="grad", direction="up",
               transport="ray") == 0


# -- a live run on Ray, scraped over HTTP ---------------------------------------------------------
class _Stop(Exception):
    pass


class LiveRun:
    """A SAMPa run on the embedded Ray instance in a background thread, on two role groups of
    two workers (so every series, the groups' all-reduce too, has values); stopped on request
    by raising from its progress callback."""

    def __init__(self, tmp: Path) -> None:
        self.cfg = make_config({"algo": "sampa", "model": "resnet20", "dataset": "synthetic",
                                "synthetic_size": 256, "batch_size": 16, "threads": 1,
                                "steps": 3000, "eval_every": 1, "backend": "ray",
                                "workers_per_role": 2})
        self.out = tmp / "live"
        self.events: list[Event] = []
        self.port: int | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _progress(self, ev: Event) -> None:
        self.events.append(ev)
        if isinstance(ev, InfoEvent):
            found = re.fullmatch(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", ev.text)
            if found:
                self.port = int(found.group(1))
        if self.stop.is_set():
            raise _Stop

    def _run(self) -> None:
        from sampa_ray.ray import run_ray

        try:
            run_ray(self.cfg, self.out, progress=self._progress)
        except BaseException as err:  # noqa: BLE001 - reported by the fixture
            self.error = err

    def running(self) -> bool:
        return self.thread.is_alive()


@pytest.fixture(scope="module")
def live(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    run = LiveRun(tmp_path_factory.mktemp("metrics"))
    run.thread.start()
    deadline = time.time() + 120
    while run.port is None and run.running() and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert run.port is not None, f"no metrics info event: {run.events[:5]} {run.error!r}"
        yield run
    finally:
        run.stop.set()
        run.thread.join(timeout=60)
        assert not run.thread.is_alive()
        assert run.error is None or isinstance(run.error, _Stop), repr(run.error)


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_live_run_is_scraped_over_http(live: LiveRun):
    def has_test_accuracy() -> bool:
        return ("sampa_accuracy", frozenset({("split", "test")})) in parse(scrape(live.port))[1]

    wait_for(has_test_accuracy, 60, "a test accuracy")
    fams1, s1 = parse(scrape(live.port))
    time.sleep(1.5)
    fams2, s2 = parse(scrape(live.port))
    assert live.running(), "the run ended before the scrapes"
    for name in METRIC_NAMES:
        assert name in fams2 or name + "_info" in fams2, name
    roles = ("perturbed", "extrapolated")
    from sampa_ray.task import make_model

    n = sum(p.numel() for p in make_model(live.cfg, 10).parameters())
    for role in roles:  # each worker of a group all-reduces the whole fp32 gradient
        rounds = total(s2, "sampa_group_allreduce_seconds_count", role=role)
        assert rounds >= 1 and total(s2, "sampa_group_allreduce_seconds_sum", role=role) > 0
        assert total(s2, "sampa_group_allreduce_bytes_total", role=role) == rounds * 4 * n
    for role in roles:
        assert total(s2, "sampa_worker_compute_seconds_sum", role=role) > 0
        assert total(s2, "sampa_worker_compute_seconds_count", role=role) >= 1
        assert total(s2, "sampa_worker_copy_seconds_count", role=role,
                     direction="host_to_device") >= 1
        assert total(s2, "sampa_transfer_seconds_sum", role=role, transport="ray") > 0
        assert total(s2, "sampa_wait_seconds_count", role=role) >= 1
        for d in ("down", "up"):
            b1 = total(s1, "sampa_transfer_bytes_total", role=role, direction=d)
            b2 = total(s2, "sampa_transfer_bytes_total", role=role, direction=d)
            assert b2 > b1 > 0 and b2 % 4 == 0  # fp32 payloads, growing
        assert val(s2, "sampa_grad_norm", role=role) > 0
    assert 0 <= val(s2, "sampa_communication_share") <= 1
    assert val(s2, "sampa_speedup_vs_sequential") > 0
    assert val(s2, "sampa_steps_total") > val(s1, "sampa_steps_total") > 0
    assert val(s2, "sampa_samples_total") == 16 * val(s2, "sampa_steps_total")
    # SAMPa: the bootstrap round, then one round per update (the scrape may fall between a
    # round and its update)
    assert 1 <= val(s2, "sampa_gradient_rounds_total") - val(s2, "sampa_steps_total") <= 2
    assert math.isfinite(val(s2, "sampa_loss"))
    assert 0 < val(s2, "sampa_lr") <= live.cfg.lr
    for split in ("train", "test"):
        assert 0 <= val(s2, "sampa_accuracy", split=split) <= 1
    assert val(s2, "sampa_round_seconds_count") > val(s1, "sampa_round_seconds_count")
    assert val(s2, "sampa_update_seconds_sum") > 0
    info = [dict(ls) for (n, ls) in s2 if n == "sampa_run_info"]
    assert len(info) == 1
    assert {k: info[0][k] for k in ("algorithm", "transport", "model", "data_path")} == {
        "algorithm": "sampa", "transport": "ray", "model": "resnet20",
        "data_path": live.cfg.resolved_data_path}
    for name in ("sampa_worker_restarts_total", "sampa_retried_rounds_total",
                 "sampa_nonfinite_rounds_total"):
        assert val(s2, name) == 0


# -- a real Prometheus server ---------------------------------------------------------------------
def require_prometheus() -> None:
    """A real Prometheus server is part of the test setup (scripts/setup.sh installs Debian's
    package); its absence is a failure, not a skip."""
    assert shutil.which("prometheus"), "prometheus missing: run scripts/setup.sh as root"


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, with Grafana's variables given values as
    Grafana would (all roles, a rate window of several 1 s scrapes); a ``label_values(m, l)``
    variable query becomes ``group by (l) (m)``."""
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        found = re.fullmatch(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", q or "")
        assert found, f"unsupported variable query {q!r}"
        exprs.append(f"group by ({found.group(2)}) ({found.group(1)})")
    subs = {"$__rate_interval": "10s", "$__interval": "2s", "${role}": ".+", "$role": ".+"}
    out = []
    for e in exprs:
        for k, v in subs.items():
            e = e.replace(k, v)
        assert "$" not in e, e
        out.append(e)
    return out


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:  # a bad query: Prometheus says why in the body
        return json.loads(err.read())


@pytest.fixture(scope="module")
def prometheus(live: LiveRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server scraping the live run's coordinator every second; always stopped."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: sampa\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{live.port}']\n")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.time() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


def test_prometheus_evaluates_every_dashboard_query(live: LiveRun, prometheus: str):
    require_prometheus()

    def up() -> bool:
        targets = api(prometheus, "/api/v1/targets")["data"]["activeTargets"]
        return any(t["health"] == "up" for t in targets)

    wait_for(up, 30, "the scrape target to be up")
    queries = dashboard_queries()
    assert len(queries) >= 20
    deadline = time.time() + 45
    while True:
        empty = []
        for q in queries:
            answer = api(prometheus, "/api/v1/query", query=q)
            assert answer["status"] == "success", (q, answer)
            if not answer["data"]["result"]:
                empty.append(q)
        if not empty:
            break
        assert time.time() < deadline, f"{len(empty)} queries still empty: {empty}"
        time.sleep(1)
    assert live.running(), "the run ended before the queries"
    share = api(prometheus, "/api/v1/query", query="sampa_communication_share")
    assert 0 <= float(share["data"]["result"][0]["value"][1]) <= 1
    steps = api(prometheus, "/api/v1/query", query="increase(sampa_steps_total[10s])")
    assert float(steps["data"]["result"][0]["value"][1]) > 0
