"""Adding to the system touches one place: an algorithm defined and registered here runs on the
local backend and on every Ray data path; a data path's worker half runs in-process, without
Ray."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch
from conftest import assert_same_final

from sampa_ray import algorithms, datapaths
from sampa_ray.algorithms import Algorithm, AlgoState, GradRequest
from sampa_ray.config import make_config
from sampa_ray.engine import GradientEngine
from sampa_ray.local import run_local
from sampa_ray.loop import make_algorithm
from sampa_ray.transport.link import Link


class TwoBatchGD(Algorithm):
    """Plain gradient descent (no momentum, no weight decay) on the mean gradient of two batches
    per update, 2t and 2t+1, computed by the two workers at once."""

    name = "twobatch"
    stats_role = "even"
    slots = {"even": 0, "odd": 1}

    def __init__(self, lr, momentum: float = 0.0) -> None:  # noqa: ANN001 - a schedule
        super().__init__(lr)  # the config's momentum is offered by name and ignored

    def roles(self, state: AlgoState) -> tuple[str, ...]:
        return ("even", "odd")

    def requests(self, state: AlgoState) -> list[GradRequest]:
        return [GradRequest("even", state.x, 2 * state.step, track_stats=True),
                GradRequest("odd", state.x, 2 * state.step + 1)]

    def update(self, state: AlgoState, grads: Mapping[str, torch.Tensor]) -> AlgoState:
        self.check_grads(state, grads)
        g = self.workspace(state, "mean").copy_(grads["even"]).add_(grads["odd"]).mul_(0.5)
        state.x.add_(g, alpha=-self.lr_at(state.step))
        state.step += 1
        return state


STEPS = 6
BASE = {"algo": "twobatch", "model": "cnn", "steps": STEPS, "batch_size": 32, "threads": 1,
        "lr": 0.1}


@pytest.fixture
def registered() -> Iterator[None]:
    algorithms.register("twobatch", TwoBatchGD)
    yield
    algorithms.unregister("twobatch")


def _hand(cfg) -> torch.Tensor:  # noqa: ANN001
    """The update written out: x -= lr_t * (g(x; B_2t) + g(x; B_2t+1)) / 2."""
    engine = GradientEngine(cfg)
    x = engine.initial_point()
    for t in range(STEPS):
        g0 = engine.gradient(x, 2 * t, True).grad.clone()
        g1 = engine.gradient(x, 2 * t + 1, False).grad.clone()
        x.add_(g0.add_(g1).mul_(0.5), alpha=-cfg.lr_at(t, STEPS))
    return x


def test_an_unknown_algorithm_is_a_one_line_config_error() -> None:
    from sampa_ray.errors import UserError

    with pytest.raises(UserError, match="unknown algorithm 'twobatch'"):
        make_config({**BASE, "backend": "local"})


def test_a_registered_algorithm_runs_locally(registered, tmp_path) -> None:
    cfg = make_config({**BASE, "backend": "local"})
    result = run_local(cfg, tmp_path)
    x = torch.load(tmp_path / "final.pt", weights_only=True)["x"]
    assert torch.allclose(x, _hand(cfg), rtol=0, atol=1e-6)
    assert result["steps"] == STEPS and result["gradient_rounds"] == STEPS
    assert result["algorithm"]["algo"] == "twobatch"


@pytest.fixture
def echo_path() -> Iterator[None]:
    """A data path defined here: its coordinator half is this file's class, its worker half
    the replicated path's; one registration line makes it ``--data-path echo``."""
    from sampa_ray.ray.paths.replicated import ReplicatedPath

    class EchoPath(ReplicatedPath):
        name = "echo"

    datapaths.register_path("echo", "ray", EchoPath)
    yield
    datapaths.unregister_path("echo", "ray")


@pytest.mark.usefixtures("ray_local")
def test_a_registered_algorithm_runs_on_every_ray_data_path(registered, echo_path,
                                                            tmp_path) -> None:
    """Defined in this file, shipped to the coordinator and the workers by value: each data
    path, the one registered here too, ends on the local run's parameters bit for bit."""
    from sampa_ray.ray import run_ray_many

    local = make_config({**BASE, "backend": "local"})
    run_local(local, tmp_path / "local")
    ref = torch.load(tmp_path / "local" / "final.pt", weights_only=True)
    assert "echo" in datapaths.names("ray") and "echo" not in datapaths.names("grpc")
    combos = [("points", "ray"), ("replicated", "ray"), ("collective", "ray"), ("points", "grpc"),
              ("echo", "ray")]
    cfgs = [make_config({**BASE, "backend": "ray", "data_path": p, "transport": t})
            for p, t in combos]
    results = run_ray_many([(c, tmp_path / f"ray{i}") for i, c in enumerate(cfgs)])
    for i, ((p, t), r) in enumerate(zip(combos, results, strict=True)):
        assert_same_final(tmp_path / f"ray{i}", ref, p, t)
        assert r["steps"] == STEPS and r["data_path"] == p
    assert results[2]["collective"]["backend"] == "gloo"  # both workers in use: a group


