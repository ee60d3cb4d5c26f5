"""Shared fixtures (a real embedded Ray instance, a real Ray head node with its dashboard, an
event loop in a thread) and the helpers several test files use: runs in a thread, the bitwise
comparison of two runs' final parameters, resuming from a copy of a run's checkpoints, a
self-signed certificate."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One torch thread in the test process: results do not depend on the machine's core
    count, and two busy cores are not oversubscribed."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- training outcomes: values that hold on every CPU kernel set ----------------------------
#: (test, what, value, bar) of every outcome checked in this session, for the summary
_OUTCOMES: list[tuple[str, str, float, str]] = []
_COMPARE = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Callable[[str, float, str, float], None]:
    """``outcome(what, value, op, bar)`` asserts a training outcome (an accuracy, a loss, a
    margin) against its bar and records the value: the session's summary lists every value
    with the CPU kernels it was measured under, so a margin's size is visible run by run.
    Tests that use it are marked ``outcome`` and re-run under every other kernel set the
    processor supports (``tests/kernel_sets.py``)."""

    def check(what: str, value: float, op: str, bar: float) -> None:
        _OUTCOMES.append((request.node.nodeid, what, float(value), f"{op} {bar}"))
        assert _COMPARE[op](float(value), float(bar)), f"{what} = {value}, not {op} {bar}"

    return check


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _OUTCOMES:
        return
    import torch

    kernels = os.environ.get("SAMPA_KERNEL_SET") or torch.backends.cpu.get_cpu_capability()
    terminalreporter.section(f"training outcomes (CPU kernels: {kernels})")
    for test, what, value, bar in _OUTCOMES:
        terminalreporter.write_line(f"{test}: {what} = {value:.6g} (bar {bar})")


def local_final(cfg: Any, out: Path) -> dict[str, Any]:
    """Run ``cfg`` on the local backend into ``out`` (the test process's torch threads kept as
    they were) and return its ``final.pt``: the reference a Ray run is compared with."""
    import torch

    from sampa_ray.local import run_local

    threads = torch.get_num_threads()
    try:
        run_local(cfg, out)
    finally:
        torch.set_num_threads(threads)
    return load_final(out)


def load_final(out: Path) -> dict[str, Any]:
    """A run folder's ``final.pt``: parameters ``x`` and BatchNorm ``buffers`` by name."""
    import torch

    return torch.load(Path(out) / "final.pt", weights_only=True)


def assert_same_final(got: Path | dict[str, Any], want: Path | dict[str, Any], *what: Any
                      ) -> None:
    """``got`` ends bit for bit where ``want`` does: the same parameters, the same BatchNorm
    buffer names and each buffer equal. Each is a run folder or a loaded ``final.pt`` (any dict
    with ``x`` and ``buffers``); ``what`` is added to a failure's message."""
    import torch

    got = got if isinstance(got, dict) else load_final(got)
    want = want if isinstance(want, dict) else load_final(want)
    assert torch.equal(got["x"], want["x"]), what
    assert got["buffers"].keys() == want["buffers"].keys(), what
    for k, v in want["buffers"].items():
        assert torch.equal(got["buffers"][k], v), (*what, k)


def same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same names, each tensor bit for bit equal."""
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def num_batches_tracked(buffers: dict[str, Any]) -> set[int]:
    """The values of every BatchNorm layer's ``num_batches_tracked``."""
    return {int(v) for k, v in buffers.items() if k.endswith("num_batches_tracked")}


def keep_checkpoints_upto(run: Path, part: Path, step: int) -> None:
    """Copy ``run``'s checkpoints to ``part``, without those written after update ``step``: a
    folder that resumes from the middle of the run."""
    from sampa_ray.checkpoint import list_checkpoints

    shutil.copytree(Path(run) / "checkpoints", Path(part) / "checkpoints")
    for p in list_checkpoints(Path(part) / "checkpoints"):
        if json.loads(p.read_text())["step"] > step:
            p.unlink()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """``fn()`` in a started daemon thread, and the box it leaves its return value in
    (``box["result"]``) or what it raised (``box["error"]``, for the test to surface)."""
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # surfaced by the test
            box["error"] = err

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


def start_run(cfg: Any, out: Path, timeout: float = 180) -> tuple[threading.Thread,
                                                                  dict[str, Any], str]:
    """Run ``cfg`` on Ray into ``out`` in a thread (:func:`in_thread`) and wait, at most
    ``timeout`` seconds, for its "control: " line. Returns the thread, its box and the address
    of the run's gRPC control API."""
    from sampa_ray.events import InfoEvent
    from sampa_ray.ray import run_ray

    targets: list[str] = []

    def progress(ev: Any) -> None:
        if isinstance(ev, InfoEvent) and ev.text.startswith("control: "):
            targets.append(ev.text.split()[1])

    t, box = in_thread(lambda: run_ray(cfg, out, progress=progress))
    deadline = time.time() + timeout
    while not targets and time.time() < deadline and t.is_alive():
        time.sleep(0.05)
    assert targets, box.get("error")
    return t, box, targets[0]


