"""``--label-noise p``: symmetric noise on the training labels alone, drawn from the run's seed
so every process holds the same labels, recorded in result.json; the test split stays clean;
a bad value or a plug-in dataset whose labels cannot be read is one line and exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import cli_env
from torch.utils.data import Dataset, TensorDataset

from sampa_ray import plugins
from sampa_ray.cli import main
from sampa_ray.config import make_config
from sampa_ray.data.noise import draw_flips, flips_hash, noisy_labels
from sampa_ray.errors import UserError
from sampa_ray.local import run_local
from sampa_ray.task import Task

#: prints the flipped indices of a digits run with label noise, in a fresh interpreter
CHILD = """
import json, sys
from sampa_ray.config import make_config
from sampa_ray.task import Task
t = Task(make_config({"label_noise": float(sys.argv[1]), "seed": int(sys.argv[2]),
                      "val_split": 0.1}))
print(json.dumps({"noise": t.data.label_noise, "y": t.data.data.y_train.tolist()}))
"""


def test_the_rate_is_binomial_and_a_flip_never_keeps_its_class() -> None:
    n, p, k = 20_000, 0.3, 10
    flipped, offsets = draw_flips(7, n, p, k)
    sd = math.sqrt(n * p * (1 - p))  # 64.8
    assert abs(len(flipped) - n * p) < 4 * sd, len(flipped)
    assert bool(((offsets >= 1) & (offsets <= k - 1)).all())
    y = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(1))
    noisy = noisy_labels(y, flipped, offsets, k)
    changed = (noisy != y).nonzero().flatten()
    assert torch.equal(changed, flipped)  # every flip moves, nothing else does
    counts = torch.bincount(offsets, minlength=k)[1:].float()  # uniform over other classes
    assert float((counts - counts.mean()).abs().max()) < 4 * math.sqrt(counts.mean())
    assert draw_flips(7, n, p, k)[0].equal(flipped)  # a pure function of its inputs
    assert not draw_flips(8, n, p, k)[0].equal(flipped)
    assert len(draw_flips(7, n, 0.0, k)[0]) == 0


def test_the_same_labels_in_another_process_and_the_test_split_untouched() -> None:
    clean = Task(make_config({"val_split": 0.1}))
    noisy = Task(make_config({"label_noise": 0.25, "seed": 3, "val_split": 0.1}))
    rec = noisy.data.label_noise
    changed = (noisy.data.data.y_train != clean.data.data.y_train).nonzero().flatten()
    assert changed.tolist() == rec["flipped"] and rec["count"] == len(changed) > 0
    assert rec["num_train"] == len(clean.data.data.y_train) == 1294  # after the held-out 10%
    assert abs(rec["count"] - 0.25 * 1294) < 4 * math.sqrt(1294 * 0.25 * 0.75)
    assert rec["sha256"] == flips_hash(changed)
    for split in ("x_test", "y_test", "x_val", "y_val", "x_train"):
        assert torch.equal(getattr(noisy.data.data, split), getattr(clean.data.data, split))
    child = subprocess.run([sys.executable, "-c", CHILD, "0.25", "3"], env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    assert got["noise"] == rec
    assert got["y"] == noisy.data.data.y_train.tolist()


def test_result_json_records_the_flips_and_a_resume_key(tmp_path) -> None:  # noqa: ANN001
    cfg = make_config({"label_noise": 0.4, "steps": 10, "backend": "local", "threads": 1,
                       "out": str(tmp_path / "run")})
    result = run_local(cfg, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "result.json").read_text())
    assert stored["label_noise"] == result["label_noise"]
    want, _ = draw_flips(0, 1437, 0.4, 10)
    assert stored["label_noise"]["flipped"] == want.tolist()
    assert stored["label_noise"]["p"] == 0.4
    # a trajectory field: another value is another run
    assert cfg.hash() != cfg.model_copy(update={"label_noise": 0.3}).hash()
    assert make_config({}).hash() == "321a791bc8979141"  # unchanged at its default


class _Pairs(Dataset):
    """(x, label) items that are not tensors held whole: labels read item by item."""

    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


class _NoLabels(_Pairs):
    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.x[i]


def _pairs() -> tuple[Dataset, Dataset]:
    return _Pairs(300), _Pairs(30)


def _tensors() -> tuple[TensorDataset, TensorDataset]:
    d = _Pairs(300)
    return TensorDataset(d.x, d.y), TensorDataset(d.x[:30], d.y[:30])


def _unlabelled() -> tuple[Dataset, Dataset]:
    return _NoLabels(300), _NoLabels(30)


@pytest.mark.parametrize("factory", [_pairs, _tensors])
def test_a_plugin_datasets_training_labels_flip_alone(factory) -> None:  # noqa: ANN001
    name = plugins.register(factory)
    cfg = make_config({"dataset": name, "model": plugins.register(_linear),
                       "label_noise": 0.3, "seed": 5, "num_classes": 3})
    task = Task(cfg)
    rec = task.data.label_noise
    flipped, offsets = draw_flips(5, 300, 0.3, 3)
    assert rec["flipped"] == flipped.tolist()
    y = torch.tensor([int(task.data.train[i][1]) for i in range(300)])
    clean = torch.arange(300) % 3
    assert (y != clean).nonzero().flatten().tolist() == rec["flipped"]
    assert torch.equal(y, noisy_labels(clean, flipped, offsets, 3))
    test_y = [int(task.data.test[i][1]) for i in range(30)]
    assert test_y == (torch.arange(30) % 3).tolist()
    # a batch of the schedule carries the noisy labels of its samples
    idx = task.schedule.indices(0)
    _, by = task.data.train_batch(0)
    assert by.tolist() == y[torch.as_tensor(idx)].tolist()


def _linear(num_classes: int) -> torch.nn.Module:
    return torch.nn.Linear(4, num_classes)


def test_labels_that_cannot_be_read_and_bad_values_are_one_line(capsys) -> None:  # noqa: ANN001
    cfg = make_config({"dataset": plugins.register(_unlabelled), "num_classes": 3,
                       "model": plugins.register(_linear), "label_noise": 0.2,
                       "loss": plugins.register(_loss)})
    with pytest.raises(UserError, match=r"^label_noise: training item 0 of .* no integer "
                                        r"class label"):
        Task(cfg)
    for bad in ("1", "-0.1", "nan", "x"):
        try:
            code = main(["train", "--backend", "local", "--label-noise", bad])
        except SystemExit as stop:  # argparse's own exit, for what is no number at all
            code = stop.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sampa-ray: "), (bad, lines)
        assert "label_noise" in lines[0] or "label-noise" in lines[0], (bad, lines)


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()
