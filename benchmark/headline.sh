#!/usr/bin/env bash
# The headline experiment of issue 6 on GPUs: the bursty long-context trace and the balanced
# trace, each on static, monolithic and crosspool (a fresh server per mode), with a load sweep.
# Prepared on CPU; not yet run on 2 GPUs (the one-GPU run is benchmark/headline_1gpu.sh).
# Run from the repository root:
#
#   CKPTS=/models/moe SERVER_ARGS="--device cuda" \
#   CROSSPOOL_ARGS="--ffn-servers 2 --ffn-transport shm" benchmark/headline.sh
#
# In: CKPTS, a folder of checkpoints (handed to the trace's 32 model names in turn); SERVER_ARGS
# for every mode; CROSSPOOL_ARGS for crosspool only; optional MODELS (32), REQUESTS (1000),
# RATE (4 req/s), SEED (0), LOADS (0.5,1,2), SLO_TTFT (2 s), SLO_TBT (0.1 s), OUT.
# Out: OUT/{bursty,balanced}/ with trace.jsonl, results.json, the PNGs and server logs.
set -euo pipefail
: "${CKPTS:?a folder of checkpoints}"
MODELS=${MODELS:-32} REQUESTS=${REQUESTS:-1000} RATE=${RATE:-4} SEED=${SEED:-0}
LOADS=${LOADS:-0.5,1,2} SLO_TTFT=${SLO_TTFT:-2} SLO_TBT=${SLO_TBT:-0.1}
OUT=${OUT:-benchmark/results/headline-$(date +%Y%m%d-%H%M)}
PY=${PY:-.venv/bin/python}
for variant in bursty balanced; do
  mkdir -p "$OUT/$variant"
  $PY -m benchmark.trace --variant "$variant" --models "$MODELS" --requests "$REQUESTS" \
      --rate "$RATE" --seed "$SEED" --out "$OUT/$variant/trace.jsonl"
  $PY -m benchmark.experiment --trace "$OUT/$variant/trace.jsonl" --checkpoints "$CKPTS" \
      --loads "$LOADS" --slo-ttft "$SLO_TTFT" --slo-tbt "$SLO_TBT" \
      --server-args "${SERVER_ARGS:-}" --mode-args "crosspool=${CROSSPOOL_ARGS:-}" \
      --out "$OUT/$variant"
done
