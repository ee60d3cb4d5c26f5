"""The single-process backend (being moved here from trainer.py)."""
from .trainer import LocalExecutor, run_local  # noqa: F401
