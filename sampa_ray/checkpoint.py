"""Checkpoints: atomic, checksummed, the last K kept; resume from the newest valid one.

A checkpoint is two files. ``ckpt-00000120.pt`` holds plain tensors only (the algorithm state,
every worker's model buffers), written with ``torch.save`` to a temporary file, fsynced and
renamed. ``ckpt-00000120.json`` is written the same way afterwards and commits it: the SHA-256 of
the ``.pt`` bytes, the config and its hash, the parameter count, the step, and the run's record so
far. A checkpoint is loaded only if its JSON parses, its checksum matches the bytes on disk, and
its config hash and parameter count match the run; only then is the ``.pt`` read, with
``torch.load(weights_only=True)``, so nothing can execute code on load.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .algorithms import AlgoState
from .errors import UserError

if TYPE_CHECKING:
    from .config import TrainConfig
    from .loop import Executor
    from .results import Recorder

PREFIX = "ckpt-"


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


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """Write ``ckpt`` into ``folder`` atomically; keep the newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"step": ckpt.step, "phase": ckpt.phase, "tensors": ckpt.tensors,
                "buffers": ckpt.buffers}, buf)
    data = buf.getvalue()
    stem = f"{PREFIX}{ckpt.step:08d}"
    pt = folder / f"{stem}.pt"
    _fsync_write(pt, data)
    meta = {**ckpt.meta, "step": ckpt.step, "file": pt.name, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    _fsync_write(folder / f"{stem}.json", json.dumps(meta, indent=1, default=str).encode())
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[keep:]:
        for p in (old, old.with_suffix(".pt")):
            p.unlink(missing_ok=True)
    return pt


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints' JSON files in ``folder``, newest step first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob(f"{PREFIX}*.json"):
        try:
            found.append((int(p.stem[len(PREFIX):]), p))
        except ValueError:
            continue
    return [p for _, p in sorted(found, reverse=True)]


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
    background thread (one write at a time, in order), off the critical path."""

    def __init__(self, cfg: TrainConfig, folder: Path, executor: Executor, recorder: Recorder,
                 num_params: int) -> None:
        self.cfg, self.folder, self.executor, self.recorder = cfg, folder, executor, recorder
        self.num_params = num_params
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending: list[asyncio.Future[Path]] = []
        self.written: list[Path] = []
        self.last: Checkpoint | None = None  # the newest snapshot, kept in memory

    async def __call__(self, state: AlgoState) -> None:
        buffers = await self.executor.all_buffers()
        meta = {"config": self.cfg.model_dump(), "config_hash": self.cfg.hash(),
                "num_params": self.num_params, "record": self.recorder.state_dict()}
        ckpt = Checkpoint.of(state, buffers, meta)
        self.last = ckpt
        loop = asyncio.get_running_loop()
        self.pending.append(loop.run_in_executor(
            self.pool, save_checkpoint, self.folder, ckpt, self.cfg.keep_checkpoints))

    async def flush(self) -> list[Path]:
        """Wait for every write; returns the files written."""
        for fut in self.pending:
            self.written.append(await fut)
        self.pending.clear()
        return self.written


def find_resume(cfg: TrainConfig, num_params: int, warn: Callable[[str], None]) -> Checkpoint:
    """The checkpoint ``cfg.resume`` names: a run folder (its checkpoints/) or a folder of
    checkpoints; the newest valid one, older ones when newer ones are refused."""
    assert cfg.resume is not None
    root = Path(cfg.resume)
    folder = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    return load_latest(folder, cfg.hash(), num_params, warn)
