"""Where a run's batches come from: the built-in in-memory datasets, or a plug-in's map-style
datasets read through a ``DataLoader``. Either way batch ``k`` is a pure function of
``(seed, k)``, the same in every process (see ``sampa_ray.task`` for the contracts).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

from sampa_ray import plugins
from sampa_ray.config import TrainConfig
from sampa_ray.data.batches import (
    Augment,
    BatchSchedule,
    derive_seed,
    seed_torch,
    seeded_globals,
)
from sampa_ray.data.datasets import load_dataset, validation_split
from sampa_ray.data.noise import NoisyLabels, draw_flips, noise_record, noisy_labels
from sampa_ray.errors import UserError
from sampa_ray.shards import shard_range

TAG_ITEM = 0x4954454D  # "ITEM": the per-item RNG seeds of plug-in datasets
EVAL_BATCH = 1000
#: items of a dataset that is not a tuple of tensors read into its fingerprint
FINGERPRINT_ITEMS = 32


def _feed(h: Any, obj: Any) -> None:
    """Feed ``obj`` (tensors, arrays, numbers, strings and containers of them) into hash
    ``h``: the same values give the same bytes in any process."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        _feed(h, torch.from_numpy(np.ascontiguousarray(obj)))
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, list | tuple):
        h.update(f"S{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif obj is None or isinstance(obj, bool | int | float | complex | str | bytes):
        h.update(repr(obj).encode())
    elif hasattr(obj, "__array_interface__") or hasattr(obj, "__array__"):  # PIL images
        _feed(h, np.asarray(obj))
    else:  # an object we cannot read: its type at least
        h.update(type(obj).__qualname__.encode())


def fingerprint(*parts: Any) -> str:
    """A short hex digest of ``parts`` (see :func:`_feed`)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


def check_same_data(fingerprints: Mapping[str, str], dataset: str) -> None:
    """Every process (by name) must hold the same data: else one line naming the dataset
    function and who differs. Data that differs between the workers trains on batches that
    are not the same samples, silently."""
    if len(set(fingerprints.values())) <= 1:
        return
    first = next(iter(fingerprints.values()))
    odd = [name for name, f in fingerprints.items() if f != first]
    same = [name for name, f in fingerprints.items() if f == first]
    raise UserError(f"dataset: {dataset} gave different data in different processes "
                    f"({', '.join(same)} differ from {', '.join(odd)}); it must return the "
                    "same data every time it is called (its randomness from a fixed seed or "
                    "the global generators, not the clock, the process or set order)")


class BuiltinData:
    """The in-memory datasets (digits, CIFAR, synthetic): batch ``k`` is indexed from tensors
    and augmented as a whole, a pure function of ``(seed, k)``."""

    def __init__(self, cfg: TrainConfig, shape: tuple[int, int, int] | None) -> None:
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir,
                          synthetic_shape=shape or (3, 32, 32),
                          synthetic_size=cfg.synthetic_size, seed=cfg.seed)
        if shape is not None and tuple(ds.input_shape) != tuple(shape):
            raise UserError(f"model: {cfg.model} expects inputs {shape}, dataset {cfg.dataset} "
                            f"gives {tuple(ds.input_shape)}")
        self.data = ds.split_validation(cfg.val_split) if cfg.val_split > 0 else ds
        self.label_noise: dict[str, Any] | None = None
        if cfg.label_noise > 0:  # the training split alone; test and validation stay clean
            n = len(self.data.y_train)
            flipped, offsets = draw_flips(cfg.seed, n, cfg.label_noise, self.data.num_classes)
            self.data.y_train = noisy_labels(self.data.y_train, flipped, offsets,
                                             self.data.num_classes)
            self.label_noise = noise_record(cfg.label_noise, n, flipped)
        self.seed = cfg.seed
        self.schedule = BatchSchedule(len(self.data.y_train), cfg.batch_size, cfg.seed,
                                      drop_last=cfg.last_batch == "drop")
        self.aug = Augment(cutout_p=cfg.cutout_p,
                           pad_value=self.data.black if cfg.pad_fill == "black" else None)
        self.num_classes = self.data.num_classes
        self.num_train, self.num_test = len(self.data.y_train), len(self.data.y_test)
        self.num_val = 0 if self.data.y_val is None else len(self.data.y_val)
        self.shard = (0, 1)
        self.notes: list[str] = []

    @cached_property
    def fingerprint(self) -> str:
        """A digest of every split's tensors: two nodes with other copies of the files differ."""
        d = self.data
        return fingerprint(d.x_train, d.y_train, d.x_test, d.y_test, d.x_val, d.y_val)

    def set_shard(self, rank: int, size: int) -> None:
        """Serve shard ``rank`` of ``size`` of every training batch (``sampa_ray.shards``)."""
        self.shard = (rank, size)

    def train_batch(self, k: int) -> Any:
        # only the shard's images are read and augmented, with the whole batch's random
        # draws: the shard's samples are exactly those of the whole batch
        return self.data.batch(self.schedule.indices(k), self.seed, k, self.aug, self.shard)

    def eval_batches(self, split: str) -> Iterator[Any]:
        x, y = {"test": (self.data.x_test, self.data.y_test),
                "val": (self.data.x_val, self.data.y_val)}.get(
                    split, (self.data.x_train, self.data.y_train))
        assert x is not None and y is not None
        for i in range(0, len(y), EVAL_BATCH):
            yield x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH]


