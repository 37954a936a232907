"""The small-batch MoE path against the fused-MoE GEMM, per model shape and batch (issue 13).

    python benchmark/moe_kernel_bench.py --out /tmp/moe.json          # one H200, < 2 min
    python benchmark/moe_kernel_bench.py --device cpu --out /tmp/m.json  # tiny shape, CPU

One command, standalone (it puts the repository's packages on sys.path itself). For each shape
(experts as the engine holds them, bf16, random weights; `--layers` copies of a layer's
experts so that consecutive calls read different weights, as a model's layers do) and each
batch (1, 2, 4, 8):
- baseline: what `FFNHalf.forward` ran before the small-batch path: `fused_moe` (align, two
  grouped GEMMs, sum), plus the shared expert in torch ops and its sigmoid gate where the
  model has one (Qwen1.5-MoE);
- small: `moe_small_batch` (shared expert in the same launches), at its default config and at
  a few others (a sweep cut short once `--budget-s` is spent; default and baseline always run).
Each call gets its own random routing; a CUDA graph of `--calls` calls is replayed and timed
by CUDA events (per call = replay / calls). `bound_us` = bytes of the experts the call touches
(+ shared expert) over the HBM bandwidth measured by a copy; `of_bound` = bound / time. Every
row also holds the max |difference| from the baseline's output. The JSON ends with the best
config per shape and batch, as the tuned-config files `crosspool_kernels/tuned.py` reads
(`--write-configs DIR` writes them there). On CPU everything runs at a tiny shape under
TRITON_INTERPRET=1 (no graphs) to check the script; its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root, for benchmark.gpu_env
    sys.path.insert(0, str(ROOT))

from benchmark.gpu_env import setup_paths  # noqa: E402

# name -> hidden, expert intermediate, experts, top-k, shared expert intermediate, gated
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8, 0, False),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4, 5632, True),
    "olmoe-1b-7b": (2048, 1024, 64, 8, 0, False),
    "mixtral-8x7b": (4096, 14336, 8, 2, 0, False),
    "tiny": (64, 48, 8, 2, 32, True),
}
# Tried after the default, in this order, while the time budget lasts (merged over it).
SWEEP = [
    {"DOWN_BLOCK_N": 8},
    {"SPLIT_K": 1},
    {"BLOCK_N": 8},
    {"BLOCK_N": 32, "DOWN_BLOCK_N": 32, "num_warps": 8},
    {"BLOCK_K": 512, "DOWN_BLOCK_K": 512, "num_warps": 8},
    {"DOWN_BLOCK_N": 8, "SPLIT_K": 1},
]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated of {', '.join(SHAPES)} (default: all but tiny on "
                        f"CUDA, tiny on CPU)")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--layers", type=int, default=4, help="copies of each shape's experts")
    p.add_argument("--calls", type=int, default=16, help="calls per timed graph")
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=80.0,
                   help="seconds after which the config sweep stops (defaults still run)")
    p.add_argument("--write-configs", default=None, metavar="DIR",
                   help="write the best config per shape as tuned-config JSON files here")
    return p.parse_args(argv)


class Case:
    """One shape's weights (`layers` copies) and `calls` routings at one batch size."""

    def __init__(self, shape: str, batch: int, args, device, dtype, weights: list):
        import torch

        hidden, inter, experts, top_k, shared, gated = SHAPES[shape]
        self.shape, self.batch, self.top_k = shape, batch, top_k
        self.hidden, self.inter, self.shared = hidden, inter, shared
        self.weights = weights
        gen = torch.Generator(device="cpu").manual_seed(batch)
        self.inputs = []
        touched = []
        for i in range(args.calls):
            h = torch.randn(batch, hidden, generator=gen).to(device, dtype)
            probs = torch.randn(batch, experts, generator=gen).softmax(-1)
            w, ids = torch.topk(probs, top_k)
            self.inputs.append((h, w.to(device, dtype), ids.to(device), i % len(weights)))
            touched.append(ids.unique().numel())
        self.touched = statistics.mean(touched)
        self.bytes = 2 * (self.touched * 3 * hidden * inter + 3 * hidden * shared
                          + (hidden if gated else 0))

    def baseline(self, i):
        import torch
        import torch.nn.functional as F
        from crosspool_kernels.fused_moe import fused_moe

        h, w, ids, layer = self.inputs[i]
        lw = self.weights[layer]
        out = fused_moe(h, lw["w13"], lw["w2"], w, ids)
        if lw["s13"] is not None:  # as FFNHalf.forward runs the shared expert
            gate, up = F.linear(h, lw["s13"]).chunk(2, dim=-1)
            shared = F.linear(F.silu(gate) * up, lw["s2"])
            if lw["sgate"] is not None:
                shared = torch.sigmoid(F.linear(h, lw["sgate"])) * shared
            out = out + shared
        return out

    def small(self, i, config):
        from crosspool_kernels.moe_small_batch import moe_small_batch

        h, w, ids, layer = self.inputs[i]
        lw = self.weights[layer]
        return moe_small_batch(h, lw["w13"], lw["w2"], w, ids, shared_w13=lw["s13"],
                               shared_w2=lw["s2"], shared_gate=lw["sgate"], config=config)


