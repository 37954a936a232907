#!/usr/bin/env bash
# Every figure of this folder's README, from the repository root, on a CPU (no torch needed):
#   bash benchmark/results/simulate/run.sh
# Plans and traces are rebuilt into $TMP (deterministic: planner arithmetic, trace seed 0).
set -euo pipefail
PY=${PY:-python3}
OUT=benchmark/results/simulate
TMP=${TMP:-/tmp/simulate-inputs}
mkdir -p "$TMP"
C=tests/data/model-configs
F=benchmark/results/fleet-2xh200

# 1. Validation: the fleet-2xh200 burst, the server's own limits (--cuda-graph-max-bs-decode 16
#    --max-running-requests 32 --chunked-prefill-size 2048), its plan.
$PY -m benchmark.simulate fit | tee "$OUT/fit.txt"
for m in monolithic crosspool; do
  $PY -m benchmark.simulate run --plan $F/plan.json --trace $F/$m/burst.jsonl --modes $m \
    --graph-max-bs 16 --records --out "$OUT/validate-fleet-$m.json"
done
$PY -m benchmark.simulate run --plan $F/plan.json --trace $F/crosspool/burst.jsonl \
  --modes crosspool --graph-max-bs 16 --crosspool-eager-factor 4.75 \
  --out "$OUT/validate-fleet-crosspool-eager4.75.json"

# 1b. Validation: headline-2xh200-partial (the same fleet and plan; bursty and balanced traces
#     mapped onto the fleet by popularity and clamped as fleet_gpu_run.py does, loads 1 and 3).
H=benchmark/results/headline-2xh200-partial
#     One server per mode replays bursty@1, bursty@3, balanced@1, balanced@3 in turn, as the GPU
#     run did; that run did not flush the prefix cache between loads, so the simulator keeps
#     one too (--prefix-cache): the @3 replays find their prompts cached.
$PY -m benchmark.simulate run --plan $H/plan.json --trace $H/bursty.jsonl --trace $H/balanced.jsonl \
  --modes static,monolithic,crosspool,crosspool-pipelined \
  --loads 1,3 --map-models --clamp --prefix-cache --graph-max-bs 16 \
  --out "$OUT/validate-headline.json"

# 2. Predictions. Fleets (names m00.. in priority order, configs cycled):
plan() {  # plan OUT DEVICES CONFIG...
  local out=$1 dev=$2; shift 2; local args=() i=0
  for m in "$@"; do args+=(--model-path "$C/$m" --served-model-name "m$(printf %02d $i)"); i=$((i+1)); done
  $PY -m sglang_crosspool.plan --devices "$dev" --device-memory 150754820096 \
    --mem-fraction-static 0.93 --brief "${args[@]}" --out "$out" > "${out%.json}.txt"
}
A4="Qwen3-30B-A3B Qwen1.5-MoE-A2.7B OLMoE-1B-7B-0924 Mixtral-8x7B-v0.1"
L4="Qwen1.5-MoE-A2.7B OLMoE-1B-7B-0924 Qwen3-30B-A3B OLMoE-1B-7B-0924"
plan "$TMP/plan-8gpu-16.json" 8 $A4 $A4 $A4 $A4
plan "$TMP/plan-8gpu-32.json" 8 $L4 $L4 $L4 $L4 $L4 $L4 $L4 $L4
plan "$TMP/plan-16gpu-32.json" 16 $A4 $A4 $A4 $A4 $A4 $A4 $A4 $A4
cp "$TMP"/plan-*.txt "$OUT/"
for n in 16 32; do
  for v in bursty balanced; do
    $PY -m benchmark.trace --variant $v --models $n --requests 800 --rate 4 --seed 0 \
      --out "$TMP/$v-$n.jsonl"
  done
  # long: bursty with a quarter of the requests in the long-context class (16k-128k tokens,
  # clamped to each model's context by --clamp below)
  $PY -m benchmark.trace --variant bursty --long-frac 0.25 --models $n --requests 800 \
    --rate 4 --seed 0 --out "$TMP/long-$n.jsonl"
done
sim() {  # sim NAME PLAN TRACE [flags]
  local name=$1 plan=$2 trace=$3; shift 3
  $PY -m benchmark.simulate run --plan "$plan" --trace "$trace" --clamp "$@" \
    --modes static,monolithic,crosspool,crosspool-pipelined \
    --out "$OUT/predict-$name.json" | sed "s/^/$name /"
}
for v in bursty balanced long; do
  for ts in 1 2 4; do  # arrival times x1: 4 req/s; x2: 2 req/s; x4: 1 req/s
    sim 8gpu-16-$v-x$ts "$TMP/plan-8gpu-16.json" "$TMP/$v-16.jsonl" --time-scale $ts
    sim 8gpu-32-$v-x$ts "$TMP/plan-8gpu-32.json" "$TMP/$v-32.jsonl" --time-scale $ts
    sim 16gpu-2node-32-$v-x$ts "$TMP/plan-16gpu-32.json" "$TMP/$v-32.jsonl" --time-scale $ts \
      --gpus-per-node 8
  done
done | tee "$OUT/predict.txt"
$PY -m benchmark.simulate table "$OUT" > "$OUT/tables.md"
