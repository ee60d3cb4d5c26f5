"""The seam every backend uses: an algorithm turns its state into gradient requests, and the
gradients of those requests into the next state.

    state = algo.init(x0)
    while state.step < T:
        reqs  = algo.requests(state)              # independent requests: evaluate them in parallel
        grads = {r.role: grad_of(r.point, r.batch) for r in reqs}
        state = algo.update(state, grads)

Algorithms are pure math on flat 1-D tensors; they know nothing of models, Ray or gRPC. Every
computation keeps x0's dtype and device. ``update`` works in place on the state it is given
(like a torch optimizer) and returns it; a rejected update raises ``ValueError`` before anything
is changed. The points a request carries are buffers owned by the state: they stay valid until the
next ``requests``/``update`` call, so copy them if you need them longer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from .optim import BaseOptimizer, make_optimizer, scratch

LR = float | Callable[[int], float]


@dataclass(frozen=True)
class GradRequest:
    """Evaluate the gradient of the loss on training batch ``batch`` at ``point``.

    ``track_stats`` says whether the pass lies on the optimisation trajectory, so a model with
    BatchNorm should update its running statistics during it (see README, "BatchNorm").
    ``loss_scale`` is not the algorithm's: the loop sets it where the run scales its loss
    (``precision: fp16``, :mod:`sampa_ray.scaler`); the gradient comes back unscaled.
    """

    role: str
    point: torch.Tensor
    batch: int
    track_stats: bool = False
    loss_scale: float | None = None


@dataclass(init=False)
class AlgoState:
    """State of one run. ``step`` counts completed parameter updates; ``phase`` is the round
    inside an update (SAM: 0 ascent, 1 perturbed; SAMPa: 0 bootstrap, 1 steady). ``opt`` is the
    base optimizer's memory (SGD: ``buf`` when momentum != 0; AdamW: ``exp_avg``,
    ``exp_avg_sq``, ``opt_step``), kept as named tensors so checkpoints and replicas carry any
    optimizer's state without knowing which it is."""

    x: torch.Tensor
    step: int = 0
    phase: int = 0
    opt: dict[str, torch.Tensor] = field(default_factory=dict)  # base optimizer state
    g_y: torch.Tensor | None = None  # SAMPa: gradient at the auxiliary point y_t
    work: dict[str, torch.Tensor] = field(default_factory=dict)  # reusable request points
    #: the algorithm's own memory beyond ``g_y`` (LookSAM: the direction it reuses), by name;
    #: checkpointed and carried to replicas like the optimizer's
    mem: dict[str, torch.Tensor] = field(default_factory=dict)

    def __init__(self, x: torch.Tensor, step: int = 0, phase: int = 0,
                 opt: Mapping[str, torch.Tensor] | None = None, g_y: torch.Tensor | None = None,
                 work: dict[str, torch.Tensor] | None = None, *,
                 buf: torch.Tensor | None = None,
                 mem: Mapping[str, torch.Tensor] | None = None) -> None:
        # ``buf=`` is the SGD momentum buffer's name from before optimizers were pluggable
        self.x, self.step, self.phase, self.g_y = x, step, phase, g_y
        self.opt = dict(opt or {})
        if buf is not None:
            self.opt["buf"] = buf
        self.work = {} if work is None else work
        self.mem = dict(mem or {})

    @property
    def buf(self) -> torch.Tensor | None:
        """The SGD momentum buffer (None without momentum, or with another optimizer)."""
        return self.opt.get("buf")

    @buf.setter
    def buf(self, value: torch.Tensor | None) -> None:
        if value is None:
            self.opt.pop("buf", None)
        else:
            self.opt["buf"] = value

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define the state (for checkpoints), without scratch buffers:
        ``x``, the optimizer's tensors by their names, ``g_y``, the algorithm's memory as
        ``mem.<name>``."""
        out = {"x": self.x, **self.opt}
        if self.g_y is not None:
            out["g_y"] = self.g_y
        out.update({MEM + k: v for k, v in self.mem.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], step: int, phase: int) -> AlgoState:
        """The state :meth:`tensors` describes, at ``step`` / ``phase`` (the tensors are taken
        as they are: copy them first if they must stay untouched). Every tensor other than
        ``x``, ``g_y`` and ``mem.*`` is the optimizer's."""
        opt = {k: v for k, v in tensors.items() if k not in _OWN and not k.startswith(MEM)}
        mem = {k[len(MEM):]: v for k, v in tensors.items() if k.startswith(MEM)}
        return cls(x=tensors["x"], step=step, phase=phase, opt=opt, g_y=tensors.get("g_y"),
                   mem=mem)

    def shadow(self) -> AlgoState:
        """A 0-length copy: the same step, phase and which tensors exist, no numbers. An
        algorithm driven on it runs the same rounds, batches and phases without arithmetic."""
        empty = self.x.new_empty(0)
        return AlgoState.from_tensors({k: empty for k in self.tensors()}, self.step, self.phase)


