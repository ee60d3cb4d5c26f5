"""What the control API says, without a cluster: the live picture built from the loop's events
(every event complete, the accuracy from evaluations, a stalled worker called stalled), valid
JSON where a number is missing, and the control commands' flags (``--timeout`` honoured by every
command, and only positive)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sampa_ray.cli.control import json_safe
from sampa_ray.events import EpochEvent, EvalEvent, Event, InfoEvent, RoundEvent
from sampa_ray.ray import live
from sampa_ray.transport.grpc.client import message_dict
from sampa_ray.transport.grpc.control_plane import event_message, status_message

INFOS = [{"name": "perturbed", "pid": 11, "device": "cpu"},
         {"name": "extrapolated", "pid": 12, "device": "cpu"}]


def _run(**over: object) -> dict:
    d: dict = {"state": "starting"}
    live.begin_run(d, "sampa", 2000, 44, "abc")
    d.update(over)
    return d


def test_every_event_carries_total_epoch_and_loss() -> None:
    d = _run()
    ev = live.on_event(d, RoundEvent(step=88, total=2000, loss=0.25, round_s=0.01))
    assert ev["epoch"] == pytest.approx(2.0) and ev["total"] == 2000
    ev = live.on_event(d, EpochEvent(epoch=2.0, step=88, lr=0.1, wall_s=1.0, train_loss=0.3,
                                     train_accuracy=0.9))
    assert (ev["total"], ev["epoch"], ev["loss"]) == (2000, 2.0, 0.3)
    assert "test_accuracy" not in ev  # none known yet
    live.on_event(d, EvalEvent(step=88, test_accuracy=0.93, test_loss=0.2))
    ev = live.on_event(d, InfoEvent(text="worker perturbed restarted"))
    assert ev["total"] == 2000 and ev["test_accuracy"] == 0.93 and ev["loss"] == 0.25
    # and through the wire: nothing left at the zero defaults
    got = message_dict(event_message(live.on_event(d, RoundEvent(step=132, total=2000,
                                                                 loss=0.2, round_s=0.01))))
    assert got["total"] == 2000 and got["epoch"] == pytest.approx(3.0)
    assert got["loss"] == pytest.approx(0.2) and got["test_accuracy"] == pytest.approx(0.93)


def test_watched_events_carry_the_training_accuracy(tmp_path: Path) -> None:
    """A real (local) run's events as ``watch`` receives them: a round carries its batch's
    training accuracy (not 0.0), an epoch the epoch's mean, and the round values average to
    exactly that mean; before the first round there is none (null), not 0.0."""
    from sampa_ray.config import make_config
    from sampa_ray.local import run_local

    events: list[Event] = []
    cfg = make_config({"algo": "sgd", "steps": 44, "batch_size": 64, "threads": 1,
                       "backend": "local", "lr_schedule": "constant", "lr": 0.1})
    result = run_local(cfg, tmp_path / "run", progress=events.append)
    d = _run()
    info = message_dict(event_message(live.on_event(d, InfoEvent(text="hello"))))
    assert info["accuracy"] is None
    wire = [message_dict(event_message(live.on_event(d, ev))) for ev in events
            if isinstance(ev, RoundEvent | EpochEvent)]
    rounds = [ev for ev in wire if ev["kind"] == "round"]
    epochs = [ev for ev in wire if ev["kind"] == "epoch"]
    assert len(rounds) == 44 and len(epochs) == 2
    assert all(ev["accuracy"] is not None and 0.0 <= ev["accuracy"] <= 1.0 for ev in rounds)
    for k, row in enumerate(result["epochs"]):
        mine = [ev["accuracy"] for ev in rounds[22 * k:22 * (k + 1)]]
        assert sum(mine) / len(mine) == pytest.approx(row["train_accuracy"], abs=1e-6)
        assert epochs[k]["accuracy"] == pytest.approx(row["train_accuracy"])
    assert result["epochs"][-1]["train_accuracy"] > 0.8  # trained: far from the 0.0 it showed
    assert sum(ev["accuracy"] for ev in rounds[-5:]) / 5 > 0.8
    # ``watch --json`` prints them as they come
    assert json.loads(json.dumps(json_safe(rounds[-1])))["accuracy"] == rounds[-1]["accuracy"]
    # the text form shows it too
    from sampa_ray.cli.control import _event_line

    assert f"acc {rounds[-1]['accuracy']:.4g}" in _event_line(rounds[-1])


def test_status_takes_the_accuracy_from_evaluations() -> None:
    d = _run()
    st = live.status(d, INFOS, lambda slot: None)
    assert math.isnan(st["accuracy"]) and math.isnan(st["loss"])  # nothing measured yet
    live.on_event(d, EvalEvent(step=44, test_accuracy=0.91, test_loss=0.3))
    assert live.status(d, INFOS, lambda slot: None)["accuracy"] == 0.91
    live.begin_run(d, "sgd", 100, 44, "abc")  # the next run of a comparison starts afresh
    assert math.isnan(live.status(d, INFOS, lambda slot: None)["accuracy"])


def test_a_frozen_worker_is_stalled_not_alive() -> None:
    d = _run()
    live.on_event(d, RoundEvent(step=5, total=2000, loss=1.0, round_s=0.02))
    st = live.status(d, INFOS, lambda slot: {0: 0.01}.get(slot))
    assert [w["state"] for w in st["workers"]] == ["computing", "idle"]
    assert not st["stalled"] and st["round_age_seconds"] < live.STALL_MIN_S
    d["round_at"] = time.monotonic() - 60  # a minute without a finished round
    wait = 60.0
    st = live.status(d, INFOS, lambda slot: {0: wait}.get(slot))
    assert st["stalled"] and st["round_age_seconds"] >= 60
    assert [w["state"] for w in st["workers"]] == ["stalled", "idle"]
    assert st["workers"][0]["busy_seconds"] == wait
    # what the client receives
    got = message_dict(status_message({**st, "transport": "ray", "metrics_port": 0}))
    assert got["stalled"] and got["workers"][0]["state"] == "stalled"
    assert got["round_age_seconds"] >= 60 and got["workers"][0]["busy_seconds"] == wait
    d["state"] = "finished"
    st = live.status(d, INFOS, lambda slot: 99.0)
    assert not st["stalled"] and {w["state"] for w in st["workers"]} == {"idle"}


def test_json_has_null_where_a_number_is_missing() -> None:
    st = {"loss": math.nan, "accuracy": math.inf, "step": 3,
          "workers": [{"busy_seconds": -math.inf}]}
    text = json.dumps(json_safe(st), allow_nan=False)
    assert json.loads(text) == {"loss": None, "accuracy": None, "step": 3,
                                "workers": [{"busy_seconds": None}]}


# -- the control commands' flags ---------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SAMPA_RAY_TOKEN"}
    return subprocess.run([sys.executable, "-m", "sampa_ray.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path.cwd())


def _all(cmds: list[tuple[str, ...]]) -> dict[tuple[str, ...], subprocess.CompletedProcess[str]]:
    """Each command line's result, two at a time: a control command is mostly the interpreter
    importing (one core each), and this machine has two."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(cmds, pool.map(lambda c: _cli(*c), cmds), strict=True))


