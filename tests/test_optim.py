"""Base optimizers (``optimizer: sgd|adamw``): AdamW against torch.optim.AdamW step for step, for
SGD, SAM and SAMPa; SAMPa's AdamW look-ahead against a deep-copied torch optimizer; the state
through tensors, checkpoints and 0-length shadows. The SGD-momentum path is pinned bit for bit
by test_algorithms.py and test_official_step.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sampa_ray.algorithms import SAM, SGD, AdamW, AlgoState, SAMPa, SGDMomentum, create
from sampa_ray.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

DIM = 40
HYPER = {"beta1": 0.8, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.05}
ADAMW_KEYS = {"exp_avg", "exp_avg_sq", "opt_step"}


def lr(t: int) -> float:
    """A learning rate that changes every step (warm-up then decay)."""
    return 0.01 * min(1.0, (t + 1) / 4) * (0.9 ** t)


def x0(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(1), dtype=dtype)


def random_grad(t: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(100 + t), dtype=dtype)


def quad_grad(point: torch.Tensor, k: int) -> torch.Tensor:
    """Batch k's quadratic f(x; B_k) = 1/2 sum_i a_i (x_i - c_i)^2."""
    i = torch.arange(DIM, dtype=point.dtype)
    a = 1.0 + 0.3 * ((i * 7 + k * 3) % 5)
    c = torch.sin(1.0 + i + 2.0 * k)
    return a * (point - c)


def torch_adamw(x: torch.Tensor) -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    p = torch.nn.Parameter(x.clone())
    opt = torch.optim.AdamW([p], lr=lr(0), betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], foreach=False)
    return p, opt


def torch_step(p: torch.nn.Parameter, opt: torch.optim.Optimizer, g: torch.Tensor,
               lr_t: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr_t
    p.grad = g.clone()
    opt.step()


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_with_adamw_matches_torch_adamw(dtype: torch.dtype) -> None:
    algo = SGD(lr=lr, optimizer="adamw", **HYPER)
    state = algo.init(x0(dtype))
    assert set(state.opt) == ADAMW_KEYS and state.buf is None
    p, opt = torch_adamw(x0(dtype))
    for t in range(20):
        g = random_grad(t, dtype)
        algo.update(state, {"grad": g})
        torch_step(p, opt, g, lr(t))
        # the same ops in the same order: equal to the bit, not just close
        assert torch.equal(state.x, p.detach()), t
        ref = opt.state[p]
        assert torch.equal(state.opt["exp_avg"], ref["exp_avg"])
        assert torch.equal(state.opt["exp_avg_sq"], ref["exp_avg_sq"])
        assert float(state.opt["opt_step"]) == float(ref["step"]) == t + 1
    assert not torch.equal(state.x, x0(dtype))  # it moved


def test_adamw_moves_as_written_by_hand() -> None:
    """One AdamW step from zero moments, from the formula: m = (1-b1) g, v = (1-b2) g²,
    x ← x(1 - lr wd) - lr m/(1-b1) / (sqrt(v/(1-b2)) + eps) = x(1 - lr wd) - lr g/(|g| + eps)."""
    x, g = x0(torch.float64), random_grad(0, torch.float64)
    algo = SGD(lr=0.1, optimizer="adamw", **HYPER)
    state = algo.init(x)
    algo.update(state, {"grad": g})
    want = x * (1 - 0.1 * HYPER["weight_decay"]) - 0.1 * g / (g.abs() + HYPER["eps"])
    close(state.x, want, rtol=1e-12)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam_with_adamw_is_adamw_on_the_perturbed_gradient(rho: float) -> None:
    algo = SAM(lr=lr, rho=rho, optimizer="adamw", **HYPER)
    state = algo.init(x0(torch.float64))
    p, opt = torch_adamw(x0(torch.float64))
    for t in range(12):
        for _ in range(2):  # ascent, then perturbed
            (r,) = algo.requests(state)
            algo.update(state, {r.role: quad_grad(r.point, r.batch)})
        with torch.no_grad():
            x = p.detach().clone()
            g = quad_grad(x, t)
            g_p = quad_grad(x + rho * g / (g.norm() + 1e-12), t)
        torch_step(p, opt, g_p, lr(t))
        close(state.x, p.detach(), rtol=1e-10)
    assert state.step == 12


@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
def test_sampa_with_adamw_is_adamw_on_the_mixed_gradient(lam: float) -> None:
    """x follows torch AdamW on (1-λ)g_p + λg_e; y is where a deep copy of that optimizer goes
    with g_y; requests() leaves the state as it was, to the bit."""
    rho = 0.1
    algo = SAMPa(lr=lr, rho=rho, lam=lam, optimizer="adamw", **HYPER)
    state = algo.init(x0(torch.float64))
    (boot,) = algo.requests(state)
    algo.update(state, {"extrapolated": quad_grad(boot.point, boot.batch)})
    p, opt = torch_adamw(x0(torch.float64))
    g_y = quad_grad(x0(torch.float64), 0)
    for t in range(12):
        before = {k: v.clone() for k, v in state.tensors().items()}
        reqs = {r.role: r for r in algo.requests(state)}
        after = state.tensors()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items()), t
        # the reference look-ahead: a deep copy of torch's AdamW stepped with g_y
        shadow_opt = copy.deepcopy(opt)
        (q,) = shadow_opt.param_groups[0]["params"]
        torch_step(q, shadow_opt, g_y, lr(t))
        y = q.detach()
        assert torch.equal(reqs["extrapolated"].point, y), t
        assert reqs["extrapolated"].batch == t + 1 and reqs["perturbed"].batch == t
        x = p.detach().clone()
        close(reqs["perturbed"].point, x + rho * g_y / (g_y.norm() + 1e-12), rtol=1e-12)
        g_p, g_e = quad_grad(reqs["perturbed"].point, t), quad_grad(y, t + 1)
        algo.update(state, {"perturbed": g_p, "extrapolated": g_e})
        torch_step(p, opt, (1 - lam) * g_p + lam * g_e, lr(t))
        close(state.x, p.detach(), rtol=1e-12)
        assert float(state.opt["opt_step"]) == float(opt.state[p]["step"]) == t + 1
        g_y = g_e
    # perturbed, extrapolated, combined (λ > 0) and AdamW's two scratch buffers: no growth
    assert set(state.work) == {"perturbed", "extrapolated", "adamw_m", "adamw_v"} | \
        ({"combined"} if lam else set())


