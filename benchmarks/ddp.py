"""SAMPa or data-parallel SAM? Both measured side by side over the same workers, no Ray.

    .venv/bin/python benchmarks/ddp.py [--models resnet20 resnet56] [--batch-sizes 32 128]
        [--workers 2 4] [--steps 10] [--repeats 3] [--device cpu|cuda] [--csv FILE]

Users ask why SAMPa needs its own system when SAM could run data-parallel (DDP) over the same
devices. Per model, GLOBAL batch size B and worker count N (even; SAMPa uses k = N/2), N
processes (ranks 0..N-1 of one process group of spawned processes, torch.distributed, gloo by
default; the ranks beyond N, there for a larger N or the check, wait blocked at a barrier; one
torch thread per process on CPU; on a GPU every rank may share the one GPU, and gloo moves CUDA
tensors through host memory; NCCL only with --backend nccl and a GPU per rank) time one
parameter update of:

    SGD-1        one worker, batch B, one gradient; the others idle
    SGD-DDP-N    N workers, B/N each, one all-reduce of the flat gradient (one flat bucket)
    SAM-1        one worker, two sequential gradients on batch B (ascent, then perturbed)
    SAM-DDP-N    N workers, B/N each, two all-reduces: the ascent gradient (averaged, it sets the
                 perturbation every worker applies: the real SAM-DDP) and the perturbed gradient
    SAMPa-N      two role groups of k: one computes the perturbed gradient at x~ on B_t, the
                 other the extrapolated gradient at y on B_{t+1}, each on B split into k shards
                 (B/k each), all-reduced within the group (k > 1); then one broadcast per role
                 from each group's leader to all N (as sampa-ray's collective path exchanges);
                 one round per update (the bootstrap round is not timed)

Every scheme keeps the parameters as one flat vector, and every gradient is taken the same way
(copy the point into the flat buffer the model's parameters view, zero the flat gradient the
model's .grad views, forward, backward) and every update ends in a plain SGD step on the flat
vector, so the schemes differ only in what the scheme dictates. Synthetic CIFAR-shaped data
(torch.randn; a model's own input shape from input_shape_for), float32. Each timed update starts
after a barrier and ends when the slowest rank is done; blocks of --steps updates of the five
schemes alternate (in a rotating order) --repeats times, so a slow spell of a shared machine
hits all of them; printed is the median per scheme, the ratios SAM-DDP/SAMPa and SAM-1/SAMPa
(above 1: SAMPa is faster) with their per-repeat range, the CPU share (the busy ranks' CPU time
over wall time: near 1 for a lone worker on a quiet machine; the reading warns below 0.9, when
other work on a shared machine took the cores) and a one-line reading.

Before measuring (--check, on by default) a tiny mlp in float64 on the chosen device checks the
schemes themselves: SGD-DDP and SAM-DDP over 2 and 4 give the same update as SGD and SAM on one
worker on the full batch, SAMPa with k = 1 the same as SAMPa computed serially, and with k = 2
the same as with k = 1 (relative difference <= 1e-10): "check: ok", or exit 1. Equal shards make
the mean of the shard gradients the full-batch gradient, so B must be divisible by N (else one
line, exit 2). Only torch and sampa_ray.models are imported; never Ray. A benchmark, not a test:
the numbers depend on the machine and its load. Progress goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import queue
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # running from a checkout without an installed sampa_ray

SCHEMES = ("sgd1", "sgd_ddp", "sam1", "sam_ddp", "sampa")
TOL = 1e-10
TIE = 0.03  # ratios within 3% of 1 read as a tie
CHECK_WORLD = 4
CHECK_BATCH = 8
CHECK_STEPS = 3


def label(scheme: str, n: int) -> str:
    return {"sgd1": "SGD-1", "sgd_ddp": f"SGD-DDP-{n}", "sam1": "SAM-1",
            "sam_ddp": f"SAM-DDP-{n}", "sampa": f"SAMPa-{n}"}[scheme]


def _models() -> Any:
    """``sampa_ray.models`` (torch only). If the package's light top-level imports (pydantic,
    yaml) are missing, as on a bare GPU machine, load the subpackage without them."""
    try:
        import sampa_ray.models as models
    except ImportError:
        import types

        for name in [m for m in sys.modules if m == "sampa_ray" or m.startswith("sampa_ray.")]:
            del sys.modules[name]
        pkg = types.ModuleType("sampa_ray")
        pkg.__path__ = [str(ROOT / "sampa_ray")]
        sys.modules["sampa_ray"] = pkg
        import sampa_ray.models as models
    return models


# ---------------------------------------------------------------------------------------------
# in each worker process


class Runner:
    """One rank's model with its parameters and gradients as views into two flat buffers."""

    def __init__(self, net: Any, rank: int, device: Any, dtype: Any, lr: float, rho: float,
                 lam: float) -> None:
        import torch

        self.rank, self.device, self.lr, self.rho, self.lam = rank, device, lr, rho, lam
        net = net.to(device=device, dtype=dtype)
        params = list(net.parameters())
        n = sum(p.numel() for p in params)
        self.w = torch.empty(n, device=device, dtype=dtype)   # the point the model reads
        self.g = torch.zeros(n, device=device, dtype=dtype)   # the gradient backward writes
        off = 0
        self._views = []
        for p in params:
            k = p.numel()
            self.w[off:off + k].copy_(p.detach().reshape(-1))
            p.data = self.w[off:off + k].view_as(p)
            p.grad = self.g[off:off + k].view_as(p)
            self._views.append((p, self.g[off:off + k].data_ptr()))
            off += k
        self.net, self.params = net.train(), n
        self.x0 = self.w.clone()

    def grad(self, X: Any, Y: Any) -> Any:
        """The gradient of the mean cross-entropy at the point in ``self.w`` into ``self.g``."""
        import torch.nn.functional as F

        self.g.zero_()
        F.cross_entropy(self.net(X), Y).backward()
        return self.g

    def verify_views(self) -> None:
        """Backward accumulated into the flat gradient (no parameter got a fresh .grad)."""
        for p, ptr in self._views:
            if p.grad is None or p.grad.data_ptr() != ptr:
                raise RuntimeError("backward did not write into the flat gradient buffer")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Team:
    """The ranks one scheme runs on and the process group over them (every rank makes every
    group, in the same order, as torch.distributed requires)."""

    def __init__(self, ranks: list[int], world: int) -> None:
        import torch.distributed as dist

        self.ranks = list(ranks)
        self.group = None
        if 1 < len(self.ranks) < world:
            self.group = dist.new_group(self.ranks)

    def mean(self, t: Any) -> None:
        """All-reduce ``t`` over the team and divide by its size (nothing for one rank)."""
        import torch.distributed as dist

        if len(self.ranks) > 1:
            dist.all_reduce(t, group=self.group)
            t.div_(len(self.ranks))


