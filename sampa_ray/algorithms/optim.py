"""Base optimizers: the rule that turns one update's gradient into a parameter step.

SGD, SAM and SAMPa differ in *which* gradient they hand over; what is then done with it is the
base optimizer's business, so it lives here, once, for all of them. SAMPa needs one thing more
than a step: the point y where the base optimizer *would* move x with a gradient, without
changing its memory (its look-ahead). Writing both next to each other keeps them consistent: the
look-ahead is the step computed into scratch buffers.

Everything works in place on flat 1-D tensors and keeps x's dtype and device. The optimizer's
memory is a plain ``dict[str, Tensor]`` (``AlgoState.opt``), so checkpoints and the replicated
data path carry it like any other state tensor, and a 0-length shadow of it (``AlgoState.shadow``)
runs the same code without arithmetic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

#: the base optimizers a config may name
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")


def scratch(work: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    """A reusable buffer shaped like ``like``, kept in ``work`` (allocated once per state, so
    the memory of a run stays constant)."""
    w = work.get(name)
    if w is None:
        w = work[name] = torch.empty_like(like)
    return w


class BaseOptimizer(ABC):
    """A parameter-update rule with memory. Subclasses name their state tensors in ``init``;
    ``step`` consumes a gradient for real; ``lookahead`` only says where a step would go."""

    name: str = ""

    def __init__(self, weight_decay: float = 0.0) -> None:
        self.weight_decay = float(weight_decay)

    @abstractmethod
    def init(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optimizer's fresh state for parameters ``x`` (possibly empty)."""

    @abstractmethod
    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], g: torch.Tensor,
             lr: float) -> None:
        """Move ``x`` with gradient ``g`` at learning rate ``lr``, updating ``state``; in place."""

    @abstractmethod
    def lookahead(self, out: torch.Tensor, x: torch.Tensor, state: dict[str, torch.Tensor],
                  g: torch.Tensor, lr: float, work: dict[str, torch.Tensor]) -> torch.Tensor:
        """Write into ``out`` the point :meth:`step` would move ``x`` to with ``g``, leaving
        ``x`` and ``state`` untouched (``work`` holds reusable scratch buffers). Returns out."""

    def config(self) -> dict[str, float | str]:
        """Hyperparameters, for result files."""
        return {"optimizer": self.name, "weight_decay": self.weight_decay}


class SGDMomentum(BaseOptimizer):
    """PyTorch SGD (dampening 0, no Nesterov): buf = mu*buf + g + wd*x;  x -= lr*buf.
    State: ``buf``, only when momentum != 0 (without momentum SGD has no memory)."""

    name = "sgd"

    def __init__(self, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.momentum = float(momentum)

    def init(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"buf": torch.zeros_like(x)} if self.momentum != 0.0 else {}

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], g: torch.Tensor,
             lr: float) -> None:
        # the op order is the one the bitwise tests against torch.optim.SGD pin down
        buf = state.get("buf")
        if buf is None:
            if self.weight_decay:
                # x - lr*(g + wd*x) == x*(1 - lr*wd) - lr*g
                x.mul_(1.0 - lr * self.weight_decay)
            x.add_(g, alpha=-lr)
            return
        buf.mul_(self.momentum).add_(g)
        if self.weight_decay:
            buf.add_(x, alpha=self.weight_decay)
        x.add_(buf, alpha=-lr)

    def lookahead(self, out: torch.Tensor, x: torch.Tensor, state: dict[str, torch.Tensor],
                  g: torch.Tensor, lr: float, work: dict[str, torch.Tensor]) -> torch.Tensor:
        """y = x - lr*(g + wd*x + mu*buf): the step with buf's update folded in, no scratch
        needed (the op order matches the SAMPa trajectories recorded before this module)."""
        out.copy_(g)
        if self.weight_decay:
            out.add_(x, alpha=self.weight_decay)
        buf = state.get("buf")
        if buf is not None:
            out.add_(buf, alpha=self.momentum)
        return out.mul_(-lr).add_(x)

    def config(self) -> dict[str, float | str]:
        return {"optimizer": self.name, "momentum": self.momentum,
                "weight_decay": self.weight_decay}


