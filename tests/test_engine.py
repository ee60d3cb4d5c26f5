"""GradientEngine on digits/cnn: determinism, correctness of the gradient, the BatchNorm policy
and evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import same_tensors
from torch import nn

from sampa_ray.config import make_config
from sampa_ray.engine import GradientEngine
from sampa_ray.errors import UserError
from sampa_ray.flat import FlatParams, load_buffers
from sampa_ray.models import build_model

BASE = {
    "model": "cnn",
    "dataset": "digits",
    "batch_size": 32,
    "threads": 1,
    "seed": 0,
    "device": "cpu",
}


def _engine(**over: object) -> GradientEngine:
    return GradientEngine(make_config({**BASE, **over}))


def _point(engine: GradientEngine, seed: int = 3, scale: float = 0.02) -> torch.Tensor:
    """A point near x0 that is not x0."""
    g = torch.Generator().manual_seed(seed)
    x0 = engine.initial_point()
    return x0 + scale * torch.randn(x0.shape, generator=g)


def test_info_and_initial_point() -> None:
    e = _engine()
    info = e.info()
    n = sum(p.numel() for p in e.model.parameters())
    assert info["num_params"] == n
    assert info["num_train"] == 1437 and info["num_test"] == 360
    assert info["num_classes"] == 10
    assert info["batches_per_epoch"] == 1437 // 32
    x0 = e.initial_point()
    assert x0.shape == (n,) and x0.dtype == torch.float32 and x0.device.type == "cpu"
    # a copy: changing it does not move the model
    x0.add_(1.0)
    assert not torch.equal(e.initial_point(), x0)
    # every replica starts at the same point (the run's seed)
    assert torch.equal(_engine().initial_point(), e.initial_point())
    assert not torch.equal(_engine(seed=1).initial_point(), e.initial_point())


def test_gradient_is_deterministic_across_engines() -> None:
    a, b = _engine(), _engine()
    p = _point(a)
    for batch in (0, 5, 44):  # 44: first batch of the second epoch
        ra = a.gradient(p, batch, track_stats=False)
        ga = ra.grad.clone()
        rb = b.gradient(p, batch, track_stats=False)
        assert torch.equal(ga, rb.grad)
        assert ra.loss == rb.loss
        assert ra.accuracy == rb.accuracy
    # the same engine asked again gives the same answer; another batch gives another one
    r1 = a.gradient(p, 7, track_stats=False)
    g1 = r1.grad.clone()
    r2 = a.gradient(p, 7, track_stats=False)
    assert torch.equal(g1, r2.grad) and r1.loss == r2.loss
    r3 = a.gradient(p, 8, track_stats=False)
    assert not torch.equal(g1, r3.grad)


def test_gradient_result_fields() -> None:
    e = _engine()
    r = e.gradient(e.initial_point(), 0)
    assert r.grad.shape == (e.flat.numel,) and r.grad.dtype == torch.float32
    assert r.grad.device.type == "cpu"
    assert torch.isfinite(r.grad).all() and float(r.grad.norm()) > 0
    assert 0.0 <= r.accuracy <= 1.0
    assert r.accuracy * 32 == pytest.approx(round(r.accuracy * 32))
    assert 1.5 < r.loss < 4.0  # about log(10) at initialisation
    assert set(r.timings) == {"compute", "copy_in", "copy_out"}
    assert r.timings["compute"] > 0 and r.end >= r.start > 0


def _reference_loss64(engine: GradientEngine, point: torch.Tensor, batch: int) -> float:
    """The training loss at ``point`` on batch ``batch``, recomputed in float64 from scratch."""
    cfg = engine.cfg
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, 10).double().train()
    flat = FlatParams(model)
    flat.load_(point.double())
    idx = engine.schedule.indices(batch)
    xb = engine.data.x_train[idx].double()
    yb = engine.data.y_train[idx]
    with torch.no_grad():
        logits = model(xb)
        return float(F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing))


def test_gradient_matches_finite_differences() -> None:
    e = _engine(label_smoothing=0.1)
    p = _point(e)
    batch = 3
    r = e.gradient(p, batch, track_stats=False)
    g = r.grad.clone().double()
    # the loss the engine reports is the label-smoothed loss of that batch
    assert r.loss == pytest.approx(_reference_loss64(e, p, batch), rel=1e-5)

    # random directions: central differences of a float64 re-computation of the loss
    gen = torch.Generator().manual_seed(11)
    eps = 1e-4
    for _ in range(3):
        d = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        d /= d.norm()
        p64 = p.double()
        fd = (
            _reference_loss64(e, p64 + eps * d, batch) - _reference_loss64(e, p64 - eps * d, batch)
        ) / (2 * eps)
        assert float(g @ d) == pytest.approx(fd, rel=1e-2, abs=1e-6)

    # along the gradient: central differences of the engine's own (fp32) losses
    eps = 1e-3
    u = (g / g.norm()).float()
    lp = e.gradient(p + eps * u, batch, track_stats=False).loss
    lm = e.gradient(p - eps * u, batch, track_stats=False).loss
    assert (lp - lm) / (2 * eps) == pytest.approx(float(g.norm()), rel=1e-2)


def test_track_stats_false_leaves_buffers_bitwise_unchanged() -> None:
    e = _engine()
    e.gradient(_point(e, seed=1), 1, track_stats=True)  # statistics away from their init
    before = e.buffers()
    for batch in range(4):
        e.gradient(_point(e, seed=batch + 5, scale=0.2), batch, track_stats=False)
    assert same_tensors(e.buffers(), before)
    # momentum of every BatchNorm layer is restored
    assert all(
        m.momentum == 0.1
        for m in e.model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )


def test_track_stats_true_updates_running_statistics() -> None:
    e = _engine()
    before = e.buffers()
    assert any(k.endswith("running_mean") for k in before)
    e.gradient(_point(e), 2, track_stats=True)
    after = e.buffers()
    assert set(after) == set(before)
    for k in before:
        if k.endswith("num_batches_tracked"):
            assert int(after[k]) == int(before[k]) + 1, k
        else:
            assert not torch.equal(after[k], before[k]), k
    e.gradient(_point(e), 3, track_stats=True)
    assert all(int(v) == 2 for k, v in e.buffers().items() if k.endswith("num_batches_tracked"))


def test_running_statistics_follow_the_batch_statistics() -> None:
    """One tracked pass from the initial statistics (mean 0, var 1, momentum 0.1)."""
    e = _engine()
    p = _point(e)
    batch = 4
    e.gradient(p, batch, track_stats=True)
    bn = e.model.features[1]
    ref = build_model("cnn", 10)
    FlatParams(ref).load_(p)
    xb = e.data.x_train[e.schedule.indices(batch)]
    with torch.no_grad():
        h = ref.features[0](xb)
    mean = h.mean(dim=(0, 2, 3))
    var = h.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)


def test_gradient_does_not_depend_on_track_stats() -> None:
    a, b = _engine(), _engine()
    p = _point(a)
    # a's statistics move, b's do not; the gradients still agree bitwise
    for batch in range(3):
        ra = a.gradient(p, batch, track_stats=True)
        ga, la = ra.grad.clone(), ra.loss
        rb = b.gradient(p, batch, track_stats=False)
        assert torch.equal(ga, rb.grad)
        assert la == rb.loss
    assert not same_tensors(a.buffers(), b.buffers())


def _hand_eval(
    engine: GradientEngine, point: torch.Tensor, buffers: dict[str, torch.Tensor]
) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model("cnn", 10)
    FlatParams(model).load_(point)
    load_buffers(model, buffers)
    model.eval()
    with torch.no_grad():
        logits = model(engine.data.x_test)
        y = engine.data.y_test
        loss = float(F.cross_entropy(logits.double(), y, reduction="mean"))
        acc = float((logits.argmax(1) == y).double().mean())
    return loss, acc


def test_evaluate_matches_hand_computation_in_eval_mode() -> None:
    e = _engine()
    p = _point(e)
    for batch in range(5):
        e.gradient(p, batch, track_stats=True)
    bufs = e.buffers()
    ev = e.evaluate(p)
    assert 0.0 <= ev.accuracy <= 1.0
    assert ev.seconds >= 0
    loss, acc = _hand_eval(e, p, bufs)
    assert ev.accuracy == pytest.approx(acc, abs=1e-12)
    assert ev.loss == pytest.approx(loss, rel=1e-5)
    # evaluation uses the running statistics (eval mode), and changes nothing
    assert same_tensors(e.buffers(), bufs)
    e.gradient(p, 9, track_stats=True)
    assert e.evaluate(p).loss != ev.loss


def test_evaluate_train_split() -> None:
    e = _engine()
    ev = e.evaluate(e.initial_point(), split="train")
    with torch.no_grad():
        e.model.eval()
        logits = e.model(e.data.x_train)
    acc = float((logits.argmax(1) == e.data.y_train).double().mean())
    assert ev.accuracy == pytest.approx(acc, abs=1e-12)


def test_background_eval_matches_evaluate_and_snapshots_its_inputs() -> None:
    e = _engine()
    p = _point(e)
    for batch in range(3):
        e.gradient(p, batch, track_stats=True)
    want = e.evaluate(p)

    q = p.clone()
    e.start_eval(7, q)
    q.add_(1.0)  # the point was snapshot
    e.gradient(p, 10, track_stats=True)  # so were the statistics
    got = e.finished_evals(wait=True)
    assert [s for s, _ in got] == [7]
    ev = got[0][1]
    assert ev.accuracy == want.accuracy
    assert ev.loss == pytest.approx(want.loss, rel=1e-6)
    assert e.finished_evals(wait=True) == []

    # several queued evaluations come back in order, each with its own point
    p2 = _point(e, seed=8, scale=0.3)
    e.start_eval(1, p)
    e.start_eval(2, p2)
    got = e.finished_evals(wait=True)
    assert [s for s, _ in got] == [1, 2]
    assert got[0][1].loss == pytest.approx(e.evaluate(p).loss, rel=1e-6)
    assert got[1][1].loss == pytest.approx(e.evaluate(p2).loss, rel=1e-6)
    assert got[0][1].loss != got[1][1].loss


def test_model_dataset_mismatch_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model"):
        GradientEngine(make_config({**BASE, "model": "resnet20"}))


def test_bf16_wire_gradient_is_the_fp32_gradient_rounded_once() -> None:
    """A bf16 wire: the engine hands out a bf16 gradient (half the bytes) whose values are the
    fp32 gradient rounded to nearest even, and rounds its own fp32 copy to the same values (a
    replica keeping its own gradient agrees with the peer that receives it)."""
    from sampa_ray.transport.codec import from_array, to_array

    a, b = _engine(), _engine(wire_dtype="bf16")
    p = _point(a)
    g32 = a.gradient(p, 3, track_stats=False).grad.clone()
    r = b.gradient(p, 3, track_stats=False)
    assert r.grad.dtype == torch.bfloat16 and r.grad.shape == g32.shape
    assert torch.equal(r.grad, g32.to(torch.bfloat16))
    assert not torch.equal(r.grad.float(), g32)  # the rounding did something
    assert torch.equal(b.flat.grad, r.grad.float())
    rel = float((r.grad.float() - g32).norm() / g32.norm())
    assert 0 < rel < 2**-8  # bf16 keeps 8 significant bits
    arr = to_array(r.grad)  # what Ray's object store carries
    assert arr.nbytes == 2 * g32.numel() and arr.nbytes * 2 == g32.numpy().nbytes
    assert torch.equal(from_array(arr), r.grad.float())
    assert from_array(arr).dtype == torch.float32
    # fp32 arrays pass through without a copy
    arr32 = to_array(g32)
    assert from_array(arr32).data_ptr() == g32.data_ptr()
