"""What a gradient engine trains: a model factory, the data (batch ``k`` a pure function of
``(seed, k)``) and a loss. The built-in image models and in-memory datasets, and the user's
plug-ins (``--model pkg.mod:build``, ``--dataset pkg.mod:load``, ``--loss pkg.mod:fn``), meet
behind this one interface, so the engine, the algorithms and every backend treat them alike.

Contracts of the plug-ins (README, "Your model, your data"):

- model factory ``build(num_classes=..., **model_args) -> nn.Module``, called after
  ``torch.manual_seed(seed)`` in every process, so every replica is identical;
- dataset factory ``load(**dataset_args) -> (train, test)``: map-style datasets (or tuples of
  tensors); batch ``k`` is ``default_collate`` of the items the schedule names, fetched by a
  ``DataLoader``. Before item ``i`` at position ``p`` of batch ``k`` is read, torch's, numpy's
  and Python's global RNGs are seeded from ``(seed, k, p)``: random transforms inside the
  dataset give the same batch ``k`` in every process;
- loss ``fn(model, batch) -> loss`` or ``(loss, {"accuracy": a})``; the default is
  cross-entropy on ``(inputs, targets)`` batches and ``model(**batch).loss`` on dict batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import plugins
from .config import TrainConfig
from .data.batches import seed_torch
from .data.sources import BuiltinData, LoaderData
from .errors import UserError
from .models import build_model, input_shape_for


@dataclass
class LossOut:
    """A batch's loss (a scalar tensor: the mean, or the sum where ``summed``), its accuracy
    (as a count of correct samples, or as given by the loss; None when it gives none) and its
    size."""

    loss: torch.Tensor
    n: int
    correct: torch.Tensor | None = None
    given: float | torch.Tensor | None = None
    summed: bool = False

    def accuracy(self) -> float:
        """The batch's accuracy (NaN when the loss reports none)."""
        if self.correct is not None:
            return float(self.correct) / self.n
        return float(self.given) if self.given is not None else float("nan")

    def hits(self) -> float:
        """Correct samples in the batch (exact where counted)."""
        return float(self.correct) if self.correct is not None else self.accuracy() * self.n

    def total(self) -> torch.Tensor:
        """The loss summed over the batch."""
        return self.loss if self.summed else self.loss.detach() * self.n


def batch_size_of(batch: Any) -> int:
    """The number of samples in a collated batch (its first tensor's first dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for b in batch:
            n = batch_size_of(b)
            if n:
                return n
    return 0


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Every tensor of a (nested) batch on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    return batch


def training_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float,
                  mode: str = "torch") -> torch.Tensor:
    """The mean training loss of a batch. ``torch``: cross-entropy with torch's label smoothing
    (``smoothing / K`` on every class). ``official``: the paper's code's loss, the KL divergence
    from the target ``1 - smoothing`` on the true class and ``smoothing / (K - 1)`` on each
    other one; its gradient is torch's with ``smoothing * K / (K - 1)``, its value lower by the
    target's entropy (a constant)."""
    if mode == "torch":
        return F.cross_entropy(logits, y, label_smoothing=smoothing)
    k = logits.shape[1]
    target = torch.full_like(logits, smoothing / (k - 1))
    target.scatter_(1, y.unsqueeze(1), 1.0 - smoothing)
    return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(-1).mean()


def _output_loss(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise UserError("loss: the model's output for a dict batch has no .loss (pass labels "
                        "in the batch, or give --loss)")
    return loss


class DefaultLoss:
    """Cross-entropy (with the run's label smoothing in training) on ``(inputs, targets)``
    batches; ``model(**batch).loss`` on dict batches, with the accuracy where the output has
    classification logits and the batch ``labels``."""

    def __init__(self, smoothing: float = 0.0, mode: str = "torch") -> None:
        self.smoothing, self.mode = smoothing, mode

    def __call__(self, model: nn.Module, batch: Any, train: bool = True) -> LossOut:
        if isinstance(batch, Mapping):
            out = model(**batch)
            loss = _output_loss(out)
            logits, labels = getattr(out, "logits", None), batch.get("labels")
            correct = None
            if (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor)
                    and logits.dim() == 2 and labels.shape == logits.shape[:1]):
                correct = (logits.detach().argmax(1) == labels).sum()
            return LossOut(loss, batch_size_of(batch), correct)
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            raise UserError("loss: the default loss takes (inputs, targets) or dict batches; "
                            f"this dataset's batches are {type(batch).__name__}s of "
                            f"{len(batch) if isinstance(batch, list | tuple) else 1}; give --loss")
        x, y = batch
        logits = model(x)
        correct = (logits.detach().argmax(1) == y).sum()
        if train:
            return LossOut(training_loss(logits, y, self.smoothing, self.mode), len(y), correct)
        return LossOut(F.cross_entropy(logits, y, reduction="sum"), len(y), correct,
                       summed=True)


