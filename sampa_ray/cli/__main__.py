"""``python -m sampa_ray.cli ...``: the same as ``sampa-ray ...`` (README, deploy manifests and
Ray job entrypoints use it where the console script is not on the PATH)."""

import sys

from . import main

sys.exit(main())