class _SeededItems(torch.utils.data.Dataset):
    """Items keyed ``(k, p, i)``: the global RNGs are seeded from ``(seed, k, p)`` before item
    ``i`` is read, so a random transform inside the dataset draws the same numbers for
    position ``p`` of batch ``k`` in any process (and in any DataLoader worker)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        k, p, i = key
        s = derive_seed(self.seed, TAG_ITEM, k, p)
        seed_torch(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        return self.dataset[i]


class _Schedule(torch.utils.data.Sampler):
    """Batch ``start``, ``start + 1``, ...: each a list of ``(k, position, index)`` keys."""

    def __init__(self, schedule: BatchSchedule, start: int,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.schedule, self.start, self.shard = schedule, start, shard

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        k = self.start
        while True:  # a shard's positions keep their place in the whole batch (and its seeds)
            idx = self.schedule.indices(k)
            lo, hi = shard_range(len(idx), *self.shard)
            yield [(k, p, int(idx[p])) for p in range(lo, hi)]
            k += 1


def _own_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from torch's global RNG unless it has a
    generator of its own; evaluation runs in a thread beside training, whose augmentation and
    dropout draw from that RNG, so no loader may touch it."""
    return torch.Generator().manual_seed(0)


def _as_dataset(obj: Any, what: str) -> Any:
    if isinstance(obj, tuple) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        try:
            return TensorDataset(*obj)
        except AssertionError:
            sizes = ", ".join(str(len(t)) if t.dim() else "a scalar" for t in obj)
            raise UserError(f"dataset: the {what} tensors differ in their first dimension "
                            f"({sizes}); each holds one row per sample") from None
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise UserError(f"dataset: the {what} set is a {type(obj).__name__}, not a map-style "
                        "Dataset (with __getitem__ and __len__) or a tuple of tensors")
    return obj


def _labels_of(ds: Any) -> torch.Tensor | None:
    base = ds.dataset if isinstance(ds, Subset) else ds
    if isinstance(base, TensorDataset) and len(base.tensors) >= 2:
        y = base.tensors[1]
        return y[torch.as_tensor(ds.indices)] if isinstance(ds, Subset) else y
    return None


