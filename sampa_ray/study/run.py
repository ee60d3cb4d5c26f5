"""Running the study: every configuration of a :class:`~.spec.BenchSpec` on Ray, as few sessions
as possible, each run's ``result.json`` kept and everything else it wrote thrown away.

One ``run_ray_many`` call per (model, transport) holds every data path, link, repeat and
algorithm, ordered repeat by repeat: the runs share one coordinator and one pair of workers
(like for like), and slow drifts of the machine spread over all configurations instead of
landing on one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..algorithms import BUILTIN
from ..errors import UserError
from ..outdir import prepare_out
from .report import round_costs, run_row, step_seconds
from .spec import CPU_MODELS, GPU_MODELS, BenchSpec, LinkSetting


@dataclass
class _Planned:
    model: str
    transport: str
    data_path: str
    link: LinkSetting
    repeat: int
    algo: str
    run_dir: Path
    keep: Path  # where its result.json is kept

    @property
    def group(self) -> tuple[Any, ...]:
        return (self.model, self.transport, self.data_path, self.link, self.repeat)


class _Collector:
    """Progress callback of ``run_ray_many``: as each run's result.json appears (written last,
    atomically), keeps it under ``runs/`` and deletes the rest of the run's folder (final.pt,
    checkpoints: large for large models), and prints a line per finished configuration."""

    def __init__(self, planned: Sequence[_Planned], spec: BenchSpec,
                 say: Callable[[str], None]) -> None:
        self.todo = list(planned)
        self.steps: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
        self.spec, self.say = spec, say
        self.last = 0.0
        self.shown_placement = False

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev.get("kind") == "info" and ev.get("text", "").startswith("placement:") \
                and not self.shown_placement:
            self.say(ev["text"])
            self.shown_placement = True
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            self.sweep()

    def sweep(self) -> None:
        """Collect every planned run whose result.json is there."""
        left = []
        for p in self.todo:
            result = p.run_dir / "result.json"
            if not result.exists():
                left.append(p)
                continue
            p.keep.parent.mkdir(parents=True, exist_ok=True)
            os.replace(result, p.keep)
            shutil.rmtree(p.run_dir, ignore_errors=True)
            with open(p.keep) as f:
                self.steps[p.group][p.algo] = step_seconds(json.load(f))
            s = self.steps[p.group]
            if len(s) == len(BUILTIN):
                bw = "none" if p.link.gbit_s is None else f"{p.link.gbit_s:g} Gbit/s"
                ratio = s["sam"] / s["sampa"] if s["sampa"] else math.nan
                self.say(f"{p.model} {p.transport}/{p.data_path} latency {p.link.latency_ms:g} "
                         f"ms, bandwidth {bw}, repeat {p.repeat + 1}/{self.spec.repeats}: "
                         f"SGD {s['sgd'] * 1e3:.1f} ms  SAM {s['sam'] * 1e3:.1f} ms  "
                         f"SAMPa {s['sampa'] * 1e3:.1f} ms  SAM/SAMPa {ratio:.2f}")
        self.todo = left


def _gpu_cluster(device: str) -> bool:
    import ray

    if device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) >= 1


def prepare(spec: BenchSpec) -> Path:
    """Make ``spec.out`` ready for a study: a folder that is not empty is refused unless
    ``overwrite``, and then an earlier study's ``runs/`` and ``work/`` are removed so no stale
    run is mixed into the new one."""
    out = spec.out
    if out.is_dir() and any(out.iterdir()):
        if not spec.overwrite:
            raise UserError(f"out: {out} is not empty (choose another --out or pass "
                            "--overwrite)")
        for name in ("runs", "work"):  # no stale runs mixed into the new study
            shutil.rmtree(out / name, ignore_errors=True)
    return prepare_out(out, spec.overwrite)


def _plan(spec: BenchSpec, model: str, transport: str, paths: Sequence[str],
          links: Sequence[LinkSetting]) -> tuple[list[_Planned], list[tuple[Any, Path]]]:
    """The runs of one session (one model, one transport), repeat by repeat."""
    from ..config import make_config

    work = spec.out / "work"
    planned: list[_Planned] = []
    runs = []
    for rep in range(spec.repeats):
        for path in paths:
            for link in links:
                name = f"{model}-{transport}-{path}-{link.tag()}-r{rep + 1}"
                for algo in BUILTIN:
                    cfg = make_config({
                        "algo": algo, "model": model, "dataset": "synthetic",
                        "synthetic_size": 8 * spec.batch_size,
                        "batch_size": spec.batch_size, "steps": spec.steps,
                        "backend": "ray", "threads": spec.threads,
                        "device": spec.device, "eval_every": 1000,
                        "transport": transport, "data_path": path,
                        "link_latency_ms": link.latency_ms,
                        "link_gbit_s": link.gbit_s,
                        "wire_dtype": spec.wire_dtype})
                    p = _Planned(model, transport, path, link, rep, algo, work / name / algo,
                                 spec.out / "runs" / name / f"{algo}.json")
                    planned.append(p)
                    runs.append((cfg, p.run_dir))
    return planned, runs


def run_study(spec: BenchSpec, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every configuration; returns the CSV rows (one per configuration and repeat, with
    the per-round costs when ``spec.round_costs``). Ray must be initialised, or reachable (see
    ``sampa_ray.ray.connect``) when ``spec.models`` names the models."""
    from ..ray import run_ray_many

    models = spec.models or list(GPU_MODELS if _gpu_cluster(spec.device) else CPU_MODELS)
    links = spec.links()
    work = spec.out / "work"
    rows: list[dict[str, Any]] = []
    n_runs = len(models) * len(spec.combos()) * len(links) * spec.repeats * len(BUILTIN)
    say(f"bench: {len(models)} model(s) x {len(spec.combos())} transport/data path(s) x "
        f"{len(links)} link(s) x {spec.repeats} repeat(s) x {len(BUILTIN)} algorithms = "
        f"{n_runs} runs of {spec.steps} steps; outputs in {spec.out}")
    try:
        for model in models:
            for transport in spec.transports:
                paths = [p for t, p in spec.combos() if t == transport]
                if not paths:
                    continue
                planned, runs = _plan(spec, model, transport, paths, links)
                collector = _Collector(planned, spec, say)
                results = run_ray_many(runs, progress=collector)
                collector.sweep()
                if len(results) < len(runs):
                    say(f"bench: stopped after {len(results)} of {len(runs)} runs")
                by_group: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
                for p, r in zip(planned, results, strict=False):
                    by_group[p.group][p.algo] = r
                for group, res in by_group.items():
                    if len(res) == len(BUILTIN):
                        row = run_row(res, group[3], group[4] + 1)
                        if spec.round_costs:
                            row.update(round_costs(res))
                        rows.append(row)
                if len(results) < len(runs):
                    raise UserError("bench: a run was stopped through the control API")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    order = {(m, t, p, lk): i for i, (m, t, p, lk) in enumerate(
        (m, t, p, lk) for m in models for t, p in spec.combos() for lk in links)}
    rows.sort(key=lambda r: (order[(r["model"], r["transport"], r["data_path"],
                                    LinkSetting(r["latency_ms"], None if r["bandwidth_gbit"]
                                                == "none" else r["bandwidth_gbit"]))],
                             r["repeat"]))
    return rows
