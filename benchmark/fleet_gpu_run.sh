#!/usr/bin/env bash
# benchmark/fleet_gpu_run.py on a GPU machine, from a folder holding the repository (the root,
# or a copy of it), with the wheels of scripts/fetch_gpu_wheels.sh in WHL (default .whl):
#
#   OUT=/tmp/out bash benchmark/fleet_gpu_run.sh [fleet_gpu_run.py flags...]
#
# Installs the wheels into /tmp/site, records the GPUs, runs the fleet with a time limit
# (LIMIT seconds, default 540) and leaves its log and JSON in $OUT. NVLink multicast stays off.
set -uo pipefail
: "${OUT:?}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${WHL:-.whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/scheduler:$PWD/kernels PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; nvidia-smi topo -m; } \
  > "$OUT/gpu.txt" 2>&1
python3 -c "import aiohttp, prometheus_client, httpx" 2>&1 | tail -1
timeout -k 10 "${LIMIT:-540}" python3 benchmark/fleet_gpu_run.py --out "$OUT/fleet" "$@" \
  > "$OUT/fleet.log" 2>&1
echo "fleet rc=$?"; tail -n 60 "$OUT/fleet.log"
for f in "$OUT"/fleet/*/server.log; do echo "== $f"; tail -n 15 "$f"; done
# One archive: the device tool brings back only a few files per call.
tar -czf "$OUT/fleet.tgz" -C "$OUT" fleet && rm -rf "$OUT/fleet"
