"""``precision: fp16``: autocast to float16 with a dynamic loss scale (sampa_ray.scaler). The
scale's rule against torch's own arithmetic, the gradient against torch.amp.GradScaler's, the
rounds that overflow skipped (and counted apart from non-finite ones) with the scale halved,
every Ray data path ending bitwise where the local run ends, resuming mid-run, the floor, the
one-line refusals, and the accuracy against fp32."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_final, cli_cmd, cli_env, keep_checkpoints_upto, local_final

import sampa_ray
from sampa_ray.config import make_config
from sampa_ray.engine import GradientEngine
from sampa_ray.errors import UserError
from sampa_ray.events import RoundEvent
from sampa_ray.local import LocalExecutor
from sampa_ray.loop import NonFiniteError, Plan, finite, make_algorithm, train_loop
from sampa_ray.results import Recorder
from sampa_ray.scaler import FLOOR, LossScale
from sampa_ray.telemetry.listener import MetricsListener
from sampa_ray.telemetry.metrics import RoundProbe, RunMetrics

#: the small MLP on digits: its gradient at the start overflows fp16 above a scale of about
#: 2**19-2**20, so a run that starts at 2**26 skips its first rounds until the scale fits
MLP = {"model": "mlp", "batch_size": 64, "threads": 1, "device": "cpu", "eval_every": 100,
       "precision": "fp16", "fp16_init_scale": 2.0 ** 26}


# -- the rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [2.0 ** 16, 1000.0, 2.0 ** 126])
def test_the_scale_follows_torchs_update_rule(init: float) -> None:
    """LossScale on a verdict sequence moves as torch's own update (the op GradScaler.update
    runs: float32 scale, growth tracker, backoff on an infinity, growth after the interval, an
    infinite growth not taken)."""
    rng = random.Random(3)
    ours = LossScale(init, growth_interval=3)
    scale = torch.tensor([init], dtype=torch.float32)
    tracker = torch.zeros(1, dtype=torch.int32)
    for _ in range(300):
        applied = rng.random() < 0.8
        ours.follow(applied)
        found_inf = torch.tensor([0.0 if applied else 1.0])
        torch._amp_update_scale_(scale, tracker, found_inf, 2.0, 0.5, 3)
        assert ours.scale == float(scale) and ours.good == int(tracker)
    assert ours.state_dict() == {"scale": ours.scale, "good": ours.good}
    again = LossScale(init, 3)
    again.load_state_dict(json.loads(json.dumps(ours.state_dict())))
    assert again == ours
    again.load_state_dict(None)
    assert (again.scale, again.good) == (float(torch.tensor(init, dtype=torch.float32)), 0)


def test_the_gradient_is_the_one_gradscaler_unscales() -> None:
    """The engine's fp16 gradient is bit for bit what torch.amp.GradScaler gives: the loss
    scaled under float16 autocast, backward, ``unscale_``; an overflowing scale gives a
    non-finite gradient where GradScaler finds an infinity."""
    cfg = make_config({**MLP, "backend": "local"})
    engine = GradientEngine(cfg)
    x = engine.initial_point() + 0.01
    for scale, overflows in ((2.0 ** 16, False), (2.0 ** 40, True)):
        got = engine.gradient(x, 3, loss_scale=scale).grad.clone()
        model = engine.model
        engine.flat.load_(x)
        engine.flat.zero_grad_()
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with torch.autocast("cpu", dtype=torch.float16):
            out = engine.task.loss(model, engine.task.data.train_batch(3))
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        want = torch.cat([p.grad.flatten() for p in model.parameters()])
        found = sum(float(v) for v in scaler._check_inf_per_device(opt).values())
        assert bool(found) == overflows
        assert not torch.isfinite(got).all() if overflows else torch.equal(got, want)


# -- skipped rounds, locally -------------------------------------------------------------------
class Spy(LocalExecutor):
    """The local executor, noting each round's roles, the scale its requests carry and
    whether its gradients are usable."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.seen: list[tuple[tuple[str, ...], float | None, bool]] = []

    async def round(self, reqs, ahead=None):  # noqa: ANN001, ANN201
        results = await super().round(reqs, ahead)
        self.seen.append((tuple(r.role for r in reqs), reqs[0].loss_scale,
                          all(finite(r) for r in results.values())))
        return results


