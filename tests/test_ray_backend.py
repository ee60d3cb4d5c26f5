"""The Ray backend against the local one, on a real embedded Ray instance."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_final, keep_checkpoints_upto, load_final

from sampa_ray.checkpoint import list_checkpoints, load_checkpoint
from sampa_ray.config import make_config
from sampa_ray.events import InfoEvent
from sampa_ray.local import run_local
from sampa_ray.ray import run_ray, run_ray_many

pytestmark = pytest.mark.usefixtures("ray_local")


#: the built-ins, then the variants (LookSAM k=3: SAM's round on updates 0, 3, 6, 9; RST: on
#: the updates its seeded draws pick, which every replica draws alike)
CASES = [("sgd", 0.0), ("sam", 0.0), ("sampa", 0.0), ("sampa", 0.2), ("looksam", 0.0),
         ("rst", 0.0), ("asam", 0.0)]
ARGS = {"looksam": {"k": 3}}
PATHS = [("points", "ray"), ("replicated", "ray"), ("collective", "ray"), ("free", "ray"),
         ("points", "grpc")]
WIRES = ("bf16", "fp32")
GROUPED = ("sampa", "sgd", "sam", "sampa")
ALGOS = ("sgd", "sam", "sampa")


def bitwise_cfg(algo, lam, data_path, transport):
    return make_config({"algo": algo, "lam": lam, "steps": 12, "batch_size": 32, "threads": 1,
                        "momentum": 0.9, "weight_decay": 5e-4, "backend": "ray",
                        "data_path": data_path, "transport": transport,
                        "algo_args": ARGS.get(algo, {})})


def bf16_cfg(wire, data_path, transport):
    return make_config({"algo": "sampa", "lam": 0.2, "steps": 8, "batch_size": 32, "threads": 1,
                        "backend": "ray", "data_path": data_path, "transport": transport,
                        "wire_dtype": wire})


def grouped_cfg(algo):
    return make_config({"algo": algo, "lam": 0.2, "steps": 5, "batch_size": 32, "threads": 1,
                        "backend": "ray", "data_path": "collective"})


def same_actors_cfg(algo):
    return make_config({"algo": algo, "steps": 6, "batch_size": 32, "threads": 1,
                        "backend": "ray"})


REPLICATED = make_config({"algo": "sampa", "lam": 0.2, "steps": 14, "batch_size": 32,
                          "threads": 1, "backend": "ray", "data_path": "replicated",
                          "checkpoint_every": 5, "keep_checkpoints": 5})
#: the free path's chunks end at epochs (every other one evaluated), checkpoints by count and
#: the end: 44 batches an epoch
FREE = make_config({"algo": "sampa", "lam": 0.2, "steps": 92, "batch_size": 32, "threads": 1,
                    "backend": "ray", "data_path": "free", "eval_every": 2,
                    "checkpoint_every": 20, "keep_checkpoints": 10})


def planned(transport):
    """The runs on one transport's actors, in order: key -> config. The grouped sequence comes
    first (SAMPa forms the workers' group on fresh actors), then every data path as the bench
    runs them."""
    runs = {}
    if transport == "ray":
        runs.update({("grouped", i): grouped_cfg(a) for i, a in enumerate(GROUPED)})
    for data_path, tr in PATHS:
        if tr == transport:
            runs.update({("bitwise", data_path, i): bitwise_cfg(algo, lam, data_path, tr)
                         for i, (algo, lam) in enumerate(CASES)})
            runs.update({("bf16", data_path, w): bf16_cfg(w, data_path, tr) for w in WIRES})
    if transport == "ray":
        runs.update({("same", a): same_actors_cfg(a) for a in ALGOS})
        runs[("replicated",)] = REPLICATED
        runs[("free",)] = FREE
    return runs


class Shared:
    """The Ray runs of several tests, made the way ``sampa-ray compare`` and the bench make
    theirs: one after the other on one coordinator and one pair of workers per transport (each
    run from the workers' initial state; an actor start costs seconds). Made on first use, with
    the local runs they are compared with (the same for every data path and transport)."""

    def __init__(self, root):
        self.root = root
        self.remote: dict = {}
        self.locals: dict = {}

    def ray(self, transport, key):
        """(result, out folder) of the planned run ``key`` on ``transport``."""
        if transport not in self.remote:
            runs = planned(transport)
            outs = {k: self.root / transport / "-".join(map(str, k)) for k in runs}
            try:
                results = run_ray_many([(runs[k], outs[k]) for k in runs])
            except Exception as err:  # every test of this transport fails with it, once made
                self.remote[transport] = err
                raise
            self.remote[transport] = {k: (r, outs[k]) for k, r in zip(runs, results,
                                                                      strict=True)}
        done = self.remote[transport]
        if isinstance(done, Exception):
            raise done
        return done[key]

    def local(self, key, cfg):
        """(result, out folder) of ``cfg`` run locally (once per ``key``)."""
        if key not in self.locals:
            out = self.root / "local" / "-".join(map(str, key))
            self.locals[key] = (run_local(cfg, out), out)
        return self.locals[key]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return Shared(tmp_path_factory.mktemp("shared"))


@pytest.mark.parametrize("data_path,transport", PATHS)
def test_ray_matches_local_bitwise(shared, data_path, transport):
    """Same engine code, same torch thread count (1), same batches and the same update code
    (on the coordinator for 'points', on each worker's replica for 'replicated'): the
    trajectories are identical bit for bit, BatchNorm statistics included."""
    xs = []
    for i, (algo, lam) in enumerate(CASES):
        cfg = bitwise_cfg(algo, lam, data_path, transport)
        local, local_out = shared.local(("bitwise", i), cfg)
        r, out = shared.ray(transport, ("bitwise", data_path, i))
        a, b = load_final(local_out), load_final(out)
        xs.append(b["x"])
        assert_same_final(b, a, CASES[i])
        assert local["final_test_accuracy"] == r["final_test_accuracy"]
        assert r["backend"] == "ray" and r["placement"]["mode"] == "cpu"
        assert r["transport"] == transport and r["data_path"] == data_path
        if data_path in ("collective", "free"):  # SAMPa's two workers formed a gloo group
            assert r["collective"] == {"backend": "gloo" if cfg.algo == "sampa" else None,
                                       "fallback": None}
        assert r["gradient_rounds"] == local["gradient_rounds"] and r["steps"] == 12
        assert [e["test_accuracy"] for e in r["epochs"]] == \
            [e["test_accuracy"] for e in local["epochs"]]
    # the runs moved, and differ between algorithms: not trivially equal vectors
    assert all(not torch.equal(xs[0], x) for x in xs[1:])


@pytest.mark.parametrize("data_path,transport", PATHS)
def test_bf16_wire_matches_local_bitwise_with_half_the_bytes(shared, data_path, transport):
    """A bf16 wire rounds each gradient once, where it is computed: every data path applies the
    same values as a local run with the same setting, and each gradient takes half the bytes."""
    r16, out16 = shared.ray(transport, ("bf16", data_path, "bf16"))
    r32, out32 = shared.ray(transport, ("bf16", data_path, "fp32"))
    local, local_out = shared.local(("bf16",), bf16_cfg("bf16", data_path, transport))
    assert torch.equal(load_final(local_out)["x"], load_final(out16)["x"])
    assert local["final_test_accuracy"] == r16["final_test_accuracy"]
    n = r16["num_params"]
    assert r16["timings"]["gradient_bytes"] == 2 * n
    assert r32["timings"]["gradient_bytes"] == 4 * n
    assert local["timings"]["gradient_bytes"] is None  # nothing travelled
    # not the fp32 trajectory, but close to it after 8 updates
    x16, x32 = load_final(out16)["x"], load_final(out32)["x"]
    assert not torch.equal(x16, x32)
    x0 = load_final(local_out)["x"]  # scale: how far the run moved
    assert float((x16 - x32).norm()) < 0.05 * float(x0.norm())


def test_collective_runs_after_a_grouped_run_on_the_same_actors(shared):
    """SAMPa forms the workers' group; SGD and SAM after it on the same actors use one worker
    and must not try to exchange with the idle one (they would wait for it forever)."""
    res = [shared.ray("ray", ("grouped", i)) for i in range(len(GROUPED))]
    assert [r["collective"]["backend"] for r, _ in res] == ["gloo", None, None, "gloo"]
    for (_, out), algo in zip(res, GROUPED, strict=True):
        _, local_out = shared.local(("grouped", algo), grouped_cfg(algo))
        assert torch.equal(load_final(local_out)["x"], load_final(out)["x"])


@pytest.mark.parametrize("data_path", ["collective", "free"])
def test_collective_without_a_group_falls_back_to_the_object_store(tmp_path, data_path):
    """NCCL asked for on a CPU-only machine: the group cannot be formed, the run says why once
    and moves the gradients through Ray's object store instead (the free path: one round per
    call, as the replicated path), on the same trajectory."""
    events = []
    cfg = make_config({"algo": "sampa", "lam": 0.2, "steps": 6, "batch_size": 32,
                       "threads": 1, "backend": "ray", "data_path": data_path,
                       "collective_backend": "nccl"})
    r = run_ray(cfg, tmp_path / "ray", progress=events.append)
    run_local(cfg, tmp_path / "local")
    assert torch.equal(load_final(tmp_path / "local")["x"], load_final(tmp_path / "ray")["x"])
    assert r["collective"]["backend"] is None and "nccl" in r["collective"]["fallback"].lower()
    said = [e.text for e in events if isinstance(e, InfoEvent)
            and e.text.startswith("collective:")]
    assert len(said) == 1 and "object store" in said[0], said


def test_replicas_agree_and_resume(shared, tmp_path):
    """The replicated path checkpoints the replica's state; resuming a copy from the middle
    reaches the uninterrupted run's parameters bit for bit."""


    _, full = shared.ray("ray", ("replicated",))
    part = tmp_path / "part"
    keep_checkpoints_upto(full, part, 5)
    run_ray(REPLICATED.model_copy(update={"resume": str(part)}), part)
    assert torch.equal(load_final(full)["x"], load_final(part)["x"])


def test_free_chunks_stop_where_the_loop_needs_the_state(shared, tmp_path):
    """On the free path the workers run chunks of rounds; the chunks end at every epoch (the
    evaluations are the local run's, every other epoch), at every checkpoint (the same steps,
    each resumable to the uninterrupted end) and at the run's end, bit for bit as the local
    run, in far fewer calls than rounds."""
    r, full = shared.ray("ray", ("free",))
    local, local_out = shared.local(("free",), FREE.model_copy(update={"backend": "local"}))
    assert_same_final(full, local_out)
    evals = [(e["step"], e.get("test_accuracy")) for e in r["epochs"]]
    assert evals == [(e["step"], e.get("test_accuracy")) for e in local["epochs"]]
    assert [s for s, acc in evals if acc is not None] == [88, 92]  # epoch 2 and the end
    steps = [c.step for c in map(load_checkpoint, list_checkpoints(full / "checkpoints"))]
    assert steps == [c.step for c in map(load_checkpoint,
                                         list_checkpoints(local_out / "checkpoints"))]
    assert {40, 60, 80, 92} <= set(steps)
    assert r["chunks"]["rounds"] == r["gradient_rounds"] == 93  # the bootstrap round, then 92
    assert r["chunks"]["count"] <= 16
    part = tmp_path / "part"
    keep_checkpoints_upto(full, part, 40)
    run_ray(FREE.model_copy(update={"resume": str(part)}), part)
    assert_same_final(part, local_out)


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


def test_same_actors_for_all_algorithms(shared, tmp_path):
    """compare's path: three runs on one coordinator and one pair of workers, each from the same
    initial state, giving what separate runs give."""
    results, outs = zip(*(shared.ray("ray", ("same", a)) for a in ALGOS), strict=True)
    assert [r["gradient_rounds"] for r in results] == [6, 12, 7]
    assert len({tuple(w["pid"] for w in r["workers"]) for r in results}) == 1
    alone = run_ray(same_actors_cfg("sampa"), tmp_path / "alone")
    assert torch.equal(load_final(outs[2])["x"], load_final(tmp_path / "alone")["x"])
    assert alone["final_test_accuracy"] == results[2]["final_test_accuracy"]
    saved = json.loads((outs[1] / "result.json").read_text())
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


def test_an_algorithms_memory_resumes_on_the_free_path(tmp_path):
    """LookSAM's kept direction is in its checkpoint: a local run's checkpoint at update 7
    (direction from update 6, reused until update 9) resumed on Ray's free path, where each
    worker's replica takes the state, ends bit for bit on the uninterrupted local run."""
    cfg = make_config({"algo": "looksam", "algo_args": {"k": 3}, "steps": 14, "batch_size": 32,
                       "threads": 1, "momentum": 0.9, "checkpoint_every": 7,
                       "keep_checkpoints": 5, "backend": "local"})
    run_local(cfg, tmp_path / "full")
    part = tmp_path / "part"
    keep_checkpoints_upto(tmp_path / "full", part, 7)
    res = run_ray(cfg.model_copy(update={"backend": "ray", "data_path": "free",
                                         "resume": str(part)}), part)
    assert res["steps"] == 14 and res["data_path"] == "free"
    assert_same_final(part, tmp_path / "full")
