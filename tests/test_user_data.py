"""What a user's own data meets: a dataset function that draws from the global generators gives
the same data in every process; data that differs between processes anyway is refused in one
line; labels out of range are found up front where they are tensors, and met later (a lazily
read dataset) they end the run in one line with the folder resumable; what was inferred from
the labels is said."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import local_final
from torch.utils.data import Dataset, TensorDataset

from sampa_ray.api import config_of
from sampa_ray.data.batches import BatchSchedule, seeded_globals
from sampa_ray.data.sources import LoaderData, check_same_data, fingerprint
from sampa_ray.errors import UserError
from sampa_ray.preflight import check_before_start

N, TRAIN, BATCH = 256, 192, 32
RUN = {"batch_size": BATCH, "threads": 1, "steps": 8, "lr": 0.05, "backend": "ray"}


def mlp(num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, num_classes))


def _blobs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(N) % 3
    return torch.randn(N, 4, generator=g) + y[:, None].float(), y


def _split(x: torch.Tensor, y: torch.Tensor) -> tuple[TensorDataset, TensorDataset]:
    return TensorDataset(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:])


def shuffled() -> tuple[TensorDataset, TensorDataset]:
    """A split drawn from numpy's, torch's and Python's global generators (as
    ``train_test_split`` without ``random_state`` draws it)."""
    x, y = _blobs()
    perm = torch.from_numpy(np.random.permutation(N))[torch.randperm(N)]
    perm = perm[random.sample(range(N), N)]
    return _split(x[perm], y[perm])


def by_process() -> tuple[TensorDataset, TensorDataset]:
    """A split that differs in every process."""
    x, y = _blobs()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(os.getpid()))
    return _split(x[perm], y[perm])


class Lazy(Dataset):
    """Items read one by one (so not checked whole up front); sample ``bad``'s label is 7."""

    num_classes = 3
    bad: int | None = None

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], torch.tensor(7) if i == self.bad else self.y[i]


def lazy() -> tuple[Lazy, TensorDataset]:
    x, y = _blobs()
    return Lazy(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:])


def labels(train_y: list[int], test_y: list[int]) -> Any:
    def load() -> tuple[TensorDataset, TensorDataset]:
        x = torch.randn(len(train_y) + len(test_y), 4)
        return (TensorDataset(x[:len(train_y)], torch.tensor(train_y)),
                TensorDataset(x[len(train_y):], torch.tensor(test_y)))
    return load


def _data(dataset: Any, **fields: Any) -> LoaderData:
    return LoaderData(config_of({"batch_size": 4, **fields}, model=mlp, data=dataset))


# -- the same data in every process -----------------------------------------------------------
def _states() -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_the_dataset_function_draws_from_seeded_generators_and_leaves_the_callers() -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = _states()
    a = _data(shuffled)
    after = _states()  # the caller's generators are where they were
    assert torch.equal(after[0], before[0]) and np.array_equal(after[1], before[1]) \
        and after[2] == before[2]
    np.random.rand(5)
    torch.rand(5)
    b = _data(shuffled)  # other states of the globals: the same data all the same
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert a.fingerprint == b.fingerprint
    assert not torch.equal(a.train.tensors[1], _blobs()[1][:TRAIN])  # it did shuffle
    assert _data(shuffled, seed=1).fingerprint != a.fingerprint  # another seed, another split
    with seeded_globals(5):
        inside = torch.rand(2)
    with seeded_globals(5):
        assert torch.equal(torch.rand(2), inside)


def test_fingerprints_tell_data_apart_and_one_line_names_who_differs() -> None:
    x, y = _blobs()
    assert fingerprint(x, y) == fingerprint(x.clone(), y.clone())
    y2 = y.clone()
    y2[17] += 1
    assert fingerprint(x, y2) != fingerprint(x, y)
    assert fingerprint(x, y) != fingerprint(x.double(), y)  # the type counts, not only values
    assert _data(lazy).fingerprint == _data(lazy).fingerprint  # read item by item
    check_same_data({"perturbed": "ab", "extrapolated": "ab"}, "my:load")
    with pytest.raises(UserError) as info:
        check_same_data({"perturbed": "ab", "extrapolated": "cd"}, "my:load")
    msg = str(info.value)
    assert msg.startswith("dataset: my:load gave different data in different processes "
                          "(perturbed differ from extrapolated)") and "\n" not in msg


