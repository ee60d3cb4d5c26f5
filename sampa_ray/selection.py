"""Model selection: which evaluated epoch a run reports, and ``best.pt``.

Without a validation split (the default) a run reports its last evaluation, and ``final.pt`` is
that model. With one (``val_split``, the paper's recipe) it reports the test accuracy of the
epoch with the best validation accuracy, the first of equals, as the paper's code does: it
saves the model whenever the validation accuracy beats every earlier one (``acc > best_acc``)
and tests only that model at the end. Every evaluation here scores both splits, so the choice
can be checked in ``result.json`` (each epoch's ``val_accuracy`` and ``test_accuracy``).

``final.pt`` stays the model the run ended with (what checkpoints and resume continue, and what
every backend is compared on); the selected epoch's parameters and BatchNorm buffers go to
``best.pt``, in the same format, when the evaluating worker still holds them: a resumed run, or
a statistics worker restarted since that epoch, keeps the record of the accuracies but not the
earlier epochs' parameters, and then ``best.pt`` is not written and ``result.json`` says so.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .engine import Snapshot
from .outdir import write_atomic


def selected_epoch(epochs: list[dict[str, Any]], by_validation: bool) -> dict[str, Any] | None:
    """The epoch row whose test accuracy the run reports: the last evaluated one, or
    ``by_validation`` the first with the highest validation accuracy."""
    done = [r for r in epochs if r.get("test_accuracy") is not None]
    if not by_validation:
        return done[-1] if done else None
    best = None
    for r in done:
        if r.get("val_accuracy") is not None and \
                (best is None or r["val_accuracy"] > best["val_accuracy"]):
            best = r
    return best


def selection(epochs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What ``result.json`` says of a validation split's choice (None without a choice)."""
    row = selected_epoch(epochs, by_validation=True)
    if row is None:
        return None
    last = selected_epoch(epochs, by_validation=False)
    return {"by": "validation", "epoch": row["epoch"], "step": row["step"],
            "val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"],
            "last_test_accuracy": last["test_accuracy"] if last else None,
            "best_pt": False}


def write_best(out: Path, result: dict[str, Any], snap: Snapshot | None) -> None:
    """Write ``best.pt`` (``{"x", "buffers", "step"}``) when ``snap`` is the selected epoch's
    model, and record in ``result["selection"]["best_pt"]`` whether it was written. Call it
    before ``write_outputs``, whose ``result.json`` marks the run finished."""
    sel = result.get("selection")
    if sel is None or snap is None or snap.step != sel["step"]:
        return
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"x": snap.x, "buffers": snap.buffers, "step": snap.step}, buf)
    write_atomic(out / "best.pt", buf.getvalue())
    sel["best_pt"] = True
