"""What each config field is, declared where the field is (:func:`setting`): its group in
``--help``, whether it is part of the trajectory (the config hash) or only says how a run executes,
whether the workers' replicas and data depend on it, and whether it has a flag. Every name set
(the hash's, ``--resume``'s, the shared workers' check) and every CLI flag is derived from it, so
a new field is declared once."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined

#: what a config field is, said once where it is declared (:func:`setting`); every name set and
#: every CLI flag is derived from it
GROUPS: tuple[str, ...] = ("algorithm", "optimizer", "model", "data", "loss", "schedule",
                           "placement", "faults", "services", "outputs")


def setting(group: str, default: Any = PydanticUndefined, *, runtime: bool = False,
            worker: bool = False, later: bool = False, flag: bool = True,
            choices: Callable[[], tuple[str, ...]] | None = None, **kw: Any) -> Any:
    """A config field, with what it is:

    - ``group``: where ``--help`` lists its flag (one of :data:`GROUPS`);
    - ``runtime``: it says how and where a run executes, not which trajectory it follows: left
      out of the config hash, and it may change on ``--resume``;
    - ``worker``: the workers' replicas or data depend on it, so runs that share a set of
      workers (``compare``, the study) must agree on it;
    - ``later``: a trajectory field added after runs were first hashed: left out of the hash at
      its default, so a run that does not use it keeps its hash and its checkpoints;
    - ``flag``: the CLI has a ``--flag`` for it (mappings get ``--x-arg KEY=VALUE`` instead);
    - ``choices``: where the values come from a registry (data paths, transports), the
      function that lists them, for the flag's choices (a ``Literal`` gives its own).
    """
    extra = {"group": group, "runtime": runtime, "worker": worker, "later": later,
             "flag": flag, "choices": choices}
    return Field(default, json_schema_extra=extra, **kw)


def meta(cls: type[BaseModel], name: str) -> dict[str, Any]:
    """What :func:`setting` says of field ``name`` of config class ``cls``."""
    extra = cls.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def fields_where(cls: type[BaseModel], key: str) -> tuple[str, ...]:
    """The fields of ``cls`` that :func:`setting` marks ``key`` (runtime, worker, later,
    flag), in declaration order."""
    return tuple(n for n in cls.model_fields if meta(cls, n).get(key))


def worker_differences(workers: BaseModel, run: BaseModel) -> list[str]:
    """The worker fields (of ``run``'s class) in which a run's config differs from the config
    its workers were built with: such a run cannot use those workers."""
    return [n for n in fields_where(type(run), "worker")
            if getattr(run, n) != getattr(workers, n, None)]


def check_shared_workers(workers: BaseModel, run: BaseModel) -> None:
    """One line (a UserError) where a run cannot use workers built for config ``workers``."""
    from .errors import UserError

    for f in worker_differences(workers, run):
        raise UserError(f"{f}: {getattr(run, f)!r} here, {getattr(workers, f, None)!r} for the "
                        "workers this run shares; runs on one set of workers must agree on "
                        "what their replicas and data are built from (run it on its own)")


def trajectory_hash(cfg: BaseModel) -> str:
    """Hash of the fields that define the trajectory (not where outputs go or how it runs)."""
    cls = type(cfg)
    keep = cfg.model_dump(exclude=set(fields_where(cls, "runtime")))
    for name in fields_where(cls, "later"):  # at their defaults: the hash runs had before
        if keep[name] == cls.model_fields[name].get_default(call_default_factory=True):
            del keep[name]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def lift_args(cls: type[BaseModel], data: Any, mapping: str) -> Any:
    """Config ``data`` (before validation) with each key of its mapping field ``mapping`` that
    is also a field of its own moved there (given both ways with two values: ValueError)."""
    if not isinstance(data, dict) or not isinstance(data.get(mapping), dict):
        return data
    data, args = dict(data), dict(data[mapping])
    for name in [k for k in args if k in cls.model_fields and k != mapping]:
        value = args.pop(name)
        if name in data and data[name] != value:
            raise ValueError(f"{mapping}.{name}: {value!r} here and {data[name]!r} as "
                             f"{name}; give it once")
        data[name] = value
    data[mapping] = args
    return data


def lr_at(schedule: str, lr: float, step: int, total: int,
          batches_per_epoch: int | None = None) -> float:
    """Learning rate of update ``step`` out of ``total``. ``cosine-epoch`` needs
    ``batches_per_epoch``: update ``step`` belongs to epoch ``step // batches_per_epoch`` of
    ``ceil(total / batches_per_epoch)`` (``epochs`` unless ``steps`` is set), and the whole
    epoch uses that epoch's rate, as torch's CosineAnnealingLR(T_max=epochs) stepped once per
    epoch gives it."""
    if schedule == "constant":
        return lr
    if schedule == "cosine-epoch":
        if not batches_per_epoch:
            raise ValueError("lr_schedule cosine-epoch: batches_per_epoch is required")
        epochs = -(-total // batches_per_epoch)
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step // batches_per_epoch) / epochs))
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


__all__ = ["GROUPS", "check_shared_workers", "fields_where", "lift_args", "lr_at", "meta",
           "setting", "trajectory_hash", "worker_differences"]
