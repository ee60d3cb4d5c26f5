"""What the input alone decides is answered before Ray starts: one line, exit 2. The CLI runs
with a ``ray`` package on its path that cannot be imported, so any of these that reached Ray
would end differently."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from sampa_ray.config import make_config
from sampa_ray.errors import UserError
from sampa_ray.preflight import (
    DIGITS_TRAIN,
    RAY_WORKERS,
    check_before_start,
    check_threads,
    max_train_samples,
)

CORES = os.cpu_count() or 1
NO_RAY = "ray must not be imported before the input is checked"


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    fake = tmp / "no-ray"
    (fake / "ray").mkdir(parents=True, exist_ok=True)
    (fake / "ray" / "__init__.py").write_text(f"raise ImportError({NO_RAY!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SAMPA_RAY_TOKEN")}
    # this checkout's package, whatever the environment has installed
    env.update(PYTHONPATH=os.pathsep.join([str(fake), str(REPO)]), OMP_NUM_THREADS="1",
               COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "sampa_ray.cli", "train", *args], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=120)


def _cifar_folder(root: Path, content: bytes | None = None, per_file: int = 10) -> Path:
    """A CIFAR-10 folder: tiny real pickles, or files holding ``content``."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if content is not None:
            (folder / name).write_bytes(content)
            continue
        data = {b"data": np.zeros((per_file, 3072), np.uint8), b"labels": [0] * per_file}
        (folder / name).write_bytes(pickle.dumps(data, protocol=2))
    return folder


CASES = [
    ("resume-no-such-folder", ["--resume", "{tmp}/nowhere"], "resume"),
    ("batch-larger-than-digits", ["--batch-size", "100000"], "batch_size"),
    ("cifar-missing-folder", ["--dataset", "cifar10", "--model", "resnet20", "--data-dir",
                              "{tmp}/nowhere"], "nowhere"),
    ("cifar-garbage-files", ["--dataset", "cifar10", "--model", "resnet20", "--data-dir",
                             "{garbage}"], "data_batch_1"),
    ("cifar-batch-larger-than-files", ["--dataset", "cifar10", "--model", "resnet20",
                                       "--data-dir", "{cifar}", "--batch-size", "128"],
     "batch_size"),
    ("control-host-without-token", ["--control-host", "0.0.0.0"], "control_host"),
    ("metrics-host-without-token", ["--metrics-host", "0.0.0.0"], "metrics_host"),
    ("threads-more-than-the-machine", ["--threads", str(CORES)], "threads"),
]


@pytest.fixture(scope="module")
def answered(tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, tuple[dict[str, str], subprocess.CompletedProcess[str]]]:
    """Every case's command, each in its own folder, two at a time: a refused command is mostly
    the interpreter importing (one core each), and this machine has two."""

    def one(case: tuple[str, list[str], str]) -> tuple[str, tuple[dict[str, str], Any]]:
        name, args, _ = case
        tmp = tmp_path_factory.mktemp(name)
        paths = {"tmp": str(tmp),
                 "garbage": str(_cifar_folder(tmp / "g", b"<html>404 Not Found</html>\n")),
                 "cifar": str(_cifar_folder(tmp / "c"))}
        args = [a.format(**paths) for a in args]
        return name, (paths, _cli(tmp, "--out", str(tmp / "out"), *args))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_answered_in_one_line_before_ray_starts(case: tuple[str, list[str], str],
                                                answered: dict) -> None:
    name, _, field = case
    paths, proc = answered[name]
    tmp_path = Path(paths["tmp"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sampa-ray: "), proc.stderr
    assert field.format(**paths) in lines[0]
    assert NO_RAY not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists()  # nothing created for a folder that is not
    assert not (tmp_path / "out").exists()


def test_local_backend_warns_of_more_threads_than_cores(tmp_path: Path) -> None:
    threads = CORES * 4
    proc = _cli(tmp_path, "--backend", "local", "--threads", str(threads), "--steps", "2",
                "--model", "mlp", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"sampa-ray: warning: --threads {threads} is more than") and \
        f"{CORES} CPU cores" in first
    assert (tmp_path / "out" / "result.json").is_file()


def test_more_ray_workers_than_cores_is_one_warning_line() -> None:
    """2k one-thread workers on an embedded instance with fewer cores are placed at a share of
    a core each: a warning saying so (it runs); several threads each cannot be placed at all."""
    def cfg(**kw: Any) -> Any:
        return make_config({"backend": "ray", **kw})

    assert check_threads(cfg(workers_per_role=3), 2) == [
        "warning: 6 workers x 1 thread need 6 CPU cores and this machine has 2; the workers "
        "share the cores, so expect slower steps (use --workers-per-role 1 for one core each)"]
    assert check_threads(cfg(workers_per_role=3, threads=1), 4) == [
        "warning: 6 workers x 1 thread need 6 CPU cores and this machine has 4; the workers "
        "share the cores, so expect slower steps (use --workers-per-role 2 for one core each)"]
    assert "use --backend local" in check_threads(cfg(), 1)[0]
    assert check_threads(cfg(workers_per_role=3), 6) == []  # one core each
    assert check_threads(cfg(), 2) == []
    # a cluster brings its own CPUs; one process has no workers to place
    assert check_threads(cfg(workers_per_role=3, address="10.0.0.1:6379"), 2) == []
    assert check_threads(make_config({"backend": "local"}), 1) == []
    with pytest.raises(UserError, match="threads: 6 workers x 2 threads need 12 CPUs"):
        check_threads(cfg(workers_per_role=3, threads=2), 8)


def test_cli_warns_of_more_ray_workers_than_cores(tmp_path: Path) -> None:
    """The warning comes first, before anything else is decided: here the --out folder holds a
    finished run, so the command ends there (exit 2), with Ray never imported."""
    k = CORES // RAY_WORKERS + 1  # 2k workers: more than the cores
    out = tmp_path / "done"
    out.mkdir()
    (out / "result.json").write_text("{}\n")
    proc = _cli(tmp_path, "--backend", "ray", "--workers-per-role", str(k), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        f"sampa-ray: warning: {2 * k} workers x 1 thread need {2 * k} CPU cores and this machine "
        f"has {CORES}; the workers share the cores, so expect slower steps (use "
        + (f"--workers-per-role {CORES // 2}" if CORES >= 2 else "--backend local")
        + " for one core each)"), proc.stderr
    assert len(lines) == 2 and lines[1].startswith("sampa-ray: out: ") and "--overwrite" in lines[1]
    assert NO_RAY not in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "result.json").read_text() == "{}\n"


def test_fitting_input_passes_and_warns_of_nothing(tmp_path: Path) -> None:
    cfg = make_config({"backend": "local", "threads": 1, "batch_size": DIGITS_TRAIN})
    assert check_before_start(cfg) == []
    cfg = make_config({"dataset": "cifar10", "model": "resnet20", "batch_size": 50,
                       "data_dir": str(_cifar_folder(tmp_path))})
    assert max_train_samples(cfg) == 50  # five files of ten images, a bound from their sizes
    assert check_before_start(cfg) == []


def test_the_constants_match_what_they_stand_for() -> None:
    from sampa_ray.data.datasets import load_dataset
    from sampa_ray.ray.placement import worker_names

    assert load_dataset("digits").num_train == DIGITS_TRAIN
    assert len(worker_names(1)) == RAY_WORKERS
    assert len(worker_names(3)) == 3 * RAY_WORKERS
