#!/usr/bin/env bash
# One prepared run for a single-GPU machine that has torch but not Ray: installs the wheels
# carried in .whl/ (Ray and the few packages it and sampa-ray need) into /tmp/site, then prints
# the SGD / SAM / SAMPa table per model and data path (WIRES="fp32 bf16" adds the bf16 wire),
# then `sampa-ray compare --baseline ddp` with one and two workers per role.
# Then, without Ray, a user's own data-parallel SGD and SAM (benchmarks/ddp.py, plain
# torch.distributed): N = 2 and 4 processes sharing the one GPU over gloo, SGD-DDP / SAM-DDP per
# model and global batch, the anchor for the compare runs' sgd-ddp and sam-ddp rows.
#
#   bash benchmarks/gpu.sh            # writes the tables to stdout and, if $OUT is set, CSV there
#   DDP=0 bash benchmarks/gpu.sh      # only the Ray runs;  RAY_BENCH=0: only the DDP comparison
#   COMPARE=0: skip the `compare --baseline ddp --workers-per-role 1, 2` runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${RAY_BENCH:-1}" != 0 ] && ! "$PY" -c "import ray" 2>/dev/null; then
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
[ "${RAY_BENCH:-1}" = 0 ] || "$PY" benchmarks/bench_ray.py --device cuda --batch-size 128 --steps "${STEPS:-30}" \
  --models ${MODELS:-resnet20 resnet56 wrn28_2 wrn28_10} \
  --data-paths ${DATA_PATHS:-points replicated collective free} --repeats ${REPEATS:-2} --wire-dtypes ${WIRES:-fp32} \
  ${OUT:+--csv "$OUT/gpu_bench.csv"}
# the system itself: SGD(k), SAM(k), SAMPa(2xk) and SGD-DDP / SAM-DDP over 2k on the same actors,
# k = 1 and 2 (2 and 4 workers sharing the one GPU; a role group's all-reduce goes over gloo)
[ "${RAY_BENCH:-1}" = 0 ] || [ "${COMPARE:-1}" = 0 ] || for k in ${KS:-1 2}; do
  "$PY" -m sampa_ray.cli compare --device cuda --model "${CMP_MODEL:-resnet56}" \
    --dataset synthetic --synthetic-size 8192 --batch-size "${CMP_BATCH:-128}" \
    --steps "${CMP_STEPS:-40}" --eval-every 1000 --threads 2 --baseline ddp \
    --workers-per-role "$k" --out "/tmp/sampa-compare-k$k" --overwrite
done
# a user's own DDP, no Ray: ddp.py imports torch and sampa_ray's models, flat and shards only
[ "${DDP:-1}" = 0 ] || "$PY" benchmarks/ddp.py --device cuda --workers 2 4 \
  --models ${DDP_MODELS:-resnet20 resnet56} --batch-sizes ${DDP_BATCHES:-128 32} \
  --steps "${DDP_STEPS:-10}" --repeats "${DDP_REPEATS:-3}" ${OUT:+--csv "$OUT/gpu_ddp.csv"}
