#!/usr/bin/env bash
# Set up, then run the default job: SAMPa-0.2 on the bundled handwritten digits, on an embedded
# local Ray instance (two gradient workers and a coordinator). Extra arguments go to `train`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/sampa-ray train "$@"
