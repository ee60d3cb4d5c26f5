"""One source of truth: each config field declares what it is (``settings.setting``), and the
hash, ``--resume``'s rules, the shared-workers check and the CLI's flags follow from it; an
algorithm owns its hyperparameters (``Params``), given as ``algo_args`` (``--algo-arg``), as
YAML or through ``fit()``, from a file outside the package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from conftest import cli_cmd, cli_env

import sampa_ray
from sampa_ray.cli import add_config_flags, config_flags, flag_help, main
from sampa_ray.config import LATER_FIELDS, RUNTIME_FIELDS, WORKER_FIELDS, TrainConfig, make_config
from sampa_ray.errors import UserError
from sampa_ray.ray import run_ray_many
from sampa_ray.settings import check_shared_workers, fields_where, setting

HERE = Path(__file__).resolve().parent


class Extended(TrainConfig):
    """A field added in one place: its flag, its place in the hash and the workers' check
    follow."""

    warmup: Literal["none", "linear"] = setting("schedule", "none", worker=True,
                                                description="a warm-up of the learning rate")
    note: str | None = setting("outputs", None, runtime=True, description="a free note")


def test_the_name_sets_are_what_the_fields_declare() -> None:
    assert {"out", "backend", "threads", "resume", "loader_workers"} <= RUNTIME_FIELDS
    assert not {"lr", "rho", "lam", "model", "seed", "batch_size"} & RUNTIME_FIELDS
    # every field the replicas and the data are built from: the ones the old hand-written list
    # missed are here
    assert {"model_args", "dataset_args", "loss", "num_classes", "precision", "loader_workers",
            "pin_memory", "model", "dataset", "batch_size", "seed"} <= set(WORKER_FIELDS)
    assert "algo_args" in LATER_FIELDS and "lr" not in LATER_FIELDS
    # the default config keeps the hash it had before fields declared themselves
    assert TrainConfig().hash() == "321a791bc8979141"


def test_a_field_declared_once_gets_its_flag_hash_and_worker_check() -> None:
    flags = config_flags(Extended)
    assert flags["warmup"] is str and flags["note"] is str
    parser = __import__("argparse").ArgumentParser()
    add_config_flags(parser, Extended)
    args = parser.parse_args(["--warmup", "linear", "--note", "hi"])
    assert (args.warmup, args.note) == ("linear", "hi")
    with pytest.raises(SystemExit):  # the Literal's choices are the flag's
        parser.parse_args(["--warmup", "cubic"])
    assert "choose from 'none', 'linear'" in _usage_error(parser, ["--warmup", "cubic"])
    assert "(default: none)" in flag_help("warmup", Extended)
    # the hash: a trajectory field changes it, a runtime field does not
    base = Extended()
    assert Extended(warmup="linear").hash() != base.hash()
    assert Extended(note="x").hash() == base.hash()
    assert "warmup" in fields_where(Extended, "worker")
    with pytest.raises(UserError, match=r"^warmup: 'linear' here, 'none' for the workers"):
        check_shared_workers(base, Extended(warmup="linear"))
    check_shared_workers(base, Extended(note="x", lr=0.2))  # neither one is a worker field


def _usage_error(parser: object, argv: list[str]) -> str:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        parser.parse_args(argv)  # type: ignore[attr-defined]
    return err.getvalue()


@pytest.mark.parametrize("change", [{"precision": "bf16"}, {"model_args": {"hidden": 8}},
                                    {"loss": "tests_loss:fn"}])
def test_runs_on_shared_workers_that_need_other_workers_are_refused_before_the_start(
        tmp_path: Path, change: dict) -> None:
    """``compare`` and the study run several configs on one set of workers; one that differs
    in what the replicas are built from would have trained with the first one's value."""
    base = make_config({"backend": "ray", "steps": 2})
    other = base.model_copy(update=change)
    with pytest.raises(UserError) as info:
        run_ray_many([(base, tmp_path / "a"), (other, tmp_path / "b")])
    field = next(iter(change))
    assert str(info.value).startswith(f"{field}: ") and "workers this run shares" in \
        str(info.value)
    assert not (tmp_path / "a").exists()  # refused before anything ran


def test_help_groups_flags_and_shows_choices() -> None:
    out = subprocess.run(cli_cmd("train", "--help"), env=cli_env(), capture_output=True,
                         text=True, timeout=60).stdout
    for group in ("algorithm options:", "optimizer options:", "placement options:",
                  "outputs options:"):
        assert group in out
    assert "--backend {local,ray}" in out
    assert "--lr-schedule {constant,cosine,cosine-epoch}" in out
    assert "--data-path {auto,points,replicated,collective,free}" in out


