"""The study's plots (matplotlib, Agg: no display needed): SAM/SAMPa against the link with the
break-even points marked, SAMPa's step split per configuration, and (with the data-parallel
baseline) the step time against the devices used. Drawn from the aggregates of ``report``, so
they always show the same numbers as ``bench.md``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .breakeven import BreakEven, break_evens, sweeps
from .report import PARTS, Aggregate, label
from .scaling import scaling_aggs
from .spec import unique


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(aggs: Sequence[Aggregate]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Colour by model, line style by transport / data path (and k)."""
    models = unique(a.key["model"] for a in aggs)
    paths = unique(a.series[1:] for a in aggs)
    dashes = ["-", "--", ":", "-."]
    colors = [f"C{i % 10}" for i in range(len(models))]
    return {a.series: {"color": colors[models.index(a.key["model"])],
                       "linestyle": dashes[paths.index(a.series[1:]) % len(dashes)]}
            for a in aggs}


def plot_speedup(path: Path, aggs: Sequence[Aggregate], over: str) -> None:
    """SAM/SAMPa against bandwidth (one panel per latency) or latency (one panel per
    bandwidth): median with min-max bars, a line at 1.0, break-even points marked (x)."""
    plt = _plt()
    sweeps_ = sweeps(aggs, over)
    fixed = unique(k[1] for k in sweeps_)
    bes = break_evens(aggs, over)
    styles = _styles(aggs)
    caps = [a.gbit_s for a in aggs if a.gbit_s is not None]
    uncapped_x = max(caps) * 10 if caps else 100.0  # where "none" sits on the bandwidth axis
    fig, axes = plt.subplots(1, len(fixed), figsize=(5.2 * len(fixed), 4.2), squeeze=False)
    for ax, fv in zip(axes[0], fixed, strict=True):
        for (series, f), sweep in sweeps_.items():
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
    labels = [label(a) for a in aggs]
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


#: the scaling plot's families: (label, metric of the step time, metric of the devices, style);
#: the data-parallel baselines and SAMPa are lines over k, SGD(k) and SAM(k) points beside them
SCALING_FAMILIES = (
    ("SGD-DDP", "sgd_ddp_ms", "sgd_ddp_devices", {"color": "C0", "marker": "o"}),
    ("SAM-DDP", "sam_ddp_ms", "sam_ddp_devices", {"color": "C1", "marker": "s"}),
    ("SAMPa", "sampa_ms", "sampa_devices", {"color": "C3", "marker": "D", "linewidth": 2}),
    ("SGD(k)", "sgd_ms", "sgd_devices", {"color": "C0", "marker": "^", "linestyle": "none",
                                         "markerfacecolor": "none"}),
    ("SAM(k)", "sam_ms", "sam_devices", {"color": "C1", "marker": "v", "linestyle": "none",
                                         "markerfacecolor": "none"}),
)


def plot_scaling(path: Path, aggs: Sequence[Aggregate]) -> None:
    """Step time (ms per update, median with min-max bars) against the devices a run used, at
    the fixed global batch and the first link setting: one panel per model (and transport /
    data path where several ran the baseline), x on a log2 axis. Where SAMPa's line sits below
    SAM-DDP's at the same devices, two parallel gradients beat one data-parallel gradient."""
    plt = _plt()
    chosen = [a for a in scaling_aggs(aggs)
              if a.stats["sam_ddp_ms"].n or a.stats["sgd_ddp_ms"].n]
    panels = unique((a.key["model"], a.key["transport"], a.key["data_path"]) for a in chosen)
    if not panels:  # no configuration completed its baseline runs: nothing to draw
        return
    several_paths = len(unique(p[1:] for p in panels)) > 1
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 5.2 * len(panels)), 4.2),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        mine = [a for a in chosen
                if (a.key["model"], a.key["transport"], a.key["data_path"]) == panel]
        xs_all: list[float] = []
        for name, ms, dev, style in SCALING_FAMILIES:
            pts = sorted((a.stats[dev].median, a.stats[ms]) for a in mine
                         if a.stats[ms].n and a.stats[dev].n)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            st = [s for _, s in pts]
            xs_all += xs
            ax.errorbar(xs, [s.median for s in st], capsize=3, label=name,
                        yerr=[[s.median - s.lo for s in st], [s.hi - s.median for s in st]],
                        **style)
        ax.set_xscale("log", base=2)
        top = max(xs_all, default=1.0)
        ticks = [2 ** i for i in range(int(math.log2(max(top, 1.0))) + 1)]
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.4)
        ax.set_xlabel("devices used (gradient workers)")
        ax.set_ylabel("ms per update")
        ax.grid(alpha=0.3)
        ax.set_title(panel[0] + (f" {panel[1]}/{panel[2]}" if several_paths else ""))
        ax.legend(fontsize=8)
    fig.suptitle("step time vs devices, fixed global batch (first link setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