def run_with_fault(cfg: Any, out: Path, at_step: int, fault: Callable[[int], None],
                   victims: Callable[[dict[str, int]], list[int]]
                   ) -> tuple[dict[str, Any], list[str], dict[str, int]]:
    """Run ``cfg`` on Ray in a thread; once update ``at_step`` is reached, apply ``fault(pid)``
    to each of ``victims(pids)`` (``pids``: worker name -> process, from the run's "workers:"
    line). Returns the result, the run's info lines and the pids the fault met."""
    from sampa_ray.ray import run_ray

    pids: dict[str, int] = {}
    steps: list[int] = []
    infos: list[str] = []

    from sampa_ray.events import InfoEvent, RoundEvent

    def progress(ev: Any) -> None:
        if isinstance(ev, InfoEvent):
            infos.append(ev.text)
            if ev.text.startswith("workers: "):
                for part in ev.text[len("workers: "):].split(", "):
                    name, _, pid, _ = part.split(" ", 3)
                    pids[name] = int(pid)
        elif isinstance(ev, RoundEvent):
            steps.append(ev.step)

    t, box = in_thread(lambda: run_ray(cfg, out, progress=progress))
    deadline = time.time() + 120
    while (not steps or steps[-1] < at_step) and time.time() < deadline and t.is_alive():
        time.sleep(0.02)
    assert steps and steps[-1] < cfg.steps, "the run ended before the fault"
    met = dict(pids)
    for pid in victims(pids):
        fault(pid)
    t.join(timeout=300)
    assert not t.is_alive() and "error" not in box, box.get("error")
    return box["result"], infos, met


def cli_env() -> dict[str, str]:
    """The environment of a ``sampa-ray`` subprocess: an embedded Ray (no RAY_ADDRESS), one
    thread per BLAS pool, a fixed terminal width for the progress lines."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="120")
    return env


def cli_cmd(*args: str) -> list[str]:
    """``sampa-ray ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "sampa_ray.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """An embedded local Ray instance (2 CPUs) per test module that drives the backend
    in-process (gone before other modules start their own clusters). Runs started by the
    package see it is initialised and leave it running."""
    import ray

    from sampa_ray.ray.driver import start_local

    try:
        start_local(num_cpus=2)
    except Exception as err:  # noqa: BLE001
        # Ray gives a node 30 s to register with its GCS; on a loaded machine that was seen
        # to run out once (every test of the module then errs): start it once more
        if "timed out during startup" not in str(err):
            raise
        ray.shutdown()
        start_local(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real head node on loopback (`ray start --head` with the dashboard); always stopped.
    Yields the dashboard (job API) address."""
    from sampa_ray.ray.driver import GCS_RETRY_WAIT_S, GCS_WAIT_VAR

    ray_cli = str(BIN / "ray")
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           GCS_WAIT_VAR: str(GCS_RETRY_WAIT_S)}  # a loaded machine: more than Ray's 30 s
    subprocess.run([ray_cli, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    try:
        yield address
    finally:
        stop_ray_session(gcs)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def stop_ray_session(gcs_port: int, grace_s: float = 10.0) -> None:
    """Stop the Ray head whose GCS listens on ``gcs_port``, and that session alone: its
    processes (found by the session name its GCS server was started with) and everything
    below them. ``ray stop --force`` would end every Ray process on the machine, other test
    runs' and a user's own included."""
    import re
    import signal

    from sampa_ray.signals import descendants

    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    session = next((m.group(1) for pid in pids
                    if f"--gcs_server_port={gcs_port}" in (cmd := _cmdline(pid))
                    and (m := re.search(r"--session-name=(\S+)", cmd))), None)
    if session is None:
        return
    roots = [pid for pid in pids if session in _cmdline(pid) and pid != os.getpid()]
    doomed = {*roots, *(d for r in roots for d in descendants(r) or [])}
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and
                                             not _zombie(p) for p in doomed):
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:].startswith(b"Z")


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    """An asyncio event loop in a thread, like the coordinator actor's, per test module."""
    t = LoopThread()
    yield t
    t.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 and its key, written as PEM files
    ``cert.pem`` and ``key.pem`` in ``folder`` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:  # the openssl command line instead
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(key_file), "-out", str(cert_file)],
                       check=True, capture_output=True, timeout=60)
        return cert_file, key_file
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def auth_token() -> str:
    """The cluster's token (Ray's token authentication is on): $RAY_AUTH_TOKEN, else the file
    `ray start` wrote ($RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).read_text().strip()


def job_client(address: str):  # noqa: ANN201
    """A job SDK client that sends the cluster's token as a bearer header."""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {auth_token()}"}
    deadline = time.time() + 60
    while True:
        try:
            return JobSubmissionClient(address, headers=headers)
        except Exception:  # the dashboard can take a few seconds to answer
            if time.time() > deadline:
                raise
            time.sleep(1)


def submit(client, **kwargs) -> str:  # noqa: ANN001
    """Submit a job, retrying while the head's job agent is still starting (minutes on a
    loaded machine)."""
    deadline = time.time() + 180
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)


def wait_job(client, job_id: str, timeout: float = 300) -> str:  # noqa: ANN001
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status.value)
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still running after {timeout}s")


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


class LoopThread:
    """An asyncio event loop in a thread, like the coordinator actor's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def inner() -> Any:
            return fn(*args)
        return self.run(inner())

    def wait(self, fut: asyncio.Future, timeout: float = 60.0) -> Any:
        return self.run(asyncio.wait_for(asyncio.shield(fut), timeout), timeout + 5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
