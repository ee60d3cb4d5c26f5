"""The "grokking" task: modular addition (Power et al., 2022).

Every pair ``(a, b)`` with ``a, b`` in ``[0, p)`` is one example: input tokens ``[a, b, p]``
(``p`` is the '=' token), label ``(a + b) mod p``. The ``p * p`` examples are split once, at
random but fixed by ``split_seed``, into a training and a test set. Everything is built in
memory and deterministic; nothing is downloaded.

``load(p, train_fraction, split_seed)`` is the dataset plug-in behind ``dataset: modadd``
(arguments in ``dataset_args``); pair it with ``model: transformer``, whose default vocabulary
(``num_classes + 1``) holds the '=' token.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from sampa_ray.errors import UserError

__all__ = ["MAX_P", "ModAddDataset", "load", "pairs", "split"]

#: the largest modulus (p * p examples: 4.2M at p = 2048)
MAX_P = 2048


class ModAddDataset(TensorDataset):
    """``(tokens int64 (3,), label int64 ())`` items, with the ``num_classes`` (= p) attribute."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__(tokens, labels)
        self.num_classes = num_classes


def pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``p * p`` examples in order (row ``a * p + b``): tokens ``(p*p, 3)``, labels."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


def split(n: int, train_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a random split of ``range(n)`` (training first), fixed by ``split_seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_train = round(train_fraction * n)
    return perm[:n_train], perm[n_train:]


def _check(p: object, train_fraction: object, split_seed: object) -> None:
    if isinstance(p, bool) or not isinstance(p, int) or not 2 <= p <= MAX_P:
        raise UserError(f"dataset_args.p: must be an integer in [2, {MAX_P}], got {p!r}")
    if (isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float)
            or not (math.isfinite(train_fraction) and 0 < train_fraction < 1)):
        raise UserError(f"dataset_args.train_fraction: must be a number in (0, 1), "
                        f"got {train_fraction!r}")
    n_train = round(train_fraction * p * p)
    if not 0 < n_train < p * p:
        raise UserError(f"dataset_args.train_fraction: {train_fraction!r} of {p * p} pairs "
                        f"leaves {'no training' if n_train == 0 else 'no test'} examples")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or \
            not 0 <= split_seed < 2**63:
        raise UserError(f"dataset_args.split_seed: must be an integer in [0, 2**63), "
                        f"got {split_seed!r}")


def load(p: int = 97, train_fraction: float = 0.5,
         split_seed: int = 0) -> tuple[ModAddDataset, ModAddDataset]:
    """The training and test sets of modular addition mod ``p`` (``num_classes = p`` on both).
    A bad argument is a one-line UserError naming it."""
    _check(p, train_fraction, split_seed)
    tokens, labels = pairs(p)
    train, test = split(p * p, train_fraction, split_seed)
    return (ModAddDataset(tokens[train], labels[train], p),
            ModAddDataset(tokens[test], labels[test], p))