NOT_POSITIVE = [("status", "-1"), ("watch", "-1"), ("checkpoint", "-1"), ("stop", "-1"),
                ("status", "0"), ("status", "nan"), ("status", "soon")]
COMMANDS = ["status", "watch", "checkpoint", "stop"]


@pytest.fixture(scope="module")
def not_positive() -> dict[tuple[str, ...], subprocess.CompletedProcess[str]]:
    return _all([(c, "--target", "127.0.0.1:9", "--timeout", t) for c, t in NOT_POSITIVE])


@pytest.mark.parametrize(("command", "timeout"), NOT_POSITIVE)
def test_timeout_must_be_positive_seconds(command: str, timeout: str,
                                          not_positive: dict) -> None:
    proc = not_positive[(command, "--target", "127.0.0.1:9", "--timeout", timeout)]
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "--timeout" in lines[0], proc.stderr


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (no gRPC behind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def given_up(silent_port: int) -> dict[tuple[str, ...], subprocess.CompletedProcess[str]]:
    return _all([(c, "--target", f"127.0.0.1:{silent_port}", "--timeout", "1")
                 for c in COMMANDS])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_gives_up_within_its_timeout(command: str, silent_port: int,
                                                   given_up: dict) -> None:
    proc = given_up[(command, "--target", f"127.0.0.1:{silent_port}", "--timeout", "1")]
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"sampa-ray: target: cannot reach 127.0.0.1:{silent_port} "
                                   "(no answer within 1s)"), proc.stderr


@contextlib.contextmanager
def _control_server(d: dict) -> Iterator[int]:
    """A real control server (gRPC, loopback) whose status is the live picture ``d``; yields
    its port."""
    from conftest import LoopThread

    from sampa_ray.transport.grpc.server import start_server, stop_server

    class Handler:
        def status(self) -> dict:
            return {**live.status(d, INFOS, lambda slot: None), "transport": "ray",
                    "metrics_port": 0}

    lt = LoopThread()
    try:
        server, port = lt.run(start_server(None, Handler()))
        try:
            yield port
        finally:
            lt.run(stop_server(server, 0))
    finally:
        lt.close()


def test_status_json_and_text_from_a_real_server_with_no_numbers_yet() -> None:
    """``status --json`` is valid JSON (null, not NaN) and the text shows ``-``, against a real
    control server whose run has no loss or accuracy yet."""
    with _control_server(_run()) as port:
        proc = _cli("status", "--target", f"127.0.0.1:{port}", "--json")
        assert proc.returncode == 0, proc.stderr
        st = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"bare {c}"))
        assert st["loss"] is None and st["accuracy"] is None and st["total_steps"] == 2000
        proc = _cli("status", "--target", f"127.0.0.1:{port}")
        assert proc.returncode == 0, proc.stderr
        assert "loss -  accuracy -" in proc.stdout and "nan" not in proc.stdout.lower()
        assert "last round" in proc.stdout


def test_status_into_a_pipe_closed_early_ends_quietly() -> None:
    """``sampa-ray status ... | head -1``, with the reader gone before the first line: exit
    141 (128 + SIGPIPE), nothing on stderr (no BrokenPipeError traceback); with a reader
    there, the same command prints its lines and exits 0."""
    with _control_server(_run()) as port:
        for args in (["--json"], []):
            r, w = os.pipe()
            os.close(r)  # the reader has gone
            env = {k: v for k, v in os.environ.items() if k != "SAMPA_RAY_TOKEN"}
            try:
                proc = subprocess.run([sys.executable, "-m", "sampa_ray.cli", "status",
                                       "--target", f"127.0.0.1:{port}", *args], stdout=w,
                                      stderr=subprocess.PIPE, text=True, timeout=120, env=env)
            finally:
                os.close(w)
            assert (proc.returncode, proc.stderr) == (141, ""), proc.stderr
        proc = _cli("status", "--target", f"127.0.0.1:{port}")
        assert proc.returncode == 0 and proc.stdout.startswith("run abc  sampa"), proc.stderr
