"""One way into a run: :func:`run` trains a configuration on its backend into a folder. The CLI
(``sampa-ray train``, and ``compare`` off Ray) and ``sampa_ray.fit`` both call it, so the same
files come out whichever front end started the run.

The backends are imported when a run starts, not when this module is: ``import sampa_ray``
loads neither torch nor Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig
from .events import Progress
from .plugins import save_parts


def run(cfg: TrainConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Train ``cfg`` on its backend (``sampa_ray.ray.run_ray`` or
    ``sampa_ray.local.run_local``), write the outputs into ``out`` and return the result
    (``result.json``); ``progress`` receives the run's events. The run's plug-ins are kept by
    value in ``out`` first (``sampa_ray.load`` rebuilds the model from them anywhere)."""
    save_parts(cfg, out)
    if cfg.backend == "ray":
        from .ray import run_ray

        return run_ray(cfg, out, progress)
    from .local import run_local

    return run_local(cfg, out, progress)


__all__ = ["run"]
