"""Gradient accumulation (``--accumulate n``, sampa_ray.micro): each worker's batch (or shard)
in n micro-batches, weighted by their shares, gives the whole batch's gradient up to rounding.
The gradient itself, whole runs against the unaccumulated run (local, Ray, role groups), the
all-reduce once per gradient in a role group, BatchNorm's statistics per micro-batch, the
epoch's smaller last batch, and the one-line refusals of a batch that does not split."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import cli_cmd, cli_env, local_final, num_batches_tracked

from sampa_ray.config import make_config
from sampa_ray.engine import GradientEngine
from sampa_ray.errors import UserError
from sampa_ray.micro import split_batch
from sampa_ray.preflight import check_before_start
from sampa_ray.shards import GroupComm

STEPS = 25
TOL = 1e-6
MLP = {"model": "mlp", "batch_size": 64, "steps": STEPS, "threads": 1, "device": "cpu",
       "eval_every": 100}
#: the modadd transformer (no BatchNorm, no dropout) with the SGD-momentum optimizer
TRANSFORMER = {"model": "transformer", "dataset": "modadd", "dataset_args": {"p": 23},
               "model_args": {"d_model": 32, "heads": 4, "layers": 1}, "batch_size": 64,
               "steps": STEPS, "threads": 1, "device": "cpu", "lr": 0.2}
#: ... and with AdamW, whose eps (1e-6 here) bounds how far it magnifies rounding-sized
#: differences in coordinates whose gradient is near zero
TRANSFORMER_ADAMW = {**TRANSFORMER, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.1,
                     "eps": 1e-6}
TASKS = {"mlp": MLP, "transformer": TRANSFORMER, "transformer-adamw": TRANSFORMER_ADAMW}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _local(settings: dict, out: Path) -> torch.Tensor:
    return local_final(make_config({**settings, "backend": "local"}), out)["x"]


# -- the cut ----------------------------------------------------------------------------------
def test_split_batch_cuts_every_batch_tensor_like_tensor_split() -> None:
    x, y = torch.arange(30.0).reshape(10, 3), torch.arange(10)
    parts = split_batch((x, y), 3)
    assert [len(p[1]) for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert all(isinstance(p, tuple) for p in parts)
    scale = torch.tensor(2.0)  # not a per-sample tensor: every micro-batch gets it whole
    parts = split_batch({"input_ids": x, "labels": y, "scale": scale, "name": "b"}, 2)
    assert [p["labels"].tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert all(p["scale"] is scale and p["name"] == "b" for p in parts)
    assert split_batch((x, y), 1)[0][0] is x
    with pytest.raises(UserError, match="a batch of 10 samples cannot be split into 11"):
        split_batch((x, y), 11)


# -- the gradient -----------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["mlp", "transformer"])
def test_the_accumulated_gradient_is_the_whole_batchs(task: str) -> None:
    whole = GradientEngine(make_config({**TASKS[task], "backend": "local"}))
    parts = GradientEngine(make_config({**TASKS[task], "backend": "local", "accumulate": 4}))
    point = whole.initial_point() + 0.01
    for t in (0, 5):
        ref = whole.gradient(point, t)
        got = parts.gradient(point, t)
        assert 0 < _rel(got.grad, ref.grad) < TOL  # the same sum, in another order
        assert got.loss == pytest.approx(ref.loss, rel=1e-6)
        assert got.accuracy == pytest.approx(ref.accuracy, abs=1e-12)


# -- whole runs, local ------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["sgd", "sam", "sampa"])
@pytest.mark.parametrize("task", ["mlp", "transformer"])
def test_accumulate_4_ends_where_the_whole_batch_does(task: str, algo: str,
                                                     tmp_path: Path) -> None:
    settings = {**TASKS[task], "algo": algo}
    ref = _local(settings, tmp_path / "whole")
    got = _local({**settings, "accumulate": 4}, tmp_path / "acc")
    assert _rel(got, ref) <= TOL


def test_accumulate_with_adamw_ends_where_the_whole_batch_does(tmp_path: Path) -> None:
    settings = {**TRANSFORMER_ADAMW, "algo": "sampa"}
    ref = _local(settings, tmp_path / "whole")
    assert _rel(_local({**settings, "accumulate": 4}, tmp_path / "acc"), ref) <= TOL


def test_dict_batches_from_a_dataloader_split_too(tmp_path: Path, monkeypatch) -> None:
    """The Hugging Face example (no dropout, LayerNorm only): dict batches of a plug-in dataset,
    read through a DataLoader, each tensor of them sliced."""
    import sampa_ray

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    import hf_model

    settings = {"algo": "sampa", "optimizer": "sgd", "lr": 0.1, "batch_size": 16, "steps": 8,
                "threads": 1, "lr_schedule": "constant", "dataset_args": {"p": 13}}
    final = {}
    for n in (1, 2):
        out = tmp_path / f"acc{n}"
        result = sampa_ray.fit({**settings, "accumulate": n}, model=hf_model.build,
                               data=hf_model.load, out=out, backend="local")
        assert 0.0 <= result.metrics["epochs"][-1]["train_accuracy"] <= 1.0
        final[n] = torch.load(out / "final.pt", weights_only=True)["x"]
    assert _rel(final[2], final[1]) <= TOL


def test_the_last_batch_kept_is_split_as_evenly_as_it_goes(tmp_path: Path) -> None:
    """1,437 digits in batches of 64: the epoch's 23rd batch holds 29, cut 8 + 7 + 7 + 7."""
    settings = {**MLP, "algo": "sampa", "last_batch": "keep"}
    cfg = make_config({**settings, "accumulate": 4, "backend": "local"})
    assert GradientEngine(cfg).schedule.size_of(22) == 29
    ref = _local(settings, tmp_path / "whole")
    assert _rel(_local({**settings, "accumulate": 4}, tmp_path / "acc"), ref) <= TOL


