"""``sampa-ray sweep``: algorithms x a grid of config fields x seeds as Ray Tune trials, and the
study of their results (``sampa_ray.sweep``)."""

from __future__ import annotations

import argparse
from typing import Any

from . import add_config_flags, config_from_args


def add_sweep_command(subparsers: Any) -> None:
    """Register ``sweep`` on the CLI's subparsers."""
    from ..sweep import DEFAULT_ALGOS

    p = subparsers.add_parser(
        "sweep", help="algorithms x --grid x --seeds as Ray Tune trials (one local-backend run "
        "each, --threads CPUs), then accuracy.md / accuracy.csv / figure.png")
    add_config_flags(p)
    p.add_argument("--algos", nargs="+", metavar="ALGO", default=None,
                   help=f"the algorithms (default: {' '.join(DEFAULT_ALGOS)})")
    p.add_argument("--grid", nargs="+", metavar="NAME=V1,V2", default=None,
                   help="config fields to vary (every combination), e.g. rho=0.02,0.05,0.1 "
                   "lam=0,0.2")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="seeds 0..N-1 per algorithm and setting (default: 1)")
    p.add_argument("--cpus", type=int, default=None, metavar="N",
                   help="CPUs of the embedded Ray instance the sweep starts when it joins no "
                   "cluster (default: the machine's); each trial takes --threads (default 1)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``sampa-ray sweep``: every trial into ``--out/<trial>``, the study into ``--out``."""
    from ..config import make_config
    from ..errors import UserError
    from ..outdir import claim_run
    from ..sweep import DEFAULT_ALGOS, plan, sweep
    from .train import preflight

    if args.resume is not None:
        raise UserError("resume: a sweep's trials resume themselves (Tune restarts a failed "
                        "trial from its run's checkpoint); start the sweep without --resume")
    if getattr(args, "backend", None) not in (None, "local"):
        raise UserError("backend: a sweep runs each trial on the local backend, one process "
                        "per trial, with Tune placing the trials")
    if args.cpus is not None and args.cpus < 1:
        raise UserError(f"cpus: {args.cpus}; give at least 1")
    base = config_from_args(args)
    algos = args.algos or DEFAULT_ALGOS
    trials = plan(base, args.grid, args.seeds, algos)  # every trial validated: one line
    preflight(make_config(trials[0].config))  # data and plug-ins, before Ray starts
    with claim_run(base, "sweep", args.overwrite) as lock:
        sweep(base, lock.out, grid=args.grid, seeds=args.seeds, algos=algos, cpus=args.cpus,
              overwrite=args.overwrite)
        print((lock.out / "accuracy.md").read_text(), end="")
        print(f"wrote {lock.out / 'accuracy.md'}, accuracy.csv, figure.png and sweep.json")
    return 0
