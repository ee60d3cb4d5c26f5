"""Several Ray nodes on one machine (``ray.cluster_utils.Cluster``, every address on loopback):
a head without CPUs for workers and GPU nodes of 2 CPUs and 2 GPUs each. The GPUs are declared,
not real: placement treats the nodes as GPU nodes, torch sees none and the workers compute on
CPU, so every run here is bit for bit the local one. One cluster serves the module; the tests
that lose a node add the node the next one needs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    BIN,
    REPO,
    free_port,
    job_client,
    local_final,
    run_with_fault,
    submit,
    wait_job,
)

from sampa_ray.config import make_config

# each message waits 10 ms on the emulated link, so the 32 updates after the fault (seen at
# step 8: the workers report a chunk of rounds at a time) take longer than losing a node
STEPS = 40
BASE = {"algo": "sampa", "lam": 0.2, "steps": STEPS, "threads": 1, "backend": "ray",
        "checkpoint_every": 4, "eval_every": 10, "link_latency_ms": 10}
#: a GPU node: 2 GPUs (declared) and a CPU for each of the workers it may hold
NODE = {"num_cpus": 2, "num_gpus": 2, "node_ip_address": "127.0.0.1"}


# -- what the driver decides after a lost node (no cluster needed) ---------------------------
def test_the_nodes_left_hold_both_workers_or_not(tmp_path):
    """``fits``: two 1-GPU workers STRICT_SPREAD need two GPU nodes; packed on the one node
    left they need its 2 GPUs. The line of a stopped run names the node, its worker and the
    command that continues it, and offers pack only where the nodes left can hold the run."""
    import pickle

    from sampa_ray.ray.driver import node_lost_line
    from sampa_ray.ray.placement import fits, plan_placement
    from sampa_ray.ray.recovery import NodeLost

    two, head = [{"CPU": 2.0, "GPU": 2.0}] * 2, {"CPU": 0.0}
    spread = plan_placement([head, *two], 1, "auto", 1)
    assert spread.strategy == "STRICT_SPREAD" and fits(spread, [head, *two])
    assert not fits(spread, [head, two[0]])
    packed = plan_placement([head, two[0]], 1, "auto", 1)
    assert packed.strategy == "STRICT_PACK" and fits(packed, [head, two[0]])
    small = [head, {"CPU": 1.0, "GPU": 1.0}]
    assert not fits(plan_placement(small, 1, "auto", 1), small)

    lost = pickle.loads(pickle.dumps(NodeLost(["extrapolated"], "ab12", "10.0.0.7", 60.0)))
    assert str(lost) == ("node ab12 (10.0.0.7) was lost with worker extrapolated and no node "
                         "took its place within 60s")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ckpt-00000040.json").write_text("{}")
    cfg = make_config(BASE)
    line = node_lost_line(lost, cfg, out, True, 1)
    assert line == (f"{lost}; `sampa-ray train --resume {out}` continues from its checkpoint at "
                    "step 40 on the nodes left (they can hold its 2 workers; --on-node-loss "
                    "pack goes on there without stopping)")
    line = node_lost_line(lost, cfg.model_copy(update={"on_node_loss": "pack"}), out, False, 1)
    assert line.endswith("continues from its checkpoint at step 40 once the cluster has room "
                         "for its 2 workers again (--on-node-loss pack: the nodes left cannot "
                         "hold them)")


# -- on a cluster ----------------------------------------------------------------------------
class Nodes:
    """The module's cluster and its worker nodes (the tests remove and add them)."""

    def __init__(self, cluster: Any, dashboard: str) -> None:
        self.cluster = cluster
        self.dashboard = dashboard
        self.workers: list[Any] = []

    def add(self) -> Any:
        node = self.cluster.add_node(**NODE)
        self.workers.append(node)
        return node

    def remove(self, node: Any) -> None:
        """The node is gone as a lost machine is: its worker processes die with its raylet
        (left alone, a worker notices its raylet's end only later and may finish its rounds)."""
        self.workers.remove(node)
        raylet = node.all_processes["raylet"][0].process.pid
        processes = descendants(raylet)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)

    def keep(self, n: int) -> None:
        """Exactly ``n`` GPU nodes: spread over two, each holds a worker."""
        while len(self.workers) < n:
            self.add()
        while len(self.workers) > n:
            self.remove(self.workers[0])

    @property
    def ids(self) -> set[str]:
        return {n.node_id for n in self.workers}


