"""Tests for the model registry in sampa_ray.models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from sampa_ray.errors import UserError
from sampa_ray.models import (
    MODEL_NAMES,
    build_model,
    count_parameters,
    input_shape_for,
)

# Models cheap enough to run forward/backward on in every test run.
FORWARD_MODELS = tuple(n for n in MODEL_NAMES if n != "wrn28_10")
GRAD_MODELS = ("mlp", "cnn", "resnet20")


def _build(name: str, num_classes: int = 10, seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes, **kwargs)


def test_model_names_exact() -> None:
    assert MODEL_NAMES == ("resnet20", "resnet56", "wrn28_2", "wrn28_10", "vgg19_bn", "mlp", "cnn")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet20", 269_722),
        ("resnet56", 853_018),
        ("wrn28_2", 1_467_610),
        ("wrn28_10", 36_479_194),
        ("vgg19_bn", 20_035_018),
        ("mlp", 26_122),
        ("cnn", 38_330),
    ],
)
def test_parameter_counts_exact(name: str, expected: int) -> None:
    assert count_parameters(_build(name)) == expected


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet20", 0.26e6, 0.28e6),
        ("resnet56", 0.85e6, 0.87e6),
        ("wrn28_2", 1.46e6, 1.48e6),
        ("wrn28_10", 36.4e6, 36.6e6),
        ("vgg19_bn", 19.5e6, 20.5e6),
    ],
)
def test_parameter_counts_match_papers(name: str, low: float, high: float) -> None:
    n = sum(p.numel() for p in _build(name).parameters())
    assert low <= n <= high, f"{name}: {n} parameters"


def test_small_models_are_small() -> None:
    assert count_parameters(_build("cnn")) < 50_000
    assert not any(isinstance(m, nn.BatchNorm2d) for m in _build("mlp").modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in _build("cnn").modules())


def test_num_classes_changes_only_head() -> None:
    # The head is Linear(64, C) for resnet20: 65 parameters per extra class.
    assert count_parameters(_build("resnet20", 100)) - count_parameters(_build("resnet20")) == (
        90 * 65
    )


def test_input_shapes() -> None:
    for name in ("resnet20", "resnet56", "wrn28_2", "wrn28_10", "vgg19_bn"):
        assert input_shape_for(name) == (3, 32, 32)
    assert input_shape_for("mlp") == (1, 8, 8)
    assert input_shape_for("cnn") == (1, 8, 8)


@pytest.mark.parametrize("name", FORWARD_MODELS)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_output_shape(name: str, num_classes: int) -> None:
    model = _build(name, num_classes)
    x = torch.randn(2, *input_shape_for(name))
    out = model(x)
    assert out.shape == (2, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, num_classes)


def test_explicit_in_channels() -> None:
    assert _build("resnet20", in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert _build("cnn", in_channels=3)(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert _build("mlp", in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(RuntimeError):
        _build("resnet20", in_channels=3)(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("name", GRAD_MODELS)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = _build(name)
    model.train()
    torch.manual_seed(1)
    x = torch.randn(4, *input_shape_for(name))
    y = torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}.{pname} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} gradient not finite"
        assert p.grad.abs().sum().item() > 0.0, f"{name}.{pname} gradient is zero"


def test_wrn_every_parameter_used() -> None:
    # A tiny WRN with the same block code, so the check stays fast.
    from sampa_ray.models.wrn import WideResNet

    torch.manual_seed(0)
    model = WideResNet(10, 1, 10, dropout=0.3)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_same_seed_same_parameters(name: str) -> None:
    a = _build(name, seed=123).state_dict()
    b = _build(name, seed=123).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = _build(name, seed=124).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_same_seed_same_output() -> None:
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(_build("cnn", seed=5)(x), _build("cnn", seed=5)(x))


def test_dropout_placement() -> None:
    wrn = _build("wrn28_2", dropout=0.3)
    drops = [m for m in wrn.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 12  # one per block, 4 blocks x 3 stages
    assert all(d.p == pytest.approx(0.3) for d in drops)
    assert not any(isinstance(m, nn.Dropout) for m in _build("wrn28_2").modules())
    for name in ("resnet20", "vgg19_bn", "mlp", "cnn"):
        assert sum(isinstance(m, nn.Dropout) for m in _build(name, dropout=0.5).modules()) == 1
        assert not any(isinstance(m, nn.Dropout) for m in _build(name).modules())


def test_dropout_inactive_in_eval() -> None:
    model = _build("mlp", dropout=0.5).eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), model(x))


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"^model: unknown 'foo' \(choose from resnet20, ") as e:
        build_model("foo", 10)
    msg = str(e.value)
    assert "\n" not in msg
    for name in MODEL_NAMES:
        assert name in msg
    assert isinstance(e.value, UserError)
    with pytest.raises(ValueError, match="^model:"):
        input_shape_for("resnet18")


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, True])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ValueError, match="^num_classes:"):
        build_model("mlp", num_classes)  # type: ignore[arg-type]


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan"), "0.1"])
def test_bad_dropout(dropout: object) -> None:
    with pytest.raises(ValueError, match="^dropout:"):
        build_model("mlp", 10, dropout=dropout)  # type: ignore[arg-type]


def test_bad_in_channels() -> None:
    with pytest.raises(ValueError, match="^in_channels:"):
        build_model("cnn", 10, 0)


def test_two_classes_ok() -> None:
    assert _build("cnn", 2)(torch.randn(2, 1, 8, 8)).shape == (2, 2)


@pytest.mark.outcome
def test_cnn_learns_digits(outcome: Callable[..., None]) -> None:
    from sklearn import datasets
    x_np, y_np = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x_np / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y_np)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    train, test = perm[:1400], perm[1400:]
    model = _build("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    outcome("test accuracy", acc, ">", 0.9)
