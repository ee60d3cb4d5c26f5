"""Failures during a run: a gradient worker killed mid-run, or hanging past the round deadline,
is restarted by Ray and the run reaches the parameters of an uninterrupted run. The
uninterrupted run is one local run shared by every test: on CPU the Ray backend reproduces it
bit for bit on every data path (test_ray_backend), and neither the data path nor the round
deadline changes a number."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
from conftest import assert_same_final, local_final
from conftest import run_with_fault as run_and_strike

from sampa_ray.config import make_config

pytestmark = pytest.mark.usefixtures("ray_local")

# 8 batches an epoch: the fault comes once step 6 is seen (on the free path, whose workers report
# a chunk of rounds at a time, step 8), with an epoch's evaluation and two whole epochs after it
STEPS = 24
BASE = {"algo": "sampa", "lam": 0.2, "model": "resnet20", "dataset": "synthetic",
        "synthetic_size": 128, "batch_size": 16, "steps": STEPS, "threads": 1,
        "backend": "ray", "momentum": 0.9}


def run_with_fault(tmp_path, fault, role: str, **over):
    """Apply ``fault(pid)`` to the worker of ``role`` (or to both) once step 6 is reached."""
    cfg = make_config({**BASE, **over})
    result, infos, pids = run_and_strike(
        cfg, tmp_path / "faulty", 6, fault,
        lambda pids: list(pids.values()) if role == "both" else [pids[role]])
    return result, infos, -1 if role == "both" else pids[role]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The final parameters and BatchNorm statistics of the uninterrupted run (local)."""
    return local_final(make_config({**BASE, "backend": "local"}),
                       tmp_path_factory.mktemp("clean"))


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("data_path,role", [("points", "extrapolated"),
                                            ("replicated", "perturbed"),
                                            ("collective", "extrapolated"),
                                            ("free", "perturbed")])
def test_killed_worker_is_restarted_and_trajectory_is_unchanged(tmp_path, ref, data_path,
                                                                role):
    result, infos, victim = run_with_fault(tmp_path, kill, role, data_path=data_path)
    assert result["steps"] == STEPS
    assert result["worker_restarts"] >= 1 and result["retried_rounds"] >= 1
    assert any(f"worker {role} restarted" in i for i in infos)
    new_pid = next(w["pid"] for w in result["workers"] if w["name"] == role)
    assert new_pid != victim
    assert_same_final(tmp_path / "faulty", ref)


def test_both_workers_killed_at_once_on_the_free_path(tmp_path, ref):
    """Both workers SIGKILLed together mid-chunk: every worker that is down comes back, the
    group is formed anew, the rounds since the last snapshot are replayed, the result is
    unchanged."""
    result, infos, _ = run_with_fault(tmp_path, kill, "both", data_path="free")
    assert result["steps"] == STEPS and result["worker_restarts"] >= 2
    assert result["collective"]["backend"] == "gloo"
    assert_same_final(tmp_path / "faulty", ref)


@pytest.mark.parametrize("data_path", ["points", "free"])
def test_hanging_worker_is_restarted_after_the_deadline(tmp_path, ref, data_path):
    """On the free path the frozen worker's peer is stuck in the exchange with it until the
    process group's deadline; the frozen one then has one round deadline, which names it, and
    the group is formed anew with its replacement (the collective path shares the exchange)."""
    stopped: list[int] = []

    def hang(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)  # alive but silent: only the deadline notices
        stopped.append(pid)

    try:
        result, infos, _ = run_with_fault(tmp_path, hang, "extrapolated", data_path=data_path,
                                          round_timeout=4.0)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert result["steps"] == STEPS and result["worker_restarts"] >= 1
    assert any("missed the 4s deadline" in i or "restarted" in i for i in infos)
    assert_same_final(tmp_path / "faulty", ref)
