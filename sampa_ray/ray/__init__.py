"""The Ray backend: a coordinator actor and two role groups of gradient-worker actors (one
worker each by default, k with ``workers_per_role``).

    driver (CLI / `ray job submit` entrypoint)                     driver.py
      └─ Coordinator actor (asyncio): supervises                   coordinator.py
           services: metrics, gRPC (control API, data plane)       services.py
           each configuration a Run: data path, loop, outputs      run.py
           ├─ GradientWorker "perturbed"    (or perturbed-0..k-1)  worker.py, placement.py
           └─ GradientWorker "extrapolated" (or extrapolated-0..k-1)

Workers compute gradients and know nothing of the algorithm; the coordinator decides and runs no
model. How points, gradients and state move is a data path (``paths/``), each one module with its
coordinator half and its worker half; a role group's members get the same calls, compute shards
of the batch and sum them among themselves (``sampa_ray.shards``). Lost workers come back
(``recovery.py``). Every worker exists for every algorithm, so SGD and SAM (which use the first
group, or all workers with ``data_parallel``) run on exactly the actors SAMPa uses.

Importing this package imports Ray; the CLI imports it only when a run uses it.
"""

import warnings

# Arrays read from the object store are read-only; they are only ever copied from.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

from .driver import clean_up, connect, run_ray, run_ray_many  # noqa: E402

__all__ = ["clean_up", "connect", "run_ray", "run_ray_many"]
