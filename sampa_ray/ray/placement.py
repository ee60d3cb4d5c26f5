"""Where the 2k gradient workers go (``workers_per_role`` k: two role groups of k), and which
of them compute each role's gradient.

Placement: a role group's k workers belong on one node (their all-reduce stays inside it, NCCL
over NVLink/PCIe), the two groups on different nodes when the cluster allows. With GPUs that is
two bundles of k GPUs each, STRICT_SPREAD over two GPU nodes that have k each, else
STRICT_PACK on one node with 2k; without such nodes, one GPU bundle per worker (PACK); on a
machine with fewer GPUs than workers, the workers share them (fractional GPUs); CPUs otherwise
(one bundle per worker, torch threads = the CPUs of the bundle).

Roles: the algorithm names the slot (0, 1) that serves each role; slot ``s``'s group is workers
``s*k .. s*k+k-1``. ``data_parallel`` makes one group of all 2k workers for a single-slot
algorithm (SGD, SAM): the data-parallel baseline on the same actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray

from ..config import TrainConfig
from ..errors import UserError

#: the two role groups, by slot; named after the SAMPa roles (SGD and SAM use the first)
ROLE_NAMES = ("perturbed", "extrapolated")


def worker_names(k: int = 1) -> list[str]:
    """The 2k workers by index: ``perturbed``/``extrapolated`` for k = 1, else
    ``perturbed-0`` .. ``extrapolated-{k-1}``."""
    if k == 1:
        return list(ROLE_NAMES)
    return [f"{role}-{r}" for role in ROLE_NAMES for r in range(k)]


def role_groups(slots: list[int], k: int, data_parallel: bool = False) -> dict[int, list[int]]:
    """Which workers compute each slot's gradient (first rank first)."""
    if data_parallel:
        if len(slots) != 1:
            raise UserError("data_parallel: the algorithm's gradients already run on both role "
                            "groups; data-parallel is for one-role algorithms (sgd, sam)")
        return {slots[0]: list(range(2 * k))}
    return {s: list(range(s * k, s * k + k)) for s in slots}



def broadcast_fans(groups: dict[int, list[int]]) -> dict[int, list[int]]:
    """By slot: the workers a role's gradient is broadcast to, its group's first rank (the
    sender) and every worker of the other roles. The group's other members hold the gradient
    already (their all-reduce gave it to them) and take no part. Empty for one worker per
    role, where the broadcast spans all workers anyway, and for one role (nothing is
    broadcast)."""
    if len(groups) < 2 or all(len(g) <= 1 for g in groups.values()):
        return {}
    return {s: sorted([g[0], *(w for t, h in groups.items() if t != s for w in h)])
            for s, g in groups.items()}

@dataclass
class Placement:
    """Where the 2k workers go. ``mode`` is gpu-spread, gpu-pack, gpu-each, gpu-shared or
    cpu; ``bundle_of[i]``: worker ``i``'s bundle."""

    mode: str
    strategy: str
    bundles: list[dict[str, float]]
    threads: int
    gpus_per_worker: float
    bundle_of: list[int] = field(default_factory=lambda: [0, 1])
    workers_per_role: int = 1

    @property
    def cpus_per_worker(self) -> float:
        """The CPUs each worker takes from its bundle: the workers placed in one bundle (a role
        group in a bundle of k GPUs) share its CPUs; every bundle holds as many workers."""
        return self.bundles[0].get("CPU", 0.0) / self.bundle_of.count(0)

    def describe(self) -> str:
        k = self.workers_per_role
        n = 2 * k
        each = "one GPU each" if k == 1 else f"a role group of {k} GPUs each"
        what = {"gpu-spread": f"{each} on two GPU nodes (STRICT_SPREAD)",
                "gpu-pack": f"{each} on one node",
                "gpu-each": "one GPU per worker, packed on as few nodes as fit (PACK)",
                "gpu-shared": f"{n} workers share the GPUs (fractional GPUs)",
                "cpu": f"CPUs only, {self.threads} torch thread(s) per worker"}[self.mode]
        workers = "" if k == 1 else f"{n} workers ({k} per role); "
        return (f"placement: {workers}{what}; bundles {self.bundles}, strategy "
                f"{self.strategy}")


def plan_placement(nodes: list[dict[str, float]], k: int, device: str,
                   threads: int | None) -> Placement:
    """The placement of 2k workers on nodes with these resources (``{"CPU": .., "GPU": ..}``
    per live node)."""
    n = 2 * k
    gpu_nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
    total_gpus = sum(r.get("GPU", 0) for r in nodes)
    total_cpus = sum(r.get("CPU", 0) for r in nodes)
    each = list(range(n))
    if device == "cpu" or total_gpus < 1:
        if device == "cuda":
            raise UserError("device: cuda requested but the Ray cluster has no GPU")
        t = threads or max(1, int(total_cpus) // n)
        # more workers than CPUs (4 workers on 2 cores): each takes its share of a CPU
        cpus = float(t) if t * n <= total_cpus or t > 1 else total_cpus / n
        return Placement("cpu", "PACK", [{"CPU": cpus}] * n, t, 0.0, each, k)
    cpus_per_node = min(r.get("CPU", 1) for r in gpu_nodes)
    by_role = [i // k for i in range(n)]  # a role group shares one bundle
    if sum(1 for r in gpu_nodes if r.get("GPU", 0) >= k) >= 2:
        t = threads or max(1, int(cpus_per_node) // k)
        return Placement("gpu-spread", "STRICT_SPREAD",
                         [{"GPU": float(k), "CPU": float(t * k)}] * 2, t, 1.0, by_role, k)
    if any(r.get("GPU", 0) >= n for r in gpu_nodes):
        t = threads or max(1, int(cpus_per_node) // n)
        return Placement("gpu-pack", "STRICT_PACK",
                         [{"GPU": float(k), "CPU": float(t * k)}] * 2, t, 1.0, by_role, k)
    t = threads or max(1, int(cpus_per_node) // n)
    if total_gpus >= n:
        return Placement("gpu-each", "PACK", [{"GPU": 1.0, "CPU": float(t)}] * n, t, 1.0,
                         each, k)
    return Placement("gpu-shared", "PACK", [{"GPU": 1.0 / n, "CPU": float(t)}] * n, t, 1.0 / n,
                     each, k)


def fits(placement: Placement, nodes: list[dict[str, float]]) -> bool:
    """Whether nodes with these resources can hold the placement's bundles by its strategy
    (every bundle of a placement asks for the same, so first fit decides)."""
    free = [dict(r) for r in nodes]

    def holds(node: dict[str, float], want: dict[str, float]) -> bool:
        return all(node.get(k, 0.0) >= v - 1e-9 for k, v in want.items())

    bundles = placement.bundles
    if placement.strategy == "STRICT_PACK":
        whole = {k: sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b}
        return any(holds(r, whole) for r in free)
    used: set[int] = set()
    for b in bundles:
        where = next((i for i, r in enumerate(free) if holds(r, b) and not (
            placement.strategy == "STRICT_SPREAD" and i in used)), None)
        if where is None:
            return False
        used.add(where)
        for k, v in b.items():
            free[where][k] = free[where].get(k, 0.0) - v
    return True


def live_resources() -> list[dict[str, float]]:
    """The resources of each live node of the cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def choose_placement(cfg: TrainConfig) -> Placement:
    """Decide the placement from the cluster's live nodes."""
    return plan_placement(live_resources(), cfg.workers_per_role, cfg.device, cfg.threads)
