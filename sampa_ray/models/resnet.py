"""CIFAR ResNets of He et al. (2016), "Deep Residual Learning for Image Recognition", Sec. 4.2.

Layout: a 3x3 stem conv with 16 channels, then three stages of ``n = (depth - 2) / 6`` basic
blocks with 16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global average
pooling and one linear layer.

Shortcuts use option A of the paper: when a block halves the resolution and doubles the width,
the identity is subsampled with stride 2 and zero-padded in the channel dimension, so shortcuts
add no parameters. With 10 classes ResNet-20 has 0.27M and ResNet-56 0.85M parameters, as in
Table 6 of the paper. Convolutions and the classifier use Kaiming (He) normal initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "resnet20", "resnet56"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError("out_planes: must be >= in_planes for a padding shortcut")
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            before = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, before, self.extra - before))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between them and after the residual sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``dropout`` > 0 adds dropout before the classifier."""

    def __init__(
        self, depth: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth: must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = self.flatten(self.pool(out))
        return self.fc(self.dropout(out))


def resnet20(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> CifarResNet:
    """ResNet-20 (n = 3), 0.27M parameters for 10 classes."""
    return CifarResNet(20, num_classes, in_channels, dropout)


def resnet56(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> CifarResNet:
    """ResNet-56 (n = 9), 0.85M parameters for 10 classes."""
    return CifarResNet(56, num_classes, in_channels, dropout)
