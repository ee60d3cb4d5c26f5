"""What a run records and writes: ``result.json``, ``final.pt`` and ``curves.png``.

A run can last hundreds of thousands of rounds, and the coordinator lives as long as the run, so
the record is bounded: each timing series keeps its count, mean, min and max exactly and a fixed
size random sample for its median and p90 (:class:`Stat`), and the per-round trace keeps the
first :data:`TRACE_ROUNDS` rounds. Its memory does not grow with the number of rounds.
"""

from __future__ import annotations

import io
import json
import math
import random
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .engine import EvalResult, GradResult
from .outdir import write_atomic
from .selection import selected_epoch, selection

if TYPE_CHECKING:
    from .algorithms import Algorithm, AlgoState
    from .config import TrainConfig

TRACE_ROUNDS = 64  # rounds whose per-worker compute intervals are kept in result.json
#: values of a timing series kept for its median and p90 (exact up to this many rounds)
RESERVOIR = 512


class Stat:
    """A running summary of one series of seconds in constant memory: count, mean, min and max
    over every value, and a uniform random sample of at most :data:`RESERVOIR` values (Vitter's
    algorithm R, seeded, so a run records the same sample each time) for the median and p90,
    which are therefore exact until the series is longer than the sample."""

    __slots__ = ("count", "total", "lo", "hi", "sample", "_rng")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.sample: list[float] = []
        self._rng = random.Random(0)

    def add(self, value: float) -> None:
        v = float(value)
        self.count += 1
        self.total += v
        self.lo = min(self.lo, v)
        self.hi = max(self.hi, v)
        if len(self.sample) < RESERVOIR:
            self.sample.append(v)
        else:  # keep each of the count values with probability RESERVOIR / count
            j = self._rng.randrange(self.count)
            if j < RESERVOIR:
                self.sample[j] = v

    def summary(self) -> dict[str, float]:
        """count, mean, median, p90, min, max (just count when empty): the keys result.json's
        ``timings`` have always had."""
        if not self.count:
            return {"count": 0}
        s = sorted(self.sample)
        return {"count": self.count, "mean": self.total / self.count,
                "median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
                "min": self.lo, "max": self.hi}

    def state(self) -> dict[str, Any]:
        """Plain JSON (a checkpoint keeps it, so a resumed run's summaries cover the whole
        run)."""
        if not self.count:
            return {"count": 0}
        return {"count": self.count, "total": self.total, "min": self.lo, "max": self.hi,
                "sample": list(self.sample)}

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> Stat:
        st = cls()
        st.count = int(d.get("count", 0))
        if st.count:
            st.total = float(d["total"])
            st.lo, st.hi = float(d["min"]), float(d["max"])
            st.sample = [float(v) for v in d.get("sample", [])][:RESERVOIR]
            st._rng = random.Random(st.count)  # a fresh, still reproducible, stream
        return st


