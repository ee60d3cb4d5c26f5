"""A model, a dataset and a loss of your own, trained by sampa-ray: the file a plug-in is.

Three ways to train it, from this folder (``cd examples``):

    sampa-ray train --model my_task:build --dataset my_task:load --loss my_task:loss
    sampa-ray train --config my_task.yaml
    python fit_api.py

The task: 2-D points on noisy concentric rings, one class per ring. Training points are
augmented in ``__getitem__`` with a random rotation and jitter drawn from torch's global RNG:
sampa-ray seeds it from (run seed, batch k, position) before each item is read, so batch k is
the same on every worker and the two gradients of a SAMPa round see the same images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Rings(Dataset):
    """``classes`` rings of radius 1, 2, ...; each point a 2-vector, its label the ring."""

    def __init__(self, n: int, classes: int, noise: float, seed: int, augment: bool) -> None:
        g = torch.Generator().manual_seed(seed)  # the data itself: fixed by its own seed
        self.labels = torch.randint(0, classes, (n,), generator=g)
        angle = torch.rand(n, generator=g) * 2 * math.pi
        radius = self.labels.float() + 1 + noise * torch.randn(n, generator=g)
        self.points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
        self.num_classes = classes
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.points[i]
        if self.augment:  # a random rotation (labels do not change) and a little jitter
            a = float(torch.rand(())) * 2 * math.pi
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            p = rot @ p + 0.05 * torch.randn(2)
        return p, self.labels[i]


def load(n_train: int = 2048, n_test: int = 512, classes: int = 3, noise: float = 0.15,
         augment: bool = True) -> tuple[Dataset, Dataset]:
    """The dataset factory: (train, test)."""
    return (Rings(n_train, classes, noise, seed=1, augment=augment),
            Rings(n_test, classes, noise, seed=2, augment=False))


def build(num_classes: int, hidden: int = 64, depth: int = 2) -> nn.Module:
    """The model factory: an MLP with BatchNorm (its statistics follow sampa-ray's policy)."""
    layers: list[nn.Module] = []
    width = 2
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):  # noqa: ANN201
    """The loss: cross-entropy, and the accuracy sampa-ray reports."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean()}
