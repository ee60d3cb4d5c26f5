"""A Ray address where nothing answers: one line and exit code 2 within seconds, before Ray's
own retries (which take minutes and print pages)."""

from __future__ import annotations

import subprocess
import time

from conftest import cli_cmd, cli_env, free_port

from sampa_ray.preflight import ray_endpoint


def test_the_endpoint_of_each_form_of_address() -> None:
    assert ray_endpoint("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert ray_endpoint("ray://head:10001") == ("head", 10001)
    assert ray_endpoint("[::1]:6379") == ("::1", 6379)
    for left_to_ray in ("auto", "local", "head", "http://head:8265", "head:port"):
        assert ray_endpoint(left_to_ray) is None, left_to_ray


def test_nothing_answering_at_the_address_ends_in_one_line_at_once(tmp_path) -> None:
    """``--address 127.0.0.1:1``, and ``RAY_ADDRESS`` at a closed port: the line says where
    nothing answers and how to check; exit 2 in under 10 s; no run folder."""
    closed = f"127.0.0.1:{free_port()}"  # bound once, then let go: nothing listens there
    for what, at, env, flags in (
            ("address", "127.0.0.1:1", cli_env(), ["--address", "127.0.0.1:1"]),
            ("RAY_ADDRESS", closed, {**cli_env(), "RAY_ADDRESS": closed}, [])):
        started = time.monotonic()
        proc = subprocess.run(cli_cmd("train", "--steps", "2", *flags, "--out",
                                      str(tmp_path / what)),
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
        assert proc.stderr.strip().splitlines() == [
            f"sampa-ray: {what}: nothing answers at {at}; is a Ray head running there? check "
            f"with: ray status --address {at}"], proc.stderr
        assert proc.returncode == 2
        assert elapsed < 10, f"{what}: {elapsed:.1f}s"
        print(f"{what}: {elapsed:.2f}s")
        assert not (tmp_path / what).exists()
