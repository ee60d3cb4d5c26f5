#!/usr/bin/env bash
# A small communication-cost study on CPU: SGD, SAM and SAMPa side by side on the same two Ray
# workers for resnet20 and resnet56, on both transports and data paths (ray/points,
# ray/replicated, grpc/points), over emulated links (latency 0 / 5 / 20 ms per message x
# bandwidth uncapped / 1 / 0.1 Gbit/s), 2 repeats of 10 updates: 324 runs, roughly an hour on
# 2 CPU cores.
#
#   bash benchmarks/study.sh [OUT_DIR] [more `sampa-ray bench` flags, which win]
#
# Outputs go to OUT_DIR (default runs/study-<timestamp>): bench.csv (one row per run), bench.md
# (medians with min-max spread, SAMPa's step split and the break-even links; also printed at
# the end), speedup_vs_bandwidth.png, speedup_vs_latency.png, breakdown.png, and runs/ with
# every run's result.json. On a GPU add: --device cuda --batch-size 128
# --models resnet20 resnet56 wrn28_2 wrn28_10
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study-$(date +%Y%m%d-%H%M%S)}
[ $# -gt 0 ] && shift
export RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1 PYTHONUNBUFFERED=1
echo "study: outputs go to $OUT"
.venv/bin/python -m sampa_ray.cli bench \
  --models resnet20 resnet56 --transports ray grpc --data-paths points replicated \
  --latency-ms 0 5 20 --bandwidth-gbit none 1 0.1 --repeats 2 --steps 10 --batch-size 32 \
  --out "$OUT" "$@"
echo "study: results in $OUT (bench.md, bench.csv, *.png)"
