"""SGD: one gradient per update, handed to the base optimizer (PyTorch SGD with momentum and
weight decay, or AdamW)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Algorithm, AlgoState, GradRequest


class SGD(Algorithm):
    """The base optimizer's step with grad f(x_t; B_t); with SGD-momentum
    x_{t+1} = x_t - lr * buf_{t+1},  buf_{t+1} = mu * buf_t + grad f(x_t; B_t) + wd * x_t."""

    name = "sgd"
    stats_role = "grad"
    slots = {"grad": 0}

    def roles(self, state: AlgoState) -> tuple[str, ...]:
        return ("grad",)

    def requests(self, state: AlgoState) -> list[GradRequest]:
        return [GradRequest("grad", state.x, state.step, track_stats=True)]

    def update(self, state: AlgoState, grads: Mapping[str, torch.Tensor]) -> AlgoState:
        self.check_grads(state, grads)
        lr = self.lr_at(state.step)
        self.base_step(state, grads["grad"], lr)
        state.step += 1
        return state
