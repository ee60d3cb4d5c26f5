"""SGD, SAM and SAMPa side by side on the same Ray actors, synthetic CIFAR-shaped data.

    .venv/bin/python benchmarks/bench_ray.py [--models resnet20 resnet56] [--steps 20]
        [--repeats 3] [--data-paths points replicated] [--wire-dtypes fp32 bf16]
        [--device auto] [--csv FILE]

For each model, data path and wire format it runs SGD, SAM, SAMPa, SGD, SAM, SAMPa, ... on the
same two workers (interleaved, so a slow spell of a shared machine hits all three alike) and
prints the median time per parameter update of each algorithm, the workers' median pure compute
(forward + backward) per gradient, and the ratios SAM/SAMPa (the speedup SAMPa's parallel
gradients buy) and SAMPa/SGD (what SAMPa costs over one gradient), each the median of the
per-repeat ratios. A benchmark, not a test: the numbers depend on the machine and its load.
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


def bench(model: str, steps: int, batch: int, threads: int | None, device: str,
          data_path: str, wire: str, repeats: int) -> dict[str, Any]:
    cfg = make_config({"model": model, "dataset": "synthetic", "synthetic_size": 8 * batch,
                       "batch_size": batch, "steps": steps, "backend": "ray",
                       "threads": threads, "device": device, "eval_every": 1000,
                       "data_path": data_path, "wire_dtype": wire})
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(cfg.model_copy(update={"algo": a}), Path(tmp) / f"{a}{i}")
                for i in range(repeats) for a in ALGOS]
        results = run_ray_many(runs)
    reps = [{r["config"]["algo"]: r for r in results[i:i + 3]}
            for i in range(0, len(results), 3)]

    def step(r: dict[str, Any]) -> float:
        return r["timings"]["step_seconds"]["median"]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    compute = med([rep["sgd"]["timings"]["workers"]["grad"]["compute"]["median"]
                   for rep in reps])
    first = results[0]
    return {"model": model, "data_path": data_path, "wire_dtype": wire,
            "params": first["num_params"], "repeats": repeats, "compute_ms": compute * 1e3,
            **{f"{a}_ms": med([step(rep[a]) for rep in reps]) * 1e3 for a in ALGOS},
            "sam_over_sampa": med([step(rep["sam"]) / step(rep["sampa"]) for rep in reps]),
            "sampa_over_sgd": med([step(rep["sampa"]) / step(rep["sgd"]) for rep in reps]),
            "sampa_over_2compute": med([step(rep["sampa"]) for rep in reps]) / (2 * compute),
            "placement": first["placement"]["mode"], "device": first["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--data-paths", nargs="+", default=["points", "replicated"])
    p.add_argument("--wire-dtypes", nargs="+", default=["fp32"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args()
    print("| model | params | data path | wire | fwd+bwd (ms) | SGD step (ms) | SAM step (ms) | "
          "SAMPa step (ms) | SAM/SAMPa | SAMPa/SGD | placement |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for m in args.models:
        for path in args.data_paths:
            for wire in args.wire_dtypes:
                r = bench(m, args.steps, args.batch_size, args.threads, args.device, path,
                          wire, args.repeats)
                rows.append(r)
                print(f"| {m} | {r['params'] / 1e6:.2f}M | {path} | {wire} | "
                      f"{r['compute_ms']:.1f} | {r['sgd_ms']:.1f} | {r['sam_ms']:.1f} | "
                      f"{r['sampa_ms']:.1f} | {r['sam_over_sampa']:.2f} | "
                      f"{r['sampa_over_sgd']:.2f} | {r['placement']} ({r['device']}) |",
                      flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
