"""Deployment files: docker-compose.yml against the Compose specification, the Dockerfile, the
Prometheus / Grafana / KubeRay / cluster-launcher files, and every entrypoint they name against
the real command line."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import BIN, REPO

from sampa_ray.cli import build_parser, config_from_args
from sampa_ray.telemetry.metrics import exported_series_names

COMPOSE = REPO / "docker-compose.yml"
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sampa-communication.json"
METRICS_PORT = 9400
#: images pulled from a public registry: a name and a pinned tag (never ``latest``)
PUBLIC_IMAGE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*"
                          r":(?!latest$)[\w][\w.-]{0,127}$")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: an override file's ``!reset`` / ``!override`` tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor(
    "!override", lambda loader, node: (loader.construct_sequence(node, deep=True)
                                       if isinstance(node, yaml.SequenceNode)
                                       else loader.construct_mapping(node, deep=True)))


def with_defaults(value: str) -> str:
    """``value`` with each ``${VAR:-default}`` as Compose interpolates it when VAR is unset."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", value)


def rayjob() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayjob.yaml").read_text()))


# -- docker-compose.yml -------------------------------------------------------------------------
def test_compose_validates_against_the_compose_specification():
    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema, format_checker=jsonschema.FormatChecker())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose())]
    assert not errors, errors
    # the schema is not vacuous: a typo'd service key is refused
    broken = copy.deepcopy(compose())
    broken["services"]["ray-head"]["comand"] = "x"
    assert list(validator.iter_errors(broken))


def test_compose_images_are_built_here_or_named_public_images():
    services = compose()["services"]
    built = {s["image"] for s in services.values() if "build" in s and "image" in s}
    for name, svc in services.items():
        if "build" in svc:
            build = svc["build"]
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                                "Dockerfile")
            assert (context / dockerfile).is_file(), name
        else:
            image = svc.get("image", "")
            assert image in built or PUBLIC_IMAGE.match(image), (name, image)
    assert {"ray-head", "ray-worker-1", "ray-worker-2", "prometheus", "grafana",
            "submit"} <= set(services)


def _host_side(volume: Any) -> tuple[str, str]:
    """(kind, source) of a service volume in short or long syntax."""
    if isinstance(volume, dict):
        return volume.get("type", "volume"), volume.get("source", "")
    source = volume.split(":")[0]
    kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    return kind, source


def test_compose_mounts_exist_and_named_volumes_are_declared():
    doc = compose()
    declared = set(doc.get("volumes") or {})
    mounted = 0
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            kind, source = _host_side(vol)
            if kind == "bind":
                assert source.startswith("./"), (name, source)  # inside the repository
                assert (REPO / source).exists(), (name, source)
                mounted += 1
            else:
                assert source in declared, (name, source)
    assert mounted >= 3


def _published(port: Any) -> int | None:
    """The host port of a ports entry (short or long syntax)."""
    if isinstance(port, dict):
        return int(port["published"]) if "published" in port else None
    parts = str(port).split("/")[0].split(":")
    return int(parts[-2]) if len(parts) >= 2 else None


def test_compose_ports_are_unique_and_on_loopback():
    published = []
    for svc in compose()["services"].values():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), p
            published.append(_published(p))
    assert None not in published
    assert len(published) == len(set(published)), published
    assert METRICS_PORT in published


def test_prometheus_and_grafana_point_at_the_compose_services():
    doc = compose()
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    assert f"ray-head:{METRICS_PORT}" in targets
    for target in targets:
        assert target.split(":")[0] in doc["services"], target
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" /
                         "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in doc["services"]
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" /
                                "sampa.yml").read_text())["providers"]
    grafana_mounts = dict(v.split(":")[:2] for v in doc["services"]["grafana"]["volumes"])
    assert grafana_mounts["./deploy/grafana/dashboards"] == providers[0]["options"]["path"]
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]}


