"""SGD, SAM and SAMPa side by side on the same Ray actors, synthetic CIFAR-shaped data.

    .venv/bin/python benchmarks/bench_ray.py [--models resnet20 resnet56] [--steps 20]
        [--repeats 3] [--data-paths points replicated collective] [--wire-dtypes fp32 bf16]
        [--device auto] [--csv FILE]

A preset of the communication-cost study (``sampa_ray.study``, also ``sampa-ray bench``): the
ray transport, no emulated link, and the study's per-round costs. Per model (and wire format),
one Ray session runs every (data path, algorithm) pair in turn, then again, --repeats times
(interleaved, so a slow spell of a shared machine hits all of them alike). Printed per model,
data path and wire format: the median time per parameter update of each algorithm; the
workers' median pure compute (forward + backward) per gradient, for SGD (one worker busy) and
for SAMPa (both busy: the slower role's); the ratios SAM/SAMPa (the speedup SAMPa's parallel
gradients buy) and SAMPa/SGD (what SAMPa costs over one gradient), each the median of the
per-repeat ratios; and what the data path adds to a round beyond the compute, for SGD and for
SAMPa (per round: from one round's last gradient to the next one's, less that round's longest
compute). The compute columns show what the machine allows; the overhead columns are what the
data path costs. A benchmark, not a test: the numbers depend on the machine and its load.
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from typing import Any

from sampa_ray.errors import UserError, one_line
from sampa_ray.study import METRICS, ROUND_METRICS, aggregate, make_spec, run_study
from sampa_ray.study.spec import DATA_PATHS


def bench(model: str, steps: int, batch: int, threads: int | None, device: str,
          paths: list[str], wire: str, repeats: int) -> list[dict[str, Any]]:
    """One study session for ``model`` with ``wire`` gradients: a row per data path, medians
    over the repeats."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_spec(models=[model], transports=["ray"], data_paths=paths,
                         latency_ms=["0"], bandwidth_gbit=["none"], repeats=repeats,
                         steps=steps, batch_size=batch, threads=threads, device=device,
                         out=Path(tmp), wire_dtype=wire, round_costs=True)
        runs = run_study(spec, say=lambda line: print(line, file=sys.stderr, flush=True))
    rows = []
    for agg in aggregate(runs, (*METRICS, *ROUND_METRICS)):
        s = {k: v.median for k, v in agg.stats.items()}
        first = next(r for r in runs if r["data_path"] == agg.key["data_path"])
        rows.append({
            "model": model, "data_path": agg.key["data_path"], "wire_dtype": wire,
            "params": first["params"], "repeats": agg.repeats,
            "sgd_ms": s["sgd_ms"], "sam_ms": s["sam_ms"], "sampa_ms": s["sampa_ms"],
            "sgd_compute_ms": s["one_busy_compute_ms"],
            "sampa_compute_ms": s["both_busy_compute_ms"],
            "sam_over_sampa": s["sam_over_sampa"], "sampa_over_sgd": s["sampa_over_sgd"],
            "sgd_overhead_ms": s["sgd_overhead_ms"], "sampa_overhead_ms": s["sampa_overhead_ms"],
            "placement": first["placement"], "device": first["device"],
            "collective": first["collective"] or None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--data-paths", nargs="+", default=list(DATA_PATHS))
    p.add_argument("--wire-dtypes", nargs="+", default=["fp32"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args()
    print("| model | params | data path | wire | SGD step | SAM step | SAMPa step | SAM/SAMPa | "
          "SAMPa/SGD | compute SGD / SAMPa | overhead SGD / SAMPa | placement |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for m in args.models:
        for wire in args.wire_dtypes:
            try:
                found = bench(m, args.steps, args.batch_size, args.threads, args.device,
                              args.data_paths, wire, args.repeats)
            except UserError as err:
                sys.exit(f"bench_ray: {one_line(str(err))}")
            for r in found:
                rows.append(r)
                group = f", {r['collective']}" if r["collective"] else ""
                print(f"| {m} | {r['params'] / 1e6:.2f}M | {r['data_path']} | {wire} | "
                      f"{r['sgd_ms']:.1f} | {r['sam_ms']:.1f} | {r['sampa_ms']:.1f} | "
                      f"{r['sam_over_sampa']:.2f} | {r['sampa_over_sgd']:.2f} | "
                      f"{r['sgd_compute_ms']:.1f} / {r['sampa_compute_ms']:.1f} | "
                      f"{r['sgd_overhead_ms']:.1f} / {r['sampa_overhead_ms']:.1f} | "
                      f"{r['placement']} ({r['device']}{group}) |", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
