"""What a user's own data-parallel SAM costs: plain torch.distributed, no Ray, no sampa-ray runtime.

    .venv/bin/python benchmarks/ddp.py [--models resnet20] [--batch-sizes 32] [--workers 2]
        [--steps 10] [--repeats 3] [--device cpu|cuda] [--backend gloo|nccl] [--csv FILE]

The anchor for the product's own numbers. N spawned processes of one process group (one torch
thread each on CPU) hold the model with its parameters and gradients as views into two flat
buffers (``sampa_ray.flat.FlatParams``); each takes its shard of the global batch B
(``sampa_ray.shards.shard_range``'s cut) and weights its shard's mean loss by its share of B, so
the summed shard gradients are the whole batch's. One update of

    SGD-DDP-N   one gradient, one all-reduce of the whole flat gradient, an SGD step
    SAM-DDP-N   the ascent gradient, all-reduced (it sets the perturbation x + rho g/(|g| + 1e-12)
                every worker applies), the perturbed gradient, all-reduced, an SGD step

Blocks of --steps updates of the two alternate --repeats times; an update's time is the slowest
rank's; printed per model and global batch are the medians (ms) and SAM-DDP/SGD-DDP. Put them
beside ``sampa-ray compare --baseline ddp`` (the product's sgd-ddp and sam-ddp rows on the same
model, global batch and N = 2k workers: what the product adds to a user's own DDP) and
``benchmarks/floor.py`` (what SAMPa's two gradients in lockstep cost at best). Synthetic
CIFAR-shaped data. Never imports Ray; a benchmark, not a test (``tests/test_bench_ddp.py`` checks
that its SAM-DDP update is the product's SAM on the whole batch).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("sgd_ddp", "sam_ddp")


def _light() -> None:
    """Make ``sampa_ray``'s torch-only modules importable, also where the package's top level
    (pydantic, yaml) is not installed, as on a bare GPU machine."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    try:
        import sampa_ray  # noqa: F401
    except ImportError:
        import types

        pkg = types.ModuleType("sampa_ray")
        pkg.__path__ = [str(ROOT / "sampa_ray")]
        sys.modules["sampa_ray"] = pkg


def build(model: str, device: Any, dtype: Any) -> Any:
    """The model (seed 0) on ``device`` in ``dtype``, in training mode."""
    import torch

    from sampa_ray.models import build_model, input_shape_for

    torch.manual_seed(0)
    net = build_model(model, 10, in_channels=input_shape_for(model)[0])
    return net.to(device=device, dtype=dtype).train()


def batches(model: str, batch: int, device: Any, dtype: Any) -> list[tuple[Any, Any]]:
    """Two global batches of synthetic data; update t uses batch t % 2."""
    import torch

    from sampa_ray.models import input_shape_for

    gen = torch.Generator().manual_seed(batch)
    return [(torch.randn(batch, *input_shape_for(model), generator=gen, dtype=torch.float64)
             .to(device=device, dtype=dtype),
             torch.randint(0, 10, (batch,), generator=gen).to(device)) for _ in range(2)]


