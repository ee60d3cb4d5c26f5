"""The Ray backend (being moved here from ray_backend.py)."""
from ..ray_backend import connect, run_ray, run_ray_many  # noqa: F401
