"""The command line end to end: training to a good accuracy, one-line user errors with exit code
2, never losing an earlier run, YAML plus flags, and ``compare``."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_same_final, cli_cmd, cli_env, local_final

from sampa_ray.algorithms import BUILTIN

ALGOS = BUILTIN
EPOCHS = 3
PER_EPOCH = 1437 // 64  # default batch size 64
PNG = b"\x89PNG\r\n\x1a\n"
COMMON = ["--backend", "local", "--threads", "1", "--device", "cpu"]


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_cmd(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str, Path]]:
    """One default-hyperparameter run per algorithm, started side by side."""
    root = tmp_path_factory.mktemp("cli-train")
    procs = {}
    for algo in ALGOS:
        out = root / algo
        procs[algo] = (
            subprocess.Popen(
                cli_cmd("train", "--algo", algo, "--epochs", str(EPOCHS), "--out", str(out),
                        *COMMON),
                cwd=root,
                env=cli_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            out,
        )
    done = {}
    for algo, (p, out) in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        done[algo] = (p.returncode, stdout, stderr, out)
    return done


@pytest.mark.outcome
@pytest.mark.parametrize("algo", ALGOS)
def test_train_reaches_good_accuracy(algo: str, trained: dict, outcome: Callable) -> None:
    rc, stdout, stderr, out = trained[algo]
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    res = _result(out)
    assert res["config"]["algo"] == algo
    assert res["steps"] == EPOCHS * PER_EPOCH
    rounds = {"sgd": 1, "sam": 2, "sampa": 1}[algo] * res["steps"] + (algo == "sampa")
    assert res["gradient_rounds"] == rounds
    assert len(res["epochs"]) == EPOCHS
    assert all(r["test_accuracy"] is not None for r in res["epochs"])
    outcome("final test accuracy", res["final_test_accuracy"], ">", 0.85)
    assert (out / "final.pt").is_file()
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert f"{algo}: test accuracy" in stdout
    assert str(out) in " ".join(stdout.split())


# -- user errors ------------------------------------------------------------------------------
BAD = [
    ("negative-lr", ["--lr", "-0.1"], "lr"),
    ("lam-1.5", ["--lam", "1.5"], "lam"),
    ("momentum-1", ["--momentum", "1"], "momentum"),
    ("rho-negative", ["--rho", "-1"], "rho"),
    ("weight-decay-nan", ["--weight-decay", "nan"], "weight_decay"),
    ("epochs-0", ["--epochs", "0"], "epochs"),
    ("threads-0", ["--threads", "0"], "threads"),
    ("unknown-algo", ["--algo", "adam"], "algo"),
    ("unknown-model", ["--model", "lenet"], "model"),
    ("unknown-flag", ["--bogus-flag", "3"], "--bogus-flag"),
    ("non-numeric-lr", ["--lr", "fast"], "lr"),
    ("cifar10-without-data-dir", ["--dataset", "cifar10"], "data_dir"),
    ("cifar10-empty-data-dir", ["--dataset", "cifar10", "--data-dir", "{empty}"], "{empty}"),
    ("model-dataset-mismatch", ["--model", "resnet20"], "model"),
    ("missing-config", ["--config", "{missing}"], "config"),
    ("invalid-yaml", ["--config", "{invalid}"], "config"),
    ("unknown-config-key", ["--config", "{unknown}"], "colour"),
    ("yaml-list", ["--config", "{listy}"], "config"),
    ("unknown-wire-dtype", ["--wire-dtype", "fp16"], "wire_dtype"),
    ("batch-larger-than-dataset", ["--batch-size", "5000"], "batch_size"),
    ("out-is-a-file", ["--out", "{file}"], "out"),
    # more than two devices
    ("workers-per-role-0", ["--backend", "ray", "--workers-per-role", "0"], "workers_per_role"),
    ("role-groups-on-local", ["--workers-per-role", "2"], "workers_per_role"),
    ("data-parallel-sampa", ["--backend", "ray", "--data-parallel"], "data_parallel"),
    ("role-groups-over-grpc", ["--backend", "ray", "--transport", "grpc",
                               "--workers-per-role", "2"], "workers_per_role"),
    ("batch-smaller-than-a-group", ["--backend", "ray", "--workers-per-role", "4",
                                    "--batch-size", "3"], "batch_size"),
    ("sync-bn-not-a-boolean", ["--sync-bn", "maybe"], "--sync-bn"),
]


def _paths(tmp: Path) -> dict[str, str]:
    (tmp / "empty").mkdir()
    (tmp / "invalid.yaml").write_text("lr: [0.1\nalgo: sam\n")
    (tmp / "unknown.yaml").write_text("lr: 0.1\ncolour: blue\n")
    (tmp / "listy.yaml").write_text("- lr\n- 0.1\n")
    (tmp / "a-file").write_text("keep me\n")
    return _paths_of(tmp)


def _paths_of(tmp: Path) -> dict[str, str]:
    return {
        "empty": str(tmp / "empty"),
        "missing": str(tmp / "nope.yaml"),
        "invalid": str(tmp / "invalid.yaml"),
        "unknown": str(tmp / "unknown.yaml"),
        "listy": str(tmp / "listy.yaml"),
        "file": str(tmp / "a-file"),
    }


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], field: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, repr(proc.stderr)
    line = lines[0]
    assert line.startswith("sampa-ray:"), line
    # the field, or its flag (a Literal's choices are the flag's: argparse names the flag)
    assert field in line or f"--{field.replace('_', '-')}:" in line, line
    return line


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every BAD case's command, each in its own folder, two at a time: a refused command is
    mostly the interpreter importing (one core each), and this machine has two."""

    def one(case: tuple[str, list[str], str]) -> tuple[str, tuple[Path, Any]]:
        name, args, _ = case
        tmp = tmp_path_factory.mktemp(name)
        paths = _paths(tmp)
        args = [a.format(**paths) for a in args]
        out = [] if "--out" in args else ["--out", str(tmp / "out")]
        return name, (tmp, cli("train", *COMMON, *out, *args, cwd=tmp))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, BAD))


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(case: tuple[str, list[str], str],
                                          bad_runs: dict) -> None:
    name, _, field = case
    tmp_path, proc = bad_runs[name]
    _assert_one_line_error(proc, field.format(**_paths_of(tmp_path)))
    # nothing was trained or written
    assert not (tmp_path / "out" / "result.json").exists()
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / "a-file").read_text() == "keep me\n"


