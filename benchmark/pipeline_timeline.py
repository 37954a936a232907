"""Layer-wise pipeline on real FFN server processes: decode throughput and bubble fraction with
1, 2 and 3 micro-batches in flight, plus the per-layer timeline of one pipelined step.

    .venv/bin/python benchmark/pipeline_timeline.py --out benchmark/results/pipeline-cpu

Writes <out>.json (figures and the timeline spans) and, with matplotlib, <out>.png (the
timeline). On a CPU the FFN servers share the machine's cores with the attention worker, so
this shows the mechanism and its bookkeeping, not GPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from sglang_crosspool import Engine
from sglang_crosspool.testing.checkpoints import make_model


def run(path: str, depth: int, args) -> tuple[dict, list]:
    engine = Engine(path, pool_mode="crosspool", ffn_servers=args.servers, ffn_transport="shm",
                    pipeline_microbatches=depth)
    try:
        prompts = [[(7 * i + j) % 900 + 3 for j in range(args.prompt_len)]
                   for i in range(args.batch)]
        params = {"max_new_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}
        engine.generate(input_ids=prompts[:1], sampling_params=dict(params, max_new_tokens=2))
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=params)
        wall = time.perf_counter() - start
        pipe = engine.stats()["pipeline"]
        timeline = engine.core.last_timeline
        figures = {
            "micro_batches": depth,
            "wall_s": wall,
            "tokens_per_s": args.batch * args.new_tokens / wall,
            "pipelined_steps": pipe["steps"],
            "bubble_fraction": pipe["bubble_fraction"],
        }
        return figures, timeline.to_json() if timeline else []
    finally:
        engine.shutdown()


def plot(spans: list[dict], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"attention": "tab:blue", "submit": "tab:orange", "wait": "tab:red"}
    t0 = min(s["start"] for s in spans)
    fig, ax = plt.subplots(figsize=(11, 2.6))
    for s in spans:
        ax.barh(s["mb"], (s["end"] - s["start"]) * 1e3, left=(s["start"] - t0) * 1e3,
                color=colors[s["kind"]], edgecolor="none")
    ax.set_yticks(sorted({s["mb"] for s in spans}))
    ax.set_ylabel("micro-batch")
    ax.set_xlabel("ms (attention worker)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()],
              loc="upper right", ncol=3, fontsize=8)
    ax.set_title("one pipelined decode step: attention, FFN submit, wait for the weights pool")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="path prefix for .json and .png")
    parser.add_argument("--arch", default="qwen3_moe")
    parser.add_argument("--size", default="small")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        path = str(make_model(Path(root) / args.arch, args.arch, size=args.size))
        results, spans = [], []
        for depth in (1, 2, 3):
            figures, timeline = run(path, depth, args)
            results.append(figures)
            print(json.dumps(figures), flush=True)
            if depth == 2:
                spans = timeline
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "args": vars(args),
              "results": results, "timeline_2_micro_batches": spans}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    if spans and plot(spans, out.with_suffix(".png")):
        print("wrote", out.with_suffix(".png"))


if __name__ == "__main__":
    main()