class PluginLoss:
    """The user's ``fn(model, batch) -> loss | (loss, {"accuracy": a})``."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, model: nn.Module, batch: Any, train: bool = True) -> LossOut:
        out = self.fn(model, batch)
        acc = None
        if isinstance(out, tuple):
            if len(out) != 2 or not isinstance(out[1], Mapping):
                raise UserError(f"loss: {self.name} returned a tuple that is not "
                                "(loss, {'accuracy': ...})")
            out, metrics = out
            acc = metrics.get("accuracy")
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            what = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                    else f"a {type(out).__name__}")
            raise UserError(f"loss: {self.name} returned {what}, not a scalar tensor")
        return LossOut(out.reshape(()), batch_size_of(batch), given=acc)


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


# -- the task --------------------------------------------------------------------------------
def make_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The run's model with ``num_classes`` outputs, initialised from its seed (so every
    replica in every process is identical): a built-in image model, or the plug-in factory's
    ``nn.Module`` (anything else is a one-line error naming it)."""
    torch.manual_seed(cfg.seed)
    if not plugins.is_plugin("model", cfg.model):
        shape = input_shape_for(cfg.model)
        return build_model(cfg.model, num_classes, in_channels=shape[0], dropout=cfg.dropout)
    fn = plugins.resolve("model", cfg.model)
    try:
        model = fn(num_classes=num_classes, **cfg.model_args)
    except UserError:
        raise
    except Exception as err:
        given = "".join(f", {k}={v!r}" for k, v in cfg.model_args.items())
        raise UserError(f"model: {cfg.model}(num_classes={num_classes}{given}) raised "
                        f"{type(err).__name__}: {_first(err)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model: {cfg.model} returned a {type(model).__name__}, not a "
                        "torch.nn.Module")
    return model


class Task:
    """The model factory, the data and the loss of a run."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        builtin_model = not plugins.is_plugin("model", cfg.model)
        shape = input_shape_for(cfg.model) if builtin_model else None
        if plugins.is_plugin("dataset", cfg.dataset):
            self.data: BuiltinData | LoaderData = LoaderData(cfg)
        else:
            self.data = BuiltinData(cfg, shape)
        self.num_classes = cfg.num_classes or self.data.num_classes
        self.schedule = self.data.schedule
        self.loss: Callable[..., LossOut] = (
            PluginLoss(plugins.resolve("loss", cfg.loss), cfg.loss) if cfg.loss else
            DefaultLoss(cfg.label_smoothing, cfg.label_smoothing_mode))

    def build_model(self) -> nn.Module:
        """A fresh model from the run's seed: every replica in every process is identical."""
        return make_model(self.cfg, self.num_classes)

    def failed(self, err: BaseException, where: str) -> UserError:
        """The one line for an exception the user's data, model or loss raised on ``where``
        (``batch 0``, ``batch 17``, ``the test split``): what failed, and, for labels the
        model's outputs cannot score, what they must be. A run that meets it ends there, with
        exit 2, whenever it is met (before the start for batch 0, in a worker for later
        batches of a dataset that loads lazily)."""
        if isinstance(err, UserError):
            return err
        hint = ""
        if not self.cfg.loss and isinstance(err, IndexError | RuntimeError) \
                and ("out of bounds" in str(err) or "Target" in str(err)):
            hint = (" (labels must be class indices from 0 to num_classes - 1 = "
                    f"{self.num_classes - 1})")
        return UserError(f"dataset: {where} of {self.cfg.dataset} through model "
                         f"{self.cfg.model} and the loss failed: {type(err).__name__}: "
                         f"{_first(err)}{hint}")

    def check(self, model: nn.Module, device: torch.device) -> LossOut:
        """Batch 0 through the model and the loss: one line naming what does not fit (items
        that do not collate, labels the outputs cannot score, a loss that is no finite
        scalar). For the checks made before a run starts."""
        batch = to_device(self.data.train_batch(0), device)
        model.train()
        try:
            with torch.no_grad():
                out = self.loss(model, batch)
        except Exception as err:
            raise self.failed(err, "batch 0") from None
        value = float(out.loss.detach().float())
        if not math.isfinite(value):
            raise UserError(f"loss: {self.cfg.loss or 'cross-entropy'} on batch 0 is {value}, "
                            "not a finite number")
        return out


__all__ = ["BuiltinData", "DefaultLoss", "LoaderData", "LossOut", "PluginLoss", "Task",
           "batch_size_of", "make_model", "seed_torch", "to_device", "training_loss"]
