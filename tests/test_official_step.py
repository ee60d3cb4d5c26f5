"""sampa-ray's SAMPa against an independent emulation of the official two-rank step
(LIONS-EPFL/SAMPa train.py, Lightning Fabric on two GPUs), written out here from reading that
code, in float64 on a small nonlinear model.

What the official loop does each iteration, on its two ranks (each holds its own copy of the
parameters and its own torch SGD optimizer; ``agg`` and ``pert`` start at 0):

- rank 0 (perturbed): ``g_y = (agg - pert) / (lam + 1e-15)``; it moves its parameters by
  ``+rho * g_y / (||g_y|| + 1e-12)``, takes the gradient on the *previous* batch, sends
  ``pert = (1 - lam) * grad`` and moves back;
- rank 1 (extrapolated): with a momentum buffer, it moves by ``-lr * (g_y + wd * x + mu * buf)``
  (without one, the first iteration, ``-lr * g_y``), with ``g_y`` its own last gradient (0 at
  first), takes the gradient on the *current* batch, sends ``lam * grad`` and moves back;
- both: ``agg = all_reduce_sum``, then ``optimizer.step()`` with ``agg`` as the gradient.

So the first iteration is a plain SGD step with the gradient at x_0 on batch B_0 (g_y = 0),
while sampa-ray's bootstrap round computes g_y = grad f(x_0; B_0) without an update and then
takes a SAMPa step. Started from the official state after its first iteration, sampa-ray's
update k (batches k and k + 1, learning rate of official iteration k + 1) is official iteration
k + 1, and the two agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from sampa_ray.algorithms import SGD, AlgoState, SAMPa

D, H, K, N, BATCH = 6, 8, 4, 96, 12
MU, WD, RHO = 0.9, 5e-4, 0.05
ITERS, PER_EPOCH = 40, 8  # 5 epochs: the lr changes at each epoch boundary


def _problem() -> tuple[Callable[[torch.Tensor, int], torch.Tensor], torch.Tensor]:
    """A two-layer tanh network's mean cross-entropy on batch k, as a function of the flat
    float64 parameter vector; and x_0."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(N, D, generator=g, dtype=torch.float64)
    ys = torch.randint(0, K, (N,), generator=g)
    sizes = [D * H, H, H * K, K]
    x0 = 0.5 * torch.randn(sum(sizes), generator=g, dtype=torch.float64)

    def grad(w: torch.Tensor, k: int) -> torch.Tensor:
        w = w.detach().clone().requires_grad_(True)
        w1, b1, w2, b2 = torch.split(w, sizes)
        idx = torch.arange(k * BATCH, (k + 1) * BATCH) % N
        hidden = torch.tanh(xs[idx] @ w1.view(D, H) + b1)
        loss = torch.nn.functional.cross_entropy(hidden @ w2.view(H, K) + b2, ys[idx])
        (out,) = torch.autograd.grad(loss, w)
        return out

    return grad, x0


