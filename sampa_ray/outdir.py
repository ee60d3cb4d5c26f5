"""The output folder's rules, shared by every command that writes one (``train``, ``compare``,
``bench``): never write over an earlier run unless asked to, fail early with one line when the
folder cannot be used, and name a fresh folder by time when none is given."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .config import TrainConfig


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Refuse to write over an earlier run unless asked to; the folder must be writable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} exists and is not a folder")
    if (out / "result.json").exists() and not overwrite:
        raise UserError(f"out: {out} already holds a run (choose another --out or pass "
                        "--overwrite)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out: cannot create {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"out: {out} is not writable")
    return out


def stamped(prefix: str) -> Path:
    """``runs/<prefix>-<timestamp>``: where a command writes when no ``--out`` is given."""
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_out(cfg: TrainConfig, kind: str) -> Path:
    """The default folder of ``train`` (named after the algorithm) or ``compare`` (``all``)."""
    return stamped(f"{kind}-{cfg.algo if kind == 'train' else 'all'}")
