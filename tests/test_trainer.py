"""The shared training loop and the single-process backend: outputs, the trajectory against a
loop written out here by hand, the BatchNorm policy end to end, and reproducibility."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import num_batches_tracked, same_tensors

from sampa_ray.algorithms import BUILTIN, SAM, SGD, SAMPa
from sampa_ray.config import TrainConfig, make_config
from sampa_ray.engine import GradientEngine
from sampa_ray.events import EpochEvent, Event, RoundEvent
from sampa_ray.local import LocalExecutor, run_local
from sampa_ray.loop import Hooks, Plan, make_algorithm, train_loop
from sampa_ray.results import Recorder

ALGOS = BUILTIN
STEPS = 25
BATCH = 64
PER_EPOCH = 1437 // BATCH  # 22
ROUNDS = {"sgd": STEPS, "sam": 2 * STEPS, "sampa": STEPS + 1}
PER_UPDATE = {"sgd": 1, "sam": 2, "sampa": 1}
ROLES = {"sgd": {"grad"}, "sam": {"ascent", "perturbed"}, "sampa": {"perturbed", "extrapolated"}}
STATS_ROLE = {"sgd": "grad", "sam": "ascent", "sampa": "extrapolated"}
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(algo: str, **over: Any) -> TrainConfig:
    return make_config(
        {
            "algo": algo,
            "model": "cnn",
            "dataset": "digits",
            "batch_size": BATCH,
            "steps": STEPS,
            "threads": 1,
            "device": "cpu",
            "seed": 0,
            **over,
        }
    )


def _algo(cfg: TrainConfig, plan: Plan) -> Any:
    """The configured algorithm over the plan's updates, as a backend hands it to the loop."""
    return make_algorithm(cfg, plan.total_steps, plan.batches_per_epoch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TrainConfig, dict, Path]]:
    torch.set_num_threads(1)
    out: dict[str, tuple[TrainConfig, dict, Path]] = {}
    for algo in ALGOS:
        cfg = _cfg(algo)
        path = tmp_path_factory.mktemp(f"run-{algo}")
        out[algo] = (cfg, run_local(cfg, path), path)
    return out


def _final(path: Path) -> dict[str, Any]:
    return torch.load(path / "final.pt", map_location="cpu", weights_only=True)


