"""sampa-ray: SAMPa (Sharpness-Aware Minimization Parallelized) training on Ray.

``sampa_ray.fit(...)`` trains and ``sampa_ray.load(path)`` reads a finished run back
(:mod:`sampa_ray.api`). Importing the package starts nothing and loads neither torch nor Ray.
"""

__version__ = "0.1.0"

from .api import Result, fit, load  # noqa: E402  (light: pydantic and yaml only)

__all__ = ["Result", "__version__", "fit", "load"]
