"""`ray job submit` end to end: a real head node on loopback, jobs through the job SDK."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, assert_same_final, in_thread, job_client, submit, wait_job


@pytest.mark.outcome
def test_job_with_plugins_succeeds_and_writes_result(ray_head, tmp_path, outcome):
    """A job whose working_dir is a project folder (``examples/``): its model, dataset and loss
    are named by import path and found there, by the driver and (by value) by the workers.
    It runs on two role groups of two workers (4 in all) with synchronised BatchNorm."""
    client = job_client(ray_head)
    out = tmp_path / "job-run"
    job = submit(client,
        entrypoint=f"{sys.executable} -m sampa_ray.cli train --backend ray --steps 25 "
                   "--model my_task:build --dataset my_task:load --loss my_task:loss "
                   "--dataset-arg n_train=1024 --optimizer adamw --lr 0.01 "
                   f"--threads 1 --workers-per-role 2 --sync-bn --out {out}",
        runtime_env={"working_dir": str(REPO / "examples"), "excludes": ["runs"]},
    )
    status = wait_job(client, job)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["backend"] == "ray" and result["steps"] == 25
    assert result["config"]["model"] == "my_task:build" and result["num_classes"] == 3
    assert result["gradient_rounds"] == 26  # SAMPa: bootstrap + one round per update
    outcome("final test accuracy", result["final_test_accuracy"], ">", 0.5)  # chance: 1/3
    assert "placement: 4 workers (2 per role); CPUs only" in logs
    groups = result["role_groups"]
    assert groups["devices"] == 4 and groups["sync_bn"] is True and groups["backend"] == "gloo"
    assert groups["groups"] == {"0": ["perturbed-0", "perturbed-1"],
                                "1": ["extrapolated-0", "extrapolated-1"]}
    assert (out / "final.pt").stat().st_size > 0 and (out / "curves.png").exists()


def test_bad_config_inside_job_fails_with_one_line(ray_head, tmp_path):
    client = job_client(ray_head)
    job = submit(client,
        entrypoint=f"{sys.executable} -m sampa_ray.cli train --backend ray --lam 1.5 "
                   f"--out {tmp_path / 'bad'}",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "runs"]},
    )
    assert wait_job(client, job) == "FAILED"
    logs = client.get_job_logs(job)
    lines = [ln for ln in logs.splitlines() if ln.startswith("sampa-ray:")]
    assert lines == ["sampa-ray: config: lam: Input should be less than or equal to 1, got 1.5"]
    assert "Traceback" not in logs
    assert not (tmp_path / "bad" / "result.json").exists()


def test_stopped_job_resumes_to_the_uninterrupted_parameters(ray_head, tmp_path):
    """`ray job stop` kills the driver (and with it the coordinator) mid-run: the newest
    checkpoint is whole and verifies; the job resubmitted with --resume finishes the run and
    lands on the same parameters, bit for bit, as an uninterrupted run of the same config."""
    import re
    import time
    import urllib.error
    import urllib.request

    import torch
    from ray.job_submission import JobStatus

    from sampa_ray.checkpoint import list_checkpoints, load_latest
    from sampa_ray.config import make_config
    from sampa_ray.local import run_local

    client = job_client(ray_head)
    out = tmp_path / "resumed"
    folder = out / "checkpoints"
    flags = {"backend": "ray", "model": "resnet20", "dataset": "synthetic",
             "synthetic_size": 128, "batch_size": 16, "steps": 40, "threads": 1,
             "checkpoint_every": 5, "keep_checkpoints": 10}
    argv = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items())
    entrypoint = f"{sys.executable} -m sampa_ray.cli train {argv} --out {out}"
    env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "runs"]}

    def newest_step() -> int:
        for p in list_checkpoints(folder):
            try:
                return int(json.loads(p.read_text())["step"])
            except (OSError, ValueError, KeyError):
                continue  # being replaced as we look
        return 0

    job = submit(client, entrypoint=entrypoint, runtime_env=env)
    # the uninterrupted run, in this process (bitwise equal to the Ray backend on CPU), made
    # while the jobs run on the head
    cfg = make_config({**flags, "out": str(out)})
    threads = torch.get_num_threads()
    ref_thread, ref_box = in_thread(lambda: run_local(
        cfg.model_copy(update={"out": str(tmp_path / "ref")}), tmp_path / "ref"))
    deadline = time.time() + 120
    while newest_step() < 10:
        status = client.get_job_status(job)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), \
            (status, client.get_job_logs(job)[-3000:])
        assert time.time() < deadline, "no checkpoint at step >= 10 within 120 s"
        time.sleep(0.1)
    client.stop_job(job)
    assert wait_job(client, job, timeout=60) == "STOPPED"
    logs = client.get_job_logs(job)

    # the coordinator went with the driver: its metrics endpoint stops answering
    found = re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", logs)
    assert found, logs[-3000:]

    def coordinator_gone() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/metrics", timeout=2)
        except (urllib.error.URLError, ConnectionError):
            return True
        return False

    deadline = time.time() + 30
    while not coordinator_gone():
        assert time.time() < deadline, "the coordinator outlived its stopped job"
        time.sleep(0.2)

    newest = list_checkpoints(folder)[0]
    meta = json.loads(newest.read_text())
    assert meta["config_hash"] == cfg.hash()
    ckpt = load_latest(folder, meta["config_hash"], meta["num_params"])
    stopped_at = ckpt.step
    assert 10 <= stopped_at < 40, "the job was not stopped mid-run"
    assert ckpt.tensors["x"].numel() == meta["num_params"]
    assert not (out / "result.json").exists() and not (out / "final.pt").exists()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    job2 = submit(client, entrypoint=f"{entrypoint} --resume {out}", runtime_env=env)
    status = wait_job(client, job2, timeout=180)
    assert status == "SUCCEEDED", client.get_job_logs(job2)[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 40 and result["config_hash"] == cfg.hash()
    # it went on from the checkpoint: the earlier ones were not written again
    for p in list_checkpoints(folder):
        step = int(json.loads(p.read_text())["step"])
        if step <= stopped_at:
            assert before.get(p.name) == p.stat().st_mtime_ns, p.name
    assert newest_step() == 40

    ref_thread.join(timeout=300)
    torch.set_num_threads(threads)
    assert not ref_thread.is_alive() and "error" not in ref_box, ref_box.get("error")
    ref = ref_box["result"]
    assert ref["steps"] == 40 and ref["num_params"] == meta["num_params"]
    assert_same_final(out, tmp_path / "ref")
