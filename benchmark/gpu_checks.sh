#!/usr/bin/env bash
# GPU checks of one device session, run from the repository root on the GPU machine with the
# wheels of scripts/fetch_gpu_wheels.sh --flashinfer carried in .whl/:
#
#   OUT=/tmp/out STAGE=smoke|full bash benchmark/gpu_checks.sh
#
# smoke: the GPU tests, the VMM and crossing benchmarks, a short decode benchmark.
# full:  the GPU tests, then the decode benchmark of issue 5, one real shape at a time.
# Everything lands in $OUT (logs and JSON); each step has its own time limit so that one
# hang cannot take the others' results with it.
set -uo pipefail
: "${OUT:?}" "${STAGE:=smoke}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/scheduler:$PWD/kernels PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name"; local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t)) s"; tail -n 25 "$OUT/$name.log"
}
if [ "$STAGE" = smoke ]; then
  step vmm 45 python3 benchmark/vmm_bench.py --out "$OUT/vmm.json"
  step pytest-gpu 150 python3 -m pytest -q -p no:cacheprovider tests/gpu \
    --deselect tests/gpu/test_flashinfer_gpu.py
  step crossing 80 python3 benchmark/crossing_bench.py --out "$OUT/crossing.json"
  step decode-smoke 170 python3 benchmark/gpu_decode_bench.py --out "$OUT/decode-smoke.json" \
    --shapes qwen3-30b-a3b --layers 2 --batches 1,4 --ctxs 1024 --steps 5
  step pytest-flashinfer 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_flashinfer_gpu.py
else
  step pytest-gpu 120 python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/gpu} \
    --deselect tests/gpu/test_flashinfer_gpu.py
  for shape in ${SHAPES:-olmoe-1b-7b qwen1.5-moe-a2.7b qwen3-30b-a3b}; do
    step "decode-$shape" "${SHAPE_LIMIT:-150}" python3 benchmark/gpu_decode_bench.py \
      --out "$OUT/decode-$shape.json" --shapes "$shape" ${DECODE_ARGS:-}
  done
fi
