"""Checkpoints: atomic files with a checksum, newest-valid selection, exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_final, keep_checkpoints_upto, load_final

from sampa_ray.algorithms import AlgoState
from sampa_ray.checkpoint import (
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from sampa_ray.config import make_config
from sampa_ray.errors import UserError
from sampa_ray.local import run_local


def make_ckpt(step: int, n: int = 10) -> Checkpoint:
    state = AlgoState(x=torch.arange(n, dtype=torch.float32) * step, step=step, phase=1,
                      buf=torch.ones(n), g_y=torch.full((n,), 0.5))
    return Checkpoint.of(state, [{"bn.running_mean": torch.zeros(3)}, {}],
                         {"config_hash": "abc", "num_params": n})


def test_round_trip_and_keep_last_k(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, make_ckpt(step), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000020.json", "ckpt-00000015.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000015.json", "ckpt-00000015.pt", "ckpt-00000020.json", "ckpt-00000020.pt"]
    ck = load_checkpoint(tmp_path / "ckpt-00000020.json", "abc", 10)
    st = ck.state()
    assert st.step == 20 and st.phase == 1
    assert torch.equal(st.x, torch.arange(10, dtype=torch.float32) * 20)
    assert torch.equal(st.buf, torch.ones(10)) and torch.equal(st.g_y, torch.full((10,), 0.5))
    assert torch.equal(ck.buffers[0]["bn.running_mean"], torch.zeros(3))


@pytest.mark.parametrize("damage,pattern", [
    (lambda pt, js: pt.write_bytes(pt.read_bytes()[:-7]), "fails its checksum"),
    (lambda pt, js: pt.write_bytes(b"x" + pt.read_bytes()[1:]), "fails its checksum"),
    (lambda pt, js: js.write_text("{not json"), "unreadable or malformed"),
    (lambda pt, js: pt.unlink(), "is missing"),
    (lambda pt, js: js.write_text(json.dumps({**json.loads(js.read_text()),
                                              "config_hash": "zzz"})), "different config"),
    (lambda pt, js: js.write_text(json.dumps({**json.loads(js.read_text()),
                                              "num_params": 11})), "holds 11 parameters"),
])
def test_bad_checkpoint_is_refused_and_older_one_used(tmp_path, damage, pattern):
    save_checkpoint(tmp_path, make_ckpt(5), keep=5)
    save_checkpoint(tmp_path, make_ckpt(10), keep=5)
    damage(tmp_path / "ckpt-00000010.pt", tmp_path / "ckpt-00000010.json")
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(tmp_path / "ckpt-00000010.json", "abc", 10)
    assert "ckpt-00000010" in str(info.value) and "\n" not in str(info.value)
    warnings: list[str] = []
    ck = load_latest(tmp_path, "abc", 10, warnings.append)
    assert ck.step == 5 and len(warnings) == 1 and "ckpt-00000010" in warnings[0]


def test_no_valid_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in"):
        load_latest(tmp_path, "abc", 10)
    save_checkpoint(tmp_path, make_ckpt(5))
    (tmp_path / "ckpt-00000005.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"no valid checkpoint .*1 refused"):
        load_latest(tmp_path, "abc", 10)


def test_a_pickle_payload_never_loads(tmp_path):
    """Even with a matching checksum, a .pt holding arbitrary objects is refused by
    weights_only loading: nothing executes."""
    import hashlib
    import io

    save_checkpoint(tmp_path, make_ckpt(5))
    buf = io.BytesIO()
    torch.save({"step": 5, "phase": 0, "tensors": {"x": torch.zeros(10)},
                "buffers": [], "evil": Path("/tmp")}, buf)  # not a plain tensor type
    data = buf.getvalue()
    (tmp_path / "ckpt-00000005.pt").write_bytes(data)
    meta = json.loads((tmp_path / "ckpt-00000005.json").read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "ckpt-00000005.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not decode"):
        load_checkpoint(tmp_path / "ckpt-00000005.json", "abc", 10)


@pytest.mark.parametrize("algo", ["sgd", "sam", "sampa", "looksam", "rst"])
def test_resumed_run_equals_uninterrupted(tmp_path, algo):
    """Run 20 updates with checkpoints every 7; resume a copy from step 7 and from step 14:
    both reach bitwise the same final parameters and BatchNorm buffers (LookSAM k=3: from
    update 7 on, its direction kept at update 6 is reused until update 9)."""
    cfg = make_config({"algo": algo, "steps": 20, "batch_size": 32, "threads": 1,
                       "checkpoint_every": 7, "keep_checkpoints": 5, "backend": "local",
                       "algo_args": {"k": 3} if algo == "looksam" else {}})
    full = run_local(cfg, tmp_path / "full")
    steps = [json.loads(p.read_text())["step"]
             for p in list_checkpoints(tmp_path / "full" / "checkpoints")]
    assert steps == [20, 14, 7]
    for keep_upto in (7, 14):
        part = tmp_path / f"part{keep_upto}"
        keep_checkpoints_upto(tmp_path / "full", part, keep_upto)
        res = run_local(cfg.model_copy(update={"resume": str(part)}), part)
        assert_same_final(part, tmp_path / "full", keep_upto)
        assert res["steps"] == 20 and res["gradient_rounds"] == full["gradient_rounds"]
        assert [r["step"] for r in res["epochs"]] == [r["step"] for r in full["epochs"]]


@pytest.mark.parametrize("algo", ["sam", "sampa"])
def test_timed_checkpoints_leave_the_trajectory_unchanged(tmp_path, algo):
    """A tiny ``checkpoint_interval_s`` writes a checkpoint every few updates, wherever the
    clock puts them; the run ends on bitwise the parameters and buffers of a run without any,
    keeps the same config hash, and resumes from the oldest one to the same end."""
    base = {"algo": algo, "steps": 60, "batch_size": 32, "threads": 1, "backend": "local",
            "model": "mlp", "keep_checkpoints": 100}
    off = make_config({**base, "checkpoint_interval_s": 0})
    timed = make_config({**base, "checkpoint_interval_s": 0.02})
    assert off.hash() == timed.hash() == make_config(base).hash()
    run_local(off, tmp_path / "off")
    run_local(timed, tmp_path / "timed")

    def steps(run):
        return [json.loads(p.read_text())["step"] for p in list_checkpoints(run / "checkpoints")]

    assert steps(tmp_path / "off") == [60]  # at the end only
    periodic = steps(tmp_path / "timed")[1:]
    assert steps(tmp_path / "timed")[0] == 60 and periodic and all(0 < s < 60 for s in periodic)
    assert_same_final(tmp_path / "timed", tmp_path / "off")

    part = tmp_path / "part"  # only the oldest timed checkpoint: resumed, the same end
    shutil.copytree(tmp_path / "timed" / "checkpoints", part / "checkpoints")
    for p in list_checkpoints(part / "checkpoints")[:-1]:
        p.unlink()
    run_local(off.model_copy(update={"resume": str(part)}), part)
    assert torch.equal(load_final(part)["x"], load_final(tmp_path / "off")["x"])


def test_cli_resume_refuses_mismatched_config(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "sampa_ray.cli", "train", "--backend", "local", "--threads",
            "1", "--steps", "6", "--batch-size", "32"]
    assert subprocess.run(base + ["--out", str(run)], capture_output=True).returncode == 0
    before = (run / "result.json").read_bytes()
    p = subprocess.run(base + ["--lr", "0.2", "--resume", str(run)], capture_output=True,
                       text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()  # the field and both values, before anything runs
    assert lines == ["sampa-ray: resume: lr is 0.05 in the checkpoint, 0.2 on the command "
                     "line (a run with another value needs its own --out)"]
    assert (run / "result.json").read_bytes() == before
    p = subprocess.run(base + ["--resume", str(run)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