class Recorder:
    """Collects per-round timings, per-epoch metrics and evaluation results of one run, in
    memory that does not grow with the number of rounds (see the module docstring)."""

    def __init__(self, stats_role: str, started: float | None = None,
                 earlier_s: float = 0.0) -> None:
        self.stats_role = stats_role
        self.t_start = time.time()
        #: when this session of the run began (``time.time()``), and the wall time of the
        #: sessions before it (a resumed run's): result.json's wall time is the run's total
        self.started = self.t_start if started is None else started
        self.earlier_s = earlier_s
        self.rounds = 0
        self.gradient_bytes: int | None = None  # one gradient on the wire, as last seen
        #: by role: the bytes each worker of its role group all-reduces per gradient
        self.allreduce_bytes: dict[str, int] = {}
        self.nonfinite_rounds = 0
        #: fp16: rounds skipped because their gradients overflowed at the loss scale (apart
        #: from nonfinite_rounds), and the scale after the latest verdict
        self.scaler_skips = 0
        self.loss_scale: float | None = None
        self.round_s = Stat()
        self.update_s = Stat()
        self.step_s = Stat()  # wall time between consecutive parameter updates
        # the compute on an update's critical path: per round the slowest worker's compute,
        # summed over the update's rounds (what a step would cost with no overhead at all)
        self.update_compute_s = Stat()
        self._pending_compute = 0.0
        self._skip_step = True  # the first update after a (re)start holds start-up time
        self.worker: dict[str, dict[str, Stat]] = {}
        self.trace: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._loss = (0, 0.0)  # (count, sum) of the stats role's loss this epoch
        self._acc = (0, 0.0)
        self.last_loss = float("nan")
        self.last_accuracy = float("nan")  # of the stats role's last round (NaN: not reported)

    def record_round(self, results: Mapping[str, GradResult], round_s: float,
                     update_s: float) -> None:
        self.rounds += 1
        self.round_s.add(round_s)
        self.update_s.add(update_s)
        self._pending_compute += max((r.timings.get("compute", 0.0) for r in results.values()),
                                     default=0.0)
        for role, r in results.items():
            if r.nbytes:  # what the gradient took on the wire (none in a local run)
                self.gradient_bytes = r.nbytes
            if r.reduced_bytes:  # what each worker of the role's group all-reduced
                self.allreduce_bytes[role] = r.reduced_bytes
            mine = self.worker.setdefault(role, {})
            for k, v in r.timings.items():
                (mine.get(k) or mine.setdefault(k, Stat())).add(v)
            if self.rounds <= TRACE_ROUNDS:
                self.trace.append({"round": self.rounds - 1, "role": role,
                                   "start": r.start - self.t_start, "end": r.end - self.t_start})
        r = results.get(self.stats_role)
        if r is not None:
            self._loss = (self._loss[0] + 1, self._loss[1] + r.loss)
            if math.isfinite(r.accuracy):  # a plug-in loss may report no accuracy (NaN)
                self._acc = (self._acc[0] + 1, self._acc[1] + r.accuracy)
            self.last_loss, self.last_accuracy = r.loss, r.accuracy

    def record_step(self, seconds: float) -> None:
        """Wall time from the previous parameter update to this one; the first after a start or
        resume is left out (it holds start-up rounds)."""
        compute, self._pending_compute = self._pending_compute, 0.0
        if self._skip_step:
            self._skip_step = False
            return
        self.step_s.add(seconds)
        self.update_compute_s.add(compute)

    def wall_s(self) -> float:
        """Seconds the run has taken so far, over every session: the earlier sessions' (up to
        the checkpoint this one resumed from) and this one's, start-up included."""
        return self.earlier_s + time.time() - self.started

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the record (plain JSON, bounded like the record), so a
        resumed run's result.json is whole, timings and wall time included."""
        return {"rounds": self.rounds, "epochs": [dict(r) for r in self.epochs],
                "elapsed_s": time.time() - self.t_start, "wall_s": self.wall_s(),
                "nonfinite_rounds": self.nonfinite_rounds,
                "scaler_skips": self.scaler_skips,
                "gradient_bytes": self.gradient_bytes,
                "allreduce_bytes": dict(self.allreduce_bytes),
                "timings": {"round": self.round_s.state(), "update": self.update_s.state(),
                            "step": self.step_s.state(),
                            "update_compute": self.update_compute_s.state()},
                "workers": {role: {k: s.state() for k, s in d.items()}
                            for role, d in self.worker.items()},
                "trace": [dict(t) for t in self.trace]}

    def load_state(self, d: dict[str, Any]) -> None:
        """Continue the record of :meth:`state_dict` (older checkpoints lack the timings:
        they start empty)."""
        self.rounds = int(d.get("rounds", 0))
        self.epochs = [dict(r) for r in d.get("epochs", [])]
        self.t_start = time.time() - float(d.get("elapsed_s", 0.0))
        self.nonfinite_rounds = int(d.get("nonfinite_rounds", 0))
        self.scaler_skips = int(d.get("scaler_skips", 0))
        self.gradient_bytes = d.get("gradient_bytes")
        self.allreduce_bytes = dict(d.get("allreduce_bytes", {}))
        timings = d.get("timings", {})
        self.round_s = Stat.from_state(timings.get("round", {}))
        self.update_s = Stat.from_state(timings.get("update", {}))
        self.step_s = Stat.from_state(timings.get("step", {}))
        self.update_compute_s = Stat.from_state(timings.get("update_compute", {}))
        self._pending_compute = 0.0
        self._skip_step = True
        self.worker = {role: {k: Stat.from_state(s) for k, s in v.items()}
                       for role, v in d.get("workers", {}).items()}
        self.trace = [dict(t) for t in d.get("trace", [])]

    def end_epoch(self, epoch: float, step: int, lr: float) -> dict[str, Any]:
        (n_loss, s_loss), (n_acc, s_acc) = self._loss, self._acc
        row = {"epoch": epoch, "step": step, "lr": lr, "wall_s": time.time() - self.t_start,
               "train_loss": s_loss / n_loss if n_loss else None,
               "train_accuracy": s_acc / n_acc if n_acc else None,
               "test_loss": None, "test_accuracy": None}
        self._loss = self._acc = (0, 0.0)
        self.epochs.append(row)
        return row

    def add_eval(self, step: int, ev: EvalResult) -> None:
        for row in self.epochs:
            if row["step"] == step:
                row["test_loss"], row["test_accuracy"] = ev.loss, _number(ev.accuracy)
                row["eval_s"] = ev.seconds
                if ev.val_accuracy is not None:  # a validation split (``val_split``)
                    row["val_loss"], row["val_accuracy"] = ev.val_loss, _number(ev.val_accuracy)

    def timing_summary(self) -> dict[str, Any]:
        return {"nonfinite_rounds": self.nonfinite_rounds,
                **({"scaler_skips": self.scaler_skips} if self.loss_scale is not None else {}),
                "gradient_bytes": self.gradient_bytes,
                "allreduce_bytes": dict(self.allreduce_bytes),
                "step_seconds": self.step_s.summary(),
                "update_compute_seconds": self.update_compute_s.summary(),
                "round_seconds": self.round_s.summary(),
                "update_seconds": self.update_s.summary(),
                "workers": {role: {k: s.summary() for k, s in d.items()}
                            for role, d in self.worker.items()}}


