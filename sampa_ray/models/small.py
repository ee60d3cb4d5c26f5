"""Small models for 8x8 single-channel inputs (the scikit-learn digits set).

``mlp``: Flatten -> Linear(64, 128) -> ReLU -> Linear(128, 128) -> ReLU -> Linear(128, C);
no normalisation layers.

``cnn``: conv3x3(1->16)-BN-ReLU, conv3x3(16->32)-BN-ReLU, 2x2 max pool, Flatten,
Linear(512, 64)-ReLU, Linear(64, C); about 38k parameters for 10 classes.

For both, ``dropout`` > 0 adds dropout before the last linear layer. ``in_channels`` > 1 widens
the first layer; the spatial size must stay 8x8.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "DigitsMLP", "cnn", "mlp"]

SIDE = 8


class DigitsMLP(nn.Module):
    """Three-layer perceptron for flattened 8x8 images."""

    def __init__(
        self, num_classes: int, in_channels: int = 1, dropout: float = 0.0, hidden: int = 128
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * SIDE * SIDE, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """Two conv-BN-ReLU layers, one max pool and a two-layer classifier for 8x8 images."""

    def __init__(self, num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * (SIDE // 2) * (SIDE // 2), 64),
            nn.ReLU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(64, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> DigitsMLP:
    """MLP for (1, 8, 8) digits."""
    return DigitsMLP(num_classes, in_channels, dropout)


def cnn(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> DigitsCNN:
    """Small BatchNorm CNN for (1, 8, 8) digits."""
    return DigitsCNN(num_classes, in_channels, dropout)
