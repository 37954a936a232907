"""Times each kernel on a CUDA GPU at real model shapes, next to its memory-bandwidth bound.

    python -m crosspool_kernels.bench [--bandwidth 3.0e12] [--json out.json]

Shapes are Qwen3-30B-A3B's attention and experts (32 q heads, 4 KV heads, head_dim 128,
hidden 2048, 128 experts of intermediate 768, top-8) in bf16, with the engine's KV blocks of
2048 tokens (one 2 MiB page per layer). Each figure is the median of
triton.testing.do_bench_cudagraph (kernel time, no launch overhead) and the bound is bytes
that must move over the bandwidth given (default: H100's measured 3.0 TB/s).
"""

import argparse
import functools
import json

import torch

from crosspool_kernels import KERNELS

BF16 = torch.bfloat16


def _time_us(fn, *args, **kwargs) -> float:
    import triton.testing

    call = functools.partial(fn, *args, **kwargs)
    return 1e3 * triton.testing.do_bench_cudagraph(call, rep=50)


def _paged(batch, ctx, kv_heads, head_dim, block_tokens):
    per_seq = -(-ctx // block_tokens)
    k = torch.randn(batch * per_seq * block_tokens, kv_heads, head_dim, device="cuda", dtype=BF16)
    table = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq)
    return k, torch.randn_like(k), table


def bench(bandwidth: float) -> list[dict]:
    rows = []

    def add(name, us, nbytes, **extra):
        bound = nbytes / bandwidth * 1e6
        rows.append({"kernel": name, "us": round(us, 2), "bound_us": round(bound, 2),
                     "of_bound": round(bound / us, 3), **extra})
        print(f"{name:<44} {us:9.1f} us   bound {bound:8.1f} us   {bound / us:6.1%}")

    heads, kv_heads, d, bt = 32, 4, 128, 2048
    for batch, ctx in [(1, 1024), (1, 32768), (16, 1024), (64, 4096)]:
        k, v, table = _paged(batch, ctx, kv_heads, d, bt)
        q = torch.randn(batch, heads, d, device="cuda", dtype=BF16)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        fn = KERNELS["decode_attention"].triton
        us = _time_us(fn, q, k, v, table, lens, bt, max_ctx_len=ctx)
        add(f"decode_attention B={batch} ctx={ctx}", us, 2 * batch * ctx * kv_heads * d * 2)

    for q_len, ctx in [(4096, 4096), (512, 8192)]:
        k, v, table = _paged(1, ctx, kv_heads, d, bt)
        q = torch.randn(q_len, heads, d, device="cuda", dtype=BF16)
        fn = KERNELS["prefill_attention"].triton
        meta = [torch.tensor([x], device="cuda") for x in (0, q_len, ctx)]  # no H2D in graphs
        us = _time_us(fn, q, k, v, table, *meta, bt, max_q_len=q_len)
        flops = 4 * heads * d * q_len * (ctx - q_len / 2)
        add(f"prefill_attention q={q_len} ctx={ctx}", us, 2 * ctx * kv_heads * d * 2,
            tflops=round(flops / us / 1e6, 1))

    experts, hidden, inter, top_k = 128, 2048, 768, 8
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=BF16) * 0.02
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=BF16) * 0.02
    for tokens in (1, 16, 64, 512):
        h = torch.randn(tokens, hidden, device="cuda", dtype=BF16)
        weights, ids = torch.topk(torch.randn(tokens, experts, device="cuda").softmax(-1), top_k)
        fn = KERNELS["fused_moe"].triton
        us = _time_us(fn, h, w13, w2, weights, ids)
        active = ids.unique().numel()
        add(f"fused_moe T={tokens} (E=128 I=768 k=8)", us, active * 3 * hidden * inter * 2,
            active_experts=active)

    for tokens in (1, 64, 4096):
        x = torch.randn(tokens, hidden, device="cuda", dtype=BF16)
        r, w = torch.randn_like(x), torch.randn(hidden, device="cuda", dtype=BF16)
        fn = KERNELS["fused_add_rms_norm"].triton
        us = _time_us(fn, x, r, w, 1e-6)
        add(f"fused_add_rms_norm T={tokens}", us, 4 * x.numel() * 2)
        q = torch.randn(tokens, heads, d, device="cuda", dtype=BF16)
        kk = torch.randn(tokens, kv_heads, d, device="cuda", dtype=BF16)
        cos = torch.randn(40960, d, device="cuda", dtype=BF16)
        pos = torch.randint(0, 40960, (tokens,), device="cuda")
        fn = KERNELS["rope"].triton
        us = _time_us(fn, q, kk, pos, cos, cos, inplace=True)
        add(f"rope T={tokens}", us, 2 * (q.numel() + kk.numel()) * 2)

    vocab = 151936
    for batch in (1, 16, 64):
        probs = torch.randn(batch, vocab, device="cuda").softmax(-1)
        u = torch.rand(batch, device="cuda")
        fn = KERNELS["sample"].triton
        us = _time_us(fn, probs, u, 50, 0.9, 0.0)
        add(f"sample top_k=50 top_p=0.9 B={batch}", us, probs.numel() * 4)
        us = _time_us(fn, probs, u, None, 0.9, 0.0)
        add(f"sample top_p=0.9 B={batch}", us, probs.numel() * 4)
        fn = KERNELS["greedy"].triton
        us = _time_us(fn, probs)
        add(f"greedy B={batch}", us, probs.numel() * 4)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s of HBM")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    rows = bench(args.bandwidth)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
