"""GPU decode benchmark (issue 5): correctness against HF transformers, then decode time per
step for eager and CUDA-graph steps and each attention backend, next to the HBM roofline.

    PYTHONPATH=$PWD:$PWD/scheduler:$PWD/kernels python benchmark/gpu_decode_bench.py --out r.json

For each real shape (random bf16 weights made on the GPU, layer count cut to keep the run
short; the roofline uses the same layer count):
1. parity: 2 prompts x 16 greedy tokens of the engine (CUDA graphs on) against HF `generate`
   in bf16 on the GPU: the matching prefix, and at every step up to the first divergence the
   max |logits - HF|; where they diverge, whether HF's top-2 logits there are within bf16
   rounding (a tie that bf16 may break either way);
2. steps: decode steps of B sequences at context C (KV filled with random values, no
   prefill), eager (`ModelRunner.forward`: metadata upload + launches from Python) and graph
   (`DecodeGraphs.run`: one upload + one replay); graph logits are checked against eager;
3. attention: the attention backend alone (store + attention of one layer, captured in a
   graph), per step; and at batch 1 a profile of one graph step's GPU time by kernel;
4. end to end: one request through `Engine.generate` at 1k context, tokens per second from
   the difference of a 64-token and a 1-token generation (scheduler, sampler included).
Roofline of a step: (attention-side weights + lm_head + the experts a batch touches, in
expectation under uniform routing, + KV read) / HBM bandwidth measured here by a large copy.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmark.gpu_env import cuda_ms
from sglang_crosspool import Engine
from sglang_crosspool.engine.forward_batch import ForwardBatch, StepLists
from sglang_crosspool.models.registry import resolve
from sglang_crosspool.testing.checkpoints import hf_reference, make_model

SHAPES = {  # name -> (architecture, layers kept)
    "olmoe-1b-7b": ("olmoe", 16),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", 8),
    "qwen3-30b-a3b": ("qwen3_moe", 8),
}
BF16 = 2


def measure_hbm_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    ms = cuda_ms(lambda: dst.copy_(src), 10)
    return 2 * (4 << 30) / (ms / 1e3)  # the buffers go back to the cache on return


# -- roofline ---------------------------------------------------------------------------------

def step_bytes(spec, batch: int, ctx: int) -> dict:
    """Bytes one decode step must read: weights touched and KV."""
    h, L = spec.hidden_size, spec.num_layers
    attn = h * (spec.q_size + 2 * spec.kv_size) + spec.q_size * h + spec.num_experts * h
    expert = 3 * h * spec.moe_intermediate_size
    # A token picks top_k distinct experts of E: P(an expert is untouched by B tokens).
    touched = spec.num_experts * (1 - (1 - spec.top_k / spec.num_experts) ** batch)
    shared = 3 * h * spec.shared_expert_intermediate_size
    weights = BF16 * (L * (attn + touched * expert + shared) + spec.vocab_size * h)
    kv = BF16 * 2 * L * spec.num_kv_heads * spec.head_dim * batch * ctx
    return {"weights": int(weights), "kv": int(kv), "total": int(weights + kv)}


# -- 1. parity --------------------------------------------------------------------------------

def parity(engine: Engine, hf, vocab: int) -> dict:
    prompts = [list(range(10, 42)), [(7 * i + 3) % vocab for i in range(300)]]
    steps: dict[str, list] = {}
    engine.core.logits_observer = lambda rid, row: steps.setdefault(rid, []).append(row.clone())
    greedy = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    ours = engine.generate(input_ids=prompts, sampling_params=greedy, rid=["p0", "p1"])
    engine.core.logits_observer = None
    out = []
    for rid, prompt, mine in zip(["p0", "p1"], prompts, ours):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16,
                          do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
        ref_ids = ref.sequences[0, len(prompt):].tolist()
        same = [a == b for a, b in zip(mine["output_ids"], ref_ids)]
        prefix = len(same) if all(same) else same.index(False)
        diffs = []
        for i in range(min(prefix + 1, 16)):
            ref_row = ref.logits[i][0].float()
            diffs.append(float((steps[rid][i] - ref_row).abs().max()))
        entry = {"prompt_len": len(prompt), "equal_prefix": prefix,
                 "max_abs_logit_diff_per_step": diffs,
                 "ref_logit_scale": float(ref.logits[0][0].float().abs().max())}
        if prefix < 16:
            top2 = ref.logits[prefix][0].float().topk(2).values
            gap = float(top2[0] - top2[1])
            # bf16 keeps 8 significant bits: neighbours near x are 2^(floor(log2|x|) - 7) apart.
            step = 2.0 ** (math.floor(math.log2(float(top2[0].abs()))) - 7)
            entry["divergence"] = {"step": prefix, "hf_top2_gap": gap,
                                   "bf16_step_at_top": step,
                                   "ours_logit_diff_there": diffs[prefix]}
        out.append(entry)
    return {"prompts": out}


# -- 2. and 3. decode steps -------------------------------------------------------------------

class FakeContext:
    """B sequences of C tokens in the KV pool (random K/V), as a decode step sees them."""

    def __init__(self, engine: Engine, name: str, batch: int, ctx: int, seed: int = 0):
        self.core = engine.core
        self.name = name
        pool = self.core.kv_pool
        bt = pool.block_tokens(name)
        nblk = -(-ctx // bt)
        self.blocks = []
        for _ in range(batch):
            got = pool.alloc_blocks(name, nblk)
            if got is None:
                self.free()
                raise MemoryError(f"KV pool too small for {batch} x {ctx}")
            self.blocks.append(got)
        kv = pool.models[name]
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for cache in kv.k + kv.v:
            for blocks in self.blocks:
                for b in blocks:
                    cache[b * bt:(b + 1) * bt].normal_(0, 1, generator=gen)
        pos = ctx - 1
        vocab = self.core.config.model(name).spec.vocab_size
        self.lists = StepLists(
            ids=[(17 * i + 5) % vocab for i in range(batch)], positions=[pos] * batch,
            slots=[blocks[pos // bt] * bt + pos % bt for blocks in self.blocks],
            q_starts=list(range(batch)), q_lens=[1] * batch, ctx_lens=[ctx] * batch,
            tables=self.blocks)
        self.bt = bt

    def free(self) -> None:
        for blocks in self.blocks:
            self.core.kv_pool.free_blocks(self.name, blocks)
        self.blocks = []


def time_steps(engine: Engine, name: str, batch: int, ctx: int, n: int,
               profile: bool = False) -> dict:
    core = engine.core
    runner = core.runners[name]
    fake = FakeContext(engine, name, batch, ctx)
    rows = list(range(batch))
    rows_t = torch.arange(batch, device="cuda")
    result = {"batch": batch, "ctx": ctx}
    try:
        def eager():
            fb = ForwardBatch.from_lists(fake.lists, fake.bt, "cuda")
            return runner.forward(fb, rows_t)

        ref = eager()
        result["eager_ms"] = cuda_ms(eager, n)
        graphs = core.graphs.get(name)
        if graphs is not None and graphs.fits(fake.lists):
            got = graphs.run(fake.lists, rows)
            result["graph_vs_eager_max_abs_logit_diff"] = float((got - ref).abs().max())
            result["graph_ms"] = cuda_ms(lambda: graphs.run(fake.lists, rows), n)
            result["attention_ms_per_step"] = attention_in_graph(runner, graphs, fake, n)
            if profile:
                result["profile"] = profile_step(lambda: graphs.run(fake.lists, rows))
    finally:
        fake.free()
    return result


def attention_in_graph(runner, graphs, fake: FakeContext, n: int) -> float:
    """The attention backend alone (store + attention on layer 0's cache), as the decode graph
    runs it: its static batch, prepared by prepare_graph, 10 layer calls captured in one graph
    (timed eagerly, launch overhead would hide the kernels). Returns ms per step (x layers)."""
    spec = runner.model.spec
    bs = min(b for b in graphs.graphs if b >= len(fake.lists.ids))
    fb = graphs.graphs[bs].fbs[0]  # one micro-batch: the whole bucket
    fb.ctx_lens = graphs.buffers.fill(fake.lists, bs)
    runner.backend.prepare_graph(fb)
    q = torch.randn(bs, spec.num_heads, spec.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(bs, spec.num_kv_heads, spec.head_dim, device="cuda", dtype=torch.bfloat16)
    kc, vc = runner.kv.k[0], runner.kv.v[0]
    call = lambda: runner.backend.forward(q, k, k, kc, vc, fb)  # noqa: E731
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            call()
    return cuda_ms(graph.replay, n) / 10 * spec.num_layers


def profile_step(step) -> dict:
    """GPU time by kernel over 5 steps (torch profiler), top 25, in microseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / 5, e.count / 5, e.key))
    rows.sort(reverse=True)
    return {"gpu_us_per_step": sum(r[0] for r in rows),
            "top": [{"us": round(t, 1), "calls": c, "kernel": k[:120]} for t, c, k in rows[:25]]}


