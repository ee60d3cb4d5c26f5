"""Each algorithm against iterates derived by hand from the equations (DESIGN.md §1), in fp64.

The reference implementations below use plain Python floats and lists: no torch, no in-place
tricks, written directly from the equations, so they share no code with the package."""

from __future__ import annotations

import math

import pytest
import torch

from sampa_ray.algorithms import SAM, SGD, SAMPa

DIM = 6


def coeffs(k: int) -> tuple[list[float], list[float]]:
    """Batch k's quadratic: f(x; B_k) = 1/2 sum_i a_i (x_i - c_i)^2 (a differs per batch)."""
    a = [1.0 + 0.3 * ((i * 7 + k * 3) % 5) for i in range(DIM)]
    c = [math.sin(1.0 + i + 2.0 * k) for i in range(DIM)]
    return a, c


def grad_ref(x: list[float], k: int) -> list[float]:
    a, c = coeffs(k)
    return [a[i] * (x[i] - c[i]) for i in range(DIM)]


def grad_torch(point: torch.Tensor, k: int) -> torch.Tensor:
    a, c = coeffs(k)
    return torch.tensor(a, dtype=torch.float64) * (point - torch.tensor(c, dtype=torch.float64))


X0 = [0.5 - 0.2 * i for i in range(DIM)]


def norm(v: list[float]) -> float:
    return math.sqrt(sum(t * t for t in v))


def sgd_ref(x, buf, g, lr, mu, wd):
    d = [g[i] + wd * x[i] for i in range(DIM)]
    buf = [mu * buf[i] + d[i] for i in range(DIM)]
    return [x[i] - lr * buf[i] for i in range(DIM)], buf


def run_sgd_ref(T, lr, mu, wd):
    x, buf, out = list(X0), [0.0] * DIM, []
    for t in range(T):
        x, buf = sgd_ref(x, buf, grad_ref(x, t), lr(t), mu, wd)
        out.append(x)
    return out


def run_sam_ref(T, lr, rho, mu, wd):
    x, buf, out = list(X0), [0.0] * DIM, []
    for t in range(T):
        g = grad_ref(x, t)
        n = norm(g)
        xt = [x[i] + rho * g[i] / (n + 1e-12) for i in range(DIM)]
        x, buf = sgd_ref(x, buf, grad_ref(xt, t), lr(t), mu, wd)
        out.append(x)
    return out


def run_sampa_ref(T, lr, rho, lam, mu, wd):
    x, buf, out = list(X0), [0.0] * DIM, []
    g_y = grad_ref(x, 0)  # bootstrap: y_0 = x_0 on B_0
    for t in range(T):
        n = norm(g_y)
        xt = [x[i] + rho * g_y[i] / (n + 1e-12) for i in range(DIM)]
        y = [x[i] - lr(t) * (g_y[i] + wd * x[i] + mu * buf[i]) for i in range(DIM)]
        g_p, g_e = grad_ref(xt, t), grad_ref(y, t + 1)
        g = [(1 - lam) * g_p[i] + lam * g_e[i] for i in range(DIM)]
        x, buf = sgd_ref(x, buf, g, lr(t), mu, wd)
        g_y = g_e
        out.append(x)
    return out


def drive(algo, T):
    """Run the requests -> gradients -> update loop; returns iterates and rounds per update."""
    state = algo.init(torch.tensor(X0, dtype=torch.float64))
    xs, rounds, reqs_seen = [], 0, []
    while state.step < T:
        reqs = algo.requests(state)
        reqs_seen.append([(r.role, r.batch) for r in reqs])
        before = state.step
        state = algo.update(state, {r.role: grad_torch(r.point, r.batch) for r in reqs})
        rounds += 1
        if state.step != before:
            xs.append(state.x.clone())
    return xs, rounds, reqs_seen


def cosine(t: int) -> float:
    return 0.05 * (1 + math.cos(math.pi * t / 10)) / 2 + 1e-3


CASES = [(0.1, 0.0, 0.0), (0.1, 0.9, 0.0), (0.1, 0.0, 5e-3), (0.05, 0.9, 5e-3)]


