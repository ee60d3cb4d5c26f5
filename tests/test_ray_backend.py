"""The Ray backend against the local one, on a real embedded Ray instance."""

from __future__ import annotations

import json

import pytest
import torch

from sampa_ray.config import make_config
from sampa_ray.local import run_local
from sampa_ray.ray import run_ray, run_ray_many

pytestmark = pytest.mark.usefixtures("ray_local")


def load(out):
    return torch.load(out / "final.pt", weights_only=True)


CASES = [("sgd", 0.0), ("sam", 0.0), ("sampa", 0.0), ("sampa", 0.2)]


@pytest.mark.parametrize("data_path,transport", [("points", "ray"), ("replicated", "ray"),
                                                ("collective", "ray"), ("points", "grpc")])
def test_ray_matches_local_bitwise(tmp_path, data_path, transport):
    """Same engine code, same torch thread count (1), same batches and the same update code
    (on the coordinator for 'points', on each worker's replica for 'replicated'): the
    trajectories are identical bit for bit, BatchNorm statistics included."""
    cfgs = [make_config({"algo": algo, "lam": lam, "steps": 12, "batch_size": 32,
                         "threads": 1, "momentum": 0.9, "weight_decay": 5e-4,
                         "backend": "ray", "data_path": data_path, "transport": transport})
            for algo, lam in CASES]
    remote = run_ray_many([(c, tmp_path / f"ray{i}") for i, c in enumerate(cfgs)])
    for i, cfg in enumerate(cfgs):
        local = run_local(cfg, tmp_path / f"local{i}")
        a, b = load(tmp_path / f"local{i}"), load(tmp_path / f"ray{i}")
        assert torch.equal(a["x"], b["x"]), CASES[i]
        assert a["buffers"].keys() == b["buffers"].keys()
        for k in a["buffers"]:
            assert torch.equal(a["buffers"][k], b["buffers"][k]), (CASES[i], k)
        r = remote[i]
        assert local["final_test_accuracy"] == r["final_test_accuracy"]
        assert r["backend"] == "ray" and r["placement"]["mode"] == "cpu"
        assert r["transport"] == transport and r["data_path"] == data_path
        if data_path == "collective":  # SAMPa's two workers formed a gloo group on CPU
            assert r["collective"] == {"backend": "gloo" if cfg.algo == "sampa" else None,
                                       "fallback": None}
        assert r["gradient_rounds"] == local["gradient_rounds"] and r["steps"] == 12
        assert [e["test_accuracy"] for e in r["epochs"]] == \
            [e["test_accuracy"] for e in local["epochs"]]
    # the runs moved, and differ between algorithms: not trivially equal vectors
    xs = [load(tmp_path / f"ray{i}")["x"] for i in range(len(CASES))]
    assert all(not torch.equal(xs[0], x) for x in xs[1:])


@pytest.mark.parametrize("data_path,transport", [("points", "ray"), ("replicated", "ray"),
                                                ("collective", "ray"), ("points", "grpc")])
def test_bf16_wire_matches_local_bitwise_with_half_the_bytes(tmp_path, data_path, transport):
    """A bf16 wire rounds each gradient once, where it is computed: every data path applies the
    same values as a local run with the same setting, and each gradient takes half the bytes."""
    base = {"algo": "sampa", "lam": 0.2, "steps": 8, "batch_size": 32, "threads": 1,
            "backend": "ray", "data_path": data_path, "transport": transport}
    runs = [(make_config({**base, "wire_dtype": w}), tmp_path / f"ray-{w}")
            for w in ("bf16", "fp32")]
    r16, r32 = run_ray_many(runs)
    local = run_local(runs[0][0], tmp_path / "local")
    assert torch.equal(load(tmp_path / "local")["x"], load(tmp_path / "ray-bf16")["x"])
    assert local["final_test_accuracy"] == r16["final_test_accuracy"]
    n = r16["num_params"]
    assert r16["timings"]["gradient_bytes"] == 2 * n
    assert r32["timings"]["gradient_bytes"] == 4 * n
    assert local["timings"]["gradient_bytes"] is None  # nothing travelled
    # not the fp32 trajectory, but close to it after 8 updates
    x16, x32 = load(tmp_path / "ray-bf16")["x"], load(tmp_path / "ray-fp32")["x"]
    assert not torch.equal(x16, x32)
    x0 = load(tmp_path / "local")["x"]  # scale: how far the run moved
    assert float((x16 - x32).norm()) < 0.05 * float(x0.norm())


def test_collective_runs_after_a_grouped_run_on_the_same_actors(tmp_path):
    """SAMPa forms the workers' group; SGD and SAM after it on the same actors use one worker
    and must not try to exchange with the idle one (they would wait for it forever)."""
    base = {"lam": 0.2, "steps": 5, "batch_size": 32, "threads": 1, "backend": "ray",
            "data_path": "collective"}
    cfgs = [make_config({**base, "algo": a}) for a in ("sampa", "sgd", "sam", "sampa")]
    res = run_ray_many([(c, tmp_path / f"ray{i}") for i, c in enumerate(cfgs)])
    assert [r["collective"]["backend"] for r in res] == ["gloo", None, None, "gloo"]
    for i, c in enumerate(cfgs):
        run_local(c, tmp_path / f"local{i}")
        assert torch.equal(load(tmp_path / f"local{i}")["x"], load(tmp_path / f"ray{i}")["x"])


