"""bench.md and the study's files: what :mod:`.report` computed, put in words, tables and
plots. It sits above ``report``, ``scaling`` and ``plots`` (all three build on ``report``'s
aggregates), so none of them needs to import it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .breakeven import break_evens, describe_break_even
from .plots import plot_breakdown, plot_scaling, plot_speedup
from .report import Aggregate, aggregate, bw_text, label, write_csv, write_runs_csv
from .scaling import has_baseline, has_scaling, scaling_table


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
            f"| {a.key['model']} | {a.key['transport']} | {a.path_label} | "
            f"{a.key['latency_ms']:g} | {bw_text(a)} | {a.repeats} | {s['sgd_ms'].fmt()} | "
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
            f"| {label(a)} | {s['sampa_compute_ms'].fmt('.2f')} | "
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
    if has_scaling(aggs):
        lines += scaling_table(aggs)
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: Sequence[Mapping[str, Any]], header: str = "") -> str:
    """bench.csv, bench_runs.csv, bench.md and the plots from the per-configuration rows;
    returns the markdown. ``scaling.png`` (step time against devices) when the data-parallel
    baseline ran: without it there is no 2k-worker SGD or SAM to set SAMPa against."""
    write_csv(out / "bench.csv", rows)
    write_runs_csv(out / "bench_runs.csv", rows)
    aggs = aggregate(rows)
    md = markdown(aggs, header)
    (out / "bench.md").write_text(md)
    plot_speedup(out / "speedup_vs_bandwidth.png", aggs, "bandwidth")
    plot_speedup(out / "speedup_vs_latency.png", aggs, "latency")
    plot_breakdown(out / "breakdown.png", aggs)
    if has_baseline(aggs):
        plot_scaling(out / "scaling.png", aggs)
    return md
