"""Terminal output: a progress bar during a run, a summary after it, the comparison table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .events import EpochEvent, Event, InfoEvent, RoundEvent

console = Console(stderr=True, soft_wrap=True)  # one event, one line: logs stay greppable
out_console = Console(soft_wrap=True)


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


class ProgressView:
    """Receives a run's progress events (:mod:`sampa_ray.events`) and shows them: info lines
    and epochs as lines, rounds on the bar; evaluations are in the epoch rows of the result."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
            TextColumn("comm {task.fields[comm]}"), TimeElapsedColumn(),
            console=console, transient=False)
        self.task: Any = None
        self.algo: str | None = None
        self.step: int | None = None  # the last round's step: where an interrupted run stood

    def __enter__(self) -> ProgressView:
        return self  # the bar starts with the first round: errors before it print alone

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, InfoEvent):
            console.print(ev.text, markup=False, highlight=False)
        elif isinstance(ev, EpochEvent):
            console.print(f"\\[{ev.algo or self.label}] epoch {ev.epoch:.2f}  step {ev.step}  "
                          f"train loss {_fmt(ev.train_loss)}  "
                          f"train acc {_fmt(ev.train_accuracy, '.3f')}  "
                          f"{ev.wall_s:.1f}s")
        elif isinstance(ev, RoundEvent):
            self._round(ev)

    def _round(self, ev: RoundEvent) -> None:
        label = ev.algo or self.label
        self.step = ev.step
        if self.task is None or label != self.algo:
            if self.task is None:
                self.progress.start()
            self.algo = label
            self.task = self.progress.add_task(label, total=ev.total, loss="-",
                                               rate="-", comm="-")
        # the rate the loop measured (its updates over its own time): on Ray the events
        # arrive in batches, four times a second, so their arrival times say nothing of it
        self.progress.update(self.task, completed=ev.step, loss=_fmt(ev.loss),
                             rate=_fmt(ev.steps_per_s, ".1f"), comm=_fmt(ev.comm_share, ".0%"))


def print_result(result: dict[str, Any], out: Path) -> None:
    acc = result.get("final_test_accuracy")
    sel = result.get("selection")  # a validation split: the best validation epoch's model
    which = f" (best validation epoch {sel['epoch']:g})" if sel else ""
    out_console.print(f"{result['config']['algo']}: test accuracy {_fmt(acc, '.4f')}{which} "
                      f"after {result['steps']} steps ({result['gradient_rounds']} gradient "
                      f"rounds) in {result['wall_time_s']:.1f}s; outputs in {out}")


def per_update(r: dict[str, Any]) -> tuple[float, float | None, float | None]:
    """Seconds per update of a run (the mean time between updates once running; the wall time
    over the steps when there is no such record), the compute on its critical path (the slowest
    worker's, summed over the update's sequential rounds) and the rest: the overhead."""
    t = r.get("timings", {})
    step, compute = t.get("step_seconds", {}), t.get("update_compute_seconds", {})
    if step.get("count") and compute.get("count"):
        return step["mean"], compute["mean"], step["mean"] - compute["mean"]
    return r["wall_time_s"] / max(1, r["steps"]), None, None


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table`` on ``console`` (default: stdout). At a terminal it fits the terminal, as
    rich does; into a file or a pipe, which has no width to fit, every column gets its natural
    width, so no header or value is cut or wrapped (rich would squeeze it into 80 columns)."""
    console = console or out_console
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(1 << 20), table).maximum
    # print's own width can only narrow a console: a console as wide as the table writes it
    Console(file=console.file, width=max(natural, console.width)).print(table)


def print_comparison(results: dict[str, dict[str, Any]],
                     console: Console | None = None) -> list[dict[str, Any]]:
    """Print the comparison table; returns its rows. Per update: the time, the compute on its
    critical path, and the overhead (rounds' dispatch, transfers, the update, waiting)."""
    table = Table(title="Compared on the same data, seed and model")
    # the devices each run used, where runs use different numbers of them (Ray: SGD and SAM one
    # group, SAMPa two, the data-parallel baseline all)
    show_devices = any("role_groups" in r for r in results.values())
    cols = ("algorithm", "devices", "test accuracy", "wall time (s)", "s / update",
            "sequential gradients / update", "compute / update", "overhead / update")
    for col in cols:
        if col != "devices" or show_devices:
            table.add_column(col, justify="right")
    rows = []
    for algo, r in results.items():
        step, compute, overhead = per_update(r)
        devices = r.get("role_groups", {}).get("devices", 1)
        row = {"algorithm": algo, "devices": devices, "test_accuracy": r["final_test_accuracy"],
               "wall_time_s": r["wall_time_s"], "seconds_per_update": step,
               "compute_per_update_s": compute, "overhead_per_update_s": overhead,
               "gradient_rounds": r["gradient_rounds"],
               "sequential_gradients_per_update": r.get("sequential_gradients_per_update")}
        rows.append(row)
        share = f" ({overhead / step:.0%})" if overhead is not None and step > 0 else ""
        table.add_row(algo, *([str(devices)] if show_devices else []), _fmt(row["test_accuracy"]),
                      f"{r['wall_time_s']:.1f}",
                      f"{step:.4f}", _fmt(row["sequential_gradients_per_update"], ".2f"),
                      "-" if compute is None else f"{compute:.4f}",
                      "-" if overhead is None else f"{overhead:.4f}{share}")
    print_table(table, console)
    return rows
