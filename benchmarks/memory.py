"""Whether any process of a Ray run grows with the run's length: resident memory per process.

    .venv/bin/python benchmarks/memory.py [--steps 20000] [--after 1000] [--limit-mib 10]
        [--every 100] [--window 1000] [--algo sampa] [--data-path auto] [--transport ray]
        [--csv FILE] [--samples FILE]

Starts an embedded Ray instance the way ``sampa-ray train`` does, runs one job with the
defaults (the digits CNN, SAMPa, the replicated path, an evaluation every epoch) for --steps
updates, and samples the resident set size (RSS) of every process of the session every --every
steps: this process (the driver), and its descendants, which are all of the instance's
processes (gcs_server, raylet, the dashboard agents, the log monitor, and the worker processes:
the coordinator, the gradient workers, idle ones). Printed per process alive at step --after
and at the end: its RSS at both (the median of the samples in the --window steps from --after
on, and in the last --window steps: one worker's RSS swings by about 10 MiB from one sample to
the next), the growth, the slope of a least-squares line through the samples from --after on in
MiB per 1,000 steps, and the swing (largest less smallest of those samples). The last sample is
the last one taken while the run still trains: what its end costs once (the final evaluation,
the outputs and their plot: about 7 MiB in the coordinator) does not grow with the run. Exit
code 1 when any process grew by --limit-mib or more after step --after, 0 otherwise. A
benchmark, not a test: 20,000 steps take about six minutes on two shared cores. Progress goes
to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from sampa_ray.config import TrainConfig
from sampa_ray.ray.driver import run_ray, start_local

#: Ray ships psutil (ray/thirdparty_files) and puts it on the import path once imported
psutil: Any = importlib.import_module("psutil")

MIB = 1024 * 1024


def label(p: Any) -> str:
    """A short, stable name for one of the session's processes."""
    if p.pid == os.getpid():
        return "driver"
    try:
        cmd = p.cmdline()
        name = p.name()
    except psutil.Error:
        return f"pid {p.pid}"
    first = cmd[0] if cmd else name
    if first.startswith("ray::"):  # a worker process: ray::Coordinator.run -> Coordinator
        return first.split()[0].split(".")[0]
    for arg in cmd[1:] if "python" in Path(first).name else cmd[:1]:
        if not arg.startswith("-"):
            return Path(arg).name  # gcs_server, raylet, log_monitor.py, agent.py, main.py
    return name


class Sampler:
    """RSS of every process of the session, sampled at a step."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.names: dict[int, str] = {}
        self.samples: list[tuple[int, dict[int, int]]] = []

    def sample(self, step: int) -> None:
        rss = {}
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                rss[p.pid] = p.memory_info().rss
                if p.pid not in self.names or self.names[p.pid] == "ray::IDLE":
                    self.names[p.pid] = label(p)  # an idle worker may become an actor
            except psutil.Error:
                continue  # ended meanwhile
        self.samples.append((step, rss))

    def table(self, after: int, window: int) -> list[dict[str, Any]]:
        """Per process alive from step ``after`` to the end: its RSS at both (the median of
        the samples in the ``window`` steps from ``after`` on, and in the last ``window``
        steps: one sample may catch a worker mid-evaluation), the growth, the fitted slope,
        and the swing (largest less smallest sample from ``after`` on)."""
        later = [(s, r) for s, r in self.samples if s >= after]
        if len(later) < 2 or later[-1][0] - later[0][0] < window:
            raise SystemExit(f"memory: too few samples from step {after} on; run more --steps")
        head = [r for s, r in later if s < later[0][0] + window]
        tail = [r for s, r in later if s > later[-1][0] - window]
        rows = []
        alive = set(later[0][1]) & set(later[-1][1])
        for pid in sorted(alive, key=lambda p: (self.names[p], p)):
            pts = [(s, r[pid]) for s, r in later if pid in r]
            a = statistics.median(r[pid] for r in head if pid in r) / MIB
            b = statistics.median(r[pid] for r in tail if pid in r) / MIB
            ys = [y for _, y in pts]
            rows.append({"process": self.names[pid], "pid": pid, "from_step": later[0][0],
                         "to_step": later[-1][0], "rss_from_mib": a, "rss_to_mib": b,
                         "growth_mib": b - a, "mib_per_1000_steps": slope(pts) * 1000 / MIB,
                         "swing_mib": (max(ys) - min(ys)) / MIB})
        return rows


def slope(pts: list[tuple[int, int]]) -> float:
    """Least-squares slope of y over x."""
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--after", type=int, default=1000, help="the step growth is counted from")
    ap.add_argument("--every", type=int, default=100, help="sample every N steps")
    ap.add_argument("--window", type=int, default=1000, help="the RSS at step --after and at "
                    "the end: the median of the samples in this many steps")
    ap.add_argument("--limit-mib", type=float, default=10.0)
    ap.add_argument("--algo", default="sampa")
    ap.add_argument("--data-path", default="auto")
    ap.add_argument("--transport", default="ray")
    ap.add_argument("--csv", type=Path, help="also write the table here")
    ap.add_argument("--samples", type=Path, help="also write every sample here (JSON: step, "
                    "then MiB by process name and pid)")
    args = ap.parse_args(argv)

    sampler = Sampler()
    nxt = [0]
    t0 = time.monotonic()

    def progress(ev: dict[str, Any]) -> None:
        if ev.get("kind") != "round":
            return
        step = ev["step"]
        if nxt[0] <= step < args.steps:  # the last round may come after the run's end
            sampler.sample(step)
            nxt[0] = (step // args.every + 1) * args.every
            if step // args.every % 8 == 0:
                print(f"step {step}/{args.steps}  {time.monotonic() - t0:.0f}s",
                      file=sys.stderr, flush=True)

    start_local()  # as `sampa-ray train` does; run_ray leaves it running for the last sample
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(steps=args.steps, algo=args.algo, data_path=args.data_path,
                              transport=args.transport, out=tmp)
            run_ray(cfg, Path(tmp) / "run", progress)
    finally:
        ray.shutdown()
    rows = sampler.table(args.after, args.window)

    print(f"RSS per process, {args.algo} on the {args.transport} transport "
          f"({args.data_path} path), {args.steps} steps in {time.monotonic() - t0:.0f}s; "
          f"from step {rows[0]['from_step']} to {rows[0]['to_step']} (MiB; at each end the "
          f"median of {args.window} steps' samples):")
    print(f"{'process':<22} {'pid':>7} {'from':>7} {'end':>7} {'growth':>7} "
          f"{'per 1k steps':>12} {'swing':>6}")
    for r in rows:
        print(f"{r['process']:<22} {r['pid']:>7} {r['rss_from_mib']:>7.1f} "
              f"{r['rss_to_mib']:>7.1f} {r['growth_mib']:>+7.2f} "
              f"{r['mib_per_1000_steps']:>+12.3f} {r['swing_mib']:>6.1f}")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.samples:
        args.samples.write_text(json.dumps([
            {"step": step, **{f"{sampler.names.get(p, p)} {p}": round(v / MIB, 2)
                              for p, v in rss.items()}}
            for step, rss in sampler.samples], indent=1))
    grew = [r for r in rows if r["growth_mib"] >= args.limit_mib]
    for r in grew:
        print(f"memory: {r['process']} (pid {r['pid']}) grew by {r['growth_mib']:.1f} MiB "
              f"after step {r['from_step']} (limit {args.limit_mib:g})", file=sys.stderr)
    return 1 if grew else 0


if __name__ == "__main__":
    sys.exit(main())
