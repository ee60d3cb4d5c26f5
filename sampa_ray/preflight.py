"""Checks the input alone decides, made before anything starts.

Starting Ray takes 10 s or more, and the workers load the data only after that; a run that
cannot work (a batch larger than the dataset, CIFAR files that are missing or not CIFAR files,
a control API on a public address with no token, more torch threads than the machine has for
its embedded Ray instance, a cluster address where nothing answers) should say so in one line
at once, not after that wait. Everything here reads only the config and the files it names
(and knocks once at the Ray address it names); the workers still check the data in full when
they load it.
"""

from __future__ import annotations

import os
import socket

from .config import TrainConfig
from .errors import UserError
from .plugins import is_plugin
from .security import TOKEN_ENV, is_loopback, read_tls, read_token

#: gradient workers of a Ray run per ``workers_per_role``, each placed with ``threads`` CPUs
#: (``sampa_ray.ray.placement.worker_names``)
RAY_WORKERS = 2
#: training images of scikit-learn's digits after the 80/20 split (``data.datasets``)
DIGITS_TRAIN = 1437
_PIXELS = 3 * 32 * 32
#: how a pickle can start: protocol 2+ (``\x80``) or protocol 0/1 holding a dict
_PICKLE_STARTS = (b"\x80", b"(", b"}")


def check_before_start(cfg: TrainConfig) -> list[str]:
    """Raise a one-line :class:`UserError` for what cannot work; return warning lines (without
    the ``sampa-ray:`` prefix) for what would run, but badly, or what was inferred."""
    notes = check_plugins(cfg)
    n = max_train_samples(cfg)
    if n is not None and cfg.batch_size > n:
        raise UserError(f"batch_size: {cfg.batch_size} is larger than the {n} training samples "
                        f"of {cfg.dataset}")
    if cfg.accumulate > 1 and cfg.last_batch == "keep":
        check_last_micro_batches(cfg)
    if cfg.backend == "ray":
        _check_listeners(cfg)
        check_ray_address(cfg)
    return notes + _check_threads(cfg)


