#!/usr/bin/env bash
# The p2p crossing's GPU runs (issue 10), from the repository root on a 2-GPU machine with the
# wheels of scripts/fetch_gpu_wheels.sh carried in .whl/:
#
#   OUT=/tmp/out STAGE=first|decode SHAPES="..." bash benchmark/p2p_gpu_run.sh
#
# first:  crossing costs (p2p against nccl and local), the p2p GPU tests, a short decode run.
# decode: benchmark/crosspool_decode_bench.py on $SHAPES ($CELLS, $STEPS).
# final:  the p2p GPU tests, one pytest process per test (one p2p pool per process on CUDA),
#         then the decode benchmark as in `decode`.
# Each step has its own time limit; logs and JSON land in $OUT. NVLink multicast stays off.
set -uo pipefail
: "${OUT:?}" "${STAGE:=first}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/scheduler:$PWD/kernels PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } \
  > "$OUT/gpu.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name"; local t=$SECONDS
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t)) s"; tail -n "${TAIL:-30}" "$OUT/$name.log"
}
if [ "$STAGE" = first ]; then
  step crossing "${CROSS_LIMIT:-140}" python3 benchmark/crossing_bench.py --out "$OUT/crossing.json" \
    --transports p2p,nccl,local --tokens 1,16,64,256 --hidden 4096 --iters 300
  step pytest-p2p "${TEST_LIMIT:-200}" python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=60 tests/gpu/test_p2p_gpu.py
  step decode-olmoe "${DECODE_LIMIT:-200}" python3 benchmark/crosspool_decode_bench.py \
    --out "$OUT/decode-olmoe.json" --shapes olmoe-1b-7b --cells 1x1024,16x1024 --steps 10 --fp32-check --mode-timeout 100
elif [ "$STAGE" = final ]; then
  ids=$(python3 -m pytest -q --collect-only -p no:cacheprovider tests/gpu/test_p2p_gpu.py | grep '::')
  i=0; for id in $ids; do i=$((i + 1))
    timeout -k 5 "${ONE_TEST_LIMIT:-90}" python3 -m pytest -q -p no:cacheprovider "$id" >> "$OUT/pytest-p2p.log" 2>&1
    echo "$id rc=$?" | tee -a "$OUT/pytest-p2p.log"
  done
  step decode "${DECODE_LIMIT:-400}" python3 benchmark/crosspool_decode_bench.py --out "$OUT/decode.json" \
    --shapes "${SHAPES:-qwen3-30b-a3b}" --cells "${CELLS:-1x1024,4x1024,16x1024,64x1024,1x32768,16x32768}" \
    --steps "${STEPS:-20}" ${DECODE_ARGS:-}
else
  step decode "${DECODE_LIMIT:-560}" python3 benchmark/crosspool_decode_bench.py --out "$OUT/decode.json" \
    --shapes "${SHAPES:-qwen3-30b-a3b}" --cells "${CELLS:-1x1024,4x1024,16x1024,64x1024,1x32768,16x32768}" \
    --steps "${STEPS:-20}" ${DECODE_ARGS:-}
fi
