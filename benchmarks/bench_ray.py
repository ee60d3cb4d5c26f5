"""SGD, SAM and SAMPa side by side on the same Ray actors, synthetic CIFAR-shaped data.

    .venv/bin/python benchmarks/bench_ray.py [--models resnet20 resnet56] [--steps 20]
        [--data-paths points replicated] [--device auto] [--csv FILE]

For each model and data path it prints the median time per parameter update of each algorithm,
the workers' median pure compute (forward + backward) per gradient, and the ratios SAM/SAMPa (the
speedup SAMPa's parallel gradients buy) and SAMPa/SGD (what SAMPa costs over one gradient).
A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path
from typing import Any

from sampa_ray.config import make_config
from sampa_ray.ray_backend import run_ray_many


def bench(model: str, steps: int, batch: int, threads: int | None, device: str,
          data_path: str) -> dict[str, Any]:
    cfg = make_config({"model": model, "dataset": "synthetic", "synthetic_size": 8 * batch,
                       "batch_size": batch, "steps": steps, "backend": "ray",
                       "threads": threads, "device": device, "eval_every": 1000,
                       "data_path": data_path})
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(cfg.model_copy(update={"algo": a}), Path(tmp) / a)
                for a in ("sgd", "sam", "sampa")]
        results = run_ray_many(runs)
    step = {r["config"]["algo"]: r["timings"]["step_seconds"]["median"] for r in results}
    compute = results[0]["timings"]["workers"]["grad"]["compute"]["median"]
    return {"model": model, "data_path": data_path, "params": results[0]["num_params"],
            "compute_ms": compute * 1e3, "sgd_ms": step["sgd"] * 1e3,
            "sam_ms": step["sam"] * 1e3, "sampa_ms": step["sampa"] * 1e3,
            "sam_over_sampa": step["sam"] / step["sampa"],
            "sampa_over_sgd": step["sampa"] / step["sgd"],
            "sampa_over_2compute": step["sampa"] / (2 * compute),
            "placement": results[0]["placement"]["mode"], "device": results[0]["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--data-paths", nargs="+", default=["points", "replicated"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args()
    print("| model | params | data path | fwd+bwd (ms) | SGD step (ms) | SAM step (ms) | "
          "SAMPa step (ms) | SAM/SAMPa | SAMPa/SGD | placement |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for m in args.models:
        for path in args.data_paths:
            r = bench(m, args.steps, args.batch_size, args.threads, args.device, path)
            rows.append(r)
            print(f"| {m} | {r['params'] / 1e6:.2f}M | {path} | {r['compute_ms']:.1f} | "
                  f"{r['sgd_ms']:.1f} | {r['sam_ms']:.1f} | {r['sampa_ms']:.1f} | "
                  f"{r['sam_over_sampa']:.2f} | {r['sampa_over_sgd']:.2f} | "
                  f"{r['placement']} ({r['device']}) |", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
