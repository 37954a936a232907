"""MLA on the GPU (issue 16): the Triton MLA decode kernel at DeepSeek-V2-Lite's shape against
its torch reference, then decode time at batch 1 over 1k / 32k / 128k tokens of context.

    python benchmark/mla_gpu_check.py --out /tmp/mla.json                  # one H200, < 3 min
    python benchmark/mla_gpu_check.py --device cpu --out /tmp/mla-cpu.json # tiny shape, CPU

One command, standalone (it puts the repository's three packages on sys.path itself). Every
section records its result or its error in the JSON and the next one runs anyway; the JSON is
rewritten after each section, so a run killed midway still leaves what it measured. Sections:

1. model: a config-only checkpoint of tests/data/model-configs/DeepSeek-V2-Lite (all 27 layers
   unless --layers), served with load_format="dummy": random bf16 weights made on the GPU;
   the KV page is the least multiple of the VMM page (2 MiB) that the 1152-byte latent of one
   token and layer divides (18 MiB: 16384 tokens a block).
2. kernel: mla_decode (H=16, r=512, p=64, bf16) against mla_decode_ref (float32) on a paged
   cache of shuffled 64-token blocks, at every context: max |diff|; the absorbed form
   (q_nope @ W_UK, kernel, @ W_UV, with layer 0's kv_b_proj) against the decompressed form
   transformers computes; then kernel time per call (10 calls captured in a CUDA graph),
   next to the time the latent read takes at the measured HBM bandwidth; a few launch
   configs at the longest context; and the torch path (LatentAttention) for comparison.
3. engine: one decode step of the whole model (batch 1, latents random): eager
   (ModelRunner.forward) and as a CUDA-graph replay, graph logits against eager, and the
   Triton path's logits against the torch MLA path's on the same step; one short
   Engine.generate (prefill on the torch path, decode through the graph).
On CPU (--device cpu) everything runs at a tiny shape under TRITON_INTERPRET=1, to check the
script itself; its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root, for benchmark.gpu_env
    sys.path.insert(0, str(ROOT))

from benchmark.gpu_env import cuda_ms, setup_paths  # noqa: E402
LITE = ROOT / "tests" / "data" / "model-configs" / "DeepSeek-V2-Lite"
VMM_PAGE = 2 << 20
# The tiny CPU shape: DeepSeek-V2-Lite's layout shrunk (the latent is 48 + 16 values).
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 96, "moe_intermediate_size": 16, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "kv_lora_rank": 48,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "vocab_size": 1024,
        "max_position_embeddings": 4096, "num_hidden_layers": 2}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--layers", type=int, default=None,
                   help="layers kept (default: all 27; 2 for the tiny CPU shape)")
    p.add_argument("--ctxs", default=None,
                   help="contexts in tokens, comma-separated (default 1024,32768,131072 on "
                        "CUDA, 64,300 on CPU)")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions per figure")
    p.add_argument("--budget-s", type=float, default=165.0,
                   help="wall-clock budget: sections starting later are skipped")
    p.add_argument("--skip-engine", action="store_true", help="kernel sections only")
    return p.parse_args(argv)


class Report:
    """The JSON being built, written after every section."""

    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.data: dict = {"sections": {}}
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def section(self, name: str, fn, *args):
        if self.elapsed() > self.budget_s:
            self.data["sections"][name] = {"skipped": f"over the {self.budget_s:.0f} s budget"}
            self.write()
            return None
        start = time.perf_counter()
        try:
            result = fn(*args)
            entry = {"ok": True, **(result if isinstance(result, dict) else {})}
        except Exception as e:  # noqa: BLE001 - record and go on with the next section
            result = None
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.data["sections"][name] = entry
        print(f"[{self.elapsed():6.1f} s] {name}: "
              f"{'ok' if entry['ok'] else entry.get('error')}", flush=True)
        self.write()
        return result

    def write(self) -> None:
        self.data["wall_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.out)


# -- timing ------------------------------------------------------------------------------------

def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, iters: int, device, graph_calls: int = 0) -> dict:
    """Milliseconds per call: from a CUDA graph of `graph_calls` calls where asked (launch
    overhead left out), else wall time around `iters` calls (CUDA events on a GPU)."""
    import torch

    fn()
    sync(device)
    if torch.device(device).type != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return {"ms": 1e3 * (time.perf_counter() - t) / iters, "how": "cpu wall"}
    if graph_calls:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(graph_calls):
                    fn()
            graph.replay()
            ms = cuda_ms(graph.replay, max(3, iters // 4)) / graph_calls
            return {"ms": ms, "how": f"cuda graph of {graph_calls} calls"}
        except Exception as e:  # noqa: BLE001 - fall back to eager timing
            eager = cuda_ms(fn, iters)
            return {"ms": eager, "how": "cuda events, eager (graph failed: "
                                        f"{type(e).__name__}: {str(e)[:200]})"}
    return {"ms": cuda_ms(fn, iters), "how": "cuda events, eager"}


def hbm_bandwidth(device) -> float | None:
    """Bytes per second of a 2 GiB device-to-device copy (read + write counted)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), 10)
    return 2 * (2 << 30) / (ms / 1e3)