class AdamW(BaseOptimizer):
    """torch.optim.AdamW (single-tensor, non-capturable path, no amsgrad), op for op:

        x *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g;  k += 1
        x -= lr/(1-b1^k) * m / (sqrt(v)/sqrt(1-b2^k) + eps)

    State: ``exp_avg`` (m), ``exp_avg_sq`` (v) and ``opt_step`` (k), a 1-element float64 tensor
    so checkpoints carry it. It lives on the host, as torch keeps it: the bias corrections are
    host numbers, and reading a device scalar would stall the update until the device caught
    up. A count that arrives on a device (a replica seeded from host arrays) moves back once.
    A 0-length count (a shadow state) is read as 0 and never advanced."""

    name = "adamw"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def init(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"exp_avg": torch.zeros_like(x), "exp_avg_sq": torch.zeros_like(x),
                "opt_step": torch.zeros(1, dtype=torch.float64)}

    @staticmethod
    def _count(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The step count as a host tensor, or None for a shadow's 0-length one."""
        k = state["opt_step"]
        if k.numel() == 0:
            return None
        if k.device.type != "cpu" or k.dtype != torch.float64:
            k = state["opt_step"] = k.to("cpu", torch.float64)
        return k

    def _factors(self, lr: float, k: float) -> tuple[float, float]:
        """step size and sqrt of the second bias correction, computed as torch does."""
        bias_correction1 = 1 - self.beta1 ** k
        bias_correction2 = 1 - self.beta2 ** k
        return lr / bias_correction1, bias_correction2 ** 0.5

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], g: torch.Tensor,
             lr: float) -> None:
        count = self._count(state)
        if count is not None:
            count += 1
        k = float(count.item()) if count is not None else 1.0  # a shadow: any valid k
        if self.weight_decay != 0:
            x.mul_(1 - lr * self.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        step_size, bc2_sqrt = self._factors(lr, k)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
        x.addcdiv_(exp_avg, denom, value=-step_size)

    def lookahead(self, out: torch.Tensor, x: torch.Tensor, state: dict[str, torch.Tensor],
                  g: torch.Tensor, lr: float, work: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same step with moments updated by g and k+1, computed into two scratch buffers
        and thrown away: ``state`` is read, never written."""
        count = self._count(state)
        k = (float(count.item()) if count is not None else 0.0) + 1.0
        m = torch.lerp(state["exp_avg"], g, 1 - self.beta1, out=scratch(work, "adamw_m", x))
        v = torch.mul(state["exp_avg_sq"], self.beta2, out=scratch(work, "adamw_v", x))
        v.addcmul_(g, g, value=1 - self.beta2)
        step_size, bc2_sqrt = self._factors(lr, k)
        denom = v.sqrt_().div_(bc2_sqrt).add_(self.eps)
        if self.weight_decay != 0:
            torch.mul(x, 1 - lr * self.weight_decay, out=out)
        else:
            out.copy_(x)
        return out.addcdiv_(m, denom, value=-step_size)

    def config(self) -> dict[str, float | str]:
        return {"optimizer": self.name, "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps, "weight_decay": self.weight_decay}


def make_optimizer(optimizer: str, momentum: float = 0.0, weight_decay: float = 0.0,
                   beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
                   ) -> BaseOptimizer:
    """The base optimizer a config names, with the hyperparameters it uses (the others are
    ignored: AdamW has no ``momentum``, SGD no betas)."""
    if optimizer == "sgd":
        return SGDMomentum(momentum, weight_decay)
    if optimizer == "adamw":
        return AdamW(beta1, beta2, eps, weight_decay)
    raise ValueError(f"optimizer: unknown base optimizer {optimizer!r} (known: "
                     f"{', '.join(OPTIMIZERS)})")