def assert_iterates(xs, ref):
    assert len(xs) == len(ref)
    for t, (got, want) in enumerate(zip(xs, ref, strict=True)):
        err = (got - torch.tensor(want, dtype=torch.float64)).abs().max().item()
        assert err < 1e-12, f"step {t}: max error {err}"


@pytest.mark.parametrize("lr,mu,wd", CASES)
def test_sgd_matches_hand_derived(lr, mu, wd):
    xs, rounds, _ = drive(SGD(lr=lr, momentum=mu, weight_decay=wd), 8)
    assert_iterates(xs, run_sgd_ref(8, lambda t: lr, mu, wd))
    assert rounds == 8


@pytest.mark.parametrize("lr,mu,wd", CASES)
def test_sam_matches_hand_derived(lr, mu, wd):
    xs, rounds, reqs = drive(SAM(lr=lr, rho=0.1, momentum=mu, weight_decay=wd), 8)
    assert_iterates(xs, run_sam_ref(8, lambda t: lr, 0.1, mu, wd))
    assert rounds == 16  # two sequential rounds per update
    assert reqs[:4] == [[("ascent", 0)], [("perturbed", 0)], [("ascent", 1)], [("perturbed", 1)]]


@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("lr,mu,wd", CASES)
def test_sampa_matches_hand_derived(lam, lr, mu, wd):
    xs, rounds, reqs = drive(SAMPa(lr=lr, rho=0.1, lam=lam, momentum=mu, weight_decay=wd), 8)
    assert_iterates(xs, run_sampa_ref(8, lambda t: lr, 0.1, lam, mu, wd))
    assert rounds == 1 + 8  # bootstrap round, then one round per update
    assert reqs[0] == [("extrapolated", 0)]
    assert reqs[1:3] == [[("perturbed", 0), ("extrapolated", 1)],
                         [("perturbed", 1), ("extrapolated", 2)]]


def test_schedules_are_followed():
    ref = run_sampa_ref(10, cosine, 0.1, 0.2, 0.9, 5e-4)
    xs, _, _ = drive(SAMPa(lr=cosine, rho=0.1, lam=0.2, momentum=0.9, weight_decay=5e-4), 10)
    assert_iterates(xs, ref)
    xs, _, _ = drive(SAM(lr=cosine, rho=0.1, momentum=0.9, weight_decay=5e-4), 10)
    assert_iterates(xs, run_sam_ref(10, cosine, 0.1, 0.9, 5e-4))
    xs, _, _ = drive(SGD(lr=cosine, momentum=0.9), 10)
    assert_iterates(xs, run_sgd_ref(10, cosine, 0.9, 0.0))


def test_sampa_lam0_is_not_sgd():
    """The (agg - pert)/lam shortcut degenerates to SGD at lam = 0; ours must not."""
    sampa, _, _ = drive(SAMPa(lr=0.1, rho=0.1, lam=0.0), 5)
    sgd, _, _ = drive(SGD(lr=0.1), 5)
    assert (sampa[-1] - sgd[-1]).abs().max() > 1e-3


def test_rho_zero_sam_equals_sgd():
    sam, _, _ = drive(SAM(lr=0.1, rho=0.0, momentum=0.9), 5)
    sgd, _, _ = drive(SGD(lr=0.1, momentum=0.9), 5)
    assert torch.equal(sam[-1], sgd[-1])


def test_requests_of_one_round_are_independent_buffers():
    algo = SAMPa(lr=0.1, rho=0.1, lam=0.2, momentum=0.9)
    state = algo.init(torch.tensor(X0, dtype=torch.float64))
    state = algo.update(state, {"extrapolated": grad_torch(state.x, 0)})
    p, e = algo.requests(state)
    assert p.point.data_ptr() != e.point.data_ptr() != state.x.data_ptr()
    assert not p.track_stats and e.track_stats


def test_memory_is_constant():
    """No per-step growth: the state holds a fixed set of buffers, reused every round."""
    algo = SAMPa(lr=0.1, rho=0.1, lam=0.2, momentum=0.9, weight_decay=1e-3)
    state = algo.init(torch.tensor(X0, dtype=torch.float64))
    ptrs = None
    for _ in range(6):
        reqs = algo.requests(state)
        state = algo.update(state, {r.role: grad_torch(r.point, r.batch) for r in reqs})
        now = sorted([state.x.data_ptr(), state.buf.data_ptr(), state.g_y.data_ptr()]
                     + [w.data_ptr() for w in state.work.values()])
        if state.step >= 2:
            assert ptrs is None or now == ptrs
            ptrs = now
    assert len(state.work) == 3  # perturbed, extrapolated, combined


