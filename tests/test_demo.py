"""scripts/demo.sh without Docker: the compose files it stacks name the services, images and
variables it uses, the Prometheus image of Debian's package takes the command the compose file
gives it, and with no Docker daemon to be had the script skips in one line with its own exit
code. (The demo itself runs in .ci/run, where a daemon can be started.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from test_deploy import ComposeLoader, with_defaults

from sampa_ray.cli import build_parser, config_from_args

SCRIPT = REPO / "scripts" / "demo.sh"
NO_HUB = REPO / "deploy" / "compose.no-hub.yml"
DEMO = REPO / "deploy" / "compose.demo.yml"
SKIPPED = 3


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def script() -> str:
    return SCRIPT.read_text()


def script_var(name: str) -> str:
    m = re.search(rf"^{name}=(\S+)", script(), re.M)
    assert m, name
    return m.group(1)


def script_array(name: str) -> list[str]:
    m = re.search(rf"^{name}=\(([^)]*)\)", script(), re.M)
    assert m, name
    return m.group(1).split()


def test_the_script_starts_services_of_the_compose_file_and_leaves_no_port_published():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    started = script_array("SERVICES")
    assert started == ["ray-head", "ray-worker-1", "ray-worker-2", "prometheus"]
    assert set(started) <= set(services)
    assert "grafana" in services and "up -d --no-build submit" in script()
    # the demo override resets the ports of every service the demo starts that publishes one
    publishing = {name for name in [*started, "submit"] if services[name].get("ports")}
    reset = load(DEMO)["services"]
    assert publishing and set(reset) == publishing
    assert all(svc == {"ports": None} for svc in reset.values())  # `!reset []`, nothing else
    assert re.search(r"ports: !reset \[\]", DEMO.read_text())


def test_the_no_hub_override_builds_the_prometheus_image_the_script_builds():
    prom = load(NO_HUB)["services"]["prometheus"]
    assert set(load(NO_HUB)["services"]) == {"prometheus"}
    tag = prom["image"]
    assert tag != yaml.safe_load((REPO / "docker-compose.yml").read_text())[
        "services"]["prometheus"]["image"]
    context = REPO / prom["build"]["context"]
    assert (context / "Dockerfile").is_file()
    assert f"-t {tag}" in script() and "deploy/prometheus" in script()
    # the same local base: the override's default and the image the script makes
    assert with_defaults(prom["build"]["args"]["BASE_IMAGE"]) == script_var("BASE_LOCAL")
    assert re.search(r"^ARG BASE_IMAGE=", (context / "Dockerfile").read_text(), re.M)


def test_the_ray_image_the_script_builds_is_the_one_compose_runs():
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    images = {doc["services"][s]["image"] for s in
              ("ray-head", "ray-worker-1", "ray-worker-2", "submit")}
    assert images == {"sampa-ray:local"}
    assert "docker build --network host -t sampa-ray:local" in script()
    # the build argument the script passes for a local torch wheel is one the Dockerfile takes
    dockerfile = (REPO / "Dockerfile").read_text()
    for arg in re.findall(r'--build-arg "([A-Z_]+)=', script()):
        assert re.search(rf"^ARG {arg}\b", dockerfile, re.M), arg


def test_the_demo_size_variables_shorten_the_job_and_default_to_the_documented_one():
    submit = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["submit"]
    argv = submit["command"][submit["command"].index("--") + 1:]
    read = set(re.findall(r"\$\{(SAMPA_DEMO_[A-Z_]+):-", " ".join(argv)))
    exported = set(re.findall(r"^export (SAMPA_DEMO_[A-Z_]+)=", script(), re.M))
    assert read == exported == {"SAMPA_DEMO_EPOCHS", "SAMPA_DEMO_SYNTHETIC_SIZE"}

    def cfg(env: dict[str, str]):
        args = [re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda m: env.get(m[1], m[2]), a)
                for a in argv]
        return config_from_args(build_parser().parse_args(args[1:]))

    default = cfg({})
    assert (default.epochs, default.synthetic_size) == (20, 4096)
    documented = (REPO / "deploy" / "README.md").read_text()
    assert "--synthetic-size 4096" in documented and "--epochs 20" in documented
    short = cfg({"SAMPA_DEMO_EPOCHS": "2", "SAMPA_DEMO_SYNTHETIC_SIZE": "1024"})
    assert (short.epochs, short.synthetic_size) == (2, 1024)


def test_debian_prometheus_takes_the_compose_command():
    """The image of Debian's package runs the prometheus binary with the compose file's flags;
    the package is the one on this machine (scripts/setup.sh installs it)."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("no prometheus binary here")
    dockerfile = (REPO / "deploy" / "prometheus" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/prometheus"]' in dockerfile
    assert "apt-get install -y --no-install-recommends prometheus" in dockerfile
    command = yaml.safe_load((REPO / "docker-compose.yml").read_text())[
        "services"]["prometheus"]["command"]
    r = subprocess.run([prometheus, "--help"], capture_output=True, text=True, timeout=60)
    flags = r.stdout + r.stderr
    for arg in command:
        flag = arg.split("=")[0]
        assert re.search(rf"\s{re.escape(flag)}[=\s]", flags), flag


def test_with_no_daemon_to_be_had_the_script_skips_in_one_line(tmp_path):
    """No daemon answers and the user is not root: one line and exit code 3, no trace, no
    phase times, and no temporary folder left behind."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\n"
                                  "exit 1\n")
    (stubs / "id").write_text("#!/bin/sh\necho 1000\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                       env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == SKIPPED, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("demo: == ")]
    assert lines == ["demo: skipped: no Docker daemon answers, and starting one needs root"]
    assert r.stderr == ""
    assert not list(tmp_path.glob("sampa-demo.*"))
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/demo.sh" in ci and re.search(rf"\b{SKIPPED}\)", ci)
