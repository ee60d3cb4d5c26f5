"""The gradient engine: a model replica and the training data; the gradient of the loss at a
point on a batch. It knows nothing of the algorithm that asks. Local runs call it directly; each
Ray gradient worker wraps one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from .errors import UserError
from .flat import FlatParams, flat_buffers, load_buffers
from .micro import check_last_batch, group_size, split_batch
from .scaler import inverse
from .shards import ALONE, BucketReducer, GroupComm
from .task import BuiltinData, Task, batch_size_of, make_model, seed_torch, to_device, training_loss

__all__ = ["EvalResult", "GradResult", "GradientEngine", "Snapshot", "build_replica",
           "resolve_device", "training_loss"]


@dataclass
class GradResult:
    """A gradient and what it cost. ``grad`` may be a buffer the engine reuses: consume or copy it
    before asking the same engine for the next gradient."""

    grad: torch.Tensor
    loss: float
    accuracy: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds: compute, copy_in, copy_out
    start: float = 0.0  # wall-clock start and end of the compute (time.time())
    end: float = 0.0
    # set where the gradient stays with the worker (``grad`` is then empty): facts about it
    finite: bool | None = None
    norm: float | None = None
    nbytes: int | None = None
    # bytes this worker summed with its role group (0: it computed the gradient alone)
    reduced_bytes: int = 0


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    seconds: float
    # on the held-out validation images, where the run keeps some (``val_split``)
    val_loss: float | None = None
    val_accuracy: float | None = None


@dataclass
class Snapshot:
    """The parameters and model buffers of the evaluation with the best validation accuracy so
    far, at update ``step`` (what ``best.pt`` holds)."""

    step: int
    val_accuracy: float
    x: torch.Tensor
    buffers: dict[str, torch.Tensor]


#: autocast's dtype for each ``precision`` that uses one
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda requested but no GPU is visible")
    return torch.device(name)


def build_replica(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The run's model, initialised from its seed (every replica in every process is
    identical): :func:`sampa_ray.task.make_model`."""
    return make_model(cfg, num_classes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GradientEngine:
    """One model replica, the dataset and the batch schedule on one device."""

    def __init__(self, cfg: TrainConfig, device: str | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(device or cfg.device)
        self.task = Task(cfg)
        self.schedule = self.task.schedule
        check_last_batch(self.schedule, cfg.accumulate, group_size(cfg))
        # the built-in in-memory dataset (its tensors and augmentation), or the plug-in's data
        data = self.task.data
        self.data = data.data if isinstance(data, BuiltinData) else data
        self.aug = data.aug if isinstance(data, BuiltinData) else None
        #: the autocast dtype of forward passes (``precision``); None: fp32
        self.amp_dtype = AMP_DTYPES.get(cfg.precision)
        self.comm: GroupComm = ALONE  # this worker's place in its role group (see join_group)
        self.sync_bn = False
        self._reducer: BucketReducer | None = None
        self.reset()
        self.set_wire(cfg.wire_dtype)
        self._eval_model: nn.Module | None = None
        self._eval_flat: FlatParams | None = None
        self._eval_pool: ThreadPoolExecutor | None = None
        self._evals: list[tuple[int, Future[EvalResult]]] = []
        self._eval_lock = threading.Lock()

    def reset(self) -> None:
        """A fresh replica at the run's initial parameters and BatchNorm statistics."""
        self.model = self.task.build_model().to(self.device)
        self.flat = FlatParams(self.model)
        self._bns = [m for m in self.model.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._best: Snapshot | None = None  # see start_eval
        self._in_group()

    def join_group(self, comm: GroupComm, sync_bn: bool = False) -> None:
        """Compute shard ``comm.rank`` of ``comm.size`` of every batch and sum the gradient over
        the group (:mod:`sampa_ray.shards`); with ``sync_bn`` BatchNorm normalises with the
        whole batch's statistics. ``ALONE``: the whole batch, by itself."""
        self.comm, self.sync_bn = comm, sync_bn and comm.size > 1
        self.task.data.set_shard(comm.rank, comm.size)
        self._in_group()

    def _in_group(self) -> None:
        """Fit the replica to the group: bucket hooks, and synchronised BatchNorm."""
        from .groupbn import convert_batchnorm, set_group

        if self._reducer is not None:
            self._reducer.close()
            self._reducer = None
        if self.comm.size > 1:
            self._reducer = BucketReducer(self.flat, self.comm)
        if self._bns and (self.sync_bn or any(getattr(m, "group", None) for m in self._bns)):
            self._bns = convert_batchnorm(self.model)
            set_group(self._bns, self.comm.group if self.sync_bn else None)

    def set_wire(self, wire_dtype: str) -> None:
        """The gradients' number format on the wire (``fp32`` or ``bf16``): a bf16 gradient is
        rounded here, once, on the device, and copied to the host at half the size."""
        self.wire = torch.bfloat16 if wire_dtype == "bf16" else torch.float32
        self._wire_grad = (torch.empty(self.flat.numel, dtype=self.wire, device=self.device)
                           if self.wire != torch.float32 else None)
        self._host_grad = (torch.empty(self.flat.numel, dtype=self.wire, pin_memory=True)
                           if self.device.type == "cuda" else None)

    # -- facts the coordinator needs ----------------------------------------------------------
    def info(self) -> dict[str, Any]:
        data = self.task.data
        return {"num_params": self.flat.numel, "num_train": data.num_train,
                "num_test": data.num_test, "num_classes": self.task.num_classes,
                "num_val": data.num_val,
                "batches_per_epoch": self.schedule.batches_per_epoch,
                "device": str(self.device), "threads": torch.get_num_threads(),
                "dataset": self.cfg.dataset, "data_fingerprint": data.fingerprint,
                "label_noise": getattr(data, "label_noise", None)}

    def initial_point(self) -> torch.Tensor:
        """x0: the replica's initial parameters as a flat CPU fp32 vector."""
        return self.flat.data.detach().to("cpu", torch.float32, copy=True)

    # -- the work -----------------------------------------------------------------------------
    @contextmanager
    def _frozen_stats(self, track: bool):
        """BatchNorm still normalises with batch statistics, but only passes on the trajectory
        update the running statistics (momentum 0 leaves them exactly as they were)."""
        if track or not self._bns:
            yield
            return
        saved = [(m.momentum, None if m.num_batches_tracked is None else
                  m.num_batches_tracked.clone()) for m in self._bns]
        for m in self._bns:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, (mom, nbt) in zip(self._bns, saved, strict=True):
                m.momentum = mom
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)

    def gradient(self, point: torch.Tensor, batch: int, track_stats: bool = True,
                 to_host: bool = True, loss_scale: float | None = None) -> GradResult:
        """Gradient of the (label-smoothed) cross-entropy on training batch ``batch`` at ``point``.
        Returns a CPU tensor for CPU points; on a GPU engine the result lives in a pinned buffer.
        With a bf16 wire the result is bf16 and the engine's own fp32 gradient
        (``flat.grad``) is rounded to the same values, so whoever keeps it agrees with whoever
        receives it. ``to_host=False``: a GPU engine's result stays on the device (in a buffer
        it reuses). ``loss_scale`` S (``precision: fp16``, :mod:`sampa_ray.scaler`): the
        backward pass runs on S times the loss, and the gradient is unscaled (times 1/S, as
        torch.amp.GradScaler does) after any group sum and before the wire's rounding, so what
        leaves here is the true-scale gradient (non-finite where the scaled pass overflowed)."""
        dev = self.device
        t0 = time.perf_counter()
        self.flat.load_(point)
        with self._user_code(f"batch {batch}"):
            data = to_device(self.task.data.train_batch(batch), dev)
        _sync(dev)
        t1 = time.perf_counter()
        start = time.time()
        comm, reducer = self.comm, self._reducer
        # dropout, per batch (and per shard: shards are different samples)
        seed_torch((self.cfg.seed * 1_000_003 + batch + 7_919 * comm.rank) % (2**63), dev)
        self.model.train()
        self.flat.zero_grad_()
        with self._frozen_stats(track_stats):
            n, loss, accuracy = self._backward(data, batch, reducer, loss_scale)
        _sync(dev)
        t2 = time.perf_counter()
        end = time.time()
        compute = t2 - t1
        timings: dict[str, float] = {}
        reduced = 0
        if reducer is not None:  # what backward did not hide of the group's sum
            timings["allreduce"], reduced = reducer.finish()
            loss, accuracy = self._group_mean(n, batch, loss, accuracy)
            t2 = time.perf_counter()  # the copies below start here
        if loss_scale is not None:
            self.flat.grad.mul_(inverse(loss_scale))
        grad = self.flat.grad
        if self._wire_grad is not None:
            grad = self._wire_grad.copy_(grad)  # round to nearest even, on the device
            self.flat.grad.copy_(grad)
        if self._host_grad is not None and to_host:
            grad = self._host_grad.copy_(grad, non_blocking=True)
            torch.cuda.current_stream(dev).synchronize()
        t3 = time.perf_counter()
        return GradResult(grad=grad, loss=loss, accuracy=accuracy,
                          timings={"compute": compute, "copy_in": t1 - t0,
                                   "copy_out": t3 - t2, **timings},
                          start=start, end=end, reduced_bytes=reduced)

    def _backward(self, data: Any, batch: int, reducer: BucketReducer | None,
                  loss_scale: float | None = None) -> tuple[int, float, float]:
        """Forward and backward of ``data`` (the batch, or this worker's shard of it) into
        ``flat.grad``, in ``accumulate`` micro-batches one after another
        (:mod:`sampa_ray.micro`), each mean loss weighted by its share of the batch; a role
        group's all-reduce runs during the last one's backward, when the buffer holds the
        shard's whole gradient, so once per gradient. With ``loss_scale`` each backward runs on
        the (weighted) loss times it. Returns the samples in ``data``, their mean loss and
        their accuracy."""
        parts = split_batch(data, self.cfg.accumulate)
        whole = self.schedule.size_of(batch) if reducer is not None else batch_size_of(data)
        outs = []
        for i, part in enumerate(parts):
            with self._precision(), self._user_code(f"batch {batch}"):
                out = self.task.loss(self.model, part)
            if reducer is not None and i == len(parts) - 1:
                reducer.begin()
            if reducer is None and len(parts) == 1:
                part_loss = out.loss  # the whole batch's mean loss, as it is
            else:  # this part's share of the whole batch's mean loss (summed over the group)
                part_loss = out.loss * (out.n / whole)
            (part_loss if loss_scale is None else part_loss * loss_scale).backward()
            out.loss = out.loss.detach()
            outs.append(out)
        if len(outs) == 1:
            return outs[0].n, float(outs[0].loss), outs[0].accuracy()
        n = sum(o.n for o in outs)
        loss = float(sum(o.loss.double() * o.n for o in outs)) / n
        return n, loss, sum(o.hits() for o in outs) / n

    def _group_mean(self, n: int, batch: int, loss: float, accuracy: float
                    ) -> tuple[float, float]:
        """The whole batch's loss and accuracy from the shards' (weighted by their sizes)."""
        w = n / self.schedule.size_of(batch)
        t = torch.tensor([loss * w, accuracy * w], dtype=torch.float64, device=self.comm.device)
        self.comm.all_reduce_(t)
        return float(t[0]), float(t[1])

    def evaluate(self, point: torch.Tensor, split: str = "test") -> EvalResult:
        """Loss and accuracy at ``point``, with this replica's BatchNorm statistics."""
        self.flat.load_(point)
        return self._evaluate(self.model, split)

    def start_eval(self, step: int, point: torch.Tensor) -> None:
        """Snapshot ``point`` and the current BatchNorm statistics into a second replica and
        evaluate it on the test split (and the validation split, where there is one) in a
        background thread, overlapping the next rounds. An evaluation whose validation accuracy
        beats every earlier one's keeps a copy of its parameters and buffers (:meth:`best`):
        the run's model selection, made where the numbers already are."""
        if self._eval_model is None:
            self._eval_model = self.task.build_model().to(self.device)
            self._eval_flat = FlatParams(self._eval_model)
            self._eval_pool = ThreadPoolExecutor(1, thread_name_prefix="eval")
        assert self._eval_flat is not None and self._eval_pool is not None
        # the previous evaluation must be done before the replica is overwritten
        for _, fut in self._evals:
            fut.result()
        self._eval_flat.load_(point)
        load_buffers(self._eval_model, flat_buffers(self.model))
        fut = self._eval_pool.submit(self._evaluate_and_select, step)
        with self._eval_lock:
            self._evals.append((step, fut))

    def _evaluate_and_select(self, step: int) -> EvalResult:
        model, flat = self._eval_model, self._eval_flat
        assert model is not None and flat is not None
        ev = self._evaluate(model, "test")
        if not self.task.data.num_val:
            return ev
        val = self._evaluate(model, "val")
        ev.val_loss, ev.val_accuracy = val.loss, val.accuracy
        ev.seconds += val.seconds
        best = self._best
        if best is None or val.accuracy > best.val_accuracy:  # the first of equals stays
            self._best = Snapshot(step, val.accuracy,  # on the host: no device memory
                                  flat.data.detach().to("cpu", torch.float32, copy=True),
                                  flat_buffers(model))
        return ev

    def best(self) -> Snapshot | None:
        """The best validation evaluation's parameters and buffers so far (after every
        evaluation started has finished: see :meth:`finished_evals`); None without a
        validation split, or when this replica has evaluated nothing since it was (re)built."""
        return self._best

    def finished_evals(self, wait: bool = False) -> list[tuple[int, EvalResult]]:
        """Evaluations that have finished since the last call (all of them when ``wait``)."""
        with self._eval_lock:
            done = [(s, f) for s, f in self._evals if wait or f.done()]
            self._evals = [(s, f) for s, f in self._evals if (s, f) not in done]
        return [(s, f.result()) for s, f in done]

    @contextmanager
    def _user_code(self, where: str) -> Iterator[None]:
        """The user's data, model and loss run inside: what they raise becomes one line naming
        ``where`` (a :class:`UserError`: the run ends with exit 2, not a worker's traceback).
        A process group's own failure inside (a lost peer during a synchronised BatchNorm)
        stays what it is, for the fault handling to see."""
        try:
            yield
        except dist.DistError:
            raise
        except Exception as err:
            raise self.task.failed(err, where) from None

    def _precision(self) -> Any:
        """bf16 or fp16 autocast around forward passes (``precision``); fp32 otherwise."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def _evaluate(self, model: nn.Module, split: str) -> EvalResult:
        t0 = time.perf_counter()
        model.eval()
        total_loss = torch.zeros((), device=self.device)
        correct, n = 0.0, 0
        with self._user_code(f"the {split} split"):
            for batch in self.task.data.eval_batches(split):
                with self._precision():
                    out = self.task.loss(model, to_device(batch, self.device), train=False)
                total_loss += out.total().float()
                correct += out.hits()
                n += out.n
        return EvalResult(loss=float(total_loss) / n, accuracy=correct / n,
                          seconds=time.perf_counter() - t0)

    def buffers(self) -> dict[str, torch.Tensor]:
        return flat_buffers(self.model)

    def load_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        load_buffers(self.model, buffers)
