"""SAMPa (Xie, Pethick, Cevher, NeurIPS 2024): SAM with its two gradients made independent.

    x̃_t     = x_t + rho * g_y / (||g_y|| + 1e-12)          g_y = grad f(y_t; B_t)
    y_{t+1} = x_t - lr_t * (g_y + wd * x_t + mu * buf_t)     look-ahead of the momentum step
    in parallel:  g_p = grad f(x̃_t; B_t)    g_e = grad f(y_{t+1}; B_{t+1})
    g       = (1 - lam) * g_p + lam * g_e
    buf_{t+1} = mu * buf_t + g + wd * x_t ;  x_{t+1} = x_t - lr_t * buf_{t+1}
    g_y <- g_e

Bootstrap: y_0 = x_0, one round computes g_y = grad f(x_0; B_0) before the first update. Both
gradients are sent separately, so lam = 0 is plain SAMPa (not SGD).

With another base optimizer the two SGD lines become its look-ahead and its step: y_{t+1} is
where it would move x_t with g_y without changing its state (AdamW: the step with moments
updated by g_y and the count advanced, then thrown away), and x_{t+1} its real step with g.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import LR, Algorithm, AlgoState, GradRequest, _check_range, normalized_step


class SAMPa(Algorithm):
    """SAMPa-lam. Roles: ``perturbed`` (batch t) and ``extrapolated`` (batch t+1)."""

    name = "sampa"
    stats_role = "extrapolated"
    slots = {"perturbed": 0, "extrapolated": 1}  # independent: two workers at once

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        rho: float = Field(0.05, ge=0, allow_inf_nan=False, description="radius of the "
                           "perturbation")
        lam: float = Field(0.2, ge=0, le=1, description="weight of the extrapolated gradient "
                           "in the update, (1 - lam) g_p + lam g_e (0: plain SAMPa)")
        adaptive: bool = Field(False, description="ASAM's perturbation: scaled per coordinate "
                               "by the weight's magnitude (rho ~ 10x larger)")

    def __init__(self, lr: LR, rho: float, lam: float = 0.0, momentum: float = 0.0,
                 weight_decay: float = 0.0, optimizer: str = "sgd", beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, adaptive: bool = False) -> None:
        # every base-optimizer parameter is named here: ``create`` passes what __init__ names
        super().__init__(lr, momentum, weight_decay, optimizer, beta1, beta2, eps)
        _check_range("rho", rho, 0.0, float("inf"), False, True)
        _check_range("lam", lam, 0.0, 1.0, False, False)
        self.rho = float(rho)
        self.lam = float(lam)
        self.adaptive = bool(adaptive)

    def config(self) -> dict[str, float | str]:
        return {**super().config(), "rho": self.rho, "lam": self.lam, "adaptive": self.adaptive}

    def roles(self, state: AlgoState) -> tuple[str, ...]:
        return ("extrapolated",) if state.phase == 0 else ("perturbed", "extrapolated")

    def requests(self, state: AlgoState) -> list[GradRequest]:
        if state.phase == 0:  # bootstrap: g_y = grad f(x_0; B_0) (B_step after a skip)
            return [GradRequest("extrapolated", state.x, state.step, track_stats=True)]
        assert state.g_y is not None
        x, g_y = state.x, state.g_y
        x_tilde = normalized_step(self.workspace(state, "perturbed"), x, g_y, self.rho,
                                  self.adaptive)
        y = self.opt.lookahead(self.workspace(state, "extrapolated"), x, state.opt, g_y,
                               self.lr_at(state.step), state.work)
        return [GradRequest("perturbed", x_tilde, state.step),
                GradRequest("extrapolated", y, state.step + 1, track_stats=True)]

    def update(self, state: AlgoState, grads: Mapping[str, torch.Tensor]) -> AlgoState:
        self.check_grads(state, grads)
        g_e = grads["extrapolated"]
        if state.phase == 0:
            state.g_y = g_e.detach().clone()
            state.phase = 1
            return state
        lr = self.lr_at(state.step)
        g_p = grads["perturbed"]
        if self.lam == 0.0:
            g = g_p
        else:
            g = torch.mul(g_p, 1.0 - self.lam, out=self.workspace(state, "combined"))
            g.add_(g_e, alpha=self.lam)
        self.base_step(state, g, lr)
        assert state.g_y is not None
        state.g_y.copy_(g_e)
        state.step += 1
        return state