@pytest.fixture(scope="module")
def ray_up(ray_local: None) -> None:
    return None


def test_a_shuffling_dataset_trains_on_ray_as_in_one_process(ray_up: None,
                                                             tmp_path: Path) -> None:
    from sampa_ray.ray import run_ray

    cfg = config_of(RUN, model=mlp, data=shuffled)
    run_ray(cfg, tmp_path / "ray")
    want = local_final(cfg.model_copy(update={"backend": "local"}), tmp_path / "local")
    assert torch.equal(torch.load(tmp_path / "ray" / "final.pt", weights_only=True)["x"],
                       want["x"])


def test_data_that_differs_between_processes_is_one_line(ray_up: None, tmp_path: Path) -> None:
    from sampa_ray.ray import run_ray

    with pytest.raises(UserError) as info:
        run_ray(config_of(RUN, model=mlp, data=by_process), tmp_path / "run")
    assert str(info.value).startswith("dataset: test_user_data:by_process gave different data "
                                      "in different processes (")
    assert not (tmp_path / "run" / "result.json").exists()


# -- labels -----------------------------------------------------------------------------------
def _first_in_batch(k: int) -> int:
    """A training sample that batch ``k`` reads and no earlier batch does."""
    s = BatchSchedule(TRAIN, BATCH, 0)
    seen = {int(i) for j in range(k) for i in s.indices(j)}
    return next(int(i) for i in s.indices(k) if int(i) not in seen)


