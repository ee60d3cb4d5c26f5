"""What the study says: one row per configuration and repeat from its runs' ``result.json``
files, medians and spread over the repeats, the break-even links (``breakeven``), the step
time against the
devices used, and ``bench.csv`` / ``bench_runs.csv`` (bench.md and the plots: ``writeup``).

How SAMPa's round is split is described in the package docstring (``sampa_ray.study``); the
split is computed here from ``result.json`` alone, so a finished study can be re-reported
without running anything.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..algorithms import BUILTIN, SAMPa, baselines
from .spec import LinkSetting

#: SAMPa's roles: its round is split per role
ROLES = tuple(SAMPa.slots)
PARTS = ("compute", "copy", "transfer", "wait", "update", "other")

#: the algorithms a configuration may run, as rows and tables name them: SGD, SAM, SAMPa, and
#: with ``--baseline ddp`` SGD and SAM data-parallel over all 2k workers of the same actors
ALGOS = (*BUILTIN, *baselines())


def column(algo: str) -> str:
    """An algorithm's prefix in bench.csv's columns (``sam-ddp`` -> ``sam_ddp``)."""
    return algo.replace("-", "_")


#: per configuration, what role groups add: the data-parallel baselines' step times and
#: SAM-DDP/SAMPa (NaN where they did not run), and per algorithm the workers its run used and
#: its all-reduce per gradient (the group's sum; 0 without role groups)
GROUP_METRICS = ("sgd_ddp_ms", "sam_ddp_ms", "sam_ddp_over_sampa",
                 *(f"{column(a)}_devices" for a in ALGOS),
                 *(f"{column(a)}_allreduce_ms" for a in ALGOS))
#: numeric columns of bench.csv that are aggregated over repeats
METRICS = ("sgd_ms", "sam_ms", "sampa_ms", "sam_over_sampa", "sampa_over_sgd",
           "sampa_round_ms", "sampa_update_ms", "sampa_other_ms",
           *(f"sampa_{r}_{k}_ms" for r in ROLES for k in ("compute", "copy", "transfer", "wait")),
           "sampa_compute_ms", "sampa_copy_ms", "sampa_transfer_ms", "sampa_wait_ms",
           "sampa_transfer_share", "sampa_wait_share", *GROUP_METRICS)
#: what tells configurations apart; ``workers_per_role`` (k) last, so rows written before
#: role groups existed (without it) read as k = 1
KEY = ("model", "transport", "data_path", "latency_ms", "bandwidth_gbit", "workers_per_role")
COLUMNS = (*KEY, "repeat", "params", "grad_mb", "wire_dtype", "link_ms_per_message", "steps",
           "batch_size", "device", "placement", "threads", *METRICS)
#: bench_runs.csv: one row per algorithm run; ``over_sampa`` = its step time / SAMPa's in the
#: same configuration and repeat (SAMPa's speedup over it: > 1, SAMPa is faster)
RUN_COLUMNS = (*KEY, "repeat", "algo", "devices", "step_ms", "over_sampa", "allreduce_ms",
               "params", "wire_dtype", "steps", "batch_size", "device", "placement", "threads")
#: the optional per-round costs (``BenchSpec.round_costs``): numeric ones are aggregated too
ROUND_METRICS = ("one_busy_compute_ms", "both_busy_compute_ms", "sgd_overhead_ms",
                 "sampa_overhead_ms")
ROUND_COLUMNS = (*ROUND_METRICS, "collective")


# -- what one run says ----------------------------------------------------------------------------
def _median(summary: Mapping[str, Any] | None) -> float:
    if not summary or not summary.get("count"):
        return 0.0
    return float(summary["median"])


def step_seconds(result: Mapping[str, Any]) -> float:
    """A run's median wall time per parameter update (0.0 when nothing was timed)."""
    return _median(result["timings"]["step_seconds"])


