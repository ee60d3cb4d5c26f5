"""The paper's data recipe, field by field, against the official code's behaviour written out
here: the 45k / 5k split (numpy seed 42), the kept partial last batch, cutout with probability
p, black padding before normalisation, and the eps/(K-1) label smoothing in float64."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sampa_ray.data import Augment, BatchSchedule, Dataset, augment_batch, load_dataset
from sampa_ray.data.batches import TAG_AUGMENT, apply_augment, draw_augment_params, seeded_generator
from sampa_ray.engine import training_loss
from sampa_ray.errors import UserError

C10_MEAN, C10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _fake_cifar10(folder: Path, per_file: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        with (folder / f"data_batch_{i}").open("wb") as f:
            pickle.dump({b"labels": [(i + j) % 10 for j in range(per_file)], b"data": data}, f)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({b"labels": [j % 10 for j in range(per_file)],
                     b"data": rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)}, f)


# -- the split ----------------------------------------------------------------------------------
def test_the_validation_split_is_the_official_one() -> None:
    """get_dataset.py: indices = list(range(N)); split = floor(0.1 * N); np.random.seed(42);
    np.random.shuffle(indices); valid = indices[:split], train = indices[split:]."""
    ds = load_dataset("synthetic", synthetic_shape=(1, 8, 8), synthetic_size=250, seed=3)
    split = ds.split_validation(0.1)
    n = 250
    indices = list(range(n))
    cut = int(np.floor(0.1 * n))
    np.random.seed(42)
    np.random.shuffle(indices)
    valid, train = indices[:cut], indices[cut:]
    assert cut == 25 and split.num_train == 225 and split.y_val is not None
    assert torch.equal(split.x_val, ds.x_train[valid])
    assert torch.equal(split.y_val, ds.y_train[valid])
    assert torch.equal(split.x_train, ds.x_train[train])
    assert torch.equal(split.y_train, ds.y_train[train])
    assert torch.equal(split.x_test, ds.x_test)  # the test set is untouched
    # on CIFAR's 50,000 images: 45,000 train, 5,000 validate
    order = list(range(50_000))
    np.random.RandomState(42).shuffle(order)
    assert len(order[5000:]) == 45_000


def test_a_split_that_leaves_a_side_empty_is_refused() -> None:
    ds = load_dataset("synthetic", synthetic_shape=(1, 8, 8), synthetic_size=8, seed=0)
    with pytest.raises(UserError, match="val_split"):
        ds.split_validation(0.1)  # floor(0.8) = 0 validation samples


# -- the partial last batch ---------------------------------------------------------------------
def test_kept_last_batch_is_a_pure_function_of_seed_and_k() -> None:
    drop = BatchSchedule(100, 32, seed=7)
    keep = BatchSchedule(100, 32, seed=7, drop_last=False)
    assert drop.batches_per_epoch == 3 and keep.batches_per_epoch == 4
    for epoch in range(3):
        ks = range(4 * epoch, 4 * epoch + 4)
        sizes = [len(keep.indices(k)) for k in ks]
        assert sizes == [32, 32, 32, 4]
        seen = torch.cat([keep.indices(k) for k in ks])
        assert sorted(seen.tolist()) == list(range(100))  # every sample once per epoch
        # the full batches are drop-last's batches of the same epoch
        for j in range(3):
            assert torch.equal(keep.indices(4 * epoch + j), drop.indices(3 * epoch + j))
    again = BatchSchedule(100, 32, seed=7, drop_last=False)
    assert torch.equal(again.indices(11), keep.indices(11))  # a fresh schedule, any order
    assert keep.epoch_of(7) == 1 and keep.epoch_of(8) == 2


# -- augmentation -------------------------------------------------------------------------------
def test_cutout_probability_cuts_only_the_drawn_images() -> None:
    x = torch.ones(64, 3, 32, 32)
    always = augment_batch(x, 3, 9)
    half = augment_batch(x, 3, 9, Augment(cutout_p=0.5))
    never = augment_batch(x, 3, 9, Augment(cutout_p=0.0))
    assert torch.equal(always, augment_batch(x, 3, 9, Augment()))  # the default is p = 1
    g = seeded_generator(3, TAG_AUGMENT, 9)
    params = draw_augment_params(64, 32, 32, g, cutout_p=0.5)
    assert params.cut is not None
    cut = params.cut
    assert 10 < int(cut.sum()) < 54  # about half
    # crop and flip are drawn as with p = 1: an image that is cut equals the p = 1 image, one
    # that is not equals the image without any cutout
    assert torch.equal(half[cut], always[cut])
    assert torch.equal(half[~cut], never[~cut])
    holes = (never == 0).all(dim=1).flatten(1).sum(1)
    cut_holes = (always == 0).all(dim=1).flatten(1).sum(1)
    assert bool((cut_holes > holes).all())  # every p = 1 image has a hole the uncut lacks


def test_black_padding_is_a_black_pixel_normalised(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path / "c10")
    ds = load_dataset("cifar10", data_dir=str(tmp_path / "c10"))
    black = [(0.0 - m) / s for m, s in zip(C10_MEAN, C10_STD, strict=True)]
    assert ds.black == pytest.approx(black, rel=1e-6)
    # a black image normalised by the loader's arithmetic: exactly the pad value
    assert ds.black is not None
    x = ds.x_train[:16]
    g = seeded_generator(0, TAG_AUGMENT, 1)
    params = draw_augment_params(16, 32, 32, g)
    mean_pad = apply_augment(x, params, cutout=0)
    black_pad = apply_augment(x, params, cutout=0, pad_value=ds.black)
    padded_here = mean_pad.ne(black_pad).any(dim=1)  # (n, h, w): where the two differ
    # the two differ only where the crop reaches into the padding, which is 0 in one and the
    # black pixel in the other
    assert bool((mean_pad.permute(0, 2, 3, 1)[padded_here] == 0).all())
    want = torch.tensor(ds.black, dtype=torch.float32)
    got = black_pad.permute(0, 2, 3, 1)[padded_here]
    assert got.shape[0] > 0 and bool((got == want).all())
    # the engine's batches use it when asked
    idx = torch.arange(8)
    xb, _ = ds.batch(idx, 4, 2, Augment(cutout_p=0.5, pad_value=ds.black))
    assert torch.equal(xb, augment_batch(ds.x_train[idx], 4, 2,
                                         Augment(cutout_p=0.5, pad_value=ds.black)))
    assert not torch.equal(xb, ds.batch(idx, 4, 2)[0])
    synthetic = Dataset("s", x, torch.zeros(16, dtype=torch.int64), x, torch.zeros(16,
                        dtype=torch.int64), 10, augment=False)
    assert synthetic.black is None


# -- label smoothing ----------------------------------------------------------------------------
@pytest.mark.parametrize("k,eps", [(10, 0.1), (100, 0.1), (10, 0.3)])
def test_official_smoothing_equals_the_official_loss_in_float64(k: int, eps: float) -> None:
    """utility.py smooth_crossentropy: one_hot = full(eps / (K - 1)); one_hot[gold] = 1 - eps;
    loss = kl_div(log_softmax(pred), one_hot).sum(-1), averaged over the batch by train.py.
    Written out here as sum_c t_c (log t_c - log p_c)."""
    g = torch.Generator().manual_seed(k)
    logits = (3 * torch.randn(37, k, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, k, (37,), generator=g)
    t = torch.full((37, k), eps / (k - 1), dtype=torch.float64)
    t[torch.arange(37), y] = 1 - eps
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    official = (t * (torch.log(t) - log_p)).sum(dim=1).mean()
    ours = training_loss(logits, y, eps, "official")
    assert abs(ours.item() - official.item()) <= 1e-12
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_off,) = torch.autograd.grad(official, logits)
    assert float((g_ours - g_off).abs().max()) <= 1e-12
    # torch's smoothing with eps * K / (K - 1) has the same gradient; its value is higher by the
    # target's entropy, a constant
    torch_equiv = F.cross_entropy(logits, y, label_smoothing=eps * k / (k - 1))
    (g_torch,) = torch.autograd.grad(torch_equiv, logits)
    assert float((g_torch - g_off).abs().max()) <= 1e-12
    entropy = -(1 - eps) * math.log(1 - eps) - eps * math.log(eps / (k - 1))
    assert abs(torch_equiv.item() - official.item() - entropy) <= 1e-12
    # and torch mode is torch's own
    with torch.no_grad():
        assert torch.equal(training_loss(logits, y, eps),
                           F.cross_entropy(logits, y, label_smoothing=eps))


def test_the_engine_trains_on_cifar_with_the_whole_recipe(tmp_path: Path) -> None:
    """Fake CIFAR-10 files (100 training images): 10 validate, 90 train in batches of 8, the
    last of 2 kept; batches padded black and cut out with p = 0.5, as the engine asks."""
    from sampa_ray.config import make_config
    from sampa_ray.engine import GradientEngine
    from sampa_ray.recipes import PAPER

    _fake_cifar10(tmp_path / "c10")
    cfg = make_config({**PAPER, "model": "resnet20", "data_dir": str(tmp_path / "c10"),
                       "batch_size": 8, "threads": 1, "device": "cpu", "backend": "local"})
    engine = GradientEngine(cfg)
    info = engine.info()
    assert (info["num_train"], info["num_val"], info["batches_per_epoch"]) == (90, 10, 12)
    assert engine.aug == Augment(cutout_p=0.5, pad_value=engine.data.black)
    idx = engine.schedule.indices(11)
    assert len(idx) == 2
    want, _ = engine.data.batch(idx, 42, 11, Augment(cutout_p=0.5, pad_value=engine.data.black))
    got, _ = engine.data.batch(idx, 42, 11, engine.aug)
    assert torch.equal(got, want)
    r = engine.gradient(engine.initial_point(), 11)
    assert r.grad.shape == (info["num_params"],) and bool(torch.isfinite(r.grad).all())
    assert math.isfinite(r.loss) and r.accuracy in (0.0, 0.5, 1.0)
    ev = engine.evaluate(engine.initial_point(), "val")
    assert 0.0 <= ev.accuracy <= 1.0