def test_a_bad_label_met_late_is_one_line_and_the_run_resumes(ray_up: None,
                                                              tmp_path: Path) -> None:
    """Batch 4 holds a label out of range; SAMPa's extrapolated worker reads it at update 3,
    after the checkpoint at update 2. The run ends there in one line naming the batch; with
    the data mended, ``resume`` ends bitwise where the clean run ends."""
    from sampa_ray.ray import run_ray

    fields = {**RUN, "checkpoint_every": 2}
    cfg = config_of(fields, model=mlp, data=lazy)
    out = tmp_path / "run"
    Lazy.bad = _first_in_batch(4)
    try:
        with pytest.raises(UserError) as info:
            run_ray(cfg, out)
    finally:
        Lazy.bad = None
    assert str(info.value) == (
        "dataset: batch 4 of test_user_data:lazy through model test_user_data:mlp and the loss "
        "failed: IndexError: Target 7 is out of bounds. (labels must be class indices from 0 "
        "to num_classes - 1 = 2)")
    assert not (out / "result.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["ckpt-00000002.pt"]
    run_ray(config_of({**fields, "resume": str(out)}, model=mlp, data=lazy), out)
    clean = local_final(cfg.model_copy(update={"backend": "local"}), tmp_path / "clean")
    assert torch.equal(torch.load(out / "final.pt", weights_only=True)["x"], clean["x"])


@pytest.mark.parametrize("train_y,test_y,message", [
    ([0, 1, 2, 1], [0, 5], "dataset: test label 5 (sample 1 of 2) of {} is not a class index "
                           "from 0 to 2 (num_classes 3); 1 such labels"),
    ([0, 1, -1, 1], [0, 1], "dataset: training label -1 (sample 2 of 4) of {} is not a class "
                            "index from 0 to 1 (num_classes 2); 1 such labels"),
])
def test_labels_held_in_tensors_are_checked_whole_before_the_start(
        train_y: list[int], test_y: list[int], message: str) -> None:
    load = labels(train_y, test_y)
    cfg = config_of({"batch_size": 2, "backend": "ray"}, model=mlp, data=load)
    with pytest.raises(UserError) as info:
        check_before_start(cfg)
    assert str(info.value) == message.format(cfg.dataset)


def test_what_the_labels_tell_is_said() -> None:
    stray = labels([0, 1, 1, 0, 7, 1], [0, 1])
    data = _data(stray)
    assert data.num_classes == 8
    name = data.name
    assert data.notes == [
        f"dataset: {name}: labels {{0, 1, 7}}: 8 classes (from the largest label; set "
        "num_classes to say otherwise)",
        f"dataset: {name}: 5 of 8 classes have no training sample (2, 3, 4, 5, 6)"]
    lines = check_before_start(config_of({"batch_size": 2, "backend": "local"}, model=mlp,
                                         data=stray))
    assert lines[:2] == data.notes
    assert _data(labels([0, 1, 2, 2], [0, 1])).notes == [
        f"dataset: {_data(labels([0, 1, 2, 2], [0, 1])).name}: labels {{0, 1, 2}}: 3 classes "
        "(from the largest label; set num_classes to say otherwise)"]
    assert _data(stray, num_classes=8).notes[0].endswith("5 of 8 classes have no training "
                                                         "sample (2, 3, 4, 5, 6)")


# -- a run trained on a script's own functions reloads anywhere --------------------------------
SCRIPT = '''
import functools, sys
import torch
from torch.utils.data import TensorDataset
import sampa_ray

def mlp(num_classes, hidden=16):
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, num_classes))

def blobs(n):
    def load():
        g = torch.Generator().manual_seed(1)
        y = torch.arange(n) % 3
        x = torch.randn(n, 4, generator=g) + y[:, None].float()
        return TensorDataset(x[:n // 2], y[:n // 2]), TensorDataset(x[n // 2:], y[n // 2:])
    return load

def ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

parts = {
    "functions": dict(model=mlp, data=blobs(128), loss=ce),
    "lambdas": dict(model=lambda num_classes: mlp(num_classes, 8), dataset=blobs(128),
                    loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])),
    "partials": dict(model=functools.partial(mlp, hidden=12), data=functools.partial(blobs(96)),
                     loss=functools.partial(ce)),
}
for name, given in parts.items():
    r = sampa_ray.fit({"steps": 4, "batch_size": 16, "backend": "local", "threads": 1},
                      out=f"{sys.argv[1]}/{name}", **given)
    print(name, r.config.model, r.config.dataset, r.config.loss)
'''

RELOAD = '''
import sys, torch, sampa_ray
for name, hidden in (("functions", 16), ("lambdas", 8), ("partials", 12)):
    r = sampa_ray.load(f"{sys.argv[1]}/{name}")
    net = r.model()
    x = torch.load(f"{sys.argv[1]}/{name}/final.pt", weights_only=True)["x"]
    assert net[0].out_features == hidden, (name, net)
    assert torch.equal(torch.cat([p.detach().flatten() for p in net.parameters()]), x), name
    print(name, "ok")
'''


def test_a_run_on_a_scripts_own_functions_reloads_in_another_process(tmp_path: Path) -> None:
    from conftest import cli_env

    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "reload.py").write_text(RELOAD)
    trained = subprocess.run([sys.executable, "train.py", str(tmp_path / "runs")], cwd=tmp_path,
                             env=cli_env(), capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    names = {line.split()[0]: line.split()[1:] for line in trained.stdout.splitlines()}
    assert names["functions"] == ["__main__:mlp", "__main__:blobs.locals.load_" +
                                  names["functions"][1].rsplit("_", 1)[1], "__main__:ce"]
    assert names["lambdas"][0].startswith("__main__:lambda_")
    assert names["lambdas"][2].startswith("__main__:lambda_")
    assert names["lambdas"][0] != names["lambdas"][2]  # two lambdas, two names
    assert names["partials"][0].startswith("__main__:mlp_partial_")
    for name in names:
        assert (tmp_path / "runs" / name / "parts.pkl").is_file()
    again = subprocess.run([sys.executable, "reload.py", str(tmp_path / "runs")],
                           cwd=tmp_path / "elsewhere", env=cli_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["functions", "ok", "lambdas", "ok", "partials", "ok"]
