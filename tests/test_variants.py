"""The SAM variants (LookSAM, RST, ASAM, SAMPa with ASAM's perturbation) against references
written here the way their authors' code is written: a torch optimizer over a module's
parameters, layer by layer, with ``torch.optim.SGD`` (momentum, weight decay) as the base
optimizer, in float64 on a small nonlinear model; sampa-ray's algorithms work on the flat
vector. Each trajectory is followed update by update, over updates that switch between SAM's
and SGD's.

- ASAM: ``davda54/sam``, ``sam.py`` (``SAM(..., adaptive=True)``: ``first_step`` /
  ``second_step``).
- LookSAM: no code of its authors is public; the reference follows Algorithm 1 of the paper
  (Liu et al., CVPR 2022) in the same optimizer style (the unofficial ``rollovd/LookSAM``
  ``looksam.py`` has the same shape, but projects layer by layer and puts the parameters back
  to their last SAM step's values on the updates in between; the paper's projection is global).
- RST: no code of its authors is public; the reference follows the paper's algorithm (SAM with
  probability p, else SGD) and is given the Bernoulli outcomes, which sampa-ray draws from
  (seed, update) so that every process agrees; the draws themselves are checked for their rate.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sampa_ray.algorithms import ASAM, RST, AlgoState, LookSAM, SAMPa

D, H, K, N, BATCH = 6, 8, 4, 96, 12
LR, MU, WD, RHO = 0.1, 0.9, 5e-4, 0.05
STEPS = 24


class Net(nn.Module):
    """A two-layer tanh network; its parameters in the order of the flat vector."""

    def __init__(self, flat: torch.Tensor) -> None:
        super().__init__()
        w1, b1, w2, b2 = torch.split(flat.detach().clone(), [D * H, H, H * K, K])
        self.w1, self.b1 = nn.Parameter(w1.view(D, H)), nn.Parameter(b1)
        self.w2, self.b2 = nn.Parameter(w2.view(H, K)), nn.Parameter(b2)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(xs @ self.w1 + self.b1) @ self.w2 + self.b2

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(N, D, generator=g, dtype=torch.float64)
    ys = torch.randint(0, K, (N,), generator=g)
    x0 = 0.5 * torch.randn(D * H + H + H * K + K, generator=g, dtype=torch.float64)
    return xs, ys, x0


XS, YS, X0 = data()


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(k * BATCH, (k + 1) * BATCH) % N
    return XS[idx], YS[idx]


def backward(net: Net, k: int) -> None:
    """The module's gradients on batch k (as a training script's ``loss.backward()``)."""
    net.zero_grad()
    xs, ys = batch(k)
    nn.functional.cross_entropy(net(xs), ys).backward()


def grad(point: torch.Tensor, k: int) -> torch.Tensor:
    """sampa-ray's side: the flat gradient at a flat point on batch k."""
    net = Net(point)
    backward(net, k)
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def drive(algo, updates: int) -> list[torch.Tensor]:
    """sampa-ray's algorithm on the flat vector: x after each update."""
    state = algo.init(X0)
    xs = []
    while state.step < updates:
        before = state.step
        algo.update(state, {r.role: grad(r.point, r.batch) for r in algo.requests(state)})
        if state.step != before:
            xs.append(state.x.clone())
    return xs


def base(optimizer: str = "sgd") -> tuple[Net, torch.optim.Optimizer]:
    """The module at x_0 and its base optimizer: torch's SGD with momentum, or AdamW."""
    net = Net(X0)
    if optimizer == "adamw":
        return net, torch.optim.AdamW(net.parameters(), lr=LR / 10, weight_decay=WD)
    return net, torch.optim.SGD(net.parameters(), lr=LR, momentum=MU, weight_decay=WD)


def hyper(optimizer: str) -> dict:
    """sampa-ray's side of :func:`base`."""
    if optimizer == "adamw":
        return {"lr": LR / 10, "optimizer": "adamw", "weight_decay": WD}
    return {"lr": LR, "momentum": MU, "weight_decay": WD}


def assert_same(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref) == STEPS
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel <= 1e-10, (t, rel)
    assert float((ref[-1] - X0).abs().max()) > 1e-2  # it moved: not trivially equal


# -- ASAM: davda54/sam, sam.py, adaptive=True ---------------------------------------------------
class DavdaSAM(torch.optim.Optimizer):
    """The two steps of ``davda54/sam``'s ``SAM`` optimizer, layer by layer."""

    def __init__(self, params, base_optimizer, rho: float, adaptive: bool) -> None:
        super().__init__(params, {"rho": rho, "adaptive": adaptive})
        self.base_optimizer = base_optimizer

    @torch.no_grad()
    def first_step(self) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()

    def _grad_norm(self) -> torch.Tensor:
        return torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups for p in group["params"]]), p=2)


