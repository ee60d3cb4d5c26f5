"""SGD, SAM and SAMPa side by side on the same Ray actors, synthetic CIFAR-shaped data.

    .venv/bin/python benchmarks/bench_ray.py [--models resnet20 resnet56] [--steps 20]
        [--repeats 3] [--data-paths points replicated collective] [--wire-dtypes fp32 bf16]
        [--device auto] [--csv FILE]

Per model, one Ray session runs every (data path, algorithm) pair in turn, then again, --repeats
times (interleaved, so a slow spell of a shared machine hits all of them alike). Printed per
model, data path and wire format: the median time per parameter update of each algorithm; the
workers' median pure compute (forward + backward) per gradient, for SGD (one worker busy) and
for SAMPa (both busy: the slower role's); the ratios SAM/SAMPa (the speedup SAMPa's parallel
gradients buy) and SAMPa/SGD (what SAMPa costs over one gradient), each the median of the
per-repeat ratios; and what the data path adds to a round beyond the compute, for SGD and for
SAMPa (per round: from one round's last gradient to the next one's, less that round's longest
compute). The compute columns show what the machine allows; the overhead columns are what the
data path costs. A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path
from typing import Any

from sampa_ray.config import make_config
from sampa_ray.ray_backend import run_ray_many

ALGOS = ("sgd", "sam", "sampa")


def _step(r: dict[str, Any]) -> float:
    return r["timings"]["step_seconds"]["median"]


def _compute(r: dict[str, Any]) -> float:
    """The slower role's median compute (one role for SGD)."""
    return max(d["compute"]["median"] for d in r["timings"]["workers"].values())


def _overhead(r: dict[str, Any]) -> float:
    """Median, over rounds, of what a round took beyond its slower gradient: the time from the
    last gradient of one round to the last of the next, less the next one's longest compute
    (from the per-round trace in result.json; the first rounds, with start-up, are left out)."""
    rounds: dict[int, list[dict[str, float]]] = {}
    for t in r["trace"]:
        rounds.setdefault(t["round"], []).append(t)
    ks = sorted(rounds)[2:]
    gaps = [max(t["end"] for t in rounds[k]) - max(t["end"] for t in rounds[j])
            - max(t["end"] - t["start"] for t in rounds[k])
            for j, k in zip(ks, ks[1:], strict=False)]
    return statistics.median(gaps)


def bench(model: str, steps: int, batch: int, threads: int | None, device: str,
          paths: list[str], wire: str, repeats: int) -> list[dict[str, Any]]:
    base = make_config({"model": model, "dataset": "synthetic", "synthetic_size": 8 * batch,
                        "batch_size": batch, "steps": steps, "backend": "ray",
                        "threads": threads, "device": device, "eval_every": 1000,
                        "wire_dtype": wire})
    order = [(i, p, a) for i in range(repeats) for p in paths for a in ALGOS]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(base.model_copy(update={"algo": a, "data_path": p}), Path(tmp) / f"{p}{a}{i}")
                for i, p, a in order]
        results = run_ray_many(runs)
    by = {key: r for key, r in zip(order, results, strict=True)}
    med = statistics.median
    rows = []
    for p in paths:
        reps = [{a: by[(i, p, a)] for a in ALGOS} for i in range(repeats)]
        first = reps[0]["sgd"]
        rows.append({
            "model": model, "data_path": p, "wire_dtype": wire, "params": first["num_params"],
            "repeats": repeats,
            **{f"{a}_ms": med([_step(rep[a]) for rep in reps]) * 1e3 for a in ALGOS},
            "sgd_compute_ms": med([_compute(rep["sgd"]) for rep in reps]) * 1e3,
            "sampa_compute_ms": med([_compute(rep["sampa"]) for rep in reps]) * 1e3,
            "sam_over_sampa": med([_step(rep["sam"]) / _step(rep["sampa"]) for rep in reps]),
            "sampa_over_sgd": med([_step(rep["sampa"]) / _step(rep["sgd"]) for rep in reps]),
            "sgd_overhead_ms": med([_overhead(rep["sgd"]) for rep in reps]) * 1e3,
            "sampa_overhead_ms": med([_overhead(rep["sampa"]) for rep in reps]) * 1e3,
            "placement": first["placement"]["mode"], "device": first["device"],
            "collective": (reps[0]["sampa"].get("collective") or {}).get("backend")})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--data-paths", nargs="+", default=["points", "replicated", "collective"])
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
            for r in bench(m, args.steps, args.batch_size, args.threads, args.device,
                           args.data_paths, wire, args.repeats):
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
