#!/usr/bin/env bash
# The headline benchmark of issue 12 on 2 x H200, one pool mode per call (each call fits the
# device tool's 10-minute limit). From the repository root (or a copy of it) with the wheels
# of scripts/fetch_gpu_wheels.sh in WHL (default .whl):
#
#   OUT=/tmp/out MODE=monolithic bash benchmark/headline_2gpu.sh
#   OUT=/tmp/out MODE=crosspool EXTRA=--pipeline-models bash benchmark/headline_2gpu.sh
#
# Each call: the traces (made here from benchmark/data/azure2023: bursty with a long-context
# class up to 40,000 tokens, balanced; 60 requests at 3 req/s each), the fleet and its plan
# (benchmark/fleet_gpu_run.py), one fresh server of MODE replaying both traces at LOADS
# (default 0.5,1,2,3,4), then the capacity trace once: 78 requests of 8,000 prompt tokens for
# qwen15-a at once (about 629,000 tokens of KV: more than the 351,232 monolithic's GPU pool
# holds for it, less than crosspool's 666,624). Results: $OUT/fleet.tgz. Then, on the CPU
# machine, one report over the calls' results:
#
#   python -m benchmark.headline_report --run monolithic=<untarred>/fleet/monolithic \
#       --run crosspool=<untarred>/fleet/crosspool --out benchmark/results/headline-2xh200-<date>
set -uo pipefail
: "${OUT:?}" "${MODE:?static, monolithic or crosspool}"
LOADS=${LOADS:-0.5,1,2,3,4}
mkdir -p "$OUT/traces"
T=$OUT/traces
python3 -m benchmark.trace --variant bursty --models 5 --requests 60 --rate 3 --seed 0 \
  --long-frac 0.15 --long-min 8192 --long-max 40000 --max-output 384 --out "$T/bursty.jsonl"
python3 -m benchmark.trace --variant balanced --models 5 --requests 60 --rate 3 --seed 0 \
  --max-output 384 --out "$T/balanced.jsonl"
python3 - "$T/capacity.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(78):
        f.write(json.dumps({"id": i, "t": round(0.02 * i, 3), "model": "qwen15-a",
                            "prompt_len": 8000, "output_len": 64, "long": True,
                            "prompt_seed": 5000 + i}) + "\n")
PY
LIMIT=${LIMIT:-560} bash benchmark/fleet_gpu_run.sh --modes "$MODE" --per-model 0 \
  --server-args "--cuda-graph-max-bs-decode 16 --max-running-requests 96 --chunked-prefill-size 4096 ${EXTRA:-}" \
  --trace "$T/bursty.jsonl" --trace "$T/balanced.jsonl" --trace "$T/capacity.jsonl:1" \
  --loads "$LOADS" --request-timeout 120
