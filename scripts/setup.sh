#!/usr/bin/env bash
# Set up .venv: the CPU build of torch (pinned, so nothing pulls a multi-GB CUDA build), then
# sampa-ray with its dev extras, every package at the version requirements.lock names (pip
# constraints; ./scripts/lock.sh refreshes the lock). Idempotent; safe to run again: a package
# at another version than the lock's is replaced by the locked one.
# On a GPU machine, set TORCH_SPEC to the torch build you want (e.g. TORCH_SPEC=torch): the
# constraints then leave out torch and the packages the lock holds only for it
# (scripts/constraints.py), and pin everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python scripts/constraints.py "$TORCH_SPEC" requirements.lock > .venv/constraints.txt
pip_install() {
  .venv/bin/python -m pip install -q --disable-pip-version-check -c .venv/constraints.txt "$@"
}
pip_install "$TORCH_SPEC"
pip_install -e ".[dev]"
# Prometheus (server and promtool) for the metrics tests: Debian's package, installed as root when
# missing; without it those tests fail with a message saying so.
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends prometheus >/dev/null; } \
    || echo "setup: could not install prometheus; the tests that need it will fail" >&2
fi