def _train(cfg: Any, executor: LocalExecutor) -> tuple[Any, Recorder, LossScale]:
    plan = Plan.of(cfg, executor.engines[0].info()["batches_per_epoch"])
    algo = make_algorithm(cfg, plan.total_steps, plan.batches_per_epoch)
    rec, scale = Recorder(algo.stats_role), LossScale.of(cfg)
    assert scale is not None
    state = asyncio.run(train_loop(algo, executor, executor.engines[0].initial_point(), plan,
                                   rec, scale=scale))
    return state, rec, scale


def test_the_rounds_that_overflow_are_skipped_and_the_scale_halves() -> None:
    """SGD from 2**26: the first rounds overflow and are skipped, each halving the scale, until
    it fits at 2**20; one round after the first update overflows there too, and the scale
    settles at 2**19 (growth after 2000). The first rounds skipped are exactly those whose
    gradient at their scale is not finite (x0 stays x0 while they are skipped: the oracle is
    the engine at x0), and no skip counts towards max_nonfinite (1 here)."""
    cfg = make_config({**MLP, "algo": "sgd", "steps": 14, "max_nonfinite": 1})
    spy = Spy(cfg)
    state, rec, scale = _train(cfg, spy)
    assert state.step == 14 and rec.nonfinite_rounds == 0
    assert [i for i, (_, _, ok) in enumerate(spy.seen) if not ok] == [0, 1, 2, 3, 4, 5, 7]
    assert rec.scaler_skips == 7
    assert [s for _, s, _ in spy.seen] == [2.0 ** (26 - i) for i in range(7)] + \
        [2.0 ** 20] + [2.0 ** 19] * 6
    assert scale.scale == rec.loss_scale == 2.0 ** 19 and scale.good == 6
    oracle = GradientEngine(cfg)
    x0 = oracle.initial_point()
    for i in range(7):  # SGD's round i reads batch i
        r = oracle.gradient(x0, i, loss_scale=2.0 ** (26 - i))
        assert finite(r) == (i == 6), i


@pytest.mark.parametrize("algo", ["sam", "sampa"])
def test_sam_and_sampa_skip_overflows_and_regrow(algo: str) -> None:
    """With growth every 3 applied rounds the scale climbs back to where the gradients
    overflow, again and again: every overflowing round is skipped (SAM's next round is an
    ascent), the scale each round carries is the rule's on the verdicts before it, and no
    skip counts as non-finite (max_nonfinite 1)."""
    cfg = make_config({**MLP, "algo": algo, "steps": 16, "max_nonfinite": 1,
                       "fp16_growth_interval": 3})
    spy = Spy(cfg)
    state, rec, scale = _train(cfg, spy)
    skipped = [i for i, (_, _, ok) in enumerate(spy.seen) if not ok]
    assert rec.scaler_skips == len(skipped) and rec.nonfinite_rounds == 0
    assert state.step == 16
    assert len(skipped) >= 8 and any(i > 8 for i in skipped)  # at the start and after regrowth
    follow = LossScale(2.0 ** 26, 3)
    for _, carried, ok in spy.seen:
        assert carried == follow.scale
        follow.follow(ok)
    assert follow == scale and rec.loss_scale == scale.scale
    if algo == "sam":
        assert all(spy.seen[i + 1][0] == ("ascent",) for i in skipped if i + 1 < len(spy.seen))


def test_a_scale_below_the_floor_stops_the_run_with_one_line() -> None:
    """Gradients that are never finite halve the scale round after round: below 2**-24 the run
    stops, with one line (max_nonfinite, 1 here, does not stop it first)."""

    class Broken(LocalExecutor):
        async def round(self, reqs, ahead=None):  # noqa: ANN001, ANN201
            results = await super().round(reqs, ahead)
            for r in results.values():
                r.grad[0] = float("inf")
            return results

    cfg = make_config({**MLP, "algo": "sgd", "steps": 20, "max_nonfinite": 1,
                       "fp16_init_scale": 2.0 ** -20})
    with pytest.raises(NonFiniteError, match=r"^nonfinite: the fp16 loss scale fell below "
                                             r"2\*\*-24 at step 4 \(5 overflowing rounds"):
        _train(cfg, Broken(cfg))
    assert FLOOR == 2.0 ** -24


