"""Parameters as views into one flat buffer.

Algorithms work on flat 1-D vectors. Instead of copying between a model's parameter tensors and a
flat vector on every call, :class:`FlatParams` re-homes every parameter (and its ``.grad``) as a
view into one contiguous buffer: loading a point is one ``copy_`` and, after ``backward``, the flat
gradient buffer already holds the whole gradient (autograd accumulates into existing ``.grad``
tensors in place).
"""

from __future__ import annotations

import torch
from torch import nn


class FlatParams:
    """Own a module's trainable parameters and gradients as two flat buffers.

    Call this after the module is on its final device and dtype: moving the module later would
    replace the views.
    """

    def __init__(self, module: nn.Module) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: has no trainable parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError("model: parameters must share one dtype and device")
        self.numel = sum(p.numel() for p in params)
        self.params = params
        self.data = torch.empty(self.numel, dtype=params[0].dtype, device=params[0].device)
        self.grad = torch.zeros_like(self.data)
        offset = 0
        for p in params:
            n = p.numel()
            view = self.data[offset:offset + n].view_as(p)
            view.copy_(p.detach())
            p.data = view
            p.grad = self.grad[offset:offset + n].view_as(p)
            offset += n

    def load_(self, point: torch.Tensor) -> None:
        """Set the parameters to ``point`` (one copy, any device/dtype conversion included)."""
        if point.shape != self.data.shape:
            raise ValueError(f"point: shape {tuple(point.shape)} != ({self.numel},)")
        self.data.copy_(point, non_blocking=True)

    def zero_grad_(self) -> None:
        self.grad.zero_()

    def check_views(self) -> bool:
        """True while every parameter and gradient still lives in the flat buffers."""
        lo = self.data.data_ptr()
        hi = lo + self.data.numel() * self.data.element_size()
        glo = self.grad.data_ptr()
        ghi = glo + self.grad.numel() * self.grad.element_size()
        return all(lo <= p.data_ptr() < hi and p.grad is not None and glo <= p.grad.data_ptr() < ghi
                   for p in self.params)


def flat_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers (BatchNorm statistics) as detached CPU tensors, by name."""
    return {name: b.detach().to("cpu", copy=True) for name, b in module.named_buffers()}


def load_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Copy named buffers into the module (the names must match exactly)."""
    own = dict(module.named_buffers())
    if set(own) != set(buffers):
        raise ValueError("buffers: names do not match the model's")
    with torch.no_grad():
        for name, b in own.items():
            b.copy_(buffers[name])