class SampaTeam:
    """SAMPa over 2k ranks: role P (perturbed) on the first k, role E (extrapolated) on the
    rest, each with its in-group all-reduce, and the exchange over all of them."""

    def __init__(self, ranks: list[int], world: int) -> None:
        k = len(ranks) // 2
        self.ranks, self.k = list(ranks), k
        self.P, self.E = Team(ranks[:k], world), Team(ranks[k:], world)
        self.all = Team(ranks, world)


class Batches:
    """Global batches (X, Y) on the device, by update index; shard j of n is rows
    [j*B/n, (j+1)*B/n)."""

    def __init__(self, count: int, batch: int, shape: tuple[int, ...], device: Any, dtype: Any,
                 seed: int) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.items = [(torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
                       .to(device=device, dtype=dtype),
                       torch.randint(0, 10, (batch,), generator=gen).to(device))
                      for _ in range(count)]
        self.batch = batch

    def shard(self, t: int, j: int, n: int) -> tuple[Any, Any]:
        X, Y = self.items[t % len(self.items)]
        s = self.batch // n
        return X[j * s:(j + 1) * s], Y[j * s:(j + 1) * s]


class State:
    """One scheme's trajectory: the flat parameters, the update count, SAMPa's buffers."""

    def __init__(self, x0: Any) -> None:
        import torch

        self.x, self.t = x0.clone(), 0
        self.gy = torch.zeros_like(x0)   # SAMPa: the extrapolated gradient of the last round
        self.gp = torch.zeros_like(x0)   # SAMPa: where the perturbed gradient is received
        self.ge = torch.zeros_like(x0)   # SAMPa: where the extrapolated gradient is received
        self.scale = torch.zeros((), dtype=x0.dtype, device=x0.device)


