"""What a user meets around the runs themselves: help texts, default folder names, resuming,
output into pipes and files, and ``sampa-ray runs``. Real subprocesses of the CLI on the local
backend, small runs on the bundled digits."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_cmd, cli_env

COMMON = ["--backend", "local", "--threads", "1", "--device", "cpu"]


def cli(*args: str, cwd: Path, timeout: float = 180,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_cmd(*args), cwd=cwd, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout)


# -- help texts -------------------------------------------------------------------------------
def _options(help_text: str) -> dict[str, str]:
    """``--flag``: its help text, from argparse's ``options:`` section (an option starts a line
    two spaces in; its help follows two or more spaces later, or on the lines below)."""
    section = help_text.split("\noptions:\n", 1)[1]
    found: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        if line.startswith("  -"):
            invocation, _, text = line.strip().partition("  ")
            current = invocation.split(",")[-1].split()[0]
            found[current] = text.strip()
        elif line.startswith("   ") and current is not None:
            found[current] = f"{found[current]} {line.strip()}".strip()
        else:
            current = None
    return found


@pytest.mark.parametrize("command", ["train", "compare", "sweep"])
def test_every_option_has_help_and_one_default(command: str, tmp_path: Path) -> None:
    proc = cli(command, "--help", cwd=tmp_path, env={**cli_env(), "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    options = _options(proc.stdout)
    assert len(options) > 60 and "--lr" in options and "--out" in options
    # a description, not only a default
    missing = [flag for flag, text in options.items()
               if not re.sub(r"\(default: [^)]*\)", "", text).strip()]
    assert not missing, f"no description: {missing}"
    doubled = [flag for flag, text in options.items() if text.count("(default:") > 1]
    assert not doubled, f"two defaults: {doubled}"
    assert "(default: None)" not in proc.stdout
    assert re.search(r"\(default: \$SAMPA_RAY_TOKEN\)$", options["--token-file"])
    assert options["--lr"].endswith("(default: 0.05)")
    assert options["--sync-bn"].count("default") == 1  # the description says it


# -- default folder names ---------------------------------------------------------------------
def test_runs_claimed_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    """Three claims of one stamped name (as three runs started in the same second make):
    three folders, each locked by its claim, the later ones named ``-2``, ``-3``."""
    from sampa_ray.outdir import LOCK, claim_new

    base = tmp_path / "runs" / "train-sampa-20260101-120000"
    locks = [claim_new(base) for _ in range(3)]
    try:
        assert [lk.out.name for lk in locks] == [base.name, f"{base.name}-2", f"{base.name}-3"]
        assert all((lk.out / LOCK).is_file() for lk in locks)
    finally:
        for lk in locks:
            lk.release()
    # a name left by an earlier run (a finished one, say) is passed over too
    (base / "result.json").write_text("{}")
    with claim_new(base) as lock:
        assert lock.out.name == f"{base.name}-4"
    assert (base / "result.json").read_text() == "{}"


def test_two_runs_started_together_without_out_both_finish(tmp_path: Path) -> None:
    """Two ``train`` commands started at once with no ``--out``: both finish, each in its own
    ``runs/train-sgd-<time>[-N]`` folder."""
    args = ["train", *COMMON, "--algo", "sgd", "--steps", "2", "--batch-size", "32"]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: cli(*args, cwd=tmp_path), range(2)))
    for p in procs:
        assert p.returncode == 0, p.stderr
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2, folders
    assert all(re.fullmatch(r"train-sgd-\d{8}-\d{6}(-\d+)?", f.name) for f in folders)
    assert all((f / "result.json").is_file() for f in folders)


# -- resuming ---------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = cli("train", *COMMON, "--steps", "6", "--batch-size", "32", "--out", str(run),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = _snapshot(run)
    assert "result.json" in before and any(k.startswith("checkpoints/") for k in before)
    proc = cli("train", *COMMON, "--resume", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"sampa-ray: {run} is finished (6 steps); nothing to "
                                        "resume"]
    assert proc.stdout == ""
    assert _snapshot(run) == before  # byte for byte, not even rewritten
    assert sorted(p.name for p in run.iterdir()) == sorted(
        {k.split("/")[0] for k in before})  # no lock or temporary file left either


def test_wall_time_after_stop_and_resume_is_the_whole_run(tmp_path: Path) -> None:
    """A run interrupted (Ctrl-C) after a checkpoint, then resumed: result.json's wall time
    counts both sessions, so it is at least the first part's (the checkpoint's record) and
    at least the training time its epochs record."""
    import json
    import signal
    import time

    run = tmp_path / "run"
    p = subprocess.Popen(cli_cmd("train", *COMMON, "--steps", "400", "--batch-size", "32",
                                 "--checkpoint-every", "10", "--keep-checkpoints", "50",
                                 "--out", str(run)),
                         cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(run.glob("checkpoints/ckpt-0000010[0-9].json")):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert not (run / "result.json").exists()
    newest = max(run.glob("checkpoints/ckpt-*.json"))
    step = json.loads(newest.read_text())["step"]
    assert 100 <= step < 400
    first = json.loads(newest.read_text())["record"]["wall_s"]
    assert first > 0

    proc = cli("train", *COMMON, "--resume", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((run / "result.json").read_text())
    assert res["steps"] == 400
    assert res["wall_time_s"] >= first
    # the epochs' wall clock runs on from the checkpoint's: the total covers all of it
    assert res["wall_time_s"] >= res["epochs"][-1]["wall_s"] > first


# -- the progress bar -------------------------------------------------------------------------
def test_progress_rate_is_the_runs_own_when_events_come_in_a_burst(tmp_path: Path) -> None:
    """The bar's steps/s is the run's updates over its time, also when the events reach the
    bar as the Ray driver gets them: all at once (a poll four times a second, and a short run
    is over within one), consecutive rounds kept as the latest (the coordinator's queue):
    within a factor of 2 of steps / elapsed, measured here."""
    import time

    from sampa_ray.config import make_config
    from sampa_ray.events import RoundEvent
    from sampa_ray.local import run_local
    from sampa_ray.ray.live import enqueue
    from sampa_ray.ui import ProgressView

    seen: list[tuple[float, Any]] = []
    cfg = make_config({"algo": "sgd", "steps": 24, "batch_size": 32, "threads": 1,
                       "backend": "local"})
    run_local(cfg, tmp_path / "run", progress=lambda ev: seen.append((time.perf_counter(), ev)))
    rounds = [(t, ev) for t, ev in seen if isinstance(ev, RoundEvent)]
    assert [ev.step for _, ev in rounds] == list(range(1, 25))
    (t_first, first), (t_last, _) = rounds[0], rounds[-1]
    elapsed = t_last - t_first + first.round_s + first.update_s  # from the first round
    expected = 24 / elapsed
    polled: list[Any] = []
    for _, ev in seen:
        enqueue(polled, ev)
    assert [ev.step for ev in polled if isinstance(ev, RoundEvent)] == [23, 24]
    with ProgressView("sgd") as view:
        for ev in polled:  # one poll's worth, in one burst
            view(ev)
        shown = float(view.progress.tasks[0].fields["rate"])
    assert expected / 2 <= shown <= expected * 2, (shown, expected)
    assert view.progress.tasks[0].completed == 24


# -- tables into files ------------------------------------------------------------------------
def test_compare_table_into_a_file_has_every_header_whole(tmp_path: Path) -> None:
    """``sampa-ray compare > file``: no terminal, no COLUMNS; every header of the table is
    written whole, on one line, and every row too (rich would fit it into 80 columns)."""
    import json

    env = {k: v for k, v in cli_env().items() if k not in ("COLUMNS", "LINES")}
    table = tmp_path / "table.txt"
    with open(table, "w") as f:
        proc = subprocess.run(cli_cmd("compare", *COMMON, "--steps", "2", "--batch-size", "32",
                                      "--out", str(tmp_path / "cmp")),
                              cwd=tmp_path, env=env, stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = table.read_text()
    headers = ["algorithm", "test accuracy", "wall time (s)", "s / update",
               "sequential gradients / update", "compute / update", "overhead / update"]
    header_line = next((line for line in text.splitlines() if "algorithm" in line), text)
    assert [h.strip() for h in header_line.strip("┃ ").split("┃")] == headers
    assert "…" not in text
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    for r in rows:  # each run on one line, its accuracy as written to compare.json
        line = next((line for line in text.splitlines() if f" {r['algorithm']} " in line), "")
        assert f"{r['test_accuracy']:.4f}" in line


# -- sampa-ray runs ---------------------------------------------------------------------------
def test_runs_lists_each_folder_with_its_state_and_results(tmp_path: Path) -> None:
    """A folder of real runs: a finished one, one left with only a checkpoint (interrupted),
    one a live process holds (running), an empty one (failed), and a compare (a row per
    algorithm); ``runs --json`` and the table say each one's state and numbers, as the run's
    own files have them."""
    import json
    import shutil

    from sampa_ray.cli import main
    from sampa_ray.config import make_config
    from sampa_ray.local import run_local
    from sampa_ray.outdir import claim_out

    runs = tmp_path / "runs"
    small = {"steps": 6, "batch_size": 32, "threads": 1, "backend": "local",
             "checkpoint_every": 4, "keep_checkpoints": 5}
    done = run_local(make_config({**small, "algo": "sam"}), runs / "a-done")
    ckpt4 = runs / "a-done" / "checkpoints" / "ckpt-00000004"
    (runs / "b-cut" / "checkpoints").mkdir(parents=True)
    for suffix in (".json", ".pt"):  # only the checkpoint of step 4 of 6
        shutil.copy(ckpt4.with_suffix(suffix), runs / "b-cut" / "checkpoints")
    record = json.loads(ckpt4.with_suffix(".json").read_text())["record"]
    (runs / "d-empty").mkdir()
    assert main(["compare", *COMMON, "--steps", "2", "--batch-size", "32",
                 "--out", str(runs / "e-cmp")]) == 0
    # a live run holds c-live while the two commands look
    with claim_out(runs / "c-live", overwrite=False), ThreadPoolExecutor(2) as pool:
        as_json, as_text = pool.map(lambda a: cli("runs", *a, cwd=tmp_path), [["--json"], []])
    assert as_json.returncode == 0, as_json.stderr
    got = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert list(got) == ["a-done", "b-cut", "c-live", "d-empty", "e-cmp/sam", "e-cmp/sampa",
                         "e-cmp/sgd"]
    assert got["a-done"] == {"name": "a-done", "path": str(Path("runs") / "a-done"),
                             "status": "finished", "algorithm": "sam", "steps": 6,
                             "planned_steps": 6,
                             "test_accuracy": done["final_test_accuracy"],
                             "wall_time_s": done["wall_time_s"]}
    cut = got["b-cut"]
    assert (cut["status"], cut["algorithm"], cut["steps"], cut["planned_steps"]) == (
        "interrupted", "sam", 4, 6)
    assert cut["wall_time_s"] == record["wall_s"] and cut["test_accuracy"] is None
    assert got["c-live"]["status"] == "running"
    assert got["d-empty"]["status"] == "failed" and got["d-empty"]["algorithm"] is None
    for algo in ("sgd", "sam", "sampa"):
        sub = json.loads((runs / "e-cmp" / algo / "result.json").read_text())
        row = got[f"e-cmp/{algo}"]
        assert (row["status"], row["algorithm"], row["steps"]) == ("finished", algo, 2)
        assert row["test_accuracy"] == sub["final_test_accuracy"]
    # the table (into a pipe: every column whole)
    assert as_text.returncode == 0, as_text.stderr
    lines = {line.split("│")[1].strip(): line for line in as_text.stdout.splitlines()
             if line.startswith("│")}
    assert set(lines) == set(got)
    assert "6/6" in lines["a-done"] and "finished" in lines["a-done"]
    assert f"{done['final_test_accuracy']:.4f}" in lines["a-done"]
    assert "4/6" in lines["b-cut"] and "interrupted" in lines["b-cut"]
    assert "running" in lines["c-live"] and "failed" in lines["d-empty"]
    # once the live run has let go, nothing holds c-live: no result, no checkpoint
    proc = cli("runs", str(runs), "--json", cwd=tmp_path)
    assert {r["name"]: r["status"] for r in json.loads(proc.stdout)}["c-live"] == "failed"


def test_runs_of_a_missing_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = cli("runs", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"sampa-ray: runs: {tmp_path / 'nope'} does not exist"]
