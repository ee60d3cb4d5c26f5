"""The communication-cost study (``sampa-ray bench``): what communication costs SAMPa, measured
side by side with SGD and SAM.

For every model, transport (ray | grpc), data path (points | replicated | collective) and
emulated link (latency x bandwidth, applied per point/gradient message by the workers; see
``sampa_ray.transport.link.Link``) it runs SGD, SAM and SAMPa one after the other on the same
coordinator and workers (``run_ray_many``) on synthetic data shaped for the model, ``--repeats``
times, and writes into ``--out``. With ``--workers-per-role K ...`` the grid runs once per k on
its own 2k workers (SGD and SAM on one role group of k, SAMPa on two; role groups need the ray
transport); ``--baseline ddp`` adds ``sgd-ddp`` and ``sam-ddp``, SGD and SAM data-parallel over
all 2k workers of the same actors at the same global batch: the question it answers is whether
2k devices do more for SAM as two parallel SAMPa gradients or as one data-parallel gradient.

- ``bench.csv``: one row per configuration (x k) and repeat: the median time per parameter
  update of each algorithm, the ratios SAM/SAMPa, SAMPa/SGD and SAM-DDP/SAMPa, SAMPa's round
  split per role, and per algorithm the workers its run used and its all-reduce per gradient;
- ``bench_runs.csv``: the same per algorithm run (``algo`` incl. ``-ddp``, ``devices``,
  ``workers_per_role``, ``step_ms``, ``over_sampa``): the shape for step time against devices;
- ``bench.md``: medians over the repeats with their spread (min-max), the SAMPa round split and
  the break-even links (where SAM/SAMPa drops below 1); with the baseline or k other than 1 also
  "step time vs devices at a fixed global batch" (per model and k: SGD(k), SAM(k), SGD-DDP(2k),
  SAM-DDP(2k), SAMPa(2k), and SAM-DDP/SAMPa, SAM(k)/SAMPa at the first link setting);
- ``scaling.png`` (with ``--baseline ddp``): ms per update against the devices used, log2 axis,
  one panel per model;
- ``speedup_vs_bandwidth.png``, ``speedup_vs_latency.png``: SAM/SAMPa against the link, one line
  per model, transport and data path, a line at 1.0 and the break-even points marked;
- ``breakdown.png``: SAMPa's step split into compute / copy / transfer / wait / update per
  configuration;
- ``runs/<configuration>-r<repeat>/<algo>.json``: each run's ``result.json``.

Repeats are separate runs on the same actors: one ``run_ray_many`` call per (model, k,
transport) holds every data path, link and repeat, ordered repeat by repeat, so slow drifts of
the machine spread over all configurations instead of landing on one.

How SAMPa's round is split (per role, from ``result.json`` medians, as ``sampa_ray.metrics``
splits it): compute = the worker's forward + backward; copy = host<->device copies of point,
batch and gradient; wait = how long the role's gradient waited for the slowest of the round;
transfer = round time - compute - copy - wait (everything else on that role's round trip: the
emulated link, serialisation, the object store or the gRPC streams, and on the replicated path
the replica's update, which runs inside the worker); update = the coordinator's update after the
round; other = step time - round - update (the loop's own overhead). ``result.json`` carries no
arrival times, so wait is estimated from its trace: per round, the latest compute end of the
round minus this role's compute end (both roles' results travel the same way after compute).

Layout: ``spec`` (the settings and their checks), ``run`` (running it on Ray), ``report``
(rows, aggregation, ``bench.csv``), ``breakeven``, ``scaling``, ``plots``, and ``writeup``
(``bench.md`` and the files, on top of the others). The ``bench``
command (``sampa_ray.cli.bench``) and ``benchmarks/bench_ray.py`` are front ends to these.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it; loaded on first use, so that the CLI can read
#: ``spec`` (no torch, no Ray) without loading the report's and the runner's dependencies
_EXPORTS = {
    **dict.fromkeys(("ALGOS", "COLUMNS", "GROUP_METRICS", "KEY", "METRICS", "PARTS", "ROLES",
                     "ROUND_COLUMNS", "ROUND_METRICS", "RUN_COLUMNS", "Aggregate",
                     "Stat", "aggregate", "algo_rows", "round_costs", "run_row",
                     "sampa_breakdown", "write_csv", "write_runs_csv"),
                    "report"),
    **dict.fromkeys(("markdown", "write_report"), "writeup"),
    **dict.fromkeys(("BreakEven", "break_even", "break_evens", "describe_break_even",
                     "sweeps"), "breakeven"),
    **dict.fromkeys(("has_baseline", "has_scaling", "scaling_aggs", "scaling_table"),
                    "scaling"),
    **dict.fromkeys(("prepare", "run_study"), "run"),
    **dict.fromkeys(("BASELINES", "CPU_MODELS", "DATA_PATHS", "GPU_MODELS", "TRANSPORTS",
                     "WIRE_DTYPES", "BenchSpec", "LinkSetting", "make_spec", "parse_bandwidths",
                     "parse_latencies", "parse_workers_per_role"), "spec"),
    **dict.fromkeys(("plot_breakdown", "plot_scaling", "plot_speedup"), "plots"),
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = sorted(_EXPORTS)