#: the state tensors that are the algorithm's own, not the base optimizer's
_OWN = ("x", "g_y")
#: the prefix of the algorithm's memory among a state's tensors
MEM = "mem."


def _check_range(name: str, value: float, lo: float, hi: float, lo_open: bool,
                 hi_open: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name}: {value!r} is outside {left}{lo}, {hi}{right}")


class NoParams(BaseModel):
    """An algorithm without hyperparameters of its own."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Algorithm(ABC):
    """Base class: hyperparameter checks, the learning rate, gradient validation and the base
    optimizer (``self.opt``: PyTorch SGD with momentum, or AdamW) whose step every algorithm
    shares; the algorithms only differ in which gradient they hand it."""

    name: str = ""
    #: role whose passes lie on the trajectory; its worker keeps the BatchNorm statistics
    stats_role: str = ""
    #: every role the algorithm ever requests, and which worker (0 or 1) serves it: roles in
    #: one round on different workers run in parallel
    slots: Mapping[str, int] = {}
    #: the algorithm's own hyperparameters, with their defaults and bounds: the config's
    #: ``algo_args`` are validated by it (one line per bad value) and handed to ``__init__``
    #: by name (the base optimizer's are the config's own fields)
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, lr: LR, momentum: float = 0.0, weight_decay: float = 0.0,
                 optimizer: str = "sgd", beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        if not callable(lr):
            _check_range("lr", lr, 0.0, math.inf, True, True)
        _check_range("momentum", momentum, 0.0, 1.0, False, True)
        _check_range("weight_decay", weight_decay, 0.0, math.inf, False, True)
        _check_range("beta1", beta1, 0.0, 1.0, False, True)
        _check_range("beta2", beta2, 0.0, 1.0, False, True)
        _check_range("eps", eps, 0.0, math.inf, True, True)
        self.lr = lr
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.opt: BaseOptimizer = make_optimizer(optimizer, momentum, weight_decay, beta1,
                                                 beta2, eps)

    @property
    def all_roles(self) -> tuple[str, ...]:
        """Every role the algorithm ever requests."""
        return tuple(self.slots)

    def slot_of(self, role: str) -> int:
        """The worker that serves ``role``."""
        return self.slots[role]

    _bn_role: str | None = None

    @property
    def bn_stats_role(self) -> str:
        """The role whose worker's BatchNorm statistics evaluation and the outputs use:
        ``stats_role`` unless :meth:`keep_stats_of` chose another."""
        return self._bn_role or self.stats_role

    def keep_stats_of(self, role: str) -> None:
        """Evaluate with the statistics of ``role``'s worker, and let ``role``'s passes update
        them (``--bn-stats perturbed``: the paper's code evaluates with its perturbed rank,
        whose every forward pass updates its statistics). Gradients never depend on running
        statistics (training passes normalise with the batch's own), so the trajectory stays
        the same; only evaluation and the saved buffers change. Applied here, to the requests
        every backend asks this algorithm for, so every backend follows it alike."""
        if role not in self.slots:
            raise ValueError(f"bn_stats: {self.name or type(self).__name__} has no role "
                             f"{role!r} (roles: {', '.join(self.slots)})")
        self._bn_role = role
        if role == self.stats_role:
            return
        inner = self.requests

        def requests(state: AlgoState) -> list[GradRequest]:
            return [replace(r, track_stats=True) if r.role == role else r
                    for r in inner(state)]

        self.requests = requests  # type: ignore[method-assign]

    def workers_used(self) -> list[int]:
        """The workers the algorithm ever uses, in order."""
        return sorted(set(self.slots.values()))

    # -- the protocol -------------------------------------------------------------------------
    def init(self, x0: torch.Tensor) -> AlgoState:
        """A fresh state at ``x0`` (copied; x0 itself is never modified)."""
        if not isinstance(x0, torch.Tensor) or x0.dim() != 1 or not x0.is_floating_point():
            raise ValueError("x0: expected a 1-D floating-point tensor")
        x = x0.detach().clone()
        return AlgoState(x=x, opt=self.opt.init(x), mem=self.init_mem(x))

    def init_mem(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The algorithm's own memory at the start (none by default), shaped by ``x``."""
        return {}

    @abstractmethod
    def roles(self, state: AlgoState) -> tuple[str, ...]:
        """Roles the next ``update`` expects gradients for."""

    @abstractmethod
    def requests(self, state: AlgoState) -> list[GradRequest]:
        """Independent gradient requests of the next round."""

    @abstractmethod
    def update(self, state: AlgoState, grads: Mapping[str, torch.Tensor]) -> AlgoState:
        """Consume the round's gradients; returns the (same, updated) state."""

    def skip(self, state: AlgoState) -> AlgoState:
        """Give up the current update (its gradients were unusable): the parameters, the
        algorithm's memory and the optimizer's (AdamW's step count too) stay as they are, and
        the step counter (so the batch and the learning rate) moves on."""
        state.step += 1
        return state

    def rounds_per_update(self) -> float:
        """Sequential gradient rounds one parameter update costs on average (after any
        bootstrap): what the run's measured ``sequential_gradients_per_update`` tends to."""
        return 1

    def config(self) -> dict[str, float | str]:
        """Hyperparameters, for result files."""
        lr = self.lr if not callable(self.lr) else "schedule"
        return {"algo": self.name, "lr": lr, **self.opt.config()}

    # -- shared pieces ------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step``, checked."""
        lr = self.lr(step) if callable(self.lr) else self.lr
        _check_range("lr", lr, 0.0, math.inf, True, True)
        return float(lr)

    def check_grads(self, state: AlgoState, grads: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` naming the field unless ``grads`` holds exactly the expected
        roles, each a tensor shaped, typed and placed like ``state.x``."""
        expected = set(self.roles(state))
        got = set(grads)
        if got != expected:
            missing = ", ".join(sorted(expected - got)) or "none"
            extra = ", ".join(sorted(got - expected)) or "none"
            raise ValueError(f"grads: expected roles {sorted(expected)}; missing {missing}, "
                             f"unexpected {extra}")
        x = state.x
        for role, g in grads.items():
            if not isinstance(g, torch.Tensor):
                raise ValueError(f"grads[{role}]: expected a tensor, got {type(g).__name__}")
            if g.shape != x.shape:
                raise ValueError(f"grads[{role}]: shape {tuple(g.shape)} != {tuple(x.shape)}")
            if g.dtype != x.dtype:
                raise ValueError(f"grads[{role}]: dtype {g.dtype} != {x.dtype}")
            if g.device != x.device:
                raise ValueError(f"grads[{role}]: device {g.device} != {x.device}")

    def base_step(self, state: AlgoState, g: torch.Tensor, lr: float) -> None:
        """The base optimizer's step with ``g``, in place on x and the optimizer state."""
        self.opt.step(state.x, state.opt, g, lr)

    @staticmethod
    def workspace(state: AlgoState, name: str) -> torch.Tensor:
        """A reusable flat buffer shaped like x (allocated once per state)."""
        return scratch(state.work, name, state.x)


def normalized_step(out: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                    rho: float, adaptive: bool = False) -> torch.Tensor:
    """out = x + rho * g / (||g|| + 1e-12), with one global L2 norm over the flat vector.
    The norm stays a tensor, so on a GPU nothing waits for the host.

    ``adaptive`` (ASAM, Kwon et al. 2021, as ``davda54/sam`` with ``adaptive=True`` computes
    it): out = x + x² ⊙ g · rho / (‖|x| ⊙ g‖ + 1e-12), the perturbation scaled per coordinate
    by the weight's magnitude."""
    if not adaptive:
        norm = torch.linalg.vector_norm(g).add_(1e-12)
        return torch.div(g, norm, out=out).mul_(rho).add_(x)
    scale = torch.linalg.vector_norm(torch.mul(x.abs(), g, out=out)).add_(1e-12)
    scale = torch.div(rho, scale)
    return torch.mul(x, x, out=out).mul_(g).mul_(scale).add_(x)
