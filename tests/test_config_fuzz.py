"""Config fuzz: invalid YAML, unknown keys, wrong types and out-of-range values all end in one
line on stderr and exit code 2 (run in-process through the real CLI entry point)."""

from __future__ import annotations

import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sampa_ray.algorithms import BUILTIN
from sampa_ray.cli import main
from sampa_ray.config import TrainConfig
from sampa_ray.plugins import check_name

FIELDS = list(TrainConfig.model_fields)


def _names(kind: str, value: str) -> bool:
    """Whether ``value`` is a valid ``kind`` (model, dataset, loss) name."""
    try:
        check_name(kind, value)
    except ValueError:
        return False
    return True


# values that are wrong for every numeric field
BAD_NUMBERS = st.sampled_from([-1, -0.5, float("nan"), float("inf"), 1e400, "abc", [1, 2],
                               {"a": 1}, True])
BAD_BY_FIELD = {
    "lr": st.one_of(st.floats(max_value=0.0), st.just("fast")),
    "lam": st.one_of(st.floats(min_value=1.0001, max_value=1e9), st.floats(max_value=-1e-9)),
    "momentum": st.floats(min_value=1.0, max_value=1e6),
    "rho": st.floats(max_value=-1e-12),
    "weight_decay": st.floats(max_value=-1e-12),
    "batch_size": st.integers(max_value=0),
    "epochs": st.integers(max_value=0),
    "steps": st.integers(max_value=0),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31)),
    "algo": st.text(min_size=1).filter(lambda s: s not in BUILTIN),
    # neither a built-in name nor an import path (package.module:function)
    **{kind: st.text(min_size=1).filter(lambda s, kind=kind: not _names(kind, s))
       for kind in ("model", "dataset", "loss")},
    "optimizer": st.text().filter(lambda s: s not in ("sgd", "adamw")),
    "precision": st.text().filter(lambda s: s not in ("fp32", "bf16")),
    "beta2": st.one_of(st.floats(min_value=1.0, max_value=1e9), st.floats(max_value=-1e-9)),
    "eps": st.floats(max_value=0.0),
    "backend": st.text().filter(lambda s: s not in ("local", "ray")),
    # the paper's recipe, field by field
    "cutout_p": st.one_of(st.floats(min_value=1.0001, max_value=1e9), st.floats(max_value=-1e-9)),
    "val_split": st.one_of(st.floats(min_value=1.0, max_value=1e9), st.floats(max_value=-1e-9)),
    **{name: st.text().filter(lambda s, name=name: s not in TrainConfig.model_fields[name]
                              .annotation.__args__)
       for name in ("lr_schedule", "label_smoothing_mode", "last_batch", "pad_fill",
                    "bn_stats")},
}


def run_cli(tmp_path, capsys, text: str) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sampa-ray: "), err
    assert "Traceback" not in err


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(field=st.sampled_from(sorted(BAD_BY_FIELD)), data=st.data())
def test_out_of_range_values(tmp_path, capsys, field, data):
    value = data.draw(BAD_BY_FIELD[field])
    code, err = run_cli(tmp_path, capsys, yaml.safe_dump({field: value}))
    assert_one_line(code, err)
    assert field in err


@SETTINGS
@given(field=st.sampled_from(["lr", "rho", "lam", "momentum", "weight_decay", "batch_size",
                              "epochs", "seed"]), value=BAD_NUMBERS)
def test_wrong_types(tmp_path, capsys, field, value):
    if isinstance(value, float) and math.isinf(value) and field in ("lam", "momentum"):
        pass  # still out of range
    code, err = run_cli(tmp_path, capsys, yaml.safe_dump({field: value}))
    assert_one_line(code, err)
    assert field in err


@SETTINGS
@given(key=st.text(min_size=1, max_size=20).filter(
    lambda k: k.replace("-", "_") not in FIELDS and k.strip() == k and k not in ("<<",)))
def test_unknown_keys(tmp_path, capsys, key):
    code, err = run_cli(tmp_path, capsys, yaml.safe_dump({key: 1}))
    assert_one_line(code, err)


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_text(tmp_path, capsys, text):
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, dict) or parsed is None:
        # a mapping (or nothing) could be a valid config: make sure it is not
        text = "bogus_key: 1\n"
    code, err = run_cli(tmp_path, capsys, text)
    assert_one_line(code, err)


def test_many_bad_fields_are_all_named_in_a_bounded_line(tmp_path, capsys):
    """Past ERROR_DETAIL_CHARS the later fields keep only their names: the line stays short
    enough to read, and names every field that failed."""
    from sampa_ray.errors import ERROR_DETAIL_CHARS

    bad = {"lr": -1.0, "rho": -1.0, "lam": 2.0, "momentum": 1.5, "weight_decay": -1.0,
           "batch_size": 0, "epochs": 0, "seed": -1, "dropout": 1.0, "algo": "adam"}
    code, err = run_cli(tmp_path, capsys, yaml.safe_dump(bad))
    assert_one_line(code, err)
    line = err.strip()
    for name in bad:
        assert f"{name}" in line, name
    assert "more)" not in line and "; also invalid: " in line
    assert line.startswith("sampa-ray: config: algo: unknown algorithm 'adam'")
    assert len(line) <= len("sampa-ray: config: ") + ERROR_DETAIL_CHARS
