"""A soak run: one training run of real ``sampa-ray train`` processes that suffers every kind of
fault this system recovers from, in a seeded random order — a worker SIGKILLed, a worker frozen
(SIGSTOP) past the round deadline, the coordinator SIGKILLed (the driver starts a new one from
the newest checkpoint), and the whole command stopped (SIGTERM) and submitted again with
``--resume auto`` — and still ends, exit 0, on exactly the parameters of an uninterrupted run.
Bounded in time: every wait has a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_final

from sampa_ray import signals
from sampa_ray.checkpoint import list_checkpoints
from sampa_ray.config import make_config
from sampa_ray.local import run_local

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

SEED = 20261202
# Each fault waits for one new checkpoint (every 20 steps) after it: about 100 steps are done
# when the last fault comes, so 300 leaves the run going through all of them.
STEPS = 300
RUN = ["--steps", str(STEPS), "--model", "mlp", "--batch-size", "32", "--threads", "1",
       "--device", "cpu", "--checkpoint-every", "20", "--round-timeout", "5",
       "--max-restarts", "5", "--link-latency-ms", "3", "--resume", "auto"]


def _start(out: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sampa_ray.cli", "train", *RUN, "--out",
                             str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"), start_new_session=True)


def _newest(out: Path) -> int:
    ckpts = list_checkpoints(out / "checkpoints")
    return int(ckpts[-1].stem.split("-")[1]) if ckpts else 0


def _progress(out: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Wait until a checkpoint newer than the newest one now is written."""
    start = _newest(out)
    deadline = time.monotonic() + timeout
    while _newest(out) <= start:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no progress:\n" + log.read_text()[-3000:]
        time.sleep(0.1)


def _pids(proc: subprocess.Popen[bytes], what: str) -> list[int]:
    out = []
    for pid in signals.descendants(proc.pid) or []:
        with contextlib.suppress(OSError):
            if what in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                out.append(pid)
    return out


def test_a_run_through_every_fault_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    faults = ["kill worker", "freeze worker", "kill coordinator", "stop and resubmit"]
    rng.shuffle(faults)
    # the process that ends (exit 0) is one whose coordinator was replaced: the driver goes on
    # to write the outputs after it (SEED gives kill worker, stop, kill coordinator, freeze)
    assert faults.index("kill coordinator") > faults.index("stop and resubmit"), faults
    out, log = tmp_path / "soak", tmp_path / "soak.log"
    frozen: list[int] = []
    proc = _start(out, log)
    try:
        _progress(out, proc, log, timeout=180)
        for fault in faults:
            if fault == "stop and resubmit":
                os.kill(proc.pid, signal.SIGTERM)  # stopped ...
                assert proc.wait(60) == 143, log.read_text()[-3000:]
                assert 0 < _newest(out) < STEPS
                proc = _start(out, log)  # ... and submitted again
            elif fault == "kill coordinator":
                (pid,) = _pids(proc, "ray::Coordinator")
                os.kill(pid, signal.SIGKILL)
            else:
                pid = rng.choice(_pids(proc, "ray::GradientWorker"))
                os.kill(pid, signal.SIGKILL if fault == "kill worker" else signal.SIGSTOP)
                if fault == "freeze worker":
                    frozen.append(pid)
            _progress(out, proc, log, timeout=180)  # recovered: the run goes on
        assert proc.wait(300) == 0, log.read_text()[-3000:]
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "missed the 5s deadline" in text, text
    assert "the coordinator died; a new one continues from its newest checkpoint" in text, text
    assert json.loads((out / "result.json").read_text())["steps"] == STEPS
    ref = make_config({"steps": STEPS, "model": "mlp", "batch_size": 32, "threads": 1,
                       "device": "cpu", "backend": "local"})
    run_local(ref, tmp_path / "reference")
    assert_same_final(out, tmp_path / "reference")