def earlier_wall_s(record: Mapping[str, Any]) -> float:
    """The wall time a checkpoint's record says the run had taken (older checkpoints, which
    lack it, give the time since their session's record began)."""
    return float(record.get("wall_s", record.get("elapsed_s", 0.0)))


def _number(value: float) -> float | None:
    """A finite value, or None (JSON has no NaN): an accuracy the loss does not report."""
    return value if math.isfinite(value) else None


def build_result(cfg: TrainConfig, algo: Algorithm, recorder: Recorder, state: AlgoState,
                 total_steps: int, batches_per_epoch: int, info: dict[str, Any], wall_s: float,
                 **extra: Any) -> dict[str, Any]:
    """The content of result.json. The test accuracy it reports is the last evaluation's, or
    with a validation split the best validation epoch's (``sampa_ray.selection``)."""
    by_val = cfg.val_split > 0
    last = selected_epoch(recorder.epochs, by_validation=by_val)
    if by_val:
        extra = {"selection": selection(recorder.epochs), **extra}
    if info.get("label_noise"):  # the flipped training samples (sampa_ray.data.noise)
        extra = {"label_noise": info["label_noise"], **extra}
    return {
        "version": __version__,
        "config": cfg.model_dump(),
        "config_hash": cfg.hash(),
        "algorithm": {**algo.config(), "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
                      "bn_stats_role": algo.bn_stats_role},
        "num_params": info["num_params"],
        "num_classes": info.get("num_classes"),
        "steps": state.step,
        "planned_steps": total_steps,
        "batches_per_epoch": batches_per_epoch,
        "gradient_rounds": recorder.rounds,
        "rounds_per_update": algo.rounds_per_update(),
        # measured: the rounds run (each one gradient's time: a round's gradients are computed
        # at once) over the updates made, bootstrap and skipped updates included
        "sequential_gradients_per_update": recorder.rounds / state.step if state.step else None,
        "wall_time_s": wall_s,
        "final_test_accuracy": last["test_accuracy"] if last else None,
        "final_test_loss": last["test_loss"] if last else None,
        "epochs": recorder.epochs,
        "timings": recorder.timing_summary(),
        "trace": recorder.trace,
        # fp16: the loss scale where the run ended (its skips: timings.scaler_skips)
        **({"loss_scale": recorder.loss_scale} if recorder.loss_scale is not None else {}),
        **extra,
    }


def write_json_atomic(path: Path, data: Any) -> None:
    """``path`` is the old file or the whole new one; a failed write is one line, no ``.tmp``."""
    write_atomic(path, json.dumps(data, indent=2, default=str).encode())


def write_outputs(out: Path, result: dict[str, Any], x: torch.Tensor,
                  buffers: dict[str, torch.Tensor]) -> None:
    """Write result.json, final.pt (flat parameters + model buffers) and curves.png into out,
    result.json last: it marks the run finished. Each file is serialised in memory, then written
    atomically, so a full disk gives one line naming the file and leaves no ``.tmp``."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"x": x.detach().cpu(), "buffers": buffers}, buf)
    write_atomic(out / "final.pt", buf.getvalue())
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())
