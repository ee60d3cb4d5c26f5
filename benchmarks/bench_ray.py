"""SGD, SAM and SAMPa side by side on the same Ray actors, synthetic CIFAR-shaped data.

    .venv/bin/python benchmarks/bench_ray.py [--models resnet20 resnet56] [--steps 20]

Prints the median time per parameter update of each algorithm and the ratios SAM/SAMPa (the
speedup SAMPa's parallel gradients buy) and SAMPa/SGD (what SAMPa costs over one gradient).
A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sampa_ray.config import make_config
from sampa_ray.ray_backend import run_ray_many


def bench(model: str, steps: int, batch: int, threads: int | None, device: str) -> dict:
    cfg = make_config({"model": model, "dataset": "synthetic", "synthetic_size": 512,
                       "batch_size": batch, "steps": steps, "backend": "ray",
                       "threads": threads, "device": device, "eval_every": 1000})
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(cfg.model_copy(update={"algo": a}), Path(tmp) / a)
                for a in ("sgd", "sam", "sampa")]
        results = run_ray_many(runs)
    step = {r["config"]["algo"]: r["timings"]["step_seconds"]["median"] for r in results}
    return {"model": model, "params": results[0]["num_params"], **step,
            "sam/sampa": step["sam"] / step["sampa"], "sampa/sgd": step["sampa"] / step["sgd"],
            "placement": results[0]["placement"]["mode"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    rows = [bench(m, args.steps, args.batch_size, args.threads, args.device)
            for m in args.models]
    print("| model | params | SGD step (ms) | SAM step (ms) | SAMPa step (ms) | SAM/SAMPa "
          "| SAMPa/SGD | placement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['sgd'] * 1e3:.1f} | "
              f"{r['sam'] * 1e3:.1f} | {r['sampa'] * 1e3:.1f} | {r['sam/sampa']:.2f} | "
              f"{r['sampa/sgd']:.2f} | {r['placement']} |")


if __name__ == "__main__":
    main()