def test_init_copies_and_keeps_dtype():
    x0 = torch.ones(4, dtype=torch.float32)
    algo = SGD(lr=0.5)
    state = algo.init(x0)
    state = algo.update(state, {"grad": torch.ones(4)})
    assert torch.equal(x0, torch.ones(4)) and state.x.dtype == torch.float32
    assert torch.allclose(state.x, torch.full((4,), 0.5))


@pytest.mark.parametrize("make,field", [
    (lambda: SGD(lr=0.0), "lr"), (lambda: SGD(lr=-1), "lr"),
    (lambda: SGD(lr=0.1, momentum=1.0), "momentum"),
    (lambda: SGD(lr=0.1, momentum=-0.1), "momentum"),
    (lambda: SGD(lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (lambda: SAM(lr=0.1, rho=-0.1), "rho"), (lambda: SAMPa(lr=0.1, rho=0.1, lam=1.5), "lam"),
    (lambda: SAMPa(lr=0.1, rho=0.1, lam=-0.1), "lam"), (lambda: SGD(lr=float("nan")), "lr"),
])
def test_bad_hyperparameters(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()


def test_bad_scheduled_lr_is_rejected_without_mutation():
    algo = SGD(lr=lambda t: 0.1 if t == 0 else -1.0)
    state = algo.init(torch.zeros(3, dtype=torch.float64))
    state = algo.update(state, {"grad": torch.ones(3, dtype=torch.float64)})
    x = state.x.clone()
    with pytest.raises(ValueError, match="^lr:"):
        algo.update(state, {"grad": torch.ones(3, dtype=torch.float64)})
    assert torch.equal(state.x, x) and state.step == 1


@pytest.mark.parametrize("grads,pattern", [
    ({"perturbed": torch.zeros(DIM, dtype=torch.float64)}, "grads: .*missing extrapolated"),
    ({"perturbed": torch.zeros(DIM, dtype=torch.float64),
      "extrapolated": torch.zeros(DIM, dtype=torch.float64),
      "ascent": torch.zeros(DIM, dtype=torch.float64)}, "grads: .*unexpected ascent"),
    ({"perturbed": torch.zeros(DIM + 1, dtype=torch.float64),
      "extrapolated": torch.zeros(DIM, dtype=torch.float64)}, r"grads\[perturbed\]: shape"),
    ({"perturbed": torch.zeros(DIM, dtype=torch.float64),
      "extrapolated": torch.zeros(DIM, dtype=torch.float32)}, r"grads\[extrapolated\]: dtype"),
    ({"perturbed": torch.zeros(DIM, dtype=torch.float64, device="meta"),
      "extrapolated": torch.zeros(DIM, dtype=torch.float64)}, r"grads\[perturbed\]: device"),
    ({"perturbed": [0.0] * DIM, "extrapolated": torch.zeros(DIM, dtype=torch.float64)},
     r"grads\[perturbed\]: expected a tensor"),
])
def test_bad_gradients_leave_state_unchanged(grads, pattern):
    algo = SAMPa(lr=0.1, rho=0.1, lam=0.2, momentum=0.9)
    state = algo.init(torch.tensor(X0, dtype=torch.float64))
    state = algo.update(state, {"extrapolated": grad_torch(state.x, 0)})
    reqs = algo.requests(state)
    state = algo.update(state, {r.role: grad_torch(r.point, r.batch) for r in reqs})
    snap = {k: v.clone() for k, v in state.tensors().items()}
    with pytest.raises(ValueError, match=pattern):
        algo.update(state, grads)
    assert state.step == 1 and state.phase == 1
    for k, v in state.tensors().items():
        assert torch.equal(v, snap[k]), k


def test_bad_x0():
    with pytest.raises(ValueError, match="^x0:"):
        SGD(lr=0.1).init(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="^x0:"):
        SGD(lr=0.1).init(torch.zeros(2, dtype=torch.int64))
