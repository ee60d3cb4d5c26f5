"""SAM (Foret et al., 2021): an ascent gradient, then the gradient at the perturbed point.
Two sequential rounds per update, both on batch B_t."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

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
        adaptive: bool = Field(False, description="ASAM's perturbation: scaled per coordinate "
                               "by the weight's magnitude (rho ~ 10x larger)")

    def __init__(self, lr: LR, rho: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 optimizer: str = "sgd", beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, adaptive: bool = False) -> None:
        # every base-optimizer parameter is named here: ``create`` passes what __init__ names
        super().__init__(lr, momentum, weight_decay, optimizer, beta1, beta2, eps)
        _check_range("rho", rho, 0.0, float("inf"), False, True)
        self.rho = float(rho)
        self.adaptive = bool(adaptive)

    def rounds_per_update(self) -> float:
        return 2

    def config(self) -> dict[str, float | str]:
        return {**super().config(), "rho": self.rho, "adaptive": self.adaptive}

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
            normalized_step(self.workspace(state, "perturbed"), state.x, grads["ascent"], self.rho,
                            self.adaptive)
            state.phase = 1
            return state
        lr = self.lr_at(state.step)
        self.base_step(state, grads["perturbed"], lr)
        state.step += 1
        state.phase = 0
        return state


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): SAM whose perturbation is scaled per coordinate by
    the weight's magnitude, x̃ = x + rho · x² ⊙ g / ‖|x| ⊙ g‖ (``davda54/sam``,
    ``adaptive=True``). ``sam`` with ``algo_args: {adaptive: true}`` is the same."""

    name = "asam"

    class Params(SAM.Params):
        adaptive: bool = Field(True, description="ASAM's perturbation (false: plain SAM)")

    def __init__(self, lr: LR, rho: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 optimizer: str = "sgd", beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, adaptive: bool = True) -> None:
        super().__init__(lr, rho, momentum, weight_decay, optimizer, beta1, beta2, eps, adaptive)


class OccasionalSAM(SAM):
    """SAM on some updates only: every update starts with the gradient at x_t on B_t; where
    :meth:`sam_at` says so the update is SAM's (a second, perturbed round), otherwise it ends
    there with :meth:`direction` of that gradient. Which updates are SAM's must follow from the
    update's index alone (not from the gradients), so every backend, replica and shadow runs
    the same rounds. The base of LookSAM and RST."""

    #: whether :meth:`sam_direction` needs the gradient at x_t (kept between the two rounds)
    keeps_ascent: ClassVar[bool] = False

    def sam_at(self, step: int) -> bool:
        """Whether update ``step`` takes SAM's second gradient."""
        raise NotImplementedError

    def sam_share(self) -> float:
        """The share of updates that are SAM's (for :meth:`rounds_per_update`)."""
        raise NotImplementedError

    def rounds_per_update(self) -> float:
        return 1 + self.sam_share()

    def roles(self, state: AlgoState) -> tuple[str, ...]:
        return ("ascent",) if state.phase == 0 else ("perturbed",)

    def direction(self, state: AlgoState, g: torch.Tensor) -> torch.Tensor:
        """The gradient an update without SAM's round hands the base optimizer (plain: ``g``)."""
        return g

    def sam_direction(self, state: AlgoState, g: torch.Tensor, g_s: torch.Tensor
                      ) -> torch.Tensor:
        """The gradient a SAM update hands the base optimizer, from the gradient ``g`` at x_t
        and ``g_s`` at the perturbed point (plain: ``g_s``)."""
        return g_s

    def update(self, state: AlgoState, grads: Mapping[str, torch.Tensor]) -> AlgoState:
        self.check_grads(state, grads)
        if state.phase == 0 and not self.sam_at(state.step):
            self.base_step(state, self.direction(state, grads["ascent"]), self.lr_at(state.step))
            state.step += 1
            return state
        if state.phase == 0:
            if self.keeps_ascent:  # for the SAM update's direction, a round later
                self.workspace(state, "ascent").copy_(grads["ascent"])
            return super().update(state, grads)
        g = self.workspace(state, "ascent") if self.keeps_ascent else grads["perturbed"]
        return super().update(state, {"perturbed": self.sam_direction(state, g,
                                                                      grads["perturbed"])})