# -- worker halves, in this process -----------------------------------------------------------
def _hosts(cfg):  # noqa: ANN001, ANN202
    from sampa_ray.ray.worker import WorkerHost

    return [WorkerHost(GradientEngine(cfg), slot, Link(0.0, None)) for slot in (0, 1)]


@pytest.mark.parametrize("half", ["replicated", "collective"])
def test_replica_worker_halves_follow_the_local_run(tmp_path, half: str) -> None:
    """Two replica worker halves driven by hand the way the coordinator half drives them
    (peer gradients handed over as arrays, every round's verdict committed) reach the local
    run's parameters and statistics bit for bit."""
    from sampa_ray.ray.paths.collective import CollectiveWorker
    from sampa_ray.ray.paths.replicated import ReplicaWorker

    cfg = make_config({"algo": "sampa", "lam": 0.2, "steps": STEPS, "batch_size": 32,
                       "threads": 1, "backend": "local"})
    run_local(cfg, tmp_path)
    ref = torch.load(tmp_path / "final.pt", weights_only=True)
    cls = ReplicaWorker if half == "replicated" else CollectiveWorker
    halves = [cls(h) for h in _hosts(cfg)]
    algo = make_algorithm(cfg, STEPS)
    state = algo.init(halves[0].engine.initial_point())
    tensors = {k: v.numpy() for k, v in state.tensors().items()}
    for h in halves:
        h.init(cfg.model_dump(), STEPS, tensors, 0, 0)
    shadow = state.shadow()
    specs: dict[int, list] = {0: [], 1: []}
    peer: dict[int, list] = {0: [], 1: []}
    while shadow.step < STEPS:
        reqs = algo.requests(shadow)
        out = {}
        for slot in sorted({algo.slot_of(r.role) for r in reqs}):
            grads, facts = halves[slot].round(specs[slot], *peer[slot])
            # what the object store does when the call returns: a copy of the engine's buffer
            out[slot] = {role: (g.copy(), ok) for role, (g, ok) in grads.items()}
            specs[slot], peer[slot] = [], []  # applied by that call
            assert set(facts) == {r.role for r in reqs if algo.slot_of(r.role) == slot}
            assert all(f["finite"] and f["nbytes"] > 0 for f in facts.values())
        for slot in (0, 1):
            others = [r.role for r in reqs if algo.slot_of(r.role) != slot]
            specs[slot].append(others)  # applied by the rule on its next call
            peer[slot].extend(out[algo.slot_of(role)] for role in others)
        algo.update(shadow, {r.role: shadow.x for r in reqs})
    final = halves[1].state_tensors(specs[1], *peer[1])
    assert torch.equal(torch.from_numpy(final["x"]), ref["x"])
    assert all(torch.equal(halves[1].engine.buffers()[k], v) for k, v in ref["buffers"].items())
    assert np.array_equal(halves[0].state_tensors(specs[0], *peer[0])["x"], final["x"])


def test_a_skipped_round_by_the_rule_leaves_the_replica_unchanged() -> None:
    """Every round is decided on the worker by the loop's rule: a peer's unusable gradient
    skips it (x unchanged, the step moves on)."""
    from sampa_ray.ray.paths.replicated import ReplicaWorker

    cfg = make_config({"algo": "sampa", "steps": STEPS, "batch_size": 32, "threads": 1,
                       "backend": "local", "momentum": 0.0})
    half = ReplicaWorker(_hosts(cfg)[0])
    algo = make_algorithm(cfg, STEPS)
    state = algo.init(half.engine.initial_point())
    state.g_y, state.phase = torch.ones_like(state.x), 1
    half.init(cfg.model_dump(), STEPS, {k: v.numpy() for k, v in state.tensors().items()}, 0, 1)
    grads, facts = half.round([])  # its perturbed gradient of step 0
    assert set(facts) == {"perturbed"} and facts["perturbed"]["finite"]
    x0 = half.tensors()["x"].copy()
    bad = {"extrapolated": (np.full_like(x0, np.nan), False)}
    half.round([["extrapolated"]], bad)
    assert half.state is not None and half.state.step == 1
    assert np.array_equal(half.tensors()["x"], x0)


def test_points_worker_half_returns_the_engine_gradient() -> None:
    from sampa_ray.ray.paths.points import PointsWorker

    cfg = make_config({"steps": STEPS, "batch_size": 32, "threads": 1, "backend": "local"})
    host = _hosts(cfg)[0]
    x = host.engine.initial_point()
    grad, meta = PointsWorker(host).gradient(x.numpy(), 3, True)
    ref = GradientEngine(cfg).gradient(x, 3, True)
    assert torch.equal(torch.from_numpy(grad), ref.grad)
    assert meta["loss"] == ref.loss and meta["buffers"] is not None

