"""Checkpoints: atomic, checksummed, the last K kept; resume from the newest valid one.

A checkpoint is two files. ``ckpt-00000120.pt`` holds plain tensors only (the algorithm state,
every worker's model buffers), written with ``torch.save`` to a temporary file, fsynced and
renamed. ``ckpt-00000120.json`` is written the same way afterwards and commits it: the SHA-256 of
the ``.pt`` bytes, the config and its hash, the parameter count, the step, the run's record so
far and, under fp16, the loss scale. A checkpoint is loaded only if its JSON parses, its
checksum matches the bytes on disk, and its config hash and parameter count match the run;
only then is the ``.pt`` read, with ``torch.load(weights_only=True)``, so nothing can execute
code on load.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .algorithms import AlgoState
from .errors import UserError
from .outdir import CKPT_PREFIX, list_checkpoints, write_atomic

if TYPE_CHECKING:
    from .config import TrainConfig
    from .executor import Executor
    from .results import Recorder
    from .scaler import LossScale

PREFIX = CKPT_PREFIX


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


@dataclass
class Checkpoint:
    step: int
    phase: int
    tensors: dict[str, torch.Tensor]  # x, and buf / g_y where the algorithm has them
    buffers: list[dict[str, torch.Tensor]]  # model buffers of each worker, by slot
    meta: dict[str, Any] = field(default_factory=dict)  # config, hash, record of the run so far

    @classmethod
    def of(cls, state: AlgoState, buffers: list[dict[str, torch.Tensor]],
           meta: dict[str, Any]) -> Checkpoint:
        """Snapshot (copies) of a state, so the run can go on while it is written."""
        return cls(step=state.step, phase=state.phase,
                   tensors={k: v.detach().to("cpu", copy=True) for k, v in state.tensors().items()},
                   buffers=buffers, meta=meta)

    def state(self) -> AlgoState:
        return AlgoState.from_tensors({k: v.clone() for k, v in self.tensors.items()},
                                      self.step, self.phase)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, ckpt: Checkpoint, keep: int = 3) -> Path:
    """Write ``ckpt`` into ``folder`` atomically; keep the newest ``keep`` checkpoints.

    A failed write (a full disk) raises a one-line ``WriteError`` naming the file and leaves no
    trace of this checkpoint (no ``.tmp``, no ``.pt`` without its JSON), and deletes nothing
    older: the newest checkpoint written before stays whole and usable."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"step": ckpt.step, "phase": ckpt.phase, "tensors": ckpt.tensors,
                "buffers": ckpt.buffers}, buf)
    data = buf.getvalue()
    stem = f"{PREFIX}{ckpt.step:08d}"
    pt = folder / f"{stem}.pt"
    write_atomic(pt, data)
    meta = {**ckpt.meta, "step": ckpt.step, "file": pt.name, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    try:
        write_atomic(folder / f"{stem}.json", json.dumps(meta, indent=1, default=str).encode())
    except UserError:
        pt.unlink(missing_ok=True)  # never committed
        raise
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[keep:]:
        for p in (old, old.with_suffix(".pt")):
            p.unlink(missing_ok=True)
    return pt


def load_checkpoint(meta_path: Path, config_hash: str | None = None,
                    num_params: int | None = None) -> Checkpoint:
    """Load and verify one checkpoint; any problem is a one-line CheckpointError naming it."""
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a mapping")
        pt = meta_path.with_name(str(meta["file"]))
        data = pt.read_bytes()
    except FileNotFoundError as err:
        raise CheckpointError(f"resume: {err.filename} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"resume: {meta_path} is unreadable or malformed") from None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"resume: {pt} fails its checksum (corrupt or truncated)")
    if config_hash is not None and meta.get("config_hash") != config_hash:
        raise CheckpointError(f"resume: {pt} was written by a different config "
                              f"(hash {meta.get('config_hash')} != {config_hash})")
    if num_params is not None and meta.get("num_params") != num_params:
        raise CheckpointError(f"resume: {pt} holds {meta.get('num_params')} parameters, "
                              f"the model has {num_params}")
    try:
        raw = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        ckpt = Checkpoint(step=int(raw["step"]), phase=int(raw["phase"]),
                          tensors=dict(raw["tensors"]), buffers=list(raw["buffers"]), meta=meta)
    except Exception:  # noqa: BLE001 - any failure to decode is a bad checkpoint
        raise CheckpointError(f"resume: {pt} does not decode as a checkpoint") from None
    x = ckpt.tensors.get("x")
    if x is None or (num_params is not None and x.numel() != num_params):
        raise CheckpointError(f"resume: {pt} has no parameter vector of the right size")
    return ckpt


def load_latest(folder: Path, config_hash: str | None, num_params: int | None,
                warn: Callable[[str], None] = lambda msg: None) -> Checkpoint:
    """The newest valid checkpoint in ``folder``; invalid ones are reported through ``warn``
    and skipped. No valid checkpoint at all is a one-line UserError."""
    candidates = list_checkpoints(folder)
    if not candidates:
        raise UserError(f"resume: no checkpoint in {folder}")
    for p in candidates:
        try:
            return load_checkpoint(p, config_hash, num_params)
        except CheckpointError as err:
            warn(f"{err}; trying an older one")
    raise UserError(f"resume: no valid checkpoint in {folder} ({len(candidates)} refused)")


class Checkpointer:
    """Snapshots the state and every worker's buffers after an update and writes them in a
    background thread (one write at a time, in order), off the critical path.

    A write that fails (a full disk) ends the run at the next update: the loop awaits
    :meth:`check` after every update, and a run that can no longer save its progress should not
    go on unprotected for hours. The error is one line naming the file, the OS error and the
    newest checkpoint that is left to resume from."""

    def __init__(self, cfg: TrainConfig, folder: Path, executor: Executor, recorder: Recorder,
                 num_params: int, scale: LossScale | None = None) -> None:
        self.cfg, self.folder, self.executor, self.recorder = cfg, folder, executor, recorder
        #: the run's loss scale (fp16), as the loop follows it: saved with each state
        self.scale = scale
        self.num_params = num_params
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending: list[Future[Path]] = []  # the thread's own futures: their state is
        # set by the thread, so a loop that never yields (the local backend) still sees it
        self.written: list[Path] = []
        self.last: Checkpoint | None = None  # the newest snapshot, kept in memory
        newest = list_checkpoints(folder)  # a resumed run's folder holds its earlier ones
        self.newest = newest[0] if newest else None  # the newest checkpoint on disk
        self.error: UserError | None = None  # the first failed write

    async def __call__(self, state: AlgoState) -> None:
        await self.check()
        buffers = await self.executor.all_buffers()
        meta = {"config": self.cfg.model_dump(), "config_hash": self.cfg.hash(),
                "num_params": self.num_params, "record": self.recorder.state_dict()}
        if self.scale is not None:
            meta["loss_scale"] = self.scale.state_dict()
        ckpt = Checkpoint.of(state, buffers, meta)
        self.last = ckpt
        self.pending.append(self.pool.submit(self._save, ckpt))

    def _save(self, ckpt: Checkpoint) -> Path:
        path = save_checkpoint(self.folder, ckpt, self.cfg.keep_checkpoints)
        self.newest = path
        return path

    def _fail(self, err: BaseException | None) -> None:
        if self.error is not None or err is None:
            return
        what = str(err) if isinstance(err, UserError) else \
            f"cannot write into {self.folder}: {type(err).__name__}: {err}"
        run = self.folder.parent if self.folder.name == "checkpoints" else self.folder
        left = (f"{self.newest.stem} is the newest checkpoint (make room, then --resume {run})"
                if self.newest is not None else "no checkpoint of this run was written")
        self.error = UserError(f"checkpoint: {what.removeprefix('out: ')}; run stopped, {left}")

    async def keep_last(self) -> Path | None:
        """Once the writes under way are done, the newest snapshot on disk: a run that stops
        now is resumable from it even before its first checkpoint (the starting point is kept
        in memory only). Returns the newest checkpoint on disk."""
        await self.flush()
        last = self.last
        if self.newest is None and last is not None:
            meta = {"config": self.cfg.model_dump(), "config_hash": self.cfg.hash(),
                    "num_params": self.num_params, **last.meta}
            await asyncio.to_thread(self._save, Checkpoint(last.step, last.phase, last.tensors,
                                                           last.buffers, meta))
        return self.newest

    async def check(self) -> None:
        """Raise the first failed write, once the writes still queued have ended (none is cut
        off half-way, so none leaves a ``.tmp``)."""
        for fut in [f for f in self.pending if f.done()]:
            if fut.exception() is not None:
                self._fail(fut.exception())
            else:  # written: no need to keep the future
                self.written.append(fut.result())
                self.pending.remove(fut)
        if self.error is None:
            return
        await self._wait()
        raise self.error

    async def _wait(self) -> list[Path | BaseException]:
        pending, self.pending = self.pending, []
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in pending),
                                    return_exceptions=True)

    async def flush(self) -> list[Path]:
        """Wait for every write; returns the files written (raises the first failed write)."""
        for r in await self._wait():
            if isinstance(r, BaseException):
                self._fail(r)
            else:
                self.written.append(r)
        await self.check()
        return self.written


