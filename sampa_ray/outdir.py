"""The output folder's rules, shared by every command that writes one (``train``, ``compare``,
``bench``): never write over an earlier run unless asked to, never let two runs share a folder,
fail early with one line when the folder cannot be used, name a fresh folder by time when none is
given (with ``-2``, ``-3``, ... when that name is taken), and write every file so that a failure
(a full disk) leaves no half-written file behind.

A folder *holds a run* when it has a ``result.json`` (a finished run), checkpoints (an
interrupted one: they would be mixed with the new run's, and ``--keep-checkpoints`` would then
delete the new ones, whose step numbers are lower), or the lock of a live run. ``.lock`` is held
with ``fcntl.flock`` for as long as the run lasts, so the kernel releases it when the process
dies, however it dies: a stale lock never blocks. Where a file system cannot lock, the pid
written into it decides (a lock whose process is gone is stale).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .config import TrainConfig

LOCK = ".lock"
#: the name of a checkpoint's files: ``ckpt-<step>.pt`` and its ``.json`` (sampa_ray.checkpoint)
CKPT_PREFIX = "ckpt-"


class WriteError(UserError):
    """A file of a run could not be written (a full disk, a read-only or vanished folder)."""


def os_reason(err: OSError) -> str:
    """``No space left on device (ENOSPC)``: the OS error, with its code for searching."""
    code = errno.errorcode.get(err.errno or 0)
    text = err.strerror or str(err) or type(err).__name__
    return f"{text} ({code})" if code else text


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.tmp``: fsynced, then renamed over ``path``, so
    ``path`` is either the old file or the whole new one. On any failure the ``.tmp`` is
    removed and a one-line :class:`WriteError` names the file and the OS error."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"out: cannot write {path}: {os_reason(err)}") from None


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints' JSON files in ``folder``, newest step first (here, not in
    :mod:`sampa_ray.checkpoint`, so that reading a folder's state needs no torch)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob(f"{CKPT_PREFIX}*.json"):
        try:
            found.append((int(p.stem[len(CKPT_PREFIX):]), p))
        except ValueError:
            continue
    return [p for _, p in sorted(found, reverse=True)]


def holds_run(out: Path) -> str | None:
    """What earlier run ``out`` holds ("a finished run", "an interrupted run"), or None."""
    if (out / "result.json").exists() or (out / "compare.json").exists():
        return "a finished run"
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("ckpt-*")):
        return "an interrupted run (checkpoints, no result.json)"
    return None


def finished_run(out: Path) -> dict[str, Any] | None:
    """``out``'s result.json when the run there trained every planned step (not one stopped
    early, which its checkpoints can continue); None otherwise or when it cannot be read."""
    try:
        result = json.loads((out / "result.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(result, dict) or result.get("stopped_early"):
        return None
    steps, planned = result.get("steps"), result.get("planned_steps")
    if not isinstance(steps, int) or not isinstance(planned, int) or steps < planned:
        return None
    return result


def prepare_out(out: Path, overwrite: bool, resume: bool = False) -> Path:
    """Refuse a folder that holds a run unless ``overwrite`` (which then removes the old
    checkpoints, so they cannot mix with the new run's) or ``resume`` (the run continues there);
    the folder must be writable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} exists and is not a folder")
    what = holds_run(out)
    if what and not (overwrite or resume):
        hint = (f"--resume {out} to continue it, " if "interrupted" in what else "")
        raise UserError(f"out: {out} already holds {what}; pass {hint}--overwrite to replace "
                        "it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out: cannot create {out}: {os_reason(err)}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"out: {out} is not writable")
    if what and overwrite and not resume and (out / "checkpoints").is_dir():
        try:
            shutil.rmtree(out / "checkpoints")
        except OSError as err:
            raise UserError(f"out: cannot remove the old {out / 'checkpoints'}: "
                            f"{os_reason(err)}") from None
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutLock:
    """The lock of a live run on its output folder (``out/.lock``, holding its pid)."""

    def __init__(self, out: Path, fd: int) -> None:
        self.out, self.fd = out, fd

    @classmethod
    def take(cls, out: Path) -> OutLock:
        """Take the folder's lock, or refuse with one line naming the run that holds it."""
        path = out / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"out: cannot lock {out}: {os_reason(err)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"out: {out} is in use by a running sampa-ray "
                                f"{_holder(path)}; wait for it or choose another --out"
                                ) from None
            except OSError:  # this file system cannot lock: the pid in the file decides
                holder = _read_pid(path)
                if holder and holder != os.getpid() and _pid_alive(holder):
                    os.close(fd)
                    raise UserError(f"out: {out} is in use by a running sampa-ray (pid "
                                    f"{holder}); wait for it or choose another --out") from None
            # the file we locked may have been removed by its last owner meanwhile: retry
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(out, fd)

    def release(self) -> None:
        """Remove the lock file and let go of the lock (once)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            (self.out / LOCK).unlink()
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = -1

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _holder(path: Path) -> str:
    pid = _read_pid(path)
    return f"(pid {pid})" if pid else "(its pid unknown)"


def lock_holder(out: Path) -> int | None:
    """The pid of the live run that holds ``out``'s lock, or None, without touching the lock
    (trying it, even for a moment, could refuse a run starting there): on Linux the kernel's
    table of held locks (/proc/locks) names the process that holds the lock file's inode;
    elsewhere the pid in the file decides, if that process lives."""
    path = out / LOCK
    try:
        ino = path.stat().st_ino
    except OSError:
        return None
    pid = _read_pid(path)
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return pid if pid and _pid_alive(pid) else None
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:123456 0 EOF" (a waiter's line has "->")
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5].rpartition(":")[2] == str(ino):
            with contextlib.suppress(ValueError):
                return int(f[4])
    return None


def claim_out(out: Path, overwrite: bool, resume: bool = False) -> OutLock:
    """Take ``out`` for one run: create it, lock it for the run's lifetime (a second run on the
    same folder is refused at once), then apply :func:`prepare_out`'s rules under the lock, so
    two runs started together cannot both pass them. Use as ``with claim_out(...):``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} exists and is not a folder")
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out: cannot create {out}: {os_reason(err)}") from None
    lock = OutLock.take(out)
    try:
        prepare_out(out, overwrite, resume)
    except BaseException:
        lock.release()
        if not existed:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    for tmp in [*out.glob("*.tmp"), *out.glob("checkpoints/*.tmp")]:
        with contextlib.suppress(OSError):  # half-written by a run killed mid-write; ours now
            tmp.unlink()
    return lock