def sampa_breakdown(result: Mapping[str, Any]) -> dict[str, float]:
    """SAMPa's round split (seconds) from one run's ``result.json``: per role compute / copy /
    transfer / wait, and round, update, other, step (see the package docstring)."""
    t = result["timings"]
    round_s = _median(t["round_seconds"])
    update_s = _median(t["update_seconds"])
    step_s = _median(t["step_seconds"])
    roles = [r for r in ROLES if r in t["workers"]]
    ends: dict[int, dict[str, float]] = defaultdict(dict)
    for e in result.get("trace", []):
        ends[e["round"]][e["role"]] = e["end"]
    both = [d for d in ends.values() if all(r in d for r in roles)]
    out = {"round": round_s, "update": update_s, "step": step_s,
           "other": max(0.0, step_s - round_s - update_s)}
    for role in roles:
        w = t["workers"][role]
        compute = _median(w.get("compute"))
        copy = _median(w.get("copy_in")) + _median(w.get("copy_out"))
        wait = statistics.median(max(d.values()) - d[role] for d in both) if both else 0.0
        out[f"{role}_compute"] = compute
        out[f"{role}_copy"] = copy
        out[f"{role}_wait"] = wait
        out[f"{role}_transfer"] = max(0.0, round_s - compute - copy - wait)
    for k in ("compute", "copy", "transfer", "wait"):
        vals = [out[f"{r}_{k}"] for r in roles]
        out[k] = statistics.fmean(vals) if vals else 0.0
    return out


def slowest_compute(result: Mapping[str, Any]) -> float:
    """The slower role's median compute (forward + backward) per gradient, seconds; a run with
    one role (SGD, SAM) has one worker busy, SAMPa both."""
    return max(_median(w.get("compute")) for w in result["timings"]["workers"].values())


def round_overhead(result: Mapping[str, Any]) -> float:
    """Median, over rounds, of what a round took beyond its slower gradient, seconds: the time
    from the last gradient of one round to the last of the next, less the next one's longest
    compute (from the per-round trace in result.json; the first rounds, with start-up, are left
    out). NaN when the trace holds too few rounds."""
    rounds: dict[int, list[Mapping[str, float]]] = {}
    for t in result.get("trace", []):
        rounds.setdefault(t["round"], []).append(t)
    ks = sorted(rounds)[2:]
    gaps = [max(t["end"] for t in rounds[k]) - max(t["end"] for t in rounds[j])
            - max(t["end"] - t["start"] for t in rounds[k])
            for j, k in zip(ks, ks[1:], strict=False)]
    return statistics.median(gaps) if gaps else math.nan


def devices_used(result: Mapping[str, Any]) -> int:
    """The gradient workers a run used, from its ``result.json``: the members of its role
    groups, or (one worker per role) its roles: SGD and SAM 1, SAMPa 2."""
    groups = (result.get("role_groups") or {}).get("groups")
    if groups:
        return len({w for g in groups.values() for w in g})
    return len(result["timings"]["workers"])


def allreduce_seconds(result: Mapping[str, Any]) -> float:
    """A run's median all-reduce per gradient (the group's sum, seconds), mean of its roles;
    0.0 without role groups."""
    vals = [_median(w.get("allreduce")) for w in result["timings"]["workers"].values()]
    return statistics.fmean(vals) if vals else 0.0