#: seconds a Ray address gets to accept a TCP connection before it counts as not answering
CONNECT_TIMEOUT_S = 3.0


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address (``host:port``, ``[v6]:port``, ``ray://host:port``);
    None for the addresses Ray resolves itself (``auto``, ``local``) and anything else."""
    rest = address.strip().removeprefix("ray://")
    if rest in ("auto", "local") or "://" in rest:
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_ray_address(cfg: TrainConfig, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """The Ray address the run joins (``--address``, else ``$RAY_ADDRESS``) accepts a TCP
    connection within ``timeout_s``: otherwise one line now, where Ray itself would retry for a
    minute and more and then print a page."""
    env = os.environ.get("RAY_ADDRESS", "")
    address = cfg.address or env
    what = "RAY_ADDRESS" if address == env else "address"  # the CLI copies it into the config
    endpoint = ray_endpoint(address) if address else None
    if endpoint is None:
        return
    host, port = endpoint
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror:
        why = f"{host} does not resolve"
    except OSError:
        why = f"nothing answers at {shown}"
    raise UserError(f"{what}: {why}; is a Ray head running there? check with: ray status "
                    f"--address {shown}")


def check_last_micro_batches(cfg: TrainConfig) -> None:
    """With ``accumulate`` and ``last_batch: keep``, the epoch's smaller last batch still
    splits into the micro-batches on every worker's shard (:mod:`sampa_ray.micro`): the
    training set's size decides it, so the data is loaded here, once."""
    from .micro import check_last_batch, group_size
    from .task import Task

    check_last_batch(Task(cfg).schedule, cfg.accumulate, group_size(cfg))


def uses_plugins(cfg: TrainConfig) -> bool:
    """Whether the run's model, dataset or loss is a plug-in (or a built-in served by one)."""
    return (is_plugin("model", cfg.model) or is_plugin("dataset", cfg.dataset)
            or cfg.loss is not None)


def check_plugins(cfg: TrainConfig) -> list[str]:
    """A run with a plug-in builds its task here, once, as every worker will: the modules
    import, the factory returns an ``nn.Module`` (of float32 parameters, under bf16 or fp16
    autocast), the dataset's items collate into batch 0, the model takes it and the loss on it
    is a finite scalar. Each failure is one line naming
    the plug-in; nothing has started yet. Returns what the data told (the classes inferred
    from its labels, classes without a training sample)."""
    if not uses_plugins(cfg):
        return []
    import torch  # only for runs that bring their own parts

    from .task import Task

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = Task(cfg)
    model = task.build_model()
    odd = sorted({str(p.dtype) for p in model.parameters()} - {"torch.float32"})
    if cfg.precision != "fp32" and odd:  # autocast lowers float32 operations only
        raise UserError(f"precision: {cfg.precision} autocast needs float32 parameters; the model "
                        f"{cfg.model} has {', '.join(odd)} ones (use --precision fp32)")
    task.check(model, torch.device("cpu"))
    return list(getattr(task.data, "notes", []))


def max_train_samples(cfg: TrainConfig) -> int | None:
    """At least as many training samples as the dataset holds (exact for digits and synthetic,
    a bound from the files' sizes for CIFAR, whose files are checked on the way); None when
    unknown."""
    if cfg.dataset == "digits":
        return DIGITS_TRAIN
    if cfg.dataset == "synthetic":
        return cfg.synthetic_size
    if cfg.dataset in ("cifar10", "cifar100"):
        return _check_cifar(cfg.dataset, cfg.data_dir)
    return None


def _check_cifar(name: str, data_dir: str | None) -> int:
    """The CIFAR folder holds every file, each one starting as a pickle does; returns the most
    training images the training files can hold (one image is 3,072 bytes)."""
    from .data.cifar import CIFAR_SPECS, resolve_folder

    spec = CIFAR_SPECS[name]
    hint = f"(download {spec.url} on a connected machine and extract it there)"
    folder = resolve_folder(spec, data_dir)
    train_bytes = 0
    for fname in (*spec.train_files, spec.test_file):
        path = folder / fname
        if not path.is_file():
            raise UserError(f"{spec.name}: no {fname} in {folder} {hint}")
        try:
            with path.open("rb") as f:
                head = f.read(2)
            size = path.stat().st_size
        except OSError as err:
            raise UserError(f"{spec.name}: cannot read {path} ({err.strerror}) {hint}") from None
        if not head.startswith(_PICKLE_STARTS):
            raise UserError(f"{spec.name}: {path} is not a CIFAR python pickle (it starts with "
                            f"{head!r}) {hint}")
        if fname in spec.train_files:
            train_bytes += size
    return train_bytes // _PIXELS


def _check_listeners(cfg: TrainConfig) -> None:
    """The coordinator's gRPC server and metrics endpoint: beyond loopback only with a token,
    and the token and TLS files readable (what the coordinator would find after Ray starts)."""
    token = read_token(cfg)
    read_tls(cfg)
    if token:
        return
    for field, host in (("control_host", cfg.control_host), ("metrics_host", cfg.metrics_host)):
        if not is_loopback(host):
            raise UserError(f"{field}: listening on {host or 'every interface'} (not loopback) "
                            f"requires a token (--token-file or ${TOKEN_ENV})")


def _check_threads(cfg: TrainConfig) -> list[str]:
    return check_threads(cfg, os.cpu_count() or 1)


def check_threads(cfg: TrainConfig, cores: int) -> list[str]:
    """Torch threads against a machine of ``cores`` CPU cores. An embedded Ray instance (it has
    that many CPUs) cannot place 2k workers of several threads each beyond them (an error);
    2k one-thread workers beyond them are placed at a share of a core each, and one process
    with more threads than cores oversubscribes them: both still run, many times slower (a
    warning line each)."""
    if cfg.backend == "ray" and not cfg.address:
        workers = RAY_WORKERS * cfg.workers_per_role
        threads = cfg.threads or 1  # unset: the placement gives each worker one at most
        need = workers * threads
        if need <= cores:
            return []
        if threads > 1:
            raise UserError(f"threads: {workers} workers x {threads} threads need {need} "
                            f"CPUs and this machine has {cores} for its local Ray instance "
                            f"(use --threads {max(1, cores // workers)} or fewer)")
        fewer = (f"--workers-per-role {max(1, cores // RAY_WORKERS)}" if cores >= RAY_WORKERS
                 else "--backend local")
        return [f"warning: {workers} workers x 1 thread need {need} CPU cores and this machine "
                f"has {cores}; the workers share the cores, so expect slower steps (use "
                f"{fewer} for one core each)"]
    if cfg.backend == "local" and cfg.threads and cfg.threads > cores:
        return [f"warning: --threads {cfg.threads} is more than this machine's {cores} CPU "
                f"cores; torch oversubscribes them and runs many times slower (use --threads "
                f"{cores} or fewer)"]
    return []


__all__ = ["CONNECT_TIMEOUT_S", "DIGITS_TRAIN", "RAY_WORKERS", "check_before_start",
           "check_last_micro_batches", "check_plugins", "check_ray_address", "check_threads",
           "max_train_samples", "ray_endpoint", "uses_plugins"]
