"""GroupBatchNorm: a batch sharded over a gloo role group of real processes gives the full batch's
outputs, gradients and running statistics; without the group it does not.

Each spawned run (2 processes, and one with 3) does every sharded case once and saves its results
under tmp_path; the full-batch references are computed here, in one process, with torch's own
BatchNorm. Rank r's loss is ``sum of its per-sample losses / N`` (= its mean loss * n_r / N, and
defined for an empty shard); its parameter gradients are all-reduced with SUM.
"""

from __future__ import annotations

import copy
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port
from torch import nn

from sampa_ray.groupbn import GroupBatchNorm, convert_batchnorm, set_group

N = 16  # full batch
CLASSES = 5

# name -> (model, dtype, momentum override or "keep", shard sizes or None for tensor_split, sync)
CASES_2: dict[str, tuple[str, torch.dtype, Any, list[int] | None, bool]] = {
    "cnn64": ("cnn", torch.float64, "keep", None, True),
    "mlp64": ("mlp", torch.float64, "keep", None, True),
    "cnn64_empty": ("cnn", torch.float64, "keep", [16, 0], True),
    "cnn64_mom0": ("cnn", torch.float64, 0.0, None, True),
    "cnn32": ("cnn", torch.float32, "keep", None, True),
    "cnn64_nogroup": ("cnn", torch.float64, "keep", None, False),
}
CASES_3 = {  # tensor_split of 16 rows over 3: 6, 5, 5
    "cnn64": CASES_2["cnn64"],
    "mlp64": CASES_2["mlp64"],
}


