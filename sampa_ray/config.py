"""Run configuration: one validated pydantic model, loaded from YAML and/or CLI flags.

Every bad value becomes a :class:`~sampa_ray.errors.UserError` with one line naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import UserError, validation_line

#: fields that say how and where a run executes, not which trajectory it follows
RUNTIME_FIELDS = {"out", "backend", "threads", "device", "eval_every", "address",
                  "checkpoint_every", "checkpoint_interval_s", "keep_checkpoints", "resume",
                  "max_nonfinite", "round_timeout", "max_restarts", "link_latency_ms",
                  "link_gbit_s", "data_path", "transport", "collective_backend", "control_host",
                  "control_port", "token_file",
                  "metrics_port", "metrics_host", "metrics_cert", "metrics_key",
                  "control_cert", "control_key", "loader_workers", "pin_memory"}

#: trajectory fields added after runs were first hashed (the paper's recipe): left out of the
#: hash at their defaults, so a run that does not use them keeps its hash, and its checkpoints
#: from before stay resumable
LATER_FIELDS = ("label_smoothing_mode", "bn_stats", "val_split", "last_batch", "cutout_p",
                "pad_fill", "model_args", "dataset_args", "loss", "num_classes", "optimizer",
                "beta1", "beta2", "eps", "precision", "workers_per_role", "data_parallel",
                "sync_bn")


class TrainConfig(BaseModel):
    """Everything that defines a run. Defaults: SAMPa-0.2 on the bundled digits data."""

    # strict: no silent coercion (true is not 1.0, "3" is not 3)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    algo: str = Field("sampa", description="algorithm: sgd, sam, sampa or any registered "
                      "with sampa_ray.algorithms.register")
    lr: float = Field(0.05, gt=0, allow_inf_nan=False, description="base learning rate "
                     "(the peak of a cosine schedule)")
    lr_schedule: Literal["constant", "cosine", "cosine-epoch"] = Field(
        "cosine", description="cosine: annealed every update; cosine-epoch: annealed once per "
        "epoch over the run's epochs (torch's CosineAnnealingLR(T_max=epochs) stepped after "
        "each epoch, as the paper's code does); constant")
    rho: float = Field(0.05, ge=0, allow_inf_nan=False, description="SAM and SAMPa: radius "
                      "of the perturbation")
    lam: float = Field(0.2, ge=0, le=1, description="SAMPa: weight of the "
                      "extrapolated gradient in the update, (1 - lam) g_p + lam g_e (0: plain "
                      "SAMPa)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd optimizer: momentum")
    weight_decay: float = Field(5e-4, ge=0, allow_inf_nan=False, description="L2 weight "
                                 "decay (decoupled with adamw)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the "
                                    "default cross-entropy loss")
    label_smoothing_mode: Literal["torch", "official"] = Field(
        "torch", description="torch: cross-entropy with label_smoothing=s (s/K on every "
        "class); official: the paper's code, 1-s on the true class and s/(K-1) on each other "
        "one, as KL divergence to that target")
    bn_stats: Literal["extrapolated", "perturbed"] = Field(
        "extrapolated", description="whose BatchNorm statistics evaluation and final.pt use: "
        "the trajectory worker's (SAMPa's extrapolated one; SGD's and SAM's only one), or the "
        "perturbed role's worker, whose perturbed passes then update its statistics (as the "
        "paper's code evaluates with its perturbed rank); without a perturbed role (SGD) the "
        "trajectory worker's")

    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="base optimizer of SGD, SAM and SAMPa: sgd (PyTorch SGD with "
        "momentum and weight decay) or adamw (torch.optim.AdamW: beta1, beta2, eps, decoupled "
        "weight decay; momentum is not used)")
    beta1: float = Field(0.9, ge=0, lt=1, description="adamw: first-moment decay")
    beta2: float = Field(0.999, ge=0, lt=1, description="adamw: second-moment decay")
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False, description="adamw: denominator term")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="forward and backward passes in fp32, or under bf16 autocast "
        "(parameters, gradients and the update stay fp32)")

    model: str = Field("cnn", description="a built-in model (resnet20, resnet56, wrn28_2, "
                       "wrn28_10, vgg19_bn, mlp, cnn, transformer) or a factory "
                       "package.module:function called as f(num_classes=..., **model_args) "
                       "that returns a torch.nn.Module")
    model_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments "
                                       "of the model factory")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability (Wide "
                            "ResNets: inside each block; other built-in models: before the "
                            "last layer)")
    dataset: str = Field("digits", description="a built-in dataset (digits, cifar10, cifar100, "
                         "synthetic, modadd) or a factory package.module:function called as "
                         "f(**dataset_args) that returns (train, test) map-style datasets")
    dataset_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments "
                                         "of the dataset factory")
    loss: str | None = Field(None, description="a loss package.module:function called as "
                             "f(model, batch) returning the loss or (loss, {'accuracy': a}) "
                             "(default: cross-entropy on (inputs, targets) batches, "
                             "model(**batch).loss on dict batches)")
    num_classes: int | None = Field(None, ge=1, description="outputs of the model (default: "
                                    "the dataset's num_classes attribute, else 1 + the "
                                    "largest training label)")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes of a "
                                "plug-in dataset (0: in the gradient worker itself)")
    pin_memory: bool = Field(False, description="DataLoader pin_memory of a plug-in dataset")
    data_dir: str | None = Field(None, description="folder of the extracted CIFAR python "
                                 "batches (needed for cifar10 and cifar100)")
    synthetic_size: int = Field(1024, ge=1, description="training samples of the synthetic "
                                "dataset")
    val_split: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False, description="fraction of "
                             "the training set held out for validation (0.1: the paper's 45k / "
                             "5k, the same images); each evaluation then also scores it, and "
                             "the test accuracy reported is the best validation epoch's")
    last_batch: Literal["drop", "keep"] = Field(
        "drop", description="the epoch's last, partial batch: dropped, or kept (smaller)")
    cutout_p: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="CIFAR "
                            "augmentation: probability that an image gets its 16x16 cutout")
    pad_fill: Literal["mean", "black"] = Field(
        "mean", description="CIFAR augmentation: the random crop's padding, 0 after "
        "normalisation (the mean colour) or black pixels before it")

    epochs: int = Field(8, ge=1, description="passes over the training set (unless steps "
                        "is given)")
    steps: int | None = Field(None, ge=1, description="total updates; overrides epochs")
    batch_size: int = Field(64, ge=1, description="samples per gradient (the global batch "
                            "of a role group)")
    seed: int = Field(0, ge=0, lt=2**31, description="seed of the initial model, the batch "
                      "order and the augmentation")
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and at the end)")

    backend: Literal["local", "ray"] = Field(
        "ray", description="ray: workers as Ray actors; local: both workers in this process, "
        "one after the other")
    transport: Literal["ray", "grpc"] = Field(
        "ray", description="ray backend: how points and gradients travel (Ray's object store, "
        "or gRPC streams to the coordinator)")
    data_path: Literal["auto", "points", "replicated", "collective"] = Field(
        "auto", description="ray backend: 'replicated' keeps the algorithm state beside the "
        "workers and moves one gradient per worker per round, worker to worker through Ray's "
        "object store; 'collective' does the same over torch.distributed (NCCL between GPUs, "
        "gloo otherwise; the object store where no group can be formed); 'points' sends "
        "points down and gradients up through the coordinator; auto: replicated on the ray "
        "transport, points on grpc")
    wire_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="ray backend: number format of the gradients workers send (bf16 "
        "halves the bytes; each gradient is rounded to bf16 where it is computed, so every "
        "replica and the coordinator apply the same values; points and state stay fp32)")
    workers_per_role: int = Field(1, ge=1, le=64, description="ray backend: gradient workers "
                                  "per role (2k in all): each role's gradient is computed by "
                                  "a group of k, each on 1/k of the batch, summed inside the "
                                  "group over torch.distributed")
    data_parallel: bool = Field(False, description="sgd and sam: all 2k workers compute the "
                                "one gradient together, each on 1/(2k) of the batch (the "
                                "data-parallel baseline on the same workers)")
    sync_bn: bool = Field(False, description="BatchNorm normalises with the statistics of the "
                          "whole batch across a role group (default: each worker's shard, as "
                          "DistributedDataParallel does)")
    collective_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend of --data-path collective (auto: NCCL "
        "when each worker has a GPU of its own, gloo otherwise)")
    control_host: str = Field("127.0.0.1", description="address of the coordinator's gRPC "
                              "server (control API; data plane with --transport grpc); any "
                              "other than loopback needs a token")
    control_port: int = Field(0, ge=0, le=65535, description="its port (0: any free port)")
    control_cert: str | None = Field(None, description="PEM certificate file: serve the gRPC "
                                     "API over TLS (workers trust this certificate)")
    control_key: str | None = Field(None, description="PEM private key file of --control-cert")
    token_file: str | None = Field(None, description="file holding the bearer token for the "
                                   "gRPC server (default: $SAMPA_RAY_TOKEN)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where workers compute (auto: cuda when a GPU is available)")
    threads: int | None = Field(None, ge=1, description="torch threads per worker "
                                  "(default: a node's CPUs shared among its workers; local: "
                                  "torch's own)")
    out: str | None = Field(None, description="run folder for result.json, final.pt, "
                            "curves.png and checkpoints (default: runs/<command>-<algo>-<time>)")
    max_nonfinite: int = Field(3, ge=1, description="abort after this many rounds in a row "
                               "with a non-finite loss or gradient")
    round_timeout: float | None = Field(None, gt=0, description="seconds a worker may take "
                                        "for one request before it is restarted (none: no "
                                        "deadline)")
    max_restarts: int = Field(3, ge=0, description="worker restarts (and retries of one "
                              "round) before the run gives up")
    link_latency_ms: float = Field(0.0, ge=0, allow_inf_nan=False, description="emulated "
                                   "latency added to every point/gradient message (benchmarks)")
    link_gbit_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="emulated "
                                      "bandwidth cap of that link in Gbit/s (benchmarks)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N updates (0: by "
                                  "time only, and at the end)")
    checkpoint_interval_s: float = Field(600.0, ge=0, allow_inf_nan=False, description="also "
                                         "checkpoint at the first update after this many "
                                         "seconds since the last checkpoint (0: off), so an "
                                         "interrupted run loses at most about that much")
    keep_checkpoints: int = Field(3, ge=1, description="how many checkpoints to keep")
    resume: str | None = Field(None, description="continue from the newest valid checkpoint "
                               "of this run folder")
    address: str | None = Field(None, description="Ray cluster address (default: $RAY_ADDRESS, "
                                "else an embedded local instance)")
    # metrics endpoint of the coordinator (Prometheus); binding beyond loopback is explicit
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port of the "
                              "coordinator (0: any free port)")
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint listens "
                              "on (0.0.0.0: every interface); any other than loopback needs a "
                              "token, which every scrape must then send as a bearer token")
    metrics_cert: str | None = Field(None, description="PEM certificate file: serve metrics "
                                     "over HTTPS (with --metrics-key)")
    metrics_key: str | None = Field(None, description="PEM private key file of --metrics-cert")

    @field_validator("algo")
    @classmethod
    def _known_algo(cls, v: str) -> str:
        from . import algorithms  # the registry (imports torch: only when a config is built)

        if v not in algorithms.names():
            raise ValueError(f"unknown algorithm {v!r} (known: {', '.join(algorithms.names())})")
        return v

    @field_validator("model", "dataset")
    @classmethod
    def _known_or_plugin(cls, v: str, info: Any) -> str:
        from .plugins import check_name  # names only: nothing is imported here

        return check_name(info.field_name, v)

    @field_validator("loss")
    @classmethod
    def _loss_plugin(cls, v: str | None) -> str | None:
        from .plugins import check_name

        return None if v is None else check_name("loss", v)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.dataset in ("cifar10", "cifar100") and not self.data_dir:
            raise ValueError("data_dir: required for dataset " + self.dataset)
        if self.transport == "grpc" and self.data_path in ("replicated", "collective"):
            raise ValueError(f"data_path: {self.data_path} moves gradients between workers, "
                             "not through the coordinator; with --transport grpc use points "
                             "(or auto)")
        if self.workers_per_role > 1 or self.data_parallel:  # role groups of several workers
            what = "data_parallel" if self.data_parallel else "workers_per_role"
            if self.backend == "local":
                raise ValueError(f"{what}: role groups of several workers need the ray backend")
            if self.transport == "grpc":
                raise ValueError(f"{what}: the gRPC data plane serves one worker per role; "
                                 "with role groups use --transport ray")
            size = self.workers_per_role * (2 if self.data_parallel else 1)
            if self.batch_size < size:
                raise ValueError(f"batch_size: {self.batch_size} cannot be shared by a group of "
                                 f"{size} workers (each needs at least one sample)")
        if self.data_parallel:
            from .algorithms import lookup

            if len(set(lookup(self.algo).slots.values())) > 1:
                raise ValueError(f"data_parallel: {self.algo}'s gradients already run on both "
                                 "role groups; data-parallel is for one-role algorithms "
                                 "(sgd, sam; compare runs them with --baseline ddp)")
        if bool(self.metrics_cert) != bool(self.metrics_key):
            missing = "metrics_key" if self.metrics_cert else "metrics_cert"
            raise ValueError(f"{missing}: HTTPS needs both metrics_cert and metrics_key")
        if bool(self.control_cert) != bool(self.control_key):
            missing = "control_key" if self.control_cert else "control_cert"
            raise ValueError(f"{missing}: TLS needs both control_cert and control_key")
        return self

    @property
    def resolved_data_path(self) -> str:
        if self.data_path != "auto":
            return self.data_path
        return "points" if self.transport == "grpc" else "replicated"

    def hash(self) -> str:
        """Hash of the fields that define the trajectory (not where outputs go or how it runs)."""
        keep = self.model_dump(exclude=RUNTIME_FIELDS)
        for name in LATER_FIELDS:  # at their defaults: the hash runs had before they existed
            if keep[name] == type(self).model_fields[name].get_default(call_default_factory=True):
                del keep[name]
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()
                              ).hexdigest()[:16]

    def lr_at(self, step: int, total: int, batches_per_epoch: int | None = None) -> float:
        """Learning rate of update ``step`` out of ``total``. ``cosine-epoch`` needs
        ``batches_per_epoch``: update ``step`` belongs to epoch ``step // batches_per_epoch``
        of ``ceil(total / batches_per_epoch)`` (``epochs`` unless ``steps`` is set), and the
        whole epoch uses that epoch's rate, as torch's CosineAnnealingLR(T_max=epochs) stepped
        once per epoch gives it."""
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "cosine-epoch":
            if not batches_per_epoch:
                raise ValueError("lr_schedule cosine-epoch: batches_per_epoch is required")
            epochs = -(-total // batches_per_epoch)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * (step // batches_per_epoch)
                                                   / epochs))
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def make_config(data: dict[str, Any]) -> TrainConfig:
    """Validate a mapping into a :class:`TrainConfig` or raise a one-line UserError."""
    try:
        return TrainConfig(**data)
    except ValidationError as err:
        raise UserError(f"config: {validation_line(err.errors())}") from None
    except TypeError as err:
        raise UserError(f"config: {err}") from None


class DuplicateKeyError(Exception):
    """A key given twice in one YAML mapping; the message names it and both lines."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML says keys are
    unique, yet PyYAML keeps the last one silently: ``lr: 0.1`` then ``lr: 0.2`` would train
    with 0.2 and no word). In the top mapping, ``batch-size`` and ``batch_size`` name the same
    field and count as one key. Merge keys (``<<: *base``) may still be overridden. A nested
    key is named by its path (``model_args.width``)."""

    _top: yaml.Node | None = None

    def get_single_node(self) -> yaml.Node | None:
        self._top = super().get_single_node()
        self._paths: dict[yaml.Node, str] = {}  # a nested mapping's node -> "parent.key."
        return self._top

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, tuple[str, int]] = {}
        prefix = self._paths.get(node, "")
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:  # the base class refuses it in its own words
                continue
            shown = f"{prefix}{key}"
            self._paths.setdefault(value_node, f"{shown}.")
            if node is self._top and isinstance(key, str):
                key = key.replace("-", "_")
            line = key_node.start_mark.line + 1
            if key in seen:
                first, at = seen[key]
                what = (f"key {shown!r} is given twice" if first == shown else
                        f"keys {first!r} and {shown!r} name the same field")
                raise DuplicateKeyError(f"{what} (lines {at} and {line})")
            seen[key] = (shown, line)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (dashes in keys are accepted as underscores); a
    key given twice is refused with both its lines."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config: no such file {p}")
    try:
        data = yaml.load(p.read_text(), Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKeyError as err:
        raise UserError(f"config: {p}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config: {p}{where} is not valid YAML") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"config: cannot read {p}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config: {p} must hold a mapping of fields, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
