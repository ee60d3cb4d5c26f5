"""What a sweep runs: ``--grid rho=0.02,0.05 lam=0,0.2`` over config fields, ``--seeds N`` and
``--algos``, expanded into one trial per algorithm x grid setting x seed, each trial's config
validated here, before Ray starts (a bad field or value is one line, exit 2). Nothing here
imports Ray."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import TrainConfig, make_config
from ..errors import UserError

#: fields a grid may not sweep: the sweep sets them itself (``--algos``, ``--seeds``, ``--out``)
#: or they say where a run's files go
NOT_SWEPT = ("algo", "seed", "out", "resume", "backend")


@dataclass(frozen=True)
class Trial:
    """One training run of a sweep: its name (its folder under the sweep's), algorithm, grid
    setting and seed, and the validated config fields it runs with."""

    name: str
    algo: str
    setting: tuple[tuple[str, Any], ...]
    seed: int
    config: dict[str, Any] = field(compare=False, hash=False)

    @property
    def setting_text(self) -> str:
        """The grid setting as ``rho=0.05 lam=0.2`` (empty without a grid)."""
        return " ".join(f"{k}={v}" for k, v in self.setting)


_BOOL = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _convert(name: str, text: str) -> Any:
    """A grid value as the field's flag reads it (bool, int, float, text; ``none`` for a field
    whose default is None), else as YAML (mappings); the config model then validates it."""
    import types
    import typing

    import yaml

    text = text.strip()
    annotation = TrainConfig.model_fields[name].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) < len(typing.get_args(annotation))
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and len(args) == 1:
        annotation = args[0]
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if annotation is bool:
            return _BOOL[text.lower()]
        if annotation in (int, float):
            return annotation(text)
    except (KeyError, ValueError):
        what = {bool: "true|false", int: "an integer", float: "a number"}[annotation]
        raise UserError(f"grid: {name}={text}: not {what}") from None
    if annotation is str or typing.get_origin(annotation) is typing.Literal:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_grid(specs: Sequence[str] | None) -> dict[str, list[Any]]:
    """``["rho=0.02,0.05", "lam=0,0.2"]`` -> ``{"rho": [0.02, 0.05], "lam": [0.0, 0.2]}``: each
    name a config field the sweep may vary, each value list non-empty, no name or value twice;
    else one line (UserError)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs or ():
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UserError(f"grid: {spec!r} is not NAME=V1,V2,... (e.g. rho=0.02,0.05)")
        if name not in TrainConfig.model_fields:
            raise UserError(f"grid: {name} is not a config field (see sampa-ray train --help)")
        if name in NOT_SWEPT:
            how = {"algo": "--algos", "seed": "--seeds"}.get(name, "the sweep itself")
            raise UserError(f"grid: {name} is set by {how}, not by --grid")
        if name in grid:
            raise UserError(f"grid: {name} is given twice")
        texts = [v for v in values.split(",") if v.strip()]
        if not texts:
            raise UserError(f"grid: {name} has no values (give {name}=V1,V2,...)")
        converted = [_convert(name, t) for t in texts]
        if len({repr(v) for v in converted}) != len(converted):
            raise UserError(f"grid: {name} names a value twice ({values})")
        grid[name] = converted
    return grid


def check_algos(base: TrainConfig, algos: Sequence[str], **fixed: Any) -> None:
    """``algos`` (a sweep's, ``compare``'s) name at least one algorithm, none twice, each one
    known and valid with ``base``'s shared settings and ``fixed``; else one line (UserError)."""
    if not algos:
        raise UserError("algos: name at least one algorithm")
    if len(set(algos)) != len(algos):
        raise UserError(f"algos: {' '.join(algos)} names an algorithm twice")
    shared = base.model_dump()
    for algo in algos:
        try:
            make_config({**shared, **fixed, "algo": algo})
        except UserError as err:
            raise UserError(f"algos: {algo}: {str(err).removeprefix('config: ')}") from None


def expand(base: TrainConfig, algos: Sequence[str], grid: Mapping[str, Sequence[Any]],
           seeds: int) -> list[Trial]:
    """Every trial: each algorithm x grid setting (the product, in the order given) x seed
    0..seeds-1, each config validated (one line naming the trial's setting where a value is
    refused). The trials run on the local backend, one process each."""
    if seeds < 1:
        raise UserError(f"seeds: {seeds}; a sweep needs at least one seed")
    check_algos(base, algos, backend="local")
    names = list(grid)
    shared = base.model_dump()
    trials = []
    # seed by seed, the algorithms side by side: a machine's drift over the sweep spreads over
    # every algorithm instead of landing on the last one's wall-clock
    for values in itertools.product(*(grid[n] for n in names)):
        setting = tuple(zip(names, values, strict=True))
        for seed in range(seeds):
            for algo in algos:
                data = {**shared, **dict(setting), "algo": algo, "seed": seed,
                        "backend": "local", "out": None, "resume": None}
                try:
                    cfg = make_config(data)
                except UserError as err:
                    where = " ".join(f"{k}={v}" for k, v in setting)
                    raise UserError(f"grid: {algo}{' ' + where if where else ''}: "
                                    f"{str(err).removeprefix('config: ')}") from None
                name = "-".join([algo, *(f"{k}={v}" for k, v in setting), f"s{seed}"])
                trials.append(Trial(name, algo, setting, seed, cfg.model_dump()))
    return trials


__all__ = ["NOT_SWEPT", "Trial", "expand", "parse_grid"]
