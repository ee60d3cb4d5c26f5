#!/usr/bin/env bash
# Set up, then lint and run the whole test suite (real Ray, real servers on loopback) with this
# processor's own CPU kernels; then re-run the tests that assert a training outcome (marker
# `outcome`) under every kernel set below it (tests/kernel_sets.py), as other users' processors
# would pick them, so a result that holds on one processor only cannot pass. Arguments go to
# every pytest run (e.g. a test file, or -k). SAMPA_KERNEL_SETS=0 skips the re-runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
rc=0
# the slowest tests at the end of the log: where to trim when the suite grows
.venv/bin/python -m pytest -q --durations=25 "$@" || rc=$?
if [ "${SAMPA_KERNEL_SETS:-1}" != 0 ]; then
  while read -r name vars; do
    echo "== the outcome tests under CPU kernel set '$name' ($vars)"
    # exit 5: the arguments select no outcome test
    env $vars SAMPA_KERNEL_SET="$name" .venv/bin/python -m pytest -q -m outcome "$@" \
      || { r=$?; [ "$r" = 5 ] || rc=$r; }
  done < <(.venv/bin/python tests/kernel_sets.py)
fi
exit "$rc"
