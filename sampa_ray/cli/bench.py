"""``sampa-ray bench``: the communication-cost study (``sampa_ray.study``) from the command line.

Only the flags live here: they are checked into a :class:`~sampa_ray.study.BenchSpec`
(``study.spec``), run (``study.run``) and reported (``study.report``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..study.spec import BASELINES, DATA_PATHS, TRANSPORTS, BenchSpec, make_spec


def add_bench_command(subparsers: Any) -> None:
    """Register ``bench`` on the CLI's subparsers (handler: :func:`cmd_bench`)."""
    p = subparsers.add_parser(
        "bench", help="communication-cost study: SGD / SAM / SAMPa over emulated links and "
        "worker counts",
        description="SGD, SAM and SAMPa side by side on the same Ray actors, on synthetic data, "
        "for every model x transport x data path x emulated link, once per --workers-per-role "
        "k (each k on its own 2k workers); --baseline ddp adds SGD and SAM data-parallel over "
        "all 2k workers at the same global batch. Writes bench.csv (a row per configuration "
        "and repeat), bench_runs.csv (a row per algorithm run, with the devices it used), "
        "bench.md and plots (scaling.png: step time vs devices, with --baseline ddp) into "
        "--out.")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models to measure (default: resnet20 resnet56; on a GPU also "
                   "wrn28_2 wrn28_10)")
    p.add_argument("--transports", nargs="+", default=list(TRANSPORTS), metavar="T",
                   help="ray and/or grpc (default: both)")
    p.add_argument("--data-paths", nargs="+", default=list(DATA_PATHS), metavar="P",
                   help="points, replicated and/or collective (default: all three; grpc runs "
                   "points only)")
    p.add_argument("--latency-ms", nargs="+", default=["0", "1", "5", "20"], metavar="MS",
                   help="emulated latency per message, ms (default: 0 1 5 20)")
    p.add_argument("--bandwidth-gbit", nargs="+", default=["none", "10", "1", "0.1"],
                   metavar="GBIT", help="emulated bandwidth caps, Gbit/s; none = uncapped "
                   "(default: none 10 1 0.1)")
    p.add_argument("--wire-dtype", default="fp32", metavar="D",
                   help="gradients on the wire: fp32 or bf16 (default: fp32)")
    p.add_argument("--workers-per-role", nargs="+", default=["1"], metavar="K",
                   help="gradient workers per role, one pass over the grid per K on its own "
                   "2K workers: SGD(K) and SAM(K) use one group of K, SAMPa two (default: 1; "
                   "K > 1 runs on the ray transport only)")
    p.add_argument("--baseline", default="none", metavar="B",
                   help=f"{' or '.join(BASELINES)}: ddp also runs SGD and SAM data-parallel "
                   "over all 2K workers (sgd-ddp, sam-ddp; ray transport), the same global "
                   "batch, for the 'step time vs devices' table and scaling.png "
                   "(default: none)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (default: 3)")
    p.add_argument("--steps", type=int, default=12, help="updates per run; the first is not "
                   "timed (default: 12)")
    p.add_argument("--batch-size", type=int, default=32, help="default: 32")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker "
                   "(default: the CPUs of its placement bundle)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default: runs/bench-<timestamp>)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --out to name a folder that is not empty")
    p.set_defaults(func=cmd_bench)


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """Validate the flags into a :class:`BenchSpec`; a bad value is a UserError naming its flag."""
    return make_spec(models=args.models, transports=args.transports,
                     data_paths=args.data_paths, latency_ms=args.latency_ms,
                     bandwidth_gbit=args.bandwidth_gbit, repeats=args.repeats, steps=args.steps,
                     batch_size=args.batch_size, threads=args.threads, device=args.device,
                     out=args.out, overwrite=args.overwrite, wire_dtype=args.wire_dtype,
                     workers_per_role=args.workers_per_role, baseline=args.baseline)


def cmd_bench(args: argparse.Namespace) -> int:
    """``sampa-ray bench``: run the study, write the outputs, print the table."""
    from .. import signals
    from ..config import make_config
    from ..errors import UserError
    from ..ray import clean_up, connect
    from ..study.run import prepare, run_study
    from ..study.writeup import write_report

    spec = spec_from_args(args)
    prepare(spec)
    started = connect(make_config({"backend": "ray", "device": spec.device}))
    try:
        rows = run_study(spec)
    finally:
        with signals.deferred():  # a signal must not cut the clean-up short
            clean_up(None, None, started)
    if not rows:
        raise UserError("bench: no run finished")
    r0 = rows[0]
    header = (f"{time.strftime('%Y-%m-%d %H:%M')}, device {r0['device']}, placement "
              f"{r0['placement']} ({r0['threads']} thread(s) per worker), {r0['steps']} steps "
              f"(the first not timed), batch {r0['batch_size']}, {spec.repeats} repeat(s), "
              f"{r0['wire_dtype']} gradients on the wire, "
              "synthetic data, emulated links.")
    if spec.workers_per_role != [1] or spec.baseline != "none":
        header += (f" Workers per role: {' '.join(map(str, spec.workers_per_role))} (each on its "
                   f"own actors); baseline: {spec.baseline}.")
    md = write_report(spec.out, rows, header)
    print(md)
    plots = ["speedup_vs_bandwidth.png", "speedup_vs_latency.png", "breakdown.png"]
    if (spec.out / "scaling.png").exists():
        plots.append("scaling.png")
    print(f"wrote {spec.out / 'bench.csv'}, bench_runs.csv, bench.md, {', '.join(plots[:-1])} "
          f"and {plots[-1]} there")
    return 0
