"""Reliability edges (issue 14): the output folder is protected (a live run's lock, an
interrupted run's checkpoints), a full disk stops the run at the first failed write with one line
and leaves the newest checkpoint whole and resumable, a bare ``--resume DIR`` takes the config its
checkpoint stores, and the CIFAR reader runs nothing a crafted pickle asks for."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_cmd, cli_env, keep_checkpoints_upto

from sampa_ray.checkpoint import (
    Checkpointer,
    config_for_resume,
    list_checkpoints,
    save_checkpoint,
)
from sampa_ray.config import make_config
from sampa_ray.data import load_dataset
from sampa_ray.errors import UserError
from sampa_ray.outdir import LOCK, WriteError, claim_out
from sampa_ray.results import write_outputs

COMMON = ["--backend", "local", "--threads", "1", "--device", "cpu", "--batch-size", "32"]


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_cmd(*args), env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def our_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exit 2 and exactly one line of ours (the last; progress lines may
    come before it), and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("sampa-ray:")]
    assert len(ours) == 1 and proc.stderr.strip().splitlines()[-1] == ours[0], proc.stderr
    return ours[0]


def steps_of(out: Path) -> list[int]:
    return [json.loads(p.read_text())["step"] for p in list_checkpoints(out / "checkpoints")]


def final_x(out: Path) -> torch.Tensor:
    return torch.load(out / "final.pt", weights_only=True)["x"]


# -- 1. the output folder ---------------------------------------------------------------------
def test_a_second_run_on_the_same_out_is_refused_at_once(tmp_path: Path) -> None:
    """The issue's repro: two runs on one --out, the second started while the first trains.
    The second is refused with one line naming the first's pid; the first finishes with its
    own files. (The first is frozen (SIGSTOP) while the second runs: still alive, holding its
    lock, however fast it would train.)"""
    out = tmp_path / "run"
    first = subprocess.Popen(cli_cmd("train", *COMMON, "--steps", "200", "--seed", "1", "--out",
                                  str(out)), env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / LOCK).exists():
            assert time.time() < deadline and first.poll() is None, first.stderr
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        t0 = time.time()
        second = cli("train", *COMMON, "--steps", "5", "--seed", "2", "--out", str(out))
        line = our_line(second)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert "in use by a running sampa-ray" in line and f"pid {first.pid}" in line, line
        assert time.time() - t0 < 30
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    res = json.loads((out / "result.json").read_text())
    assert res["config"]["seed"] == 1 and res["steps"] == 200
    assert not (out / LOCK).exists()


def test_a_stale_lock_does_not_block(tmp_path: Path) -> None:
    """A lock left by a process that was killed holding it does not block the next run."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from sampa_ray.outdir import claim_out; claim_out(Path(sys.argv[1]), False); "
         "print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        line = our_line(cli("train", *COMMON, "--steps", "3", "--out", str(out)))
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).read_text().strip() == str(holder.pid)  # left behind by the kill
    proc = cli("train", *COMMON, "--steps", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not (out / LOCK).exists()


def test_claim_out_refuses_a_held_folder_in_process(tmp_path: Path) -> None:
    with claim_out(tmp_path / "a", overwrite=False), \
            pytest.raises(UserError, match=rf"in use .*pid {os.getpid()}"):
        claim_out(tmp_path / "a", overwrite=True)  # --overwrite never takes a live run's
    with claim_out(tmp_path / "a", overwrite=False):  # released: free again
        pass
    assert list((tmp_path / "a").iterdir()) == []


def test_an_interrupted_folder_needs_resume_or_overwrite(tmp_path: Path) -> None:
    """The issue's repro: Ctrl-C a run, start another on its folder (refused now: before, it ran
    and --keep-checkpoints deleted its own new checkpoints, whose steps were lower), then with
    --overwrite (the old checkpoints go first), then --resume (continues the new one)."""
    out = tmp_path / "run"
    first = subprocess.Popen(cli_cmd("train", *COMMON, "--steps", "3000", "--checkpoint-every",
                                  "30", "--out", str(out)), env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not (out / "checkpoints" / "ckpt-00000090.json").exists():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130
    assert not (out / "result.json").exists() and max(steps_of(out)) >= 90
    before = snapshot(out)

    new = ["train", *COMMON, "--steps", "40", "--checkpoint-every", "10", "--out", str(out)]
    line = our_line(cli(*new))
    assert "interrupted run" in line and f"--resume {out}" in line and "--overwrite" in line
    assert snapshot(out) == before  # nothing written, nothing lost

    proc = cli(*new, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert steps_of(out) == [40, 30, 20]  # the new run's, none of the old ones
    assert json.loads((out / "result.json").read_text())["steps"] == 40

    proc = cli("train", "--resume", str(out))  # the finished new run: nothing left to do
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["steps"] == 40 and res["config"]["checkpoint_every"] == 10


# -- 2. a full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(kib)``: a real tmpfs of that size (root only; skipped elsewhere), unmounted
    afterwards."""
    mounted: list[Path] = []

    def make(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


FULL = ["--steps", "100", "--checkpoint-every", "20"]


def test_a_full_disk_stops_the_run_at_the_first_failed_checkpoint(
        small_disk: Callable[[int], Path], tmp_path: Path) -> None:
    """600 KiB holds one checkpoint (455 KiB) of the digits CNN: the step-40 write fails. The run
    stops right there (step 41 of 100) with one line naming the file and ENOSPC, leaves no
    .tmp and step 20's checkpoint whole, and a bare --resume of it (moved to a disk with room)
    reaches bitwise the parameters of an uninterrupted run."""
    out = small_disk(600) / "run"
    proc = cli("train", *COMMON, *FULL, "--out", str(out))
    line = our_line(proc)
    assert "ckpt-00000040.pt" in line and "ENOSPC" in line and "ckpt-00000020" in line, line
    assert f"--resume {out}" in line
    assert "step 44" not in proc.stderr and "/100" in proc.stderr  # stopped before epoch 1 ended
    assert _tmp_files(out) == [] and not (out / "result.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "ckpt-00000020.json", "ckpt-00000020.pt"]

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    full = tmp_path / "full"  # the uninterrupted run, beside the resumed one
    uninterrupted = subprocess.Popen(cli_cmd("train", *COMMON, *FULL, "--out", str(full)),
                                     env=cli_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
    try:
        proc = cli("train", "--resume", str(moved))
    finally:
        _, err = uninterrupted.communicate(timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert uninterrupted.returncode == 0, err
    assert torch.equal(final_x(moved), final_x(full))
    assert json.loads((moved / "result.json").read_text())["steps"] == 100


def test_a_full_disk_at_the_final_outputs(small_disk: Callable[[int], Path]) -> None:
    """With only the final checkpoint, the disk fills at final.pt: one line naming it, no
    final.pt.tmp, and the final checkpoint (whole) marks the folder as resumable."""
    out = small_disk(600) / "run"
    line = our_line(cli("train", *COMMON, "--steps", "30", "--out", str(out)))
    assert "final.pt" in line and "ENOSPC" in line, line
    assert _tmp_files(out) == [] and not (out / "final.pt").exists()
    assert steps_of(out) == [30]
    line = our_line(cli("train", *COMMON, "--steps", "30", "--out", str(out)))
    assert "interrupted run" in line


def test_write_outputs_on_a_filling_disk(small_disk: Callable[[int], Path],
                                         tmp_path: Path) -> None:
    """write_outputs with less and less room: each failure is one line naming the file that did
    not fit (final.pt, curves.png or result.json, each seen), never a .tmp, and every file
    present is whole; result.json, written last, only when everything else is."""
    x = torch.arange(30_000, dtype=torch.float32)
    epochs = [{"epoch": e, "step": e, "lr": 0.1, "wall_s": e, "train_loss": 1.0 / e,
               "train_accuracy": 0.5, "test_loss": 1.0, "test_accuracy": 0.5}
              for e in range(1, 400)]
    result = {"config": {"algo": "sgd"}, "epochs": epochs, "pad": "x" * 60_000}
    ref = tmp_path / "ref"
    write_outputs(ref, result, x, {})
    need = sum(p.stat().st_size for p in ref.iterdir())
    disk = small_disk(1024)
    failed: set[str] = set()
    for free in range(0, need + 64 * 1024, 20 * 1024):
        out = disk / "out"
        shutil.rmtree(out, ignore_errors=True)
        for p in disk.glob("fill*"):
            p.unlink()
        filler = disk / "fill"
        stat = os.statvfs(disk)
        left = stat.f_bavail * stat.f_frsize - free
        if left > 0:
            filler.write_bytes(b"\0" * left)
        try:
            write_outputs(out, result, x, {})
        except WriteError as err:
            msg = str(err)
            assert "\n" not in msg and "ENOSPC" in msg, msg
            failed.add(Path(msg.split("cannot write ")[1].split(":")[0]).name)
        assert _tmp_files(disk) == []
        names = {p.name for p in out.iterdir()}
        if "final.pt" in names:
            assert torch.equal(final_x(out), x)
        if "curves.png" in names:
            assert (out / "curves.png").read_bytes() == (ref / "curves.png").read_bytes()
        if "result.json" in names:
            assert names == {"final.pt", "curves.png", "result.json"}
            assert json.loads((out / "result.json").read_text())["pad"] == result["pad"]
    assert failed == {"final.pt", "curves.png", "result.json"}


def test_a_failed_background_write_stops_the_loop(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a small disk (any machine): a checkpoint write failing with ENOSPC in the
    background thread ends train_loop at the next update with one line, and no .tmp is left."""
    import asyncio

    import sampa_ray.outdir as outdir
    from sampa_ray.events import RoundEvent
    from sampa_ray.local import LocalExecutor
    from sampa_ray.loop import Hooks, Plan, make_algorithm, train_loop
    from sampa_ray.results import Recorder

    real_replace = os.replace
    writes = []

    def replace(src: str | Path, dst: str | Path) -> None:
        writes.append(Path(dst).name)
        if Path(dst).name == "ckpt-00000010.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(outdir.os, "replace", replace)
    cfg = make_config({"algo": "sgd", "steps": 30, "batch_size": 32, "threads": 1,
                       "checkpoint_every": 5, "backend": "local"})
    ex = LocalExecutor(cfg)
    rec = Recorder(make_algorithm(cfg, 1).stats_role)
    ck = Checkpointer(cfg, tmp_path / "checkpoints", ex, rec, ex.engines[0].info()["num_params"])
    steps: list[int] = []
    with pytest.raises(UserError, match=r"ckpt-00000010\.pt: No space left on device \(ENOSPC\)"
                       r"; run stopped, ckpt-00000005 is the newest") as info:
        plan = Plan.of(cfg, ex.engines[0].info()["batches_per_epoch"])
        asyncio.run(train_loop(
            make_algorithm(cfg, plan.total_steps, plan.batches_per_epoch), ex,
            ex.engines[0].initial_point(), plan, rec,
            Hooks(progress=lambda ev: steps.append(ev.step if isinstance(ev, RoundEvent)
                                                   else 0), checkpoint=ck)))
    assert "\n" not in str(info.value)
    # stopped before the next checkpoint is due (not at 30): at the first update after the
    # background write failed, which a loaded machine finishes an update or three later
    assert max(steps) < 15
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ckpt-00000005.json", "ckpt-00000005.pt"]


def test_save_checkpoint_leaves_nothing_when_its_json_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sampa_ray.outdir as outdir
    from sampa_ray.algorithms import AlgoState
    from sampa_ray.checkpoint import Checkpoint

    def ckpt(step: int) -> Checkpoint:
        return Checkpoint.of(AlgoState(x=torch.ones(4) * step, step=step, phase=0), [{}],
                             {"num_params": 4})

    save_checkpoint(tmp_path, ckpt(1))
    before = snapshot(tmp_path)
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).suffix == ".json":
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real_replace(src, dst)

    monkeypatch.setattr(outdir.os, "replace", replace)
    with pytest.raises(WriteError, match=r"ckpt-00000002\.json: Disk quota exceeded \(EDQUOT\)"):
        save_checkpoint(tmp_path, ckpt(2), keep=1)
    assert snapshot(tmp_path) == before  # no .pt without its JSON, no .tmp, nothing pruned


@pytest.mark.timeout(300)
def test_a_full_disk_on_ray_is_one_line(small_disk: Callable[[int], Path]) -> None:
    """The same on the Ray backend: the write fails in the coordinator actor; the driver prints
    our one line, exit 2."""
    out = small_disk(600) / "run"
    proc = cli("train", "--backend", "ray", "--threads", "1", "--device", "cpu",
               "--batch-size", "32", *FULL, "--out", str(out), timeout=240)
    line = our_line(proc)
    assert "ckpt-00000040.pt" in line and "ENOSPC" in line, line
    assert _tmp_files(out) == [] and steps_of(out) == [20]



_SLOW_START = """
import os, subprocess, ray
from sampa_ray.ray.driver import start_local
start_local(num_cpus=1)
print(ray.get(ray.remote(lambda: 41 + 1).remote()))
kids = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "comm="], capture_output=True,
                      text=True, check=True).stdout.split()
print(kids.count("gcs_server"), os.environ.get("RAY_gcs_server_port_wait_time_s"))
ray.shutdown()
"""


@pytest.mark.timeout(300)
def test_a_slow_gcs_start_is_stopped_and_started_once_more() -> None:
    """Ray waits 30 s for a new head's GCS server; a loaded machine can take longer. With the
    wait set to 0 the first start must time out: one line says so, the half-started server is
    stopped (one GCS server remains, not two), the second start (120 s) works, and the caller's
    setting is put back."""
    env = {**cli_env(), "RAY_gcs_server_port_wait_time_s": "0"}
    proc = subprocess.run([sys.executable, "-c", _SLOW_START], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["42", "1", "0"], proc.stdout
    assert ("Ray's GCS server did not start within 0 s; starting once more "
            "(waiting up to 120 s)") in proc.stderr

# -- 4. a bare --resume -----------------------------------------------------------------------
def test_bare_resume_takes_the_stored_config(tmp_path: Path) -> None:
    """Resume with no flags at all: the checkpoint's config (SAM, lr 0.07, seed 3, ...) is
    used, bitwise the uninterrupted run. A trajectory flag that differs is refused with one line
    naming it and both values (nothing written); one that repeats the stored value, and
    runtime flags, are accepted."""
    flags = ["--algo", "sam", "--lr", "0.07", "--seed", "3", "--steps", "30",
             "--checkpoint-every", "10", "--keep-checkpoints", "5", "--lr-schedule", "constant"]
    full = tmp_path / "full"
    assert cli("train", *COMMON, *flags, "--out", str(full)).returncode == 0
    part = tmp_path / "part"
    keep_checkpoints_upto(full, part, 10)
    before = snapshot(part)

    line = our_line(cli("train", "--resume", str(part), "--lr", "0.2"))
    assert line == ("sampa-ray: resume: lr is 0.07 in the checkpoint, 0.2 on the command line "
                    "(a run with another value needs its own --out)")
    with pytest.raises(UserError, match="algo is 'sam' in the checkpoint, 'sgd' on the "):
        config_for_resume(part, {"algo": "sgd", "threads": 2})
    assert config_for_resume(part, {"algo": "sam", "threads": 2}).threads == 2
    assert snapshot(part) == before

    proc = cli("train", "--resume", str(part), "--lr", "0.07", "--eval-every", "2",
               "--keep-checkpoints", "2")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(final_x(part), final_x(full))
    res = json.loads((part / "result.json").read_text())
    c = res["config"]
    assert (c["algo"], c["lr"], c["seed"], c["lr_schedule"]) == ("sam", 0.07, 3, "constant")
    assert (c["eval_every"], c["keep_checkpoints"], c["out"]) == (2, 2, str(part))
    assert steps_of(part) == [30, 20]


def test_resume_of_nothing_is_one_line_before_anything_is_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sampa_ray.cli import main

    (tmp_path / "empty").mkdir()
    for where, why in (("nope", "does not exist"), ("empty", "no checkpoint in")):
        assert main(["train", "--resume", str(tmp_path / where)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
    assert not (tmp_path / "nope").exists() and list((tmp_path / "empty").iterdir()) == []


# -- 7. the CIFAR reader ----------------------------------------------------------------------
class _Evil:
    def __init__(self, fn: object, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return self.fn, (self.arg,)


def _cifar10(folder: Path, first: object, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
               b"labels": list(range(10)), b"batch_label": b"x",
               b"filenames": [b"%d.png" % i for i in range(10)]}
        if name == "data_batch_1" and first is not None:
            obj = first
        (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("fn", [os.system, eval, exec, subprocess.check_call],
                         ids=["os.system", "eval", "exec", "subprocess"])
def test_a_crafted_cifar_pickle_runs_nothing(tmp_path: Path, fn: object) -> None:
    marker = tmp_path / "ran"
    arg = {os.system: f"touch {marker}", eval: f"open({str(marker)!r}, 'w')",
           exec: f"open({str(marker)!r}, 'w')"}.get(fn, f"touch {marker}")  # type: ignore
    payload = _Evil(fn, arg if fn is not subprocess.check_call else ["touch", str(marker)])
    _cifar10(tmp_path / "c", {b"data": payload, b"labels": [0]})
    with pytest.raises(UserError, match=r"data_batch_1 is malformed \(it names .*which no "
                       r"CIFAR file holds; refused without running it\)") as info:
        load_dataset("cifar10", data_dir=str(tmp_path / "c"))
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_a_crafted_cifar_pickle_through_the_cli(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    _cifar10(tmp_path / "c", _Evil(os.system, f"touch {marker}"))
    line = our_line(cli("train", *COMMON, "--dataset", "cifar10", "--model", "resnet20",
                        "--data-dir", str(tmp_path / "c"), "--steps", "1", "--out",
                        str(tmp_path / "out")))
    assert "data_batch_1 is malformed" in line and "system" in line
    assert not marker.exists()


@pytest.mark.parametrize(("protocol", "numpy_names"), [
    (2, "numpy._core"), (3, "numpy._core"), (4, "numpy._core"), (5, "numpy._core"),
    (2, "numpy.core")])
def test_genuine_cifar_pickles_still_load(tmp_path: Path, protocol: int,
                                          numpy_names: str) -> None:
    """What the restricted reader admits covers the real files: every protocol, and arrays
    named as numpy 2 writes them or as numpy 1 did (the official files: protocol 2, text names
    ``numpy.core.multiarray``)."""
    folder = tmp_path / "c"
    _cifar10(folder, None, protocol)
    if numpy_names == "numpy.core":  # protocol 2 names globals as text lines: safe to rewrite
        for p in folder.iterdir():
            data = p.read_bytes()
            assert b"numpy._core.multiarray\n_reconstruct" in data
            p.write_bytes(data.replace(b"numpy._core.", b"numpy.core."))
    d = load_dataset("cifar10", data_dir=str(folder))
    assert d.x_train.shape == (50, 3, 32, 32) and d.y_train.tolist() == list(range(10)) * 5


# -- --resume auto: what a restarted job runs ---------------------------------------------------
def test_resume_auto_starts_then_continues_then_needs_an_out(tmp_path: Path) -> None:
    """The same command twice: the first starts the run (no checkpoint yet), the second
    continues it from its checkpoints (a finished run: nothing left to do, the same
    parameters); without --out there is nothing to continue, in one line."""
    out = tmp_path / "job"
    args = ("train", "--backend", "local", "--steps", "6", "--threads", "1", "--out", str(out),
            "--resume", "auto")
    with ThreadPoolExecutor(1) as pool:  # the one without --out, meanwhile
        no_out = pool.submit(cli, "train", "--backend", "local", "--resume", "auto")
        first = cli(*args)
    assert first.returncode == 0, first.stderr
    x = final_x(out)
    assert steps_of(out) == [6]
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert torch.equal(final_x(out), x)
    assert json.loads((out / "result.json").read_text())["steps"] == 6
    assert "--out" in our_line(no_out.result())
