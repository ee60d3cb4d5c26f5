"""What the machine itself allows SAMPa, with no Ray, no transport and no update.

    .venv/bin/python benchmarks/floor.py [--model resnet20] [--batch-size 32] [--blocks 8]

Two processes, one torch thread each, compute gradients of the same model on the same kind of
batch. In a *paired* step both compute at once and the step ends when the slower one is done
(SAMPa's round: two independent gradients in lockstep); in an *alone* step one computes while the
other idles (SGD's round; SAM's is two of them). Blocks of alone and paired steps alternate, so a
slow spell of a shared machine hits both. Printed: the median alone and paired step, and the
ratios a perfect data path would reach here:

    SAM/SAMPa  <= 2 * alone / paired        SAMPa/SGD >= paired / alone

Whatever a run of ``bench_ray.py`` adds on top of these is the data path's cost.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any


def _worker(rank: int, model: str, batch: int, plan: list[str], barrier: Any,
            out: Any) -> None:
    import torch
    import torch.nn.functional as F

    from sampa_ray.models import build_model, input_shape_for

    torch.set_num_threads(1)
    torch.manual_seed(rank)
    net = build_model(model, 10, in_channels=input_shape_for(model)[0])
    x = torch.randn(batch, *input_shape_for(model))
    y = torch.randint(0, 10, (batch,))
    times = []
    for kind in plan:
        barrier.wait()
        t0 = time.perf_counter()
        if kind == "paired" or rank == 0:
            net.zero_grad(set_to_none=False)
            F.cross_entropy(net(x), y).backward()
        times.append(time.perf_counter() - t0)
        barrier.wait()
    out.put((rank, times))


def measure(model: str, batch: int, blocks: int = 8, block_steps: int = 5
            ) -> tuple[float, float, int]:
    """Median seconds of an alone step and of a paired step (the slower of two), and the
    number of each measured."""
    warm = ["paired"] * 3
    plan = warm + [k for _ in range(blocks) for k in ("alone", "paired")
                   for _ in range(block_steps)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, model, batch, plan, barrier, out))
             for r in (0, 1)]
    for pr in procs:
        pr.start()
    got = dict(out.get() for _ in procs)
    for pr in procs:
        pr.join()
    alone, paired = [], []
    for i, kind in enumerate(plan[len(warm):], start=len(warm)):
        if kind == "alone":
            alone.append(got[0][i])
        else:
            paired.append(max(got[0][i], got[1][i]))
    return statistics.median(alone), statistics.median(paired), len(alone)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--blocks", type=int, default=8, help="alone/paired block pairs")
    p.add_argument("--block-steps", type=int, default=5)
    args = p.parse_args()
    a, b, n = measure(args.model, args.batch_size, args.blocks, args.block_steps)
    print(f"{args.model}, batch {args.batch_size}, {n} alone / {n} paired "
          f"steps: alone {a * 1e3:.1f} ms, paired (slower of two) {b * 1e3:.1f} ms")
    print(f"floor: SAM/SAMPa <= {2 * a / b:.2f}, SAMPa/SGD >= {b / a:.2f}")


if __name__ == "__main__":
    main()
