"""SAM (Foret et al., 2021): an ascent gradient, then the gradient at the perturbed point.
Two sequential rounds per update, both on batch B_t."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import LR, Algorithm, AlgoState, GradRequest, _check_range, normalized_step


class SAM(Algorithm):
    """x̃_t = x_t + rho * g / (||g|| + 1e-12) with g = grad f(x_t; B_t);
    then the base optimizer's step with grad f(x̃_t; B_t)."""

    name = "sam"
    stats_role = "ascent"
    slots = {"ascent": 0, "perturbed": 0}  # sequential: one worker

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        rho: float = Field(0.05, ge=0, allow_inf_nan=False, description="radius of the "
                           "perturbation")

    def __init__(self, lr: LR, rho: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 optimizer: str = "sgd", beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        # every base-optimizer parameter is named here: ``create`` passes what __init__ names
        super().__init__(lr, momentum, weight_decay, optimizer, beta1, beta2, eps)
        _check_range("rho", rho, 0.0, float("inf"), False, True)
        self.rho = float(rho)

    def rounds_per_update(self) -> int:
        return 2

    def config(self) -> dict[str, float | str]:
        return {**super().config(), "rho": self.rho}

    def skip(self, state: AlgoState) -> AlgoState:
        state.phase = 0  # a skipped update restarts with the ascent gradient
        return super().skip(state)

    def roles(self, state: AlgoState) -> tuple[str, ...]:
        return ("ascent",) if state.phase == 0 else ("perturbed",)

    def requests(self, state: AlgoState) -> list[GradRequest]:
        if state.phase == 0:
            return [GradRequest("ascent", state.x, state.step, track_stats=True)]
        return [GradRequest("perturbed", self.workspace(state, "perturbed"), state.step)]

    def update(self, state: AlgoState, grads: Mapping[str, torch.Tensor]) -> AlgoState:
        self.check_grads(state, grads)
        if state.phase == 0:
            normalized_step(self.workspace(state, "perturbed"), state.x, grads["ascent"], self.rho)
            state.phase = 1
            return state
        lr = self.lr_at(state.step)
        self.base_step(state, grads["perturbed"], lr)
        state.step += 1
        state.phase = 0
        return state
