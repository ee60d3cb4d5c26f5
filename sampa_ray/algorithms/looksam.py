"""LookSAM (Liu, Mai, Chen, Hsieh, You; CVPR 2022, "Towards Efficient and Scalable
Sharpness-Aware Minimization", Algorithm 1): SAM's second gradient every ``k`` updates only.
A SAM update keeps the part of its perturbed gradient g_s orthogonal to the plain gradient g,

    g_v = g_s - (g·g_s / ‖g‖²) g

and the k - 1 updates after it reuse that direction with the gradient at x_t alone:

    g_s ≈ g + alpha · (‖g‖ / ‖g_v‖) · g_v

Sequential gradients per update: 1 + 1/k. Before the first SAM update (update 0 is one, unless
its gradient was unusable) g_v is 0, so such updates are SGD's.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import LR, AlgoState, _check_range
from .sam import SAM, OccasionalSAM


class LookSAM(OccasionalSAM):
    """SAM on updates 0, k, 2k, ...; in between, g plus ``alpha`` times the reused direction
    g_v rescaled to ‖g‖. Roles: ``ascent`` (every update) and ``perturbed`` (SAM's updates),
    one worker."""

    name = "looksam"
    keeps_ascent = True

    class Params(SAM.Params):
        k: int = Field(5, ge=1, description="a SAM update every k updates")
        alpha: float = Field(0.7, ge=0, allow_inf_nan=False, description="weight of the reused "
                             "direction g_v (rescaled to ||g||) in the updates in between")

    def __init__(self, lr: LR, rho: float, k: int = 5, alpha: float = 0.7,
                 momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd",
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 adaptive: bool = False) -> None:
        super().__init__(lr, rho, momentum, weight_decay, optimizer, beta1, beta2, eps, adaptive)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: {k!r} is not an integer >= 1")
        _check_range("alpha", alpha, 0.0, float("inf"), False, True)
        self.k, self.alpha = k, float(alpha)

    def config(self) -> dict[str, float | str]:
        return {**super().config(), "k": self.k, "alpha": self.alpha}

    def sam_at(self, step: int) -> bool:
        return step % self.k == 0

    def sam_share(self) -> float:
        return 1 / self.k

    def init_mem(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"g_v": torch.zeros_like(x)}

    def sam_direction(self, state: AlgoState, g: torch.Tensor, g_s: torch.Tensor
                      ) -> torch.Tensor:
        # g_v = g_s - (g·g_s / ‖g‖²) g, the projection a tensor (nothing waits for the host)
        g_v = state.mem["g_v"]
        coef = torch.dot(g, g_s).div_(torch.dot(g, g).add_(1e-12))
        torch.mul(g, coef, out=g_v).neg_().add_(g_s)
        return g_s

    def direction(self, state: AlgoState, g: torch.Tensor) -> torch.Tensor:
        g_v = state.mem["g_v"]
        scale = torch.linalg.vector_norm(g).div_(torch.linalg.vector_norm(g_v).add_(1e-12))
        out = self.workspace(state, "direction")
        return torch.mul(g_v, scale.mul_(self.alpha), out=out).add_(g)
