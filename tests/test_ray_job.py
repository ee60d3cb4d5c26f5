"""`ray job submit` end to end: a real head node on loopback, jobs through the job SDK."""

from __future__ import annotations

import json
import sys

from conftest import REPO, job_client, submit, wait_job


def test_job_succeeds_and_writes_result(ray_head, tmp_path):
    client = job_client(ray_head)
    out = tmp_path / "job-run"
    job = submit(client,
        entrypoint=f"{sys.executable} -m sampa_ray.cli train --backend ray --steps 25 "
                   f"--threads 1 --out {out}",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "runs"]},
    )
    status = wait_job(client, job)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["backend"] == "ray" and result["steps"] == 25
    assert result["gradient_rounds"] == 26  # SAMPa: bootstrap + one round per update
    assert result["final_test_accuracy"] > 0.5
    assert "placement: CPUs only" in logs
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
