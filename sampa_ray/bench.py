"""``sampa-ray bench``: what communication costs SAMPa, measured side by side with SGD and SAM.

For every model, transport (ray | grpc), data path (points | replicated) and emulated link
(latency x bandwidth, applied per point/gradient message by the workers; see
``sampa_ray.ray_backend.Link``) it runs SGD, SAM and SAMPa one after the other on the same
coordinator and workers (``run_ray_many``) on synthetic data shaped for the model, ``--repeats``
times, and writes into ``--out``:

- ``bench.csv``: one row per run (configuration x repeat): the median time per parameter update
  of each algorithm, the ratios SAM/SAMPa and SAMPa/SGD, and SAMPa's round split per role;
- ``bench.md``: medians over the repeats with their spread (min-max), the SAMPa round split and
  the break-even links (where SAM/SAMPa drops below 1);
- ``speedup_vs_bandwidth.png``, ``speedup_vs_latency.png``: SAM/SAMPa against the link, one line
  per model, transport and data path, a line at 1.0 and the break-even points marked;
- ``breakdown.png``: SAMPa's step split into compute / copy / transfer / wait / update per
  configuration;
- ``runs/<configuration>-r<repeat>/<algo>.json``: each run's ``result.json``.

Repeats are separate runs on the same actors: one ``run_ray_many`` call per (model, transport)
holds every data path, link and repeat, ordered repeat by repeat, so slow drifts of the machine
spread over all configurations instead of landing on one.

How SAMPa's round is split (per role, from ``result.json`` medians, as ``sampa_ray.metrics``
splits it): compute = the worker's forward + backward; copy = host<->device copies of point,
batch and gradient; wait = how long the role's gradient waited for the slowest of the round;
transfer = round time - compute - copy - wait (everything else on that role's round trip: the
emulated link, serialisation, the object store or the gRPC streams, and on the replicated path
the replica's update, which runs inside the worker); update = the coordinator's update after the
round; other = step time - round - update (the loop's own overhead). ``result.json`` carries no
arrival times, so wait is estimated from its trace: per round, the latest compute end of the
round minus this role's compute end (both roles' results travel the same way after compute).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

ALGOS = ("sgd", "sam", "sampa")
ROLES = ("perturbed", "extrapolated")
CPU_MODELS = ("resnet20", "resnet56")
GPU_MODELS = ("resnet20", "resnet56", "wrn28_2", "wrn28_10")
TRANSPORTS = ("ray", "grpc")
DATA_PATHS = ("points", "replicated", "collective")
WIRE_DTYPES = ("fp32", "bf16")
PARTS = ("compute", "copy", "transfer", "wait", "update", "other")

#: numeric columns of bench.csv that are aggregated over repeats
METRICS = ("sgd_ms", "sam_ms", "sampa_ms", "sam_over_sampa", "sampa_over_sgd",
           "sampa_round_ms", "sampa_update_ms", "sampa_other_ms",
           *(f"sampa_{r}_{k}_ms" for r in ROLES for k in ("compute", "copy", "transfer", "wait")),
           "sampa_compute_ms", "sampa_copy_ms", "sampa_transfer_ms", "sampa_wait_ms",
           "sampa_transfer_share", "sampa_wait_share")
KEY = ("model", "transport", "data_path", "latency_ms", "bandwidth_gbit")
COLUMNS = (*KEY, "repeat", "params", "grad_mb", "wire_dtype", "link_ms_per_message", "steps",
           "batch_size", "device", "placement", "threads", *METRICS)


# -- the study's settings -----------------------------------------------------------------------
@dataclass(frozen=True)
class LinkSetting:
    """One emulated link: latency per message and a bandwidth cap (None: uncapped)."""

    latency_ms: float
    gbit_s: float | None

    def delay_ms(self, nbytes: int) -> float:
        """What one message of ``nbytes`` waits on this link."""
        return self.latency_ms + (nbytes * 8 / (self.gbit_s * 1e9) * 1e3 if self.gbit_s else 0.0)

    def tag(self) -> str:
        return f"lat{self.latency_ms:g}ms-bw{'none' if self.gbit_s is None else f'{self.gbit_s:g}'}"


@dataclass
class BenchSpec:
    """The validated flags of ``sampa-ray bench``."""

    models: list[str] | None  # None: the preset for the device (decided once Ray is up)
    transports: list[str]
    data_paths: list[str]
    latencies_ms: list[float]
    bandwidths: list[float | None]
    repeats: int
    steps: int
    batch_size: int
    threads: int | None
    device: str
    out: Path
    overwrite: bool = False
    wire_dtype: str = "fp32"

    def links(self) -> list[LinkSetting]:
        return [LinkSetting(lat, bw) for lat in self.latencies_ms for bw in self.bandwidths]

    def combos(self) -> list[tuple[str, str]]:
        """(transport, data path) pairs that exist: gRPC carries points only."""
        return [(t, p) for t in self.transports for p in self.data_paths
                if not (t == "grpc" and p != "points")]


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _choice(flag: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
    for v in values:
        if v not in allowed:
            raise UserError(f"--{flag}: unknown {v!r} (choose from {', '.join(allowed)})")
    return _unique(values)


def _number(flag: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"--{flag}: not a number: {text!r}") from None
    if not math.isfinite(v):
        raise UserError(f"--{flag}: must be finite, got {text!r}")
    return v


def parse_latencies(values: Sequence[str]) -> list[float]:
    """``--latency-ms`` values: numbers >= 0 (milliseconds per message), sorted ascending."""
    out = []
    for text in values:
        v = _number("latency-ms", text)
        if v < 0:
            raise UserError(f"--latency-ms: must be >= 0, got {text!r}")
        out.append(v)
    return sorted(_unique(out))


def parse_bandwidths(values: Sequence[str]) -> list[float | None]:
    """``--bandwidth-gbit`` values: ``none`` (uncapped) or numbers > 0 (Gbit/s); uncapped
    first, then from the fastest to the slowest link."""
    out: list[float] = []
    uncapped = False
    for text in values:
        if text.strip().lower() == "none":
            uncapped = True
            continue
        v = _number("bandwidth-gbit", text)
        if v <= 0:
            raise UserError(f"--bandwidth-gbit: must be > 0 or none (uncapped), got {text!r}")
        out.append(v)
    caps: list[float | None] = sorted(_unique(out), reverse=True)
    return [None, *caps] if uncapped else caps


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """Validate the flags into a :class:`BenchSpec`; a bad value is a UserError naming its flag."""
    from .models import MODEL_NAMES

    models = _choice("models", args.models, MODEL_NAMES) if args.models else None
    spec = BenchSpec(
        models=models,
        transports=_choice("transports", args.transports, TRANSPORTS),
        data_paths=_choice("data-paths", args.data_paths, DATA_PATHS),
        latencies_ms=parse_latencies(args.latency_ms),
        bandwidths=parse_bandwidths(args.bandwidth_gbit),
        repeats=args.repeats, steps=args.steps, batch_size=args.batch_size,
        threads=args.threads, device=args.device,
        out=Path(args.out) if args.out else
        Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
        overwrite=bool(args.overwrite),
        wire_dtype=_choice("wire-dtype", [args.wire_dtype], WIRE_DTYPES)[0])
    if spec.repeats < 1:
        raise UserError(f"--repeats: must be at least 1, got {spec.repeats}")
    if spec.steps < 2:
        raise UserError(f"--steps: must be at least 2 (the first update is not timed), "
                        f"got {spec.steps}")
    if spec.batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {spec.batch_size}")
    if spec.threads is not None and spec.threads < 1:
        raise UserError(f"--threads: must be at least 1, got {spec.threads}")
    if spec.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device: unknown {spec.device!r} (choose from auto, cpu, cuda)")
    if not spec.combos():
        raise UserError("--data-paths: the grpc transport carries points only; with "
                        "--transports grpc include points")
    return spec


def add_bench_command(subparsers: Any) -> None:
    """Register ``bench`` on the CLI's subparsers (handler: :func:`cmd_bench`)."""
    p = subparsers.add_parser(
        "bench", help="communication-cost study: SGD / SAM / SAMPa over emulated links",
        description="SGD, SAM and SAMPa side by side on the same Ray actors, on synthetic data, "
        "for every model x transport x data path x emulated link; writes bench.csv, bench.md "
        "and plots into --out.")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models to measure (default: resnet20 resnet56; on a GPU also "
                   "wrn28_2 wrn28_10)")
    p.add_argument("--transports", nargs="+", default=list(TRANSPORTS), metavar="T",
                   help="ray and/or grpc (default: both)")
    p.add_argument("--data-paths", nargs="+", default=list(DATA_PATHS), metavar="P",
                   help="points and/or replicated (default: both; grpc runs points only)")
    p.add_argument("--latency-ms", nargs="+", default=["0", "1", "5", "20"], metavar="MS",
                   help="emulated latency per message, ms (default: 0 1 5 20)")
    p.add_argument("--bandwidth-gbit", nargs="+", default=["none", "10", "1", "0.1"],
                   metavar="GBIT", help="emulated bandwidth caps, Gbit/s; none = uncapped "
                   "(default: none 10 1 0.1)")
    p.add_argument("--wire-dtype", default="fp32", metavar="D",
                   help="gradients on the wire: fp32 or bf16 (default: fp32)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (default: 3)")
    p.add_argument("--steps", type=int, default=12, help="updates per run; the first is not "
                   "timed (default: 12)")
    p.add_argument("--batch-size", type=int, default=32, help="default: 32")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker "
                   "(default: the CPUs of its placement bundle)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default: runs/bench-<timestamp>)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --out to name a folder that is not empty")
    p.set_defaults(func=cmd_bench)