def test_promtool_checks_the_deploy_config(tmp_path):
    """The full check (promtool also opens the files the config names): the token file that
    compose mounts as a secret is stood in for by one in a temporary folder."""
    import shutil

    assert shutil.which("promtool"), "promtool missing: scripts/setup.sh installs prometheus"
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    secret = "/run/secrets/sampa_token"
    assert f"credentials_file: {secret}" in text  # the coordinator's endpoint wants the token
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert "sampa_token" in doc["services"]["prometheus"]["secrets"]
    assert doc["secrets"]["sampa_token"] == {"environment": "RAY_AUTH_TOKEN"}
    (tmp_path / "token").write_text("t0ken\n")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(text.replace(secret, str(tmp_path / "token")))
    r = subprocess.run(["promtool", "check", "config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- Dockerfile ---------------------------------------------------------------------------------
def test_dockerfile_builds_from_a_chosen_base_with_a_chosen_torch():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r'^ARG TORCH_SPEC="torch==2\.13\.0"$', text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
            assert path not in ignored, path
    assert {".venv", ".git", "runs"} <= ignored


# -- manifests ----------------------------------------------------------------------------------
def test_every_manifest_parses():
    files = [COMPOSE, *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
    assert len(files) >= 6
    for f in files:
        docs = list(yaml.load_all(f.read_text(), Loader=ComposeLoader))
        assert docs and all(isinstance(d, dict) for d in docs), f


def test_rayjob_has_a_head_and_two_gpu_pods_of_one_role_group_each():
    job, service = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "sampa-metrics", "containerPort": METRICS_PORT} in head["ports"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]["containers"][0]
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert group["rayStartParams"]["num-gpus"] == str(gpus)
    # one pod per role group: the placement packs a group of k on one node, the two apart
    cfg = config_from_args(build_parser().parse_args(
        shlex.split(spec["entrypoint"])[1:]))
    assert cfg.workers_per_role == gpus == 2
    from sampa_ray.ray.placement import plan_placement

    pods = [{"CPU": 16.0, "GPU": float(gpus)}] * group["replicas"]
    placement = plan_placement([{"CPU": 4.0}, *pods], cfg.workers_per_role, cfg.device, None)
    assert (placement.mode, placement.strategy) == ("gpu-spread", "STRICT_SPREAD")
    assert service["kind"] == "Service"
    assert service["spec"]["ports"][0]["port"] == METRICS_PORT
    head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= head_labels.items()


def test_ray_cluster_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert len(config["provider"]["worker_ips"]) == 2
    assert any("--num-gpus=1" in c for c in config["worker_start_ray_commands"])


# -- entrypoints against the real command line --------------------------------------------------
def entrypoints() -> dict[str, list[str]]:
    """The ``sampa-ray train ...`` command lines the deployment files run, as argv lists."""
    submit = compose()["services"]["submit"]["command"]
    assert isinstance(submit, list) and submit[:3] == ["ray", "job", "submit"]
    out = {"docker-compose.yml": [with_defaults(a) for a in submit[submit.index("--") + 1:]],
           "rayjob.yaml": shlex.split(rayjob()[0]["spec"]["entrypoint"])}
    found = re.findall(r"^#\s+(sampa-ray train .*)$", (DEPLOY / "ray-cluster.yaml").read_text(),
                       re.M)
    assert len(found) == 1
    out["ray-cluster.yaml"] = shlex.split(found[0])
    return out


@pytest.mark.parametrize("where", ["docker-compose.yml", "rayjob.yaml", "ray-cluster.yaml"])
def test_entrypoint_is_accepted_by_the_cli(where):
    argv = entrypoints()[where]
    assert argv[:2] == ["sampa-ray", "train"]
    args = build_parser().parse_args(argv[1:])
    cfg = config_from_args(args)
    assert cfg.backend == "ray"
    assert cfg.metrics_port == METRICS_PORT and cfg.metrics_host == "0.0.0.0"
    assert cfg.out and cfg.out.startswith("/runs/")


def test_entrypoint_flags_appear_in_the_installed_cli_help():
    r = subprocess.run([str(BIN / "sampa-ray"), "train", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for where, argv in entrypoints().items():
        for flag in (a for a in argv if a.startswith("--")):
            assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", r.stdout), (where, flag)


# -- the Grafana dashboard ----------------------------------------------------------------------
def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        exprs.append(var["query"]["query"])
    return exprs


def test_dashboard_uses_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "SAMPa — communication cost"
    exported = exported_series_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    used = set()
    for e in exprs:
        names = set(re.findall(r"\b(sampa_\w+)", e))
        assert names, e
        assert names <= exported, (e, names - exported)
        used |= names
    # what the dashboard is for: every part of a round, bytes, speedup, share, loss, accuracy
    for name in ("sampa_worker_compute_seconds_sum", "sampa_worker_copy_seconds_sum",
                 "sampa_transfer_seconds_sum", "sampa_wait_seconds_sum",
                 "sampa_update_seconds_sum", "sampa_transfer_bytes_total",
                 "sampa_speedup_vs_sequential", "sampa_communication_share", "sampa_loss",
                 "sampa_accuracy"):
        assert name in used, name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_files_are_where_compose_mounts_them():
    root = DEPLOY / "grafana" / "provisioning"
    assert (root / "datasources" / "prometheus.yml").is_file()
    assert (root / "dashboards" / "sampa.yml").is_file()
    assert Path(DASHBOARD).is_file()
