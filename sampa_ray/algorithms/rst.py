"""RST, randomized sharpness-aware training (Zhao, Zhang, Hu; 2022, "Randomized
Sharpness-Aware Training for Boosting Computational Efficiency in Deep Learning"): each update
is SAM's with probability p_t, else SGD's (the base optimizer's step with the gradient at x_t).

The draws are a function of (seed, update index) alone, so a run, its resumption and every
replica take the same updates. ``ramp`` > 0 schedules p_t = p · min(1, (t + 1) / ramp) (a
linear warm-up of the SAM share, one of the schedules of G-RST); 0 keeps it constant.
Sequential gradients per update: 1 + p on average.
"""

from __future__ import annotations

import random

from pydantic import Field

from .base import LR, _check_range
from .sam import SAM, OccasionalSAM


class RST(OccasionalSAM):
    """SAM with probability p_t, else SGD. Roles: ``ascent`` (every update) and
    ``perturbed`` (SAM's updates), one worker."""

    name = "rst"

    class Params(SAM.Params):
        p: float = Field(0.5, ge=0, le=1, description="probability that an update is SAM's")
        ramp: int = Field(0, ge=0, description="updates over which p_t grows linearly to p "
                          "(0: constant p)")

    def __init__(self, lr: LR, rho: float, p: float = 0.5, ramp: int = 0, seed: int = 0,
                 momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd",
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 adaptive: bool = False) -> None:
        super().__init__(lr, rho, momentum, weight_decay, optimizer, beta1, beta2, eps, adaptive)
        _check_range("p", p, 0.0, 1.0, False, False)
        if isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 0:
            raise ValueError(f"ramp: {ramp!r} is not an integer >= 0")
        self.p, self.ramp, self.seed = float(p), ramp, int(seed)

    def config(self) -> dict[str, float | str]:
        return {**super().config(), "p": self.p, "ramp": self.ramp}

    def p_at(self, step: int) -> float:
        """p_t of update ``step``."""
        return self.p if self.ramp == 0 else self.p * min(1.0, (step + 1) / self.ramp)

    def sam_at(self, step: int) -> bool:
        # one uniform draw per (seed, update), the same in every process (str seeds hash with
        # SHA-512, not with Python's salted hash)
        return random.Random(f"rst:{self.seed}:{step}").random() < self.p_at(step)

    def sam_share(self) -> float:
        return self.p
