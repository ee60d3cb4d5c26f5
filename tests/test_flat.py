"""FlatParams: parameters and gradients as views into two flat buffers; buffer round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sampa_ray.flat import FlatParams, flat_buffers, load_buffers
from sampa_ray.models import build_model, input_shape_for

MODELS = ("cnn", "resnet20")



def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10)


def _inputs(name: str, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *input_shape_for(name)), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.parametrize("name", MODELS)
def test_params_are_views_into_flat_data(name: str) -> None:
    model = _model(name)
    ref = _model(name)
    flat = FlatParams(model)
    n = sum(p.numel() for p in ref.parameters())
    assert flat.numel == n
    assert flat.data.shape == (n,) and flat.grad.shape == (n,)
    assert flat.check_views()
    # the initial values were copied in, in parameter order
    assert torch.equal(flat.data, _concat(list(ref.parameters())))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert p.shape == q.shape
        assert torch.equal(p.detach(), q.detach())
    # every parameter aliases its own slice of flat.data
    offset = 0
    for p in model.parameters():
        k = p.numel()
        assert p.data_ptr() == flat.data[offset : offset + k].data_ptr()
        assert p.grad is not None
        assert p.grad.data_ptr() == flat.grad[offset : offset + k].data_ptr()
        offset += k
    with torch.no_grad():
        flat.data.zero_()
    assert all(bool((p == 0).all()) for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_writing_flat_data_changes_the_output(name: str) -> None:
    model = _model(name).eval()
    flat = FlatParams(model)
    x, _ = _inputs(name)
    with torch.no_grad():
        before = model(x).clone()
        g = torch.Generator().manual_seed(5)
        flat.data.add_(0.05 * torch.randn(flat.numel, generator=g))
        after = model(x)
    assert not torch.allclose(before, after)
    # and the module's output is what a separate model with those values gives
    ref = _model(name).eval()
    with torch.no_grad():
        offset = 0
        for q in ref.parameters():
            q.copy_(flat.data[offset : offset + q.numel()].view_as(q))
            offset += q.numel()
        torch.testing.assert_close(after, ref(x))


@pytest.mark.parametrize("name", MODELS)
def test_load_sets_parameters(name: str) -> None:
    model = _model(name)
    flat = FlatParams(model)
    point = torch.linspace(-1.0, 1.0, flat.numel, dtype=torch.float64)
    flat.load_(point)
    assert torch.equal(flat.data, point.float())
    assert torch.equal(_concat(list(model.parameters())), point.float())
    assert flat.check_views()


@pytest.mark.parametrize("name", MODELS)
def test_grad_after_backward_matches_reference_model(name: str) -> None:
    model = _model(name).train()
    ref = _model(name).train()
    flat = FlatParams(model)
    grad_ptr = flat.grad.data_ptr()
    x, y = _inputs(name)

    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(ref(x), y).backward()
    want = _concat([q.grad for q in ref.parameters()])

    assert flat.check_views()
    assert flat.grad.data_ptr() == grad_ptr
    assert float(want.abs().sum()) > 0
    torch.testing.assert_close(flat.grad, want, rtol=1e-5, atol=1e-6)

    # autograd accumulates into the flat buffer; zero_grad_ clears it
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(flat.grad, 2 * want, rtol=1e-5, atol=1e-6)
    flat.zero_grad_()
    assert flat.check_views()
    assert int(torch.count_nonzero(flat.grad)) == 0
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(flat.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(0,), (7,), "minus_one", "plus_one", "2d"])
def test_load_rejects_wrong_shapes(name: str, shape: object) -> None:
    flat = FlatParams(_model(name))
    n = flat.numel
    sizes = {"minus_one": (n - 1,), "plus_one": (n + 1,), "2d": (1, n)}
    bad = torch.zeros(sizes.get(shape, shape))  # type: ignore[arg-type]
    before = flat.data.clone()
    with pytest.raises(ValueError, match="point"):
        flat.load_(bad)
    assert torch.equal(flat.data, before)


def test_model_without_trainable_parameters_is_rejected() -> None:
    frozen = nn.Linear(3, 2)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="model"):
        FlatParams(frozen)
    with pytest.raises(ValueError, match="model"):
        FlatParams(nn.ReLU())


def _trained_buffers(name: str) -> nn.Module:
    """A model whose BatchNorm statistics have moved away from their initial values."""
    model = _model(name).train()
    with torch.no_grad():
        for seed in range(3):
            model(_inputs(name, n=6, seed=seed)[0])
    return model


@pytest.mark.parametrize("name", MODELS)
def test_buffers_round_trip(name: str) -> None:
    src = _trained_buffers(name)
    bufs = flat_buffers(src)
    assert set(bufs) == {k for k, _ in src.named_buffers()}
    assert any(k.endswith("running_mean") for k in bufs)
    assert any(k.endswith("num_batches_tracked") for k in bufs)
    for k, b in src.named_buffers():
        assert bufs[k].device.type == "cpu"
        assert bufs[k].dtype == b.dtype
        assert torch.equal(bufs[k], b)
        assert bufs[k].data_ptr() != b.data_ptr()  # a copy, not the module's tensor
    assert all(int(v) == 3 for k, v in bufs.items() if k.endswith("num_batches_tracked"))

    dst = _model(name)
    fresh = flat_buffers(dst)
    assert any(not torch.equal(fresh[k], bufs[k]) for k in bufs)
    load_buffers(dst, bufs)
    got = flat_buffers(dst)
    assert set(got) == set(bufs)
    for k in bufs:
        assert torch.equal(got[k], bufs[k]), k

    # the returned dict is detached from the module
    for v in bufs.values():
        v.zero_()
    assert any(not torch.equal(b, torch.zeros_like(b)) for _, b in src.named_buffers())

    # eval-mode outputs agree once parameters and buffers agree
    x, _ = _inputs(name)
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src.eval()(x))


@pytest.mark.parametrize("name", MODELS)
def test_load_buffers_rejects_mismatched_names(name: str) -> None:
    model = _trained_buffers(name)
    good = flat_buffers(model)
    key = next(iter(good))
    missing = {k: v for k, v in good.items() if k != key}
    extra = {**good, "not_a_buffer": torch.zeros(1)}
    renamed = {("x." + k if k == key else k): v for k, v in good.items()}
    other = flat_buffers(_model("resnet20" if name == "cnn" else "cnn"))
    before = flat_buffers(model)
    for bad in (missing, extra, renamed, other, {}):
        with pytest.raises(ValueError, match="buffers"):
            load_buffers(model, bad)
    after = flat_buffers(model)
    for k in before:
        assert torch.equal(after[k], before[k])