def stamped(prefix: str) -> Path:
    """``runs/<prefix>-<timestamp>``: where a command writes when no ``--out`` is given (the
    first free one of that name and its ``-2``, ``-3``, ... is taken: :func:`claim_new`)."""
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_new(base: Path) -> OutLock:
    """Claim a fresh folder named ``base``, else ``base-2``, ``base-3``, ...: the first that
    this process creates itself (``mkdir`` is atomic, so two runs started in the same second,
    a loop over learning rates in the background, each get their own). The lock's ``out`` is
    the folder taken; use as ``with claim_new(...) as lock:``."""
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out: cannot create {base.parent}: {os_reason(err)}") from None
    for n in itertools.count(1):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            out.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise UserError(f"out: cannot create {out}: {os_reason(err)}") from None
        try:
            return claim_out(out, overwrite=False)
        except BaseException:
            with contextlib.suppress(OSError):
                out.rmdir()
            raise
    raise AssertionError("unreachable")


def default_out(cfg: TrainConfig, kind: str) -> Path:
    """The default folder of ``train`` (named after the algorithm) or ``compare`` (``all``)."""
    return stamped(f"{kind}-{cfg.algo if kind == 'train' else 'all'}")


def claim_run(cfg: TrainConfig, kind: str, overwrite: bool, resume: bool = False) -> OutLock:
    """Claim the folder of a ``train`` or ``compare`` run: ``cfg.out`` by :func:`claim_out`'s
    rules, else a fresh :func:`default_out` folder (:func:`claim_new`). The folder taken is
    the lock's ``out``."""
    if cfg.out:
        return claim_out(Path(cfg.out), overwrite, resume)
    return claim_new(default_out(cfg, kind))