def test_asam_follows_davda54_sam_with_adaptive_true():
    net, sgd = base()
    opt = DavdaSAM(net.parameters(), sgd, rho=0.5, adaptive=True)
    ref = []
    for t in range(STEPS):
        backward(net, t)
        opt.first_step()
        backward(net, t)
        opt.second_step()
        ref.append(net.flat())
    assert_same(drive(ASAM(LR, rho=0.5, momentum=MU, weight_decay=WD), STEPS), ref)
    # not SAM's trajectory: the adaptive perturbation is another point
    plain = drive(ASAM(LR, rho=0.5, momentum=MU, weight_decay=WD, adaptive=False), STEPS)
    assert float((plain[-1] - ref[-1]).abs().max()) > 1e-6


def test_sampa_perturbs_as_davda54_asam_where_adaptive():
    """SAMPa's perturbed point with ``adaptive``: ASAM's ``first_step`` from x_t with the
    gradient g_y in hand (SAMPa's only change to it)."""
    algo = SAMPa(LR, rho=0.5, lam=0.2, momentum=MU, weight_decay=WD, adaptive=True)
    g_y = grad(X0, 3)
    state = AlgoState(x=X0.clone(), step=0, phase=1, g_y=g_y.clone())
    (perturbed,) = [r.point for r in algo.requests(state) if r.role == "perturbed"]
    net, sgd = base()
    for p, g in zip(net.parameters(), torch.split(g_y, [p.numel() for p in net.parameters()]),
                    strict=True):
        p.grad = g.view_as(p).clone()
    DavdaSAM(net.parameters(), sgd, rho=0.5, adaptive=True).first_step()
    ref = net.flat()
    assert float((perturbed - ref).abs().max() / ref.abs().max()) <= 1e-14
    plain = SAMPa(LR, rho=0.5, lam=0.2, momentum=MU, weight_decay=WD)
    (other,) = [r.point for r in plain.requests(state) if r.role == "perturbed"]
    assert float((other - ref).abs().max()) > 1e-3