def resume_folder(root: Path) -> Path:
    """Where the checkpoints of ``root`` are: a run folder's ``checkpoints/``, or ``root``."""
    return root / "checkpoints" if (root / "checkpoints").is_dir() else root


def find_resume(cfg: TrainConfig, num_params: int, warn: Callable[[str], None]) -> Checkpoint:
    """The checkpoint ``cfg.resume`` names: a run folder (its checkpoints/) or a folder of
    checkpoints; the newest valid one, older ones when newer ones are refused."""
    assert cfg.resume is not None
    return load_latest(resume_folder(Path(cfg.resume)), cfg.hash(), num_params, warn)


def stored_config(root: Path) -> tuple[dict[str, Any], Path]:
    """The config kept in the newest checkpoint of ``root`` whose JSON holds one, and that
    JSON's path (a damaged newest one is passed over here; ``find_resume`` reports it)."""
    if not root.is_dir():
        raise UserError(f"resume: {root} is not a folder" if root.exists() else
                        f"resume: {root} does not exist")
    folder = resume_folder(root)
    candidates = list_checkpoints(folder)
    if not candidates:
        raise UserError(f"resume: no checkpoint in {folder}")
    for p in candidates:
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return meta["config"], p
    raise UserError(f"resume: no readable checkpoint in {folder} ({len(candidates)} refused)")


