"""In-memory datasets: scikit-learn digits, CIFAR-10/100 from local files, and synthetic data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sampa_ray.data.batches import TAG_SYNTHETIC, Augment, augment_batch, seeded_generator
from sampa_ray.data.cifar import CIFAR_SPECS, load_cifar
from sampa_ray.errors import UserError
from sampa_ray.plugins import BUILTIN_DATASETS
from sampa_ray.shards import shard_range

#: the built-in in-memory datasets: the one list of them (``plugins``, torch-free)
DATASET_NAMES: tuple[str, ...] = BUILTIN_DATASETS


def validation_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """Which of ``n`` training samples validate and which train: ``floor(fraction * n)`` held
    out as the paper's code chooses them (``np.random.seed(42)``, shuffle ``range(n)``, the
    first ones validate), the rest in that shuffled order. Every dataset, built-in or plug-in,
    is split by this one rule."""
    n_val = int(np.floor(fraction * n))
    if n_val < 1 or n_val >= n:
        raise UserError(f"val_split: {fraction} of {n} training samples leaves "
                        f"{n_val} for validation and {n - n_val} for training")
    order = list(range(n))
    np.random.RandomState(42).shuffle(order)
    return order[:n_val], order[n_val:]


@dataclass
class Dataset:
    """Train/test tensors held in memory; images are float32 (N, C, H, W), already normalized."""

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    augment: bool
    #: a black pixel per channel in normalised units (CIFAR: -mean/std), for black padding
    black: tuple[float, ...] | None = None
    #: held-out validation images (see :meth:`split_validation`), never augmented
    x_val: torch.Tensor | None = field(default=None, repr=False)
    y_val: torch.Tensor | None = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return int(self.x_test.shape[0])

    def batch(self, indices: torch.Tensor, seed: int, k: int, aug: Augment | None = None,
              shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch ``(x, y)`` for these sample indices, or shard ``rank`` of ``size``
        of it (``shard``: ``sampa_ray.shards``'s cut), read and augmented alone.

        With ``augment`` the images get random crop (pad 4), horizontal flip and 16x16 cutout
        (as ``aug`` says), drawn from a generator seeded by ``(seed, k)`` for the whole batch:
        the same ``(indices, seed, k, aug)`` gives a bitwise identical batch in any process,
        and its shards are bitwise its slices.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64)
        lo, hi = shard_range(len(idx), *shard)
        x = self.x_train[idx[lo:hi]]
        y = self.y_train[idx[lo:hi]]
        if self.augment:
            x = augment_batch(x, seed, k, aug, rows=(lo, len(idx)))
        return x, y

    def split_validation(self, fraction: float) -> Dataset:
        """Hold out ``floor(fraction * num_train)`` training images for validation, chosen as
        the paper's code chooses them (``np.random.seed(42)``, shuffle ``range(num_train)``,
        the first ones validate), so with CIFAR and 0.1 these are the same 5,000 images
        whatever the run's seed. The rest train, in that shuffled order."""
        val_idx, train_idx = validation_split(self.num_train, fraction)
        val = torch.tensor(val_idx, dtype=torch.int64)
        train = torch.tensor(train_idx, dtype=torch.int64)
        return Dataset(self.name, self.x_train[train], self.y_train[train], self.x_test,
                       self.y_test, self.num_classes, self.augment, self.black,
                       self.x_train[val], self.y_train[val])

    def __str__(self) -> str:
        c, h, w = self.input_shape
        return (
            f"{self.name}: {self.num_train} train / {self.num_test} test, "
            f"{c}x{h}x{w}, {self.num_classes} classes"
        )


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean = float(x_tr.mean())
    std = float(x_tr.std())
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(((x_tr - mean) / std).astype(np.float32)),
        y_train=torch.from_numpy(y_tr.astype(np.int64)),
        x_test=torch.from_numpy(((x_te - mean) / std).astype(np.float32)),
        y_test=torch.from_numpy(y_te.astype(np.int64)),
        num_classes=10,
        augment=False,
    )


def _load_synthetic(shape: tuple[int, int, int], classes: int, size: int, seed: int) -> Dataset:
    if len(tuple(shape)) != 3 or any(int(s) <= 0 for s in shape):
        raise UserError(f"synthetic_shape must be three positive integers (C, H, W), got {shape}")
    if classes < 2:
        raise UserError(f"synthetic_classes must be at least 2, got {classes}")
    if size < 1:
        raise UserError(f"synthetic_size must be at least 1, got {size}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    n_test = max(1, size // 4)
    g = seeded_generator(seed, TAG_SYNTHETIC)
    x_train = torch.randn((size, *shape), generator=g, dtype=torch.float32)
    y_train = torch.randint(0, classes, (size,), generator=g, dtype=torch.int64)
    x_test = torch.randn((n_test, *shape), generator=g, dtype=torch.float32)
    y_test = torch.randint(0, classes, (n_test,), generator=g, dtype=torch.int64)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, classes, augment=False)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    synthetic_shape: tuple[int, int, int] = (3, 32, 32),
    synthetic_classes: int = 10,
    synthetic_size: int = 1024,
    seed: int = 0,
) -> Dataset:
    """Load dataset ``name`` (one of ``DATASET_NAMES``) fully into memory.

    ``data_dir`` is only used by the CIFAR datasets; the ``synthetic_*`` options and ``seed``
    only by ``synthetic``. User mistakes (unknown name, missing or malformed files) raise
    ``UserError``.
    """
    if name == "digits":
        return _load_digits()
    if name in ("cifar10", "cifar100"):
        x_tr, y_tr, x_te, y_te, num_classes = load_cifar(name, data_dir)
        spec = CIFAR_SPECS[name]
        # a 0 pixel through the same float32 arithmetic as the images (cifar._to_tensor)
        zero = torch.zeros(3, dtype=torch.float32)
        black = tuple(zero.sub_(torch.tensor(spec.mean, dtype=torch.float32))
                      .div_(torch.tensor(spec.std, dtype=torch.float32)).tolist())
        return Dataset(name, x_tr, y_tr, x_te, y_te, num_classes, augment=True, black=black)
    if name == "synthetic":
        return _load_synthetic(synthetic_shape, synthetic_classes, synthetic_size, seed)
    raise UserError(f"unknown dataset {name!r}: dataset must be one of {', '.join(DATASET_NAMES)}")