def test_collective_without_a_group_falls_back_to_the_object_store(tmp_path):
    """NCCL asked for on a CPU-only machine: the group cannot be formed, the run says why once
    and moves the gradients through Ray's object store instead, on the same trajectory."""
    events = []
    cfg = make_config({"algo": "sampa", "lam": 0.2, "steps": 6, "batch_size": 32,
                       "threads": 1, "backend": "ray", "data_path": "collective",
                       "collective_backend": "nccl"})
    r = run_ray(cfg, tmp_path / "ray", progress=events.append)
    run_local(cfg, tmp_path / "local")
    assert torch.equal(load(tmp_path / "local")["x"], load(tmp_path / "ray")["x"])
    assert r["collective"]["backend"] is None and "nccl" in r["collective"]["fallback"].lower()
    said = [e["text"] for e in events if e.get("kind") == "info"
            and e["text"].startswith("collective:")]
    assert len(said) == 1 and "object store" in said[0], said


def test_replicas_agree_and_resume(tmp_path):
    """The replicated path checkpoints the replica's state; resuming a copy from the middle
    reaches the uninterrupted run's parameters bit for bit."""
    import json
    import shutil

    from sampa_ray.checkpoint import list_checkpoints

    cfg = make_config({"algo": "sampa", "lam": 0.2, "steps": 14, "batch_size": 32,
                       "threads": 1, "backend": "ray", "data_path": "replicated",
                       "checkpoint_every": 5, "keep_checkpoints": 5})
    run_ray(cfg, tmp_path / "full")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints", part / "checkpoints")
    for p in list_checkpoints(part / "checkpoints"):
        if json.loads(p.read_text())["step"] > 5:
            p.unlink()
    run_ray(cfg.model_copy(update={"resume": str(part)}), part)
    assert torch.equal(load(tmp_path / "full")["x"], load(part)["x"])


def test_sampa_workers_compute_at_the_same_time(tmp_path):
    """In a SAMPa round the perturbed and extrapolated gradients run on two processes at once:
    their compute intervals (recorded by each worker) overlap."""
    cfg = make_config({"algo": "sampa", "model": "resnet20", "dataset": "synthetic",
                       "synthetic_size": 256, "batch_size": 32, "steps": 8, "threads": 1,
                       "backend": "ray"})
    result = run_ray(cfg, tmp_path)
    rounds: dict[int, dict[str, tuple[float, float]]] = {}
    for t in result["trace"]:
        rounds.setdefault(t["round"], {})[t["role"]] = (t["start"], t["end"])
    pairs = [r for r in rounds.values() if len(r) == 2]
    assert len(pairs) == 8  # every round after the bootstrap has both roles
    overlaps = []
    for r in pairs:
        (s1, e1), (s2, e2) = r["perturbed"], r["extrapolated"]
        overlaps.append(max(0.0, min(e1, e2) - max(s1, s2)) / max(e1 - s1, e2 - s2))
    # each worker has its own CPU: most of the shorter interval lies inside the longer one
    assert sum(o > 0.3 for o in overlaps) >= 6, overlaps
    pids = {w["pid"] for w in result["workers"]}
    assert len(pids) == 2


def test_same_actors_for_all_algorithms(tmp_path):
    """compare's path: three runs on one coordinator and one pair of workers, each from the same
    initial state, giving what separate runs give."""
    base = make_config({"steps": 6, "batch_size": 32, "threads": 1, "backend": "ray"})
    runs = [(base.model_copy(update={"algo": a}), tmp_path / a) for a in ("sgd", "sam", "sampa")]
    results = run_ray_many(runs)
    assert [r["gradient_rounds"] for r in results] == [6, 12, 7]
    assert len({tuple(w["pid"] for w in r["workers"]) for r in results}) == 1
    alone = run_ray(base.model_copy(update={"algo": "sampa"}), tmp_path / "alone")
    assert torch.equal(load(tmp_path / "sampa")["x"], load(tmp_path / "alone")["x"])
    assert alone["final_test_accuracy"] == results[2]["final_test_accuracy"]
    saved = json.loads((tmp_path / "sam" / "result.json").read_text())
    assert saved["config"]["algo"] == "sam" and saved["steps"] == 6
    timings = saved["timings"]["workers"]
    assert set(timings) == {"ascent", "perturbed"}  # SAM's two rounds, both on worker 0
    assert timings["ascent"]["compute"]["mean"] > 0


def test_worker_side_data_error_is_one_line(tmp_path):
    from sampa_ray.errors import UserError

    cfg = make_config({"dataset": "cifar10", "data_dir": str(tmp_path / "nowhere"),
                       "model": "resnet20", "backend": "ray", "steps": 2})
    with pytest.raises(UserError, match=r"^cifar10: .*nowhere") as info:
        run_ray(cfg, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "result.json").exists()
