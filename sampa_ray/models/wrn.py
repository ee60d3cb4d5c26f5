"""Wide ResNets of Zagoruyko & Komodakis (2016), "Wide Residual Networks".

WRN-d-k for 32x32 inputs: a 3x3 stem conv with 16 channels, three stages of
``n = (d - 4) / 6`` pre-activation basic blocks (BN-ReLU-conv3x3, BN-ReLU-conv3x3) with
16k, 32k and 64k channels (stride 2 at the start of stages 2 and 3), then BN-ReLU, global
average pooling and one linear layer. Where a block changes width or resolution the shortcut
is a 1x1 convolution applied to the pre-activated input, as in the authors' code. ``dropout``
> 0 inserts dropout between the two convolutions of every block (the paper's "dropout in
residual blocks"). With 10 classes WRN-28-10 has 36.5M and WRN-28-2 1.47M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WideResNet", "wrn28_2", "wrn28_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3 [-dropout] -BN-ReLU-conv3x3 plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth: must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor: must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        self.depth = depth
        self.widen_factor = widen_factor
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(WideBasicBlock(in_planes, planes, stride, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = self.flatten(self.pool(self.relu(self.bn(out))))
        return self.fc(out)


def wrn28_2(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-28-2, 1.47M parameters for 10 classes."""
    return WideResNet(28, 2, num_classes, in_channels, dropout)


def wrn28_10(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10, 36.5M parameters for 10 classes."""
    return WideResNet(28, 10, num_classes, in_channels, dropout)