def round_costs(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The :data:`ROUND_COLUMNS` of a configuration: the workers' compute per gradient with one
    worker busy (SGD) and both busy (SAMPa, the slower role) -- what the machine allows -- and
    what the data path adds per round for SGD and SAMPa; ``collective``: SAMPa's peer-group
    backend, if it ran one."""
    return {"one_busy_compute_ms": slowest_compute(results["sgd"]) * 1e3,
            "both_busy_compute_ms": slowest_compute(results["sampa"]) * 1e3,
            "sgd_overhead_ms": round_overhead(results["sgd"]) * 1e3,
            "sampa_overhead_ms": round_overhead(results["sampa"]) * 1e3,
            "collective": (results["sampa"].get("collective") or {}).get("backend") or ""}


def run_row(results: Mapping[str, Mapping[str, Any]], link: LinkSetting,
            repeat: int) -> dict[str, Any]:
    """One CSV row from the result.json of a configuration's runs (keys: sgd, sam, sampa and,
    with the data-parallel baseline, sgd-ddp and sam-ddp: NaN where absent); ``repeat``
    counts from 1."""
    sampa = results["sampa"]
    cfg = sampa["config"]
    step = {a: step_seconds(results[a]) if a in results else math.nan for a in ALGOS}
    b = sampa_breakdown(sampa)
    nbytes = sampa["timings"].get("gradient_bytes") or int(sampa["num_params"]) * 4
    total = sum(b[p] for p in PARTS)
    row: dict[str, Any] = {
        "model": cfg["model"], "transport": sampa["transport"], "data_path": sampa["data_path"],
        "latency_ms": link.latency_ms,
        "bandwidth_gbit": "none" if link.gbit_s is None else link.gbit_s,
        "workers_per_role": int(cfg.get("workers_per_role", 1)),
        "repeat": repeat, "params": sampa["num_params"], "grad_mb": nbytes / 1e6,
        "wire_dtype": cfg.get("wire_dtype", "fp32"),
        "link_ms_per_message": link.delay_ms(nbytes), "steps": cfg["steps"],
        "batch_size": cfg["batch_size"], "device": sampa["device"],
        "placement": sampa["placement"]["mode"], "threads": sampa["placement"]["threads"],
        "sgd_ms": step["sgd"] * 1e3, "sam_ms": step["sam"] * 1e3, "sampa_ms": step["sampa"] * 1e3,
        "sam_over_sampa": step["sam"] / step["sampa"] if step["sampa"] else math.nan,
        "sampa_over_sgd": step["sampa"] / step["sgd"] if step["sgd"] else math.nan,
        "sampa_round_ms": b["round"] * 1e3, "sampa_update_ms": b["update"] * 1e3,
        "sampa_other_ms": b["other"] * 1e3,
    }
    for r in ROLES:
        for k in ("compute", "copy", "transfer", "wait"):
            row[f"sampa_{r}_{k}_ms"] = b.get(f"{r}_{k}", 0.0) * 1e3
    for k in ("compute", "copy", "transfer", "wait"):
        row[f"sampa_{k}_ms"] = b[k] * 1e3
    row["sampa_transfer_share"] = b["transfer"] / total if total else 0.0
    row["sampa_wait_share"] = b["wait"] / total if total else 0.0
    row["sgd_ddp_ms"] = step["sgd-ddp"] * 1e3
    row["sam_ddp_ms"] = step["sam-ddp"] * 1e3
    row["sam_ddp_over_sampa"] = step["sam-ddp"] / step["sampa"] if step["sampa"] else math.nan
    for a in ALGOS:
        r = results.get(a)
        row[f"{column(a)}_devices"] = devices_used(r) if r is not None else math.nan
        row[f"{column(a)}_allreduce_ms"] = allreduce_seconds(r) * 1e3 if r is not None \
            else math.nan
    return row


def algo_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """bench_runs.csv from bench.csv's rows: one row per algorithm run (:data:`RUN_COLUMNS`),
    the shape for "step time against devices" (one row per configuration holds five runs on
    different worker counts); algorithms that did not run are left out."""
    out = []
    for row in rows:
        sampa = float(row["sampa_ms"])
        for a in ALGOS:
            ms = float(row.get(f"{column(a)}_ms", math.nan))
            if math.isnan(ms):
                continue
            out.append({
                **{k: row.get(k, 1) for k in KEY}, "repeat": row["repeat"], "algo": a,
                "devices": int(row.get(f"{column(a)}_devices", 2 if a == "sampa" else 1)),
                "step_ms": ms, "over_sampa": ms / sampa if sampa else math.nan,
                "allreduce_ms": float(row.get(f"{column(a)}_allreduce_ms", 0.0)),
                **{k: row[k] for k in RUN_COLUMNS[len(KEY) + 6:]}})
    return out


# -- aggregation over repeats ---------------------------------------------------------------------
@dataclass
class Stat:
    """Median and spread (min-max) of one metric over the repeats."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """The summary of ``values``, NaNs left out (``n`` = 0 when nothing is left)."""
        v = [float(x) for x in values if not math.isnan(float(x))]
        if not v:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(v), min(v), max(v), len(v))

    def fmt(self, spec: str = ".1f") -> str:
        """``median (lo–hi)``; just the median when there is no spread; ``-`` when empty."""
        if self.n == 0:
            return "-"
        if self.n == 1 or self.lo == self.hi:
            return format(self.median, spec)
        return f"{self.median:{spec}} ({self.lo:{spec}}–{self.hi:{spec}})"


@dataclass
class Aggregate:
    """One configuration: its key fields and each metric's :class:`Stat` over the repeats."""

    key: dict[str, Any]
    stats: dict[str, Stat] = field(default_factory=dict)
    repeats: int = 0

    @property
    def gbit_s(self) -> float | None:
        bw = self.key["bandwidth_gbit"]
        return None if bw in (None, "none", "") else float(bw)

    @property
    def k(self) -> int:
        """Workers per role of the configuration."""
        return int(self.key.get("workers_per_role", 1))

    @property
    def path_label(self) -> str:
        """The data path, with ``k=K`` when role groups ran (k > 1): the existing tables and
        plots tell passes over the grid with different k apart by it."""
        return self.key["data_path"] + ("" if self.k == 1 else f" k={self.k}")

    @property
    def series(self) -> tuple[str, str, str]:
        return (self.key["model"], self.key["transport"], self.path_label)


