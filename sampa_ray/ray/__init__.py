"""The Ray backend: a coordinator actor and two gradient-worker actors.

    driver (CLI / `ray job submit` entrypoint)                     driver.py
      └─ Coordinator actor (asyncio): the run, services, outputs    coordinator.py
           ├─ GradientWorker "perturbed"    (bundle 0)              worker.py, placement.py
           └─ GradientWorker "extrapolated" (bundle 1)

Workers compute gradients and know nothing of the algorithm; the coordinator decides and runs no
model. How points, gradients and state move is a data path (``paths/``), each one module with its
coordinator half and its worker half. Lost workers come back (``recovery.py``). Both workers exist
for every algorithm, so SGD and SAM (which use only the first) run on exactly the actors SAMPa
uses.

Importing this package imports Ray; the CLI imports it only when a run uses it.
"""

import warnings

# Arrays read from the object store are read-only; they are only ever copied from.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

from .driver import clean_up, connect, run_ray, run_ray_many  # noqa: E402

__all__ = ["clean_up", "connect", "run_ray", "run_ray_many"]
