"""Where the two gradient workers go: one bundle each in a placement group.

STRICT_SPREAD across two GPU nodes when the cluster has them (each worker a GPU of its own), both
on one node with a GPU each, two workers sharing one GPU (0.5 each) on a one-GPU machine, CPUs
otherwise (torch threads = the CPUs of the bundle).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from ..config import TrainConfig
from ..errors import UserError

#: the two workers, by slot; named after the SAMPa roles they serve (SGD and SAM use the first)
WORKER_NAMES = ("perturbed", "extrapolated")


@dataclass
class Placement:
    """Where the two workers go. ``mode`` is gpu-spread, gpu-pack, gpu-shared or cpu."""

    mode: str
    strategy: str
    bundles: list[dict[str, float]]
    threads: int
    gpus_per_worker: float

    def describe(self) -> str:
        what = {"gpu-spread": "one GPU each on two GPU nodes (STRICT_SPREAD)",
                "gpu-pack": "one GPU each on one node",
                "gpu-shared": "both workers share one GPU (fractional GPUs)",
                "cpu": f"CPUs only, {self.threads} torch thread(s) per worker"}[self.mode]
        return f"placement: {what}; bundles {self.bundles}, strategy {self.strategy}"


def choose_placement(cfg: TrainConfig) -> Placement:
    """Decide the placement from the cluster's live nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = [n for n in nodes if n["Resources"].get("GPU", 0) >= 1]
    total_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    total_cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    n = len(WORKER_NAMES)
    if cfg.device == "cpu" or total_gpus < 1:
        if cfg.device == "cuda":
            raise UserError("device: cuda requested but the Ray cluster has no GPU")
        threads = cfg.threads or max(1, int(total_cpus) // n)
        return Placement("cpu", "PACK", [{"CPU": float(threads)}] * n, threads, 0.0)
    cpus_per_node = min(node["Resources"].get("CPU", 1) for node in gpu_nodes)
    threads = cfg.threads or max(1, int(cpus_per_node) // n)
    if len(gpu_nodes) >= n:
        return Placement("gpu-spread", "STRICT_SPREAD",
                         [{"GPU": 1.0, "CPU": float(threads)}] * n, threads, 1.0)
    if total_gpus >= n:
        return Placement("gpu-pack", "PACK", [{"GPU": 1.0, "CPU": float(threads)}] * n,
                         threads, 1.0)
    return Placement("gpu-shared", "PACK", [{"GPU": 1.0 / n, "CPU": float(threads)}] * n,
                     threads, 1.0 / n)
