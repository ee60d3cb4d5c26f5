"""Model registry: the paper's CIFAR models and two small models for 8x8 digits.

``build_model(name, num_classes)`` returns a freshly initialised ``torch.nn.Module`` that maps a
float32 NCHW batch of shape ``(N, *input_shape_for(name))`` to logits of shape
``(N, num_classes)``. Initialisation draws from torch's global RNG, so setting
``torch.manual_seed`` first makes the parameters reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from sampa_ray.errors import UserError
from sampa_ray.models.resnet import resnet20, resnet56
from sampa_ray.models.small import cnn, mlp
from sampa_ray.models.vgg import vgg19_bn
from sampa_ray.models.wrn import wrn28_2, wrn28_10
from sampa_ray.plugins import BUILTIN_MODELS

__all__ = [
    "MODEL_NAMES",
    "ModelConfigError",
    "build_model",
    "count_parameters",
    "input_shape_for",
]

#: the built-in models: the one list of them (``plugins``, torch-free, so a config is checked
#: without torch), which the builders below must serve
MODEL_NAMES: tuple[str, ...] = BUILTIN_MODELS

_BUILDERS: dict[str, Callable[[int, int, float], nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "wrn28_2": wrn28_2,
    "wrn28_10": wrn28_10,
    "vgg19_bn": vgg19_bn,
    "mlp": mlp,
    "cnn": cnn,
}

_CIFAR_SHAPE = (3, 32, 32)
_DIGITS_SHAPE = (1, 8, 8)
_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "resnet20": _CIFAR_SHAPE,
    "resnet56": _CIFAR_SHAPE,
    "wrn28_2": _CIFAR_SHAPE,
    "wrn28_10": _CIFAR_SHAPE,
    "vgg19_bn": _CIFAR_SHAPE,
    "mlp": _DIGITS_SHAPE,
    "cnn": _DIGITS_SHAPE,
}


class ModelConfigError(UserError, ValueError):
    """A bad model name or model argument; the message is one line naming the field."""


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ModelConfigError(f"model: unknown {name!r} (choose from {', '.join(MODEL_NAMES)})")
    return name


def _check_int(field: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelConfigError(f"{field}: must be an integer >= {minimum}, got {value!r}")
    return value


def input_shape_for(name: str) -> tuple[int, int, int]:
    """Return the ``(C, H, W)`` input shape model ``name`` expects."""
    return _INPUT_SHAPES[_check_name(name)]


def build_model(
    name: str,
    num_classes: int,
    in_channels: int | None = None,
    *,
    dropout: float = 0.0,
) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs.

    ``in_channels`` defaults to the channel count of ``input_shape_for(name)`` (3 for the CIFAR
    models, 1 for ``mlp``/``cnn``). ``dropout`` in [0, 1): between the two convolutions of each
    block for the Wide ResNets, before the final linear layer for every other model.
    Raises ``ModelConfigError`` (a ``ValueError``) naming the offending field.
    """
    name = _check_name(name)
    num_classes = _check_int("num_classes", num_classes, 2)
    if in_channels is None:
        in_channels = _INPUT_SHAPES[name][0]
    in_channels = _check_int("in_channels", in_channels, 1)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float):
        raise ModelConfigError(f"dropout: must be a number in [0, 1), got {dropout!r}")
    dropout = float(dropout)
    if not (math.isfinite(dropout) and 0.0 <= dropout < 1.0):
        raise ModelConfigError(f"dropout: must be in [0, 1), got {dropout!r}")
    return _BUILDERS[name](num_classes, in_channels, dropout)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Return the number of (trainable) scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
