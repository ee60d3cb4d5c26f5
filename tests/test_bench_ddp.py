"""``benchmarks/ddp.py`` (SAMPa or data-parallel SAM?) as users run it: a subprocess on a tiny
setting passes its own correctness check, prints its tables and writes a CSV whose times are
positive and whose ratios are the ratios of its times; it never imports Ray; a global batch the
workers cannot split into equal shards, or an odd worker count, is one line and exit code 2."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "ddp.py"
TIMES = ("sgd1_ms", "sgd_ddp_ms", "sam1_ms", "sam_ddp_ms", "sampa_ms")
RATIOS = {"sam_ddp_over_sampa": ("sam_ddp_ms", "sampa_ms"),
          "sam1_over_sampa": ("sam1_ms", "sampa_ms")}


def run_ddp(tmp_path: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
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


def test_tiny_run_checks_itself_and_writes_consistent_csv(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    out = tmp_path / "ddp.csv"
    res = run_ddp(tmp_path, "--models", "mlp", "--batch-sizes", "8", "16", "--workers", "2",
                  "--steps", "3", "--repeats", "1", "--warmup", "1", "--csv", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "check: ok" in res.stdout
    for text in ("SGD-DDP-2", "SAM-DDP-2", "SAMPa-2", "SAM-DDP-2/SAMPa-2 =", "reading: "):
        assert text in res.stdout
    assert res.stdout.count("reading: ") == 2  # one per model/batch/N

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], int(r["global_batch"]), int(r["workers"]), int(r["sampa_k"]))
            for r in rows] == [("mlp", 8, 2, 1), ("mlp", 16, 2, 1)]
    for r in rows:
        assert int(r["params"]) > 0
        assert (r["device"], r["backend"]) == ("cpu", "gloo")
        times = {c: float(r[c]) for c in TIMES}
        assert all(t > 0 and math.isfinite(t) for t in times.values()), times
        for ratio, (a, b) in RATIOS.items():
            assert math.isclose(float(r[ratio]), times[a] / times[b], rel_tol=1e-3), (ratio, r)
        # one repeat: its per-repeat ratio is the ratio of the medians
        for edge in ("sam_ddp_over_sampa_min", "sam_ddp_over_sampa_max"):
            assert math.isclose(float(r[edge]), float(r["sam_ddp_over_sampa"]), rel_tol=1e-3)


@pytest.mark.parametrize(("argv", "says"), [
    (["--batch-sizes", "30", "--workers", "4"], "global batch 30 is not divisible by N=4"),
    (["--batch-sizes", "32", "--workers", "3"], "N=3 must be even"),
])
def test_unequal_shards_or_odd_workers_are_one_line_exit_2(tmp_path: Path, argv: list[str],
                                                           says: str) -> None:
    res = run_ddp(tmp_path, "--models", "mlp", *argv, timeout=30)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], res.stderr