def step_sgd(r: Runner, st: State, data: Batches, team: Team) -> None:
    """One SGD update over ``team`` (one rank: SGD-1; N ranks: SGD-DDP with one all-reduce)."""
    if r.rank in team.ranks:
        X, Y = data.shard(st.t, team.ranks.index(r.rank), len(team.ranks))
        r.w.copy_(st.x)
        g = r.grad(X, Y)
        team.mean(g)
        st.x.add_(g, alpha=-r.lr)
    st.t += 1


def step_sam(r: Runner, st: State, data: Batches, team: Team) -> None:
    """One SAM update over ``team``: the (averaged) ascent gradient sets the perturbation every
    rank applies, then the (averaged) perturbed gradient makes the step."""
    import torch

    if r.rank in team.ranks:
        X, Y = data.shard(st.t, team.ranks.index(r.rank), len(team.ranks))
        r.w.copy_(st.x)
        g = r.grad(X, Y)
        team.mean(g)
        torch.div(r.rho, g.norm() + 1e-12, out=st.scale)
        torch.mul(g, st.scale, out=r.w)
        r.w.add_(st.x)
        g = r.grad(X, Y)
        team.mean(g)
        st.x.add_(g, alpha=-r.lr)
    st.t += 1


def _sampa_points(r: Runner, st: State, role: str) -> None:
    """Into ``r.w``: x~ = x + rho g_y/(|g_y| + 1e-12) for role P, y = x - lr g_y for role E."""
    import torch

    if role == "P":
        torch.div(r.rho, st.gy.norm() + 1e-12, out=st.scale)
        torch.mul(st.gy, st.scale, out=r.w)
        r.w.add_(st.x)
    else:
        torch.add(st.x, st.gy, alpha=-r.lr, out=r.w)


def _sampa_apply(r: Runner, st: State) -> None:
    """x <- x - lr((1-lam) g_p + lam g_e); g_y <- g_e."""
    st.x.add_(st.gp, alpha=-r.lr * (1 - r.lam))
    st.x.add_(st.ge, alpha=-r.lr * r.lam)
    st.gy.copy_(st.ge)


def sampa_bootstrap(r: Runner, st: State, data: Batches, team: SampaTeam) -> None:
    """g_y = grad f(x0; B_0) from role E, shared with all (the round before the first update)."""
    import torch.distributed as dist

    if r.rank in team.E.ranks:
        X, Y = data.shard(0, team.E.ranks.index(r.rank), team.k)
        r.w.copy_(st.x)
        g = r.grad(X, Y)
        team.E.mean(g)
        st.gy.copy_(g)
    if r.rank in team.ranks:
        dist.broadcast(st.gy, src=team.E.ranks[0], group=team.all.group)


def step_sampa(r: Runner, st: State, data: Batches, team: SampaTeam) -> None:
    """One SAMPa round: role P's gradient at x~ on B_t and role E's at y on B_{t+1} at once,
    each averaged within its group, then one broadcast per role from its leader to all."""
    import torch.distributed as dist

    if r.rank in team.ranks:
        role, grp = ("P", team.P) if r.rank in team.P.ranks else ("E", team.E)
        j = grp.ranks.index(r.rank)
        X, Y = data.shard(st.t + (role == "E"), j, team.k)
        _sampa_points(r, st, role)
        g = r.grad(X, Y)
        grp.mean(g)
        (st.gp if role == "P" else st.ge).copy_(g)
        dist.broadcast(st.gp, src=team.P.ranks[0], group=team.all.group)
        dist.broadcast(st.ge, src=team.E.ranks[0], group=team.all.group)
        _sampa_apply(r, st)
    st.t += 1


