"""What a run records and writes: ``result.json``, ``final.pt`` and ``curves.png``."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .engine import EvalResult, GradResult

if TYPE_CHECKING:
    from .algorithms import Algorithm, AlgoState
    from .config import TrainConfig

TRACE_ROUNDS = 64  # rounds whose per-worker compute intervals are kept in result.json


def summary(values: list[float]) -> dict[str, float]:
    """mean / median / p90 / min / max / count of a list of seconds."""
    if not values:
        return {"count": 0}
    s = sorted(values)
    return {"count": len(s), "mean": statistics.fmean(s), "median": statistics.median(s),
            "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "min": s[0], "max": s[-1]}


class Recorder:
    """Collects per-round timings, per-epoch metrics and evaluation results of one run."""

    def __init__(self, stats_role: str) -> None:
        self.stats_role = stats_role
        self.t_start = time.time()
        self.rounds = 0
        self.gradient_bytes: int | None = None  # one gradient on the wire, as last seen
        self.nonfinite_rounds = 0
        self.round_s: list[float] = []
        self.update_s: list[float] = []
        self.step_s: list[float] = []  # wall time between consecutive parameter updates
        self.worker: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.trace: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._loss: list[float] = []
        self._acc: list[float] = []
        self.last_loss = float("nan")

    def record_round(self, results: Mapping[str, GradResult], round_s: float,
                     update_s: float) -> None:
        self.rounds += 1
        self.round_s.append(round_s)
        self.update_s.append(update_s)
        for role, r in results.items():
            if r.nbytes:  # what the gradient took on the wire (none in a local run)
                self.gradient_bytes = r.nbytes
            for k, v in r.timings.items():
                self.worker[role][k].append(v)
            if self.rounds <= TRACE_ROUNDS:
                self.trace.append({"round": self.rounds - 1, "role": role,
                                   "start": r.start - self.t_start, "end": r.end - self.t_start})
        r = results.get(self.stats_role)
        if r is not None:
            self._loss.append(r.loss)
            self._acc.append(r.accuracy)
            self.last_loss = r.loss

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the record (so a resumed run's result.json is whole)."""
        return {"rounds": self.rounds, "epochs": [dict(r) for r in self.epochs],
                "elapsed_s": time.time() - self.t_start}

    def load_state(self, d: dict[str, Any]) -> None:
        self.rounds = int(d.get("rounds", 0))
        self.epochs = [dict(r) for r in d.get("epochs", [])]
        self.t_start = time.time() - float(d.get("elapsed_s", 0.0))

    def end_epoch(self, epoch: float, step: int, lr: float) -> dict[str, Any]:
        row = {"epoch": epoch, "step": step, "lr": lr, "wall_s": time.time() - self.t_start,
               "train_loss": statistics.fmean(self._loss) if self._loss else None,
               "train_accuracy": statistics.fmean(self._acc) if self._acc else None,
               "test_loss": None, "test_accuracy": None}
        self._loss.clear()
        self._acc.clear()
        self.epochs.append(row)
        return row

    def add_eval(self, step: int, ev: EvalResult) -> None:
        for row in self.epochs:
            if row["step"] == step:
                row["test_loss"], row["test_accuracy"] = ev.loss, ev.accuracy
                row["eval_s"] = ev.seconds

    def timing_summary(self) -> dict[str, Any]:
        return {"nonfinite_rounds": self.nonfinite_rounds,
                "gradient_bytes": self.gradient_bytes,
                "step_seconds": summary(self.step_s[1:]),  # the first holds start-up rounds
                "round_seconds": summary(self.round_s),
                "update_seconds": summary(self.update_s),
                "workers": {role: {k: summary(v) for k, v in d.items()}
                            for role, d in self.worker.items()}}


def build_result(cfg: TrainConfig, algo: Algorithm, recorder: Recorder, state: AlgoState,
                 total_steps: int, batches_per_epoch: int, info: dict[str, Any], wall_s: float,
                 **extra: Any) -> dict[str, Any]:
    """The content of result.json."""
    last = next((r for r in reversed(recorder.epochs) if r["test_accuracy"] is not None), None)
    return {
        "version": __version__,
        "config": cfg.model_dump(),
        "config_hash": cfg.hash(),
        "algorithm": {**algo.config(), "lr": cfg.lr, "lr_schedule": cfg.lr_schedule},
        "num_params": info["num_params"],
        "steps": state.step,
        "planned_steps": total_steps,
        "batches_per_epoch": batches_per_epoch,
        "gradient_rounds": recorder.rounds,
        "rounds_per_update": algo.rounds_per_update(),
        "wall_time_s": wall_s,
        "final_test_accuracy": last["test_accuracy"] if last else None,
        "final_test_loss": last["test_loss"] if last else None,
        "epochs": recorder.epochs,
        "timings": recorder.timing_summary(),
        "trace": recorder.trace,
        **extra,
    }


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_outputs(out: Path, result: dict[str, Any], x: torch.Tensor,
                  buffers: dict[str, torch.Tensor]) -> None:
    """Write result.json, final.pt (flat parameters + model buffers) and curves.png into out."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "final.pt.tmp"
    torch.save({"x": x.detach().cpu(), "buffers": buffers}, tmp)
    os.replace(tmp, out / "final.pt")
    plot_curves(out / "curves.png", result["epochs"], result["config"]["algo"])
    write_json_atomic(out / "result.json", result)


def plot_curves(path: Path, epochs: list[dict[str, Any]], label: str) -> None:
    """Loss and accuracy against epoch and against wall time."""
    plot_runs(path, {label: epochs})


def plot_runs(path: Path, runs: Mapping[str, list[dict[str, Any]]]) -> None:
    """One figure: train loss / test accuracy (rows) vs epoch / wall time (columns), one line per
    run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for label, rows in runs.items():
        ep = [r["epoch"] for r in rows]
        wall = [r["wall_s"] for r in rows]
        loss = [r["train_loss"] for r in rows]
        acc = [r["test_accuracy"] if r["test_accuracy"] is not None else float("nan")
               for r in rows]
        axes[0][0].plot(ep, loss, marker="o", label=label)
        axes[0][1].plot(wall, loss, marker="o", label=label)
        axes[1][0].plot(ep, acc, marker="o", label=label)
        axes[1][1].plot(wall, acc, marker="o", label=label)
    for ax, (y, x) in zip(axes.flat, [("train loss", "epoch"), ("train loss", "wall time (s)"),
                                       ("test accuracy", "epoch"),
                                       ("test accuracy", "wall time (s)")], strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
