"""Running the study: every configuration of a :class:`~.spec.BenchSpec` on Ray, as few sessions
as possible, each run's ``result.json`` kept and everything else it wrote thrown away.

One ``run_ray_many`` call per (model, k, transport) holds every data path, link, repeat and
algorithm, ordered repeat by repeat: the runs share one coordinator and one set of 2k workers
(like for like: SGD and SAM on one group of k, their data-parallel baselines on all 2k, SAMPa on
both groups), and slow drifts of the machine spread over all configurations instead of landing
on one. Each k (``--workers-per-role``) gets its own actors: the workers' count and process
groups are fixed for a session (``sampa_ray.ray.run.WORKER_FIELDS``), while ``data_parallel`` may
change from run to run on the same actors.
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
from ..events import Event, InfoEvent
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
    algo: str  # sgd, sam, sampa, sgd-ddp or sam-ddp
    run_dir: Path
    keep: Path  # where its result.json is kept
    k: int = 1  # workers per role of the session
    algos: tuple[str, ...] = BUILTIN  # every algorithm of its configuration

    @property
    def group(self) -> tuple[Any, ...]:
        return (self.model, self.transport, self.data_path, self.link, self.k, self.repeat)


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

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, InfoEvent) and ev.text.startswith("placement:") \
                and not self.shown_placement:
            self.say(ev.text)
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
            if len(s) == len(p.algos):
                bw = "none" if p.link.gbit_s is None else f"{p.link.gbit_s:g} Gbit/s"
                ratio = s["sam"] / s["sampa"] if s["sampa"] else math.nan
                k = "" if p.k == 1 else f" k={p.k}"
                ddp = "".join(f"  {a.upper()} {s[a] * 1e3:.1f} ms"
                              for a in p.algos if a.endswith("-ddp"))
                self.say(f"{p.model} {p.transport}/{p.data_path}{k} latency "
                         f"{p.link.latency_ms:g} ms, bandwidth {bw}, repeat "
                         f"{p.repeat + 1}/{self.spec.repeats}: "
                         f"SGD {s['sgd'] * 1e3:.1f} ms  SAM {s['sam'] * 1e3:.1f} ms  "
                         f"SAMPa {s['sampa'] * 1e3:.1f} ms{ddp}  SAM/SAMPa {ratio:.2f}")
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
          links: Sequence[LinkSetting], k: int = 1
          ) -> tuple[list[_Planned], list[tuple[Any, Path]]]:
    """The runs of one session (one model, one k, one transport), repeat by repeat; an
    algorithm named ``<algo>-ddp`` is ``<algo>`` with ``data_parallel`` on the same actors."""
    from ..config import make_config

    work = spec.out / "work"
    planned: list[_Planned] = []
    runs = []
    algos = tuple(spec.algos(transport))
    for rep in range(spec.repeats):
        for path in paths:
            for link in links:
                # k = 1 keeps the folder names of studies before role groups
                name = (f"{model}-{transport}-{path}-{link.tag()}"
                        f"{'' if k == 1 else f'-k{k}'}-r{rep + 1}")
                for algo in algos:
                    cfg = make_config({
                        "algo": algo.removesuffix("-ddp"),
                        "data_parallel": algo.endswith("-ddp"),
                        "workers_per_role": k,
                        "model": model, "dataset": "synthetic",
                        "synthetic_size": 8 * spec.batch_size,
                        "batch_size": spec.batch_size, "steps": spec.steps,
                        "backend": "ray", "threads": spec.threads,
                        "device": spec.device, "eval_every": 1000,
                        "transport": transport, "data_path": path,
                        "link_latency_ms": link.latency_ms,
                        "link_gbit_s": link.gbit_s,
                        "wire_dtype": spec.wire_dtype,
                        # timed runs: no checkpoint may land inside the measured steps
                        "checkpoint_interval_s": 0})
                    p = _Planned(model, transport, path, link, rep, algo, work / name / algo,
                                 spec.out / "runs" / name / f"{algo}.json", k, algos)
                    planned.append(p)
                    runs.append((cfg, p.run_dir))
    return planned, runs


def run_study(spec: BenchSpec, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every configuration; returns the CSV rows (one per configuration, k and repeat,
    with the per-round costs when ``spec.round_costs``). Ray must be initialised, or reachable
    (see ``sampa_ray.ray.connect``) when ``spec.models`` names the models."""
    models = spec.models or list(GPU_MODELS if _gpu_cluster(spec.device) else CPU_MODELS)
    links = spec.links()
    work = spec.out / "work"
    rows: list[dict[str, Any]] = []
    per_model = sum(len(spec.algos(t)) for k in spec.workers_per_role for t, _ in spec.combos(k))
    n_runs = len(models) * per_model * len(links) * spec.repeats
    ks = " ".join(map(str, spec.workers_per_role))
    say(f"bench: {len(models)} model(s) x {len(spec.combos())} transport/data path(s) x "
        f"{len(links)} link(s) x {spec.repeats} repeat(s), workers per role {ks}, algorithms "
        f"{' '.join(spec.algos('ray'))} = {n_runs} runs of {spec.steps} steps; outputs in "
        f"{spec.out}")
    for k in spec.workers_per_role:
        skipped = sorted({t for t, _ in spec.combos()} - {t for t, _ in spec.combos(k)})
        if skipped:
            say(f"bench: k={k}: role groups run on the ray transport only; "
                f"{', '.join(skipped)} skipped")
    if spec.baseline == "ddp" and any(t != "ray" for t in spec.transports):
        say("bench: --baseline ddp: data-parallel groups run on the ray transport only; the "
            "other transports run sgd, sam and sampa")
    try:
        for model in models:
            for k in spec.workers_per_role:
                for transport in spec.transports:
                    _session(spec, model, k, transport, links, rows, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    order = {(m, t, p, lk, k): i for i, (m, t, p, lk, k) in enumerate(
        (m, t, p, lk, k) for m in models for k in spec.workers_per_role
        for t, p in spec.combos(k) for lk in links)}
    rows.sort(key=lambda r: (order[(r["model"], r["transport"], r["data_path"],
                                    LinkSetting(r["latency_ms"], None if r["bandwidth_gbit"]
                                                == "none" else r["bandwidth_gbit"]),
                                    r["workers_per_role"])],
                             r["repeat"]))
    return rows


def _session(spec: BenchSpec, model: str, k: int, transport: str,
             links: Sequence[LinkSetting], rows: list[dict[str, Any]],
             say: Callable[[str], None]) -> None:
    """One ``run_ray_many`` call: every data path, link, repeat and algorithm of (model, k,
    transport) on one set of 2k actors; appends a row per complete configuration and repeat."""
    from ..ray import run_ray_many

    paths = [p for t, p in spec.combos(k) if t == transport]
    if not paths:
        return
    planned, runs = _plan(spec, model, transport, paths, links, k)
    collector = _Collector(planned, spec, say)
    results = run_ray_many(runs, progress=collector)
    collector.sweep()
    if len(results) < len(runs):
        say(f"bench: stopped after {len(results)} of {len(runs)} runs")
    by_group: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for p, r in zip(planned, results, strict=False):
        by_group[p.group][p.algo] = r
    for group, res in by_group.items():
        if len(res) == len(spec.algos(transport)):
            row = run_row(res, group[3], group[5] + 1)
            if spec.round_costs:
                row.update(round_costs(res))
            rows.append(row)
    if len(results) < len(runs):
        raise UserError("bench: a run was stopped through the control API")