@pytest.mark.parametrize("opt", [SGDMomentum(0.9, 0.01),
                                 AdamW(weight_decay=0.01, beta1=0.5, beta2=0.9)])
def test_lookahead_is_the_step_without_its_side_effects(opt) -> None:  # noqa: ANN001
    x = x0(torch.float64)
    state = opt.init(x)
    for t in range(3):  # give the optimizer some memory
        opt.step(x, state, random_grad(t, torch.float64), 0.05)
    snap = {k: v.clone() for k, v in state.items()}
    x_before = x.clone()
    g = random_grad(9, torch.float64)
    y = opt.lookahead(torch.empty_like(x), x, state, g, 0.05, {})
    assert torch.equal(x, x_before)
    assert all(torch.equal(state[k], v) for k, v in snap.items())
    opt.step(x, state, g, 0.05)
    close(y, x, rtol=1e-12)
    assert not torch.equal(y, x_before)


def _run(algo, state: AlgoState, steps: int) -> AlgoState:  # noqa: ANN001
    """Drive SAMPa on the quadratic until ``steps`` updates are done."""
    while state.step < steps:
        reqs = algo.requests(state)
        algo.update(state, {r.role: quad_grad(r.point, r.batch) for r in reqs})
    return state


def test_adamw_state_round_trips_through_tensors_and_a_checkpoint(tmp_path) -> None:
    algo = SAMPa(lr=lr, rho=0.1, lam=0.2, optimizer="adamw", **HYPER)
    state = _run(algo, algo.init(x0(torch.float32)), 4)
    assert list(state.tensors()) == ["x", "exp_avg", "exp_avg_sq", "opt_step", "g_y"]
    assert state.opt["opt_step"].dtype == torch.float64 and float(state.opt["opt_step"]) == 4
    copied = AlgoState.from_tensors({k: v.clone() for k, v in state.tensors().items()},
                                    state.step, state.phase)
    assert copied.opt.keys() == state.opt.keys() and copied.g_y is not None
    ckpt = Checkpoint.of(state, [{}], {"config_hash": "h", "num_params": DIM})
    save_checkpoint(tmp_path, ckpt)
    loaded = load_checkpoint(tmp_path / "ckpt-00000004.json", "h", DIM).state()
    # a replica seeded from host arrays may hold the count in another dtype or on its device
    moved = AlgoState.from_tensors({**{k: v.clone() for k, v in state.tensors().items()},
                                    "opt_step": state.opt["opt_step"].to(torch.float32)},
                                   state.step, state.phase)
    for s in (state, copied, loaded, moved):
        _run(algo, s, 9)
    for s in (copied, loaded, moved):
        assert s.tensors().keys() == state.tensors().keys()
        for k, v in state.tensors().items():
            assert torch.equal(s.tensors()[k], v), k
    assert float(state.opt["opt_step"]) == 9
    assert moved.opt["opt_step"].dtype == torch.float64  # back to the host count, once