class LoaderData:
    """A plug-in's datasets, read through a ``DataLoader`` whose batch sampler yields the
    schedule's indices; batch ``k`` is the same in every process (see :class:`_SeededItems`)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.name = cfg.dataset
        factory = plugins.resolve("dataset", cfg.dataset)
        given = ", ".join(f"{k}={v!r}" for k, v in cfg.dataset_args.items())
        try:  # a shuffle or split drawn from the global generators: the same in every process
            with seeded_globals(cfg.seed):
                made = factory(**cfg.dataset_args)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"dataset: {cfg.dataset}({given}) raised "
                            f"{type(err).__name__}: {err}") from None
        if not (isinstance(made, tuple | list) and len(made) == 2):
            raise UserError(f"dataset: {cfg.dataset} returned a {type(made).__name__}, not "
                            "(train, test)")
        train, test = (_as_dataset(d, w) for d, w in zip(made, ("train", "test"), strict=True))
        self.val = None
        if cfg.val_split > 0:  # as the built-in datasets split it
            val_idx, train_idx = validation_split(len(train), cfg.val_split)
            self.val = Subset(train, val_idx)
            train = Subset(train, train_idx)
        self.train, self.test = train, test
        self.num_train, self.num_test = len(train), len(test)
        self.num_val = 0 if self.val is None else len(self.val)
        if self.num_train == 0:
            raise UserError(f"dataset: {cfg.dataset} has no training samples")
        self.notes: list[str] = []
        self.num_classes = cfg.num_classes or self._infer_classes(made[0])
        if cfg.loss is None:  # the default loss takes class indices
            self._check_labels()
        self.label_noise: dict[str, Any] | None = None
        if cfg.label_noise > 0:  # the training split alone; test and validation stay clean
            flipped, offsets = draw_flips(cfg.seed, self.num_train, cfg.label_noise,
                                          self.num_classes)
            noisy = NoisyLabels(self.train, flipped, offsets, self.num_classes, self.name)
            noisy.check()
            self.train = noisy
            self.label_noise = noise_record(cfg.label_noise, self.num_train, flipped)
        self.seed = cfg.seed
        self.schedule = BatchSchedule(self.num_train, cfg.batch_size, cfg.seed,
                                      drop_last=cfg.last_batch == "drop")
        self.batch_size = cfg.batch_size
        self.workers, self.pin = cfg.loader_workers, cfg.pin_memory
        self._items = _SeededItems(self.train, cfg.seed)
        self._it: Iterator[Any] | None = None
        self._next = -1
        self._last: tuple[int, Any] | None = None
        self.shard = (0, 1)

    def set_shard(self, rank: int, size: int) -> None:
        """Read only shard ``rank`` of ``size`` of every training batch: its items alone
        are fetched, seeded by their positions in the whole batch (``sampa_ray.shards``)."""
        if (rank, size) != self.shard:
            self.shard = (rank, size)
            self._it, self._last = None, None

    def _infer_classes(self, train: Any) -> int:
        for obj in (train, self.train):
            n = getattr(obj, "num_classes", None)
            if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
                return n
        y = _labels_of(self.train)
        if y is not None and not y.is_floating_point() and y.numel():
            n = int(y.max()) + 1
            self.notes.append(f"dataset: {self.name}: labels {_values(y)}: {n} classes "
                              "(from the largest label; set num_classes to say otherwise)")
            return n
        raise UserError("num_classes: cannot tell how many outputs the model needs from "
                        f"dataset {self.name}; set num_classes, or give the training set a "
                        "num_classes attribute")

    def _check_labels(self) -> None:
        """Integer labels held in tensors are checked whole, every split, before anything
        starts: one out of range would otherwise fail only when its batch (or the test
        split's evaluation) comes, deep into the run."""
        n = self.num_classes
        for split, ds in (("training", self.train), ("validation", self.val),
                          ("test", self.test)):
            y = _labels_of(ds) if ds is not None else None
            if y is None or y.is_floating_point() or y.dim() != 1 or not y.numel():
                continue
            bad = ((y < 0) | (y >= n)).nonzero()
            if len(bad):
                i = int(bad[0])
                raise UserError(f"dataset: {split} label {int(y[i])} (sample {i} of "
                                f"{len(y)}) of {self.name} is not a class index from 0 to "
                                f"{n - 1} (num_classes {n}); {len(bad)} such labels")
            if split == "training":
                missing = sorted(set(range(n)) - set(torch.unique(y).tolist()))
                if missing:
                    self.notes.append(f"dataset: {self.name}: {len(missing)} of {n} classes "
                                      f"have no training sample ({_listed(missing)})")

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the splits: their tensors whole where they are tensors, else their sizes
        and :data:`FINGERPRINT_ITEMS` items spread over each, read with seeded generators."""
        parts: list[Any] = [self.label_noise and self.label_noise["sha256"]]
        for ds in (self.train, self.val, self.test):
            if isinstance(ds, NoisyLabels):  # the clean data, and which labels flip (above)
                ds = ds.dataset
            if ds is None:
                parts.append(None)
                continue
            base, idx = (ds.dataset, ds.indices) if isinstance(ds, Subset) else (ds, None)
            if isinstance(base, TensorDataset):
                parts.append((base.tensors, None if idx is None else list(idx)))
                continue
            n = len(ds)
            picks = sorted({i * n // FINGERPRINT_ITEMS for i in range(FINGERPRINT_ITEMS)}) \
                if n else []
            with seeded_globals(self.seed):
                parts.append((n, [ds[i] for i in picks]))
        return fingerprint(*parts)

    def train_batch(self, k: int) -> Any:
        if self._last is not None and self._last[0] == k:  # SAM asks batch t twice
            return self._last[1]
        if self._it is None or self._next != k:
            loader = DataLoader(self._items, batch_sampler=_Schedule(self.schedule, k,
                                                                     self.shard),
                                num_workers=self.workers, pin_memory=self.pin,
                                collate_fn=default_collate, generator=_own_generator())
            self._it = iter(loader)
        try:
            batch = next(self._it)
        except UserError:
            raise
        except Exception as err:
            self._it = None
            raise UserError(f"dataset: batch {k} of {self.name} does not collate: "
                            f"{type(err).__name__}: {err}") from None
        self._next = k + 1
        self._last = (k, batch)
        return batch

    def eval_batches(self, split: str) -> Iterator[Any]:
        ds = {"test": self.test, "val": self.val}.get(split, self.train)
        assert ds is not None
        yield from DataLoader(ds, batch_size=max(self.batch_size, 256), shuffle=False,
                              num_workers=self.workers, pin_memory=self.pin,
                              generator=_own_generator())


def _listed(values: list[int], most: int = 12) -> str:
    shown = ", ".join(map(str, values[:most]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > most else "")


def _values(y: torch.Tensor) -> str:
    """The distinct labels, as a set (abbreviated beyond a dozen)."""
    return "{" + _listed(torch.unique(y).tolist()) + "}"


__all__ = ["EVAL_BATCH", "FINGERPRINT_ITEMS", "TAG_ITEM", "BuiltinData", "LoaderData",
           "check_same_data", "fingerprint"]
