#!/usr/bin/env bash
# The headline experiment of issue 6 on ONE GPU (the 2-GPU run needs a machine not lent yet).
# Run from the repository root on the GPU machine, with the wheels of
# scripts/fetch_gpu_wheels.sh in .whl/ and the traces in .carry/headline/ (made
# on the CPU machine, which has the Azure CSVs, by the commands in benchmark/README.md):
#
#   OUT=/tmp/out VARIANT=bursty bash benchmark/headline_1gpu.sh
#
# Models: 16 served names over 4 random checkpoints of the Qwen3-30B-A3B shape cut to 1 layer
# (vocab 32000, positions up to 131072), bf16. Every mode gets the same KV budget,
# --max-total-tokens 600000 (static: 1/16 of it per model). crosspool: one FFN server process
# on the same GPU, over cuda-ipc. Out: $OUT/$VARIANT/ with results.json, the plots and the
# server logs.
set -uo pipefail
: "${OUT:?}" "${VARIANT:?bursty or balanced}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/scheduler:$PWD/kernels PYTHONUNBUFFERED=1
CKPTS=/tmp/ckpts
python3 - "$CKPTS" <<'PY'
import sys, time
from pathlib import Path
from sglang_crosspool.testing.checkpoints import make_model
t = time.time()
for i in range(4):
    make_model(Path(sys.argv[1]) / f"qwen3-1l-{i}", "qwen3_moe", size="qwen3-30b-a3b", seed=i,
               dtype="bfloat16", device="cuda", num_hidden_layers=1, vocab_size=32000,
               max_position_embeddings=131072, expert_layout="fused")
print(f"4 checkpoints in {time.time() - t:.0f} s", flush=True)
PY
python3 -m benchmark.experiment --trace ".carry/headline/$VARIANT.jsonl" --checkpoints "$CKPTS" \
  --loads 1 --slo-ttft 2 --slo-tbt 0.1 --start-timeout 240 --request-timeout 240 \
  --server-args "--device cuda --attention-backend triton --context-length 131072 --max-total-tokens 600000 --max-running-requests 32 --chunked-prefill-size 2048" \
  --mode-args "crosspool=--ffn-servers 1 --ffn-transport cuda-ipc" --out "$OUT/$VARIANT"
