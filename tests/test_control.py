"""The coordinator's control API on a live Ray run: status, progress, checkpoint, stop, health.
Real gRPC server inside the coordinator actor, real channels on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest
from conftest import assert_same_final
from conftest import start_run as start_ray_run
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sampa_ray.config import make_config
from sampa_ray.transport.grpc.client import get_status, request_checkpoint, request_stop, watch

pytestmark = pytest.mark.usefixtures("ray_local")


def start_run(tmp_path, **over):
    """A SAMPa run of ResNet-20 on Ray with the gRPC transport into ``tmp_path / "run"``."""
    cfg = make_config({"algo": "sampa", "model": "resnet20", "dataset": "synthetic",
                       "synthetic_size": 256, "batch_size": 16, "steps": 400, "threads": 1,
                       "backend": "ray", "transport": "grpc", **over})
    return start_ray_run(cfg, tmp_path / "run", timeout=120)


def wait_step(target, at_least, timeout=120, **auth):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = get_status(target, **auth)
        if st["step"] >= at_least:
            return st
        time.sleep(0.2)
    raise TimeoutError(f"step {at_least} not reached")


def test_status_watch_stall_checkpoint_stop(tmp_path):
    """One live run through the whole control API: status and watch (every watched event
    carries total, epoch and loss; the status has the test accuracy of the evaluations and
    strict JSON), the transfer metrics and health, a frozen (SIGSTOPped) worker that makes the
    status say the run is stalled and which worker it waits on instead of "alive", a checkpoint
    on demand, and a stop; then the client says the server is gone."""
    import math
    import os
    import signal
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    t, box, target = start_run(tmp_path)  # 256 / 16: 16 batches an epoch, evaluated each
    s1 = wait_step(target, 3)
    s2 = wait_step(target, s1["step"] + 3)
    assert s2["step"] > s1["step"] and s2["algorithm"] == "sampa"
    assert s2["transport"] == "grpc" and s2["total_steps"] == 400 and s2["state"] == "running"
    assert len(s2["workers"]) == 2 and all(w["pid"] > 0 for w in s2["workers"])
    # the gRPC transport counts the gradients it carried up, not only the points down
    text = urllib.request.urlopen(f"http://127.0.0.1:{s2['metrics_port']}/metrics").read()
    moved = {(s.labels["role"], s.labels["direction"]): s.value
             for fam in text_string_to_metric_families(text.decode())
             for s in fam.samples if s.name == "sampa_transfer_bytes_total"
             and s.labels.get("transport") == "grpc"}
    assert moved and all(v > 0 for v in moved.values()), moved
    assert {d for _, d in moved} == {"up", "down"}
    # health: SERVING during the run
    with grpc.insecure_channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # the accuracy of the first evaluation (step 16)
    deadline = time.time() + 120
    while not math.isfinite((st := get_status(target))["accuracy"]):
        assert time.time() < deadline and t.is_alive(), box.get("error")
        time.sleep(0.2)
    assert 0.0 <= st["accuracy"] <= 1.0 and st["step"] >= 16
    # progress events advance, each complete
    rounds = [ev for ev in watch(target, n_events=8, timeout=60) if ev["kind"] == "round"]
    steps = [ev["step"] for ev in rounds]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] > steps[0]
    for ev in rounds:
        assert ev["total"] == 400 and ev["epoch"] == pytest.approx(ev["step"] / 16)
        assert ev["loss"] > 0 and ev["test_accuracy"] is not None
        assert ev["accuracy"] is not None and 0.0 <= ev["accuracy"] <= 1.0  # training's
    # the CLI client too, in another process
    p = subprocess.run([sys.executable, "-m", "sampa_ray.cli", "status", "--target", target,
                        "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert got["step"] >= s2["step"]
    assert got["state"] == "running" and not got["stalled"]
    assert {w["state"] for w in got["workers"]} <= {"idle", "computing"}
    # a frozen worker: stalled, and which one
    frozen = st["workers"][0]["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        deadline = time.time() + 120
        while not (st := get_status(target))["stalled"]:
            assert time.time() < deadline, st
            time.sleep(0.5)
        by_pid = {w["pid"]: w for w in st["workers"]}
        assert by_pid[frozen]["state"] == "stalled" and by_pid[frozen]["busy_seconds"] > 0
        assert st["round_age_seconds"] >= by_pid[frozen]["busy_seconds"] - 1.0
        p = subprocess.run([sys.executable, "-m", "sampa_ray.cli", "status", "--target",
                            target], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "STALLED" in p.stdout and ": stalled for" in p.stdout
    finally:
        os.kill(frozen, signal.SIGCONT)
    # a checkpoint on demand
    path = request_checkpoint(target)["path"]
    assert path.endswith(".pt") and (tmp_path / "run" / "checkpoints").is_dir()
    # stop: finish the round, write outputs, end cleanly
    assert request_stop(target)["accepted"]
    t.join(timeout=120)
    assert not t.is_alive() and "error" not in box, box.get("error")
    result = box["result"]
    assert result["stopped_early"] and 0 < result["steps"] < 400
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["steps"] == result["steps"] and saved["control_port"] == int(target.split(":")[1])
    assert (tmp_path / "run" / "final.pt").exists()
    # the server is gone with the run: the client says so in one line, exit 2
    p = subprocess.run([sys.executable, "-m", "sampa_ray.cli", "status", "--target", target],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("sampa-ray: target: cannot reach")


def test_control_api_with_tls_and_token(tmp_path):
    """TLS with a self-signed pair made here, and a bearer token: the workers' data plane and
    the clients both go through them; a client without the token is refused."""
    from sampa_ray.errors import UserError

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    t, box, target = start_run(tmp_path, control_cert=str(cert), control_key=str(key),
                               token_file=str(token_file), steps=200)
    ca = cert.read_bytes()
    st = wait_step(target, 2, token="s3cret-token", root_cert=ca)
    assert st["transport"] == "grpc" and st["state"] == "running"
    with pytest.raises(UserError, match="UNAUTHENTICATED|unauthenticated|token"):
        get_status(target, token="wrong", root_cert=ca)
    with pytest.raises(UserError):
        get_status(target)  # plain text against a TLS server
    assert request_stop(target, token="s3cret-token", root_cert=ca)["accepted"]
    t.join(timeout=120)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert box["result"]["stopped_early"] and box["result"]["steps"] > 0


@pytest.mark.parametrize("data_path", ["collective", "free"])
def test_checkpoint_and_stop_while_rounds_run_ahead(tmp_path, data_path):
    """The collective path queues each round behind the one in flight; the free path's
    workers run chunks of rounds, the next queued behind the one running. A checkpoint asked
    for and a stop still give the state and BatchNorm statistics of one and the same update:
    each equals a local run of exactly that many updates (constant learning rate, so a shorter
    run follows the same trajectory)."""

    from sampa_ray.checkpoint import list_checkpoints, load_checkpoint
    from sampa_ray.local import run_local

    over = {"transport": "ray", "data_path": data_path, "lr_schedule": "constant",
            "lam": 0.2, "checkpoint_every": 0, "keep_checkpoints": 5}
    t, box, target = start_run(tmp_path, **over)
    wait_step(target, 4)
    request_checkpoint(target)
    assert request_stop(target)["accepted"]
    t.join(timeout=120)
    assert not t.is_alive() and "error" not in box, box.get("error")
    result = box["result"]
    assert result["stopped_early"] and result["collective"]["backend"] == "gloo"
    ckpts = [load_checkpoint(p) for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    first = min(ckpts, key=lambda c: c.step)
    assert 4 <= first.step < result["steps"]
    base = {"algo": "sampa", "model": "resnet20", "dataset": "synthetic", "synthetic_size": 256,
            "batch_size": 16, "threads": 1, "backend": "local", "lr_schedule": "constant",
            "lam": 0.2}
    for steps, x, buffers in ((first.step, first.tensors["x"], first.buffers[1]),
                              (result["steps"], None, None)):
        out = tmp_path / f"local{steps}"
        run_local(make_config({**base, "steps": steps}), out)
        if x is None:  # the stop: the run's own final.pt
            assert_same_final(tmp_path / "run", out, steps)
        else:
            assert_same_final({"x": x, "buffers": buffers}, out, steps)