def make_weights(shape: str, layers: int, device, dtype) -> list:
    import torch

    hidden, inter, experts, _, shared, gated = SHAPES[shape]
    out = []
    for _ in range(layers):
        lw = {"w13": torch.empty(experts, 2 * inter, hidden, device=device, dtype=dtype),
              "w2": torch.empty(experts, hidden, inter, device=device, dtype=dtype),
              "s13": None, "s2": None, "sgate": None}
        if shared:
            lw["s13"] = torch.empty(2 * shared, hidden, device=device, dtype=dtype)
            lw["s2"] = torch.empty(hidden, shared, device=device, dtype=dtype)
        if gated:
            lw["sgate"] = torch.empty(1, hidden, device=device, dtype=dtype)
        for t in lw.values():
            if t is not None:
                t.normal_(0, 1 / t.shape[-1] ** 0.5)
        out.append(lw)
    return out


def time_calls(case: Case, fn, args, device) -> tuple[float, list]:
    """Microseconds per call (a CUDA graph of every call, replayed), and the eager outputs."""
    import torch

    outs = [fn(i) for i in range(len(case.inputs))]  # compiles, and the outputs to compare
    if device.type != "cuda":
        t0 = time.perf_counter()
        for i in range(len(case.inputs)):
            fn(i)
        return 1e6 * (time.perf_counter() - t0) / len(case.inputs), outs
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(len(case.inputs)):
            fn(i)
    for _ in range(2):
        graph.replay()
    times = []
    for _ in range(args.replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(case.inputs))
    del graph
    return statistics.median(times), outs


def hbm_bandwidth(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * (2 << 30) * 10 / (start.elapsed_time(end) / 1e3)


def run_case(case: Case, args, device, bandwidth, deadline, rows: list) -> dict:
    from crosspool_kernels.moe_small_batch import default_config, small_batch_config

    def row(path, us, config=None, diff=None):
        r = {"shape": case.shape, "batch": case.batch, "path": path, "us": round(us, 2),
             "touched_experts": case.touched, "bytes": int(case.bytes)}
        if config is not None:
            r["config"] = config
        if diff is not None:
            r["max_abs_diff_vs_baseline"] = diff
        if bandwidth:
            bound = case.bytes / bandwidth * 1e6
            r.update(bound_us=round(bound, 2), of_bound=round(bound / us, 3))
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    base_us, base_out = time_calls(case, case.baseline, args, device)
    row("fused_moe", base_us)
    default = small_batch_config(case.batch, len(case.weights[0]["w13"]), case.hidden,
                                 case.inter, device, case.inputs[0][0].dtype)
    candidates = [default] + [{**default_config(case.batch, case.hidden, case.inter, device),
                               **extra} for extra in SWEEP]
    best = None
    for n, cfg in enumerate(candidates):
        if n and time.perf_counter() > deadline:
            rows.append({"shape": case.shape, "batch": case.batch, "path": "small",
                         "skipped": f"{len(candidates) - n} configs past --budget-s"})
            break
        us, outs = time_calls(case, lambda i, c=cfg: case.small(i, c), args, device)
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, base_out))
        r = row("small" if n == 0 else "small_sweep", us, cfg, diff)
        if best is None or r["us"] < best["us"]:
            best = r
    return {"shape": case.shape, "batch": case.batch, "fused_moe_us": round(base_us, 2),
            "small_default_us": rows_default(rows, case), "small_best_us": best["us"],
            "best_config": best["config"], "speedup_best": round(base_us / best["us"], 3)}


def rows_default(rows, case) -> float:
    return next(r["us"] for r in rows if r["shape"] == case.shape and r["batch"] == case.batch
                and r["path"] == "small")


def main(argv=None) -> int:
    args = _parse(argv)
    setup_paths(args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    from crosspool_kernels.tuned import config_filename

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = (args.shapes or ("tiny" if device.type == "cpu" else
                              ",".join(s for s in SHAPES if s != "tiny"))).split(",")
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    bandwidth = hbm_bandwidth(device)
    report = {"env": {"torch": torch.__version__, "device": args.device,
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                      "hbm_bytes_per_s": bandwidth, "argv": list(argv or sys.argv[1:])},
              "rows": [], "summary": [], "tuned_configs": {}, "errors": []}
    out = Path(args.out)
    for shape in shapes:
        try:
            weights = make_weights(shape, args.layers, device, dtype)
            for batch in batches:
                case = Case(shape, batch, args, device, dtype, weights)
                summary = run_case(case, args, device, bandwidth, deadline, report["rows"])
                report["summary"].append(summary)
                hidden, inter, experts = SHAPES[shape][:3]
                name = config_filename("moe_small_batch", {"E": experts, "N": inter,
                                                           "H": hidden}, device, dtype)
                report["tuned_configs"].setdefault(name, {})[str(batch)] = summary["best_config"]
            del weights
        except Exception as e:  # noqa: BLE001 - keep the other shapes' figures
            import traceback

            traceback.print_exc()
            report["errors"].append({"shape": shape, "error": repr(e)})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(report, indent=1))
    report["total_s"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(report, indent=1))
    if args.write_configs:
        folder = Path(args.write_configs)
        folder.mkdir(parents=True, exist_ok=True)
        for name, per_batch in report["tuned_configs"].items():
            (folder / name).write_text(json.dumps(per_batch, indent=1) + "\n")
    print(f"\n{'shape':<20}{'B':>3}{'fused_moe us':>14}{'small us':>10}{'best us':>9}"
          f"{'speedup':>9}")
    for s in report["summary"]:
        print(f"{s['shape']:<20}{s['batch']:>3}{s['fused_moe_us']:>14.1f}"
              f"{s['small_default_us']:>10.1f}{s['small_best_us']:>9.1f}"
              f"{s['speedup_best']:>9.2f}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
