"""Step time against the devices used, at a fixed global batch: SGD(k) and SAM(k) on one role
group of k, SGD-DDP and SAM-DDP over all 2k workers, SAMPa over two groups of k (bench.md's
table; the plot is ``plots.plot_scaling``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .report import Aggregate, Stat


def has_scaling(aggs: Sequence[Aggregate]) -> bool:
    """Whether the study measured anything to set against the devices used: several k, or k
    other than 1, or the data-parallel baseline."""
    return has_baseline(aggs) or any(a.k != 1 for a in aggs)


def has_baseline(aggs: Sequence[Aggregate]) -> bool:
    """Whether the data-parallel baseline (sgd-ddp, sam-ddp) ran in any configuration."""
    return any(a.stats.get(m, Stat.of([])).n for a in aggs for m in ("sgd_ddp_ms", "sam_ddp_ms"))


def _link_rank(a: Aggregate) -> tuple[float, float]:
    """Order of links from the best: lowest latency first, then uncapped, then the highest
    bandwidth (the order of ``BenchSpec.links``)."""
    return (float(a.key["latency_ms"]), -math.inf if a.gbit_s is None else -a.gbit_s)


def scaling_aggs(aggs: Sequence[Aggregate]) -> list[Aggregate]:
    """One aggregate per (model, transport, data path, k) at its best link (the first link
    setting): the step time at a fixed global batch as the devices grow, without the emulated
    link's cost mixed in. Ordered by model, transport, data path (first seen) and k."""
    best: dict[tuple[Any, ...], Aggregate] = {}
    for a in aggs:
        key = (a.key["model"], a.key["transport"], a.key["data_path"], a.k)
        if key not in best or _link_rank(a) < _link_rank(best[key]):
            best[key] = a
    firsts = {k[:3]: i for i, k in reversed(list(enumerate(best)))}
    return [best[k] for k in sorted(best, key=lambda k: (firsts[k[:3]], k[3]))]


def scaling_table(aggs: Sequence[Aggregate]) -> list[str]:
    """bench.md's "step time vs devices at a fixed global batch" section: per model, data path
    and k, ms per update of SGD(k), SAM(k), SGD-DDP(2k), SAM-DDP(2k) and SAMPa(2k), and SAMPa's
    speedup over SAM-DDP and over SAM(k) (medians of the per-repeat ratios, as bench.csv's
    ``sam_ddp_over_sampa`` and ``sam_over_sampa``)."""
    chosen = scaling_aggs(aggs)
    links = list(dict.fromkeys((a.key["latency_ms"], a.gbit_s) for a in chosen))
    at = ("each configuration's best link" if len(links) != 1 else
          f"latency {links[0][0]:g} ms, "
          + ("uncapped bandwidth" if links[0][1] is None else f"{links[0][1]:g} Gbit/s"))
    lines = ["", "## Step time vs devices at a fixed global batch", "",
             f"Median ms per parameter update ((min–max) over the repeats) at {at}, the same "
             "global batch for every algorithm. With k workers per role: SGD(k) and SAM(k) run "
             "on one role group of k workers; SGD-DDP and SAM-DDP data-parallel over all 2k "
             "workers (each 1/(2k) of the batch); SAMPa on two groups of k (2k). The ratios are "
             "SAMPa's speedup over SAM-DDP and over SAM(k): > 1, SAMPa is faster.", "",
             "| model | transport | data path | k | devices k / 2k | SGD(k) | SAM(k) | "
             "SGD-DDP(2k) | SAM-DDP(2k) | SAMPa(2k) | SAM-DDP/SAMPa | SAM(k)/SAMPa |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in chosen:
        s = a.stats
        one = s["sgd_devices"].fmt(".0f")
        two = s["sampa_devices"].fmt(".0f")
        lines.append(
            f"| {a.key['model']} | {a.key['transport']} | {a.key['data_path']} | {a.k} | "
            f"{one} / {two} | {s['sgd_ms'].fmt()} | {s['sam_ms'].fmt()} | "
            f"{s['sgd_ddp_ms'].fmt()} | {s['sam_ddp_ms'].fmt()} | {s['sampa_ms'].fmt()} | "
            f"{s['sam_ddp_over_sampa'].fmt('.2f')} | {s['sam_over_sampa'].fmt('.2f')} |")
    return lines