def sampa_serial(r: Runner, st: State, data: Batches, bootstrap: bool = False) -> None:
    """SAMPa on this rank alone, the two gradients one after the other (the check's reference)."""
    r.w.copy_(st.x)
    if bootstrap:
        st.gy.copy_(r.grad(*data.shard(0, 0, 1)))
        return
    _sampa_points(r, st, "P")
    st.gp.copy_(r.grad(*data.shard(st.t, 0, 1)))
    _sampa_points(r, st, "E")
    st.ge.copy_(r.grad(*data.shard(st.t + 1, 0, 1)))
    _sampa_apply(r, st)
    st.t += 1


def _check_teams(world: int) -> dict[str, Any]:
    return {"one": Team([0], world), "two": Team([0, 1], world),
            "four": Team(list(range(4)), world), "s1": SampaTeam([0, 1], world),
            "s2": SampaTeam(list(range(4)), world)}


def _bench_teams(n: int, world: int) -> dict[str, Any]:
    return {"one": Team([0], world), "all": Team(list(range(n)), world),
            "sampa": SampaTeam(list(range(n)), world)}


def _check(rank: int, device: Any, teams: dict[str, Any]) -> dict[str, float] | None:
    """On ranks 0-3, each scheme for CHECK_STEPS updates of a float64 mlp from the same start
    on the same batches; on rank 0, the relative differences of the updates that must agree."""
    import torch

    models = _models()
    torch.manual_seed(0)
    net = models.build_model("mlp", 10, in_channels=models.input_shape_for("mlp")[0])
    r = Runner(net, rank, device, torch.float64, lr=0.1, rho=0.1, lam=0.2)
    data = Batches(CHECK_STEPS + 1, CHECK_BATCH, models.input_shape_for("mlp"), device,
                   torch.float64, seed=1)
    one, two, four, s1, s2 = (teams[k] for k in ("one", "two", "four", "s1", "s2"))
    moved: dict[str, Any] = {}

    def run(name: str, fn: Any, team: Any, boot: Any = None) -> None:
        st = State(r.x0)
        if boot is not None:
            boot(st)
        for _ in range(CHECK_STEPS):
            fn(r, st, data, team)
        moved[name] = st.x - r.x0

    run("sgd1", step_sgd, one)
    r.verify_views()
    run("sgd_ddp2", step_sgd, two)
    run("sgd_ddp4", step_sgd, four)
    run("sam1", step_sam, one)
    run("sam_ddp2", step_sam, two)
    run("sam_ddp4", step_sam, four)
    if rank == 0:
        st = State(r.x0)
        sampa_serial(r, st, data, bootstrap=True)
        for _ in range(CHECK_STEPS):
            sampa_serial(r, st, data)
        moved["sampa_serial"] = st.x - r.x0
    run("sampa_k1", step_sampa, s1, lambda st: sampa_bootstrap(r, st, data, s1))
    run("sampa_k2", step_sampa, s2, lambda st: sampa_bootstrap(r, st, data, s2))
    if rank != 0:
        return None

    def rel(a: str, b: str) -> float:
        return float((moved[a] - moved[b]).norm() / moved[b].norm())

    return {"SGD-DDP-2 vs SGD-1": rel("sgd_ddp2", "sgd1"),
            "SGD-DDP-4 vs SGD-1": rel("sgd_ddp4", "sgd1"),
            "SAM-DDP-2 vs SAM-1": rel("sam_ddp2", "sam1"),
            "SAM-DDP-4 vs SAM-1": rel("sam_ddp4", "sam1"),
            "SAMPa k=1 vs SAMPa serial": rel("sampa_k1", "sampa_serial"),
            "SAMPa k=2 vs SAMPa k=1": rel("sampa_k2", "sampa_k1"),
            # not vacuous: the schemes' updates do differ from each other
            "SAM-1 vs SGD-1 (must differ)": rel("sam1", "sgd1"),
            "SAMPa vs SAM-1 (must differ)": rel("sampa_serial", "sam1")}


