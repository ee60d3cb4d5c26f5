"""``sampa-ray runs [FOLDER]``: the runs in a folder (default ``runs/``), one row each: name,
algorithm, steps, test accuracy, wall time and state (:mod:`sampa_ray.runlist`), as a table or,
with ``--json``, as a JSON list."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..runlist import RunRow, list_runs


def _steps(r: RunRow) -> str:
    if r.steps is None:
        return "-"
    return f"{r.steps}/{r.planned_steps}" if r.planned_steps is not None else str(r.steps)


def cmd_runs(args: argparse.Namespace) -> int:
    """List the runs of ``args.folder``; exit 0 (a missing folder: one line, exit 2)."""
    folder = Path(args.folder)
    rows = list_runs(folder)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2, allow_nan=False))
        return 0
    if not rows:
        print(f"no runs in {folder}")
        return 0
    from rich.table import Table

    from ..ui import print_table

    table = Table(title=f"runs in {folder}")
    for col in ("run", "algorithm"):
        table.add_column(col)
    for col in ("steps", "test accuracy", "wall time (s)"):
        table.add_column(col, justify="right")
    table.add_column("status")
    for r in rows:
        table.add_row(r.name, r.algorithm or "-", _steps(r),
                      "-" if r.test_accuracy is None else f"{r.test_accuracy:.4f}",
                      "-" if r.wall_time_s is None else f"{r.wall_time_s:.1f}", r.status)
    print_table(table)
    return 0


def add_runs_command(subparsers: Any) -> None:
    """Register ``runs`` on the CLI's subparsers."""
    p = subparsers.add_parser("runs", help="list the runs in a folder and their results")
    p.add_argument("folder", nargs="?", default="runs", metavar="FOLDER",
                   help="folder of run folders, or one run folder (default: runs)")
    p.add_argument("--json", action="store_true",
                   help="a JSON list, one object per run (null where a value is unknown)")
    p.set_defaults(func=cmd_runs)


__all__ = ["add_runs_command", "cmd_runs"]
