"""The single-process backend: both workers' engines in this process, one after the other.

The same loop, algorithm and outputs as on Ray, so a local run is the reference every Ray data
path is compared with, bit for bit.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import torch

from .algorithms import AlgoState, GradRequest
from .checkpoint import Checkpointer, find_resume
from .config import TrainConfig
from .engine import EvalResult, GradientEngine, GradResult, Snapshot
from .events import InfoEvent, Progress, ignore
from .executor import Executor, Plan
from .loop import Hooks, make_algorithm, train_loop
from .results import Recorder, build_result, earlier_wall_s, write_outputs
from .scaler import LossScale
from .selection import write_best


class LocalExecutor(Executor):
    """Both workers' engines in this process, evaluated one after the other; each role goes to
    the engine of the worker the algorithm puts it on, as on Ray."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.algo = make_algorithm(cfg, 1)
        self.engines = [GradientEngine(cfg) for _ in range(2)]  # two, as on Ray
        # the worker whose BatchNorm statistics evaluation and final.pt use (``bn_stats``)
        self.stats = self.engines[self.algo.slot_of(self.algo.bn_stats_role)]

    async def round(self, reqs: list[GradRequest],
                    ahead: list[GradRequest] | None = None) -> dict[str, GradResult]:
        out = {}
        for r in reqs:
            res = self.engines[self.algo.slot_of(r.role)].gradient(
                r.point, r.batch, r.track_stats, loss_scale=r.loss_scale)
            if res.grad.dtype != torch.float32:  # a bf16 wire: what the other backends receive
                res.grad = res.grad.float()
            out[r.role] = res
        return out

    async def start_eval(self, step: int, state: AlgoState) -> None:
        self.stats.start_eval(step, state.x)  # the engine snapshots x into its eval replica

    async def finished_evals(self, wait: bool) -> list[tuple[int, EvalResult]]:
        return self.stats.finished_evals(wait)

    async def buffers(self) -> dict[str, torch.Tensor]:
        return self.stats.buffers()

    async def best(self) -> Snapshot | None:
        return self.stats.best()

    async def all_buffers(self) -> list[dict[str, torch.Tensor]]:
        return [e.buffers() for e in self.engines]

    async def load_buffers(self, buffers: list[dict[str, torch.Tensor]]) -> None:
        for e, b in zip(self.engines, buffers, strict=True):
            e.load_buffers(b)


def run_local(cfg: TrainConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Train in this process and write the run's outputs into ``out``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    say = progress or ignore
    executor = LocalExecutor(cfg)
    engine = executor.engines[0]
    info = engine.info()
    plan = Plan.of(cfg, info["batches_per_epoch"])
    algo = make_algorithm(cfg, plan.total_steps, plan.batches_per_epoch)
    resume = find_resume(cfg, info["num_params"], lambda text: say(InfoEvent(text=text))) \
        if cfg.resume else None
    recorder = Recorder(algo.stats_role, started=t0,
                        earlier_s=earlier_wall_s(resume.meta.get("record", {})) if resume else 0.0)
    scale = LossScale.of(cfg)
    checkpointer = Checkpointer(cfg, out / "checkpoints", executor, recorder, info["num_params"],
                                scale)

    async def go() -> tuple[AlgoState, dict[str, torch.Tensor], Snapshot | None]:
        state = await train_loop(algo, executor, engine.initial_point(), plan, recorder,
                                 Hooks(progress=say, checkpoint=checkpointer), resume=resume,
                                 scale=scale)
        await checkpointer.flush()
        return state, await executor.buffers(), await executor.best()

    state, buffers, best = asyncio.run(go())
    result = build_result(cfg, algo, recorder, state, plan.total_steps, plan.batches_per_epoch,
                          info, recorder.wall_s(), backend="local", device=info["device"])
    write_best(out, result, best)
    write_outputs(out, result, state.x, buffers)
    return result
