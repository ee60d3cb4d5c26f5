"""Worker to worker over torch.distributed: NCCL between GPUs, gloo otherwise.

The replicated data path's peers exchange one gradient each per round. Through Ray's object store
that costs a put, an owner notification and a fetch per gradient, and the next round's task
waits for the coordinator to see the object; here the workers form a process group once and
each gradient is one ``broadcast`` from the worker that computed it, straight into a buffer the
others allocated once. On GPUs in different processes with NCCL the bytes go device to device;
with gloo (CPU, or GPUs NCCL cannot pair, e.g. two workers sharing one GPU) they go through host
memory over TCP. The same process group carries the role groups' all-reduce
(``workers_per_role``): each group is a ``new_group`` inside it.

Bytes only: what the tensors mean is the caller's business.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..shards import ALONE, GroupComm


class CollectiveError(RuntimeError):
    """The process group could not be formed or broke."""


class PeerFailed(RuntimeError):
    """A peer's own work failed in this round and it said so in the exchange instead of
    sending its gradient: this worker's round ends too (the peer's error is what counts)."""


def _why(err: BaseException) -> str:
    """What torch.distributed said, in one line (the exception itself when it said nothing)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else repr(err)


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a free TCP port on it, for rank 0 to host the group's store."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return host, int(s.getsockname()[1])


def choose_backend(device: torch.device, gpu_ids: list[list[str]]) -> str:
    """NCCL when every member has a GPU of its own (NCCL cannot pair two ranks on one GPU) and
    NCCL is built in; gloo otherwise."""
    distinct = all(ids for ids in gpu_ids) and \
        len({tuple(ids) for ids in gpu_ids}) == len(gpu_ids)
    if device.type == "cuda" and distinct and dist.is_nccl_available():
        return "nccl"
    return "gloo"


class PeerGroup:
    """This process's membership in the workers' process group (one per process) and in the
    role groups inside it: ``groups`` lists each group's world ranks (every member calls this
    with the same list, in the same order, as ``new_group`` requires)."""

    def __init__(self, rank: int, world: int, host: str, port: int, backend: str,
                 device: torch.device, timeout_s: float,
                 groups: Sequence[Sequence[int]] = (),
                 fans: Sequence[Sequence[int]] = ()) -> None:
        if not dist.is_available():
            raise CollectiveError("torch.distributed is not available in this torch build")
        leave()  # a group from an earlier run (or a broken one) goes first
        try:
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank,
                                    world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as err:  # noqa: BLE001 - any failure means: no group
            raise CollectiveError(f"{backend} group {host}:{port} rank {rank}/{world}: "
                                  f"{_why(err)}"
                                  ) from None
        self.rank, self.world, self.backend = rank, world, backend
        # where the exchanged tensors live: the GPU with NCCL, host memory with gloo
        self.device = device if backend == "nccl" else torch.device("cpu")
        self.comm = ALONE  # this rank's role group
        # the broadcast groups this rank is in, by their members (``fans``: a subset of the
        # world each broadcast spans instead of all of it)
        self.fans: dict[tuple[int, ...], dist.ProcessGroup] = {}
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            for members in groups:
                members = [int(m) for m in members]
                pg = dist.new_group(members, timeout=timeout) if len(members) > 1 else None
                if rank in members:
                    self.comm = GroupComm(members.index(rank), len(members), pg, self.device)
            for members in fans:
                members = [int(m) for m in members]
                pg = dist.new_group(members, timeout=timeout)
                if rank in members:
                    self.fans[tuple(members)] = pg
        except Exception as err:  # noqa: BLE001
            leave()
            raise CollectiveError(f"{backend} role groups {list(map(list, groups))}: "
                                  f"{_why(err)}"
                                  ) from None

    def broadcast(self, tensor: torch.Tensor, src: int,
                  fan: Sequence[int] | None = None) -> None:
        """Send ``tensor`` (``src`` is this rank) or receive into it (another rank), over the
        whole world or the broadcast group ``fan`` (world ranks, one of ``fans``)."""
        group = self.fans[tuple(fan)] if fan else None
        try:
            dist.broadcast(tensor, src=src, group=group)
        except Exception as err:  # noqa: BLE001 - a peer died or the link broke
            raise CollectiveError(f"broadcast from rank {src} failed: "
                                  f"{_why(err)}"
                                  ) from None


def leave() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a broken group is gone either way
            dist.destroy_process_group()
