"""Crosspool against monolithic decode on two GPUs, at real shapes and full layer counts.

    PYTHONPATH=$PWD:$PWD/scheduler:$PWD/kernels python benchmark/crosspool_decode_bench.py \
        --out decode.json [--shapes qwen3-30b-a3b,...] [--cells 1x1024,16x32768] [--fp32-check]

Each shape is a real config.json (tests/data/model-configs) served with `load_format="dummy"`
(random bf16 weights made on the GPU), bf16, the Triton attention backend, decode graphs of
the batch sizes the cells use. Modes, one engine at a time:
- `monolithic`: everything on GPU 0 (CUDA graphs);
- `p2p-mb1`, `p2p-mb2`: crosspool, attention and the KV pool on GPU 0, one FFN server holding
  every expert on GPU 1, the p2p crossing, decode graphs on both sides; mb2 pipelines two
  micro-batches inside the graph.
Per cell (batch B, context C; C only where the model's positions allow): the KV of B
sequences of C tokens is filled with random values (no prefill), then `steps` decode steps as
the engine runs them (graph replay, greedy pick on the host, the FFN error check) are timed
on the wall clock: ms per token = ms per step. Ratios are against monolithic.
For p2p cells, `bubble` is measured on the GPU by the torch profiler over 5 steps: GPU 0's time
inside the crossing's wait kernels (spinning for the FFN output, plus the final sum) over the
step's GPU time, by CUDA events.
Parity: greedy tokens of `Engine.generate` (4 prompts x 24 tokens) against monolithic's, in
bf16 (the matching prefix per prompt); `--fp32-check`: a 4-layer OLMoE cut in float32, p2p
with two micro-batches and graphs against monolithic, tokens must be equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmark.gpu_decode_bench import FakeContext
from sglang_crosspool import Engine
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.testing.checkpoints import make_config_only

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "model-configs"
SHAPES = {"qwen3-30b-a3b": "Qwen3-30B-A3B", "qwen1.5-moe-a2.7b": "Qwen1.5-MoE-A2.7B",
          "olmoe-1b-7b": "OLMoE-1B-7B-0924"}
MODES = {
    "monolithic": dict(pool_mode="monolithic"),
    "p2p-mb1": dict(pool_mode="crosspool", ffn_transport="p2p", ffn_device="cuda:1"),
    "p2p-mb2": dict(pool_mode="crosspool", ffn_transport="p2p", ffn_device="cuda:1",
                    pipeline_microbatches=2),
}


def engine_for(path: str, mode: str, batches: list[int], max_ctx: int, kv_bytes: int,
               dtype: str = "bfloat16") -> Engine:
    return Engine(path, device="cuda:0", dtype=dtype, load_format="dummy",
                  attention_backend="triton", cuda_graph_bs=batches,
                  max_running_requests=max(batches), context_length=max_ctx,
                  chunked_prefill_size=2048, kv_budget_bytes=kv_bytes, **MODES[mode])


def step_fn(engine: Engine, name: str, fake: FakeContext, batch: int):
    core = engine.core
    graphs = core.graphs[name]
    rows = list(range(batch))
    assert graphs.fits(fake.lists), "the cell's batch has no decode graph"

    def step():
        logits = graphs.run(fake.lists, rows)
        ids = logits.argmax(-1).tolist()
        core.ffn.end_step()
        return ids

    return step


def time_cell(engine, name, batch, ctx, steps, bubble: bool) -> dict:
    fake = FakeContext(engine, name, batch, ctx)
    try:
        step = step_fn(engine, name, fake, batch)
        for _ in range(3):
            step()
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            walls.append((time.perf_counter() - t0) * 1e3)
        row = {"batch": batch, "ctx": ctx, "ms_per_token": round(statistics.median(walls), 4),
               "p90_ms": round(sorted(walls)[int(0.9 * len(walls))], 4)}
        if bubble:
            row.update(gpu_bubble(step))
        return row
    finally:
        fake.free()


def gpu_bubble(step, n: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(n):
            step()
        end.record()
        torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / n
    wait_us = busy_us = 0.0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        busy_us += t
        if "wait_sum" in e.key:
            wait_us += t
    return {"gpu_step_ms": round(step_ms, 4), "wait_kernel_ms": round(wait_us / n / 1e3, 4),
            "gpu_busy_ms": round(busy_us / n / 1e3, 4),
            "bubble": round(wait_us / n / 1e3 / step_ms, 4) if step_ms else None}


def generate_tokens(engine: Engine, vocab: int, n_prompts=4, new=24) -> list[list[int]]:
    prompts = [[(37 * i + 11 * j + 5) % vocab for j in range(64)] for i in range(n_prompts)]
    outs = engine.generate(input_ids=prompts, sampling_params={
        "max_new_tokens": new, "temperature": 0, "ignore_eos": True})
    return [o["output_ids"] for o in outs]


def prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def shape_setup(shape: str, cells, root: Path):
    path = str(make_config_only(root / shape, CONFIGS / SHAPES[shape]))
    spec, _ = resolve(path)
    cells = [(b, c) for b, c in cells if c + 64 <= spec.max_position_embeddings]
    kv_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2
    kv_bytes = int(1.15 * max(b * (c + 64) for b, c in cells) * kv_token) + (2 << 30)
    return path, spec, cells, kv_bytes


def run_mode(shape: str, mode: str, cells, steps: int, root: Path) -> dict:
    """One engine of one mode (in its own process: see `run_shape`)."""
    path, spec, cells, kv_bytes = shape_setup(shape, cells, root)
    batches = sorted({b for b, _ in cells} | {4})
    max_ctx = max(c for _, c in cells) + 64
    t0 = time.perf_counter()
    entry = {"cells": []}
    engine = engine_for(path, mode, batches, max_ctx, kv_bytes)
    try:
        entry["start_s"] = round(time.perf_counter() - t0, 1)
        stats = engine.stats()
        entry["attention_bytes"] = stats["attention_bytes"]
        entry["ffn_bytes_per_server"] = stats["ffn_bytes_per_server"]
        entry["graphs"] = stats["cuda_graphs"]
        name = engine.core.config.models[0].name
        for batch, ctx in cells:
            row = time_cell(engine, name, batch, ctx, steps, bubble=mode != "monolithic")
            entry["cells"].append(row)
            print(shape, mode, row, flush=True)
        entry["tokens"] = generate_tokens(engine, spec.vocab_size)
    finally:
        engine.shutdown()
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    return entry


def in_process(args: list[str], timeout_s: float) -> dict:
    """Runs `--worker ARGS` of this script in a fresh process (one p2p pool per process: a
    process group and its symmetric memory are made once) and returns its JSON."""
    import subprocess
    import sys

    out = Path(tempfile.mkdtemp(prefix="cp-worker-")) / "out.json"
    cmd = [sys.executable, "-m", "benchmark.crosspool_decode_bench", "--out", str(out),
           "--worker", *args]
    try:
        proc = subprocess.run(cmd, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"worker exited with {proc.returncode}"}
    return json.loads(out.read_text())


def run_shape(shape: str, cells, steps: int, root: Path, modes: list[str],
              timeout_s: float) -> dict:
    path, spec, cells, kv_bytes = shape_setup(shape, cells, root)
    report = {"shape": shape, "layers": spec.num_layers, "hidden": spec.hidden_size,
              "experts": spec.num_experts, "top_k": spec.top_k, "kv_bytes": kv_bytes,
              "modes": {}}
    cell_arg = ",".join(f"{b}x{c}" for b, c in cells)
    for mode in modes:
        report["modes"][mode] = in_process(["mode", shape, mode, cell_arg, str(steps)],
                                           timeout_s)
    base = {(r["batch"], r["ctx"]): r["ms_per_token"]
            for r in report["modes"].get("monolithic", {}).get("cells", [])}
    mono_tokens = report["modes"].get("monolithic", {}).get("tokens")
    for mode, entry in report["modes"].items():
        for row in entry.get("cells", []):
            ref = base.get((row["batch"], row["ctx"]))
            if ref:
                row["vs_monolithic"] = round(row["ms_per_token"] / ref, 3)
        if mode != "monolithic" and mono_tokens and entry.get("tokens"):
            entry["bf16_tokens_matching_prefix"] = [
                prefix(a, b) for a, b in zip(mono_tokens, entry["tokens"])]
    return report


def fp32_mode(mode: str, root: Path) -> dict:
    path = str(make_config_only(root / "olmoe-4l", CONFIGS / SHAPES["olmoe-1b-7b"],
                                num_hidden_layers=4))
    spec, _ = resolve(path)
    engine = engine_for(path, mode, [1, 2, 4], 1024, 1 << 30, dtype="float32")
    try:
        return {"tokens": generate_tokens(engine, spec.vocab_size),
                "graph_runs": sum(g["runs"] for g in engine.stats()["cuda_graphs"].values())}
    finally:
        engine.shutdown()


def fp32_check(timeout_s: float) -> dict:
    out = {mode: in_process(["fp32", mode], timeout_s) for mode in ("monolithic", "p2p-mb2")}
    out["equal"] = (out["monolithic"].get("tokens") is not None
                    and out["monolithic"].get("tokens") == out["p2p-mb2"].get("tokens"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--cells", default="1x1024,4x1024,16x1024,64x1024,1x32768,16x32768")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fp32-check", action="store_true")
    p.add_argument("--mode-timeout", type=float, default=300, help="seconds per engine")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.out)
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
    result = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "shapes": []}
    root = Path(tempfile.mkdtemp(prefix="cp-decode-"))
    if args.fp32_check:
        result["fp32_check"] = fp32_check(args.mode_timeout)
        print("fp32 tokens equal:", result["fp32_check"]["equal"], flush=True)
    for shape in args.shapes.split(","):
        result["shapes"].append(run_shape(shape, cells, args.steps, root,
                                          args.modes.split(","), args.mode_timeout))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    summarize(result)


def worker(argv: list[str], out: str) -> None:
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(280, exit=False, file=sys.stderr)  # where a hang sits
    root = Path(tempfile.mkdtemp(prefix="cp-decode-"))
    try:
        if argv[0] == "fp32":
            result = fp32_mode(argv[1], root)
        else:
            _, shape, mode, cell_arg, steps = argv
            cells = [tuple(int(v) for v in c.split("x")) for c in cell_arg.split(",")]
            result = run_mode(shape, mode, cells, int(steps), root)
    except Exception as e:  # noqa: BLE001 - the parent records it
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:2000]}
    with open(out, "w") as f:
        json.dump(result, f)


def summarize(result: dict) -> None:
    print(f"{'shape':<20}{'mode':<12}{'B':>4}{'ctx':>7}{'ms/tok':>9}{'x mono':>8}{'bubble':>8}")
    for shape in result["shapes"]:
        for mode, entry in shape["modes"].items():
            if "error" in entry:
                print(f"{shape['shape']:<20}{mode:<12} ERROR {entry['error'][:200]}")
            for r in entry["cells"]:
                print(f"{shape['shape']:<20}{mode:<12}{r['batch']:>4}{r['ctx']:>7}"
                      f"{r['ms_per_token']:>9.3f}{r.get('vs_monolithic', float('nan')):>8.3f}"
                      f"{r.get('bubble') or float('nan'):>8.3f}")
            if "bf16_tokens_matching_prefix" in entry:
                print(f"  tokens vs monolithic, matching prefix of 24: "
                      f"{entry['bf16_tokens_matching_prefix']}")


if __name__ == "__main__":
    main()
