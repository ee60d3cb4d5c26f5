"""The driver: join or start Ray, place the workers, start the coordinator next to this process,
and show its progress until the runs are done (the CLI and `ray job submit` entrypoints)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import plugins as sampa_plugins
from .. import signals
from ..checkpoint import PREFIX as CKPT_PREFIX
from ..checkpoint import list_checkpoints
from ..config import TrainConfig
from ..errors import RunFailed, UserError, error_line
from ..events import InfoEvent, Progress, ignore
from ..preflight import check_ray_address
from ..settings import check_shared_workers
from .coordinator import Coordinator
from .placement import Placement, choose_placement, fits, live_resources
from .recovery import NodeLost

#: whether this process started the local Ray instance it is connected to (its processes are
#: then this process's children, which a signal may reach along with it)
_embedded = False


def connect(cfg: TrainConfig) -> bool:
    """Join the cluster at cfg.address / $RAY_ADDRESS, or start an embedded local instance.
    Returns True when this call connected (and so should shut Ray down: :func:`clean_up`)."""
    global _embedded
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:  # one line at once where nothing answers, before Ray's own retries
        check_ray_address(cfg)
    try:
        try:
            if address:
                ray.init(address=address, logging_level="WARNING", log_to_driver=True)
            else:
                _embedded = True
                start_local()
        finally:  # ray.init replaced our SIGTERM handler (and its core prints a dump on one)
            signals.install()
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = address or "a new local instance"
        raise UserError(f"address: cannot connect to Ray at {where}: {error_line(err)}"
                        ) from None
    except BaseException as err:  # a signal while Ray was starting: leave nothing running
        stop = signals.taken_over(err) if isinstance(err, SystemExit) else None
        with signals.deferred():
            clean_up(None, None, started=True)
        if stop is not None:
            raise stop from None
        raise
    return True


#: Ray's variable for how long a starting head waits for its GCS server to publish its port
GCS_WAIT_VAR = "RAY_gcs_server_port_wait_time_s"
#: the wait (seconds) of the one retried start; Ray's own default is 30
GCS_RETRY_WAIT_S = 120


#: the logger of Ray's notice that a new local cluster turned token authentication on
#: (``ray._private.authentication.authentication_token_setup._warn_token_auth_enabled``)
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster."


class _TokenAuthNotice(logging.Filter):
    """Drops Ray 2.60's WARNING that token authentication is on, for the embedded instance we
    start: on every run it says what we want (the instance is ours, the token stays on) and
    reads like a problem. Setting ``RAY_AUTH_MODE=token`` would not do: Ray reads its config
    once, when it is imported, so the variable set later leaves the token off. Every other
    record of that logger (the warning that authentication is off among them) passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_NOTICE)


@contextlib.contextmanager
def _quiet_token_notice() -> Iterator[None]:
    logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    notice = _TokenAuthNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def start_local(**options: Any) -> None:
    """Start an embedded local Ray instance (``ray.init`` with ``options``), without Ray's
    notice that token authentication is on (:class:`_TokenAuthNotice`). On a loaded machine
    the GCS server can take longer to come up than Ray waits for it (30 s): the half-started
    instance is then stopped, one line says so on stderr, and it starts once more with a
    120 s wait."""
    opts: dict[str, Any] = {"address": "local", "include_dashboard": False,
                            "logging_level": "WARNING", **options}
    try:
        with _quiet_token_notice():
            ray.init(**opts)
        return
    except RuntimeError as err:
        if "Timed out waiting for file" not in str(err):
            raise
        node = _half_started(err)
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
        waited = os.environ.get(GCS_WAIT_VAR, "30")
    wait = max(GCS_RETRY_WAIT_S, int(waited) if waited.isdigit() else 0)
    print(f"Ray's GCS server did not start within {waited} s; starting once more "
          f"(waiting up to {wait} s)", file=sys.stderr, flush=True)
    with _env(GCS_WAIT_VAR, str(wait)), _quiet_token_notice():
        ray.init(**opts)


def _half_started(err: BaseException) -> Any:
    """The Ray node whose start raised ``err`` (its processes are still running), if any."""
    from ray._private.node import Node

    tb = err.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, Node):
            return obj
        tb = tb.tb_next
    return None


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def plugins() -> dict[str, dict[str, Any]]:
    """The algorithms registered in this process beyond the built-ins, and the plug-ins
    (model, dataset, loss) resolved or registered here. They travel to the coordinator and the
    workers by value (their module need not be importable there)."""
    bundle = sampa_plugins.shipped()
    halves = [e.half for e in bundle["paths"].values() if not isinstance(e.half, str)]
    sampa_plugins.by_value([*bundle["algorithms"].values(), *bundle["objects"].values(),
                            *halves], ray.cloudpickle)
    return bundle


