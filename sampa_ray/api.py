"""The Python API: ``sampa_ray.fit`` trains (the same run, the same files as ``sampa-ray
train``), ``sampa_ray.load`` reads a finished run back. Nothing starts when this is imported.

    import sampa_ray

    result = sampa_ray.fit({"algo": "sampa", "epochs": 3, "backend": "local"},
                           model=my_build, data=my_load, out="runs/mine")
    result.metrics["final_test_accuracy"]
    net = result.model()                      # the trained nn.Module (final parameters + buffers)
    same = sampa_ray.load("runs/mine")

``model``, ``data`` (or ``dataset``, as the config and the CLI call it) and ``loss`` take
callables (they follow the contracts in :mod:`sampa_ray.task`: functions, lambdas, closures,
partials) or import paths (``"pkg.mod:build"``); a callable is named in the config by its import
path, or by what it is and a digest of its value (so in the config hash: resuming with another
one is refused). It travels to Ray's processes by value, and into the run folder
(``parts.pkl``), so ``load(folder).model()`` works in any process, from any directory.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import plugins
from .config import TrainConfig, make_config
from .config_yaml import load_yaml
from .errors import UserError

Part = str | Callable[..., Any] | None


def _name(part: Part) -> str | None:
    if part is None or isinstance(part, str):
        return part
    return plugins.register(part)


@dataclass
class Result:
    """A finished run: its folder, ``result.json`` as a dict, and its config."""

    out: Path
    metrics: dict[str, Any] = field(repr=False)
    config: TrainConfig = field(repr=False)

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics.get("final_test_accuracy")

    def model(self, which: str = "final") -> Any:
        """The trained ``nn.Module`` in eval mode: ``final`` (``final.pt``) or ``best``
        (``best.pt``, the best validation epoch's, where the run wrote one), with its
        parameters and BatchNorm statistics."""
        import torch

        from .flat import load_buffers
        from .task import make_model

        path = self.out / f"{which}.pt"
        if which not in ("final", "best") or not path.is_file():
            raise UserError(f"model: no {which}.pt in {self.out}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        num_classes = self.metrics.get("num_classes") or self.config.num_classes
        if not num_classes:
            raise UserError(f"model: {self.out / 'result.json'} does not say num_classes")
        net = make_model(self.config, int(num_classes))
        params = [p for p in net.parameters() if p.requires_grad]
        x = saved["x"]
        if sum(p.numel() for p in params) != x.numel():
            raise UserError(f"model: {path} holds {x.numel()} parameters, the model "
                            f"{self.config.model} has {sum(p.numel() for p in params)}")
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(x[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        load_buffers(net, saved["buffers"])
        return net.eval()


def load(path: str | Path) -> Result:
    """The finished run in folder ``path`` (its ``result.json``)."""
    out = Path(path)
    plugins.load_parts(out)
    try:
        metrics = json.loads((out / "result.json").read_text())
    except FileNotFoundError:
        raise UserError(f"load: {out} holds no finished run (no result.json)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"load: cannot read {out / 'result.json'}: {err}") from None
    return Result(out, metrics, make_config(metrics["config"]))


def supplied_fields(config: TrainConfig | Mapping[str, Any] | str | Path | None = None, *,
                    model: Part = None, data: Part = None, loss: Part = None,
                    **fields: Any) -> dict[str, Any]:
    """The config fields a caller gave: a config (object, mapping or YAML file), ``fields`` on
    top, then the parts given as callables or import paths (by name)."""
    if isinstance(config, TrainConfig):
        base: dict[str, Any] = config.model_dump()
    elif isinstance(config, str | Path):
        base = load_yaml(config)
    else:
        base = dict(config or {})
    base.update(fields)
    for key, part in (("model", model), ("dataset", data), ("loss", loss), ("algo", None)):
        if part is not None:
            base[key] = part
        if callable(base.get(key)):  # an algorithm given as its class, too
            base[key] = _name(base[key])
    return base


def config_of(config: TrainConfig | Mapping[str, Any] | str | Path | None = None, *,
              model: Part = None, data: Part = None, loss: Part = None,
              **fields: Any) -> TrainConfig:
    """One validated config from what :func:`supplied_fields` takes."""
    return make_config(supplied_fields(config, model=model, data=data, loss=loss, **fields))


def fit(config: TrainConfig | Mapping[str, Any] | str | Path | None = None, *,
        model: Part = None, data: Part = None, loss: Part = None,
        out: str | Path | None = None, overwrite: bool = False, resume: bool = False,
        progress: bool = False, **fields: Any) -> Result:
    """Train and return the finished run. ``config``: a :class:`TrainConfig`, a mapping of its
    fields or a YAML file; ``fields`` override it (``epochs=3, backend="local"``). ``model``,
    ``data``, ``loss``: callables or import paths (see :mod:`sampa_ray.task`). ``out``: the run
    folder (default ``runs/train-<algo>-<time>``); ``resume``: continue the run there (a
    finished one is returned as it is).
    Errors a user can cause raise :class:`~sampa_ray.errors.UserError` with one line."""
    from .outdir import claim_run, finished_run
    from .preflight import check_before_start

    given = supplied_fields(config, model=model, data=data, loss=loss, **fields)
    if out is not None:
        given["out"] = str(out)
    cfg = make_config(given)
    if resume:  # the checkpoint's config; what was given may not change the trajectory
        from .checkpoint import config_for_resume

        if not cfg.out:
            raise UserError("resume: name the run folder (out=...)")
        cfg = config_for_resume(cfg.out, {**given, "out": cfg.out})
        if finished_run(Path(cfg.out)) is not None:  # nothing to continue: the run as it is
            return load(cfg.out)
    for line in check_before_start(cfg):
        warnings.warn(line, stacklevel=2)
    with claim_run(cfg, "train", overwrite, resume=resume) as lock:
        _run(cfg, lock.out, progress)
    return load(lock.out)


def _run(cfg: TrainConfig, out: Path, progress: bool) -> dict[str, Any]:
    """The run, its progress shown on the terminal where ``progress`` asks for it."""
    from .runner import run

    if not progress:
        return run(cfg, out)
    from .ui import ProgressView

    with ProgressView(cfg.algo) as view:
        return run(cfg, out, view)


__all__ = ["Result", "config_of", "fit", "load", "supplied_fields"]