def update(net: Any, flat: Any, x: Any, X: Any, Y: Any, share: float, lr: float, rho: float,
           sam: bool) -> None:
    """One SGD-DDP (or SAM-DDP) update of ``x`` in place, this rank on its shard (X, Y)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    def grad(point: Any) -> Any:
        flat.load_(point)
        flat.zero_grad_()
        (F.cross_entropy(net(X), Y) * share).backward()
        dist.all_reduce(flat.grad)  # one flat all-reduce: the sum of the shard gradients
        return flat.grad

    g = grad(x)
    if sam:
        g = grad(x + g / (g.norm() + 1e-12) * rho)
    x.add_(g, alpha=-lr)


def rank_main(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    _light()
    from sampa_ray.flat import FlatParams
    from sampa_ray.shards import shard_range

    torch.set_num_threads(1)
    cuda = job["device"] == "cuda"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else \
        torch.device("cpu")
    dtype = getattr(torch, job["dtype"])
    dist.init_process_group(job["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    saved: dict[str, Any] = {}  # rank 0, with --save: what each scheme reached
    for model in job["models"]:
        net = build(model, device, dtype)
        flat = FlatParams(net)
        x0 = flat.data.detach().clone()
        for batch in job["batch_sizes"]:
            lo, hi = shard_range(batch, rank, world)
            shards = [(X[lo:hi], Y[lo:hi]) for X, Y in batches(model, batch, device, dtype)]
            xs = {s: x0.clone() for s in SCHEMES}
            done = dict.fromkeys(SCHEMES, 0)
            times: dict[str, list[float]] = {s: [] for s in SCHEMES}
            plan = [s for s in SCHEMES for _ in range(job["warmup"])] + \
                [s for rep in range(job["repeats"]) for s in SCHEMES[rep % 2:] + SCHEMES[:rep % 2]
                 for _ in range(job["steps"])]
            for i, s in enumerate(plan):
                if cuda:
                    torch.cuda.synchronize(device)
                dist.barrier()
                t0 = time.perf_counter()
                update(net, flat, xs[s], *shards[done[s] % 2], (hi - lo) / batch, job["lr"],
                       job["rho"], s == "sam_ddp")
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= len(SCHEMES) * job["warmup"]:
                    times[s].append(time.perf_counter() - t0)
                done[s] += 1
            slowest = {}
            for s in SCHEMES:  # per update, the slowest rank's time
                t = torch.tensor(times[s], dtype=torch.float64, device=device if cuda else "cpu")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                slowest[s] = t.tolist()
            if rank == 0:
                report(job, model, batch, world, flat.numel, slowest)
                saved[f"{model}/{batch}/{world}"] = {"x0": x0.cpu(), "updates": done,
                                             **{s: xs[s].cpu() for s in SCHEMES}}
    if rank == 0 and job["save"]:
        old = torch.load(job["save"]) if Path(job["save"]).exists() else {}
        torch.save({**old, **saved}, job["save"])
    dist.destroy_process_group()


def report(job: dict[str, Any], model: str, batch: int, n: int, params: int,
           slowest: dict[str, list[float]]) -> None:
    ms = {s: statistics.median(slowest[s]) * 1e3 for s in SCHEMES}
    print(f"{model} ({params / 1e6:.2f}M params), global batch {batch} over N={n}, "
          f"{job['device']}/{job['backend']}, {job['repeats']}x{job['steps']} updates each: "
          f"SGD-DDP-{n} {ms['sgd_ddp']:.1f} ms, SAM-DDP-{n} {ms['sam_ddp']:.1f} ms per update "
          f"(median); SAM-DDP/SGD-DDP {ms['sam_ddp'] / ms['sgd_ddp']:.2f}", flush=True)
    if job["csv"]:
        row = {"model": model, "params": params, "global_batch": batch, "workers": n,
               "device": job["device"], "backend": job["backend"], "dtype": job["dtype"],
               "steps": job["steps"], "repeats": job["repeats"],
               "sgd_ddp_ms": round(ms["sgd_ddp"], 4), "sam_ddp_ms": round(ms["sam_ddp"], 4),
               "load1": round(os.getloadavg()[0], 2)}
        new = not Path(job["csv"]).stat().st_size
        with open(job["csv"], "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


def fail(msg: str) -> None:
    print(f"ddp.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32],
                   help="GLOBAL batch sizes (split over the workers)")
    p.add_argument("--workers", nargs="+", type=int, default=[2], help="N, 2 or more")
    p.add_argument("--steps", type=int, default=10, help="timed updates per block")
    p.add_argument("--repeats", type=int, default=3, help="alternating blocks per scheme")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates per scheme first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                   help="nccl only with one GPU per rank; gloo works everywhere")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--csv", default=None, help="also append one row per model/batch/N here")
    p.add_argument("--save", default=None,
                   help="write the parameters each scheme reached here (torch.save)")
    a = p.parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(a, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 0:
        fail(f"--warmup must be >= 0, got {a.warmup}")
    for n in a.workers:
        if n < 2:
            fail(f"--workers: N={n}; data-parallel needs 2 or more workers")
        for b in a.batch_sizes:
            if b < n:
                fail(f"global batch {b} is smaller than N={n}: every worker needs a sample")
    if a.save:
        Path(a.save).unlink(missing_ok=True)
    if a.csv:
        try:
            Path(a.csv).parent.mkdir(parents=True, exist_ok=True)
            Path(a.csv).write_text("")
        except OSError as err:
            fail(f"--csv {a.csv}: {err.strerror or err}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import socket

    import torch
    import torch.multiprocessing as mp

    _light()
    from sampa_ray.models import MODEL_NAMES

    bad = [m for m in a.models if m not in MODEL_NAMES]
    if bad:
        fail(f"--models: unknown {bad[0]!r} (choose from {', '.join(MODEL_NAMES)})")
    if a.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is visible to torch")
    if a.backend == "nccl" and (a.device != "cuda" or max(a.workers) > torch.cuda.device_count()):
        fail("--backend nccl needs --device cuda and a GPU per rank; gloo shares a GPU")
    print(f"ddp.py: torch {torch.__version__}, {a.device}/{a.backend}, {os.cpu_count()} CPU "
          f"core(s), one torch thread per process, load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    job = {k: getattr(a, k) for k in ("models", "batch_sizes", "steps", "repeats", "warmup",
                                      "device", "backend", "dtype", "lr", "rho", "csv", "save")}
    for n in dict.fromkeys(a.workers):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(rank_main, args=(n, port, job), nprocs=n)
        except Exception as err:  # a rank failed: its error, in one line
            last = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            print(f"ddp.py: N={n}: {last[-1] if last else type(err).__name__}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