def _bench(rank: int, n: int, device: Any, job: dict[str, Any], teams: dict[str, Any],
           out: Any) -> None:
    """Every (model, batch) of the job over ranks 0..n-1: warm-up, then alternating timed
    blocks; this rank's per-update times go to ``out``."""
    import torch
    import torch.distributed as dist

    models = _models()
    one, all_, sampa = teams["one"], teams["all"], teams["sampa"]
    steps = {"sgd1": (step_sgd, one), "sgd_ddp": (step_sgd, all_), "sam1": (step_sam, one),
             "sam_ddp": (step_sam, all_), "sampa": (step_sampa, sampa)}
    for model in job["models"]:
        torch.manual_seed(0)
        shape = models.input_shape_for(model)
        net = models.build_model(model, 10, in_channels=shape[0])
        r = Runner(net, rank, device, torch.float32, lr=job["lr"], rho=job["rho"],
                   lam=job["lam"])
        for batch in job["batch_sizes"]:
            if rank == 0:
                out.put(("start", (model, batch, n), rank, None))
            data = Batches(2, batch, shape, device, torch.float32, seed=batch)
            states = {s: State(r.x0) for s in SCHEMES}
            sampa_bootstrap(r, states["sampa"], data, sampa)
            times: dict[str, list[tuple[int, float, float]]] = {s: [] for s in SCHEMES}
            plan = [(-1, s) for s in SCHEMES for _ in range(job["warmup"])]
            for rep in range(job["repeats"]):
                order = SCHEMES[rep % len(SCHEMES):] + SCHEMES[:rep % len(SCHEMES)]
                plan += [(rep, s) for s in order for _ in range(job["steps"])]
            for rep, s in plan:
                _sync(device)
                dist.barrier(group=all_.group)
                c0, t0 = time.process_time(), time.perf_counter()
                fn, team = steps[s]
                fn(r, states[s], data, team)
                _sync(device)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                if rep >= 0:
                    times[s].append((rep, dt, cpu))
            r.verify_views()
            out.put(("bench", (model, batch, n), rank, {"params": r.params, "times": times}))


def _worker(rank: int, world: int, port: int, job: dict[str, Any], out: Any) -> None:
    """One rank of the world: the check on ranks 0-3, then each N's benchmark on ranks
    0..N-1, the others waiting (blocked, no CPU) at a barrier of the whole world."""
    import datetime

    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        if job["device"] == "cuda":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group(job["backend"], init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=job["timeout_s"]))
        # every rank makes every group, in the same order, before anything runs
        check_teams = _check_teams(world) if job["check"] else None
        bench_teams = [_bench_teams(n, world) for n in job["workers"]]
        if check_teams is not None and rank < CHECK_WORLD:
            out.put(("check", None, rank, _check(rank, device, check_teams)))
        for n, teams in zip(job["workers"], bench_teams, strict=True):
            dist.barrier()  # the ranks not in this N wait here, not while it is timed
            if rank < n:
                _bench(rank, n, device, job, teams, out)
        dist.barrier()  # every collective is done: leave without the slow interpreter exit
        out.close()
        out.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except BaseException as err:  # noqa: BLE001 - reported to the parent in one line
        last = traceback.format_exc().strip().splitlines()
        where = next((ln.strip() for ln in reversed(last) if ln.strip().startswith("File ")), "")
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        out.put(("error", None, rank, f"{type(err).__name__}: {msg} ({where})"))
        out.close()
        out.join_thread()  # the message reaches the parent before this process ends
        sys.stderr.flush()
        os._exit(1)


