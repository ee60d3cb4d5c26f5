"""What the run folders under a folder hold (``sampa-ray runs``): one row per run, read from
the files a run leaves, so it works for runs of any process, live or long gone.

A folder's state follows :mod:`sampa_ray.outdir`'s rules: ``running`` while a live process holds
its lock; ``finished`` with a ``result.json`` of every planned step; ``interrupted`` with
checkpoints to continue from (``--resume``), also a run stopped early through the control API;
``failed`` with neither (a run that failed before its first checkpoint, or an empty folder). A
``compare`` folder gives a row per algorithm (``cmp/sgd``), a ``bench`` study one row. Nothing
here imports torch or starts anything: listing is cheap.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .outdir import finished_run, list_checkpoints, lock_holder

STATES = ("finished", "interrupted", "running", "failed")


@dataclass
class RunRow:
    """One run folder: what ran, how far, how well, how long, and in which state."""

    name: str
    path: str
    status: str
    algorithm: str | None = None
    steps: int | None = None
    planned_steps: int | None = None
    test_accuracy: float | None = None
    wall_time_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) \
        and math.isfinite(v) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _newest_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint JSON that reads and holds a config (its ``.pt`` is not read)."""
    for p in list_checkpoints(folder / "checkpoints"):
        meta = _read_json(p)
        if meta is not None and isinstance(meta.get("config"), dict):
            return meta
    return None


def _from_result(row: RunRow, result: dict[str, Any]) -> None:
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    row.algorithm = config.get("algo")
    row.steps, row.planned_steps = _int(result.get("steps")), _int(result.get("planned_steps"))
    row.test_accuracy = _number(result.get("final_test_accuracy"))
    row.wall_time_s = _number(result.get("wall_time_s"))


def _from_checkpoint(row: RunRow, meta: dict[str, Any]) -> None:
    config, record = meta["config"], meta.get("record")
    record = record if isinstance(record, dict) else {}
    epochs = [r for r in record.get("epochs", []) if isinstance(r, dict)]
    row.algorithm = config.get("algo")
    row.steps = _int(meta.get("step"))
    row.planned_steps = _int(config.get("steps"))
    if row.planned_steps is None and epochs and _int(config.get("epochs")):
        # batches per epoch, from an epoch row that ends a whole epoch (step / epoch)
        whole = [r for r in epochs if _number(r.get("epoch")) and float(r["epoch"]).is_integer()]
        if whole and _int(whole[0].get("step")):
            row.planned_steps = config["epochs"] * (whole[0]["step"] // int(whole[0]["epoch"]))
    scored = [r["test_accuracy"] for r in epochs if _number(r.get("test_accuracy")) is not None]
    row.test_accuracy = scored[-1] if scored else None
    row.wall_time_s = _number(record.get("wall_s", record.get("elapsed_s")))


def _bench(folder: Path) -> bool:
    return (folder / "bench.csv").is_file()


def _holds_runs(folder: Path) -> list[Path]:
    """The sub-folders of a ``compare`` folder that hold a run of their own."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ((p / "result.json").is_file() or list_checkpoints(p / "checkpoints")))


def folder_row(folder: Path, name: str, live: bool | None = None) -> RunRow:
    """The row of one run folder. ``live``: whether a live process holds it (looked up when
    None; a compare folder's lock covers its algorithms' folders)."""
    row = RunRow(name=name, path=str(folder), status="failed")
    live = lock_holder(folder) is not None if live is None else live
    if _bench(folder):
        row.algorithm, row.status = "bench", "running" if live else "finished"
        return row
    result = _read_json(folder / "result.json")
    ckpt = _newest_checkpoint(folder)
    if result is not None:
        _from_result(row, result)
    elif ckpt is not None:
        _from_checkpoint(row, ckpt)
    if live:
        row.status = "running"
    elif finished_run(folder) is not None:
        row.status = "finished"
    elif ckpt is not None:  # an interrupted run, or one stopped early: --resume continues it
        row.status = "interrupted"
    return row


def list_runs(root: Path) -> list[RunRow]:
    """A row for each run folder in ``root`` (sorted by name: default names sort by time), or
    ``root``'s own rows when it is a run folder itself. A missing folder is a UserError."""
    if not root.exists():
        raise UserError(f"runs: {root} does not exist")
    if not root.is_dir():
        raise UserError(f"runs: {root} is not a folder")
    try:
        if _is_run(root):
            return _rows(root, root.name or str(root))
        return [row for p in sorted(root.iterdir())
                if p.is_dir() and not p.name.startswith(".")
                for row in _rows(p, p.name)]
    except OSError as err:
        raise UserError(f"runs: cannot read {root}: {err.strerror or err}") from None


def _is_run(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("result.json", "compare.json", "bench.csv",
                                               ".lock")) \
        or bool(list_checkpoints(folder / "checkpoints"))


def _rows(folder: Path, name: str) -> list[RunRow]:
    """One row, or for a compare folder one per algorithm."""
    if (folder / "result.json").exists() or _bench(folder):
        return [folder_row(folder, name)]
    subs = _holds_runs(folder)
    if not subs:
        return [folder_row(folder, name)]
    live = lock_holder(folder) is not None
    rows = [folder_row(p, f"{name}/{p.name}", live or None) for p in subs]
    for r in rows:  # a finished algorithm of a compare still running is finished
        if r.status == "running" and finished_run(Path(r.path)) is not None:
            r.status = "finished"
    return rows


__all__ = ["STATES", "RunRow", "folder_row", "list_runs"]
