"""The driver: join or start Ray, place the workers, start the coordinator next to this process,
and show its progress until the runs are done (the CLI and `ray job submit` entrypoints)."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import algorithms
from ..algorithms import Algorithm
from ..config import TrainConfig
from ..errors import UserError
from ..loop import Progress
from .coordinator import Coordinator
from .placement import choose_placement


def connect(cfg: TrainConfig) -> bool:
    """Join the cluster at cfg.address / $RAY_ADDRESS, or start an embedded local instance.
    Returns True when this call started Ray (and so should shut it down)."""
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        else:
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = address or "a new local instance"
        raise UserError(f"address: cannot connect to Ray at {where}: {first}") from None
    return True


def plugins() -> dict[str, type[Algorithm]]:
    """The algorithms registered in this process beyond the built-ins. They travel to the
    coordinator and the workers by value (their module need not be importable there)."""
    extra = {n: c for n, c in algorithms.registered().items() if n not in algorithms.BUILTIN}
    for cls in extra.values():
        module = sys.modules.get(cls.__module__)
        if module is not None and cls.__module__ != "__main__" and \
                not cls.__module__.startswith("sampa_ray."):
            ray.cloudpickle.register_pickle_by_value(module)
    return extra


def run_ray(cfg: TrainConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Run on Ray and write the outputs into ``out`` (from the coordinator, on this node)."""
    return run_ray_many([(cfg, out)], progress)[0]


def run_ray_many(runs: list[tuple[TrainConfig, Path]], progress: Progress | None = None,
                 placement_timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Run several configurations one after the other on the same coordinator and workers."""
    base = runs[0][0]
    started = connect(base)
    pg = None
    coord = None
    show = progress or (lambda ev: None)
    try:
        placement = choose_placement(base)
        show({"kind": "info", "text": placement.describe()})
        pg = placement_group(placement.bundles, strategy=placement.strategy)
        ready, _ = ray.wait([pg.ready()], timeout=placement_timeout_s)
        if not ready:
            raise UserError(f"placement: the cluster cannot fit {placement.bundles} "
                            f"({placement.strategy}) within {placement_timeout_s:.0f}s")
        here = ray.get_runtime_context().get_node_id()
        coord = Coordinator.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(base.model_dump(), asdict(placement), pg, plugins())
        ray.get(coord.start.remote())
        results = []
        for cfg, out in runs:
            run_ref = coord.run.remote(cfg.model_dump(), str(out.resolve()))
            while True:
                done, _ = ray.wait([run_ref], timeout=0.25)
                for ev in ray.get(coord.poll.remote()):
                    show(ev)
                if done:
                    break
            results.append(ray.get(run_ref))
            if results[-1].get("stopped_early"):
                break  # stopped through the control API: no further runs
        return results
    except RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise UserError(str(err.cause)) from None
        raise
    finally:
        if coord is not None:
            with contextlib.suppress(Exception):  # best effort: health goes NOT_SERVING first
                ray.get(coord.shutdown.remote(), timeout=10)
            ray.kill(coord)  # the workers it owns die with it
        if pg is not None:
            remove_placement_group(pg)
        if started:
            ray.shutdown()
