"""A sweep's trials on Ray Tune: one sampa-ray training per trial, on the local backend (one
process per trial, ``threads`` CPUs declared with ``tune.with_resources``), so Tune runs as
many at once as the cluster's CPUs allow.

Each trial writes its run into ``<sweep>/<trial name>/`` (``result.json``, ``final.pt``,
``curves.png``, checkpoints) and reports to Tune at every epoch and evaluation
(``tune.report``); when the run wrote a new checkpoint since the last report, the report carries
the run's checkpoint folder (``tune.Checkpoint``). A trial that Tune restarts
(``FailureConfig(max_failures=1)``) continues from the run's newest checkpoint, its own or the
one Tune kept (``tune.get_checkpoint``), through the config's ``resume``. The trial's final
report holds the run's headline numbers and its start and end times; the run's
``result.json`` is its result.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import UserError, one_line
from ..events import EpochEvent, EvalEvent, Event
from .grid import Trial

#: Tune's own files (its experiment state, per-trial logs) under the sweep's folder
TUNE_DIR = "tune"


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


class _Reporter:
    """The run's progress events as Tune reports: one per epoch and per evaluation, with the
    run's checkpoint folder where a new checkpoint was written since the last report."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.saved: str | None = None

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, EpochEvent):
            metrics = {"kind": "epoch", "epoch": ev.epoch, "step": ev.step, "lr": ev.lr,
                       "wall_s": ev.wall_s, "train_loss": ev.train_loss,
                       "train_accuracy": ev.train_accuracy, "test_accuracy": ev.test_accuracy}
        elif isinstance(ev, EvalEvent):
            metrics = {"kind": "eval", "step": ev.step, "test_accuracy": ev.test_accuracy,
                       "test_loss": ev.test_loss}
        else:
            return
        self.report({k: _finite(v) for k, v in metrics.items()})

    def report(self, metrics: dict[str, Any]) -> None:
        from ray import tune

        from ..outdir import list_checkpoints

        folder = self.out / "checkpoints"
        newest = list_checkpoints(folder)
        checkpoint = None
        if newest and newest[0].name != self.saved:
            self.saved = newest[0].name
            checkpoint = tune.Checkpoint.from_directory(str(folder))
        tune.report(metrics, checkpoint=checkpoint)


def _restore(out: Path) -> None:
    """A restarted trial whose folder lost its checkpoints gets Tune's copy back."""
    from ray import tune

    from ..outdir import list_checkpoints

    kept = tune.get_checkpoint()
    if kept is not None and not list_checkpoints(out / "checkpoints"):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(out / "checkpoints")
        kept.to_directory(str(out / "checkpoints"))


def train_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: trial ``config["trial"]`` (its name, config fields and run
    folder) trained on the local backend. A run that fails (non-finite losses, a bad plug-in)
    ends the trial with its one line in the final report, so the study counts it."""
    from ray import tune

    from ..checkpoint import config_for_resume
    from ..config import make_config
    from ..outdir import finished_run, list_checkpoints
    from ..runner import run

    trial = config["trial"]
    out = Path(trial["out"])
    started = time.time()
    final: dict[str, Any] = {"kind": "final", "trial": trial["name"], "out": str(out),
                             "started_at": started}
    reporter = _Reporter(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _restore(out)
        result = finished_run(out)  # a trial Tune restarts after its run finished
        if result is None or result.get("config_hash") != make_config(
                trial["config"]).hash():
            data = {**trial["config"], "out": str(out)}
            if list_checkpoints(out / "checkpoints"):  # a restarted trial goes on
                cfg = config_for_resume(str(out), {k: data[k] for k in ("out", "threads")})
                cfg = cfg.model_copy(update={"backend": "local"})
            else:
                cfg = make_config(data)
            result = run(cfg, out, reporter)
        final.update(final_test_accuracy=_finite(result.get("final_test_accuracy")),
                     wall_time_s=result.get("wall_time_s"), steps=result.get("steps"),
                     sequential_gradients_per_update=result.get(
                         "sequential_gradients_per_update"))
    except Exception as err:  # the run's own line: the study flags the trial
        final["error"] = one_line(f"{type(err).__name__}: {err}" if not isinstance(
            err, UserError) else str(err))
    final["finished_at"] = time.time()
    tune.report(final)


def run_trials(trials: Sequence[Trial], out: Path, cpus_per_trial: int,
               say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run ``trials`` on Ray Tune (connected already), each into ``out/<name>``, as many at
    once as the CPUs allow; returns each trial's final report, in the trials' order."""
    from ray import tune

    by_name = {t.name: t for t in trials}
    space = [{"name": t.name, "config": t.config, "out": str((out / t.name).resolve())}
             for t in trials]
    tuner = tune.Tuner(
        tune.with_resources(train_trial, {"cpu": cpus_per_trial}),
        param_space={"trial": tune.grid_search(space)},
        tune_config=tune.TuneConfig(
            trial_name_creator=lambda t: t.config["trial"]["name"],
            trial_dirname_creator=lambda t: t.config["trial"]["name"],
            reuse_actors=False),
        run_config=tune.RunConfig(
            name="trials", storage_path=str((out / TUNE_DIR).resolve()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=1)))
    say(f"sweep: {len(trials)} trials on Ray Tune, {cpus_per_trial} CPU each, into {out}")
    grid = tuner.fit()
    finals: dict[str, dict[str, Any]] = {}
    for res in grid:
        name = res.config["trial"]["name"]
        metrics = dict(res.metrics or {})
        if metrics.get("kind") != "final":  # the trial died outside the run (Tune's error)
            metrics = {"trial": name, "error": one_line(str(res.error or "no final report"))}
        finals[name] = metrics
    return [{"name": n, "algo": t.algo, "setting": t.setting_text, "seed": t.seed,
             **{k: v for k, v in finals.get(n, {"error": "not run"}).items()
                if k in ("out", "started_at", "finished_at", "final_test_accuracy",
                         "wall_time_s", "steps", "sequential_gradients_per_update", "error")}}
            for n, t in by_name.items()]


def connect(base: TrainConfig, cpus: int | None) -> bool:
    """Join Ray as a run would (``--address``, ``$RAY_ADDRESS``), or start an embedded instance
    with ``cpus`` CPUs (default: the machine's); True when this call connected."""
    import ray

    from ..ray.driver import connect as join
    from ..ray.driver import start_local

    if ray.is_initialized():
        return False
    if base.address or os.environ.get("RAY_ADDRESS") or not cpus:
        return join(base)
    start_local(num_cpus=cpus)
    return True


def check_cpus(cpus: int | None, per_trial: int) -> None:
    """A trial must fit the CPUs the sweep's embedded instance is given."""
    if cpus is not None and cpus < per_trial:
        raise UserError(f"cpus: {cpus} cannot hold one trial of {per_trial} CPUs (threads)")


__all__ = ["TUNE_DIR", "check_cpus", "connect", "run_trials", "train_trial"]