def test_algorithm_parameters_are_validated_by_its_params() -> None:
    assert make_config({"algo_args": {"lam": 0.5}}).lam == 0.5  # the field of its own
    assert make_config({"algo_args": {"rho": 0.1}}).hash() == make_config({"rho": 0.1}).hash()
    for fields, line in [
        ({"algo_args": {"k": 3}}, "config: algo_args.k: not a parameter of sampa (its "
                                  "parameters: rho, lam, adaptive)"),
        ({"algo": "sgd", "algo_args": {"k": 3}}, "config: algo_args.k: not a parameter of sgd "
                                                 "(its parameters: none)"),
        ({"rho": 0.1, "algo_args": {"rho": 0.2}}, "config: algo_args.rho: 0.2 here and 0.1 as "
                                                  "rho; give it once"),
    ]:
        with pytest.raises(UserError) as info:
            make_config(fields)
        assert str(info.value) == line


# -- an algorithm with its own parameter, from a file outside the package ---------------------
PLUGIN = '''
import torch
from pydantic import BaseModel, ConfigDict, Field
from sampa_ray.algorithms import SGD


class EveryKth(SGD):
    """SGD whose learning rate is multiplied by ``boost`` on every ``k``-th update."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        k: int = Field(2, ge=1)
        boost: float = Field(1.0, gt=0)

    def __init__(self, lr, k=2, boost=1.0, momentum=0.0, weight_decay=0.0, optimizer="sgd",
                 beta1=0.9, beta2=0.999, eps=1e-8):
        schedule = lr if callable(lr) else (lambda step: lr)
        super().__init__(lambda s: schedule(s) * (boost if (s + 1) % k == 0 else 1.0),
                         momentum, weight_decay, optimizer, beta1, beta2, eps)
        self.k, self.boost = k, boost

    def config(self):
        return {**super().config(), "k": self.k, "boost": self.boost}
'''


def test_an_algorithm_with_its_own_parameter_runs_from_cli_yaml_and_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI runs in this process (``main``), from the folder the user's module is in."""
    (tmp_path / "everyk.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    common = ["--backend", "local", "--steps", "6", "--threads", "1", "--batch-size", "32"]
    assert main(["train", "--algo", "everyk:EveryKth", "--algo-arg", "k=3", "--algo-arg",
                 "boost=4", *common, "--out", "flags"]) == 0
    (tmp_path / "run.yaml").write_text("algo: everyk:EveryKth\nalgo_args: {k: 3, boost: 4.0}\n")
    assert main(["train", "--config", "run.yaml", *common, "--out", "yaml"]) == 0
    capsys.readouterr()
    bad = subprocess.run(cli_cmd("train", "--algo", "everyk:EveryKth", "--algo-arg", "k=0",
                                 *common, "--out", "bad"), cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("sampa-ray: config: algo_args.k: Input should be greater than "
                                  "or equal to 1")
    assert not (tmp_path / "bad").exists()
    sys.path.insert(0, str(tmp_path))
    try:
        import everyk

        api = sampa_ray.fit({"algo_args": {"k": 3, "boost": 4.0}, "backend": "local",
                             "steps": 6, "threads": 1, "batch_size": 32}, algo=everyk.EveryKth,
                            out=tmp_path / "api")
        sampa_ray.fit({"algo": "sgd", "momentum": 0.9, "backend": "local", "steps": 6,
                       "threads": 1, "batch_size": 32}, out=tmp_path / "plain")
    finally:
        sys.path.remove(str(tmp_path))
    results = {n: json.loads((tmp_path / n / "result.json").read_text())
               for n in ("flags", "yaml")}
    assert results["flags"]["config"]["algo_args"] == {"k": 3, "boost": 4.0}
    assert results["flags"]["config_hash"] == results["yaml"]["config_hash"]
    assert results["flags"]["algorithm"]["k"] == 3 and results["flags"]["algorithm"]["boost"] == 4
    x = {n: torch.load(tmp_path / n / "final.pt", weights_only=True)["x"]
         for n in ("flags", "yaml", "api", "plain")}
    assert torch.equal(x["flags"], x["yaml"]) and torch.equal(x["flags"], x["api"])
    assert not torch.equal(x["flags"], x["plain"])  # the boost really applied
    assert api.config.algo.endswith(":EveryKth")
