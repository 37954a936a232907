#!/usr/bin/env bash
# Two H200s on NVLink (device kind nvidia-h200-x2): data-parallel attention sharing one weights
# pool (issue 11), tensor / expert parallelism (issue 21), attention sequence split (issue 16).
# Run from the repository root on the GPU machine, the server's wheels in $WHL:
#
#   OUT=/tmp/out STAGE=a WHL=.whl bash benchmark/x2_session.sh   # dp + tp
#   OUT=/tmp/out STAGE=b WHL=.whl bash benchmark/x2_session.sh   # seq split (DP_TOO=1: dp first)
#   OUT=/tmp/out STAGE=c WHL=.whl bash benchmark/x2_session.sh   # tp again + served at TP 2 / EP 2
#   OUT=/tmp/out STAGE=d WHL=.whl bash benchmark/x2_session.sh   # symmetric-memory all-reduce
#
# Each step has its own time limit; everything lands in $OUT, packed into $OUT/all.tgz too.
set -uo pipefail
: "${OUT:?}" "${STAGE:=a}" "${WHL:=.whl}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/scheduler:$PWD/kernels PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name"; local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t)) s"; tail -n 12 "$OUT/$name.log" | cut -c1-600
}
if [ "$STAGE" = a ]; then
  step dp "${DP_LIMIT:-170}" python3 benchmark/dp_gpu_run.py --out "$OUT/dp.json" \
    --shapes OLMoE-1B-7B-0924,Qwen1.5-MoE-A2.7B --requests 16 --max-tokens 64 \
    --layouts "${DP_LAYOUTS:-crosspool-dp1,crosspool-dp2}" ${DP_ARGS:-}
  step tp "${TP_LIMIT:-190}" python3 benchmark/tp_gpu_bench.py --out "$OUT/tp.json" ${TP_ARGS:-}
  # Mixtral-8x7B at full depth: at TP 2 each GPU holds half of its 87 GiB, so the KV left
  # to it is what one GPU alone cannot give
  step tp-mixtral "${MIX_LIMIT:-170}" python3 benchmark/tp_gpu_bench.py --out "$OUT/tp-mixtral.json" \
    --model-config tests/data/model-configs/Mixtral-8x7B-v0.1 --layers 32 --modes tp1,tp2 \
    --kv-gib auto --batches 1,16
elif [ "$STAGE" = c ]; then  # tensor / expert parallelism again, and served through the server
  step tp "${TP_LIMIT:-180}" python3 benchmark/tp_gpu_bench.py --out "$OUT/tp.json" ${TP_ARGS:-}
  step tp-mixtral "${MIX_LIMIT:-100}" python3 benchmark/tp_gpu_bench.py --out "$OUT/tp-mixtral.json" \
    --model-config tests/data/model-configs/Mixtral-8x7B-v0.1 --layers 32 --modes tp1,tp2 \
    --kv-gib auto --batches 1,16 --no-symm-mem
  step serve-tp "${SERVE_LIMIT:-180}" python3 benchmark/dp_gpu_run.py --out "$OUT/serve-tp.json" \
    --shapes OLMoE-1B-7B-0924,Qwen1.5-MoE-A2.7B --requests 16 --max-tokens 64 \
    --layouts monolithic-tp1,monolithic-tp2,monolithic-ep2
elif [ "$STAGE" = d ]; then  # the all-reduce through symmetric memory against NCCL
  step tp-symm "${TP_LIMIT:-120}" python3 benchmark/tp_gpu_bench.py --out "$OUT/tp-symm.json" \
    --modes tp1+graph,tp2+graph,tp2+graph+symm,ep2+graph,ep2+graph+symm --no-symm-mem
  step serve-symm "${SERVE_LIMIT:-120}" python3 benchmark/dp_gpu_run.py --out "$OUT/serve-symm.json" \
    --shapes OLMoE-1B-7B-0924,Qwen1.5-MoE-A2.7B --requests 16 --max-tokens 64 \
    --layouts monolithic-tp2,monolithic-tp2-symm
else
  [ -n "${DP_TOO:-}" ] && step dp "${DP_LIMIT:-150}" python3 benchmark/dp_gpu_run.py \
    --out "$OUT/dp.json" --shapes OLMoE-1B-7B-0924,Qwen1.5-MoE-A2.7B --requests 16 \
    --max-tokens 64 --layouts "${DP_LAYOUTS:-crosspool-dp1,crosspool-dp2}" ${DP_ARGS:-}
  step seq "${SEQ_LIMIT:-400}" python3 benchmark/seq_split_gpu_bench.py --out "$OUT/seq-split.json" \
    ${SEQ_ARGS:-}
fi
(cd "$OUT" && tar czf /tmp/all.tgz --exclude=all.tgz . && mv /tmp/all.tgz all.tgz)
