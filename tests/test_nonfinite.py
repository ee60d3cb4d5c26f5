"""Policy for non-finite losses or gradients: skip the update and count it; abort after
max_nonfinite rounds in a row with one line and exit code 2."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import local_final
from torch.utils.data import TensorDataset

from sampa_ray.algorithms import SAM, SGD, SAMPa
from sampa_ray.api import config_of
from sampa_ray.config import make_config
from sampa_ray.data.batches import BatchSchedule
from sampa_ray.local import LocalExecutor
from sampa_ray.loop import NonFiniteError, Plan, make_algorithm, train_loop
from sampa_ray.results import Recorder


class Poisoned(LocalExecutor):
    """The real local executor, with NaN written into chosen rounds' gradients."""

    def __init__(self, cfg, bad_rounds):
        super().__init__(cfg)
        self.bad_rounds, self.n = set(bad_rounds), 0

    async def round(self, reqs, ahead=None):
        results = await super().round(reqs, ahead)
        if self.n in self.bad_rounds:
            next(iter(results.values())).grad[3] = float("nan")
        self.n += 1
        return results


def run(cfg, executor):
    plan = Plan.of(cfg, executor.engines[0].info()["batches_per_epoch"])
    rec = Recorder(make_algorithm(cfg, 1).stats_role)
    x0 = executor.engines[0].initial_point()
    algo = make_algorithm(cfg, plan.total_steps, plan.batches_per_epoch)
    return asyncio.run(train_loop(algo, executor, x0, plan, rec)), rec


@pytest.mark.parametrize("algo", ["sgd", "sam", "sampa"])
def test_one_bad_round_is_skipped_and_counted(algo):
    cfg = make_config({"algo": algo, "steps": 8, "batch_size": 32, "threads": 1})
    state, rec = run(cfg, Poisoned(cfg, bad_rounds=[4]))
    assert state.step == 8 and rec.nonfinite_rounds == 1
    assert torch.isfinite(state.x).all()
    clean, _ = run(cfg, LocalExecutor(cfg))
    assert not torch.equal(clean.x, state.x)  # the skipped update really was skipped


def test_abort_after_k_in_a_row():
    cfg = make_config({"algo": "sampa", "steps": 20, "batch_size": 32, "threads": 1,
                       "max_nonfinite": 3})
    with pytest.raises(NonFiniteError, match=r"^nonfinite: 3 rounds in a row"):
        run(cfg, Poisoned(cfg, bad_rounds=[5, 6, 7]))
    # two in a row with max 3 survives, and the streak resets after a good round
    state, rec = run(cfg, Poisoned(cfg, bad_rounds=[5, 6, 8, 9]))
    assert rec.nonfinite_rounds == 4 and state.step == 20


def test_skip_semantics_on_the_algorithms():
    x0 = torch.ones(3, dtype=torch.float64)
    for algo in (SGD(lr=0.1, momentum=0.9), SAM(lr=0.1, rho=0.1), SAMPa(lr=0.1, rho=0.1)):
        s = algo.init(x0)
        reqs = algo.requests(s)
        s = algo.update(s, {r.role: torch.ones(3, dtype=torch.float64) for r in reqs})
        snap = {k: v.clone() for k, v in s.tensors().items()}
        step = s.step
        algo.skip(s)
        assert s.step == step + 1 and s.phase in (0, 1)
        assert all(torch.equal(v, snap[k]) for k, v in s.tensors().items())
    sam = SAM(lr=0.1, rho=0.1)
    s = sam.init(x0)
    s = sam.update(s, {"ascent": torch.ones(3, dtype=torch.float64)})
    assert s.phase == 1
    sam.skip(s)
    assert s.phase == 0 and s.step == 1
    assert [r.batch for r in sam.requests(s)] == [1]


def test_diverging_run_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "sampa_ray.cli", "train", "--backend", "local",
                        "--threads", "1", "--algo", "sgd", "--model", "mlp", "--lr", "1e12",
                        "--momentum", "0", "--steps", "40", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("sampa-ray: nonfinite: 3 rounds in a row")
    assert "Traceback" not in p.stderr
    assert not (out / "result.json").exists()


# -- the replicas decide by the same rule -------------------------------------------------------
N, TRAIN, BATCH = 256, 192, 32


def mlp(num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, num_classes))


def nan_sample() -> tuple[TensorDataset, TensorDataset]:
    """Blobs with one training sample of NaN features, first read by batch 3 (batch 0, which
    is checked before the start, is clean): every round whose batch holds it gives a
    non-finite gradient, one role at a time."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(N) % 3
    x = torch.randn(N, 4, generator=g) + y[:, None].float()
    s = BatchSchedule(TRAIN, BATCH, 0)
    seen = {int(i) for k in range(3) for i in s.indices(k)}
    x[next(int(i) for i in s.indices(3) if int(i) not in seen)] = float("nan")
    return TensorDataset(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:])


@pytest.fixture(scope="module")
def ray_up(ray_local: None) -> None:
    return None


@pytest.mark.parametrize("data_path", ["replicated", "collective", "free"])
def test_the_replicas_skip_the_rounds_the_loop_skips(ray_up: None, tmp_path: Path,
                                                     data_path: str) -> None:
    """SAMPa on the replicas, with a NaN sample met in both roles' gradients (the
    extrapolated one a round before the perturbed one), in rounds run ahead and in rounds
    that are not: every replica applies or skips each round by the loop's rule on the
    gradients' usable flags, so the run ends bitwise where the local run ends, with the same
    rounds counted as skipped."""
    from sampa_ray.ray import run_ray

    cfg = config_of({"algo": "sampa", "batch_size": BATCH, "threads": 1, "steps": 14,
                     "lr": 0.05, "backend": "ray", "data_path": data_path,
                     "max_nonfinite": 3}, model=mlp, data=nan_sample)
    ray_result = run_ray(cfg, tmp_path / "ray")
    local = cfg.model_copy(update={"backend": "local"})
    want = local_final(local, tmp_path / "local")
    local_result = json.loads((tmp_path / "local" / "result.json").read_text())
    skipped = local_result["timings"]["nonfinite_rounds"]
    assert skipped >= 2
    assert ray_result["timings"]["nonfinite_rounds"] == skipped
    assert torch.equal(torch.load(tmp_path / "ray" / "final.pt", weights_only=True)["x"],
                       want["x"])