def test_batchnorm_updates_its_statistics_once_per_micro_batch(tmp_path: Path) -> None:
    settings = {**MLP, "model": "cnn", "algo": "sgd", "steps": 5}
    ref = local_final(make_config({**settings, "backend": "local"}), tmp_path / "whole")
    got = local_final(make_config({**settings, "backend": "local", "accumulate": 2}),
                      tmp_path / "acc")
    assert num_batches_tracked(ref["buffers"]) == {5}
    assert num_batches_tracked(got["buffers"]) == {10}


# -- Ray, and role groups ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_runs(ray_local, tmp_path_factory):
    """SAMPa on Ray with accumulation (one worker per role, and role groups of 2) and the
    unaccumulated local run both are compared with."""
    from sampa_ray.ray import run_ray_many

    root = tmp_path_factory.mktemp("accumulate-ray")
    settings = {**MLP, "algo": "sampa", "steps": 10}
    ref = _local(settings, root / "local")
    got = {}
    for name, extra in (("k1", {"accumulate": 4}),
                        ("k2", {"accumulate": 2, "workers_per_role": 2})):
        cfg = make_config({**settings, **extra, "backend": "ray"})
        (result,) = run_ray_many([(cfg, root / name)])
        got[name] = result, torch.load(root / name / "final.pt", weights_only=True)["x"]
    return ref, got


@pytest.mark.parametrize("name", ["k1", "k2"])
def test_accumulate_on_ray_ends_where_the_whole_batch_does(ray_runs, name: str) -> None:
    ref, got = ray_runs
    result, x = got[name]
    assert result["steps"] == 10
    assert _rel(x, ref) <= TOL
    if name == "k2":  # the whole fp32 gradient, once per worker and gradient
        n = result["num_params"]
        assert set(result["timings"]["allreduce_bytes"].values()) == {4 * n}


# -- the group's all-reduce: once per gradient ------------------------------------------------
GROUP_CFG = {"model": "mlp", "batch_size": 36, "backend": "local", "threads": 1,
             "device": "cpu"}


def _rank(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    # the store is a file in the test's folder: no port to race another process for
    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'store'}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    calls = []
    real = dist.all_reduce

    def counted(t, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(t.numel())
        return real(t, *args, **kwargs)

    dist.all_reduce = counted
    saved = {}
    for n in (1, 3):  # shards of 18, in micro-batches of 6
        engine = GradientEngine(make_config({**GROUP_CFG, "accumulate": n}))
        engine.join_group(GroupComm(rank, 2, dist.group.WORLD))
        point = engine.initial_point() + 0.01
        calls.clear()
        r = engine.gradient(point, 2)
        saved[n] = {"grad": r.grad.clone(), "loss": r.loss, "calls": list(calls)}
        del engine, r  # its reducer's hooks and buffers go before the group does
    torch.save(saved, Path(out) / f"rank{rank}.pt")
    dist.all_reduce = real
    # both ranks done with the group before either takes it down: a rank that tore down its
    # gloo connections while the other still used them aborted now and then ("terminate
    # called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def test_a_role_group_sums_the_accumulated_gradient_once(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(str(tmp_path),), nprocs=2,
                       start_method="spawn", join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    whole = GradientEngine(make_config(GROUP_CFG))
    ref = whole.gradient(whole.initial_point() + 0.01, 2)
    for got in ranks:
        # the same collectives with 3 micro-batches as with one: the buckets once, the loss once
        assert got[3]["calls"] == got[1]["calls"]
        assert sum(got[3]["calls"]) == whole.flat.numel + 2
        assert torch.equal(got[3]["grad"], ranks[0][3]["grad"])
        assert _rel(got[3]["grad"], ref.grad) < TOL
        assert got[3]["loss"] == pytest.approx(ref.loss, rel=1e-6)


# -- what does not split ----------------------------------------------------------------------
def test_a_batch_that_does_not_split_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(cli_cmd("train", "--backend", "local", "--model", "mlp",
                                  "--batch-size", "64", "--accumulate", "3", "--steps", "2",
                                  "--out", str(tmp_path / "run")),
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("sampa-ray: ") and "accumulate" in lines[0]
    assert "batch_size 64 does not split into 3 equal micro-batches" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_shard_that_does_not_split_names_the_workers() -> None:
    with pytest.raises(UserError, match="on each of 2 workers .use a multiple of 8"):
        make_config({"backend": "ray", "workers_per_role": 2, "batch_size": 36,
                     "accumulate": 4})
    with pytest.raises(UserError, match="on each of 4 workers .use a multiple of 8"):
        make_config({"backend": "ray", "algo": "sam", "workers_per_role": 2,
                     "data_parallel": True, "batch_size": 36, "accumulate": 2})
    make_config({"backend": "ray", "workers_per_role": 2, "batch_size": 64, "accumulate": 4})
    # without accumulation, shards may differ by one sample, as before
    make_config({"backend": "ray", "workers_per_role": 3, "batch_size": 64})


def test_a_last_batch_too_small_to_split_is_refused_before_the_start() -> None:
    # 1,437 digits in batches of 64: the last holds 29, fewer than 32 micro-batches
    cfg = make_config({**MLP, "backend": "local", "last_batch": "keep", "accumulate": 32})
    with pytest.raises(UserError, match=r"last batch .* holds 29 samples, too few for 32"):
        check_before_start(cfg)
    check_before_start(make_config({**MLP, "backend": "local", "accumulate": 32}))  # dropped