# -- what one run says ----------------------------------------------------------------------------
def _median(summary: Mapping[str, Any] | None) -> float:
    if not summary or not summary.get("count"):
        return 0.0
    return float(summary["median"])


def sampa_breakdown(result: Mapping[str, Any]) -> dict[str, float]:
    """SAMPa's round split (seconds) from one run's ``result.json``: per role compute / copy /
    transfer / wait, and round, update, other, step (see the module docstring)."""
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


def run_row(results: Mapping[str, Mapping[str, Any]], link: LinkSetting,
            repeat: int) -> dict[str, Any]:
    """One CSV row from the three result.json of a configuration (keys: sgd, sam, sampa);
    ``repeat`` counts from 1."""
    sampa = results["sampa"]
    cfg = sampa["config"]
    step = {a: _median(results[a]["timings"]["step_seconds"]) for a in ALGOS}
    b = sampa_breakdown(sampa)
    nbytes = sampa["timings"].get("gradient_bytes") or int(sampa["num_params"]) * 4
    total = sum(b[p] for p in PARTS)
    row: dict[str, Any] = {
        "model": cfg["model"], "transport": sampa["transport"], "data_path": sampa["data_path"],
        "latency_ms": link.latency_ms,
        "bandwidth_gbit": "none" if link.gbit_s is None else link.gbit_s,
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
    return row


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
        v = [float(x) for x in values if not math.isnan(float(x))]
        if not v:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(v), min(v), max(v), len(v))

    def fmt(self, spec: str = ".1f") -> str:
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
    def series(self) -> tuple[str, str, str]:
        return (self.key["model"], self.key["transport"], self.key["data_path"])


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[Aggregate]:
    """Group the per-run rows by configuration (first-seen order) and summarise each metric."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        key = tuple(str(row[k]) if k == "bandwidth_gbit" else row[k] for k in KEY)
        groups.setdefault(key, []).append(row)
    out = []
    for key, rs in groups.items():
        agg = Aggregate(dict(zip(KEY, key, strict=True)), repeats=len(rs))
        for m in METRICS:
            agg.stats[m] = Stat.of([float(r[m]) for r in rs])
        out.append(agg)
    return out


# -- break-even -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BreakEven:
    """Where SAM/SAMPa first drops below 1 along a sweep ordered from the best link to the worst.

    kind: ``crossed`` (``value`` interpolated between the measured ``bracket``; ``value`` is None
    when the bracket starts at the uncapped link, which has no position to interpolate from),
    ``never`` (>= 1 at every measured point), ``always`` (< 1 already at the best link).
    """

    kind: Literal["crossed", "never", "always"]
    value: float | None = None
    bracket: tuple[float, float] | None = None


def break_even(xs: Sequence[float], speedups: Sequence[float], *, log_x: bool) -> BreakEven:
    """The x at which the speedup first drops below 1, walking ``xs`` in the given order (from
    the best link to the worst: bandwidth from high to low, latency from low to high).

    Linear interpolation between the two measured points around the crossing; with ``log_x``
    in log10(x) (bandwidths: the sweep is geometric), otherwise in x itself (latencies). An x of
    ``math.inf`` stands for the uncapped link. NaN speedups are skipped.
    """
    pts = [(float(x), float(y)) for x, y in zip(xs, speedups, strict=True) if not math.isnan(y)]
    if not pts:
        return BreakEven("never")
    if pts[0][1] < 1.0:
        return BreakEven("always")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if y1 < 1.0 <= y0:
            t = (y0 - 1.0) / (y0 - y1)
            if math.isinf(x0) or math.isinf(x1):
                return BreakEven("crossed", None, (x0, x1))
            if log_x:
                value = 10 ** (math.log10(x0) + t * (math.log10(x1) - math.log10(x0)))
            else:
                value = x0 + t * (x1 - x0)
            return BreakEven("crossed", value, (x0, x1))
    return BreakEven("never")


def _fmt_bw(x: float) -> str:
    return "uncapped" if math.isinf(x) else f"{x:.3g} Gbit/s"


def describe_break_even(be: BreakEven, unit: str) -> str:
    """One cell of bench.md: ``unit`` is ``Gbit/s`` (bandwidth sweep) or ``ms`` (latency)."""
    bw = unit == "Gbit/s"
    if be.kind == "never":
        return "never below 1 in the measured range"
    if be.kind == "always":
        return "below 1 already at the best measured link"
    assert be.bracket is not None
    lo, hi = be.bracket
    if be.value is None:
        return f"between {_fmt_bw(lo)} and {_fmt_bw(hi)}"
    where = f"{_fmt_bw(lo)} and {_fmt_bw(hi)}" if bw else f"{lo:g} and {hi:g} ms"
    val = _fmt_bw(be.value) if bw else f"{be.value:.3g} ms"
    return f"**{val}** (between {where})"


def _sweeps(aggs: Sequence[Aggregate], over: str
            ) -> dict[tuple[tuple[str, str, str], Any], list[Aggregate]]:
    """Sweeps of one link dimension with the other fixed: {(series, fixed value): aggregates
    ordered from the best link to the worst}."""
    out: dict[tuple[tuple[str, str, str], Any], list[Aggregate]] = defaultdict(list)
    for a in aggs:
        fixed = a.key["latency_ms"] if over == "bandwidth" else a.gbit_s
        out[(a.series, fixed)].append(a)
    for v in out.values():
        if over == "bandwidth":
            v.sort(key=lambda a: -math.inf if a.gbit_s is None else -a.gbit_s)
        else:
            v.sort(key=lambda a: a.key["latency_ms"])
    return out


def break_evens(aggs: Sequence[Aggregate], over: str
                ) -> dict[tuple[tuple[str, str, str], Any], BreakEven]:
    """Break-even of each sweep (``over`` = bandwidth | latency) on the median speedups."""
    out = {}
    for k, sweep in _sweeps(aggs, over).items():
        if len(sweep) < 2:  # one link setting along this axis: nothing to cross
            continue
        ys = [a.stats["sam_over_sampa"].median for a in sweep]
        if over == "bandwidth":
            xs = [math.inf if a.gbit_s is None else a.gbit_s for a in sweep]
            out[k] = break_even(xs, ys, log_x=True)
        else:
            out[k] = break_even([a.key["latency_ms"] for a in sweep], ys, log_x=False)
    return out


# -- outputs --------------------------------------------------------------------------------------
def _bw_text(a: Aggregate) -> str:
    return "none" if a.gbit_s is None else f"{a.gbit_s:g}"


def _label(a: Aggregate) -> str:
    bw = "uncapped" if a.gbit_s is None else f"{a.gbit_s:g} Gbit/s"
    return (f"{a.key['model']} {a.key['transport']}/{a.key['data_path']}, "
            f"{a.key['latency_ms']:g} ms, {bw}")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)


def markdown(aggs: Sequence[Aggregate], header: str = "") -> str:
    """bench.md: the step-time table, SAMPa's round split and the break-even links."""
    lines = ["# sampa-ray bench", ""]
    if header:
        lines += [header, ""]
    lines += ["Median over the repeats, (min–max) in brackets. Step = wall time per parameter "
              "update; SAM/SAMPa > 1: SAMPa's parallel gradients pay off.", "",
              "| model | transport | data path | latency (ms) | bandwidth (Gbit/s) | repeats | "
              "SGD step (ms) | SAM step (ms) | SAMPa step (ms) | SAM/SAMPa | SAMPa/SGD | "
              "SAMPa transfer share |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in aggs:
        s = a.stats
        lines.append(
            f"| {a.key['model']} | {a.key['transport']} | {a.key['data_path']} | "
            f"{a.key['latency_ms']:g} | {_bw_text(a)} | {a.repeats} | {s['sgd_ms'].fmt()} | "
            f"{s['sam_ms'].fmt()} | {s['sampa_ms'].fmt()} | {s['sam_over_sampa'].fmt('.2f')} | "
            f"{s['sampa_over_sgd'].fmt('.2f')} | {s['sampa_transfer_share'].fmt('.2f')} |")
    lines += ["", "## SAMPa's step, split (median ms; mean of the two roles)", "",
              "compute = forward + backward, copy = host↔device, transfer = the rest of the "
              "role's round trip, wait = for the slower role, update = the coordinator's "
              "update, other = the loop's overhead.", "",
              "| configuration | compute | copy | transfer | wait | update | other | step |",
              "|---|---|---|---|---|---|---|---|"]
    for a in aggs:
        s = a.stats
        lines.append(
            f"| {_label(a)} | {s['sampa_compute_ms'].fmt('.2f')} | "
            f"{s['sampa_copy_ms'].fmt('.2f')} | {s['sampa_transfer_ms'].fmt('.2f')} | "
            f"{s['sampa_wait_ms'].fmt('.2f')} | {s['sampa_update_ms'].fmt('.2f')} | "
            f"{s['sampa_other_ms'].fmt('.2f')} | {s['sampa_ms'].fmt('.2f')} |")
    lines += ["", "## Break-even: where SAM/SAMPa drops below 1", "",
              "Walking from the best link to the worst, the first crossing of 1 by the median "
              "SAM/SAMPa, interpolated linearly between the two measured points around it: in "
              "log10(bandwidth) for bandwidth, in milliseconds for latency.", "",
              "| model | transport | data path | sweep | with | break-even |",
              "|---|---|---|---|---|---|"]
    by_bw, by_lat = break_evens(aggs, "bandwidth"), break_evens(aggs, "latency")
    if not by_bw and not by_lat:
        lines[-2:] = ["One link setting per configuration: no sweep, no break-even."]
    for (series, lat), be in by_bw.items():
        lines.append(f"| {' | '.join(series)} | bandwidth | latency {lat:g} ms | "
                     f"{describe_break_even(be, 'Gbit/s')} |")
    for (series, bw), be in by_lat.items():
        with_ = "uncapped" if bw is None else f"{bw:g} Gbit/s"
        lines.append(f"| {' | '.join(series)} | latency | bandwidth {with_} | "
                     f"{describe_break_even(be, 'ms')} |")
    return "\n".join(lines) + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(aggs: Sequence[Aggregate]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Colour by model, line style by transport / data path."""
    models = _unique(a.key["model"] for a in aggs)
    paths = _unique((a.key["transport"], a.key["data_path"]) for a in aggs)
    dashes = ["-", "--", ":", "-."]
    colors = [f"C{i % 10}" for i in range(len(models))]
    return {a.series: {"color": colors[models.index(a.key["model"])],
                       "linestyle": dashes[paths.index(a.series[1:]) % len(dashes)]}
            for a in aggs}


def plot_speedup(path: Path, aggs: Sequence[Aggregate], over: str) -> None:
    """SAM/SAMPa against bandwidth (one panel per latency) or latency (one panel per
    bandwidth): median with min-max bars, a line at 1.0, break-even points marked (x)."""
    plt = _plt()
    sweeps = _sweeps(aggs, over)
    fixed = _unique(k[1] for k in sweeps)
    bes = break_evens(aggs, over)
    styles = _styles(aggs)
    caps = [a.gbit_s for a in aggs if a.gbit_s is not None]
    uncapped_x = max(caps) * 10 if caps else 100.0  # where "none" sits on the bandwidth axis
    fig, axes = plt.subplots(1, len(fixed), figsize=(5.2 * len(fixed), 4.2), squeeze=False)
    for ax, fv in zip(axes[0], fixed, strict=True):
        for (series, f), sweep in sweeps.items():
            if f != fv:
                continue
            if over == "bandwidth":
                xs = [uncapped_x if a.gbit_s is None else a.gbit_s for a in sweep]
            else:
                xs = [a.key["latency_ms"] for a in sweep]
            st = [a.stats["sam_over_sampa"] for a in sweep]
            ys = [s.median for s in st]
            err = [[s.median - s.lo for s in st], [s.hi - s.median for s in st]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=" ".join(series),
                        **styles[series])
            be = bes.get((series, f), BreakEven("never"))
            if be.kind == "crossed" and be.value is not None:
                ax.plot([be.value], [1.0], marker="X", markersize=11, color=styles[series]["color"],
                        markeredgecolor="black", zorder=5)
                ax.annotate(f"{be.value:.3g}", (be.value, 1.0), textcoords="offset points",
                            xytext=(4, 6), fontsize=8, color=styles[series]["color"])
        ax.axhline(1.0, color="black", linewidth=1)
        ax.grid(alpha=0.3)
        ax.set_ylabel("SAM / SAMPa step time")
        if over == "bandwidth":
            ax.set_xscale("log")
            ticks = sorted(set(caps)) + [uncapped_x]
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks[:-1]] + ["none"])
            ax.invert_xaxis()  # the link gets worse to the right
            ax.set_xlabel("bandwidth (Gbit/s)")
            ax.set_title(f"latency {fv:g} ms")
        else:
            ax.set_xlabel("latency per message (ms)")
            ax.set_title("bandwidth " + ("uncapped" if fv is None else f"{fv:g} Gbit/s"))
        ax.legend(fontsize=8)
    fig.suptitle(f"SAM/SAMPa vs {over} (X: break-even)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_breakdown(path: Path, aggs: Sequence[Aggregate]) -> None:
    """Stacked bars: the share of SAMPa's step in compute / copy / transfer / wait / update /
    other per configuration (medians over repeats), the step time written at the bar's end."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * len(aggs)))
    labels = [_label(a) for a in aggs]
    ypos = list(range(len(aggs)))
    left = [0.0] * len(aggs)
    colors = {"compute": "C2", "copy": "C8", "transfer": "C3", "wait": "C1", "update": "C0",
              "other": "0.7"}
    for part in PARTS:
        ms = [a.stats[f"sampa_{part}_ms"].median for a in aggs]
        total = [sum(a.stats[f"sampa_{p}_ms"].median for p in PARTS) or 1.0 for a in aggs]
        share = [m / t for m, t in zip(ms, total, strict=True)]
        ax.barh(ypos, share, left=left, color=colors[part], label=part)
        left = [lf + s for lf, s in zip(left, share, strict=True)]
    for y, a in zip(ypos, aggs, strict=True):
        ax.text(1.01, y, f"{a.stats['sampa_ms'].median:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("share of SAMPa's step (mean of the two roles)")
    ax.legend(ncol=len(PARTS), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, rows: Sequence[Mapping[str, Any]], header: str = "") -> str:
    """bench.csv, bench.md and the plots from the per-run rows; returns the markdown."""
    write_csv(out / "bench.csv", rows)
    aggs = aggregate(rows)
    md = markdown(aggs, header)
    (out / "bench.md").write_text(md)
    plot_speedup(out / "speedup_vs_bandwidth.png", aggs, "bandwidth")
    plot_speedup(out / "speedup_vs_latency.png", aggs, "latency")
    plot_breakdown(out / "breakdown.png", aggs)
    return md


# -- running the study ----------------------------------------------------------------------------
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
                self.steps[p.group][p.algo] = _median(
                    json.load(f)["timings"]["step_seconds"])
            s = self.steps[p.group]
            if len(s) == len(ALGOS):
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


def run_study(spec: BenchSpec, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every configuration; returns the CSV rows (one per configuration and repeat).
    Ray must be initialised (or reachable: see ``sampa_ray.ray_backend.connect``)."""
    from .config import make_config
    from .ray_backend import run_ray_many

    models = spec.models or list(GPU_MODELS if _gpu_cluster(spec.device) else CPU_MODELS)
    links = spec.links()
    work = spec.out / "work"
    rows: list[dict[str, Any]] = []
    n_runs = len(models) * len(spec.combos()) * len(links) * spec.repeats * len(ALGOS)
    say(f"bench: {len(models)} model(s) x {len(spec.combos())} transport/data path(s) x "
        f"{len(links)} link(s) x {spec.repeats} repeat(s) x 3 algorithms = {n_runs} runs of "
        f"{spec.steps} steps; outputs in {spec.out}")
    try:
        for model in models:
            for transport in spec.transports:
                paths = [p for t, p in spec.combos() if t == transport]
                if not paths:
                    continue
                planned: list[_Planned] = []
                runs = []
                for rep in range(spec.repeats):
                    for path in paths:
                        for link in links:
                            name = f"{model}-{transport}-{path}-{link.tag()}-r{rep + 1}"
                            for algo in ALGOS:
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
                                p = _Planned(model, transport, path, link, rep, algo,
                                             work / name / algo,
                                             spec.out / "runs" / name / f"{algo}.json")
                                planned.append(p)
                                runs.append((cfg, p.run_dir))
                collector = _Collector(planned, spec, say)
                results = run_ray_many(runs, progress=collector)
                collector.sweep()
                if len(results) < len(runs):
                    say(f"bench: stopped after {len(results)} of {len(runs)} runs")
                by_group: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
                for p, r in zip(planned, results, strict=False):
                    by_group[p.group][p.algo] = r
                for group, res in by_group.items():
                    if len(res) == len(ALGOS):
                        rows.append(run_row(res, group[3], group[4] + 1))
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


def _prepare(spec: BenchSpec) -> Path:
    from .cli import prepare_out

    out = spec.out
    if out.is_dir() and any(out.iterdir()):
        if not spec.overwrite:
            raise UserError(f"out: {out} is not empty (choose another --out or pass "
                            "--overwrite)")
        for name in ("runs", "work"):  # no stale runs mixed into the new study
            shutil.rmtree(out / name, ignore_errors=True)
    return prepare_out(out, spec.overwrite)


def cmd_bench(args: argparse.Namespace) -> int:
    """``sampa-ray bench``: run the study, write the outputs, print the table."""
    spec = spec_from_args(args)
    _prepare(spec)
    from .config import make_config
    from .ray_backend import connect

    started = connect(make_config({"backend": "ray", "device": spec.device}))
    try:
        rows = run_study(spec)
    finally:
        if started:
            import ray

            ray.shutdown()
    if not rows:
        raise UserError("bench: no run finished")
    r0 = rows[0]
    header = (f"{time.strftime('%Y-%m-%d %H:%M')}, device {r0['device']}, placement "
              f"{r0['placement']} ({r0['threads']} thread(s) per worker), {r0['steps']} steps "
              f"(the first not timed), batch {r0['batch_size']}, {spec.repeats} repeat(s), "
              f"{r0['wire_dtype']} gradients on the wire, "
              "synthetic data, emulated links.")
    md = write_report(spec.out, rows, header)
    print(md)
    print(f"wrote {spec.out / 'bench.csv'}, {spec.out / 'bench.md'}, "
          f"speedup_vs_bandwidth.png, speedup_vs_latency.png and breakdown.png there")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sampa_ray.bench [flags]``: the same as ``sampa-ray bench [flags]``."""
    import sys

    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