def config_for_resume(root: str | Path, given: dict[str, Any]) -> TrainConfig:
    """The config a resumed run continues with: the one its newest checkpoint stores, so a bare
    ``--resume DIR`` needs no flag repeated, with ``given`` (YAML and flags) on top. Fields that
    say how and where it runs (``RUNTIME_FIELDS``: threads, backend, out, ...) may change; a
    trajectory field may only be repeated, since another value could not continue the same run:
    it is refused with one line naming the field and both values."""
    from pydantic import ValidationError

    from .config import RUNTIME_FIELDS, TrainConfig, make_config

    root = Path(root)
    stored, source = stored_config(root)
    try:  # JSON mode: the stored values went through JSON
        old = TrainConfig.model_validate_json(json.dumps(stored))
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"]) or "config"
        raise UserError(f"resume: {source} holds a config this version cannot use ({where}: "
                        f"{e['msg']})") from None
    data = {**old.model_dump(), **given, "resume": str(root)}
    data["out"] = given.get("out", str(root))
    new = make_config(data)
    for name in given:
        if name in RUNTIME_FIELDS or name not in TrainConfig.model_fields:
            continue
        was, now = getattr(old, name), getattr(new, name)
        if was != now:
            raise UserError(f"resume: {name} is {was!r} in the checkpoint, {now!r} on the "
                            "command line (a run with another value needs its own --out)")
    return new
