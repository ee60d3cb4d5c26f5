"""Signals end a run with our own line and exit code, and leave no process of the run behind:
SIGTERM to the CLI alone (docker stop, Kubernetes) and to its whole process group (systemd, a
shell's job control), Ctrl-C twice, and a killed coordinator with no restarts left. Real
``sampa-ray train`` processes on an embedded Ray instance; what is checked is exit codes, the last
stderr line, and which of the run's processes are still there afterwards. (A killed coordinator
that is replaced, the run ending with exit 0 on the uninterrupted run's parameters: test_soak.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sampa_ray import signals

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

CLI = [sys.executable, "-m", "sampa_ray.cli", "train"]
TINY = ["--steps", "100000", "--model", "mlp", "--batch-size", "32", "--threads", "1",
        "--device", "cpu"]
TRAIN_STEPS_PER_EPOCH = 1437 // 32  # digits' training images, batches of 32


class Run:
    """A ``sampa-ray train`` in its own session (so it can be signalled as a process group),
    its stderr read line by line as it comes."""

    def __init__(self, tmp: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="120")
        self.out = tmp / "run"
        self.proc = subprocess.Popen([*CLI, *TINY, "--out", str(self.out), *args], cwd=tmp,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, "\n".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "\n".join(self.lines)
            time.sleep(0.1)

    def processes(self) -> dict[int, str]:
        """The run's processes below the CLI: pid -> command line."""
        out = {}
        for pid in signals.descendants(self.proc.pid) or []:
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
        return out

    def finish(self, timeout: float = 120) -> tuple[int, list[str]]:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        return rc, [line for line in self.lines if line.strip()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def _survivors(procs: dict[int, str], grace_s: float = 10.0) -> dict[int, str]:
    """Which of ``procs`` still run ``grace_s`` seconds after the CLI ended."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.2)
    return {p: cmd for p, cmd in procs.items() if _alive(p)}


def _started(tmp: Path, *args: str) -> tuple[Run, dict[int, str]]:
    run = Run(tmp, *args)
    run.wait_for("[sampa] epoch")  # the workers train: every process of the run is up
    procs = run.processes()
    assert any("raylet" in c for c in procs.values()) and \
        sum("ray::" in c or "default_worker" in c for c in procs.values()) >= 3, procs
    return run, procs


def _ends_with(run: Run, procs: dict[int, str], rc: int, last: str,
               detail: re.Pattern[str] | None = None) -> None:
    """The command ended with ``rc`` and our line ``last`` (then ``detail``), and none of
    ``procs`` outlived it."""
    code, lines = run.finish()
    assert code == rc, "\n".join(lines)
    _assert_ours(lines, last, detail)
    assert _survivors(procs) == {}


def _kill_coordinator_after_a_checkpoint(run: Run, procs: dict[int, str]) -> None:
    """SIGKILL the run's coordinator once its first checkpoint is on disk."""
    deadline = time.monotonic() + 60
    while not list((run.out / "checkpoints").glob("ckpt-*.json")):
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.1)
    coord = [p for p, cmd in procs.items() if "ray::Coordinator" in cmd]
    assert len(coord) == 1, procs
    os.kill(coord[0], signal.SIGKILL)


#: the end of the line of a run stopped before its first checkpoint (``--checkpoint-interval-s``
#: is 600 s by default: the runs here write none)
NOTHING_TO_RESUME = re.compile(r" at step [1-9]\d*; no checkpoint was written, so nothing can "
                               r"be resumed \(use --checkpoint-every N or "
                               r"--checkpoint-interval-s S\)")


def _assert_ours(lines: list[str], last: str, detail: re.Pattern[str] | None = None) -> None:
    """The last line is ``last``, followed by what ``detail`` matches where given."""
    text = "\n".join(lines)
    assert lines and lines[-1].startswith(last), text
    rest = lines[-1][len(last):]
    assert (detail.fullmatch(rest) if detail is not None else rest == ""), text
    for dump in ("SIGTERM received", "PC: @", "Traceback", "*** ", "logging.cc"):
        assert dump not in text, text


@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_ends_the_run_with_our_line_and_no_process_left(tmp_path: Path,
                                                                 target: str) -> None:
    run, procs = _started(tmp_path)
    if target == "process":  # docker stop, Kubernetes: the main process only
        os.kill(run.proc.pid, signal.SIGTERM)
    else:  # systemd, a shell's job control: every process of the group at once
        os.killpg(run.proc.pid, signal.SIGTERM)
    _ends_with(run, procs, 143, "sampa-ray: terminated", NOTHING_TO_RESUME)