def test_skip_leaves_the_adamw_state_alone() -> None:
    algo = SGD(lr=lr, optimizer="adamw", **HYPER)
    state = algo.init(x0(torch.float64))
    algo.update(state, {"grad": random_grad(0, torch.float64)})
    snap = {k: v.clone() for k, v in state.tensors().items()}
    algo.skip(state)
    assert state.step == 2
    assert all(torch.equal(state.tensors()[k], v) for k, v in snap.items())
    # the next update is AdamW's second step (k = 2), at the learning rate of update 2
    p, opt = torch_adamw(x0(torch.float64))
    torch_step(p, opt, random_grad(0, torch.float64), lr(0))
    algo.update(state, {"grad": random_grad(5, torch.float64)})
    torch_step(p, opt, random_grad(5, torch.float64), lr(2))
    assert torch.equal(state.x, p.detach()) and float(state.opt["opt_step"]) == 2


@pytest.mark.parametrize("make", [
    lambda: SGD(lr=lr, optimizer="adamw", **HYPER),
    lambda: SAM(lr=lr, rho=0.1, optimizer="adamw", **HYPER),
    lambda: SAMPa(lr=lr, rho=0.1, lam=0.2, optimizer="adamw", **HYPER),
])
def test_a_shadow_drives_adamw_through_the_same_rounds(make) -> None:  # noqa: ANN001
    """The coordinator of the replicated path runs the algorithm on a 0-length shadow: AdamW's
    arithmetic must run on it (a 0-length count reads as 0 and stays 0-length), and the shadow
    must see the same rounds, roles and batches as the real state, skips included."""
    algo = make()
    real = algo.init(x0(torch.float64))
    shadow = real.shadow()
    assert set(shadow.opt) == ADAMW_KEYS and shadow.x.numel() == 0
    rounds = 0
    while real.step < 6:
        reqs, sreqs = algo.requests(real), algo.requests(shadow)
        assert [(r.role, r.batch) for r in reqs] == [(r.role, r.batch) for r in sreqs]
        if rounds == 3:  # one skipped update
            algo.skip(real)
            algo.skip(shadow)
        else:
            algo.update(real, {r.role: quad_grad(r.point, r.batch) for r in reqs})
            algo.update(shadow, {r.role: shadow.x for r in sreqs})
        assert (real.step, real.phase) == (shadow.step, shadow.phase)
        rounds += 1
    assert all(v.numel() == 0 for v in shadow.tensors().values())
    assert float(real.opt["opt_step"]) >= 4


def test_config_reports_the_optimizer_and_bad_values_are_named() -> None:
    algo = SAMPa(lr=0.1, rho=0.1, optimizer="adamw", **HYPER)
    assert algo.config() | {} == {"algo": "sampa", "lr": 0.1, "optimizer": "adamw", **HYPER,
                                  "rho": 0.1, "lam": 0.0, "adaptive": False}
    assert SGD(lr=0.1, momentum=0.9).config() == {
        "algo": "sgd", "lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0}
    for kw, field in [({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2"),
                      ({"eps": 0.0}, "eps"), ({"eps": math.inf}, "eps"),
                      ({"optimizer": "lion"}, "optimizer")]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            SGD(lr=0.1, **kw)


@pytest.mark.parametrize("name", ["sgd", "sam", "sampa"])
def test_create_passes_the_optimizer_from_the_config(name: str) -> None:
    from sampa_ray.config import make_config
    from sampa_ray.loop import make_algorithm

    cfg = make_config({"algo": name, "steps": 3, "batch_size": 32, "threads": 1,
                       "backend": "local", "optimizer": "adamw", "beta1": 0.7, "beta2": 0.9,
                       "eps": 1e-6, "weight_decay": 0.01})
    algo = make_algorithm(cfg, 3)
    assert isinstance(algo.opt, AdamW)
    assert (algo.opt.beta1, algo.opt.beta2, algo.opt.eps, algo.opt.weight_decay) == \
        (0.7, 0.9, 1e-6, 0.01)
    plain = create(name, 0.1, {"rho": 0.1, "momentum": 0.9})
    assert isinstance(plain.opt, SGDMomentum) and plain.opt.momentum == 0.9
