"""Gradient accumulation (``accumulate: n``): a worker's batch, or its shard of the batch in a
role group, cut into ``n`` micro-batches that go through forward and backward one after
another. Each micro-batch's mean loss is weighted by its share of the batch, and autograd sums
the micro-batches' gradients into the one flat gradient buffer, so the result is the whole
batch's gradient up to rounding, with one micro-batch's activations in memory at a time.

The cut is :func:`sampa_ray.shards.shard_range`'s: contiguous slices whose sizes differ by at
most one. A full batch must split evenly (``batch_size`` a multiple of ``n`` times the workers
that share one gradient: the config refuses anything else); the epoch's smaller last batch of
``last_batch: keep`` is split as evenly as possible, which needs at least ``n`` samples in every
shard (:func:`check_last_batch`, before a run starts). BatchNorm normalises each micro-batch
with its own statistics and updates its running statistics once per micro-batch, as
``DistributedDataParallel`` and every accumulation loop do; a model without BatchNorm (and
without dropout, whose masks are drawn per micro-batch) gets the whole batch's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .config import TrainConfig
from .data.batches import BatchSchedule
from .errors import UserError
from .shards import shard_range
from .task import batch_size_of


def group_size(cfg: TrainConfig) -> int:
    """How many workers compute one gradient together, each on its shard of the batch."""
    return cfg.workers_per_role * (2 if cfg.data_parallel else 1)


def check_last_batch(schedule: BatchSchedule, n: int, group: int) -> None:
    """The epoch's last batch (smaller with ``last_batch: keep``) splits into ``n``
    micro-batches on each of the ``group`` workers' shards: one line (a UserError) where some
    shard would hold fewer than ``n`` samples."""
    if n == 1:
        return
    last = schedule.size_of(schedule.batches_per_epoch - 1)
    if last < n * group:
        on = f" on each of {group} workers" if group > 1 else ""
        raise UserError(f"accumulate: the epoch's last batch (last_batch keep) holds {last} "
                        f"samples, too few for {n} micro-batches{on} (at least {n * group}); "
                        "use --last-batch drop or another --batch-size")


def split_batch(batch: Any, n: int) -> list[Any]:
    """``batch`` (a tensor, or a tuple, list or dict of them, as a loss takes it) as ``n``
    micro-batches: every tensor whose first dimension is the batch's size is sliced along it
    (views, no copies); anything else is passed to each micro-batch as it is."""
    if n == 1:
        return [batch]
    size = batch_size_of(batch)
    if size < n:
        raise UserError(f"accumulate: a batch of {size} samples cannot be split into {n} "
                        "micro-batches")
    return [_slice(batch, size, *shard_range(size, i, n)) for i in range(n)]


def _slice(batch: Any, size: int, lo: int, hi: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, size, lo, hi) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_slice(b, size, lo, hi) for b in batch)
    return batch


__all__ = ["check_last_batch", "group_size", "split_batch"]