def end_to_end(engine: Engine, vocab: int, graphs_on: bool) -> float:
    """Milliseconds per generated token of one 1k-token request through Engine.generate."""
    core = engine.core
    saved = core.graphs
    if not graphs_on:
        core.graphs = {}
    try:
        prompt = [(31 * i + 7) % vocab for i in range(1024)]
        params = {"temperature": 0, "ignore_eos": True}

        def gen(k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.generate(input_ids=prompt, sampling_params=dict(params, max_new_tokens=k))
            torch.cuda.synchronize()
            return time.perf_counter() - t

        gen(4)
        t1, t64 = gen(1), gen(64)
        return 1e3 * (t64 - t1) / 63
    finally:
        core.graphs = saved


# -- driver -----------------------------------------------------------------------------------

def run_shape(shape: str, arch: str, layers: int, args, root: Path, bw: float) -> dict:
    t0 = time.perf_counter()
    path = str(make_model(root / shape, arch, size=shape, dtype="bfloat16", device="cuda",
                          num_hidden_layers=layers, expert_layout="fused"))
    spec, _ = resolve(path)
    report = {"shape": shape, "arch": arch, "layers": layers,
              "build_s": round(time.perf_counter() - t0, 1), "backends": {}}
    hf = hf_reference(path, dtype=torch.bfloat16).to("cuda") if args.parity else None
    ctxs = [c for c in args.ctxs if c < spec.max_position_embeddings]
    report["contexts_skipped"] = [c for c in args.ctxs if c not in ctxs]
    runs = [(backend, moe) for backend in args.backends for moe in args.moe_small_batch]
    for backend, moe in runs:
        # One key per backend; with several --moe-small-batch modes, one per backend and mode.
        key = backend if len(args.moe_small_batch) == 1 else f"{backend}+moe-{moe}"
        entry = report["backends"][key] = {"moe_small_batch": moe}
        try:
            engine = Engine(path, device="cuda", dtype="bfloat16", attention_backend=backend,
                            context_length=max(ctxs) + 64, max_running_requests=max(args.batches),
                            kv_budget_bytes=args.kv_gib << 30,
                            cuda_graph_max_bs=max(args.batches), moe_small_batch=moe)
        except Exception as e:  # e.g. a backend that does not import here
            entry["error"] = repr(e)
            continue
        entry["cuda_graphs"] = engine.core.stats()["cuda_graphs"]
        name = engine.core.config.model_names[0]
        if hf is not None:
            entry["parity"] = parity(engine, hf, spec.vocab_size)
        steps = []
        for ctx in ctxs:
            for batch in args.batches:
                need = step_bytes(spec, batch, ctx)
                try:
                    row = time_steps(engine, name, batch, ctx, args.steps,
                                     profile=batch == 1 and ctx == min(ctxs))
                except MemoryError as e:
                    steps.append({"batch": batch, "ctx": ctx, "skipped": str(e)})
                    continue
                roof_ms = 1e3 * need["total"] / bw
                row.update(bytes=need, roofline_ms=roof_ms,
                           eager_fraction_of_roofline=roof_ms / row["eager_ms"])
                if "graph_ms" in row:
                    row["graph_fraction_of_roofline"] = roof_ms / row["graph_ms"]
                    row["graph_speedup"] = row["eager_ms"] / row["graph_ms"]
                steps.append(row)
                print(shape, key, json.dumps(row), flush=True)
        entry["steps"] = steps
        entry["e2e_ms_per_token_bs1_ctx1k"] = {
            "graph": end_to_end(engine, spec.vocab_size, True),
            "eager": end_to_end(engine, spec.vocab_size, False)}
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()
    del hf
    torch.cuda.empty_cache()
    report["total_s"] = round(time.perf_counter() - t0, 1)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="override every shape's layers")
    p.add_argument("--backends", default="flashinfer,triton")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--ctxs", default="1024,32768")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kv-gib", type=int, default=40)
    p.add_argument("--no-parity", dest="parity", action="store_false")
    p.add_argument("--moe-small-batch", default="auto",
                   help="the engine's --moe-small-batch; several (e.g. auto,off) run each "
                        "backend once per mode, for a before/after in one run")
    args = p.parse_args()
    args.backends = args.backends.split(",")
    args.moe_small_batch = args.moe_small_batch.split(",")
    args.batches = [int(x) for x in args.batches.split(",")]
    args.ctxs = [int(x) for x in args.ctxs.split(",")]
    bw = measure_hbm_bandwidth()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "hbm_bytes_per_s_measured": bw, "args": vars(args), "shapes": []}
    try:
        import flashinfer
        report["flashinfer"] = flashinfer.__version__
    except Exception as e:  # noqa: BLE001 - report what failed
        report["flashinfer"] = repr(e)
    print(f"{report['gpu']}: HBM copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    with tempfile.TemporaryDirectory() as root:
        for shape in args.shapes.split(","):
            arch, layers = SHAPES[shape]
            try:
                result = run_shape(shape, arch, args.layers or layers, args, Path(root), bw)
            except Exception as e:  # keep the other shapes' figures
                import traceback
                traceback.print_exc()
                result = {"shape": shape, "error": repr(e)}
            report["shapes"].append(result)
            Path(args.out).write_text(json.dumps(report, indent=1))
    summarize(report)


def summarize(report: dict) -> None:
    print(f"\n{'shape':<20}{'backend':<20}{'B':>4}{'ctx':>7}{'eager ms':>10}{'graph ms':>10}"
          f"{'roof ms':>9}{'graph/roof':>11}{'speedup':>8}{'attn ms':>9}")
    for shape in report["shapes"]:
        for backend, entry in shape.get("backends", {}).items():
            for r in entry.get("steps", []):
                if "eager_ms" not in r:
                    continue
                print(f"{shape['shape']:<20}{backend:<20}{r['batch']:>4}{r['ctx']:>7}"
                      f"{r['eager_ms']:>10.3f}{r.get('graph_ms', math.nan):>10.3f}"
                      f"{r['roofline_ms']:>9.3f}"
                      f"{r.get('graph_fraction_of_roofline', math.nan):>11.2f}"
                      f"{r.get('graph_speedup', math.nan):>8.2f}"
                      f"{r.get('attention_ms_per_step', math.nan):>9.3f}")


if __name__ == "__main__":
    main()