# -- LookSAM: the paper's Algorithm 1 -----------------------------------------------------------
class PaperLookSAM:
    """Algorithm 1 of LookSAM over a module's parameters: every k steps SAM's gradient g_s and
    g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||; in between g + alpha ||g|| / ||g_v|| g_v."""

    def __init__(self, net: Net, base_optimizer: torch.optim.Optimizer, rho: float, k: int,
                 alpha: float) -> None:
        self.net, self.base, self.rho, self.k, self.alpha = net, base_optimizer, rho, k, alpha
        self.g_v: list[torch.Tensor] = []

    @staticmethod
    def _norm(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.norm(torch.stack([t.norm(p=2) for t in ts]), p=2)

    def step(self, t: int) -> None:
        params = list(self.net.parameters())
        backward(self.net, t)
        g = [p.grad.clone() for p in params]
        g_norm = self._norm(g)
        if t % self.k == 0:
            old = [p.data.clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g, strict=True):
                    p.add_(gi * (self.rho / (g_norm + 1e-12)))
            backward(self.net, t)
            g_s = [p.grad.clone() for p in params]
            gs_norm = self._norm(g_s)
            cos = sum((a * b).sum() for a, b in zip(g, g_s, strict=True)) / (g_norm * gs_norm)
            self.g_v = [b - gs_norm * cos * a / g_norm for a, b in zip(g, g_s, strict=True)]
            for p, o in zip(params, old, strict=True):
                p.data = o
            for p, gi in zip(params, g_s, strict=True):
                p.grad = gi
        else:
            ratio = g_norm / self._norm(self.g_v)
            for p, gi, v in zip(params, g, self.g_v, strict=True):
                p.grad = gi + self.alpha * ratio * v
        self.base.step()


@pytest.mark.parametrize("k,alpha,optimizer", [(3, 0.7, "sgd"), (5, 0.2, "sgd"),
                                             (3, 0.7, "adamw")])
def test_looksam_follows_the_papers_algorithm(k: int, alpha: float, optimizer: str):
    net, opt_base = base(optimizer)
    opt = PaperLookSAM(net, opt_base, RHO, k, alpha)
    ref = []
    for t in range(STEPS):
        opt.step(t)
        ref.append(net.flat())
    assert_same(drive(LookSAM(rho=RHO, k=k, alpha=alpha, **hyper(optimizer)), STEPS), ref)


def test_looksam_with_k_1_is_sam_and_its_direction_is_kept_in_the_state():
    from sampa_ray.algorithms import SAM

    sam = drive(SAM(LR, rho=RHO, momentum=MU, weight_decay=WD), 6)
    look = drive(LookSAM(LR, rho=RHO, k=1, momentum=MU, weight_decay=WD), 6)
    assert all(torch.equal(a, b) for a, b in zip(sam, look, strict=True))
    algo = LookSAM(LR, rho=RHO, k=4)
    state = algo.init(X0)
    assert set(state.tensors()) == {"x", "mem.g_v"} and not state.mem["g_v"].any()
    while state.step < 1:
        algo.update(state, {r.role: grad(r.point, r.batch) for r in algo.requests(state)})
    assert state.mem["g_v"].abs().max() > 0  # the SAM update kept its direction
    again = AlgoState.from_tensors({k: v.clone() for k, v in state.tensors().items()},
                                   state.step, state.phase)
    assert torch.equal(again.mem["g_v"], state.mem["g_v"])


# -- RST: the paper's algorithm, given the Bernoulli outcomes ----------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_rst_follows_sam_or_sgd_as_its_draws_say(optimizer: str):
    algo = RST(rho=RHO, p=0.5, seed=7, **hyper(optimizer))
    coins = [algo.sam_at(t) for t in range(STEPS)]
    assert 0 < sum(coins) < STEPS  # both kinds of update are followed
    net, opt_base = base(optimizer)
    opt = DavdaSAM(net.parameters(), opt_base, rho=RHO, adaptive=False)
    ref = []
    for t, coin in enumerate(coins):
        backward(net, t)
        if coin:
            opt.first_step()
            backward(net, t)
            opt.second_step()
        else:
            opt_base.step()
        ref.append(net.flat())
    assert_same(drive(algo, STEPS), ref)


def test_rst_draws_are_seeded_by_seed_and_update_and_hold_their_rate():
    a, b = RST(LR, rho=RHO, p=0.3, seed=1), RST(LR, rho=RHO, p=0.3, seed=2)
    draws = [a.sam_at(t) for t in range(4000)]
    assert draws == [RST(LR, rho=RHO, p=0.3, seed=1).sam_at(t) for t in range(4000)]
    assert draws != [b.sam_at(t) for t in range(4000)]
    # binomial(4000, 0.3): mean 1200, standard deviation 29
    assert abs(sum(draws) - 1200) < 4 * 29
    assert not any(RST(LR, rho=RHO, p=0.0).sam_at(t) for t in range(100))
    assert all(RST(LR, rho=RHO, p=1.0).sam_at(t) for t in range(100))
    ramp = RST(LR, rho=RHO, p=0.8, ramp=10)
    assert [ramp.p_at(t) for t in (0, 4, 9, 50)] == pytest.approx([0.08, 0.4, 0.8, 0.8])


@pytest.mark.parametrize("make,field", [
    (lambda: LookSAM(LR, rho=RHO, k=0), "k"),
    (lambda: LookSAM(LR, rho=RHO, alpha=-1.0), "alpha"),
    (lambda: RST(LR, rho=RHO, p=1.5), "p"),
    (lambda: RST(LR, rho=RHO, p=-0.1), "p"),
    (lambda: RST(LR, rho=RHO, ramp=-1), "ramp"),
])
def test_bad_hyperparameters(make, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        make()


@pytest.mark.parametrize("args,line", [
    (["train", "--algo", "looksam", "--algo-arg", "k=0"],
     "sampa-ray: config: algo_args.k: Input should be greater than or equal to 1"),
    (["train", "--algo", "rst", "--algo-arg", "p=1.5"],
     "sampa-ray: config: algo_args.p: Input should be less than or equal to 1"),
    (["train", "--algo", "rst", "--algo-arg", "k=2"],
     "sampa-ray: config: algo_args.k: not a parameter of rst (its parameters: rho, adaptive, "
     "p, ramp)"),
    (["compare", "--algos", "sgd", "looksam", "sgd"],
     "sampa-ray: algos: sgd looksam sgd names an algorithm twice"),
    (["compare", "--algos", "sgd", "esam"],
     "sampa-ray: algos: esam: algo: unknown algorithm 'esam'"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, args,
                                                                 line):
    from sampa_ray.cli import main

    out = tmp_path / "out"
    assert main([*args, "--backend", "ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert not out.exists()  # nothing claimed, no Ray started
