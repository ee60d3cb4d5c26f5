"""Symmetric label noise on the training split (``--label-noise p``): each training label, with
probability ``p``, is replaced by a class drawn uniformly from the *other* classes.

Which samples flip and to what is a pure function of ``(seed, num_train, p, num_classes)``
(:func:`draw_flips`): every process that builds the run's data (the local run, each Ray worker,
a resumed run) holds the same labels, and the flipped indices can be recomputed from
result.json alone. A flipped label is ``(y + offset) % num_classes`` with ``offset`` uniform in
``1 .. num_classes - 1``, so it never lands on the true class. The test and validation splits
are never noisy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from sampa_ray.data.batches import seeded_generator
from sampa_ray.errors import UserError

TAG_NOISE = 0x4E4F4953  # "NOIS"
#: result.json lists the flipped indices up to this many (beyond: their count and hash)
LISTED_FLIPS = 100_000


def draw_flips(seed: int, num_train: int, p: float, num_classes: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The flipped training indices (ascending, int64) and each one's class offset in
    ``1 .. num_classes - 1``: sample ``i`` flips where a uniform draw is below ``p``."""
    if p <= 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    if num_classes < 2:
        raise UserError(f"label_noise: {p} needs at least 2 classes (this run has "
                        f"{num_classes})")
    g = seeded_generator(seed, TAG_NOISE)
    u = torch.rand(num_train, generator=g, dtype=torch.float64)
    offsets = torch.randint(1, num_classes, (num_train,), generator=g, dtype=torch.int64)
    mask = u < p
    return mask.nonzero().flatten(), offsets[mask]


def noisy_labels(y: torch.Tensor, flipped: torch.Tensor, offsets: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
    """A copy of the class labels ``y`` with the flipped ones moved by their offsets."""
    y = y.clone()
    y[flipped] = (y[flipped] + offsets) % num_classes
    return y


def flips_hash(flipped: torch.Tensor) -> str:
    """A short digest of the flipped indices (the same list gives the same hash anywhere)."""
    return hashlib.sha256(",".join(map(str, flipped.tolist())).encode()).hexdigest()[:16]


def noise_record(p: float, num_train: int, flipped: torch.Tensor) -> dict[str, Any]:
    """What result.json says of the noise: ``p``, the training samples, how many flipped, the
    hash of their indices, and the indices themselves (up to :data:`LISTED_FLIPS`)."""
    rec: dict[str, Any] = {"p": p, "num_train": num_train, "count": len(flipped),
                           "rate": len(flipped) / num_train if num_train else 0.0,
                           "sha256": flips_hash(flipped)}
    if len(flipped) <= LISTED_FLIPS:
        rec["flipped"] = flipped.tolist()
    return rec


def _label_of(item: Any) -> tuple[str, Any] | None:
    """Where an item keeps its class label: ``("pair", y)`` for ``(input, label, ...)``,
    ``("labels", y)`` for a mapping with ``labels``; None where none can be read."""
    if isinstance(item, tuple | list) and len(item) >= 2:
        where, y = "pair", item[1]
    elif isinstance(item, Mapping) and "labels" in item:
        where, y = "labels", item["labels"]
    else:
        return None
    if isinstance(y, torch.Tensor):
        if y.dim() != 0 or y.is_floating_point() or y.dtype == torch.bool:
            return None
    elif isinstance(y, bool) or not isinstance(y, int):
        try:
            import numpy as np

            if not isinstance(y, np.integer):
                return None
        except ImportError:  # pragma: no cover
            return None
    return where, y


class NoisyLabels(torch.utils.data.Dataset):
    """A plug-in's map-style training set with the flipped items' labels moved: item ``i``'s
    label (``item[1]``, or ``item["labels"]``) becomes ``(y + offset) % num_classes``."""

    def __init__(self, dataset: Any, flipped: torch.Tensor, offsets: torch.Tensor,
                 num_classes: int, name: str) -> None:
        self.dataset, self.num_classes, self.name = dataset, num_classes, name
        self.offsets = dict(zip(flipped.tolist(), offsets.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        off = self.offsets.get(int(i))
        if off is None:
            return item
        return self.relabel(item, off, i)

    def relabel(self, item: Any, off: int, i: int) -> Any:
        found = _label_of(item)
        if found is None:
            raise unreadable(self.name, item, i)
        where, y = found
        new = (int(y) + off) % self.num_classes
        if isinstance(y, torch.Tensor):
            new = torch.tensor(new, dtype=y.dtype)
        if where == "pair":
            out = list(item)
            out[1] = new
            return type(item)(out) if isinstance(item, tuple) else out
        return {**item, "labels": new}

    def check(self) -> None:
        """Read the first item (and the first flipped one): one line where its label cannot
        be read, before anything starts."""
        for i in {0, *list(self.offsets)[:1]}:
            item = self.dataset[i]
            if _label_of(item) is None:
                raise unreadable(self.name, item, i)


def unreadable(name: str, item: Any, i: int) -> UserError:
    """The one line for a training item whose class label cannot be read."""
    what = type(item).__name__
    return UserError(f"label_noise: training item {i} of {name} is a {what} with no integer "
                     "class label to flip (label noise needs (input, label) items or a "
                     "'labels' key holding a class index)")


__all__ = ["LISTED_FLIPS", "TAG_NOISE", "NoisyLabels", "draw_flips", "flips_hash",
           "noise_record", "noisy_labels", "unreadable"]