def run_ray(cfg: TrainConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Run on Ray and write the outputs into ``out`` (from the coordinator, on this node)."""
    return run_ray_many([(cfg, out)], progress)[0]


def run_ray_many(runs: list[tuple[TrainConfig, Path]], progress: Progress | None = None,
                 placement_timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Run several configurations one after the other on the same coordinator and workers
    (which every one of them must be able to use: checked before anything starts)."""
    base = runs[0][0]
    for cfg, _ in runs[1:]:
        check_shared_workers(base, cfg)
    started = connect(base)
    pg = None
    coord = None
    show = progress or ignore
    try:
        placement = choose_placement(base)
        show(InfoEvent(text=placement.describe()))
        pg = reserve(placement, placement_timeout_s)
        results = []
        for cfg, out in runs:
            lost = 0
            while True:
                if coord is None:
                    coord = start_coordinator(base, placement, pg)
                try:
                    results.append(follow(coord, cfg, out, show))
                    break
                except RayActorError as err:  # the coordinator died: a new one goes on
                    lost += 1
                    if lost > cfg.max_restarts:
                        raise RunFailed(coordinator_lost(err, [out])) from None
                    with contextlib.suppress(Exception):
                        ray.kill(coord)
                    coord = None
                    cfg = resumed(cfg, out)
                    where = "its newest checkpoint" if cfg.resume else "the start"
                    show(InfoEvent(text=f"the coordinator died; a new one continues from "
                                        f"{where} ({lost} of at most {cfg.max_restarts} "
                                        "restarts)"))
                except RayTaskError as err:  # a node lost and not replaced: stop, or pack
                    if not isinstance(err.cause, NodeLost):
                        raise
                    lost += 1
                    placement, pg = repack(err.cause, cfg, out, coord, pg, lost,
                                           placement_timeout_s)
                    coord = None
                    cfg = resumed(cfg, out)
                    step = newest_step(out)
                    where = "the start" if step is None else f"its checkpoint at step {step}"
                    show(InfoEvent(text=f"{err.cause}: continuing on the nodes left from "
                                        f"{where} (the same trajectory)"))
                    show(InfoEvent(text=placement.describe()))
            if results[-1].get("stopped_early"):
                break  # stopped through the control API: no further runs
        return results
    except RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise UserError(str(err.cause)) from None
        raise
    finally:
        with signals.deferred():  # a first signal now must not cut the clean-up short
            clean_up(coord, pg, started)


def reserve(placement: Any, timeout_s: float) -> Any:
    """The workers' placement group, ready; one line where the cluster cannot hold it."""
    need = sum(b.get("CPU", 0.0) for b in placement.bundles)
    have = ray.cluster_resources().get("CPU", 0.0)
    if _embedded and need > have:  # nothing joins an instance this process started
        raise UserError(f"threads: the {len(placement.bundles)} workers need {need:g} CPUs "
                        f"({placement.threads} each), the local Ray instance has {have:g}")
    pg = placement_group(placement.bundles, strategy=placement.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise UserError(f"placement: the cluster cannot fit {placement.bundles} "
                        f"({placement.strategy}) within {timeout_s:.0f}s")
    return pg


def start_coordinator(base: TrainConfig, placement: Any, pg: Any) -> Any:
    """The coordinator actor, on this node (it writes the outputs here), with its workers
    started in the placement group's bundles."""
    here = ray.get_runtime_context().get_node_id()
    coord = Coordinator.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(base.model_dump(), asdict(placement), pg, plugins())
    ray.get(coord.start.remote())
    return coord


def follow(coord: Any, cfg: TrainConfig, out: Path, show: Progress) -> dict[str, Any]:
    """Run one configuration on the coordinator, showing its progress until it is done."""
    run_ref = coord.run.remote(cfg.model_dump(), str(out.resolve()))
    while True:
        done, _ = ray.wait([run_ref], timeout=0.25)
        for ev in ray.get(coord.poll.remote()):
            show(ev)
        if done:
            return ray.get(run_ref)


def resumed(cfg: TrainConfig, out: Path) -> TrainConfig:
    """The run to start after its coordinator died: from the newest checkpoint in ``out`` if
    there is one (the same trajectory, bit for bit), else from the start."""
    if list_checkpoints(out / "checkpoints"):
        return cfg.model_copy(update={"resume": str(out)})
    return cfg


def repack(lost: NodeLost, cfg: TrainConfig, out: Path, coord: Any, pg: Any, losses: int,
           timeout_s: float) -> tuple[Placement, Any]:
    """After ``lost``: with ``--on-node-loss pack``, where the nodes left can hold every worker,
    end the run's coordinator (its workers go with it) and placement group and return a new
    placement and group on the nodes left (the run then resumes from its newest checkpoint);
    otherwise :class:`RunFailed` with the one line that says what happened and how to go on."""
    try:
        plan: Placement | None = choose_placement(cfg)
    except UserError:  # no placement at all (--device cuda and no GPU left)
        plan = None
    room = plan is not None and fits(plan, live_resources())
    if plan is None or not room or cfg.on_node_loss != "pack" or losses > cfg.max_restarts:
        raise RunFailed(node_lost_line(lost, cfg, out, room, losses))
    clean_up(coord, pg, started=False)
    try:
        return plan, reserve(plan, timeout_s)
    except UserError:  # the nodes left cannot hold it after all
        raise RunFailed(node_lost_line(lost, cfg, out, False, losses)) from None


def newest_step(out: Path) -> int | None:
    """The step of the newest checkpoint in ``out``; None when there is none."""
    newest = list_checkpoints(out / "checkpoints")
    return int(newest[0].stem[len(CKPT_PREFIX):]) if newest else None


def node_lost_line(lost: NodeLost, cfg: TrainConfig, out: Path, room: bool,
                   losses: int) -> str:
    """The one line of a run stopped by a lost node: which node, which workers, and the
    command that continues it (``--resume`` places the workers on the nodes there are then);
    ``room``: whether the nodes left can hold them."""
    n = 2 * cfg.workers_per_role
    step = newest_step(out)
    if step is None:  # its checkpoints could not be written
        return (f"{lost}; no checkpoint of the run was written, so it starts over "
                f"(--overwrite, --out {out})")
    go_on = f"`sampa-ray train --resume {out}` continues from its checkpoint at step {step}"
    if cfg.on_node_loss == "pack" and room:  # packed too often
        return (f"{lost} ({losses} losses in this run, more than --max-restarts "
                f"{cfg.max_restarts}); {go_on}")
    if room:
        return (f"{lost}; {go_on} on the nodes left (they can hold its {n} workers; "
                "--on-node-loss pack goes on there without stopping)")
    packed = " (--on-node-loss pack: the nodes left cannot hold them)" \
        if cfg.on_node_loss == "pack" else ""
    return f"{lost}; {go_on} once the cluster has room for its {n} workers again{packed}"


def coordinator_lost(err: RayActorError, outs: list[Path]) -> str:
    """The one line for a run whose coordinator died more often than ``--max-restarts``
    allows: why (briefly), and how to go on."""
    why = error_line(err)
    why = why if len(why) <= 120 else why[:117] + "..."
    resumable = [o for o in outs if list_checkpoints(o / "checkpoints")]
    if resumable:
        hint = (f"`sampa-ray train --resume {resumable[-1]}` continues from its newest "
                "checkpoint")
    else:
        hint = ("no checkpoint was written yet, so the run starts over (--checkpoint-every N "
                "makes it resumable)")
    return f"the coordinator died ({why}); {hint}"


def clean_up(coord: Any, pg: Any, started: bool) -> None:
    """End the coordinator (its workers die with it), free the placement group and, when
    ``started`` (what :func:`connect` returned), disconnect from Ray, shutting down the instance
    this process started. Each step runs even if one before it failed (the cluster may be going
    down too); after a signal the coordinator gets less time."""
    global _embedded
    hurry = signals.received() is not None
    if hurry and _embedded and signals.end_processes():
        # A signal may have reached the whole process group, Ray's processes with it: the GCS
        # may be gone, and every call to it (ray.shutdown's too) would wait out its timeouts.
        # The processes of the instance are this process's, so end them directly, and leave
        # without Ray's own shutdown.
        signals.exit_now()
        return
    if coord is not None:
        with contextlib.suppress(Exception):  # best effort: health goes NOT_SERVING first
            ray.get(coord.shutdown.remote(), timeout=2 if hurry else 10)
        with contextlib.suppress(Exception):
            ray.kill(coord)
    if pg is not None:
        with contextlib.suppress(Exception):
            remove_placement_group(pg)
    if started:
        ray.shutdown()
        _embedded = False
