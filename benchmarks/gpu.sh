#!/usr/bin/env bash
# One prepared run for a single-GPU machine that has torch but not Ray: installs the wheels
# carried in .whl/ (Ray and the few packages it and sampa-ray need) into /tmp/site, then prints
# the SGD / SAM / SAMPa table per model and data path (WIRES="fp32 bf16" adds the bf16 wire).
#
#   bash benchmarks/gpu.sh            # writes the table to stdout and, if $OUT is set, CSV there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import ray" 2>/dev/null; then
  wheels=$(ls .whl/*.whl 2>/dev/null || true)
  if [ -z "$wheels" ]; then echo "gpu.sh: Ray is not installed and .whl/ holds no wheels" >&2; exit 2; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" benchmarks/bench_ray.py --device cuda --batch-size 128 --steps "${STEPS:-30}" \
  --models ${MODELS:-resnet20 resnet56 wrn28_2 wrn28_10} \
  --data-paths ${DATA_PATHS:-points replicated collective} --repeats ${REPEATS:-2} --wire-dtypes ${WIRES:-fp32} \
  ${OUT:+--csv "$OUT/gpu_bench.csv"}
