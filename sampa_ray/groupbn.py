"""BatchNorm whose batch statistics span a role group of processes, on CPU (gloo) and GPU (nccl).

Why: a gradient worker may be split into a *role group* of k processes, each computing the
gradient of one shard of the batch. BatchNorm in training mode normalises with the statistics
of the batch it sees, so k shards normalised separately give a different function (and a
different gradient) from the whole batch. ``torch.nn.SyncBatchNorm`` fixes that but refuses CPU
tensors, and the workers here run on CPU as well as on GPUs; :class:`GroupBatchNorm` does the
same job with two differentiable all-reduces on any backend.

In training mode with a group of more than one process the statistics are those of the union of
all ranks' inputs (shards may differ in size, one may even be empty): the first all-reduce sums
``[per-channel sums..., row count]`` for the global mean, the second sums the per-channel squared
deviations from that mean for the global (biased) variance -- two passes, not ``E[x^2] - mean^2``,
which loses digits when the mean is large against the spread. The all-reduces are those of
``torch.distributed.nn.functional``: their backward all-reduces the incoming gradients, so every
rank's input gradient is that of the *sum over ranks* of the losses. A caller that weights rank
r's mean loss by ``n_r / N`` and sums the parameter gradients over the ranks therefore gets the
full-batch gradient. Every rank must run the forward and the backward of every GroupBatchNorm
layer (an empty shard included), in the same order, or the collectives deadlock.

Running statistics are updated as torch's BatchNorm updates them, with the global statistics
(unbiased variance ``N / (N - 1)``), so they stay equal on every rank. In eval mode, with no group
or a group of one, the layer is ``torch``'s BatchNorm, bit for bit.

:func:`convert_batchnorm` swaps a model's BatchNorm layers for GroupBatchNorm layers that keep the
very same parameter and buffer tensors (views held by flat-parameter code stay valid);
:func:`set_group` points them at a process group.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["GroupBatchNorm", "convert_batchnorm", "set_group"]

# torch.distributed.nn.functional.all_reduce is the documented differentiable all-reduce; torch
# 2.x marks it deprecated in favour of _functional_collectives, whose backward is not defined.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
    category=FutureWarning)


class GroupBatchNorm(_BatchNorm):
    """BatchNorm over any input of dimension >= 2 (``(N, C, ...)``) whose training-mode batch
    statistics are those of all ranks of :attr:`group` together.

    ``group`` is a plain attribute (a ``torch.distributed`` process group or ``None``): it is
    neither a parameter nor a buffer, is not in the state dict, and is dropped (``None``) when the
    module is pickled or deep-copied -- a copy must be given its group with :func:`set_group`.
    """

    group: dist.ProcessGroup | None

    def __init__(self, *args: Any, group: dist.ProcessGroup | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def __getstate__(self) -> dict[str, Any]:
        # a ProcessGroup cannot be pickled (nor deep-copied): the copy starts unsynchronised
        state = dict(self.__dict__)  # object.__getstate__ returns __dict__ itself: copy it
        state["group"] = None
        return state

    def _synced(self) -> bool:
        return (self.training and self.group is not None
                and dist.get_world_size(self.group) > 1)

    def forward(self, input: Tensor) -> Tensor:
        if not self._synced():
            return super().forward(input)
        self._check_input_dim(input)
        return self._group_forward(input)

    def _group_forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        # statistics in at least fp32 (a bf16 count is exact only up to 256 rows)
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        rows = x.numel() // c if c else 0
        count = torch.full((1,), rows, dtype=acc, device=x.device)
        stats = dist_fn.all_reduce(torch.cat([xa.sum(dim=dims), count]),
                                   op=dist.ReduceOp.SUM, group=self.group)
        # the group's row count stays on the device (no sync of a GPU per layer); it is read on
        # the host only when this rank has at most one row, the one case where it can be 0 or 1
        n = stats[c].detach()
        least = int(n.item()) if rows <= 1 else rows  # the count, or a lower bound above 1

        factor = 0.0 if self.momentum is None else self.momentum
        track = self.track_running_stats and self.num_batches_tracked is not None
        if track:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        if least == 1:  # as torch's BatchNorm (every rank sees the same n: every rank raises)
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{least} value(s) over the group (local input size "
                             f"{tuple(x.shape)})")

        mean = stats[:c] / n
        xc = xa - mean.view(shape)
        sq = dist_fn.all_reduce((xc * xc).sum(dim=dims), op=dist.ReduceOp.SUM, group=self.group)
        var = sq / n  # biased: what the batch is normalised with
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(acc)
        out = xc * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.to(acc).view(shape)

        if (track and least > 1 and self.running_mean is not None
                and self.running_var is not None):
            # torch: running = momentum * batch + (1 - momentum) * running; an empty batch
            # leaves the statistics as they were (the count still goes up)
            with torch.no_grad():
                rm, rv = self.running_mean, self.running_var
                unbiased = sq.detach() / (n - 1)
                rm.copy_(factor * mean.detach().to(rm.dtype) + (1.0 - factor) * rm)
                rv.copy_(factor * unbiased.to(rv.dtype) + (1.0 - factor) * rv)
        return out.to(x.dtype)


def _convertible(m: nn.Module) -> bool:
    """A BatchNorm whose forward is torch's own (BatchNorm1d/2d/3d and initialised lazy ones) or
    SyncBatchNorm's; a subclass with a forward of its own is refused rather than silently
    replaced (or silently left unsynchronised)."""
    if isinstance(m, GroupBatchNorm) or not isinstance(m, _BatchNorm):
        return False
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        raise ValueError(f"{type(m).__name__} is not initialised yet: run one forward pass "
                         "before convert_batchnorm")
    if type(m).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return True
    raise TypeError(f"convert_batchnorm: {type(m).__name__} overrides BatchNorm's forward; "
                    "it cannot be replaced by GroupBatchNorm")


def _to_group_bn(m: _BatchNorm) -> GroupBatchNorm:
    """A GroupBatchNorm sharing ``m``'s parameters, buffers, flags and hooks (the same tensor
    objects; the containers are shallow copies so the two modules do not share dicts)."""
    new = GroupBatchNorm.__new__(GroupBatchNorm)
    for key, value in m.__dict__.items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, dict | set | list) else value
    new.__dict__.pop("process_group", None)  # SyncBatchNorm's
    new.group = None
    return new


def convert_batchnorm(model: nn.Module) -> list[GroupBatchNorm]:
    """Replace, in place, every BatchNorm layer of ``model`` by a :class:`GroupBatchNorm` that
    keeps the same ``Parameter`` and buffer objects and the same settings and training flag,
    under the same attribute name (``named_parameters`` and ``state_dict`` are unchanged).
    Idempotent. Returns all the model's GroupBatchNorm layers, in ``model.modules()`` order
    (with no group: :func:`set_group` gives them one). A model that *is* a BatchNorm layer
    cannot be replaced in place: raises ``ValueError``."""
    if _convertible(model):
        raise ValueError("convert_batchnorm: the model itself is a BatchNorm layer; wrap it in a "
                         "container (e.g. nn.Sequential) to convert it in place")
    done: dict[int, GroupBatchNorm] = {}  # a layer shared by two parents is converted once
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _convertible(child):
                if id(child) not in done:
                    done[id(child)] = _to_group_bn(child)
                setattr(parent, name, done[id(child)])
    return [m for m in model.modules() if isinstance(m, GroupBatchNorm)]


def set_group(modules: Iterable[GroupBatchNorm], group: dist.ProcessGroup | None) -> None:
    """Synchronise ``modules``' training-mode statistics over ``group`` (``None``: each process
    normalises with its own batch, as plain BatchNorm)."""
    for m in modules:
        m.group = group