# -- every Ray data path, resuming ---------------------------------------------------------------
RAY = {**MLP, "algo": "sampa", "steps": 14, "fp16_growth_interval": 3}


PATHS = [("sampa", "points", "grpc"), ("sampa", "replicated", "ray"),
         ("sampa", "collective", "ray"), ("sampa", "free", "ray"), ("sampa", "points", "ray"),
         ("sam", "free", "ray"), ("sgd", "replicated", "ray")]


@pytest.fixture(scope="module")
def runs(ray_local: None, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The local runs of each algorithm (checkpointed every 4 updates), and on one coordinator
    and its workers: every Ray path of PATHS, and SAMPa on the free path resumed from the local
    run's checkpoint after update 8. By name, each run's folder and result."""
    from sampa_ray.ray import run_ray_many

    root = tmp_path_factory.mktemp("fp16")
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for algo in ("sampa", "sam", "sgd"):
        local_final(make_config({**RAY, "algo": algo, "backend": "local",
                                 "checkpoint_every": 4}), root / algo)
        out[algo] = root / algo, json.loads((root / algo / "result.json").read_text())
    keep_checkpoints_upto(root / "sampa", root / "resumed", 8)
    todo = [(make_config({**RAY, "algo": a, "backend": "ray", "data_path": p, "transport": t}),
             root / f"{a}-{p}-{t}") for a, p, t in PATHS]
    todo.append((make_config({**RAY, "backend": "ray", "resume": str(root / "resumed"),
                              "out": str(root / "resumed")}), root / "resumed"))
    for (_, folder), result in zip(todo, run_ray_many(todo), strict=True):
        out[folder.name] = folder, result
    return out


@pytest.mark.parametrize(("algo", "data_path", "transport"), PATHS)
def test_every_data_path_skips_the_same_rounds_bitwise(runs: dict, algo: str, data_path: str,
                                                       transport: str) -> None:
    """fp16 on each Ray path (rounds run ahead, exchanged over gloo, run in chunks by the
    workers, points sent down over Ray or gRPC): every replica follows the scale on the
    verdicts it sees (or each request carries it), so the run skips the rounds the local run
    skips, ends at its scale and bit for bit at its parameters."""
    ref, want = runs[algo]
    folder, got = runs[f"{algo}-{data_path}-{transport}"]
    assert (got["data_path"], got["transport"]) == (data_path, transport)
    skips = want["timings"]["scaler_skips"]
    assert skips >= 7 and want["timings"]["nonfinite_rounds"] == 0
    assert got["timings"]["scaler_skips"] == skips
    assert got["timings"]["nonfinite_rounds"] == 0
    assert got["loss_scale"] == want["loss_scale"]
    assert_same_final(folder, ref, data_path)


def test_resuming_mid_run_continues_the_scale_bitwise(tmp_path: Path, runs: dict) -> None:
    """The checkpoint after update 8 holds the scale as it stood (not the initial one); a run
    resumed from it (locally, and on the free path, whose replicas are seeded with it) ends
    bit for bit where the uninterrupted run ends, with the same scale and skips."""
    from sampa_ray.local import run_local

    ref, want = runs["sampa"]
    keep_checkpoints_upto(ref, tmp_path, 8)
    meta = json.loads((tmp_path / "checkpoints" / "ckpt-00000008.json").read_text())
    assert meta["loss_scale"]["scale"] != 2.0 ** 26
    local = run_local(make_config({**RAY, "backend": "local", "resume": str(tmp_path),
                                   "out": str(tmp_path)}), tmp_path)
    for folder, got in ((tmp_path, local), runs["resumed"]):
        assert got["loss_scale"] == want["loss_scale"]
        assert got["timings"]["scaler_skips"] == want["timings"]["scaler_skips"]
        assert_same_final(folder, ref, folder.name)


# -- the metrics, the refusals, the outcome ------------------------------------------------------
def test_the_metrics_show_the_scale() -> None:
    metrics = RunMetrics()
    listener = MetricsListener(RoundProbe(metrics, "ray"), metrics)
    listener(RoundEvent(step=3, total=10, loss_scale=2.0 ** 15))
    assert metrics.loss_scale._value.get() == 2.0 ** 15
    listener(RoundEvent(step=4, total=10))  # a run without a scale leaves it alone
    assert metrics.loss_scale._value.get() == 2.0 ** 15
    MetricsListener(RoundProbe(metrics, "ray"), metrics)  # the next run's
    assert metrics.loss_scale._value.get() == 0
    assert "sampa_scaler_skips_total" in metrics.text()


@pytest.mark.parametrize(("given", "line"), [
    ({"fp16_init_scale": 0.0}, "fp16_init_scale: Input should be greater than 0"),
    ({"fp16_init_scale": float("inf")}, "fp16_init_scale: Input should be a finite number"),
    ({"fp16_init_scale": 1e39}, "fp16_init_scale: 1e+39 is outside [2**-24, 3.4e38]"),
    ({"fp16_init_scale": 2.0 ** -30}, "fp16_init_scale: 9.313225746154785e-10 is outside "
                                      "[2**-24, 3.4e38] (the scale where an fp16 run stops"),
    ({"fp16_growth_interval": 0}, "fp16_growth_interval: Input should be greater than or "
                                  "equal to 1"),
    ({"precision": "fp8"}, "precision: Input should be 'fp32', 'bf16' or 'fp16'"),
])
def test_bad_scaler_fields_are_one_line(given: dict, line: str) -> None:
    with pytest.raises(UserError) as err:
        make_config({"precision": "fp16", **given})
    assert str(err.value).startswith(f"config: {line}"), str(err.value)
    assert "\n" not in str(err.value)


def float64_mlp(num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, num_classes)).double()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_float64_model_under_autocast_is_one_line_before_the_start(precision: str) -> None:
    """Autocast lowers float32 operations only: a plug-in model of float64 parameters would
    run its passes as they are. The check before the start says so."""
    from sampa_ray.api import config_of
    from sampa_ray.preflight import check_before_start

    cfg = config_of({"precision": precision, "backend": "local"}, model=float64_mlp)
    with pytest.raises(UserError, match=rf"^precision: {precision} autocast needs float32 "
                                        r"parameters; the model .*float64_mlp has torch.float64"):
        check_before_start(cfg)


def test_a_bad_scale_on_the_command_line_exits_2_before_the_start(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = subprocess.run(cli_cmd("train", "--precision", "fp16", "--fp16-init-scale", "-1",
                               "--out", str(out)), capture_output=True, text=True,
                       env=cli_env(), timeout=120)
    assert p.returncode == 2, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("sampa-ray: config: fp16_init_scale: Input should be greater than 0")
    assert not out.exists()


@pytest.mark.outcome
def test_fp16_trains_the_default_job_close_to_fp32(tmp_path: Path,
                                                   outcome: Callable) -> None:
    """The default job (SAMPa, the digits CNN), short: fp16 with its loss scale lands within
    5% of fp32's test accuracy."""
    base = {"steps": 40, "batch_size": 32, "threads": 1, "backend": "local"}
    fp32 = sampa_ray.fit(base, out=tmp_path / "fp32")
    fp16 = sampa_ray.fit({**base, "precision": "fp16"}, out=tmp_path / "fp16")
    a = torch.load(tmp_path / "fp32" / "final.pt", weights_only=True)["x"]
    b = torch.load(tmp_path / "fp16" / "final.pt", weights_only=True)["x"]
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
    assert fp16.metrics["loss_scale"] == 2.0 ** 16  # no overflow at the default scale
    outcome("fp16 test accuracy", fp16.test_accuracy, ">", 0.8)
    outcome("|fp16 - fp32| test accuracy", abs(fp16.test_accuracy - fp32.test_accuracy), "<",
            0.05)
