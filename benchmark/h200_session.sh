#!/usr/bin/env bash
# One H200 (device kind nvidia-h200): the small-batch MoE kernel (issue 13) and loading a model
# into a running server (issue 19). Run from the repository root on the GPU machine, with the
# server's wheels in $WHL and, optionally, a newer FlashInfer's wheels in $FI_WHL:
#
#   OUT=/tmp/out STAGE=load   WHL=.whl FI_WHL=.whl-fi bash benchmark/h200_session.sh
#   OUT=/tmp/out STAGE=decode WHL=.whl FI_WHL=.whl-fi bash benchmark/h200_session.sh
#   OUT=/tmp/out STAGE=dp WHL=.whl bash benchmark/h200_session.sh
#
# load:   the small-batch MoE GPU tests and kernel benchmark; FlashInfer from $FI_WHL imported
#         and its GPU tests run; /load_model + /unload_model of a full-depth Qwen3-30B-A3B
#         shape into a server serving OLMoE and Qwen1.5-MoE (monolithic, then crosspool with
#         one cuda-ipc FFN server on the same GPU).
# decode: gpu_decode_bench per shape with --moe-small-batch auto,off (the kernel against the
#         fused-MoE path in one run, same commit), batch 1-64, 1k and 32k context.
# Each step has its own time limit; everything lands in $OUT, packed into $OUT/all.tgz too.
set -uo pipefail
: "${OUT:?}" "${STAGE:=load}" "${WHL:=.whl}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/scheduler:$PWD/kernels PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -n "${FI_WHL:-}" ] && ls "$FI_WHL"/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fisite "$FI_WHL"/*.whl
  if PYTHONPATH=/tmp/fisite:$PYTHONPATH python3 -c "import flashinfer; print(flashinfer.__version__)" \
      > "$OUT/flashinfer-import.txt" 2>&1; then
    export PYTHONPATH=/tmp/fisite:$PYTHONPATH
  fi
  tail -n 5 "$OUT/flashinfer-import.txt"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
git log -1 --format=%H > "$OUT/commit.txt" 2>/dev/null || true
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name"; local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t)) s"; tail -n 20 "$OUT/$name.log"
}
if [ "$STAGE" = load ]; then
  step pytest-moe-small-batch 90 python3 -m pytest -q -p no:cacheprovider \
    tests/gpu/test_kernels_gpu.py -k "moe_small_batch or fused_moe"
  step moe-kernel 110 python3 benchmark/moe_kernel_bench.py --out "$OUT/moe-kernel.json" \
    --write-configs "$OUT/tuned" --budget-s 60
  step pytest-flashinfer 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_flashinfer_gpu.py
  step load-model 260 python3 benchmark/load_model_bench.py --device cuda \
    --shapes OLMoE-1B-7B-0924,Qwen1.5-MoE-A2.7B --load-shape Qwen3-30B-A3B --repeats 2 \
    --modes monolithic,crosspool --crosspool-args "--ffn-servers 1 --ffn-transport cuda-ipc" \
    --out "$OUT/load-model-h200.json"
elif [ "$STAGE" = dp ]; then  # data-parallel replicas sharing one FFN server over cuda-ipc
  step dp-ipc 200 python3 benchmark/dp_gpu_run.py --out "$OUT/dp-ipc.json" \
    --shapes OLMoE-1B-7B-0924,Qwen1.5-MoE-A2.7B --requests 16 --max-tokens 64 \
    --layouts crosspool-ipc-dp1,crosspool-ipc-dp2
else
  for shape in ${SHAPES:-olmoe-1b-7b qwen3-30b-a3b qwen1.5-moe-a2.7b}; do
    step "decode-$shape" "${SHAPE_LIMIT:-170}" python3 benchmark/gpu_decode_bench.py \
      --out "$OUT/decode-$shape.json" --shapes "$shape" --moe-small-batch auto,off \
      --backends "${BACKENDS:-triton}" --steps 10 ${DECODE_ARGS:-}
  done
fi
(cd "$OUT" && tar czf /tmp/all.tgz --exclude=all.tgz . && mv /tmp/all.tgz all.tgz)