def descendants(root: int) -> list[int]:
    """The processes below ``root`` (from /proc: each one's parent)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [root]
    while todo:
        kids = [p for p, pp in parent.items() if pp == todo[-1]]
        todo.pop()
        found += kids
        todo += kids
    return found


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory):
    """A head (the driver's node, where the coordinator goes; the job server) and two GPU
    nodes. Ray marks a node dead here after 5 failed health checks 0.5 s apart."""
    import ray
    from ray.cluster_utils import Cluster

    from sampa_ray.ray.driver import GCS_RETRY_WAIT_S, GCS_WAIT_VAR

    with pytest.MonkeyPatch.context() as mp:
        # loopback addresses everywhere: Ray's processes read the variable when they start,
        # this process read it when it imported Ray
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        mp.setenv(GCS_WAIT_VAR, str(GCS_RETRY_WAIT_S))  # a loaded machine starts slowly
        mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.delenv("RAY_ADDRESS", raising=False)
        dash = free_port()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": dash,
            "dashboard_agent_listen_port": free_port(),  # not the default, which may be taken
            "_system_config": {"health_check_period_ms": 500,
                               "health_check_failure_threshold": 5}})
        held = Nodes(cluster, f"http://127.0.0.1:{dash}")
        try:
            held.add()
            held.add()
            ray.init(address=cluster.address, logging_level="WARNING")
            yield held
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted run's final parameters and BatchNorm statistics (local backend)."""
    return local_final(make_config({**BASE, "backend": "local"}),
                       tmp_path_factory.mktemp("clean"))


def same(out: Path, ref: dict[str, Any]) -> None:
    got = torch.load(out / "final.pt", weights_only=True)
    assert torch.equal(got["x"], ref["x"])
    for k in ref["buffers"]:
        assert torch.equal(got["buffers"][k], ref["buffers"][k]), k


def on_nodes(result: dict[str, Any]) -> dict[str, str]:
    return {w["name"]: w["node_id"] for w in result["workers"]}


def test_role_groups_each_on_one_node(nodes, tmp_path):
    """--workers-per-role 2: a role group's 2 GPUs are one bundle, so the group is on one
    node; the two groups are on the two nodes."""
    from sampa_ray.ray import run_ray

    result = run_ray(make_config({**BASE, "steps": 2, "workers_per_role": 2}),
                     tmp_path / "groups")
    assert result["placement"]["mode"] == "gpu-spread"
    assert result["placement"]["bundles"] == [{"GPU": 2.0, "CPU": 2.0}] * 2
    where = on_nodes(result)
    perturbed = {where["perturbed-0"], where["perturbed-1"]}
    extrapolated = {where["extrapolated-0"], where["extrapolated-1"]}
    assert len(perturbed) == len(extrapolated) == 1 and perturbed | extrapolated == nodes.ids


def test_a_job_places_one_worker_per_role_on_each_gpu_node(nodes, tmp_path):
    """`ray job submit` to the cluster's head: the job's driver joins the cluster and places
    the two workers STRICT_SPREAD, one on each GPU node (none on the head); the job succeeds and
    its result.json is in the folder it was given."""
    client = job_client(nodes.dashboard)
    out = tmp_path / "job"
    job = submit(client, entrypoint=f"{sys.executable} -m sampa_ray.cli train --steps 2 "
                                    f"--threads 1 --eval-every 10 --out {out}",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    status = wait_job(client, job, timeout=240)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "placement: one GPU each on two GPU nodes (STRICT_SPREAD)" in logs
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and result["placement"]["strategy"] == "STRICT_SPREAD"
    where = on_nodes(result)
    assert set(where.values()) == nodes.ids and len(where) == 2  # one on each GPU node
    assert {w["device"] for w in result["workers"]} == {"cpu"}  # torch sees no GPU


def test_a_lost_node_replaced_by_another_changes_nothing(nodes, ref, tmp_path):
    """A GPU node dies mid-run (its worker with it) and another joins: Ray places the lost
    bundle there, the worker restarts on it, the rounds since the snapshot are replayed, and
    the run ends on the uninterrupted parameters, bit for bit."""
    nodes.keep(2)
    before = set(nodes.ids)
    joined: list[str] = []

    def lose_and_replace(pid: int) -> None:
        nodes.remove(nodes.workers[-1])
        joined.append(nodes.add().node_id)

    result, infos, _ = run_with_fault(make_config(BASE), tmp_path / "replaced", 6,
                                      lose_and_replace, lambda pids: [0])
    assert result["steps"] == STEPS and result["worker_restarts"] >= 1
    assert any(" restarted" in i for i in infos), infos
    where = set(on_nodes(result).values())
    assert where == nodes.ids and joined[0] in where and len(where & before) == 1
    same(tmp_path / "replaced", ref)


def test_a_lost_node_without_replacement_stops_with_the_command_that_continues(
        nodes, ref, tmp_path, capsys):
    """--on-node-loss wait (the default) and no node in the lost one's place: one line naming
    the node and its worker and the --resume command (exit 1, not a user's error); that
    command then finishes the run on the node left, on the uninterrupted parameters."""
    from sampa_ray.checkpoint import list_checkpoints
    from sampa_ray.cli import main

    nodes.keep(2)
    out = tmp_path / "stopped"
    victim: dict[str, Any] = {}

    def strike() -> None:  # once the run has a checkpoint, lose the last node
        deadline = time.time() + 120
        while not list_checkpoints(out / "checkpoints") and time.time() < deadline:
            time.sleep(0.05)
        victim["node"] = node = nodes.workers[-1]
        nodes.remove(node)

    t = threading.Thread(target=strike, daemon=True)
    t.start()
    started = time.time()
    code = main(["train", *flags(BASE), "--node-loss-wait-s", "1", "--out", str(out)])
    t.join(5)
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == 1, err[-2000:]
    lost = victim["node"].node_id
    assert line.startswith(f"sampa-ray: node {lost} (127.0.0.1) was lost with worker "), line
    assert (f"no node took its place within 1s; `sampa-ray train --resume {out}` continues "
            "from its checkpoint at step ") in line
    assert "--on-node-loss pack" in line  # the node left can hold both workers
    assert not (out / "result.json").exists()
    print(f"stopped after {time.time() - started:.1f}s")

    assert main(["train", "--resume", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["placement"]["mode"] == "gpu-pack"  # both on the node left
    assert set(on_nodes(result).values()) == nodes.ids and len(nodes.ids) == 1
    same(out, ref)


def test_a_lost_node_without_replacement_packs_onto_the_nodes_left(nodes, ref, tmp_path):
    """--on-node-loss pack: the run goes on from its newest checkpoint on the node left (both
    workers there, STRICT_PACK), says so, and ends on the uninterrupted parameters."""
    nodes.keep(2)

    def lose(pid: int) -> None:
        nodes.remove(nodes.workers[-1])

    cfg = make_config({**BASE, "on_node_loss": "pack", "node_loss_wait_s": 0.0})
    result, infos, _ = run_with_fault(cfg, tmp_path / "packed", 6, lose, lambda pids: [0])
    assert result["steps"] == STEPS
    said = [i for i in infos if "continuing on the nodes left" in i]
    assert len(said) == 1 and "(the same trajectory)" in said[0], infos
    assert (result["placement"]["mode"], result["placement"]["strategy"]) == \
        ("gpu-pack", "STRICT_PACK")
    assert set(on_nodes(result).values()) == nodes.ids and len(nodes.ids) == 1
    same(tmp_path / "packed", ref)


def flags(cfg: dict[str, Any]) -> list[str]:
    return [a for k, v in cfg.items() for a in (f"--{k.replace('_', '-')}", str(v))]
