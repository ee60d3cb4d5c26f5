"""One role's gradient computed by a group of k workers: each takes a shard of the batch, and the
shard gradients are summed inside the group while backward still runs.

Batch ``t`` stays a pure function of ``(seed, t)``; shard ``r`` of ``k`` is its ``r``-th
contiguous slice (:func:`shard_range`, the sizes differ by at most one, as
``torch.tensor_split`` cuts). Each worker weights its shard's mean loss by ``n_r / n``, so the
group's sum of shard gradients is the gradient of the whole batch's mean loss: the same
gradient one worker computes on the whole batch, up to rounding, for any model whose samples
do not interact. BatchNorm's batch statistics make samples interact: per shard by default (as
``DistributedDataParallel`` does), over the whole batch with ``sync_bn``
(:mod:`sampa_ray.groupbn`).

No Ray here: a :class:`GroupComm` is any torch.distributed process group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .flat import FlatParams

#: bytes per all-reduce bucket (DistributedDataParallel's default is 25 MiB)
BUCKET_BYTES = 25 * 2**20


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of shard ``rank`` of ``size`` in a batch of ``n``: contiguous,
    the first ``n % size`` shards one longer (``torch.tensor_split``'s cut)."""
    if not 0 <= rank < size:
        raise ValueError(f"shard: rank {rank} outside 0..{size - 1}")
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass
class GroupComm:
    """This worker's place in its role group: rank ``rank`` of ``size``, and the group's
    process group (None when the worker is alone). ``device``: where the group's collectives
    take tensors (the GPU with NCCL, host memory with gloo)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    device: torch.device = torch.device("cpu")

    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the group, in place."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)


ALONE = GroupComm()


class BucketReducer:
    """Sums a flat gradient buffer over a group in buckets: a bucket's all-reduce starts as
    soon as backward has written every parameter in it (parameters become ready roughly in
    reverse order, so buckets are contiguous slices from the end of the buffer), and overlaps
    the rest of backward. :meth:`finish` starts what backward never reached (unused
    parameters) and waits for every bucket."""

    def __init__(self, flat: FlatParams, comm: GroupComm, bucket_bytes: int = BUCKET_BYTES
                 ) -> None:
        self.flat, self.comm = flat, comm
        # gloo beside a GPU: through the host ("cuda" and "cuda:0" are the same place here)
        self.staged = comm.device.type != flat.grad.device.type
        # buckets over the parameters in reverse order: [lo, hi) of the flat buffer
        offsets, o = [], 0
        for p in flat.params:
            offsets.append((o, o + p.numel()))
            o += p.numel()
        per = max(1, bucket_bytes // flat.grad.element_size())
        self.buckets: list[tuple[int, int]] = []
        self.bucket_of: dict[int, int] = {}
        hi = flat.numel
        for i in reversed(range(len(flat.params))):
            lo_i, hi_i = offsets[i]
            if self.buckets and hi - lo_i <= per:
                b = len(self.buckets) - 1
                self.buckets[b] = (lo_i, self.buckets[b][1])
            else:
                self.buckets.append((lo_i, hi_i))
                hi = hi_i
            self.bucket_of[i] = len(self.buckets) - 1
        self.sizes = [0] * len(self.buckets)
        for b in self.bucket_of.values():
            self.sizes[b] += 1
        self._left: list[int] = []
        self._works: dict[int, Any] = {}
        self.active = False
        self.hooks = [] if self.staged else [
            p.register_post_accumulate_grad_hook(self._hook(i))
            for i, p in enumerate(flat.params)]

    def _hook(self, i: int) -> Any:
        def ready(_: torch.Tensor) -> None:
            if not self.active:
                return
            b = self.bucket_of[i]
            self._left[b] -= 1
            if self._left[b] == 0:
                self._start(b)
        return ready

    def _start(self, b: int) -> None:
        lo, hi = self.buckets[b]
        self._works[b] = dist.all_reduce(self.flat.grad[lo:hi], op=dist.ReduceOp.SUM,
                                         group=self.comm.group, async_op=True)

    def begin(self) -> None:
        """Before backward: every bucket waits for all its parameters again."""
        self._left = list(self.sizes)
        self._works = {}
        self.active = not self.staged

    def finish(self) -> tuple[float, int]:
        """After backward: the whole buffer summed over the group. Returns the seconds spent
        waiting here and the bytes each worker contributed."""
        t0 = time.perf_counter()
        grad = self.flat.grad
        if self.staged:
            host = grad.to(self.comm.device)
            dist.all_reduce(host, op=dist.ReduceOp.SUM, group=self.comm.group)
            grad.copy_(host)
        else:
            for b in range(len(self.buckets)):
                if b not in self._works:
                    self._start(b)
            for w in self._works.values():
                w.wait()
        self.active = False
        return time.perf_counter() - t0, grad.numel() * grad.element_size()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
