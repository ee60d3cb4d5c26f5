"""Seeds and grids on Ray Tune (``sampa-ray sweep``, :func:`sweep`): every algorithm x grid
setting x seed as one Tune trial (one local-backend training per trial, ``threads`` CPUs each,
as many at once as the CPUs allow), then the study of their results.

- ``grid``: the trials, each config validated before Ray starts;
- ``trials``: the Tune trainable and the Tuner;
- ``stats``: mean, sd and 95% t-intervals over seeds, paired differences against SAM and SGD,
  collapsed runs flagged; ``accuracy.md``, ``accuracy.csv``, ``figure.png``.

Out of ``--out DIR`` come ``DIR/<trial>/`` (each run's folder), ``DIR/tune/`` (Tune's own
records), ``DIR/sweep.json`` (every trial: its setting, seed, start and end times, accuracy or
error) and the study's files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import TrainConfig, make_config
from ..errors import UserError
from .grid import Trial, expand, parse_grid

#: the algorithms a sweep runs unless told
DEFAULT_ALGOS = ("sgd", "sam", "sampa")


def plan(config: TrainConfig | Mapping[str, Any], grid: Mapping[str, Sequence[Any]]
         | Sequence[str] | None = None, seeds: int = 1,
         algos: Sequence[str] = DEFAULT_ALGOS) -> list[Trial]:
    """The trials of a sweep, validated (one line, :class:`UserError`, for any bad input):
    ``grid`` as ``{"rho": [0.02, 0.05]}`` or the CLI's ``["rho=0.02,0.05"]``."""
    base = config if isinstance(config, TrainConfig) else make_config(dict(config))
    if base.resume is not None:
        raise UserError("resume: a sweep's trials resume themselves (Tune restarts a failed "
                        "trial from its run's checkpoint); start the sweep without --resume")
    if isinstance(grid, Mapping):
        spec = [f"{k}={','.join(map(str, v))}" for k, v in grid.items()]
        for k, v in grid.items():
            if not list(v):
                raise UserError(f"grid: {k} has no values (give {k}=V1,V2,...)")
        parsed = parse_grid(spec)
    else:
        parsed = parse_grid(grid)
    threads = base.threads or 1
    return expand(base.model_copy(update={"threads": threads}), list(algos), parsed, seeds)


def sweep(config: TrainConfig | Mapping[str, Any], out: str | Path, *,
          grid: Mapping[str, Sequence[Any]] | Sequence[str] | None = None, seeds: int = 1,
          algos: Sequence[str] = DEFAULT_ALGOS, cpus: int | None = None,
          overwrite: bool = False, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every trial of the sweep on Ray Tune into ``out`` and write the study there;
    returns each trial's row (as ``sweep.json`` holds them). ``cpus``: the CPUs of the
    embedded Ray instance it starts when none is running (default: the machine's);
    ``overwrite``: trials' folders that hold runs are emptied and run again (else refused)."""
    from ..outdir import prepare_out, write_atomic
    from .stats import Run, write_study
    from .trials import TUNE_DIR, check_cpus, connect, run_trials

    trials = plan(config, grid, seeds, algos)
    per_trial = int(trials[0].config["threads"])
    check_cpus(cpus, per_trial)
    out = Path(out)
    for trial in trials:  # a trial's folder that holds a run: refused, or emptied (overwrite)
        sub = prepare_out(out / trial.name, overwrite)
        if overwrite:
            (sub / "result.json").unlink(missing_ok=True)
    if overwrite:
        shutil.rmtree(out / TUNE_DIR, ignore_errors=True)
    base = make_config(trials[0].config)
    started = connect(base, cpus)
    try:
        rows = run_trials(trials, out, per_trial, say)
    finally:
        if started:
            from ..ray.driver import clean_up

            clean_up(None, None, started=True)
    write_atomic(out / "sweep.json", json.dumps({"trials": rows}, indent=2).encode())
    runs = []
    for row in rows:
        path = out / row["name"] / "result.json"
        result = json.loads(path.read_text()) if path.is_file() and not row.get("error") \
            else None
        runs.append(Run(row["algo"], row["setting"], row["seed"], result, row.get("error")))
    write_study(out, runs, header=describe(trials, seeds))
    return rows


def describe(trials: Sequence[Trial], seeds: int) -> str:
    """The study's heading: the trials, and the settings they share."""
    cfg = trials[0].config
    algos = list(dict.fromkeys(t.algo for t in trials))
    length = f"{cfg['steps']} steps" if cfg.get("steps") else f"{cfg['epochs']} epochs"
    shared = (f"{cfg['model']} on {cfg['dataset']}, {length}, batch {cfg['batch_size']}, "
              f"lr {cfg['lr']} ({cfg['lr_schedule']}), label noise {cfg['label_noise']}")
    return (f"# Sweep: {len(trials)} trials ({', '.join(algos)}; seeds 0..{seeds - 1})\n\n"
            f"{shared}. Accuracy in percent; intervals are 95% t-intervals over seeds; "
            "paired differences use the seeds both runs finished.\n")


__all__ = ["DEFAULT_ALGOS", "Trial", "expand", "parse_grid", "plan", "sweep"]
