"""``sampa-ray train`` (one model) and ``sampa-ray compare`` (every built-in algorithm on the
same setup; on Ray on the same coordinator and workers, so the comparison is like for like).

Training itself is ``sampa_ray.runner.run`` (the one entry ``sampa_ray.fit`` uses too), or
``sampa_ray.ray.run_ray_many`` for ``compare`` on Ray, imported when a command runs so that
building the parser does not load a backend.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import signals
from ..config import TrainConfig
from ..outdir import claim_run, finished_run, prepare_out
from . import add_config_flags, config_from_args

if TYPE_CHECKING:
    from ..ui import ProgressView


def add_train_commands(subparsers: Any) -> None:
    """Register ``train`` and ``compare`` on the CLI's subparsers."""
    train = subparsers.add_parser("train", help="train one model")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)
    compare = subparsers.add_parser("compare", help="run SGD, SAM and SAMPa (or --algos) on the "
                                    "same setup")
    add_config_flags(compare)
    compare.add_argument("--algos", nargs="+", metavar="ALGO", default=None,
                         help="the algorithms to run, in this order (default: sgd sam sampa; "
                         "any registered one, e.g. looksam rst asam), each with its own "
                         "parameters' defaults beside the shared flags (--rho ...)")
    compare.add_argument("--baseline", choices=("none", "ddp"), default="none",
                         help="ddp: also SGD and SAM data-parallel over all the workers SAMPa "
                         "uses (sgd-ddp, sam-ddp), at the same global batch, on the same "
                         "actors (ray backend)")
    compare.set_defaults(func=cmd_compare)


def run_one(cfg: TrainConfig, out: Path, label: str = "",
            view: ProgressView | None = None) -> dict[str, Any]:
    """One run (:func:`sampa_ray.runner.run`), its progress shown live (on ``view``, where
    given); returns its result."""
    from ..runner import run
    from ..ui import ProgressView

    with view or ProgressView(label or cfg.algo) as shown:
        return run(cfg, out, shown)


def preflight(cfg: TrainConfig) -> None:
    """What the input alone decides, before the out folder is claimed or Ray starts: a
    one-line error, or warning lines on stderr (:mod:`sampa_ray.preflight`)."""
    from ..preflight import check_before_start

    for line in check_before_start(cfg):
        print(f"sampa-ray: {line}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    """``sampa-ray train``: one run into ``--out`` (or ``runs/train-<algo>-<timestamp>``)."""
    cfg = config_from_args(args)
    if cfg.resume is not None and (done := finished_run(Path(cfg.resume))) is not None:
        # a finished run has nothing to continue: say so, change nothing (exit 0: the run a
        # restarted job or a retried script asks for exists)
        print(f"sampa-ray: {cfg.resume} is finished ({done['steps']} steps); nothing to "
              "resume", file=sys.stderr)
        return 0
    preflight(cfg)
    resuming_here = (cfg.resume is not None and cfg.out is not None
                     and Path(cfg.out).resolve() == Path(cfg.resume).resolve())
    from ..ui import ProgressView

    view = ProgressView(cfg.algo)
    out: Path | None = None
    try:
        with claim_run(cfg, "train", args.overwrite, resume=resuming_here) as lock:  # to the end
            out = lock.out
            result = run_one(cfg, out, view=view)
    except KeyboardInterrupt:  # a signal: our line says what is left to resume
        if out is None:
            raise
        raise signals.Terminated(signals.received() or signal.SIGINT,
                                 left_behind(out, view.step)) from None
    from ..ui import print_result

    print_result(result, out)
    return 0


def left_behind(out: Path, step: int | None) -> str:
    """The end of an interrupted run's line: the step it reached, and the command that
    continues it from its newest checkpoint, or that none was written (nothing to resume: the
    next run starts over), so the user learns it now rather than at the next start."""
    from ..checkpoint import PREFIX, list_checkpoints

    at = f" at step {step}" if step is not None else ""
    newest = list_checkpoints(out / "checkpoints")
    if newest:
        saved = int(newest[0].stem[len(PREFIX):])
        # the run got at least as far as its checkpoint (the progress shown lags a chunk of
        # rounds behind where the workers run free)
        at = f" at step {max(step or 0, saved)}"
        return (f"{at}; `sampa-ray train --resume {out}` continues from its checkpoint at "
                f"step {saved}")
    if step is None:  # stopped before its first update: nothing was lost
        return ""
    return (f"{at}; no checkpoint was written, so nothing can be resumed (use "
            "--checkpoint-every N or --checkpoint-interval-s S)")


def cmd_compare(args: argparse.Namespace) -> int:
    """``sampa-ray compare``: each built-in algorithm into ``--out/<algo>``, then a table,
    ``compare.png`` and ``compare.json``."""
    base = config_from_args(args)
    preflight(base)
    baseline = getattr(args, "baseline", "none")
    from ..errors import UserError

    if baseline == "ddp" and base.backend != "ray":
        raise UserError("baseline: ddp runs SGD and SAM data-parallel over the Ray workers; "
                        "use --backend ray")
    algos = compared_algos(base, getattr(args, "algos", None))
    with claim_run(base, "compare", args.overwrite) as lock:  # until every run has written
        return _compare(base, lock.out, args.overwrite, baseline, algos)


def compared_algos(base: TrainConfig, given: list[str] | None) -> tuple[str, ...]:
    """The algorithms ``compare`` runs: ``--algos`` (each one known, none twice, each
    valid with the shared settings), else the built-ins; else one line (UserError)."""
    from ..algorithms import BUILTIN
    from ..sweep.grid import check_algos

    if not given:
        return BUILTIN
    check_algos(base, given)
    return tuple(given)


def compare_runs(base: TrainConfig, baseline: str = "none",
                 algos: tuple[str, ...] | None = None) -> dict[str, TrainConfig]:
    """The runs of ``compare`` by label: each of ``algos`` (default: the built-ins), and
    with ``baseline`` ddp SGD and SAM data-parallel over all 2k workers (``sgd-ddp``,
    ``sam-ddp``)."""
    from ..algorithms import BUILTIN, baselines

    runs = {a: base.model_copy(update={"algo": a}) for a in algos or BUILTIN}
    if baseline == "ddp":
        for label in baselines():
            runs[label] = TrainConfig(**{**base.model_dump(), "algo": label.removesuffix("-ddp"),
                                         "data_parallel": True})
    return runs


def _compare(base: TrainConfig, out: Path, overwrite: bool, baseline: str = "none",
             algos: tuple[str, ...] | None = None) -> int:
    from ..results import plot_runs, write_json_atomic
    from ..ui import print_comparison

    cfgs = compare_runs(base, baseline, algos)
    runs = [(cfg.model_copy(update={"out": str(out / a)}), prepare_out(out / a, overwrite))
            for a, cfg in cfgs.items()]
    if base.backend == "ray":  # one set of actors for all of them: like for like
        from ..ray import run_ray_many
        from ..ui import ProgressView

        with ProgressView("compare") as view:
            results = dict(zip(cfgs, run_ray_many(runs, progress=view), strict=True))
    else:
        results = {a: run_one(cfg, sub, label=a) for a, (cfg, sub) in zip(cfgs, runs,
                                                                          strict=True)}
    rows = print_comparison(results)
    plot_runs(out / "compare.png", {a: r["epochs"] for a, r in results.items()})
    write_json_atomic(out / "compare.json", {"config": base.model_dump(), "rows": rows})
    print(f"wrote {out / 'compare.png'} and {out / 'compare.json'}")
    return 0
