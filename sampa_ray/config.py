"""Run configuration: one validated pydantic model, loaded from YAML and/or CLI flags.

Every bad value becomes a :class:`~sampa_ray.errors.UserError` with one line naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from . import datapaths
from .errors import UserError, validation_line
from .plugins import ALIASES, BUILTIN_DATASETS, BUILTIN_MODELS
from .settings import fields_where, lift_args, lr_at, setting, trajectory_hash


class TrainConfig(BaseModel):
    """Everything that defines a run. Defaults: SAMPa-0.2 on the bundled digits data."""

    # strict: no silent coercion (true is not 1.0, "3" is not 3)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    algo: str = setting(
        "algorithm", "sampa",
        description="algorithm: sgd, sam, sampa or any registered with "
                    "sampa_ray.algorithms.register")
    lr: float = setting(
        "algorithm", 0.05, gt=0, allow_inf_nan=False,
        description="base learning rate (the peak of a cosine schedule)")
    lr_schedule: Literal["constant", "cosine", "cosine-epoch"] = setting(
        "algorithm", "cosine",
        description="cosine: annealed every update; cosine-epoch: annealed once per epoch over the"
                    " run's epochs (torch's CosineAnnealingLR(T_max=epochs) stepped after each "
                    "epoch, as the paper's code does); constant")
    rho: float = setting(
        "algorithm", 0.05, ge=0, allow_inf_nan=False,
        description="SAM and SAMPa: radius of the perturbation")
    lam: float = setting(
        "algorithm", 0.2, ge=0, le=1,
        description="SAMPa: weight of the extrapolated gradient in the update, (1 - lam) g_p + lam"
                    " g_e (0: plain SAMPa)")
    algo_args: dict[str, Any] = setting(
        "algorithm", default_factory=dict, later=True, flag=False,
        description="the algorithm's own hyperparameters (--algo-arg KEY=VALUE), validated by its "
                    "Params model; rho and lam may be given here or as their own fields")
    momentum: float = setting(
        "optimizer", 0.9, ge=0, lt=1,
        description="sgd optimizer: momentum")
    weight_decay: float = setting(
        "optimizer", 0.0005, ge=0, allow_inf_nan=False,
        description="L2 weight decay (decoupled with adamw)")
    label_smoothing: float = setting(
        "loss", 0.0, worker=True, ge=0, lt=1,
        description="label smoothing of the default cross-entropy loss")
    label_smoothing_mode: Literal["torch", "official"] = setting(
        "loss", "torch", worker=True, later=True,
        description="torch: cross-entropy with label_smoothing=s (s/K on every class); official: "
                    "the paper's code, 1-s on the true class and s/(K-1) on each other one, as KL "
                    "divergence to that target")
    bn_stats: Literal["extrapolated", "perturbed"] = setting(
        "model", "extrapolated", later=True,
        description="whose BatchNorm statistics evaluation and final.pt use: the trajectory "
                    "worker's (SAMPa's extrapolated one; SGD's and SAM's only one), or the "
                    "perturbed role's worker, whose perturbed passes then update its statistics "
                    "(as the paper's code evaluates with its perturbed rank); without a perturbed "
                    "role (SGD) the trajectory worker's")

    optimizer: Literal["sgd", "adamw"] = setting(
        "optimizer", "sgd", later=True,
        description="base optimizer of SGD, SAM and SAMPa: sgd (PyTorch SGD with momentum and "
                    "weight decay) or adamw (torch.optim.AdamW: beta1, beta2, eps, decoupled "
                    "weight decay; momentum is not used)")
    beta1: float = setting(
        "optimizer", 0.9, later=True, ge=0, lt=1,
        description="adamw: first-moment decay")
    beta2: float = setting(
        "optimizer", 0.999, later=True, ge=0, lt=1,
        description="adamw: second-moment decay")
    eps: float = setting(
        "optimizer", 1e-08, later=True, gt=0, allow_inf_nan=False,
        description="adamw: denominator term")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "model", "fp32", worker=True, later=True,
        description="forward and backward passes in fp32, or under bf16 or fp16 autocast")
    fp16_init_scale: float = setting(
        "model", 2.0 ** 16, later=True, gt=0, allow_inf_nan=False,
        description="fp16: the loss scale a run starts with (halved after each overflow)")
    fp16_growth_interval: int = setting(
        "model", 2000, later=True, ge=1,
        description="fp16: applied rounds in a row after which the loss scale doubles")

    model: str = setting(
        "model", "cnn", worker=True,
        description=f"a built-in model ({', '.join((*BUILTIN_MODELS, *ALIASES['model']))}) "
                    "or a factory package.module:function called as "
                    "f(num_classes=..., **model_args) that returns a torch.nn.Module")
    model_args: dict[str, Any] = setting(
        "model", worker=True, later=True, default_factory=dict,
        description="keyword arguments of the model factory")
    dropout: float = setting(
        "model", 0.0, worker=True, ge=0, lt=1,
        description="dropout probability (Wide ResNets: inside each block; other built-in models: "
                    "before the last layer)")
    dataset: str = setting(
        "data", "digits", worker=True,
        description=f"a built-in dataset ({', '.join((*BUILTIN_DATASETS, *ALIASES['dataset']))})"
                    " or a factory package.module:function called as f(**dataset_args) that "
                    "returns (train, test) map-style datasets")
    dataset_args: dict[str, Any] = setting(
        "data", worker=True, later=True, default_factory=dict,
        description="keyword arguments of the dataset factory")
    loss: str | None = setting(
        "loss", None, worker=True, later=True,
        description="a loss package.module:function called as f(model, batch) returning the loss "
                    "or (loss, {'accuracy': a}) (default: cross-entropy on (inputs, targets) "
                    "batches, model(**batch).loss on dict batches)")
    num_classes: int | None = setting(
        "model", None, worker=True, later=True, ge=1,
        description="outputs of the model (default: the dataset's num_classes attribute, else 1 + "
                    "the largest training label)")
    loader_workers: int = setting(
        "data", 0, runtime=True, worker=True, ge=0,
        description="DataLoader worker processes of a plug-in dataset (0: in the gradient worker "
                    "itself)")
    pin_memory: bool = setting(
        "data", False, runtime=True, worker=True,
        description="DataLoader pin_memory of a plug-in dataset")
    data_dir: str | None = setting(
        "data", None, worker=True,
        description="folder of the extracted CIFAR python batches (needed for cifar10 and "
                    "cifar100)")
    synthetic_size: int = setting(
        "data", 1024, worker=True, ge=1,
        description="training samples of the synthetic dataset")
    val_split: float = setting(
        "data", 0.0, worker=True, later=True, ge=0, lt=1, allow_inf_nan=False,
        description="fraction of the training set held out for validation (0.1: the paper's 45k / "
                    "5k, the same images); each evaluation then also scores it, and the test "
                    "accuracy reported is the best validation epoch's")
    label_noise: float = setting(
        "data", 0.0, worker=True, later=True, ge=0, lt=1, allow_inf_nan=False,
        description="symmetric label noise: each training label, with this probability, "
                    "replaced by a uniformly drawn other class, drawn from the seed (the same "
                    "labels in every process; result.json lists them); test labels stay clean")
    last_batch: Literal["drop", "keep"] = setting(
        "data", "drop", worker=True, later=True,
        description="the epoch's last, partial batch: dropped, or kept (smaller)")
    cutout_p: float = setting(
        "data", 1.0, worker=True, later=True, ge=0, le=1, allow_inf_nan=False,
        description="CIFAR augmentation: probability that an image gets its 16x16 cutout")
    pad_fill: Literal["mean", "black"] = setting(
        "data", "mean", worker=True, later=True,
        description="CIFAR augmentation: the random crop's padding, 0 after normalisation (the "
                    "mean colour) or black pixels before it")

    epochs: int = setting(
        "schedule", 8, ge=1,
        description="passes over the training set (unless steps is given)")
    steps: int | None = setting(
        "schedule", None, ge=1,
        description="total updates; overrides epochs")
    batch_size: int = setting(
        "schedule", 64, worker=True, ge=1,
        description="samples per gradient (the global batch of a role group)")
    accumulate: int = setting(
        "schedule", 1, worker=True, later=True, ge=1,
        description="gradient accumulation: each worker's batch (or shard) in this many "
                    "micro-batches, one after another; the same gradient, one micro-batch's memory")
    seed: int = setting(
        "schedule", 0, worker=True, ge=0, lt=2 ** 31,
        description="seed of the initial model, the batch order and the augmentation")
    eval_every: int = setting(
        "schedule", 1, runtime=True, ge=1,
        description="evaluate every N epochs (and at the end)")

    backend: Literal["local", "ray"] = setting(
        "placement", "ray", runtime=True,
        description="ray: workers as Ray actors; local: both workers in this process, one after "
                    "the other")
    transport: str = setting(
        "placement", "ray", runtime=True, choices=datapaths.transports,
        description="ray backend: how points and gradients travel (Ray's object store, or gRPC "
                    "streams to the coordinator)")
    data_path: str = setting(
        "placement", "auto", runtime=True, choices=lambda: ("auto", *datapaths.names()),
        description="ray backend: 'free' (auto on the ray transport) lets the workers run chunks "
                    "of rounds themselves; 'replicated' keeps the algorithm state beside the "
                    "workers, gradients moving worker to worker through Ray's object store; "
                    "'collective' does that over torch.distributed; 'points' sends points down "
                    "and gradients up through the coordinator (auto on grpc)")
    wire_dtype: Literal["fp32", "bf16"] = setting(
        "placement", "fp32",
        description="ray backend: number format of the gradients workers send (bf16 halves the "
                    "bytes; each gradient is rounded to bf16 where it is computed, so every "
                    "replica and the coordinator apply the same values; points and state stay "
                    "fp32)")
    workers_per_role: int = setting(
        "placement", 1, worker=True, later=True, ge=1, le=64,
        description="ray backend: gradient workers per role (2k in all): each role's gradient is "
                    "computed by a group of k, each on 1/k of the batch, summed inside the group "
                    "over torch.distributed")
    data_parallel: bool = setting(
        "placement", False, later=True,
        description="sgd and sam: all 2k workers compute the one gradient together, each on 1/(2k)"
                    " of the batch (the data-parallel baseline on the same workers)")
    sync_bn: bool = setting(
        "placement", False, later=True,
        description="BatchNorm normalises with the statistics of the whole batch across a role "
                    "group (default: each worker's shard, as DistributedDataParallel does)")
    collective_backend: Literal["auto", "nccl", "gloo"] = setting(
        "placement", "auto", runtime=True,
        description="torch.distributed backend of --data-path collective (auto: NCCL when each "
                    "worker has a GPU of its own, gloo otherwise)")
    control_host: str = setting(
        "services", "127.0.0.1", runtime=True,
        description="address of the coordinator's gRPC server (control API; data plane with "
                    "--transport grpc); any other than loopback needs a token")
    control_port: int = setting(
        "services", 0, runtime=True, ge=0, le=65535,
        description="its port (0: any free port)")
    control_cert: str | None = setting(
        "services", None, runtime=True,
        description="PEM certificate file: serve the gRPC API over TLS (workers trust this "
                    "certificate)")
    control_key: str | None = setting(
        "services", None, runtime=True,
        description="PEM private key file of --control-cert")
    token_file: str | None = setting(
        "services", None, runtime=True,
        description="file holding the bearer token for the gRPC server (default: $SAMPA_RAY_TOKEN)")
    device: Literal["auto", "cpu", "cuda"] = setting(
        "placement", "auto", runtime=True, worker=True,
        description="where workers compute (auto: cuda when a GPU is available)")
    threads: int | None = setting(
        "placement", None, runtime=True, ge=1,
        description="torch threads per worker (default: a node's CPUs shared among its workers; "
                    "local: torch's own)")
    out: str | None = setting(
        "outputs", None, runtime=True,
        description="run folder for result.json, final.pt, curves.png and checkpoints (default: "
                    "runs/<command>-<algo>-<time>)")
    max_nonfinite: int = setting(
        "faults", 3, runtime=True, ge=1,
        description="abort after this many rounds in a row with a non-finite loss or gradient")
    round_timeout: float | None = setting(
        "faults", None, runtime=True, gt=0,
        description="seconds a worker may take for one request before it is restarted (none: no "
                    "deadline)")
    max_restarts: int = setting(
        "faults", 3, runtime=True, ge=0,
        description="worker restarts (and retries of one round) before the run gives up")
    on_node_loss: Literal["wait", "pack"] = setting(
        "faults", "wait", runtime=True,
        description="a Ray node lost with workers on it, and no node in its place within "
                    "--node-loss-wait-s: wait stops the run with one line naming the node, the "
                    "worker and the --resume command that continues it (exit 1); pack goes on "
                    "from the newest checkpoint on the nodes left, where they can hold every "
                    "worker (the same trajectory)")
    node_loss_wait_s: float = setting(
        "faults", 60.0, runtime=True, ge=0, allow_inf_nan=False,
        description="seconds to wait, once Ray marks a worker's node dead, for a node that can "
                    "take its place (its workers then restart there and the run goes on)")
    link_latency_ms: float = setting(
        "faults", 0.0, runtime=True, ge=0, allow_inf_nan=False,
        description="emulated latency added to every point/gradient message (benchmarks)")
    link_gbit_s: float | None = setting(
        "faults", None, runtime=True, gt=0, allow_inf_nan=False,
        description="emulated bandwidth cap of that link in Gbit/s (benchmarks)")
    checkpoint_every: int = setting(
        "outputs", 0, runtime=True, ge=0,
        description="checkpoint every N updates (0: by time only, and at the end)")
    checkpoint_interval_s: float = setting(
        "outputs", 600.0, runtime=True, ge=0, allow_inf_nan=False,
        description="also checkpoint at the first update after this many seconds since the last "
                    "checkpoint (0: off), so an interrupted run loses at most about that much")
    keep_checkpoints: int = setting(
        "outputs", 3, runtime=True, ge=1,
        description="how many checkpoints to keep")
    resume: str | None = setting(
        "outputs", None, runtime=True,
        description="continue from the newest valid checkpoint of this run folder")
    address: str | None = setting(
        "placement", None, runtime=True,
        description="Ray cluster address (default: $RAY_ADDRESS, else an embedded local instance)")
    # metrics endpoint of the coordinator (Prometheus); binding beyond loopback is explicit
    metrics_port: int = setting(
        "services", 0, runtime=True, ge=0, le=65535,
        description="Prometheus metrics port of the coordinator (0: any free port)")
    metrics_host: str = setting(
        "services", "127.0.0.1", runtime=True,
        description="address the metrics endpoint listens on (0.0.0.0: every interface); any other"
                    " than loopback needs a token, which every scrape must then send as a bearer "
                    "token")
    metrics_cert: str | None = setting(
        "services", None, runtime=True,
        description="PEM certificate file: serve metrics over HTTPS (with --metrics-key)")
    metrics_key: str | None = setting(
        "services", None, runtime=True,
        description="PEM private key file of --metrics-cert")

    @model_validator(mode="before")
    @classmethod
    def _algo_args_as_fields(cls, data: Any) -> Any:
        """An algorithm parameter that is also a field of its own (``rho``, ``lam``) is kept
        there, whichever way it was given: the same run has one config and one hash."""
        return lift_args(cls, data, "algo_args")

    @field_validator("algo")
    @classmethod
    def _known_algo(cls, v: str) -> str:
        from . import algorithms  # the registry (imports torch: only when a config is built)
        from .plugins import check_name, resolve

        return algorithms.known(v, lambda path: resolve("algo", check_name("algo", path)))

    @field_validator("model", "dataset", "loss")
    @classmethod
    def _known_or_plugin(cls, v: str | None, info: Any) -> str | None:
        from .plugins import check_name  # names only: nothing is imported here

        return None if v is None else check_name(info.field_name, v)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.dataset in ("cifar10", "cifar100") and not self.data_dir:
            raise ValueError("data_dir: required for dataset " + self.dataset)
        grouped = self.workers_per_role > 1 or self.data_parallel  # groups of several workers
        what = "data_parallel" if self.data_parallel else "workers_per_role"
        datapaths.check(self.data_path, self.transport, what if grouped else None)
        size = self.workers_per_role * (2 if self.data_parallel else 1)  # workers per gradient
        if grouped:
            if self.backend == "local":
                raise ValueError(f"{what}: role groups of several workers need the ray backend")
            if self.batch_size < size:
                raise ValueError(f"batch_size: {self.batch_size} cannot be shared by a group of "
                                 f"{size} workers (each needs at least one sample)")
        if self.accumulate > 1 and self.batch_size % (size * self.accumulate):
            on = f" on each of {size} workers" if size > 1 else ""
            raise ValueError(f"accumulate: batch_size {self.batch_size} does not split into "
                             f"{self.accumulate} equal micro-batches{on} (use a multiple of "
                             f"{size * self.accumulate})")
        if self.data_parallel:
            from .algorithms import lookup

            if len(set(lookup(self.algo).slots.values())) > 1:
                raise ValueError(f"data_parallel: {self.algo}'s gradients already run on both "
                                 "role groups; data-parallel is for one-role algorithms "
                                 "(sgd, sam; compare runs them with --baseline ddp)")
        params = self.algo_params()  # algo_args as validated (4 and 4.0: one value, one hash)
        self.__dict__["algo_args"] = {k: params[k] for k in self.algo_args}
        for what, cert, key in (("HTTPS", "metrics_cert", "metrics_key"),
                                ("TLS", "control_cert", "control_key")):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                missing = key if getattr(self, cert) else cert
                raise ValueError(f"{missing}: {what} needs both {cert} and {key}")
        if not 2.0 ** -24 <= self.fp16_init_scale <= 3.4028234663852886e38:  # a float32 number
            raise ValueError(f"fp16_init_scale: {self.fp16_init_scale!r} is outside [2**-24, "
                             "3.4e38] (the scale where an fp16 run stops; float32's largest)")
        return self

    def algo_params(self) -> dict[str, Any]:
        """The algorithm's own hyperparameters: its ``Params`` model filled from the fields of
        the same name (``rho``, ``lam``) and ``algo_args``; a bad or unknown one is a
        ValueError naming ``algo_args.<name>``."""
        from .algorithms import params_of

        return params_of(self.algo, self.algo_args, self.model_dump())

    @property
    def resolved_data_path(self) -> str:  # the data path ``auto`` stands for here
        return datapaths.check(self.data_path, self.transport).name

    def hash(self) -> str:
        """Hash of the fields that define the trajectory (not where outputs go or how it runs)."""
        return trajectory_hash(self)

    def lr_at(self, step: int, total: int, batches_per_epoch: int | None = None) -> float:
        """Learning rate of update ``step`` out of ``total`` (:func:`settings.lr_at`)."""
        return lr_at(self.lr_schedule, self.lr, step, total, batches_per_epoch)


#: the fields that say how and where a run executes, not which trajectory it follows
RUNTIME_FIELDS: frozenset[str] = frozenset(fields_where(TrainConfig, "runtime"))
#: trajectory fields added after runs were first hashed (left out of the hash at their defaults)
LATER_FIELDS: tuple[str, ...] = fields_where(TrainConfig, "later")
#: the fields the workers' replicas and data depend on; runs on the same workers share them
WORKER_FIELDS: tuple[str, ...] = fields_where(TrainConfig, "worker")


def make_config(data: dict[str, Any]) -> TrainConfig:
    """Validate a mapping into a :class:`TrainConfig` or raise a one-line UserError."""
    try:
        return TrainConfig(**data)
    except ValidationError as err:
        raise UserError(f"config: {validation_line(err.errors())}") from None
    except TypeError as err:
        raise UserError(f"config: {err}") from None