# -- 1. model ----------------------------------------------------------------------------------

def page_bytes_for(latent_bytes: int, device: str) -> int:
    base = VMM_PAGE if device == "cuda" else 4096
    return base * latent_bytes // math.gcd(base, latent_bytes)


def build_checkpoint(root: Path, args) -> dict:
    overrides = dict(TINY) if args.device == "cpu" else {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    config = json.loads((LITE / "config.json").read_text())
    config.update(overrides)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    from sglang_crosspool.testing.tokenizer import write_tokenizer

    write_tokenizer(root, min(int(config["vocab_size"]), 1024))
    return {"path": str(root), "overrides": overrides}


class Setup:
    """What the sections share: the spec, the engine (if built), the dtype."""

    def __init__(self, args, path: str):
        import torch

        from sglang_crosspool.models.config import load_spec

        self.args = args
        self.device = args.device
        self.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        self.spec = load_spec(path)
        self.path = path
        self.engine = None
        m = self.spec.mla
        self.heads, self.rank, self.rope = self.spec.num_heads, m.kv_lora_rank, m.qk_rope_head_dim
        from sglang_crosspool.models.deepseek_v2 import softmax_scale

        self.scale = softmax_scale(self.spec)
        self.ctxs = [int(c) for c in (args.ctxs or (
            "1024,32768,131072" if args.device == "cuda" else "64,300")).split(",")]


def build_engine(st: Setup) -> dict:
    from sglang_crosspool import Engine

    elem = 2 if st.device == "cuda" else 4
    latent_bytes = (st.rank + st.rope) * elem
    page = page_bytes_for(latent_bytes, st.device)
    ctx = max(st.ctxs) + 64
    block_tokens = page // latent_bytes
    blocks = -(-ctx // block_tokens) + 4  # + the reserve and a margin
    st.engine = Engine(
        st.path, device=st.device, dtype="bfloat16" if st.device == "cuda" else "float32",
        load_format="dummy", context_length=ctx, max_running_requests=1,
        chunked_prefill_size=512, kv_page_bytes=page, attention_backend="triton",
        kv_budget_bytes=blocks * st.spec.num_layers * page, cuda_graph_bs=[1],
        grammar_backend="none")
    core = st.engine.core
    name = core.config.model_names[0]
    runner = core.runners[name]
    return {"layers": st.spec.num_layers, "kv_page_bytes": page, "block_tokens": block_tokens,
            "mla_backend": type(runner.backend).__name__,
            "graphs": core.graphs[name].stats() if name in core.graphs else None,
            "attention_weights_bytes": runner.model.nbytes()}


# -- 2. kernel ---------------------------------------------------------------------------------

def paged_latents(st: Setup, ctx: int, block_tokens: int = 64, seed: int = 0):
    """A latent cache holding one sequence of ctx tokens in shuffled blocks."""
    import torch

    nblocks = -(-ctx // block_tokens) + 2
    gen = torch.Generator(device=st.device).manual_seed(seed)
    cache = torch.empty(nblocks * block_tokens, 1, st.rank + st.rope, device=st.device,
                        dtype=st.dtype)
    cache.normal_(0, 1, generator=gen)
    perm = torch.randperm(nblocks, generator=gen, device=st.device)
    table = perm[: -(-ctx // block_tokens)].unsqueeze(0).to(torch.int64)
    q = torch.randn(1, st.heads, st.rank + st.rope, device=st.device, dtype=st.dtype,
                    generator=gen)
    ctx_t = torch.tensor([ctx], device=st.device, dtype=torch.int32)
    return q, cache, table, ctx_t, block_tokens


def kernel_accuracy(st: Setup) -> dict:
    from crosspool_kernels.mla_decode import mla_decode, mla_decode_ref

    out = {}
    for ctx in st.ctxs:
        q, cache, table, ctx_t, bt = paged_latents(st, ctx)
        got = mla_decode(q, cache, table, ctx_t, bt, st.rank, st.scale, max_ctx_len=ctx)
        ref = mla_decode_ref(q, cache, table, [ctx], bt, st.rank, st.scale,
                             out=q.new_zeros(1, st.heads, st.rank, dtype=q.float().dtype))
        out[str(ctx)] = {"max_abs_diff": float((got.float() - ref).abs().max()),
                         "ref_max_abs": float(ref.abs().max())}
    return {"vs_reference": out}


def absorption(st: Setup) -> dict:
    """Absorbed (kernel) against decompressed keys and values, with real W_UK / W_UV."""
    import torch
    from crosspool_kernels.mla_decode import mla_decode, mla_decode_unabsorbed_ref

    if st.engine is not None:
        layer = next(iter(st.engine.core.runners.values())).model.layers[0]
        w_uk, w_uv = layer.w_uk, layer.w_uv
        source = "layer 0 of the served model"
    else:
        m = st.spec.mla
        w_uk = torch.randn(st.heads, m.qk_nope_head_dim, st.rank, device=st.device) / st.rank**.5
        w_uv = torch.randn(st.heads, m.v_head_dim, st.rank, device=st.device) / st.rank**.5
        w_uk, w_uv = w_uk.to(st.dtype), w_uv.to(st.dtype)
        source = "random"
    ctx = min(st.ctxs)
    _, cache, table, ctx_t, bt = paged_latents(st, ctx, seed=1)
    q_nope = torch.randn(1, st.heads, w_uk.shape[1], device=st.device, dtype=st.dtype)
    q_pe = torch.randn(1, st.heads, st.rope, device=st.device, dtype=st.dtype)
    q = torch.cat([torch.einsum("bhn,hnr->bhr", q_nope, w_uk), q_pe], dim=-1)
    o = torch.einsum("bhr,hvr->bhv", mla_decode(q, cache, table, ctx_t, bt, st.rank, st.scale,
                                                max_ctx_len=ctx), w_uv).float()
    ref = mla_decode_unabsorbed_ref(q_nope, q_pe, w_uk, w_uv, cache, table, [ctx], bt, st.scale)
    return {"ctx": ctx, "weights": source, "max_abs_diff": float((o - ref).abs().max()),
            "ref_max_abs": float(ref.abs().max())}


def kernel_timing(st: Setup, bandwidth: float | None) -> dict:
    import torch
    from crosspool_kernels.mla_decode import mla_decode, mla_decode_config

    out = {}
    cfg = mla_decode_config(1, st.heads, st.rank, st.rope, st.device, st.dtype)
    elem = torch.empty((), dtype=st.dtype).element_size()
    for ctx in st.ctxs:
        q, cache, table, ctx_t, bt = paged_latents(st, ctx)
        splits = max(1, min(cfg["num_splits"], -(-ctx // cfg["min_split_tokens"])))
        res = torch.empty(1, st.heads, st.rank, device=st.device, dtype=st.dtype)
        call = lambda: mla_decode(q, cache, table, ctx_t, bt, st.rank, st.scale, out=res,  # noqa: E731
                                  num_splits=splits)
        entry = {"num_splits": splits, **time_ms(call, st.args.iters, st.device, graph_calls=10)}
        latent_bytes = ctx * (st.rank + st.rope) * elem
        entry["latent_bytes"] = latent_bytes
        if bandwidth:
            entry["bound_ms"] = 1e3 * latent_bytes / bandwidth
            entry["of_bound"] = round(entry["bound_ms"] / entry["ms"], 3)
        out[str(ctx)] = entry
    return {"config": cfg, "per_ctx": out}


def config_sweep(st: Setup) -> dict:
    """A few launch configs at the longest context (candidates for a tuned JSON file)."""
    import torch
    from crosspool_kernels.mla_decode import DEFAULT_CONFIG, mla_decode, mla_decode_ref

    ctx = max(st.ctxs)
    q, cache, table, ctx_t, bt = paged_latents(st, ctx)
    ref = mla_decode_ref(q, cache, table, [ctx], bt, st.rank, st.scale,
                         out=q.new_zeros(1, st.heads, st.rank, dtype=torch.float32))
    rows = []
    candidates = ((32, 4, 2, 256), (32, 4, 2, 128), (32, 4, 2, 64), (32, 8, 2, 256),
                  (64, 8, 2, 128), (64, 8, 2, 256), (16, 4, 1, 256), (32, 4, 3, 256))
    for block_n, warps, stages, splits in candidates[:2] if st.device == "cpu" else candidates:
        cfg = {**DEFAULT_CONFIG, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
        row = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages,
               "num_splits": splits}
        try:
            call = lambda: mla_decode(q, cache, table, ctx_t, bt, st.rank, st.scale,  # noqa: E731
                                      num_splits=splits, config=cfg)
            row["max_abs_diff"] = float((call().float() - ref).abs().max())
            row.update(time_ms(call, st.args.iters, st.device, graph_calls=10))
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    return {"ctx": ctx, "rows": rows}


def torch_path_timing(st: Setup) -> dict:
    """LatentAttention (the torch MLA path) on one decode row, for comparison."""
    import torch

    from sglang_crosspool.engine.attention_mla import LatentAttention
    from sglang_crosspool.engine.forward_batch import ForwardBatch

    out = {}
    for ctx in st.ctxs:
        q, cache, table, ctx_t, bt = paged_latents(st, ctx)
        slot = int(table[0, (ctx - 1) // bt]) * bt + (ctx - 1) % bt
        fb = ForwardBatch(torch.zeros(1, dtype=torch.int64, device=st.device),
                          torch.tensor([ctx - 1], device=st.device),
                          torch.tensor([slot], device=st.device), [0], [1], [ctx], table, bt)
        path = LatentAttention(st.heads, st.rank + st.rope, st.rank, st.scale, st.dtype)
        path.prepare(fb)
        latent = cache[slot : slot + 1].clone()
        out[str(ctx)] = time_ms(lambda: path.forward(q[0:1], latent, latent, cache, cache, fb),
                                max(3, st.args.iters // 4), st.device)
    return out


# -- 3. engine ---------------------------------------------------------------------------------

class FilledContext:
    """One sequence of ctx tokens in the engine's KV pool (random latents), as a decode step
    at position ctx - 1 sees it."""

    def __init__(self, st: Setup, ctx: int):
        import torch

        from sglang_crosspool.engine.forward_batch import StepLists

        core = st.engine.core
        self.pool, self.name = core.kv_pool, core.config.model_names[0]
        bt = self.pool.block_tokens(self.name)
        self.blocks = self.pool.alloc_blocks(self.name, -(-ctx // bt))
        if self.blocks is None:
            raise MemoryError(f"KV pool too small for {ctx} tokens")
        gen = torch.Generator(device=st.device).manual_seed(ctx)
        for cache in self.pool.models[self.name].k:  # latent: one range per layer
            for b in self.blocks:
                cache[b * bt : (b + 1) * bt].normal_(0, 1, generator=gen)
        pos = ctx - 1
        self.lists = StepLists(ids=[17], positions=[pos],
                               slots=[self.blocks[pos // bt] * bt + pos % bt], q_starts=[0],
                               q_lens=[1], ctx_lens=[ctx], tables=[self.blocks])
        self.block_tokens = bt

    def free(self) -> None:
        self.pool.free_blocks(self.name, self.blocks)


def engine_steps(st: Setup) -> dict:
    import torch

    from sglang_crosspool.engine.attention_mla import LatentAttention
    from sglang_crosspool.engine.forward_batch import ForwardBatch

    core = st.engine.core
    name = core.config.model_names[0]
    runner = core.runners[name]
    graphs = core.graphs.get(name)
    rows_t = torch.arange(1, device=st.device)
    out = {}
    for ctx in st.ctxs:
        entry: dict = {}
        out[str(ctx)] = entry
        fill = FilledContext(st, ctx)
        try:
            def eager():
                fb = ForwardBatch.from_lists(fill.lists, fill.block_tokens, st.device)
                return runner.forward(fb, rows_t)

            ref = eager()
            entry["eager"] = time_ms(eager, max(3, st.args.iters // 2), st.device)
            if graphs is not None and graphs.fits(fill.lists):
                got = graphs.run(fill.lists, [0])
                entry["graph_vs_eager_max_abs_logit_diff"] = float((got - ref).abs().max())
                entry["graph"] = time_ms(lambda: graphs.run(fill.lists, [0]), st.args.iters,
                                         st.device)
                entry["graph"]["how"] = "cuda events around DecodeGraphs.run (upload + replay)"
            else:
                entry["graph"] = "no decode graph for this step"
            if ctx == min(st.ctxs):  # the same step through the torch MLA path
                saved = runner.backend
                b = saved
                runner.backend = LatentAttention(b.num_heads, b.head_dim, b.value_dim, b.scale,
                                                 b.dtype)
                try:
                    torch_logits = eager()
                finally:
                    runner.backend = saved
                entry["triton_vs_torch_path_max_abs_logit_diff"] = float(
                    (torch_logits - ref).abs().max())
                entry["logit_scale"] = float(ref.abs().max())
                entry["same_argmax"] = bool(torch_logits.argmax() == ref.argmax())
        finally:
            fill.free()
    return out


def engine_generate(st: Setup) -> dict:
    n = min(200, st.engine.config.models[0].context_length - 16)
    prompt = [(31 * i + 7) % min(st.spec.vocab_size, 1024) for i in range(n)]
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    t = time.perf_counter()
    first = st.engine.generate(input_ids=prompt, sampling_params=params)
    wall = time.perf_counter() - t
    second = st.engine.generate(input_ids=prompt, sampling_params=params)
    core = st.engine.core
    name = core.config.model_names[0]
    return {"prompt_len": len(prompt), "output_ids": first["output_ids"],
            "repeatable": first["output_ids"] == second["output_ids"], "first_wall_s": wall,
            "graph_runs": core.graphs[name].runs if name in core.graphs else 0,
            "kv_used_pages_after": st.engine.stats()["kv"]["used_pages"]}


def main(argv=None) -> int:
    args = _parse(argv)
    setup_paths(args.device)
    report = Report(Path(args.out), args.budget_s)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    report.data["env"] = {
        "torch": torch.__version__, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "argv": sys.argv[1:]}
    try:
        import triton

        report.data["env"]["triton"] = triton.__version__
    except ImportError:
        report.data["env"]["triton"] = None
    workdir = Path(tempfile.mkdtemp(prefix="mla-check-"))
    ckpt = report.section("checkpoint", build_checkpoint, workdir / "deepseek-v2-lite", args)
    if ckpt is None:
        return 1
    st = Setup(args, ckpt["path"])
    report.data["shape"] = {"heads": st.heads, "kv_lora_rank": st.rank, "rope": st.rope,
                            "layers": st.spec.num_layers, "ctxs": st.ctxs,
                            "dtype": str(st.dtype), "softmax_scale": st.scale}
    bandwidth = hbm_bandwidth(st.device)
    report.data["env"]["hbm_bytes_per_s"] = bandwidth
    report.section("kernel_accuracy", kernel_accuracy, st)
    report.section("kernel_timing", kernel_timing, st, bandwidth)
    report.section("torch_path_timing", torch_path_timing, st)
    if not args.skip_engine:
        report.section("engine_build", build_engine, st)
    report.section("absorption", absorption, st)
    if st.engine is not None:
        report.section("engine_decode_step", engine_steps, st)
        report.section("engine_generate", engine_generate, st)
    report.section("kernel_config_sweep", config_sweep, st)
    failed = [k for k, v in report.data["sections"].items() if not v.get("ok", False)]
    report.data["failed_sections"] = failed
    report.write()
    print(f"wrote {args.out} in {report.elapsed():.1f} s; failed sections: {failed or 'none'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