def aggregate(rows: Sequence[Mapping[str, Any]],
              metrics: Sequence[str] = METRICS) -> list[Aggregate]:
    """Group the per-run rows by configuration (first-seen order) and summarise each of
    ``metrics`` (with ``BenchSpec.round_costs``: add :data:`ROUND_METRICS`)."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (*(str(row[k]) if k == "bandwidth_gbit" else row[k] for k in KEY[:-1]),
               int(row.get("workers_per_role", 1)))
        groups.setdefault(key, []).append(row)
    out = []
    for key, rs in groups.items():
        agg = Aggregate(dict(zip(KEY, key, strict=True)), repeats=len(rs))
        for m in metrics:  # a metric a row lacks (an older row, no baseline) counts as NaN
            agg.stats[m] = Stat.of([float(r.get(m, math.nan)) for r in rs])
        out.append(agg)
    return out


# -- outputs --------------------------------------------------------------------------------------
def bw_text(a: Aggregate) -> str:
    """The configuration's bandwidth cap for a table cell (Gbit/s, or none)."""
    return "none" if a.gbit_s is None else f"{a.gbit_s:g}"


def label(a: Aggregate) -> str:
    """A configuration in words: ``model transport/data path, latency, bandwidth``."""
    bw = "uncapped" if a.gbit_s is None else f"{a.gbit_s:g} Gbit/s"
    return (f"{a.key['model']} {a.key['transport']}/{a.path_label}, "
            f"{a.key['latency_ms']:g} ms, {bw}")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """bench.csv: :data:`COLUMNS`, and :data:`ROUND_COLUMNS` when the rows carry them."""
    extra = ROUND_COLUMNS if rows and all(c in rows[0] for c in ROUND_COLUMNS) else ()
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra])
        w.writeheader()
        w.writerows(rows)


def write_runs_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """bench_runs.csv: :func:`algo_rows` of bench.csv's rows (:data:`RUN_COLUMNS`)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RUN_COLUMNS))
        w.writeheader()
        w.writerows(algo_rows(rows))
