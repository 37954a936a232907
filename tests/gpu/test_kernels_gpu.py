"""crosspool_kernels compiled on a CUDA GPU, in bf16, against their torch references.

Marked `gpu`; skipped without CUDA, and under TRITON_INTERPRET=1 (which would run these
compiled-kernel checks in the interpreter instead). Shapes are closer to real models than the
CPU interpreter tests: head_dim 128, GQA 8:1 and 4:1, hidden 2048, contexts past one split.
The last test captures store_kv + decode attention + fused MoE in a CUDA graph and replays it.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU and compiled Triton kernels", allow_module_level=True)
pytest.importorskip("triton")

from crosspool_kernels import KERNELS  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def _close(actual, expected, tol=2e-2):
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def _paged(ctx_lens, kv_heads, head_dim, block_tokens, dtype=BF16, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    blocks = [-(-n // block_tokens) for n in ctx_lens]
    total = sum(blocks) + 2
    shape = (total * block_tokens, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen, device=DEV).to(dtype)
    v = torch.randn(shape, generator=gen, device=DEV).to(dtype)
    perm = torch.randperm(total, generator=gen, device=DEV)
    table = torch.zeros(len(ctx_lens), max(blocks), dtype=torch.int64, device=DEV)
    used = 0
    for i, nb in enumerate(blocks):
        table[i, :nb] = perm[used : used + nb]
        used += nb
    return k, v, table


@pytest.mark.parametrize(("heads", "kv_heads", "ctx_lens", "splits"), [
    (32, 4, [1, 255, 256, 257, 4097], None),
    (16, 16, [1000, 33], 8),
    (64, 8, [9000], 16),
])
def test_decode_attention_bf16(heads, kv_heads, ctx_lens, splits):
    op = KERNELS["decode_attention"]
    k, v, table = _paged(ctx_lens, kv_heads, 128, 256)
    q = torch.randn(len(ctx_lens), heads, 128, device=DEV, dtype=BF16)
    ctx = torch.tensor(ctx_lens, device=DEV, dtype=torch.int32)
    out = op.triton(q, k, v, table, ctx, 256, num_splits=splits, max_ctx_len=max(ctx_lens))
    _close(out, op.reference(q, k, v, table, ctx_lens, 256))


@pytest.mark.parametrize(("heads", "ctx_lens", "splits"), [
    (16, [1, 255, 4097], None),  # DeepSeek-V2-Lite: 16 heads, latent 512 + 64
    (128, [1000, 33], 8),  # DeepSeek-V3's 128 heads: eight head blocks
])
def test_mla_decode_bf16(heads, ctx_lens, splits):
    op = KERNELS["mla_decode"]
    cache, _, table = _paged(ctx_lens, 1, 576, 64)
    q = torch.randn(len(ctx_lens), heads, 576, device=DEV, dtype=BF16)
    ctx = torch.tensor(ctx_lens, device=DEV, dtype=torch.int32)
    out = op.triton(q, cache, table, ctx, 64, 512, 0.1, num_splits=splits,
                    max_ctx_len=max(ctx_lens))
    _close(out, op.reference(q, cache, table, ctx_lens, 64, 512, 0.1))


def test_prefill_attention_bf16_mixed_batch():
    op = KERNELS["prefill_attention"]
    q_lens, ctx_lens = [300, 1, 77, 1, 1024], [300, 2000, 500, 1, 1500]
    k, v, table = _paged(ctx_lens, 4, 128, 256)
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    q = torch.randn(sum(q_lens), 32, 128, device=DEV, dtype=BF16)
    out = op.triton(q, k, v, table, starts, q_lens, ctx_lens, 256)
    _close(out, op.reference(q, k, v, table, starts, q_lens, ctx_lens, 256))


def test_store_kv_norms_rope_bf16():
    k = torch.randn(37, 4, 128, device=DEV, dtype=BF16)
    v = torch.randn_like(k)
    slots = torch.randperm(512, device=DEV)[:37]
    caches = [torch.zeros(512, 4, 128, device=DEV, dtype=BF16) for _ in range(4)]
    KERNELS["store_kv"].triton(k, v, caches[0], caches[1], slots)
    KERNELS["store_kv"].reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])

    x = torch.randn(50, 2048, device=DEV, dtype=BF16)
    r = torch.randn_like(x)
    w = torch.randn(2048, device=DEV, dtype=BF16)
    norm = KERNELS["rms_norm"]
    _close(norm.triton(x, w, 1e-6), norm.reference(x, w, 1e-6))
    fused = KERNELS["fused_add_rms_norm"]
    out, total = fused.triton(x, r, w, 1e-6)
    exp_out, exp_total = fused.reference(x, r, w, 1e-6)
    assert torch.equal(total, exp_total)
    _close(out, exp_out)

    positions = torch.randint(0, 4096, (50,), device=DEV)
    inv = 1.0 / 1e6 ** (torch.arange(0, 128, 2, device=DEV).float() / 128)
    freqs = torch.arange(4096, device=DEV).float()[:, None] * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    q = torch.randn(50, 32, 128, device=DEV, dtype=BF16)
    kk = torch.randn(50, 4, 128, device=DEV, dtype=BF16)
    rope = KERNELS["rope"]
    got, exp = rope.triton(q, kk, positions, cos, sin), rope.reference(q, kk, positions, cos, sin)
    _close(got[0], exp[0])
    _close(got[1], exp[1])


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 64, 8), (7, 60, 4), (300, 16, 2)])
def test_fused_moe_bf16(tokens, experts, top_k):
    op = KERNELS["fused_moe"]
    hidden, inter = 1024, 384
    h = torch.randn(tokens, hidden, device=DEV, dtype=BF16)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEV) / hidden**0.5).to(BF16)
    w2 = (torch.randn(experts, hidden, inter, device=DEV) / inter**0.5).to(BF16)
    weights, ids = torch.topk(torch.randn(tokens, experts, device=DEV).softmax(-1), top_k)
    _close(op.triton(h, w13, w2, weights, ids), op.reference(h, w13, w2, weights, ids), 3e-2)


@pytest.mark.parametrize(("tokens", "experts", "top_k", "inter", "shared_inter"), [
    (1, 128, 8, 768, 0),  # Qwen3-30B-A3B
    (4, 60, 4, 1408, 5632),  # Qwen1.5-MoE-A2.7B, gated shared expert
    (8, 8, 2, 3584, 0),  # Mixtral-like, narrower
])
def test_moe_small_batch_bf16(tokens, experts, top_k, inter, shared_inter):
    op, hidden = KERNELS["moe_small_batch"], 2048
    h = torch.randn(tokens, hidden, device=DEV, dtype=BF16)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEV) / hidden**0.5).to(BF16)
    w2 = (torch.randn(experts, hidden, inter, device=DEV) / inter**0.5).to(BF16)
    weights, ids = torch.topk(torch.randn(tokens, experts, device=DEV).softmax(-1), top_k)
    weights = weights.to(BF16)
    extra = {}
    if shared_inter:  # width of the shared expert, 0: none
        s = shared_inter
        extra = {"shared_w13": (torch.randn(2 * s, hidden, device=DEV) / hidden**0.5).to(BF16),
                 "shared_w2": (torch.randn(hidden, s, device=DEV) / s**0.5).to(BF16),
                 "shared_gate": (torch.randn(1, hidden, device=DEV) / hidden**0.5).to(BF16)}
    for split in (0, 1, 3):
        got = op.triton(h, w13, w2, weights, ids, config={"SPLIT_K": split}, **extra)
        _close(got, op.reference(h, w13, w2, weights, ids, **extra), 3e-2)


def test_moe_small_batch_in_cuda_graph():
    # Static shapes, no host sync: new routing and hidden states copied in, then a replay.
    op = KERNELS["moe_small_batch"]
    h = torch.randn(2, 1024, device=DEV, dtype=BF16)
    w13 = (torch.randn(16, 512, 1024, device=DEV) / 32).to(BF16)
    w2 = (torch.randn(16, 1024, 256, device=DEV) / 16).to(BF16)
    weights, ids = torch.topk(torch.randn(2, 16, device=DEV).softmax(-1), 4)
    weights = weights.to(BF16)
    op.triton(h, w13, w2, weights, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op.triton(h, w13, w2, weights, ids)
    h.copy_(torch.randn_like(h))
    new_w, new_ids = torch.topk(torch.randn(2, 16, device=DEV).softmax(-1), 4)
    weights.copy_(new_w)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    _close(captured, op.reference(h, w13, w2, weights, ids), 3e-2)


def test_sampling_on_gpu():
    probs = torch.randn(16, 32000, device=DEV).mul(3).softmax(-1)
    u = torch.rand(16, device=DEV)
    top_k = torch.randint(0, 100, (16,), device=DEV)
    top_p = torch.rand(16, device=DEV) * 0.5 + 0.5
    op = KERNELS["sample"]
    got = op.triton(probs, u, top_k, top_p, 0.01)
    exp = op.reference(probs, u, top_k, top_p, 0.01)
    assert (got == exp).float().mean() >= 0.9  # float sums in another order may flip a tie
    logits = torch.randn(16, 32000, device=DEV, dtype=BF16)
    assert torch.equal(KERNELS["greedy"].triton(logits), torch.argmax(logits, -1))


def test_decode_step_in_cuda_graph():
    store, decode = KERNELS["store_kv"].triton, KERNELS["decode_attention"].triton
    moe = KERNELS["fused_moe"].triton
    batch, heads, kv_heads, d, bt = 4, 32, 4, 128, 256
    k_cache, v_cache, table = _paged([2048] * batch, kv_heads, d, bt)
    ctx = torch.full((batch,), 1000, device=DEV, dtype=torch.int32)
    slots = table[:, 999 // bt] * bt + 999 % bt
    q = torch.randn(batch, heads, d, device=DEV, dtype=BF16)
    k = torch.randn(batch, kv_heads, d, device=DEV, dtype=BF16)
    v = torch.randn_like(k)
    h = torch.randn(batch, 1024, device=DEV, dtype=BF16)
    w13 = (torch.randn(16, 512, 1024, device=DEV) / 32).to(BF16)
    w2 = (torch.randn(16, 1024, 256, device=DEV) / 16).to(BF16)
    weights, ids = torch.topk(torch.randn(batch, 16, device=DEV).softmax(-1), 2)

    def step():
        store(k, v, k_cache, v_cache, slots)
        return decode(q, k_cache, v_cache, table, ctx, bt, num_splits=8), moe(h, w13, w2, weights, ids)

    eager = step()  # also compiles every kernel before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q.copy_(torch.randn_like(q))
    ctx.fill_(1500)
    graph.replay()
    torch.cuda.synchronize()
    _close(captured[0], KERNELS["decode_attention"].reference(q, k_cache, v_cache, table, ctx, bt))
    _close(captured[1], eager[1], 1e-6)
