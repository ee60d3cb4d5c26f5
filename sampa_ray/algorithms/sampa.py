"""SAMPa (Xie, Pethick, Cevher, NeurIPS 2024): SAM with its two gradients made independent.

    x̃_t     = x_t + rho * g_y / (||g_y|| + 1e-12)          g_y = grad f(y_t; B_t)
    y_{t+1} = x_t - lr_t * (g_y + wd * x_t + mu * buf_t)     look-ahead of the momentum step
    in parallel:  g_p = grad f(x̃_t; B_t)    g_e = grad f(y_{t+1}; B_{t+1})
    g       = (1 - lam) * g_p + lam * g_e
    buf_{t+1} = mu * buf_t + g + wd * x_t ;  x_{t+1} = x_t - lr_t * buf_{t+1}
    g_y <- g_e

Bootstrap: y_0 = x_0, one round computes g_y = grad f(x_0; B_0) before the first update. Both
gradients are sent separately, so lam = 0 is plain SAMPa (not SGD).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import LR, Algorithm, AlgoState, GradRequest, _check_range, normalized_step


class SAMPa(Algorithm):
    """SAMPa-lam. Roles: ``perturbed`` (batch t) and ``extrapolated`` (batch t+1)."""

    name = "sampa"
    stats_role = "extrapolated"
    slots = {"perturbed": 0, "extrapolated": 1}  # independent: two workers at once

    def __init__(self, lr: LR, rho: float, lam: float = 0.0, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr, momentum, weight_decay)
        _check_range("rho", rho, 0.0, float("inf"), False, True)
        _check_range("lam", lam, 0.0, 1.0, False, False)
        self.rho = float(rho)
        self.lam = float(lam)

    def config(self) -> dict[str, float | str]:
        return {**super().config(), "rho": self.rho, "lam": self.lam}

    def roles(self, state: AlgoState) -> tuple[str, ...]:
        return ("extrapolated",) if state.phase == 0 else ("perturbed", "extrapolated")

    def requests(self, state: AlgoState) -> list[GradRequest]:
        if state.phase == 0:  # bootstrap: g_y = grad f(x_0; B_0) (B_step after a skip)
            return [GradRequest("extrapolated", state.x, state.step, track_stats=True)]
        assert state.g_y is not None
        x, g_y = state.x, state.g_y
        x_tilde = normalized_step(self.workspace(state, "perturbed"), x, g_y, self.rho)
        y = self.workspace(state, "extrapolated").copy_(g_y)
        if self.weight_decay:
            y.add_(x, alpha=self.weight_decay)
        if state.buf is not None:
            y.add_(state.buf, alpha=self.momentum)
        y.mul_(-self.lr_at(state.step)).add_(x)
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
        self.sgd_step(state, g, lr)
        assert state.g_y is not None
        state.g_y.copy_(g_e)
        state.step += 1
        return state
