"""``benchmarks/ddp.py`` (a user's own data-parallel SAM, plain torch.distributed) as users run
it: a subprocess on a tiny setting, over two ranks with unequal shards, prints its line and a CSV
row whose times are positive, and its SGD-DDP and SAM-DDP updates are the product's SGD and SAM
(``sampa_ray.algorithms``) on the whole batch in one process; it never imports Ray; a global
batch smaller than the worker count, or a single worker, is one line and exit code 2."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sampa_ray.algorithms import SAM, SGD
from sampa_ray.flat import FlatParams

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "ddp.py"


def run_ddp(tmp_path: Path, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The script in a fresh interpreter whose ``import ray`` fails (as on a GPU machine without
    Ray): the spawned ranks inherit the environment, so an import of Ray anywhere fails the run."""
    guard = tmp_path / "no_ray" / "ray"
    guard.mkdir(parents=True, exist_ok=True)
    (guard / "__init__.py").write_text("raise ImportError('ddp.py must not import ray')\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(guard.parent),
                                                        os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def the_script():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("bench_ddp", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def products_run(algo, model: str, batch: int, updates: int  # noqa: ANN001
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``updates`` updates of the product's ``algo`` from the script's start on the script's
    batches (update t on batch t % 2), every gradient on the whole batch in this process: the
    start and where it ends."""
    ddp = the_script()
    net = ddp.build(model, "cpu", torch.float64)
    flat = FlatParams(net)
    data = ddp.batches(model, batch, "cpu", torch.float64)

    def grad(point: torch.Tensor, t: int) -> torch.Tensor:
        flat.load_(point)
        flat.zero_grad_()
        X, Y = data[t % 2]
        F.cross_entropy(net(X), Y).backward()
        return flat.grad.clone()

    x0 = flat.data.clone()
    state = algo.init(x0)
    while state.step < updates:
        reqs = algo.requests(state)
        algo.update(state, {r.role: grad(r.point, r.batch) for r in reqs})
    return x0, state.x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_tiny_run_is_the_products_sgd_and_sam_and_writes_its_csv(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    out, saved = tmp_path / "ddp.csv", tmp_path / "x.pt"
    res = run_ddp(tmp_path, "--models", "mlp", "--batch-sizes", "9", "--workers", "2",
                  "--steps", "2", "--repeats", "2", "--warmup", "1", "--dtype", "float64",
                  "--lr", "0.1", "--rho", "0.2", "--csv", str(out), "--save", str(saved))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("mlp ")]
    assert len(lines) == 1, res.stdout  # one per model/batch/N
    for text in ("global batch 9 over N=2", "SGD-DDP-2 ", "SAM-DDP-2 ", "SAM-DDP/SGD-DDP "):
        assert text in lines[0], lines[0]

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], int(r["global_batch"]), int(r["workers"])) for r in rows] == \
        [("mlp", 9, 2)]
    r = rows[0]
    assert int(r["params"]) > 0 and (r["device"], r["backend"]) == ("cpu", "gloo")
    times = [float(r["sgd_ddp_ms"]), float(r["sam_ddp_ms"])]
    assert all(t > 0 and math.isfinite(t) for t in times), times

    # shards of 5 and 4 samples, summed by one all-reduce: the whole batch's update
    got = torch.load(saved, weights_only=True)["mlp/9/2"]
    assert got["updates"] == {"sgd_ddp": 5, "sam_ddp": 5}  # 1 warm-up + 2 repeats x 2
    x0, sgd = products_run(SGD(lr=0.1), "mlp", 9, 5)
    _, sam = products_run(SAM(lr=0.1, rho=0.2), "mlp", 9, 5)
    assert torch.equal(got["x0"], x0)
    assert rel(got["sgd_ddp"], sgd) <= 1e-10 and rel(got["sam_ddp"], sam) <= 1e-10
    # not vacuous: both moved, and SAM's perturbation changed its update
    assert rel(sam, sgd) > 1e-6 and rel(sgd, got["x0"]) > 1e-6


@pytest.mark.parametrize(("argv", "says"), [
    (["--batch-sizes", "3", "--workers", "4"], "global batch 3 is smaller than N=4"),
    (["--batch-sizes", "32", "--workers", "1"], "N=1; data-parallel needs 2 or more workers"),
])
def test_a_worker_without_a_sample_or_a_single_worker_is_one_line_exit_2(
        tmp_path: Path, argv: list[str], says: str) -> None:
    res = run_ddp(tmp_path, "--models", "mlp", *argv, timeout=60)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], res.stderr
