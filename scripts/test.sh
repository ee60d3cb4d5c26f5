#!/usr/bin/env bash
# Set up, then lint and run the whole test suite (real Ray, real servers on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