def test_ctrl_c_twice_ends_at_once_with_no_process_left(tmp_path: Path) -> None:
    run, procs = _started(tmp_path)
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    time.sleep(0.3)
    os.killpg(run.proc.pid, signal.SIGINT)
    # the second signal ends it at once, with the word alone (or, when the first one's clean
    # shutdown was quicker, with what it left)
    either = re.compile(f"|{NOTHING_TO_RESUME.pattern}")
    _ends_with(run, procs, 130, "sampa-ray: interrupted", either)


def test_a_killed_coordinator_says_resume_continues(tmp_path: Path) -> None:
    """With no restarts left (``--max-restarts 0``), a lost coordinator ends the run with one
    line saying how to go on."""
    run, procs = _started(tmp_path, "--checkpoint-every", "20", "--max-restarts", "0")
    _kill_coordinator_after_a_checkpoint(run, procs)
    rc, lines = run.finish()
    assert rc == 1, "\n".join(lines)
    line = lines[-1]
    assert line.startswith("sampa-ray: the coordinator died"), "\n".join(lines)
    assert f"--resume {run.out}" in line
    assert not any("Traceback" in x or "ActorDiedError" in x for x in lines), "\n".join(lines)
    assert _survivors(procs) == {}


def test_sigterm_on_the_local_backend(tmp_path: Path) -> None:
    run = Run(tmp_path, "--backend", "local")
    run.wait_for("[sampa] epoch")
    os.kill(run.proc.pid, signal.SIGTERM)
    rc, lines = run.finish()
    assert rc == 143
    _assert_ours(lines, "sampa-ray: terminated", NOTHING_TO_RESUME)


def test_ctrl_c_without_a_checkpoint_says_nothing_can_be_resumed(tmp_path: Path) -> None:
    """Time-based checkpoints off and none by count: Ctrl-C says at which step the run stood
    and that nothing of it can be resumed."""
    run = Run(tmp_path, "--backend", "local", "--checkpoint-interval-s", "0")
    run.wait_for("[sampa] epoch")
    os.kill(run.proc.pid, signal.SIGINT)
    rc, lines = run.finish()
    assert rc == 130
    _assert_ours(lines, "sampa-ray: interrupted", NOTHING_TO_RESUME)
    step = int(lines[-1].split(" at step ")[1].split(";")[0])
    assert step >= TRAIN_STEPS_PER_EPOCH  # past the first epoch's end, which it waited for
    assert not list(run.out.glob("checkpoints/ckpt-*"))


def test_ctrl_c_after_a_checkpoint_names_the_resume_command(tmp_path: Path) -> None:
    """With a checkpoint on disk, Ctrl-C names the command that continues the run, and the
    step it continues from: the newest checkpoint's."""
    run = Run(tmp_path, "--backend", "local", "--checkpoint-interval-s", "0.5")
    deadline = time.monotonic() + 120
    while not list(run.out.glob("checkpoints/ckpt-*.json")):
        assert run.proc.poll() is None and time.monotonic() < deadline, "\n".join(run.lines)
        time.sleep(0.1)
    os.kill(run.proc.pid, signal.SIGINT)
    rc, lines = run.finish()
    assert rc == 130
    saved = max(int(p.stem.removeprefix("ckpt-")) for p in run.out.glob("checkpoints/*.json"))
    detail = re.compile(rf" at step (\d+); `sampa-ray train --resume {re.escape(str(run.out))}` "
                        rf"continues from its checkpoint at step {saved}")
    _assert_ours(lines, "sampa-ray: interrupted", detail)
    assert int(detail.fullmatch(lines[-1].removeprefix("sampa-ray: interrupted"))[1]) >= saved


# -- the mechanism, in this process -------------------------------------------------------------
def test_a_signal_inside_handling_raises_terminated_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with signals.handling():
        with pytest.raises(signals.Terminated) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert caught.value.exit_code == 143 and caught.value.line == "sampa-ray: terminated"
        assert signals.received() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_clean_up_is_not_cut_short_by_a_first_signal() -> None:
    steps = []
    with signals.handling(), pytest.raises(signals.Terminated), signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        steps.append("after the signal")  # still runs
    assert steps == ["after the signal"]


def test_descendants_lists_children_and_grandchildren() -> None:
    inner = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
            "'import time; time.sleep(30)']); time.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", inner])
    try:
        deadline = time.monotonic() + 20
        while len(signals.descendants(p.pid) or []) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.pid in (signals.descendants() or [])
        kids = signals.descendants(p.pid) or []
        assert len(kids) == 1 and signals.descendants(kids[0]) == []
    finally:
        for pid in [*(signals.descendants(p.pid) or []), p.pid]:
            os.kill(pid, signal.SIGKILL)
        p.wait()