def _fresh_buffers(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    return GradientEngine(cfg).buffers()


def _hand_loop(cfg: TrainConfig) -> tuple[torch.Tensor, list[GradientEngine], str]:
    """requests -> gradients -> update, written out over two engines: the extrapolated role on
    the second, every other on the first."""
    total = cfg.steps
    assert total is not None

    def lr(step: int) -> float:
        return cfg.lr_at(step, total)

    if cfg.algo == "sgd":
        algo = SGD(lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.algo == "sam":
        algo = SAM(lr, rho=cfg.rho, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        algo = SAMPa(
            lr, rho=cfg.rho, lam=cfg.lam, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    engines = [GradientEngine(cfg), GradientEngine(cfg)]
    state = algo.init(engines[0].initial_point())
    while state.step < total:
        grads = {}
        for req in algo.requests(state):
            res = engines[slot_for(req.role)].gradient(req.point, req.batch, req.track_stats)
            grads[req.role] = res.grad.clone()
        algo.update(state, grads)
    return state.x.clone(), engines, algo.stats_role


def slot_for(role: str) -> int:
    return 1 if role == "extrapolated" else 0


def test_algorithms_put_their_roles_on_workers() -> None:
    """SAMPa's two gradients on two workers (in parallel); SGD's and SAM's on the first, the
    worker SAMPa's perturbed gradient uses."""
    for cls in (SGD, SAM, SAMPa):
        assert cls.slots == {role: slot_for(role) for role in cls.slots}
    assert SAMPa.slots == {"perturbed": 0, "extrapolated": 1}
    assert set(SAM.slots) == ROLES["sam"] and set(SGD.slots) == ROLES["sgd"]


@pytest.mark.outcome
@pytest.mark.parametrize("algo", ALGOS)
def test_result_json(algo: str, runs: dict, outcome: Callable) -> None:
    cfg, result, path = runs[algo]
    on_disk = json.loads((path / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(result, default=str))

    assert on_disk["steps"] == STEPS
    assert on_disk["planned_steps"] == STEPS
    assert on_disk["gradient_rounds"] == ROUNDS[algo]
    assert on_disk["rounds_per_update"] == PER_UPDATE[algo]
    assert on_disk["batches_per_epoch"] == PER_EPOCH
    assert on_disk["num_params"] == GradientEngine(cfg).flat.numel
    assert on_disk["config"] == json.loads(json.dumps(cfg.model_dump()))
    assert on_disk["config"]["algo"] == algo
    assert on_disk["config_hash"] == cfg.hash()
    assert on_disk["algorithm"]["algo"] == algo
    assert on_disk["backend"] == "local"
    assert on_disk["wall_time_s"] > 0

    epochs = on_disk["epochs"]
    assert [r["step"] for r in epochs] == [PER_EPOCH, STEPS]
    assert [r["epoch"] for r in epochs] == pytest.approx([1.0, STEPS / PER_EPOCH])
    assert [r["lr"] for r in epochs] == pytest.approx(
        [cfg.lr_at(PER_EPOCH - 1, STEPS), cfg.lr_at(STEPS - 1, STEPS)]
    )
    for row in epochs:
        assert row["test_accuracy"] is not None and 0.0 <= row["test_accuracy"] <= 1.0
        assert row["test_loss"] is not None and math.isfinite(row["test_loss"])
        assert row["train_loss"] is not None and 0.0 < row["train_loss"] < 5.0
        assert 0.0 <= row["train_accuracy"] <= 1.0
    assert on_disk["final_test_accuracy"] == epochs[-1]["test_accuracy"]
    assert on_disk["final_test_loss"] == epochs[-1]["test_loss"]
    # 25 steps of training do better than chance on digits
    outcome("final test accuracy", on_disk["final_test_accuracy"], ">", 0.3)

    timings = on_disk["timings"]
    assert timings["round_seconds"]["count"] == ROUNDS[algo]
    assert timings["update_seconds"]["count"] == ROUNDS[algo]
    workers = timings["workers"]
    assert set(workers) == ROLES[algo]
    for stats in workers.values():
        assert stats["compute"]["mean"] > 0
        assert stats["compute"]["min"] > 0
    if algo == "sampa":
        assert workers["extrapolated"]["compute"]["count"] == STEPS + 1
        assert workers["perturbed"]["compute"]["count"] == STEPS
    elif algo == "sam":
        assert workers["ascent"]["compute"]["count"] == STEPS
        assert workers["perturbed"]["compute"]["count"] == STEPS


@pytest.mark.parametrize("algo", ALGOS)
def test_trace_shows_the_rounds(algo: str, runs: dict) -> None:
    _, result, _ = runs[algo]
    trace = result["trace"]
    by_round: dict[int, list[str]] = {}
    for t in trace:
        assert t["end"] >= t["start"]
        by_round.setdefault(t["round"], []).append(t["role"])
    assert sorted(by_round) == list(range(ROUNDS[algo]))
    for r, roles in by_round.items():
        if algo == "sgd":
            assert roles == ["grad"]
        elif algo == "sam":
            assert roles == ["ascent" if r % 2 == 0 else "perturbed"]
        elif r == 0:
            assert roles == ["extrapolated"]  # the bootstrap round
        else:
            assert sorted(roles) == ["extrapolated", "perturbed"]


@pytest.mark.parametrize("algo", ALGOS)
def test_output_files(algo: str, runs: dict) -> None:
    _, result, path = runs[algo]
    final = _final(path)
    assert {"x", "buffers"} <= set(final)
    x = final["x"]
    assert x.dim() == 1 and x.numel() == result["num_params"] and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    png = (path / "curves.png").read_bytes()
    assert png[:8] == PNG and len(png) > 1000
    assert not list(path.glob("*.tmp"))


@pytest.mark.parametrize("algo", ALGOS)
def test_final_point_and_buffers_match_a_hand_written_loop(algo: str, runs: dict) -> None:
    cfg, _, path = runs[algo]
    final = _final(path)
    x, engines, stats_role = _hand_loop(cfg)
    assert stats_role == STATS_ROLE[algo]
    assert torch.equal(final["x"], x)
    assert not torch.equal(x, engines[0].initial_point())
    traj = engines[slot_for(stats_role)]
    assert same_tensors(final["buffers"], traj.buffers())
    fresh = _fresh_buffers(cfg)
    # one tracked pass per update (plus SAMPa's bootstrap); perturbed passes are not counted
    assert num_batches_tracked(final["buffers"]) == {ROUNDS[algo] if algo == "sampa" else STEPS}
    if algo == "sampa":
        assert same_tensors(engines[0].buffers(), fresh)


@pytest.mark.parametrize("algo", ALGOS)
def test_final_accuracy_is_the_final_point_with_trajectory_statistics(
    algo: str, runs: dict
) -> None:
    cfg, result, path = runs[algo]
    final = _final(path)
    e = GradientEngine(cfg)
    e.load_buffers(final["buffers"])
    ev = e.evaluate(final["x"])
    assert ev.accuracy == result["final_test_accuracy"]
    assert ev.loss == pytest.approx(result["final_test_loss"], rel=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_batchnorm_policy_in_the_executor(algo: str, runs: dict) -> None:
    """Run the package's loop on its LocalExecutor and look at every worker's statistics."""
    cfg, _, path = runs[algo]
    final = _final(path)
    ex = LocalExecutor(cfg)
    stats_slot = slot_for(STATS_ROLE[algo])
    assert ex.stats is ex.engines[stats_slot]
    x0 = ex.engines[0].initial_point()
    plan = Plan.of(cfg, ex.engines[0].info()["batches_per_epoch"])
    state = asyncio.run(train_loop(_algo(cfg, plan), ex, x0, plan, Recorder(STATS_ROLE[algo])))
    assert torch.equal(state.x, final["x"])
    assert same_tensors(asyncio.run(ex.buffers()), final["buffers"])
    fresh = _fresh_buffers(cfg)
    assert not same_tensors(final["buffers"], fresh)
    # every worker but the trajectory one (SAMPa: the perturbed worker) keeps its initial
    # running statistics
    for slot, engine in enumerate(ex.engines):
        if slot != stats_slot:
            assert same_tensors(engine.buffers(), fresh), slot
    if algo == "sampa":
        assert stats_slot == 1
        assert same_tensors(ex.engines[0].buffers(), fresh)


def test_same_seed_same_trajectory_other_seed_another(runs: dict, tmp_path: Path) -> None:
    cfg, result, path = runs["sampa"]
    again = run_local(cfg, tmp_path / "again")
    x_first = _final(path)["x"]
    assert torch.equal(_final(tmp_path / "again")["x"], x_first)
    assert same_tensors(_final(tmp_path / "again")["buffers"], _final(path)["buffers"])
    assert again["final_test_accuracy"] == result["final_test_accuracy"]
    assert [r["train_loss"] for r in again["epochs"]] == [r["train_loss"] for r in result["epochs"]]
    run_local(_cfg("sampa", seed=1), tmp_path / "seed1")
    assert not torch.equal(_final(tmp_path / "seed1")["x"], x_first)


def test_eval_every_and_progress_events(tmp_path: Path) -> None:
    cfg = _cfg("sgd", batch_size=128, steps=30, eval_every=2)  # 11 batches per epoch
    events: list[Any] = []
    result = run_local(cfg, tmp_path, progress=events.append)
    rows = result["epochs"]
    assert [r["step"] for r in rows] == [11, 22, 30]
    assert rows[0]["test_accuracy"] is None
    assert rows[1]["test_accuracy"] is not None and rows[2]["test_accuracy"] is not None
    assert result["final_test_accuracy"] == rows[2]["test_accuracy"]
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    assert [e.step for e in rounds] == list(range(1, 31))
    assert all(e.total == 30 for e in rounds)
    assert [e.step for e in events if isinstance(e, EpochEvent)] == [11, 22, 30]


def test_stopping_early_closes_and_evaluates_the_partial_epoch() -> None:
    cfg = _cfg("sam")
    ex = LocalExecutor(cfg)
    plan = Plan.of(cfg, PER_EPOCH)
    rec = Recorder("ascent")
    seen = {"step": 0}

    def progress(ev: Event) -> None:
        if isinstance(ev, RoundEvent):
            seen["step"] = ev.step

    state = asyncio.run(
        train_loop(
            _algo(cfg, plan),
            ex,
            ex.engines[0].initial_point(),
            plan,
            rec,
            Hooks(progress=progress, should_stop=lambda: seen["step"] >= 4),
        )
    )
    assert state.step == 4
    assert state.phase == 0  # never stopped inside an update
    assert rec.rounds == 8
    assert [r["step"] for r in rec.epochs] == [4]
    assert rec.epochs[0]["epoch"] == pytest.approx(4 / PER_EPOCH)
    assert rec.epochs[0]["test_accuracy"] is not None


def test_bf16_wire_keeps_the_final_accuracy(tmp_path: Path) -> None:
    """The bound a bf16 wire gets instead of bitwise equality: the default job (SAMPa-0.2,
    8 epochs on digits) reaches the fp32 run's test accuracy within 2 points, and its
    training loss follows the fp32 curve epoch by epoch."""
    res = {w: run_local(make_config({"backend": "local", "threads": 1, "wire_dtype": w}),
                        tmp_path / w) for w in ("fp32", "bf16")}
    a32, a16 = res["fp32"]["final_test_accuracy"], res["bf16"]["final_test_accuracy"]
    assert a32 > 0.95 and a16 > 0.95
    assert abs(a32 - a16) <= 0.02
    l32 = [e["train_loss"] for e in res["fp32"]["epochs"]]
    l16 = [e["train_loss"] for e in res["bf16"]["epochs"]]
    assert len(l32) == len(l16) == 8
    assert l16 != l32  # the rounding changed the trajectory
    for e32, e16 in zip(l32, l16, strict=True):
        assert abs(e16 - e32) <= 0.1 * e32 + 0.01


class _Recording(LocalExecutor):
    """The local executor, claiming it runs rounds ahead: records what the loop offers."""

    runs_ahead = True

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.offered: list[tuple[str, ...] | None] = []

    async def round(self, reqs, ahead=None):
        self.offered.append(None if ahead is None else tuple(r.role for r in ahead))
        return await super().round(reqs, ahead)


def test_the_loop_offers_the_next_round_except_where_the_state_is_needed(tmp_path) -> None:
    """SAMPa, 25 updates, 22 batches per epoch, a checkpoint every 10: round r makes update r
    (round 0 is the bootstrap). No round is offered ahead after the bootstrap (the next round's
    workers depend on whether it is applied), before an epoch's end (evaluation), a
    checkpoint, the last update, or while ``hold`` says on-demand work is waiting; every other
    round is, and the trajectory is the one a plain loop takes."""
    cfg = _cfg("sampa", steps=25, checkpoint_every=10)
    ex = _Recording(cfg)
    plan = Plan.of(cfg, PER_EPOCH)
    saved: list[int] = []

    async def checkpoint(state) -> None:
        saved.append(state.step)

    state = asyncio.run(train_loop(_algo(cfg, plan), ex, ex.engines[0].initial_point(), plan,
                                   Recorder("extrapolated"),
                                   Hooks(checkpoint=checkpoint,
                                         hold=lambda: len(ex.offered) == 6)))
    assert state.step == 25 and saved == [10, 20, 25]
    both = ("perturbed", "extrapolated")
    closed = {0, 6, 10, 20, 22, 25}  # bootstrap, held, checkpoints, epoch end, last
    assert ex.offered == [None if r in closed else both for r in range(26)]
    plain = run_local(cfg, tmp_path / "plain")
    assert torch.equal(state.x, torch.load(tmp_path / "plain" / "final.pt",
                                           weights_only=True)["x"])
    assert plain["steps"] == 25
