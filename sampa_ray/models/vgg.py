"""VGG-19 with batch normalisation (Simonyan & Zisserman 2015) sized for 32x32 inputs.

Sixteen 3x3 conv-BN-ReLU layers in five groups (64x2, 128x2, 256x4, 512x4, 512x4), each group
followed by 2x2 max pooling, which leaves a 512x1x1 map for a 32x32 input. The classifier is the
usual CIFAR head: a single ``Linear(512, num_classes)`` (the 4096-wide ImageNet head is not
used); ``dropout`` > 0 adds dropout before it. About 20.0M parameters for 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "vgg19_bn"]

# Output channels per conv layer; "M" is a 2x2 max pool.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG feature extractor with BatchNorm and a one-layer classifier."""

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(channels, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.flatten(self.pool(self.features(x)))
        return self.classifier(self.dropout(out))


def vgg19_bn(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> VGG:
    """VGG-19-BN for 32x32 inputs with a ``Linear(512, num_classes)`` head."""
    return VGG(VGG19_CFG, num_classes, in_channels, dropout)