# -- models, data, one step (shared by the spawned ranks and the reference) ---------------------
def build(kind: str, dtype: torch.dtype, momentum: Any = "keep") -> nn.Module:
    torch.manual_seed(0)
    if kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, momentum=None), nn.ReLU(),  # cumulative
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, CLASSES))
    else:
        model = nn.Sequential(
            nn.Linear(10, 12), nn.BatchNorm1d(12), nn.ReLU(),
            nn.Linear(12, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(),
            nn.Linear(8, CLASSES))
    model = model.to(dtype)
    g = torch.Generator().manual_seed(7)
    for m in model.modules():  # non-trivial starting statistics and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=dtype))
            m.running_var.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
            m.num_batches_tracked.fill_(3)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
            if momentum != "keep":
                m.momentum = momentum
    return model.train()


def data(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (N, 3, 6, 6) if kind == "cnn" else (N, 10)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)  # mean far from 0
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return x, y


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this shard's share of the full-batch mean loss; returns the
    output and the flat parameter gradient (zeros where a parameter got none)."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, y, reduction="sum") / N
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return out.detach(), torch.cat([g.reshape(-1) for g in grads])


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the spawned ranks --------------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, out_dir: str, cases: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(world)))  # the role group
        singles = [dist.new_group([r]) for r in range(world)]  # every rank joins every new_group
        res: dict[str, Any] = {}
        for name, (kind, dtype, momentum, sizes, sync) in cases.items():
            model = build(kind, dtype, momentum)
            bns = convert_batchnorm(model)
            set_group(bns, group if sync else None)
            x, y = data(kind, dtype)
            xs = torch.split(x, sizes) if sizes else torch.tensor_split(x, world)
            ys = torch.split(y, sizes) if sizes else torch.tensor_split(y, world)
            out, grad = step(model, xs[rank], ys[rank])
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
            res[name] = {"out": out, "grad": grad, "buffers": buffers(model)}

            if name == "cnn64":
                checks: dict[str, bool] = {}
                # eval mode with the group set: torch's BatchNorm, bit for bit
                plain = build(kind, dtype)
                plain.load_state_dict(model.state_dict())
                model.eval()
                plain.eval()
                with torch.no_grad():
                    checks["eval_bitwise"] = torch.equal(model(xs[rank]), plain(xs[rank]))
                # deep copy drops the (unpicklable) group and keeps the original's
                dup = copy.deepcopy(model)
                checks["deepcopy_drops_group"] = all(
                    m.group is None for m in dup.modules() if isinstance(m, GroupBatchNorm))
                checks["original_keeps_group"] = all(m.group is group for m in bns)
                # a group of one: plain BatchNorm in training mode, bit for bit
                solo, ref = build(kind, dtype), build(kind, dtype)
                set_group(convert_batchnorm(solo), singles[rank])
                o1, g1 = step(solo, xs[rank], ys[rank])
                o2, g2 = step(ref, xs[rank], ys[rank])
                b1, b2 = buffers(solo), buffers(ref)
                checks["single_bitwise"] = (torch.equal(o1, o2) and torch.equal(g1, g2)
                                            and all(torch.equal(b1[k], b2[k]) for k in b2))
                # a group total of one row raises on every rank (as torch's BatchNorm does for
                # one row); one row on each rank is `world` rows over the group and trains
                xm, ym = data("mlp", dtype)
                one = build("mlp", dtype)
                set_group(convert_batchnorm(one), group)
                rows = slice(0, 1 if rank == 0 else 0)
                try:
                    step(one, xm[rows], ym[rows])
                    checks["one_row_raises"] = False
                except ValueError as err:
                    checks["one_row_raises"] = "got 1 value(s) over the group" in str(err)
                pair, plain2 = build("mlp", dtype), build("mlp", dtype)
                set_group(convert_batchnorm(pair), group)
                o_pair, _ = step(pair, xm[rank:rank + 1], ym[rank:rank + 1])
                o_full, _ = step(plain2, xm[:world], ym[:world])
                checks["one_row_each_is_world"] = rel(o_pair[0], o_full[rank]) <= 1e-12 and all(
                    rel(v, buffers(plain2)[k]) <= 1e-12
                    for k, v in buffers(pair).items() if "running" in k)
                res["checks"] = checks
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, out_dir: Path, cases: dict[str, Any], limit_s: float = 120.0) -> list[dict]:
    ctx = mp.start_processes(_rank_main, args=(world, free_port(), str(out_dir), cases),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    try:
        while not ctx.join(timeout=1.0):  # raises with the child's traceback if one fails
            if time.monotonic() > deadline:
                raise TimeoutError(f"spawned ranks still running after {limit_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _spawn(2, tmp_path_factory.mktemp("gbn2"), CASES_2)


@pytest.fixture(scope="module")
def world3(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _spawn(3, tmp_path_factory.mktemp("gbn3"), CASES_3)


def reference(kind: str, dtype: torch.dtype, momentum: Any = "keep") -> dict[str, Any]:
    model = build(kind, dtype, momentum)
    x, y = data(kind, dtype)
    out, grad = step(model, x, y)
    return {"out": out, "grad": grad, "buffers": buffers(model)}


def assert_matches_full_batch(ranks: list[dict], name: str, tol: float) -> None:
    kind, dtype, momentum, _, _ = (CASES_2 | CASES_3)[name]
    full = reference(kind, dtype, momentum)
    res = [r[name] for r in ranks]
    for r in res[1:]:  # the same reduced gradient and running statistics on every rank
        assert torch.equal(r["grad"], res[0]["grad"])
        for k in res[0]["buffers"]:
            assert torch.equal(r["buffers"][k], res[0]["buffers"][k]), k
    assert rel(res[0]["grad"], full["grad"]) <= tol
    assert rel(torch.cat([r["out"] for r in res]), full["out"]) <= tol
    for k, v in full["buffers"].items():
        got = res[0]["buffers"][k]
        if k.endswith("num_batches_tracked"):
            assert torch.equal(got, v) and int(v) == 4, k
        else:
            assert rel(got, v) <= tol, k


# -- sharded over a real gloo group -------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn64", "mlp64", "cnn64_empty"])
def test_group_shards_equal_full_batch_fp64(world2: list[dict], name: str) -> None:
    assert_matches_full_batch(world2, name, 1e-10)


def test_group_shards_equal_full_batch_fp32(world2: list[dict]) -> None:
    assert_matches_full_batch(world2, "cnn32", 1e-5)


@pytest.mark.parametrize("name", ["cnn64", "mlp64"])
def test_uneven_shards_over_three_ranks(world3: list[dict], name: str) -> None:
    assert [r[name]["out"].shape[0] for r in world3] == [6, 5, 5]
    assert_matches_full_batch(world3, name, 1e-10)


def test_momentum_zero_keeps_running_stats(world2: list[dict]) -> None:
    start = buffers(build("cnn", torch.float64, 0.0))
    got = world2[0]["cnn64_mom0"]["buffers"]
    for k, v in start.items():
        if k.endswith("num_batches_tracked"):
            assert int(got[k]) == int(v) + 1  # counted, as torch counts it
        else:
            assert torch.equal(got[k], v), k
    assert_matches_full_batch(world2, "cnn64_mom0", 1e-10)


def test_without_group_shard_gradients_differ(world2: list[dict]) -> None:
    """The reason for the group: shards normalised on their own give another gradient."""
    full = reference("cnn", torch.float64)
    res = [r["cnn64_nogroup"] for r in world2]
    assert rel(res[0]["grad"], full["grad"]) > 1e-3
    assert rel(torch.cat([r["out"] for r in res]), full["out"]) > 1e-3
    assert rel(res[0]["buffers"]["1.running_mean"], full["buffers"]["1.running_mean"]) > 1e-6


def test_eval_single_group_and_deepcopy_in_group(world2: list[dict], world3: list[dict]) -> None:
    for r in world2 + world3:
        assert r["checks"] == {"eval_bitwise": True, "deepcopy_drops_group": True,
                               "original_keeps_group": True, "single_bitwise": True,
                               "one_row_raises": True, "one_row_each_is_world": True}


# -- in one process -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (7, 5)), (nn.BatchNorm1d, (7, 5, 4)),
                                       (nn.BatchNorm2d, (7, 5, 3, 4)),
                                       (nn.BatchNorm3d, (7, 5, 2, 3, 2))])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
def test_no_group_is_torch_batchnorm_bitwise(cls: type, shape: tuple, momentum: Any) -> None:
    torch.manual_seed(0)
    plain = cls(5, momentum=momentum).double()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    gbn = GroupBatchNorm(5, momentum=momentum).double()
    gbn.load_state_dict(plain.state_dict())
    x = torch.randn(shape, dtype=torch.float64) + 2
    for _ in range(2):  # training twice (running statistics), then eval
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        oa, ob = plain(xa), gbn(xb)
        (oa * oa).sum().backward()
        (ob * ob).sum().backward()
        assert torch.equal(oa, ob) and torch.equal(xa.grad, xb.grad)
        assert torch.equal(plain.weight.grad, gbn.weight.grad)
        for k, v in plain.state_dict().items():
            assert torch.equal(gbn.state_dict()[k], v), k
    plain.eval()
    gbn.eval()
    assert torch.equal(plain(x), gbn(x))
    with pytest.raises(ValueError):
        gbn(torch.randn(5))


def test_convert_keeps_objects_names_and_settings() -> None:
    model = build("cnn", torch.float64)
    model[4].eval()  # a layer's own training flag is kept
    model[1].eps = 1e-3
    params = dict(model.named_parameters())
    bufs = dict(model.named_buffers())
    keys = list(model.state_dict())
    old = [model[1], model[4]]
    bns = convert_batchnorm(model)
    assert bns == [model[1], model[4]] and all(type(m) is GroupBatchNorm for m in bns)
    assert list(model.named_parameters()) == list(params.items())
    assert all(p is params[k] for k, p in model.named_parameters())
    assert all(b is bufs[k] for k, b in model.named_buffers())
    assert list(model.state_dict()) == keys  # no "group" in it
    for o, m in zip(old, bns, strict=True):
        assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                m.training, m.group) == (o.num_features, o.eps, o.momentum, o.affine,
                                         o.track_running_stats, o.training, None)
    assert [m.training for m in bns] == [True, False]
    assert convert_batchnorm(model) == bns and all(a is b for a, b in
                                                   zip(convert_batchnorm(model), bns, strict=True))
    with pytest.raises(ValueError):
        convert_batchnorm(nn.BatchNorm2d(3))  # no parent to replace it in
