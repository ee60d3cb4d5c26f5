"""The break-even point of the study: where SAM/SAMPa drops below 1 along a sweep of the emulated
link (bandwidth from high to low, latency from low to high), and how bench.md words it."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .report import Aggregate


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


def sweeps(aggs: Sequence[Aggregate], over: str
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
    for k, sweep in sweeps(aggs, over).items():
        if len(sweep) < 2:  # one link setting along this axis: nothing to cross
            continue
        ys = [a.stats["sam_over_sampa"].median for a in sweep]
        if over == "bandwidth":
            xs = [math.inf if a.gbit_s is None else a.gbit_s for a in sweep]
            out[k] = break_even(xs, ys, log_x=True)
        else:
            out[k] = break_even([a.key["latency_ms"] for a in sweep], ys, log_x=False)
    return out


