"""The paper's recipe end to end: the presets, a run of it on synthetic CIFAR-shaped data and
what result.json records, the per-epoch cosine, model selection on the validation split, the
perturbed worker's BatchNorm statistics, the config's checks, and one short Ray run bit for bit
against a local one."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import num_batches_tracked, same_tensors

from sampa_ray.algorithms import AlgoState, SAMPa
from sampa_ray.cli import main
from sampa_ray.config import LATER_FIELDS, RUNTIME_FIELDS, make_config
from sampa_ray.engine import GradientEngine, build_replica
from sampa_ray.errors import UserError
from sampa_ray.events import RoundEvent
from sampa_ray.flat import FlatParams, flat_buffers
from sampa_ray.local import LocalExecutor, run_local
from sampa_ray.recipes import PAPER
from sampa_ray.selection import selected_epoch

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet56", "wrn28_10", "wrn28_2", "vgg19_bn")


def _load(path: Path, name: str = "final.pt") -> dict[str, Any]:
    return torch.load(path / name, map_location="cpu", weights_only=True)


def _small(**over: Any) -> Any:
    """A small local SAMPa run of the cnn on the digits."""
    return make_config({"algo": "sampa", "model": "cnn", "dataset": "digits", "batch_size": 64,
                        "backend": "local", "threads": 1, "device": "cpu", **over})


# -- the presets --------------------------------------------------------------------------------
def test_each_preset_is_the_recipe_with_its_model_and_dataset() -> None:
    files = sorted((REPO / "configs").glob("paper-*.yaml"))
    want = {f"paper-{m}-{d}.yaml" for m in MODELS for d in ("cifar10", "cifar100")}
    assert {f.name for f in files} == want
    for f in files:
        data = yaml.safe_load(f.read_text())
        assert data == {**PAPER, "model": data["model"], "dataset": data["dataset"]}, f.name
        assert f.name == f"paper-{data['model']}-{data['dataset']}.yaml"
        cfg = make_config({**data, "data_dir": "/nowhere"})  # every field validates
        assert cfg.model_dump()["label_smoothing_mode"] == "official"
    # the recipe is the official defaults (train.py's argparse and the README's command)
    assert {k: PAPER[k] for k in ("model", "dataset", "batch_size", "lr", "rho", "lam", "seed",
                                  "momentum", "weight_decay", "epochs")} == {
        "model": "resnet56", "dataset": "cifar10", "batch_size": 128, "lr": 0.1, "rho": 0.1,
        "lam": 0.2, "seed": 42, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 200}


def test_no_recipe_field_is_a_runtime_field_and_each_changes_the_hash() -> None:
    base = make_config({})
    changed = {"lr_schedule": "cosine-epoch", "label_smoothing_mode": "official",
               "val_split": 0.1, "last_batch": "keep", "cutout_p": 0.5, "pad_fill": "black",
               "bn_stats": "perturbed"}
    for name, value in changed.items():
        assert name not in RUNTIME_FIELDS
        assert getattr(base, name) != value  # the default is today's behaviour
        assert make_config({name: value}).hash() != base.hash(), name
    # at their defaults they leave the hash as it was before they existed: older checkpoints
    # stay resumable
    before = {k: v for k, v in base.model_dump(exclude=RUNTIME_FIELDS).items()
              if k not in LATER_FIELDS}
    assert set(changed) - {"lr_schedule"} <= set(LATER_FIELDS)
    assert base.hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()
                                         ).hexdigest()[:16]


# -- the recipe runs, and result.json records it ------------------------------------------------
@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("paper") / "run"
    torch.set_num_threads(1)
    code = main(["train", "--recipe", "paper", "--dataset", "synthetic", "--synthetic-size",
                 "64", "--batch-size", "16", "--epochs", "3", "--backend", "local",
                 "--threads", "1", "--device", "cpu", "--out", str(out)])
    assert code == 0
    return json.loads((out / "result.json").read_text()), out


def test_the_recipe_runs_and_result_json_records_every_recipe_field(recipe_run) -> None:
    result, out = recipe_run
    cfg = result["config"]
    over = {"dataset": "synthetic", "batch_size": 16, "epochs": 3}
    for name, value in PAPER.items():
        assert cfg[name] == over.get(name, value), name
    assert cfg["model"] == "resnet56" and result["algorithm"]["bn_stats_role"] == "perturbed"
    # 64 samples: floor(6.4) = 6 validate, 58 train in 4 batches, the last of 10 (kept)
    assert result["batches_per_epoch"] == 4 and result["steps"] == 12
    assert result["gradient_rounds"] == 13  # the bootstrap round, then one per update
    rows = result["epochs"]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and 0.0 <= r["test_accuracy"] <= 1.0
    best = selected_epoch(rows, by_validation=True)
    assert best is not None
    assert result["final_test_accuracy"] == best["test_accuracy"]
    assert result["selection"]["step"] == best["step"] and result["selection"]["best_pt"]
    assert {"final.pt", "best.pt", "result.json"} <= {p.name for p in out.iterdir()}


def test_the_lr_follows_the_per_epoch_cosine(recipe_run) -> None:
    """torch's CosineAnnealingLR(T_max=epochs), stepped once after each epoch, gives the rate of
    every update of that epoch."""
    result, _ = recipe_run
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    per_epoch = []
    for _ in range(3):
        per_epoch.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert per_epoch[0] == 0.1 and per_epoch[1] == pytest.approx(0.075, abs=1e-15)
    assert [r["lr"] for r in result["epochs"]] == pytest.approx(per_epoch, abs=1e-12)
    cfg = make_config({**result["config"]})
    for step in range(12):
        assert cfg.lr_at(step, 12, 4) == pytest.approx(per_epoch[step // 4], abs=1e-12)
    # with steps set, the epochs the run spans: 10 updates of 4 are 3 epochs
    assert cfg.lr_at(9, 10, 4) == pytest.approx(per_epoch[2], abs=1e-12)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        cfg.lr_at(0, 12)


def test_every_update_uses_its_epochs_rate(tmp_path: Path) -> None:
    cfg = _small(lr=0.2, lr_schedule="cosine-epoch", steps=12, batch_size=256)  # 5 a epoch
    events: list[Any] = []
    run_local(cfg, tmp_path, progress=events.append)
    lrs = [e.lr for e in events if isinstance(e, RoundEvent)]  # the update each round made
    want = [0.2 * (1 + math.cos(math.pi * (s // 5) / 3)) / 2 for s in range(12)]
    assert lrs[1:] == pytest.approx(want, abs=1e-12)  # round 0 is the bootstrap


# -- model selection ----------------------------------------------------------------------------
def test_selection_takes_the_first_best_validation_epoch() -> None:
    rows = [{"step": s, "val_accuracy": v, "test_accuracy": t}
            for s, v, t in [(1, 0.5, 0.4), (2, 0.7, 0.6), (3, 0.7, 0.9), (4, 0.6, 0.95),
                            (5, None, None)]]
    assert selected_epoch(rows, by_validation=True)["step"] == 2  # acc > best_acc: the first
    assert selected_epoch(rows, by_validation=False)["step"] == 4  # the last evaluated


class _LastEvalAtStart(LocalExecutor):
    """Evaluates the run's initial parameters at the last epoch instead of the last ones: a
    last epoch that is certainly not the best on validation."""

    total = 0

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.x0 = self.engines[0].initial_point()  # before any pass loads another point

    async def start_eval(self, step: int, state: AlgoState) -> None:
        if step == self.total:
            self.stats.start_eval(step, self.x0)
        else:
            await super().start_eval(step, state)


def test_the_reported_test_accuracy_is_the_best_validation_epochs(tmp_path: Path,
                                                                 monkeypatch) -> None:
    cfg = _small(val_split=0.2, epochs=3)  # 1149 train / 288 validate, 17 batches an epoch
    _LastEvalAtStart.total = 3 * 17
    monkeypatch.setattr("sampa_ray.local.LocalExecutor", _LastEvalAtStart)
    result = run_local(cfg, tmp_path)
    rows = result["epochs"]
    vals = [r["val_accuracy"] for r in rows]
    best = max(range(3), key=lambda i: (vals[i], -i))
    assert best != 2 and vals[2] < 0.3 < vals[best]  # the last is the untrained model
    assert result["final_test_accuracy"] == rows[best]["test_accuracy"]
    assert result["selection"] == {"by": "validation", "epoch": rows[best]["epoch"],
                                   "step": rows[best]["step"], "val_accuracy": vals[best],
                                   "test_accuracy": rows[best]["test_accuracy"],
                                   "last_test_accuracy": rows[2]["test_accuracy"],
                                   "best_pt": True}
    # best.pt holds that epoch's parameters and statistics: evaluating it gives its numbers
    saved = _load(tmp_path, "best.pt")
    assert saved["step"] == rows[best]["step"]
    engine = GradientEngine(cfg)
    engine.load_buffers(saved["buffers"])
    assert engine.evaluate(saved["x"], "test").accuracy == rows[best]["test_accuracy"]
    assert engine.evaluate(saved["x"], "val").accuracy == vals[best]
    assert not torch.equal(saved["x"], _load(tmp_path)["x"])  # final.pt: where the run ended


def test_a_plain_run_reports_its_argmax_validation_epoch(tmp_path: Path) -> None:
    result = run_local(_small(val_split=0.2, epochs=4, batch_size=128), tmp_path)
    rows = result["epochs"]
    vals = [r["val_accuracy"] for r in rows]
    best = vals.index(max(vals))
    assert result["final_test_accuracy"] == rows[best]["test_accuracy"]
    assert result["selection"]["step"] == rows[best]["step"]
    assert _load(tmp_path, "best.pt")["step"] == rows[best]["step"]


def test_without_a_split_nothing_changes(tmp_path: Path) -> None:
    result = run_local(_small(steps=5), tmp_path)
    assert "selection" not in result and not (tmp_path / "best.pt").exists()
    assert "val_accuracy" not in result["epochs"][-1]
    assert result["final_test_accuracy"] == result["epochs"][-1]["test_accuracy"]


# -- BatchNorm statistics of the perturbed worker -----------------------------------------------
def test_perturbed_statistics_are_those_of_the_perturbed_passes(tmp_path: Path) -> None:
    """With bn_stats perturbed the perturbed passes update their worker's running statistics,
    and final.pt and evaluation use them; the trajectory is the same. Checked against a replay:
    a fresh replica that runs forward, in training mode, exactly the perturbed passes."""
    steps = 6
    cfg = _small(steps=steps, bn_stats="perturbed")
    res = run_local(cfg, tmp_path / "p")
    ref = run_local(cfg.model_copy(update={"bn_stats": "extrapolated"}), tmp_path / "e")
    fp, fe = _load(tmp_path / "p"), _load(tmp_path / "e")
    assert torch.equal(fp["x"], fe["x"])
    assert num_batches_tracked(fp["buffers"]) == {steps}
    assert num_batches_tracked(fe["buffers"]) == {steps + 1}
    assert not same_tensors(fp["buffers"], fe["buffers"])
    assert res["algorithm"]["bn_stats_role"] == "perturbed"
    assert ref["algorithm"]["bn_stats_role"] == "extrapolated"

    algo = SAMPa(lambda s: cfg.lr_at(s, steps), rho=cfg.rho, lam=cfg.lam,
                 momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    engine = GradientEngine(cfg)  # gradients only: its statistics are never updated
    replica = build_replica(cfg, engine.data.num_classes)
    flat = FlatParams(replica)
    replica.train()
    state = algo.init(engine.initial_point())
    while state.step < steps:
        grads = {}
        for req in algo.requests(state):
            if req.role == "perturbed":
                flat.load_(req.point)
                xb, _ = engine.data.batch(engine.schedule.indices(req.batch), cfg.seed,
                                          req.batch, engine.aug)
                with torch.no_grad():
                    replica(xb)
            grads[req.role] = engine.gradient(req.point, req.batch, False).grad.clone()
        algo.update(state, grads)
    assert torch.equal(state.x, fp["x"])
    assert same_tensors(flat_buffers(replica), fp["buffers"])
    # and the reported accuracy is the final point with those statistics
    check = GradientEngine(cfg)
    check.load_buffers(fp["buffers"])
    assert check.evaluate(fp["x"]).accuracy == res["final_test_accuracy"]


def test_algorithms_without_a_perturbed_role_keep_their_own_statistics(tmp_path: Path) -> None:
    ex = LocalExecutor(_small(algo="sgd", bn_stats="perturbed", steps=3))
    assert ex.algo.bn_stats_role == "grad" and ex.stats is ex.engines[0]
    sam = LocalExecutor(_small(algo="sam", bn_stats="perturbed", steps=3))
    assert sam.algo.bn_stats_role == "perturbed" and sam.stats is sam.engines[0]
    state = sam.algo.init(sam.engines[0].initial_point())
    assert all(r.track_stats for r in sam.algo.requests(state))  # ascent
    sam.algo.update(state, {"ascent": torch.zeros_like(state.x)})
    assert all(r.track_stats for r in sam.algo.requests(state))  # perturbed, now tracked too
    with pytest.raises(ValueError, match="bn_stats"):
        sam.algo.keep_stats_of("extrapolated")


# -- the config's checks ------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("lr_schedule", "cosine-step"), ("label_smoothing_mode", "paper"), ("val_split", 1.0),
    ("val_split", -0.1), ("last_batch", "maybe"), ("cutout_p", 1.5), ("cutout_p", True),
    ("pad_fill", "white"), ("bn_stats", "trajectory"), ("val_split", "0.1")])
def test_bad_recipe_values_are_one_line_errors(tmp_path, capsys, field: str, value) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({field: value}))
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and field in err, err
    assert "Traceback" not in err


def test_bad_recipe_name_and_a_split_too_small_are_one_line_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--recipe", "official", "--out", str(tmp_path / "a")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "recipe" in err
    code = main(["train", "--backend", "local", "--dataset", "synthetic", "--synthetic-size",
                 "64", "--val-split", "0.01", "--steps", "1", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "val_split" in err, err
    with pytest.raises(UserError, match="val_split"):
        GradientEngine(_small(val_split=0.0001))


# -- one short Ray run --------------------------------------------------------------------------
@pytest.mark.usefixtures("ray_local")
def test_the_recipe_on_ray_matches_local_bitwise(tmp_path: Path) -> None:
    """The recipe's fields (perturbed statistics, split and selection, kept last batch,
    per-epoch cosine, official smoothing) on the replicated and the points data path: the same
    parameters, statistics, best.pt and accuracies as a local run, bit for bit."""
    from sampa_ray.ray import run_ray_many

    base = {**PAPER, "model": "cnn", "dataset": "synthetic", "synthetic_size": 200,
            "batch_size": 32, "epochs": 2, "threads": 1, "device": "cpu", "backend": "ray"}
    cfgs = [make_config({**base, "data_path": p}) for p in ("replicated", "points")]
    remote = run_ray_many([(c, tmp_path / f"ray-{c.data_path}") for c in cfgs])
    local = run_local(cfgs[0], tmp_path / "local")
    assert local["batches_per_epoch"] == 6  # 180 training samples, the last batch of 20 kept
    a, best_a = _load(tmp_path / "local"), _load(tmp_path / "local", "best.pt")
    for cfg, r in zip(cfgs, remote, strict=True):
        out = tmp_path / f"ray-{cfg.data_path}"
        b, best_b = _load(out), _load(out, "best.pt")
        assert torch.equal(a["x"], b["x"]) and same_tensors(a["buffers"], b["buffers"])
        assert best_a["step"] == best_b["step"] and torch.equal(best_a["x"], best_b["x"])
        assert same_tensors(best_a["buffers"], best_b["buffers"])
        assert r["selection"] == local["selection"]
        assert [(e["val_accuracy"], e["test_accuracy"], e["lr"]) for e in r["epochs"]] == \
            [(e["val_accuracy"], e["test_accuracy"], e["lr"]) for e in local["epochs"]]
    assert num_batches_tracked(a["buffers"]) == {12}  # the perturbed worker's: one pass per update
