"""Ending on a signal: Ctrl-C (SIGINT) and SIGTERM (what ``docker stop``, Kubernetes, systemd and
``ray job stop`` send) take one clean path, and the command ends with one line of ours:
``sampa-ray: interrupted`` (exit 130) or ``sampa-ray: terminated`` (exit 143).

Inside :func:`handling` (the CLI's commands), the first signal raises :class:`Terminated` (a
``KeyboardInterrupt``, so every ``finally`` runs) in the main thread. The Ray driver then ends
the coordinator and frees its placement group, or, when it runs an embedded Ray instance,
ends that instance's processes itself (:func:`end_processes`): a signal sent to the process
group reached them too, the GCS may be gone already, and Ray's own shutdown would wait out its
timeouts talking to it; the command then leaves without Ray's exit handlers (:func:`exit_now`).
A second signal while that runs means "now": every process this one started is killed and it
exits at once with the same line, so none outlives the command.

``ray.init`` installs its own SIGTERM handler, and Ray's C++ core one that prints a stack dump;
:func:`install` runs again after ``ray.init`` to put ours back (``sampa_ray.ray.driver``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

#: exit codes of the usual shell convention, 128 + the signal's number
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}

_received: int | None = None  # the first signal seen, once one was
_active = False  # inside handling(): our handlers are the process's
_deferring = 0  # inside deferred(): the first signal is noted, raised at its end
_exit_now = False  # see exit_now()


class Terminated(KeyboardInterrupt):
    """The command was asked to end by a signal (a KeyboardInterrupt, so that code written for
    Ctrl-C treats SIGTERM the same way)."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = "") -> None:
        super().__init__(WORDS.get(signum, "interrupted"))
        self.signum = signum
        self.detail = detail  # what the run leaves behind (" at step N; ..."), where known

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    @property
    def line(self) -> str:
        return f"sampa-ray: {WORDS.get(self.signum, 'interrupted')}{self.detail}"


def received() -> int | None:
    """The first SIGINT/SIGTERM this process got, if any."""
    return _received


def descendants(pid: int | None = None) -> list[int] | None:
    """Every living process below ``pid`` (default: this one), children before grandchildren,
    from /proc; None where there is no /proc (not Linux)."""
    root = os.getpid() if pid is None else pid
    parents: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and fields[0] != b"Z":
            parents.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        kids = parents.get(todo.pop(0), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def end_processes(grace_s: float = 3.0) -> bool:
    """End every process this one started, and theirs (an embedded Ray instance: GCS, raylet,
    agents, workers): SIGTERM, up to ``grace_s`` seconds to go, then SIGKILL. The list is taken
    first, so a child that dies and leaves its own children to init still has them ended.
    False where the processes cannot be listed (no /proc): the caller must end them its way."""
    pids = descendants()
    if pids is None:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(map(_alive, pids)):
            time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
    return True


def exit_now() -> None:
    """Let the command end with :func:`os._exit` once its line is out: the processes its
    at-exit handlers would talk to (Ray's own shutdown) are gone, so they could only wait."""
    global _exit_now
    _exit_now = True


def finish(code: int) -> int:
    """``code``, or, after :func:`exit_now`, flush the output and leave with it at once."""
    if _exit_now:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def _hurry(signum: int) -> None:
    """A second signal during the clean shutdown: our line, no process left, exit now."""
    first = _received if _received is not None else signum
    err = Terminated(first)
    with contextlib.suppress(Exception):
        sys.stderr.write(err.line + "\n")
        sys.stderr.flush()
    for pid in descendants() or []:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    os._exit(err.exit_code)


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received is not None:
        _hurry(signum)
    _received = signum
    if not _deferring:
        raise Terminated(signum)


def taken_over(err: SystemExit) -> Terminated | None:
    """Ray's own SIGTERM handler (in place while ``ray.init`` runs, before :func:`install` puts
    ours back) exits with the signal's number: inside :func:`handling` that is our SIGTERM,
    noted as if our handler had seen it; None for any other exit."""
    global _received
    if not _active or err.code != signal.SIGTERM:
        return None
    if _received is None:
        _received = signal.SIGTERM
    return Terminated(signal.SIGTERM)


def install() -> None:
    """Put our handlers for SIGINT and SIGTERM in place, inside :func:`handling` (elsewhere, e.g.
    a library caller's process, the caller's own handlers are left alone). Called again after
    ``ray.init``, which replaces SIGTERM's."""
    if not _active or threading.current_thread() is not threading.main_thread():
        return
    for sig in EXIT_CODES:
        signal.signal(sig, _handler)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Signals end the command as described above while the block runs (the CLI's commands);
    the previous handlers come back afterwards."""
    global _active, _received, _exit_now
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in EXIT_CODES}
    _active, _received, _exit_now = True, None, False
    install()
    try:
        yield
    finally:
        _active = False
        for sig, handler in before.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Clean-up that a first signal must not cut short (ending the coordinator, freeing the
    placement group, shutting Ray down): a signal during the block is noted and raised as
    :class:`Terminated` when it ends (a second one still means "now")."""
    global _deferring
    seen = _received
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _received is not None and seen is None and not _deferring:
        raise Terminated(_received)


__all__ = ["EXIT_CODES", "Terminated", "deferred", "descendants", "end_processes", "exit_now",
           "finish", "handling", "install", "received", "taken_over"]