# ---------------------------------------------------------------------------------------------
# in the parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(world: int, job: dict[str, Any], expect: int, on_result: Any) -> None:
    """Run ``job`` on ``world`` spawned ranks; ``expect`` messages of results come back, each
    handed to ``on_result(kind, key, rank, payload)``. A rank that fails ends all: exit 1."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, job, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got = 0
    try:
        while got < expect:
            try:
                kind, key, rank, payload = out.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise SystemExit(f"ddp.py: rank {procs.index(dead[0])} died "
                                     f"(exit code {dead[0].exitcode})") from None
                continue
            if kind == "error":
                raise SystemExit(f"ddp.py: rank {rank} failed: {payload}")
            if kind == "start":
                model, batch, n = key
                print(f"... {model}, global batch {batch}, N={n}", file=sys.stderr, flush=True)
                continue
            got += 1
            on_result(kind, key, rank, payload)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def _summarise(model: str, batch: int, world: int, params: int,
               per_rank: dict[int, dict[str, list[tuple[int, float, float]]]]
               ) -> dict[str, Any]:
    """Per update, the slowest rank's time; per scheme, the median and the per-repeat medians;
    and the CPU share: the busy ranks' CPU time over their wall time (a lone worker on a quiet
    machine gets about 1; much less means the machine was busy with something else)."""
    row: dict[str, Any] = {"model": model, "params": params, "global_batch": batch,
                           "workers": world, "sampa_k": world // 2}
    per_rep: dict[str, dict[int, float]] = {}
    shares: dict[int, list[float]] = {1: [], world: []}
    for s in SCHEMES:
        series = per_rank[0][s]
        busy = [0] if s in ("sgd1", "sam1") else sorted(per_rank)
        upd = []
        for i, (rep, _, _) in enumerate(series):
            wall = max(per_rank[k][s][i][1] for k in per_rank)
            upd.append((rep, wall))
            shares[len(busy)].append(sum(per_rank[k][s][i][2] for k in busy)
                                     / (len(busy) * wall))
        row[f"{s}_ms"] = _median_ms([dt for _, dt in upd])
        reps = sorted({rep for rep, _ in upd})
        per_rep[s] = {rep: _median_ms([dt for r_, dt in upd if r_ == rep]) for rep in reps}
    row["sam_ddp_over_sampa"] = row["sam_ddp_ms"] / row["sampa_ms"]
    row["sam1_over_sampa"] = row["sam1_ms"] / row["sampa_ms"]
    rr = [per_rep["sam_ddp"][k] / per_rep["sampa"][k] for k in per_rep["sampa"]]
    row["sam_ddp_over_sampa_min"], row["sam_ddp_over_sampa_max"] = min(rr), max(rr)
    row["cpu_share_1"] = statistics.median(shares[1])
    row["cpu_share_n"] = statistics.median(shares[world])
    return row


def _reading(row: dict[str, Any]) -> str:
    n = row["workers"]
    ratio, lo, hi = (row["sam_ddp_over_sampa"], row["sam_ddp_over_sampa_min"],
                     row["sam_ddp_over_sampa_max"])
    spread = f"(per repeat {lo:.2f}-{hi:.2f})"
    if ratio > 1 + TIE:
        verdict = (f"SAMPa-{n} wins: SAM-DDP-{n} takes {ratio:.2f}x its time per update "
                   f"{spread}")
    elif ratio < 1 - TIE:
        verdict = (f"SAM-DDP-{n} wins: SAMPa-{n} takes {1 / ratio:.2f}x its time per update "
                   f"{spread}")
    else:
        verdict = f"a tie within {TIE:.0%}: SAM-DDP-{n}/SAMPa-{n} = {ratio:.2f} {spread}"
    cautions = []
    if row["device"] == "cpu" and row["cpu_share_1"] < 0.9:
        cautions.append(f"a lone worker got {row['cpu_share_1']:.2f} of a core: the machine was "
                        "busy with something else")
    if hi > 1.25 * lo:
        cautions.append("the per-repeat ratios differ by more than 25%: the load changed "
                        "during the run")
    busy = f" (caution: {'; '.join(cautions)})" if cautions else ""
    return (f"reading: {verdict}; SAM on one worker takes {row['sam1_over_sampa']:.2f}x "
            f"SAMPa-{n}'s time{busy}")


def _print_block(row: dict[str, Any], job: dict[str, Any]) -> None:
    n, k = row["workers"], row["sampa_k"]
    print(f"\n{row['model']} ({row['params'] / 1e6:.2f}M params), global batch "
          f"{row['global_batch']}, N={n} (SAMPa: 2 groups of {k}), {job['device']}/"
          f"{job['backend']}, {job['repeats']}x{job['steps']} updates per scheme, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    b = row["global_batch"]
    lines = [("scheme", "ms/update", "batch/worker", "collectives per update"),
             ("SGD-1", f"{row['sgd1_ms']:.1f}", str(b), "-"),
             (f"SGD-DDP-{n}", f"{row['sgd_ddp_ms']:.1f}", str(b // n), "1 all-reduce (N)"),
             ("SAM-1", f"{row['sam1_ms']:.1f}", str(b), "-"),
             (f"SAM-DDP-{n}", f"{row['sam_ddp_ms']:.1f}", str(b // n), "2 all-reduce (N)"),
             (f"SAMPa-{n}", f"{row['sampa_ms']:.1f}", str(b // k),
              ("1 all-reduce (k) + " if k > 1 else "") + "2 broadcast (N)")]
    widths = [max(len(ln[i]) for ln in lines) for i in range(4)]
    for ln in lines:
        print("  " + "  ".join(c.rjust(w) if i in (1, 2) else c.ljust(w)
                               for i, (c, w) in enumerate(zip(ln, widths, strict=True))).rstrip())
    print(f"  SAM-DDP-{n}/SAMPa-{n} = {row['sam_ddp_over_sampa']:.2f}   "
          f"SAM-1/SAMPa-{n} = {row['sam1_over_sampa']:.2f}   CPU share (CPU time / wall of "
          f"the busy ranks): 1 worker {row['cpu_share_1']:.2f}, {n} workers "
          f"{row['cpu_share_n']:.2f}", flush=True)
    print("  " + _reading(row), flush=True)


def _print_summary(rows: list[dict[str, Any]]) -> None:
    head = ("model", "batch", "N", "SGD-1", "SGD-DDP", "SAM-1", "SAM-DDP", "SAMPa",
            "SAM-DDP/SAMPa", "SAM-1/SAMPa")
    body = [(r["model"], str(r["global_batch"]), str(r["workers"]), f"{r['sgd1_ms']:.1f}",
             f"{r['sgd_ddp_ms']:.1f}", f"{r['sam1_ms']:.1f}", f"{r['sam_ddp_ms']:.1f}",
             f"{r['sampa_ms']:.1f}", f"{r['sam_ddp_over_sampa']:.2f}",
             f"{r['sam1_over_sampa']:.2f}") for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    print("\nms per update (median; N workers; SAMPa with 2 groups of N/2):")
    for x in (head, *body):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(x, widths, strict=True))))


CSV_COLUMNS = ("model", "params", "global_batch", "workers", "sampa_k", "device", "backend",
               "steps", "repeats", "sgd1_ms", "sgd_ddp_ms", "sam1_ms", "sam_ddp_ms", "sampa_ms",
               "sam_ddp_over_sampa", "sam1_over_sampa", "sam_ddp_over_sampa_min",
               "sam_ddp_over_sampa_max", "cpu_share_1", "cpu_share_n", "load1")


def _fail(msg: str, code: int = 2) -> None:
    print(f"ddp.py: {msg}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128],
                   help="GLOBAL batch sizes (split over the workers)")
    p.add_argument("--workers", nargs="+", type=int, default=[2, 4],
                   help="N, even: DDP over N, SAMPa with two groups of N/2")
    p.add_argument("--steps", type=int, default=10, help="timed updates per block")
    p.add_argument("--repeats", type=int, default=3, help="alternating blocks per scheme")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates per scheme first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                   help="nccl only with one GPU per rank; gloo works everywhere")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=0.2, help="SAMPa-lambda")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="check the schemes on a float64 mlp first (default on)")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="how long a collective may wait for a peer")
    p.add_argument("--csv", default=None, help="also write one row per model/batch/N here")
    args = p.parse_args(argv)
    for name in ("models", "batch_sizes", "workers"):
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))

    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            _fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        _fail(f"--warmup must be >= 0, got {args.warmup}")
    for n in args.workers:
        if n < 2 or n % 2:
            _fail(f"--workers: N={n} must be even and >= 2 (SAMPa runs two groups of N/2)")
    for b in args.batch_sizes:
        for n in args.workers:
            if b < 1 or b % n:
                _fail(f"global batch {b} is not divisible by N={n}: the shards must be equal "
                      "for the mean of the shard gradients to be the full-batch gradient")
    if args.csv:
        try:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            Path(args.csv).touch()
        except OSError as err:
            _fail(f"--csv {args.csv}: {err.strerror or err}")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch

    models = _models()
    bad = [m for m in args.models if m not in models.MODEL_NAMES]
    if bad:
        _fail(f"--models: unknown {bad[0]!r} (choose from {', '.join(models.MODEL_NAMES)})")
    cores = os.cpu_count() or 1
    if args.device == "cuda":
        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA device is visible to torch")
        gpus = torch.cuda.device_count()
        if args.backend == "nccl" and max(args.workers) > gpus:
            _fail(f"--backend nccl needs a GPU per rank: N={max(args.workers)} ranks, {gpus} "
                  "GPU(s); use gloo to share a GPU")
        where = f"{gpus} GPU(s) ({torch.cuda.get_device_name(0)})"
    else:
        where = f"{cores} CPU core(s), one torch thread per process"
    print(f"ddp.py: torch {torch.__version__}, {args.device}/{args.backend}, {where}, "
          f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)

    job = {"device": args.device, "backend": args.backend, "timeout_s": args.timeout_s,
           "models": args.models, "batch_sizes": args.batch_sizes, "steps": args.steps,
           "repeats": args.repeats, "warmup": args.warmup, "lr": args.lr, "rho": args.rho,
           "lam": args.lam}

    for n in args.workers:
        if args.device == "cpu" and n > cores:
            print(f"warning: N={n} processes on {cores} CPU core(s) oversubscribe the machine: "
                  "the multi-worker times include waiting for a core", flush=True)
        if args.device == "cuda" and n > torch.cuda.device_count():
            print(f"note: N={n} processes share {torch.cuda.device_count()} GPU(s): their "
                  "kernels take turns on it", flush=True)

    found: dict[str, float] = {}
    got: dict[tuple[str, int, int], dict[int, Any]] = {}
    rows: list[dict[str, Any]] = []

    checks_in: list[int] = []

    def on_check(rank: int, payload: dict[str, float] | None) -> None:
        found.update(payload or {})
        checks_in.append(rank)
        if len(checks_in) < CHECK_WORLD:
            return
        same = {k: v for k, v in found.items() if "must differ" not in k}
        bad_pairs = [k for k, v in same.items() if not v <= TOL]
        vacuous = [k for k, v in found.items() if "must differ" in k and not v > 1e-6]
        if bad_pairs or vacuous or not same:
            what = "; ".join([f"{k}: relative difference {found[k]:.2e} > {TOL:g}"
                              for k in bad_pairs] +
                             [f"{k}: {found[k]:.2e}" for k in vacuous]) or "no result"
            print(f"check: FAILED ({what})", flush=True)
            raise SystemExit(1)
        print(f"check: ok (float64 mlp, {CHECK_STEPS} updates, batch {CHECK_BATCH}: largest "
              f"relative difference {max(same.values()):.1e} <= {TOL:g})", flush=True)

    def on_result(kind: str, key: Any, rank: int, payload: Any) -> None:
        if kind == "check":
            on_check(rank, payload)
            return
        got.setdefault(key, {})[rank] = payload
        model, batch, n = key
        if len(got[key]) < n:
            return
        row = _summarise(model, batch, n, payload["params"],
                         {k: v["times"] for k, v in got[key].items()})
        row.update(device=args.device, backend=args.backend, steps=args.steps,
                   repeats=args.repeats, load1=round(os.getloadavg()[0], 2))
        rows.append(row)
        _print_block(row, job)

    # one world for the whole run: the check on ranks 0-3, each N on ranks 0..N-1
    world = max(max(args.workers), CHECK_WORLD if args.check else 0)
    expect = (CHECK_WORLD if args.check else 0) + \
        sum(args.workers) * len(args.models) * len(args.batch_sizes)
    print(f"... spawning {world} processes", file=sys.stderr, flush=True)
    _spawn(world, {**job, "check": args.check, "workers": args.workers}, expect, on_result)

    rows.sort(key=lambda r: (args.models.index(r["model"]), r["global_batch"], r["workers"]))
    _print_summary(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
            w.writeheader()
            for r in rows:
                w.writerow({c: (round(r[c], 4) if isinstance(r[c], float) else r[c])
                            for c in CSV_COLUMNS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
