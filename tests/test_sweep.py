"""``sampa-ray sweep``: algorithms x a grid of config fields x seeds as Ray Tune trials, every
trial validated before Ray starts (one line, exit 2), and the study's statistics (mean, sd,
95% t-intervals, paired differences, collapsed runs flagged) checked against values computed by
hand; one real sweep of two one-CPU trials that run at the same time."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from sampa_ray.cli import main
from sampa_ray.config import TrainConfig, make_config
from sampa_ray.errors import UserError
from sampa_ray.sweep import parse_grid, plan
from sampa_ray.sweep.stats import Run, collapsed, paired, rows_of, summarize, t95, write_study


def test_the_grid_and_seeds_expand_to_every_trial() -> None:
    assert parse_grid(["rho=0.02,0.05,0.1", "lam=0,0.2"]) == {"rho": [0.02, 0.05, 0.1],
                                                              "lam": [0.0, 0.2]}
    assert parse_grid(["lr_schedule=constant,cosine", "num_classes=none,10"]) == {
        "lr_schedule": ["constant", "cosine"], "num_classes": [None, 10]}
    trials = plan({"epochs": 2}, ["rho=0.02,0.05,0.1", "lam=0,0.2"], seeds=3,
                  algos=("sam", "sampa"))
    assert len(trials) == 2 * 3 * 2 * 3
    assert trials[0].name == "sam-rho=0.02-lam=0.0-s0"
    assert trials[-1].name == "sampa-rho=0.1-lam=0.2-s2"
    assert len({t.name for t in trials}) == len(trials)
    assert [t.name for t in trials[:3]] == ["sam-rho=0.02-lam=0.0-s0", "sampa-rho=0.02-lam=0.0-s0",
                                            "sam-rho=0.02-lam=0.0-s1"]  # seeds interleaved
    last = trials[-1].config
    assert (last["algo"], last["rho"], last["lam"], last["seed"], last["epochs"]) == \
        ("sampa", 0.1, 0.2, 2, 2)
    assert (last["backend"], last["threads"]) == ("local", 1)  # one process, one CPU each
    assert trials[-1].setting_text == "rho=0.1 lam=0.2"
    # a mapping from Python is the same grid
    same = plan(TrainConfig(epochs=2), {"rho": [0.02, 0.05, 0.1], "lam": [0, 0.2]}, 3,
                ("sam", "sampa"))
    assert [t.name for t in same] == [t.name for t in trials]
    assert [t.name for t in plan({}, None, 2, ("sgd", "sam"))] == ["sgd-s0", "sam-s0", "sgd-s1",
                                                                   "sam-s1"]


@pytest.mark.parametrize("argv, says", [
    (["--grid", "warmup=1,2"], "grid: warmup is not a config field"),
    (["--grid", "rho="], "grid: rho has no values"),
    (["--grid", "lam=0.2,2"], "grid: sgd lam=2.0: lam: Input should be less than or equal to 1"),
    (["--grid", "rho=big"], "grid: rho=big: not a number"),
    (["--grid", "seed=1,2"], "grid: seed is set by --seeds"),
    (["--grid", "rho=0.1,0.1"], "grid: rho names a value twice"),
    (["--seeds", "0"], "seeds: 0; a sweep needs at least one seed"),
    (["--algos", "sgd", "nope"], "algos: nope: algo: unknown algorithm 'nope'"),
    (["--label-noise", "1.5"], "label_noise"),
])
def test_bad_input_is_one_line_and_exit_2_before_ray_starts(argv, says, capsys,  # noqa: ANN001
                                                            tmp_path) -> None:  # noqa: ANN001
    import ray

    before = ray.is_initialized()
    code = main(["sweep", "--steps", "5", "--out", str(tmp_path / "s"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("sampa-ray: ") and says in lines[0], lines
    assert ray.is_initialized() == before and not (tmp_path / "s").exists()


def test_mean_sd_and_interval_are_the_hand_computed_ones() -> None:
    s = summarize([0.90, 0.92, 0.94])
    assert (s.n, s.mean) == (3, pytest.approx(0.92))
    assert s.sd == pytest.approx(0.02)
    assert s.half == pytest.approx(4.303 * 0.02 / math.sqrt(3))  # 0.049687
    assert (s.lo, s.hi) == (pytest.approx(0.870313, abs=1e-6), pytest.approx(0.969687, abs=1e-6))
    assert (t95(1), t95(4), t95(30)) == (12.706, 2.776, 2.042)
    assert t95(60) == pytest.approx(2.000, abs=0.003)
    one = summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.sd) and math.isnan(one.half)
    # paired: only the seeds both have; differences 0.02, 0.04, 0.00
    d = paired({0: 0.92, 1: 0.95, 2: 0.90, 3: 0.5}, {0: 0.90, 1: 0.91, 2: 0.90})
    assert d.n == 3 and d.mean == pytest.approx(0.02) and d.sd == pytest.approx(0.02)
    assert d.lo == pytest.approx(0.02 - 4.303 * 0.02 / math.sqrt(3))


def _result(acc: float | None, k: int = 10, wall: float = 10.0, seq: float = 1.0) -> dict:
    return {"final_test_accuracy": acc, "num_classes": k, "wall_time_s": wall,
            "sequential_gradients_per_update": seq}


def test_collapsed_runs_are_flagged_not_averaged(tmp_path: Path) -> None:
    assert collapsed(Run("sgd", "", 0, _result(0.15))) == "at chance (0.150)"  # 1/10 + 0.05
    assert collapsed(Run("sgd", "", 0, _result(0.151))) is None
    assert collapsed(Run("sgd", "", 0, _result(0.55, k=2))) == "at chance (0.550)"
    assert collapsed(Run("sgd", "", 0, None, "nonfinite: 3 rounds")).startswith("no result")
    runs = [Run("sgd", "", 0, _result(0.80, wall=10)), Run("sgd", "", 1, _result(0.84, wall=12)),
            Run("sgd", "", 2, _result(0.82, wall=11)),
            Run("sam", "", 0, _result(0.85, wall=20, seq=2)),
            Run("sam", "", 1, _result(0.11, wall=20, seq=2)),  # collapsed
            Run("sam", "", 2, _result(0.86, wall=22, seq=2)),
            Run("sampa", "", 0, _result(0.86, seq=1.001)),
            Run("sampa", "", 1, None, "nonfinite: 3 rounds in a row"),
            Run("sampa", "", 2, _result(0.88, seq=1.003))]
    rows = {r.algo: r for r in rows_of(runs)}
    sam = rows["sam"]
    assert sam.acc.n == 2 and sam.acc.mean == pytest.approx(0.855)  # 0.11 not averaged in
    assert set(sam.collapsed) == {1}
    assert sam.vs_sgd.n == 2 and sam.vs_sgd.mean == pytest.approx((0.05 + 0.04) / 2)
    assert rows["sgd"].vs_sam.mean == pytest.approx(-0.045)
    assert rows["sampa"].vs_sam.n == 2  # seeds 0 and 2: the ones both finished
    assert rows["sampa"].vs_sam.mean == pytest.approx((0.01 + 0.02) / 2)
    assert rows["sampa"].sequential == pytest.approx(1.002)
    assert rows["sgd"].wall.mean == pytest.approx(11.0) and rows["sgd"].wall.sd == 1.0
    assert rows["sam"].vs_sam is None
    text = write_study(tmp_path, runs)
    line = next(ln for ln in text.splitlines() if ln.startswith("| sam |"))
    assert "**1 of 3, not averaged** (seed 1: at chance (0.110))" in line
    assert "85.50 ± 0.71" in line
    assert "seed 1: no result: nonfinite" in text
    with (tmp_path / "accuracy.csv").open() as f:
        table = {r["algo"]: r for r in csv.DictReader(f)}
    assert table["sgd"]["acc_mean"] == "0.82" and table["sgd"]["acc_sd"] == "0.02"
    assert float(table["sgd"]["acc_ci_hi"]) == pytest.approx(0.82 + 4.303 * 0.02 / math.sqrt(3),
                                                             abs=1e-6)
    assert table["sam"]["collapsed"] == "1" and table["sam"]["good_runs"] == "2"
    assert (tmp_path / "figure.png").stat().st_size > 10_000


def test_a_real_sweep_runs_its_trials_at_once_on_tune(tmp_path: Path) -> None:
    import ray

    from sampa_ray.data.noise import draw_flips
    from sampa_ray.sweep import sweep

    before = ray.is_initialized()  # else the sweep starts an instance of 4 CPUs, then ends it
    cfg = make_config({"steps": 20, "threads": 1, "label_noise": 0.2, "eval_every": 1})
    rows = sweep(cfg, tmp_path, algos=("sgd", "sampa"), seeds=1, cpus=4, say=lambda _: None)
    assert ray.is_initialized() == before
    assert [r["name"] for r in rows] == ["sgd-s0", "sampa-s0"]
    assert all("error" not in r for r in rows), rows
    a, b = rows
    assert max(a["started_at"], b["started_at"]) < min(a["finished_at"], b["finished_at"]), rows
    flips = draw_flips(0, 1437, 0.2, 10)[0].tolist()
    for r in rows:
        result = json.loads((tmp_path / r["name"] / "result.json").read_text())
        assert result["steps"] == 20 and result["config"]["backend"] == "local"
        assert result["final_test_accuracy"] == r["final_test_accuracy"] > 0.15
        assert result["label_noise"]["flipped"] == flips  # the trial's process drew the same
    assert rows[1]["sequential_gradients_per_update"] == pytest.approx(21 / 20)
    stored = json.loads((tmp_path / "sweep.json").read_text())["trials"]
    assert [s["name"] for s in stored] == ["sgd-s0", "sampa-s0"]
    text = (tmp_path / "accuracy.md").read_text()
    assert "| sampa | 1 |" in text and (tmp_path / "figure.png").is_file()
    assert (tmp_path / "tune" / "trials").is_dir()  # Tune's own records
    with pytest.raises(UserError, match=r"sgd-s0 already holds a finished run; pass "
                                        r"--overwrite"):  # before Ray starts again
        sweep(cfg, tmp_path, algos=("sgd", "sampa"), seeds=1, cpus=4, say=lambda _: None)


def test_a_sweep_refuses_resume_and_other_backends(capsys) -> None:  # noqa: ANN001
    for argv, says in ((["--backend", "ray"], "backend: a sweep runs each trial on the local"),
                       (["--resume", "x"], "resume: a sweep's trials resume themselves")):
        assert main(["sweep", *argv]) == 2
        assert says in capsys.readouterr().err
    with pytest.raises(UserError, match="cpus: 1 cannot hold one trial of 2 CPUs"):
        from sampa_ray.sweep import sweep

        sweep({"threads": 2}, "/nonexistent/never", cpus=1)


def test_a_trial_killed_mid_run_is_resumed_by_tune_and_ends_bitwise(tmp_path: Path) -> None:
    """The trial's process is SIGKILLed once its run has a checkpoint: Tune restarts the trial
    (``FailureConfig(max_failures=1)``), the run goes on from its newest checkpoint, and it
    ends on the uninterrupted run's parameters, bit for bit."""
    import os
    import signal
    import threading
    import time

    from conftest import assert_same_final

    from sampa_ray.checkpoint import list_checkpoints
    from sampa_ray.local import run_local
    from sampa_ray.sweep import sweep

    fields = {"steps": 1500, "threads": 1, "checkpoint_every": 50, "eval_every": 100}
    run_local(make_config({**fields, "algo": "sgd", "seed": 0, "backend": "local"}),
              tmp_path / "clean")
    folder = tmp_path / "sweep" / "sgd-s0" / "checkpoints"
    killed: list[int] = []
    finished_before: list[bool] = []

    def strike() -> None:  # once the run has a checkpoint, kill the trial's process
        deadline = time.time() + 120
        while not list_checkpoints(folder) and time.time() < deadline:
            time.sleep(0.02)
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if proc.name.isdigit() and cmd.startswith(b"ray::ImplicitFunc"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
                finished_before.append((folder.parent / "result.json").exists())

    t = threading.Thread(target=strike, daemon=True)
    t.start()
    rows = sweep(make_config(fields), tmp_path / "sweep", algos=("sgd",), seeds=1, cpus=2,
                 say=lambda _: None)
    t.join(5)
    assert len(killed) == 1 and finished_before == [False], (killed, finished_before)
    assert "error" not in rows[0], rows
    result = json.loads((tmp_path / "sweep" / "sgd-s0" / "result.json").read_text())
    assert result["steps"] == 1500
    assert result["config"]["resume"] == str(folder.parent.resolve())  # the restart resumed
    assert_same_final(tmp_path / "sweep" / "sgd-s0", tmp_path / "clean")
