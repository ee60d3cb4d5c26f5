"""Beyond two devices (``workers_per_role`` k, ``data_parallel``, ``sync_bn``) on a real
embedded Ray instance: each role's gradient computed by a group of k workers on shards of the
batch and summed over torch.distributed (gloo here) must give the trajectory one worker per role
gives, to rounding: final parameters within 1e-5 relative after 25 steps of the local run (which
the Ray backend matches bit for bit with one worker per role, test_ray_backend)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import local_final, run_with_fault

from sampa_ray.config import make_config
from sampa_ray.preflight import check_plugins
from sampa_ray.ray import run_ray_many
from sampa_ray.ray.placement import (
    broadcast_fans,
    plan_placement,
    role_groups,
    worker_names,
)

pytestmark = pytest.mark.usefixtures("ray_local")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 25
TOL = 1e-5
MLP = {"model": "mlp", "steps": STEPS, "batch_size": 32, "threads": 1, "lam": 0.2,
       "momentum": 0.9, "weight_decay": 5e-4}
#: the example plug-ins: an MLP with BatchNorm, items augmented at random, a DataLoader
MY_TASK = {"model": "my_task:build", "dataset": "my_task:load", "loss": "my_task:loss",
           "steps": STEPS, "batch_size": 30, "threads": 1, "algo": "sampa", "lam": 0.2,
           "lr": 0.05, "momentum": 0.9}
TRANSFORMER = {"model": "transformer", "dataset": "modadd", "dataset_args": {"p": 23},
               "model_args": {"d_model": 32, "heads": 4, "layers": 1}, "steps": STEPS,
               "batch_size": 32, "threads": 1, "algo": "sampa", "optimizer": "adamw",
               "lr": 3e-3, "weight_decay": 0.1, "lam": 0.2}

#: k = 2 (4 workers): key -> (settings, the k = 1 reference's settings)
GROUPED = {
    ("mlp", "sgd", "replicated"): {**MLP, "algo": "sgd", "data_path": "replicated"},
    ("mlp", "sam", "replicated"): {**MLP, "algo": "sam", "data_path": "replicated"},
    ("mlp", "sampa", "replicated"): {**MLP, "algo": "sampa", "data_path": "replicated"},
    ("mlp", "sam", "collective"): {**MLP, "algo": "sam", "data_path": "collective"},
    ("mlp", "sampa", "collective"): {**MLP, "algo": "sampa", "data_path": "collective"},
    ("mlp", "sampa", "free"): {**MLP, "algo": "sampa", "data_path": "free"},
    ("mlp", "sampa", "points"): {**MLP, "algo": "sampa", "data_path": "points"},
    ("mlp", "sam-ddp", "replicated"): {**MLP, "algo": "sam", "data_path": "replicated",
                                       "data_parallel": True},
    ("mlp", "sam-ddp", "free"): {**MLP, "algo": "sam", "data_path": "free",
                                 "data_parallel": True},
}
SYNCED = {
    ("my_task", "sync_bn"): {**MY_TASK, "sync_bn": True},
    ("my_task", "shard_bn"): {**MY_TASK, "sync_bn": False},
}
#: k = 1 with data_parallel: SGD and SAM over both workers
DATA_PARALLEL = {
    ("mlp", "sgd-ddp"): {**MLP, "algo": "sgd", "data_parallel": True},
    ("mlp", "sam-ddp"): {**MLP, "algo": "sam", "data_parallel": True},
}


def _ray(runs: dict, root: Path, k: int) -> dict:
    cfgs = {key: make_config({**s, "backend": "ray", "workers_per_role": k})
            for key, s in runs.items()}
    for cfg in cfgs.values():
        if ":" in cfg.model:  # the driver resolves the plug-ins it ships (preflight does)
            check_plugins(cfg)
    outs = {key: root / "-".join(key) for key in runs}
    results = run_ray_many([(cfgs[key], outs[key]) for key in runs])
    return {key: (r, torch.load(outs[key] / "final.pt", weights_only=True))
            for key, r in zip(runs, results, strict=True)}


def _local(settings: dict, out: Path) -> dict:
    plain = {k: v for k, v in settings.items() if k not in ("data_path", "data_parallel",
                                                            "sync_bn")}
    return local_final(make_config({**plain, "backend": "local"}), out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    sys.path.insert(0, str(EXAMPLES))
    try:
        got = {**_ray(GROUPED, root / "k2", 2), **_ray(SYNCED, root / "k2-bn", 2),
               **_ray({("transformer", "sampa-adamw"): TRANSFORMER}, root / "k2-tf", 2),
               **_ray(DATA_PARALLEL, root / "dp", 1)}
        refs: dict = {}
        for key, s in {**GROUPED, **SYNCED, **DATA_PARALLEL,
                       ("transformer", "sampa-adamw"): TRANSFORMER}.items():
            algo = s["algo"]
            name = (key[0], algo)
            if name not in refs:
                refs[name] = _local(s, root / "local" / "-".join(name))
        return got, refs
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.parametrize("key", list(GROUPED))
def test_two_workers_per_role_match_one(runs, key):
    got, refs = runs
    result, final = got[key]
    ref = refs[(key[0], GROUPED[key]["algo"])]
    assert result["steps"] == STEPS
    assert _rel(final["x"], ref["x"]) <= TOL
    assert not torch.equal(final["x"], ref["x"])  # sums of shards: rounding differs
    groups = result["role_groups"]
    assert groups["workers_per_role"] == 2 and groups["backend"] == "gloo"
    if key[1] == "sampa":
        assert groups["groups"] == {"0": ["perturbed-0", "perturbed-1"],
                                    "1": ["extrapolated-0", "extrapolated-1"]}
    elif key[1] == "sam-ddp":
        assert groups["groups"] == {"0": worker_names(2)}
    else:
        assert groups["groups"] == {"0": ["perturbed-0", "perturbed-1"]}
    n = result["num_params"]
    for role, bytes_ in result["timings"]["allreduce_bytes"].items():
        assert bytes_ == 4 * n, role  # the whole fp32 gradient, once per worker
        stat = result["timings"]["workers"][role]["allreduce"]
        assert stat["count"] > 0 and stat["max"] > 0


def test_the_paths_agree_with_each_other(runs):
    """The shard sums are the same numbers whichever path carries the result."""
    got, _ = runs
    x = {p: got[("mlp", "sampa", p)][1]["x"] for p in ("replicated", "collective", "points")}
    assert torch.equal(x["replicated"], x["collective"])
    assert torch.equal(x["replicated"], x["points"])


def test_sync_bn_matches_one_worker_and_shard_statistics_do_not(runs):
    """With BatchNorm the shards' own statistics make a different gradient (as in
    DistributedDataParallel); synchronised BatchNorm gives the whole batch's, parameters and
    running statistics alike. The plug-in's DataLoader reads only its shard's items, seeded
    by their positions in the whole batch."""
    got, refs = runs
    ref = refs[("my_task", "sampa")]
    _, synced = got[("my_task", "sync_bn")]
    _, sharded = got[("my_task", "shard_bn")]
    assert _rel(synced["x"], ref["x"]) <= TOL
    for name, b in ref["buffers"].items():
        if b.is_floating_point():
            assert _rel(synced["buffers"][name], b) <= TOL, name
        else:
            assert torch.equal(synced["buffers"][name], b), name
    assert _rel(sharded["x"], ref["x"]) > 1e-3


def test_transformer_with_adamw_matches_one_worker(runs):
    got, refs = runs
    result, final = got[("transformer", "sampa-adamw")]
    assert _rel(final["x"], refs[("transformer", "sampa")]["x"]) <= TOL
    assert result["config"]["optimizer"] == "adamw"


@pytest.mark.parametrize("key", list(DATA_PARALLEL))
def test_data_parallel_over_two_workers_matches_one(runs, key):
    got, refs = runs
    result, final = got[key]
    assert _rel(final["x"], refs[(key[0], DATA_PARALLEL[key]["algo"])]["x"]) <= TOL
    assert result["role_groups"]["groups"] == {"0": ["perturbed", "extrapolated"]}
    assert result["role_groups"]["data_parallel"] is True


def test_role_groups_and_placement():
    assert worker_names(1) == ["perturbed", "extrapolated"]
    assert role_groups([0, 1], 3) == {0: [0, 1, 2], 1: [3, 4, 5]}
    assert role_groups([0], 2) == {0: [0, 1]}
    assert role_groups([0], 2, data_parallel=True) == {0: [0, 1, 2, 3]}
    # a role's gradient goes from its group's first rank to the other role's workers only
    assert broadcast_fans(role_groups([0, 1], 2)) == {0: [0, 2, 3], 1: [0, 1, 2]}
    assert broadcast_fans(role_groups([0, 1], 3)) == {0: [0, 3, 4, 5], 1: [0, 1, 2, 3]}
    assert broadcast_fans(role_groups([0, 1], 1)) == {}  # the whole world already
    assert broadcast_fans(role_groups([0], 2, data_parallel=True)) == {}  # nothing to send
    # two nodes with 4 GPUs each: a role group of 4 on each (STRICT_SPREAD)
    pl = plan_placement([{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}], 4, "auto", None)
    assert (pl.mode, pl.strategy) == ("gpu-spread", "STRICT_SPREAD")
    assert pl.bundles == [{"GPU": 4.0, "CPU": 32.0}] * 2
    assert pl.bundle_of == [0, 0, 0, 0, 1, 1, 1, 1] and pl.cpus_per_worker == 8.0
    # one node with 8 GPUs: both groups on it
    pl = plan_placement([{"CPU": 16, "GPU": 8}], 4, "auto", None)
    assert (pl.mode, pl.strategy, pl.bundle_of) == ("gpu-pack", "STRICT_PACK",
                                                    [0, 0, 0, 0, 1, 1, 1, 1])
    # four nodes of 2 GPUs for k = 4: no node holds a group; one bundle per worker
    pl = plan_placement([{"CPU": 8, "GPU": 2}] * 4, 4, "auto", None)
    assert pl.mode == "gpu-each" and len(pl.bundles) == 8
    # one GPU, 4 workers: a quarter each
    pl = plan_placement([{"CPU": 8, "GPU": 1}], 2, "auto", None)
    assert pl.mode == "gpu-shared" and pl.gpus_per_worker == 0.25
    # 2 CPUs, 4 workers of one thread: half a CPU each
    pl = plan_placement([{"CPU": 2}], 2, "auto", None)
    assert pl.bundles == [{"CPU": 0.5}] * 4 and pl.threads == 1
    assert pl.cpus_per_worker == 0.5


def test_a_killed_member_of_a_role_group_is_replaced_and_the_result_is_unchanged(runs,
                                                                                 tmp_path):
    """perturbed-1 SIGKILLed mid-run: its group's all-reduce breaks, Ray restarts it, the
    workers' process group forms anew and the rounds since the snapshot are replayed; the
    result is the uninterrupted run's, bit for bit. (An emulated 60 ms link makes the run
    long enough to be hit; it changes no number.)"""
    got, _ = runs
    _, clean = got[("mlp", "sampa", "replicated")]
    cfg = make_config({**GROUPED[("mlp", "sampa", "replicated")], "backend": "ray",
                       "workers_per_role": 2, "link_latency_ms": 60.0})
    result, infos, pids = run_with_fault(cfg, tmp_path / "faulty", 8,
                                         lambda pid: os.kill(pid, signal.SIGKILL),
                                         lambda pids: [pids["perturbed-1"]])
    assert result["steps"] == STEPS
    assert result["worker_restarts"] >= 1 and result["retried_rounds"] >= 1
    assert any("worker perturbed-1 restarted" in i for i in infos)
    assert next(w["pid"] for w in result["workers"]
                if w["name"] == "perturbed-1") != pids["perturbed-1"]
    got_x = torch.load(tmp_path / "faulty" / "final.pt", weights_only=True)["x"]
    assert torch.equal(got_x, clean["x"])
