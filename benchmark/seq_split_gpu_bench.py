"""Attention sequence split over 2 GPUs against attention on one (issue 16): DeepSeek-V2-Lite's
shape, random bf16 weights, full depth.

    python benchmark/seq_split_gpu_bench.py --out /tmp/seq-split.json            # 2 x H200
    python benchmark/seq_split_gpu_bench.py --kv-budget-gb 4 --out /tmp/small.json
    python benchmark/seq_split_gpu_bench.py --device cpu --out /tmp/seq-cpu.json  # tiny, CPU

One command, standalone (it puts the repository's packages on sys.path itself). Modes, each run
in fresh processes, one per GPU (NCCL between them; gloo on CPU):
- `single`: attention and the whole KV pool on GPU 0, the engine's own MLA path (the Triton
  decode kernel);
- `seq`: --ranks GPUs, each with the attention weights whole, its share of the experts
  (expert parallelism, one all-reduce per layer) and its own KV pool; one request's KV blocks
  spread over all pools (memory/kv_split.py), partial attention per GPU merged by log-sum-exp
  after one all_gather per layer (engine/seq_split.py, engine/seq_split_runtime.py).
For each mode:
1. capacity: the KV pool per GPU (what the GPU has free after the weights, less --margin-gb,
   or --kv-budget-gb), and the longest single request it holds: the blocks of every rank's
   pool x tokens per block, and that capped by max_position_embeddings (163840);
2. decode: one request at each context (--ctxs, default 32k and 128k) filled with random
   latents straight into each rank's own blocks, then the decode step of the whole model
   (eager, as under the split: no CUDA graphs in either mode), ms per token;
3. serve (on unless --no-serve-longest): Engine.generate of one request at the longest length
   the mode holds (prompt = that - 4 tokens, 4 greedy new tokens), through the runtime
   (followers spawned by the engine), with its wall time; prefill runs the torch path. The KV
   pool per GPU is --serve-budget-gb here (default 4 GB: 114,688 tokens on one GPU, under a
   128k request, where two GPUs reach the model's 163,840), so the capacity the split adds is
   served for real rather than computed; 0 keeps the measured pool.
The JSON is rewritten after every section, so a run stopped midway keeps what it measured.
On CPU (--device cpu) everything runs at a tiny shape (Triton interpreter), to check the
script itself; its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root, for benchmark.gpu_env
    sys.path.insert(0, str(ROOT))

from benchmark.gpu_env import setup_paths  # noqa: E402
from benchmark.mla_gpu_check import build_checkpoint, page_bytes_for  # noqa: E402

NEW_TOKENS = 4


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--ranks", type=int, default=2, help="GPUs of the sequence split")
    p.add_argument("--layers", type=int, default=None,
                   help="layers kept (default: all 27; 2 for the tiny CPU shape)")
    p.add_argument("--ctxs", default=None,
                   help="decode contexts in tokens, comma-separated (default 32768,131072; "
                        "on CPU 100,300)")
    p.add_argument("--iters", type=int, default=10, help="timed decode steps per context")
    p.add_argument("--kv-budget-gb", type=float, default=None,
                   help="KV pool per GPU in GB (default: free memory after the weights less "
                        "--margin-gb; a small value shows the capacity the split adds)")
    p.add_argument("--margin-gb", type=float, default=12.0,
                   help="memory per GPU left for activations and workspace (default 12)")
    p.add_argument("--modes", default="single,seq", help="which modes to run, in order")
    p.add_argument("--no-serve-longest", dest="serve_longest", action="store_false",
                   help="skip serving one request at the longest length")
    p.add_argument("--serve-budget-gb", type=float, default=None,
                   help="KV pool per GPU when serving the longest request (default 4 on CUDA; "
                        "0: the measured pool)")
    p.add_argument("--chunked-prefill-size", type=int, default=8192)
    p.add_argument("--timeout-s", type=float, default=540.0,
                   help="per mode's measuring processes (they are killed after it)")
    return p.parse_args(argv)


class Report:
    """The JSON being built, written after every section."""

    def __init__(self, out: Path):
        self.out = out
        self.data: dict = {"sections": {}}
        self.t0 = time.perf_counter()

    def section(self, name: str, fn, *args):
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result = fn(*args)
            entry = {"ok": True, **(result if isinstance(result, dict) else {"result": result})}
        except Exception as e:  # noqa: BLE001 - record and go on with the next section
            result = None
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.data["sections"][name] = entry
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {name}: "
              f"{'ok' if entry['ok'] else entry['error']}", flush=True)
        self.write()
        return result

    def write(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.out)


# -- the measuring processes (one per rank) ---------------------------------------------------

def _device(cfg: dict, rank: int) -> str:
    return f"cuda:{rank}" if cfg["device"] == "cuda" else "cpu"


def _engine_options(cfg: dict, mode: str, ranks: int, budget_bytes: int) -> dict:
    """Engine options shared by the measuring processes and the serve section."""
    return {"dtype": "bfloat16" if cfg["device"] == "cuda" else "float32",
            "load_format": "dummy", "context_length": cfg["max_positions"],
            "max_running_requests": 1, "chunked_prefill_size": cfg["chunked_prefill_size"],
            "kv_page_bytes": cfg["page_bytes"], "kv_budget_bytes": budget_bytes,
            "attention_backend": "triton", "disable_cuda_graph": True,
            "grammar_backend": "none", "disable_radix_cache": True,
            "attention_split": "seq" if mode == "seq" else "none",
            "attention_split_size": ranks if mode == "seq" else 1}


def rank_main(rank: int, world: int, init_method: str, cfg: dict, mode: str) -> dict:
    """One rank of one mode: load the whole model, size its KV pool, time decode steps."""
    setup_paths(cfg["device"])
    import torch

    from sglang_crosspool.distributed.group import init_group

    device = _device(cfg, rank)
    group = init_group(rank, world, init_method, device)
    try:
        with torch.inference_mode():
            return _measure(rank, world, group, device, cfg, mode)
    finally:
        group.close()


def _measure(rank, world, group, device, cfg, mode) -> dict:
    import torch

    from sglang_crosspool.config import EngineConfig
    from sglang_crosspool.engine import seq_split
    from sglang_crosspool.engine.seq_split_runtime import load_parts
    from sglang_crosspool.engine.tensor_parallel import TPFFNExecutor, add_kv, make_runner
    from sglang_crosspool.memory.kv_pool import KVPool
    from sglang_crosspool.memory.kv_split import SplitKVPool
    from sglang_crosspool.memory.page_backend import make_backend

    t0 = time.perf_counter()
    config = EngineConfig.build(cfg["path"], device=device,
                                **_engine_options(cfg, mode, world, 1 << 30))
    entry = config.models[0]
    name = entry.name
    attention, ffn_half = load_parts(config, entry, group, device)
    out = {"rank": rank, "device": device, "load_s": round(time.perf_counter() - t0, 1),
           "attention_bytes": attention.nbytes(), "ffn_bytes": ffn_half.nbytes(),
           "ffn_expert_parallel": ffn_half.shard.sharded}
    page = cfg["page_bytes"]
    if cfg["kv_budget_bytes"] is not None:
        budget = cfg["kv_budget_bytes"]
    elif device.startswith("cuda"):
        torch.cuda.synchronize(device)
        free, _ = torch.cuda.mem_get_info(device)
        out["free_after_weights_bytes"] = free
        budget = free - int(cfg["margin_gb"] * 1e9)
    else:
        budget = 64 << 20
    pages = budget // page
    if pages < 1:
        raise RuntimeError(f"rank {rank}: no KV budget left ({budget} bytes) after the weights")
    local = KVPool(make_backend(device, page, "auto"), pages)
    pool = SplitKVPool(local, rank, world) if mode == "seq" else local
    add_kv(pool, config, entry, attention)
    runner = make_runner(config, entry, attention, pool,
                         TPFFNExecutor({name: ffn_half}, device))
    if mode == "seq":
        runner.backend = seq_split.wrap(runner.backend, group, pool.rank_slots(name))
    bt = pool.block_tokens(name)
    blocks_per_rank = pages // pool.pages_per_block(name)
    pool_tokens = world * blocks_per_rank * bt
    out.update({"kv_budget_bytes_per_rank": pages * page, "kv_pages_per_rank": pages,
                "block_tokens": bt, "kv_page_bytes": page, "pool_tokens": pool_tokens,
                "longest_request_tokens": min(pool_tokens, cfg["max_positions"]),
                "backend": type(runner.backend).__name__, "decode": {}})
    print(f"  [{mode} rank {rank}] loaded in {out['load_s']} s; KV {pages} pages of "
          f"{page} B, {bt} tokens a block: {pool_tokens} tokens over {world} rank(s)",
          flush=True)
    for ctx in cfg["ctxs"]:
        out["decode"][str(ctx)] = _decode(runner, pool, name, ctx, cfg, device, group, mode)
        print(f"  [{mode} rank {rank}] ctx {ctx}: {out['decode'][str(ctx)]}", flush=True)
    return out


def _decode(runner, pool, name, ctx, cfg, device, group, mode) -> dict:
    """ms per decode step of one request of ctx tokens (random latents in its blocks)."""
    import torch

    from sglang_crosspool.engine.forward_batch import ForwardBatch, StepLists

    bt = pool.block_tokens(name)
    blocks = pool.alloc_blocks(name, -(-ctx // bt))  # the same books on every rank
    if blocks is None:
        return {"fits": False}
    try:
        gen = torch.Generator(device=device).manual_seed(ctx)
        caches = pool.models[name].k  # latent: one range per layer, this rank's pages
        for b in blocks:
            owner, local = pool.owner(name, b) if mode == "seq" else (0, b)
            if owner == getattr(group, "rank", 0):
                for cache in caches:
                    cache[local * bt : (local + 1) * bt].normal_(0, 1, generator=gen)
        pos = ctx - 1
        lists = StepLists(ids=[17], positions=[pos], slots=[blocks[pos // bt] * bt + pos % bt],
                          q_starts=[0], q_lens=[1], ctx_lens=[ctx], tables=[list(blocks)])
        rows = torch.zeros(1, dtype=torch.int64, device=device)

        def step():
            return runner.forward(ForwardBatch.from_lists(lists, bt, device), rows)

        step()
        _sync(device)
        group.barrier()
        t = time.perf_counter()
        for _ in range(cfg["iters"]):
            logits = step()
        _sync(device)
        ms = 1e3 * (time.perf_counter() - t) / cfg["iters"]
        return {"fits": True, "ms_per_token": round(ms, 3), "iters": cfg["iters"],
                "finite_logits": bool(torch.isfinite(logits).all())}
    finally:
        pool.free_blocks(name, blocks)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# -- the driver ---------------------------------------------------------------------------------

def measure_mode(cfg: dict, mode: str) -> dict:
    from sglang_crosspool.distributed.spawn import run_ranks

    world = cfg["ranks"] if mode == "seq" else 1
    ranks = run_ranks(rank_main, world, args=(cfg, mode), timeout_s=cfg["timeout_s"])
    first = ranks[0]
    return {"ranks": world, "pool_tokens": first["pool_tokens"],
            "longest_request_tokens": first["longest_request_tokens"],
            "decode_ms_per_token": {c: d.get("ms_per_token") for c, d in
                                    first["decode"].items()},
            "per_rank": ranks}


def serve_longest(cfg: dict, mode: str, measured: dict) -> dict:
    """One request at the longest length this mode holds, through the engine's runtime."""
    from sglang_crosspool import Engine

    per_rank = measured["per_rank"][0]
    ranks = measured["ranks"]
    budget = cfg["serve_budget_bytes"] or per_rank["kv_budget_bytes_per_rank"]
    blocks = budget // cfg["page_bytes"] // cfg["layers"]  # a block: one page per layer
    pool_tokens = ranks * blocks * per_rank["block_tokens"]
    # The context length bounds prompt + new tokens (positions 0 .. max_positions - 1).
    total = min(pool_tokens, cfg["max_positions"] - 1)
    prompt_len = total - NEW_TOKENS
    engine = Engine(cfg["path"], device=_device(cfg, 0),
                    **_engine_options(cfg, mode, ranks, budget))
    try:
        vocab = min(engine.core.config.models[0].spec.vocab_size, 1024)
        prompt = [(31 * i + 7) % vocab for i in range(prompt_len)]
        t = time.perf_counter()
        res = engine.generate(input_ids=prompt, sampling_params={
            "max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True})
        wall = time.perf_counter() - t
        stats = engine.stats()
        return {"kv_budget_bytes_per_rank": budget, "pool_tokens": pool_tokens,
                "prompt_tokens": prompt_len, "new_tokens": len(res["output_ids"]),
                "wall_s": round(wall, 1), "finish": res.get("meta_info", {}).get("finish_reason"),
                "kv_pages_per_rank": stats.get("parallel", {}).get("kv_pages_per_rank")}
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    args = _parse(argv)
    setup_paths(args.device)
    import torch

    report = Report(Path(args.out))
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("single", "seq") for m in modes):
        print(f"--modes: single and/or seq, got {args.modes!r}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device; use --device cpu", file=sys.stderr)
            return 2
        need = args.ranks if "seq" in modes else 1
        if torch.cuda.device_count() < need:
            print(f"--ranks {args.ranks}: needs {need} GPUs, {torch.cuda.device_count()} "
                  "visible", file=sys.stderr)
            return 2
    report.data["env"] = {"torch": torch.__version__, "device": args.device,
                          "gpus": [torch.cuda.get_device_name(i) for i in
                                   range(torch.cuda.device_count())]
                          if args.device == "cuda" else [], "argv": sys.argv[1:]}
    workdir = Path(tempfile.mkdtemp(prefix="seq-split-"))
    ckpt = report.section("checkpoint", build_checkpoint, workdir / "deepseek-v2-lite", args)
    if ckpt is None:
        return 1
    cfg = _config(args, ckpt["path"])
    report.data["config"] = {k: v for k, v in cfg.items() if k != "path"}
    results = {}
    for mode in modes:
        results[mode] = report.section(f"measure_{mode}", measure_mode, cfg, mode)
    if args.serve_longest:
        for mode in modes:
            if results.get(mode):
                report.section(f"serve_longest_{mode}", serve_longest, cfg, mode, results[mode])
    report.data["summary"] = _summary(report.data["sections"], modes)
    failed = [k for k, v in report.data["sections"].items() if not v.get("ok", False)]
    report.data["failed_sections"] = failed
    report.write()
    print(json.dumps(report.data["summary"], indent=2))
    print(f"wrote {args.out}; failed sections: {failed or 'none'}")
    return 0 if not failed else 1


def _config(args, path: str) -> dict:
    from sglang_crosspool.models.config import load_spec

    spec = load_spec(path)
    elem = 2 if args.device == "cuda" else 4
    latent_bytes = spec.mla.latent_dim * elem
    page = page_bytes_for(latent_bytes, args.device)
    if args.device == "cpu":
        page = 8 * latent_bytes  # 8 tokens a block: a request spans many blocks
    budget = None if args.kv_budget_gb is None else int(args.kv_budget_gb * 1e9)
    serve = args.serve_budget_gb
    serve = int((4.0 if serve is None else serve) * 1e9) if args.device == "cuda" else 0
    if budget is None and args.device == "cpu":
        # Small pools, so that the split's capacity shows: 48 blocks a rank.
        budget = 48 * page * spec.num_layers
    ctxs = [int(c) for c in (args.ctxs or ("32768,131072" if args.device == "cuda"
                                           else "100,300")).split(",")]
    return {"path": path, "device": args.device, "ranks": args.ranks, "page_bytes": page,
            "kv_budget_bytes": budget, "serve_budget_bytes": serve,
            "margin_gb": args.margin_gb, "ctxs": ctxs,
            "iters": args.iters, "max_positions": spec.max_position_embeddings,
            "chunked_prefill_size": args.chunked_prefill_size, "timeout_s": args.timeout_s,
            "layers": spec.num_layers, "latent_bytes_per_token_layer": latent_bytes}


def _summary(sections: dict, modes: list[str]) -> dict:
    out = {}
    for mode in modes:
        m = sections.get(f"measure_{mode}", {})
        s = sections.get(f"serve_longest_{mode}", {})
        out[mode] = {"ranks": m.get("ranks"), "pool_tokens": m.get("pool_tokens"),
                     "longest_request_tokens": m.get("longest_request_tokens"),
                     "decode_ms_per_token": m.get("decode_ms_per_token"),
                     "served_longest": {k: s.get(k) for k in ("ok", "pool_tokens",
                                                              "prompt_tokens", "new_tokens",
                                                              "wall_s")}
                     if s else None}
    return out


if __name__ == "__main__":
    sys.exit(main())
