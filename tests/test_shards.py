"""A role group's shard of the batch and its bucketed all-reduce (sampa_ray.shards), without Ray:
the cut itself, and two real processes in a gloo group whose summed shard gradients are the
whole batch's gradient, through the gradient engine and through the bucket reducer alone."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn

from sampa_ray.config import make_config
from sampa_ray.engine import GradientEngine
from sampa_ray.flat import FlatParams
from sampa_ray.shards import BucketReducer, GroupComm, shard_range

CFG = {"model": "mlp", "batch_size": 30, "backend": "local", "threads": 1, "device": "cpu"}
BATCHES = (0, 3)


def test_shards_cover_the_batch_in_order_like_tensor_split():
    for n in (1, 7, 30, 31):
        for size in (1, 2, 3, 4):
            cuts = [shard_range(n, r, size) for r in range(size)]
            expected = torch.tensor_split(torch.arange(n), size)
            assert [hi - lo for lo, hi in cuts] == [len(t) for t in expected]
            assert cuts[0][0] == 0 and cuts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:], strict=False))
    with pytest.raises(ValueError, match="rank 2 outside 0..1"):
        shard_range(10, 2, 2)


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 5)
        self.unused = nn.Linear(3, 3)  # no gradient from backward: the reducer still sums it
        self.b = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    comm = GroupComm(rank, 2, dist.group.WORLD)
    saved: dict = {}
    # the engine: shard r of batch t, weighted, summed over the group
    engine = GradientEngine(make_config(CFG))
    engine.join_group(comm)
    point = engine.initial_point() + 0.01
    for t in BATCHES:
        r = engine.gradient(point, t)
        saved[f"grad{t}"] = r.grad.clone()
        saved[f"loss{t}"], saved[f"acc{t}"] = r.loss, r.accuracy
        saved[f"timings{t}"], saved[f"bytes{t}"] = dict(r.timings), r.reduced_bytes
    # the reducer alone: buckets of 64 bytes, an unused parameter
    model = _WithUnused().double()
    flat = FlatParams(model)
    reducer = BucketReducer(flat, comm, bucket_bytes=64)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    reducer.begin()
    model(x).square().sum().backward()
    started_in_backward = len(reducer._works)
    reducer.finish()
    saved.update(buckets=len(reducer.buckets), in_backward=started_in_backward,
                 x=x, reduced=flat.grad.clone())
    torch.save(saved, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    mp.start_processes(_rank, args=(free_port(), str(out)), nprocs=2, start_method="spawn",
                       join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_shards_summed_are_the_whole_batchs_gradient(ranks):
    whole = GradientEngine(make_config(CFG))
    point = whole.initial_point() + 0.01
    n = whole.flat.numel
    for t in BATCHES:
        ref = whole.gradient(point, t)
        for got in ranks:
            assert torch.equal(got[f"grad{t}"], ranks[0][f"grad{t}"])  # one sum, both ranks
            rel = float((got[f"grad{t}"] - ref.grad).norm() / ref.grad.norm())
            assert 0 < rel < 1e-6  # the same gradient, summed in another order
            assert got[f"loss{t}"] == pytest.approx(ref.loss, rel=1e-6)
            assert got[f"acc{t}"] == pytest.approx(ref.accuracy, abs=1e-12)
            assert got[f"bytes{t}"] == 4 * n and got[f"timings{t}"]["allreduce"] >= 0
    assert "allreduce" not in ref.timings and ref.reduced_bytes == 0


def test_buckets_start_during_backward_and_cover_unused_parameters(ranks):
    got = ranks[0]
    assert got["buckets"] >= 3 and 1 <= got["in_backward"] < got["buckets"]
    model = _WithUnused().double()
    flat = FlatParams(model)
    for r in ranks:
        model(r["x"]).square().sum().backward()  # accumulates: the sum over both ranks
    assert torch.allclose(got["reduced"], flat.grad, rtol=1e-12, atol=0)
    assert torch.equal(ranks[1]["reduced"], got["reduced"])
    unused = slice(6 * 5 + 5, 6 * 5 + 5 + 3 * 3 + 3)
    assert torch.count_nonzero(got["reduced"][unused]) == 0