def test_every_config_field_has_a_flag() -> None:
    from sampa_ray.cli import CONFIG_FLAGS, MAPPING_FLAGS
    from sampa_ray.config import TrainConfig

    # resume has its own flag (an optional value: the --out folder by default); a mapping is
    # given one KEY=VALUE at a time (--model-arg, --dataset-arg)
    assert set(TrainConfig.model_fields) - set(CONFIG_FLAGS) == {
        "resume", *MAPPING_FLAGS.values()}
    assert set(CONFIG_FLAGS) <= set(TrainConfig.model_fields)


def test_compare_rejects_bad_input_too(tmp_path: Path) -> None:
    proc = cli("compare", *COMMON, "--lam", "2", "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    _assert_one_line_error(proc, "lam")
    assert not (tmp_path / "cmp" / "compare.json").exists()
    # the data-parallel baseline runs on the Ray workers
    proc = cli("compare", *COMMON, "--baseline", "ddp", "--out", str(tmp_path / "cmp"),
               cwd=tmp_path)
    _assert_one_line_error(proc, "baseline")
    assert not (tmp_path / "cmp").exists()


def test_every_failing_field_is_named_in_one_line(tmp_path: Path) -> None:
    """Three bad values at once: one line names all three, with what each must be."""
    proc = cli("train", *COMMON, "--lr", "-0.1", "--rho", "-1", "--lam", "1.5",
               "--out", str(tmp_path / "out"), cwd=tmp_path)
    line = _assert_one_line_error(proc, "lr")
    assert line == ("sampa-ray: config: lr: Input should be greater than 0, got -0.1; "
                    "rho: Input should be greater than or equal to 0, got -1.0; "
                    "lam: Input should be less than or equal to 1, got 1.5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,line", [
    ("algo: sam\nlr: 0.1\nsteps: 3\nlr: 0.2\n", "key 'lr' is given twice (lines 2 and 4)"),
    ("model: mlp\nmodel_args:\n  hidden: 32\n  depth: 2\n  hidden: 64\n",
     "key 'model_args.hidden' is given twice (lines 3 and 5)"),
    ("batch-size: 32\nseed: 1\nbatch_size: 16\n",
     "keys 'batch-size' and 'batch_size' name the same field (lines 1 and 3)"),
], ids=["top-level", "nested", "dash-and-underscore"])
def test_a_yaml_key_given_twice_is_refused(tmp_path: Path, text: str, line: str) -> None:
    """YAML keeps the last of two equal keys without a word; a config file that gives a field
    twice is refused with one line naming the key and both lines, before anything runs."""
    cfg = tmp_path / "twice.yaml"
    cfg.write_text(text)
    proc = cli("train", *COMMON, "--config", str(cfg), "--out", str(tmp_path / "out"),
               cwd=tmp_path)
    assert _assert_one_line_error(proc, "twice.yaml") == f"sampa-ray: config: {cfg}: {line}"
    assert not (tmp_path / "out").exists()


# -- nothing already written is lost ----------------------------------------------------------
def test_existing_run_is_kept_unless_overwrite(trained: dict, tmp_path: Path) -> None:
    rc, _, _, src = trained["sgd"]
    assert rc == 0
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = _snapshot(run)

    proc = cli("train", *COMMON, "--algo", "sam", "--steps", "3", "--out", str(run), cwd=tmp_path)
    line = _assert_one_line_error(proc, "out")
    assert "--overwrite" in line
    assert _snapshot(run) == before

    proc = cli(
        "train",
        *COMMON,
        "--algo",
        "sam",
        "--steps",
        "3",
        "--out",
        str(run),
        "--overwrite",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    res = _result(run)
    assert res["config"]["algo"] == "sam" and res["steps"] == 3
    assert (run / "result.json").read_bytes() != before["result.json"]


# -- YAML and flags ---------------------------------------------------------------------------
def test_yaml_config_with_flag_override(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "algo: sam\nlr: 0.2\nbatch-size: 32\nsteps: 4\nseed: 3\nmomentum: 0.5\n"
        "lr_schedule: constant\n"
    )
    out = tmp_path / "out"
    proc = cli(
        "train",
        *COMMON,
        "--config",
        str(cfg),
        "--lr",
        "0.07",
        "--steps",
        "3",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    res = _result(out)
    c = res["config"]
    assert c["lr"] == 0.07  # the flag wins
    assert c["steps"] == 3
    assert (c["algo"], c["batch_size"], c["seed"], c["momentum"]) == ("sam", 32, 3, 0.5)
    assert c["lr_schedule"] == "constant"
    assert res["steps"] == 3 and res["gradient_rounds"] == 6
    assert res["batches_per_epoch"] == 1437 // 32
    assert all(r["lr"] == 0.07 for r in res["epochs"])


# -- compare ----------------------------------------------------------------------------------
def test_compare(tmp_path: Path) -> None:
    """The built-ins, then the variants ``--algos`` adds: each one's sequential gradients per
    update as its rounds say (LookSAM k=5: SAM's round on updates 0 and 5; RST p=0.5: on the
    updates its seeded draws pick)."""
    from sampa_ray.algorithms import RST

    out = tmp_path / "cmp"
    algos = (*ALGOS, "looksam", "rst", "asam")
    proc = cli("compare", "--steps", "10", *COMMON, "--out", str(out), "--algos", *algos,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for algo in algos:
        assert algo in proc.stdout
    assert "compare.png" in proc.stdout and "compare.json" in proc.stdout
    assert (out / "compare.png").read_bytes()[:8] == PNG
    data = json.loads((out / "compare.json").read_text())
    rows = data["rows"]
    assert [r["algorithm"] for r in rows] == list(algos)
    rst = sum(RST(0.1, 0.05, p=0.5, seed=0).sam_at(t) for t in range(10))
    assert 0 < rst < 10  # the draws pick some updates, not all
    assert [r["gradient_rounds"] for r in rows] == [10, 20, 11, 12, 10 + rst, 20]
    assert [r["sequential_gradients_per_update"] for r in rows] == \
        [1.0, 2.0, 1.1, 1.2, 1 + rst / 10, 2.0]
    assert "sequential gradients / update" in proc.stdout
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["wall_time_s"] > 0 and r["seconds_per_update"] > 0
        assert r["devices"] == 1  # one process
        # per update: the critical path's compute plus the rest, the overhead
        assert 0 < r["compute_per_update_s"] < r["seconds_per_update"]
        assert r["compute_per_update_s"] + r["overhead_per_update_s"] == pytest.approx(
            r["seconds_per_update"])
    assert "compute / update" in proc.stdout and "overhead / update" in proc.stdout
    assert data["config"]["steps"] == 10
    for algo, row in zip(algos, rows, strict=True):
        res = _result(out / algo)
        assert res["config"]["algo"] == algo
        assert res["gradient_rounds"] == row["gradient_rounds"]
        assert res["final_test_accuracy"] == row["test_accuracy"]

    # a second compare into the same folder loses nothing
    before = (out / "compare.json").read_bytes()
    sub = (out / "sgd" / "result.json").read_bytes()
    proc = cli("compare", "--steps", "10", *COMMON, "--out", str(out), cwd=tmp_path)
    _assert_one_line_error(proc, "out")
    assert (out / "compare.json").read_bytes() == before
    assert (out / "sgd" / "result.json").read_bytes() == sub


# -- Ray's output, and time-based checkpoints on Ray --------------------------------------------
def test_token_notice_filter_drops_that_notice_only() -> None:
    """The filter on Ray's authentication logger drops its notice that token authentication is
    on, and nothing else: the warning that it is off still reaches the user."""
    import logging

    from sampa_ray.ray.driver import TOKEN_NOTICE_LOGGER, _quiet_token_notice

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    keep = Keep()
    logger.addHandler(keep)
    try:
        with _quiet_token_notice():
            logger.warning("Token authentication is enabled for this Ray cluster. Set "
                           "RAY_AUTH_MODE=disabled to opt out.")
            logger.warning("Token authentication is disabled for this Ray cluster.")
        logger.warning("Token authentication is enabled for this Ray cluster. (after)")
    finally:
        logger.removeHandler(keep)
    assert seen == ["Token authentication is disabled for this Ray cluster.",
                    "Token authentication is enabled for this Ray cluster. (after)"]


def test_ray_run_is_quiet_about_token_auth_and_checkpoints_on_time(tmp_path: Path) -> None:
    """A real ``train`` on an embedded Ray instance: stderr holds no notice of Ray's token
    authentication (still on), a tiny ``--checkpoint-interval-s`` has the coordinator write
    checkpoints along the way, and the run ends on bitwise the parameters of a local run
    without any."""
    from sampa_ray.checkpoint import list_checkpoints
    from sampa_ray.config import make_config

    fields = {"steps": 30, "model": "mlp", "batch_size": 32, "threads": 1, "device": "cpu"}
    flags = [a for k, v in fields.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    out = tmp_path / "ray"
    proc = cli("train", "--backend", "ray", *flags, "--checkpoint-interval-s", "0.01",
               "--keep-checkpoints", "100", "--out", str(out), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Token authentication" not in proc.stderr and "token-auth" not in proc.stderr, \
        proc.stderr
    assert "placement: " in proc.stderr  # the run's own lines are there
    steps = [int(p.stem.removeprefix("ckpt-")) for p in list_checkpoints(out / "checkpoints")]
    assert steps[0] == 30 and len(steps) >= 2 and all(0 < s < 30 for s in steps[1:]), steps
    ref = local_final(make_config({**fields, "backend": "local", "checkpoint_interval_s": 0}),
                      tmp_path / "local")
    assert_same_final(out, ref)
