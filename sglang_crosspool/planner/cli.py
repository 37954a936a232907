"""Command line: `python -m sglang_crosspool.plan --model-path A --model-path B --devices 2
--device-memory 80GB [--traffic traffic.yaml] [--dtype bfloat16] [--monolithic-layout packed|tp]
[--out plan.json]`.

In: the flags above. Out: the readable plan on stdout, plan.json when --out is given; on bad
input one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sglang_crosspool.planner.errors import PlanError
from sglang_crosspool.planner.figure import parse_size
from sglang_crosspool.planner.plan import (
    DEFAULT_MAX_RUNNING,
    DEFAULT_MEM_FRACTION,
    DEFAULT_PAGE_BYTES,
    build_plan,
)
from sglang_crosspool.planner.report import render
from sglang_crosspool.planner.schema import to_json
from sglang_crosspool.planner.weights import DTYPE_BYTES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sglang_crosspool.plan",
        description="Plan GPU memory for serving MoE models in static, monolithic and crosspool "
        "pool modes, from their config.json files (no weights are read).")
    p.add_argument("--model-path", action="append", required=True,
                   help="checkpoint directory with config.json; repeat, in priority order")
    p.add_argument("--served-model-name", action="append",
                   help="name per --model-path (default: the directory name); repeat")
    p.add_argument("--devices", type=int, required=True, help="number of GPUs")
    p.add_argument("--device-memory", required=True,
                   help="memory of each GPU: 80GB (10^9 B), 80GiB (2^30 B) or bytes")
    p.add_argument("--traffic", help="JSON or YAML: model name -> {rate, mean_context, "
                   "max_context, max_running, cached_prefix}; a 'default' entry applies to every model")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES),
                   help="dtype of weights and KV cache (default bfloat16)")
    p.add_argument("--mem-fraction-static", type=float, default=DEFAULT_MEM_FRACTION,
                   help="share of each GPU for weights + KV; the rest is left for activations "
                   f"and CUDA graphs (default {DEFAULT_MEM_FRACTION})")
    p.add_argument("--kv-page-bytes", default=str(DEFAULT_PAGE_BYTES),
                   help="KV page size (default 2MiB, the CUDA VMM granularity)")
    p.add_argument("--max-running-requests", type=int, default=DEFAULT_MAX_RUNNING,
                   help="concurrent requests per model that `static` reserves worst-case KV "
                   f"for, unless the traffic file says (default {DEFAULT_MAX_RUNNING})")
    p.add_argument("--monolithic-layout", choices=("packed", "tp"), default="packed",
                   help="monolithic mode: packed (default; each model whole on one GPU, "
                   "bin-packed) or tp (every model over every GPU with attention TP; `launch "
                   "--plan` serves it as one worker at --tp-size N)")
    p.add_argument("--out", help="write the plan as JSON here (read back with load_plan)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the report")
    p.add_argument("--brief", action="store_true", help="tables only, without the arithmetic")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        plan = build_plan(
            args.model_path, args.devices, parse_size(args.device_memory, "--device-memory"),
            dtype=args.dtype, traffic=args.traffic,
            mem_fraction_static=args.mem_fraction_static,
            page_bytes=parse_size(args.kv_page_bytes, "--kv-page-bytes"),
            max_running=args.max_running_requests, served_names=args.served_model_name,
            monolithic_layout=args.monolithic_layout)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = to_json(plan) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text if args.json else render(plan, arithmetic=not args.brief), end="")
    if args.out and not args.json:
        print(f"plan written to {args.out}")
    return 0