def official_lr(t: int) -> float:
    """CosineAnnealingLR(T_max=epochs) stepped after each epoch: official iteration t."""
    epochs = ITERS // PER_EPOCH
    return 0.1 * 0.5 * (1 + math.cos(math.pi * (t // PER_EPOCH) / epochs))


def _torch_sgd_step(x: torch.Tensor, buf: torch.Tensor | None, grad: torch.Tensor,
                    lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.SGD(momentum=MU, weight_decay=WD), dampening 0: d_p = grad + wd * p; the
    first buffer is a clone of d_p, later buf = mu * buf + d_p; p -= lr * buf."""
    d_p = grad.add(x, alpha=WD)
    buf = d_p.clone() if buf is None else buf.mul(MU).add(d_p)
    return x.add(buf, alpha=-lr), buf


def official(grad: Callable[[torch.Tensor, int], torch.Tensor], x0: torch.Tensor, lam: float,
             iters: int) -> list[dict[str, torch.Tensor]]:
    """Both ranks, iteration by iteration; after each, the state of every rank."""
    x = [x0.clone(), x0.clone()]
    buf: list[torch.Tensor | None] = [None, None]
    y_grads1 = torch.zeros_like(x0)  # rank 1's y_grads
    pert = torch.zeros_like(x0)
    agg = torch.zeros_like(x0)
    out = []
    for t in range(iters):
        lr = official_lr(t)
        prev, cur = max(t - 1, 0), t  # data1 is the previous batch (the first: the same)
        # rank 0: the perturbed gradient at x + rho * g_y / ||g_y||, g_y recovered from the sum
        g_y0 = (agg - pert) / (lam + 1e-15)
        d0 = g_y0 * -(RHO / (g_y0.norm(p=2) + 1e-12))
        x0p = x[0] - d0
        pert = grad(x0p, prev) * (1 - lam)
        send0 = pert.clone()
        # rank 1: the extrapolated gradient at the momentum step's look-ahead
        b1 = buf[1]
        d1 = lr * (y_grads1 + (WD * x[1] + b1 * MU)) if b1 is not None else lr * y_grads1
        x1p = x[1] - d1
        y_grads1 = grad(x1p, cur)
        send1 = lam * y_grads1
        agg = send0 + send1  # fabric.all_reduce(reduce_op="sum")
        x = [x0p + d0, x1p + d1]  # each rank moves back by what it moved
        for r in (0, 1):
            x[r], buf[r] = _torch_sgd_step(x[r], buf[r], agg, lr)
        out.append({"x0": x[0].clone(), "x1": x[1].clone(), "buf1": buf[1].clone(),
                    "g_y": y_grads1.clone()})
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("lam", [0.2, 0.5])
def test_sampa_ray_follows_the_official_two_rank_step_once_the_first_update_is_aligned(
        lam: float) -> None:
    grad, x0 = _problem()
    ref = official(grad, x0, lam, ITERS)
    first = ref[0]
    assert torch.equal(first["x0"], first["x1"])  # iteration 0 moved nothing by rounding
    # sampa-ray from the official state after its first update: x_1, its momentum buffer and
    # g_y = grad f(y_1; B_0) with y_1 = x_0; sampa-ray's update k is official iteration k + 1
    algo = SAMPa(lambda k: official_lr(k + 1), rho=RHO, lam=lam, momentum=MU, weight_decay=WD)
    state = AlgoState(x=first["x1"].clone(), step=0, phase=1, buf=first["buf1"].clone(),
                      g_y=first["g_y"].clone())
    worst = 0.0
    for t in range(1, ITERS):
        reqs = algo.requests(state)
        assert [(r.role, r.batch) for r in reqs] == [("perturbed", t - 1), ("extrapolated", t)]
        algo.update(state, {r.role: grad(r.point, r.batch) for r in reqs})
        for rank in ("x0", "x1"):
            worst = max(worst, _rel(state.x, ref[t][rank]))
        assert worst <= 1e-12, (t, worst)
    # the runs moved: not trivially equal vectors
    assert _rel(state.x, x0) > 1e-2
    assert _rel(ref[-1]["x0"], ref[-1]["x1"]) < 1e-12  # the ranks drift apart by rounding only


def test_without_alignment_the_first_update_differs() -> None:
    """sampa-ray's bootstrap makes its first update a real SAMPa step; the official one is an
    SGD step with grad f(x_0; B_0)."""
    grad, x0 = _problem()
    ref = official(grad, x0, 0.2, 1)
    sgd_x, _ = _torch_sgd_step(x0, None, grad(x0, 0), official_lr(0))
    assert _rel(ref[0]["x0"], sgd_x) <= 1e-15
    algo = SAMPa(official_lr, rho=RHO, lam=0.2, momentum=MU, weight_decay=WD)
    state = algo.init(x0)
    while state.step < 1:
        algo.update(state, {r.role: grad(r.point, r.batch) for r in algo.requests(state)})
    assert _rel(state.x, ref[0]["x0"]) > 1e-6


def test_the_official_lambda_zero_is_sgd_on_the_previous_batch() -> None:
    """With lam = 0 the recovered g_y is (agg - pert) / 1e-15 = 0: no perturbation, and the
    update is the gradient at x_t on batch B_{t-1}, plain SGD; sampa-ray's SAMPa-0 is not."""
    grad, x0 = _problem()
    ref = official(grad, x0, 0.0, 12)
    sgd = SGD(official_lr, momentum=MU, weight_decay=WD)
    state = sgd.init(x0)
    for t in range(12):
        (req,) = sgd.requests(state)
        sgd.update(state, {req.role: grad(req.point, max(req.batch - 1, 0))})
        assert _rel(state.x, ref[t]["x0"]) <= 1e-12
    sampa0 = SAMPa(official_lr, rho=RHO, lam=0.0, momentum=MU, weight_decay=WD)
    s = sampa0.init(x0)
    while s.step < 12:
        sampa0.update(s, {r.role: grad(r.point, r.batch) for r in sampa0.requests(s)})
    assert _rel(s.x, ref[-1]["x0"]) > 1e-6
