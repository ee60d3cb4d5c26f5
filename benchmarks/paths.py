"""The default job's SGD, SAM and SAMPa on each Ray data path, beside what the machine allows.

    .venv/bin/python benchmarks/paths.py [--paths replicated collective free] [--repeats 3]
        [--epochs 3] [--model cnn --batch-size 64] [-- extra compare flags]

Per repeat, in turn: ``floor.py``'s measurement (two bare processes: one gradient alone, two at
once), then ``sampa-ray compare --threads 1`` once per data path (the command a user runs; its
compare.json gives seconds per update, mean over the run). Printed per data path, medians over
the repeats: ms per update of each algorithm, SAMPa's overhead per update (beyond the compute on
its critical path), SAM/SAMPa, and SAM/SAMPa as a share of the floor's bound
(2 * alone / paired) measured in the same repeat. A benchmark, not a test: the numbers depend on
the machine and its load; the floor and the runs alternate so a slow spell hits both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from floor import measure

HERE = Path(__file__).resolve().parent


def compare(path: str, epochs: int, model: str, batch: int, extra: list[str],
            out: Path) -> dict[str, dict[str, float]]:
    """One ``sampa-ray compare`` on data path ``path``: its rows by algorithm."""
    cmd = [sys.executable, "-m", "sampa_ray.cli", "compare", "--epochs", str(epochs),
           "--threads", "1", "--model", model, "--batch-size", str(batch), "--data-path", path,
           "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode:
        sys.exit(f"paths: {' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    rows = json.loads((out / "compare.json").read_text())["rows"]
    return {r["algorithm"]: r for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--paths", nargs="+", default=["replicated", "collective", "free"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("extra", nargs="*", help="more compare flags (after --)")
    args = p.parse_args()
    bounds: list[float] = []
    got: dict[str, list[dict[str, float]]] = {path: [] for path in args.paths}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            alone, paired, _ = measure(args.model, args.batch_size)
            bound = 2 * alone / paired
            bounds.append(bound)
            print(f"repeat {rep + 1}: floor alone {alone * 1e3:.2f} ms, paired "
                  f"{paired * 1e3:.2f} ms, SAM/SAMPa <= {bound:.2f}", file=sys.stderr)
            for path in args.paths:
                rows = compare(path, args.epochs, args.model, args.batch_size, args.extra,
                               Path(tmp) / f"{path}-{rep}")
                sam, sampa = rows["sam"], rows["sampa"]
                ratio = sam["seconds_per_update"] / sampa["seconds_per_update"]
                got[path].append({
                    "sgd": rows["sgd"]["seconds_per_update"] * 1e3,
                    "sam": sam["seconds_per_update"] * 1e3,
                    "sampa": sampa["seconds_per_update"] * 1e3,
                    "overhead": (sampa["overhead_per_update_s"] or 0.0) * 1e3,
                    "ratio": ratio, "share": ratio / bound})
                print(f"  {path}: SAM/SAMPa {ratio:.2f}", file=sys.stderr)
    print(f"{args.model}, batch {args.batch_size}, {args.epochs} epochs, {args.repeats} "
          f"repeats; floor SAM/SAMPa <= {statistics.median(bounds):.2f} (median)")
    print("| data path | SGD ms | SAM ms | SAMPa ms | SAMPa overhead ms | SAM/SAMPa | "
          "of the floor |")
    print("|---|---|---|---|---|---|---|")
    for path, reps in got.items():
        m = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
        print(f"| {path} | {m['sgd']:.2f} | {m['sam']:.2f} | {m['sampa']:.2f} | "
              f"{m['overhead']:.2f} | {m['ratio']:.2f} | {m['share']:.0%} |")


if __name__ == "__main__":
    main()
