"""The dynamic loss scale of ``precision: fp16``: torch.amp.GradScaler's rule, followed on the
rounds' verdicts.

Under fp16 autocast a gradient's small entries underflow to zero; scaling the loss by S before
the backward pass keeps them, and the gradient is unscaled (times 1/S) on the worker before it
leaves, so the algorithm and the data plane only ever see true-scale gradients. A round whose
gradients are non-finite (:func:`~sampa_ray.loop.round_applies` says no) is skipped as every
non-finite round is, and S halves; after ``growth_interval`` applied rounds in a row S doubles.
These are GradScaler's defaults (growth 2, backoff 0.5) and its arithmetic: S is a float32
value, 1/S is float32(1 / float64(S)), and a growth that would make S infinite is not taken.

The scale is a pure function of the sequence of verdicts, and every side sees the same verdicts:
the loop follows them on its :class:`LossScale` (and checkpoints it), and every worker that
applies rounds on its own (the replicated, collective and free paths) follows them on a replica
of it, so the scale each worker multiplies its loss by is the one the loop holds, without a
message. Where the loop hands the workers their points (local, points), each request carries
the scale (``GradRequest.loss_scale``).

GradScaler itself is not used: its API unscales an optimizer's parameters in one process and
decides from the infinities it found there; here the gradient is one flat vector, the verdict
is the round's (every role's gradient, on every worker) and the scale lives in several
processes at once. Its rule is a few lines, followed here by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .algorithms import GradRequest
    from .config import TrainConfig

#: below this scale the gradients are non-finite at any scale worth using: the run stops (the
#: lowest ``fp16_init_scale`` the config takes)
FLOOR = 2.0 ** -24
GROWTH = 2.0  # torch.amp.GradScaler's growth_factor
BACKOFF = 0.5  # and backoff_factor


def _f32(v: float) -> float:
    """``v`` rounded to float32 (inf beyond its range), as a torch float32 scale holds it."""
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def inverse(scale: float) -> float:
    """1/S as GradScaler unscales with it: float32(1 / float64(S))."""
    return _f32(1.0 / scale)


@dataclass
class LossScale:
    """The current scale S and the applied rounds since it last changed (GradScaler's growth
    tracker). ``init`` and ``growth_interval`` come from the config."""

    init: float
    growth_interval: int
    scale: float = math.nan
    good: int = 0

    def __post_init__(self) -> None:
        self.init = _f32(self.init)
        if math.isnan(self.scale):
            self.scale = self.init

    @classmethod
    def of(cls, cfg: TrainConfig) -> LossScale | None:
        """The run's scale at its start: None unless ``precision`` is fp16."""
        if cfg.precision != "fp16":
            return None
        return cls(cfg.fp16_init_scale, cfg.fp16_growth_interval)

    def follow(self, applied: bool) -> None:
        """One round's verdict: an applied round counts towards growth; a skipped one (its
        gradients overflowed) halves the scale."""
        if not applied:
            self.scale, self.good = _f32(self.scale * BACKOFF), 0
            return
        self.good += 1
        if self.good == self.growth_interval:
            grown = _f32(self.scale * GROWTH)
            if math.isfinite(grown):  # as GradScaler: an infinite scale is not taken
                self.scale = grown
            self.good = 0

    @property
    def exhausted(self) -> bool:
        """The scale fell below :data:`FLOOR`: the gradients overflow at any useful scale."""
        return self.scale < FLOOR

    def stamp(self, reqs: list[GradRequest]) -> list[GradRequest]:
        """The requests with this scale on them (for workers that do not follow the
        verdicts themselves)."""
        return [replace(r, loss_scale=self.scale) for r in reqs]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain JSON: a float32 value is exact in it)."""
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, d: Mapping[str, Any] | None) -> None:
        """Continue from :meth:`state_dict`; None: the scale a run starts with."""
        if d is None:
            self.scale, self.good = self.init, 0
        else:
            self.scale, self.good = _f32(float(d["scale"])), int(d["good"])


def describe(scale: float) -> str:
    """A scale for people: a power of two as 2**k, anything else as it is."""
    m, e = math.frexp(scale)
    return f"2**{e - 1}" if m == 0.5 else f"{scale:g}"


__all__ = ["BACKOFF", "FLOOR", "GROWTH", "LossScale", "describe", "inverse"]
