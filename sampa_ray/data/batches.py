"""Deterministic batch schedules and CIFAR-style augmentation.

Everything here is a pure function of integer seeds: the same ``(seed, k)`` gives bitwise
identical sample indices and augmented images in any process, so independent workers can
agree on batch ``k`` without talking to each other.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sampa_ray.errors import UserError

_MASK64 = (1 << 64) - 1

# Domain tags keep the seeds used for different purposes apart.
TAG_EPOCH = 0x45504F4348  # "EPOCH"
TAG_AUGMENT = 0x4155474D  # "AUGM"
TAG_SYNTHETIC = 0x53594E54  # "SYNT"


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Mix integers into one seed in ``[0, 2**63)``; a pure, platform-independent function."""
    h = 0x6A09E667F3BCC908
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``derive_seed(*parts)``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g


def seed_torch(seed: int, device: torch.device | None = None) -> None:
    """Seed torch's CPU generator (and ``device``'s, for a GPU). ``torch.manual_seed`` would
    also queue a seed for every accelerator torch knows, recording a stack trace each time
    while CUDA is not initialised: milliseconds per call, once per item here."""
    torch.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed(seed)


@contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """torch's (CPU), numpy's and Python's global generators seeded from ``seed`` inside, and
    put back as they were after: code that draws from them (a shuffle, ``train_test_split``
    without ``random_state``) gives the same numbers in every process, and the caller's own
    draws are not disturbed."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_torch(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class BatchSchedule:
    """Shuffled batches; batch ``k``'s indices are a pure function of ``(seed, k)``.

    Epoch ``e = k // batches_per_epoch`` uses ``torch.randperm(num_samples)`` drawn from a
    generator seeded by ``(seed, e)``; batch ``j = k % batches_per_epoch`` of that epoch is
    ``perm[j * batch_size:(j + 1) * batch_size]``. With ``drop_last`` (the default) an epoch is
    ``num_samples // batch_size`` full batches; without it the remainder forms one more, smaller
    batch at the epoch's end (as a DataLoader's default keeps it), still a pure function of
    ``(seed, k)``.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int,
                 drop_last: bool = True) -> None:
        if num_samples <= 0:
            raise UserError(f"the dataset has no training samples (num_samples={num_samples})")
        if batch_size <= 0:
            raise UserError(f"batch_size must be a positive integer, got {batch_size}")
        if batch_size > num_samples:
            raise UserError(
                f"batch_size {batch_size} is larger than the {num_samples} training samples"
            )
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.batches_per_epoch: int = (self.num_samples // self.batch_size if drop_last else
                                       -(-self.num_samples // self.batch_size))
        self._cache: tuple[int, torch.Tensor] | None = None

    def epoch_of(self, k: int) -> int:
        """The epoch that batch ``k`` belongs to."""
        if k < 0:
            raise ValueError(f"batch index must be >= 0, got {k}")
        return k // self.batches_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The int64 sample permutation of ``epoch`` (cached for the latest epoch asked)."""
        cache = self._cache
        if cache is not None and cache[0] == epoch:
            return cache[1]
        perm = torch.randperm(
            self.num_samples, generator=seeded_generator(self.seed, TAG_EPOCH, epoch)
        )
        self._cache = (epoch, perm)
        return perm

    def size_of(self, k: int) -> int:
        """How many samples batch ``k`` holds (fewer than ``batch_size`` only for an epoch's
        last batch with ``last_batch: keep``)."""
        j = k % self.batches_per_epoch
        return min(self.batch_size, self.num_samples - j * self.batch_size)

    def indices(self, k: int) -> torch.Tensor:
        """The int64 sample indices of batch ``k`` (a fresh tensor the caller may modify)."""
        epoch = self.epoch_of(k)
        j = k % self.batches_per_epoch
        perm = self.permutation(epoch)
        return perm[j * self.batch_size : (j + 1) * self.batch_size].clone()


@dataclass(frozen=True)
class Augment:
    """How CIFAR batches are augmented. The defaults are sampa-ray's: cutout on every image,
    crop padding 0 in normalised units (the mean colour). The paper's code pads with black
    pixels before normalising (``pad_value``: a black pixel per channel, normalised) and cuts
    out with probability 0.5 (``cutout_p``)."""

    cutout_p: float = 1.0
    pad_value: tuple[float, ...] | None = None


class AugmentParams(NamedTuple):
    """Per-sample augmentation draws for a batch of ``n`` images."""

    offsets: torch.Tensor  # int64 (n, 2): crop (row, col) offset into the padded image
    flips: torch.Tensor  # bool (n,): mirror left-right
    centers: torch.Tensor  # int64 (n, 2): cutout square center (row, col)
    cut: torch.Tensor | None = None  # bool (n,): whether each image gets its cutout (None: all)


def draw_augment_params(
    n: int, height: int, width: int, generator: torch.Generator, *, pad: int = 4,
    cutout_p: float = 1.0,
) -> AugmentParams:
    """Draw crop offsets, flips and cutout centers for ``n`` images from ``generator``; with
    ``cutout_p`` < 1 also whether each image is cut, drawn after the others so that every
    other draw stays what it is with ``cutout_p`` = 1."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    rows = torch.randint(0, height, (n,), generator=generator)
    cols = torch.randint(0, width, (n,), generator=generator)
    cut = torch.rand(n, generator=generator) < cutout_p if cutout_p < 1.0 else None
    return AugmentParams(offsets, flips, torch.stack([rows, cols], dim=1), cut)


def _pad(x: torch.Tensor, pad: int, value: tuple[float, ...] | None) -> torch.Tensor:
    """``x`` padded by ``pad`` on each side: zeros, or ``value[c]`` in channel ``c``."""
    if pad <= 0:
        return x
    if value is None:
        return F.pad(x, (pad, pad, pad, pad))
    n, c, h, w = x.shape
    if len(value) != c:
        raise ValueError(f"pad value has {len(value)} channels, images have {c}")
    out = torch.tensor(value, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    out = out.expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    out[:, :, pad:pad + h, pad:pad + w] = x
    return out


def apply_augment(
    x: torch.Tensor, params: AugmentParams, *, pad: int = 4, cutout: int = 16,
    pad_value: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Random crop (padding ``pad``), horizontal flip, then cutout, fully vectorized.

    ``x`` is (N, C, H, W). Output pixel ``(i, j)`` of sample ``b`` is
    ``padded[b, :, oy + i, ox + j']`` with ``j' = W - 1 - j`` if flipped else ``j``; then the
    ``cutout``-sized square whose top-left corner is ``center - cutout // 2`` (clipped at the
    borders) is set to zero (only on the images ``params.cut`` marks, when it is given). The
    padding is zeros of the (normalized) input, or ``pad_value[c]`` in channel ``c``; the
    cutout is zeros.
    """
    n, _, h, w = x.shape
    dev = x.device
    offsets = params.offsets.to(dev)
    flips = params.flips.to(dev)
    centers = params.centers.to(dev)
    padded = _pad(x, pad, pad_value)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = offsets[:, 0:1] + ar_h  # (n, h)
    col_src = torch.where(flips[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :])
    cols = offsets[:, 1:2] + col_src  # (n, w)
    b = torch.arange(n, device=dev)
    # Advanced indices separated by a slice put the broadcast dims first: (n, h, w, C).
    out = padded[b[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    out = out.permute(0, 3, 1, 2).contiguous()
    if cutout > 0:
        top = centers[:, 0:1] - cutout // 2  # (n, 1)
        left = centers[:, 1:2] - cutout // 2
        in_rows = (ar_h[None, :] >= top) & (ar_h[None, :] < top + cutout)  # (n, h)
        in_cols = (ar_w[None, :] >= left) & (ar_w[None, :] < left + cutout)  # (n, w)
        hole = in_rows[:, :, None] & in_cols[:, None, :]  # (n, h, w)
        if params.cut is not None:
            hole = hole & params.cut.to(dev)[:, None, None]
        out = out.masked_fill(hole[:, None, :, :], 0.0)
    return out


def augment_batch(x: torch.Tensor, seed: int, k: int, aug: Augment | None = None,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Crop + flip + cutout of batch ``x``, a pure function of ``(x, seed, k, aug)``. With
    ``rows = (lo, n)``, ``x`` is rows ``lo..`` of a batch of ``n``: the draws are the whole
    batch's, and ``x`` gets its rows' (bitwise the whole batch's augmented rows)."""
    aug = aug or Augment()
    lo, n = rows or (0, x.shape[0])
    g = seeded_generator(seed, TAG_AUGMENT, k)
    params = draw_augment_params(n, x.shape[2], x.shape[3], g, cutout_p=aug.cutout_p)
    if (lo, n) != (0, x.shape[0]):
        hi = lo + x.shape[0]
        params = AugmentParams(*(None if p is None else p[lo:hi] for p in params))
    return apply_augment(x, params, pad_value=aug.pad_value)
