"""FlashInferAttention on a CUDA GPU against the torch backend in float32.

Marked `gpu`; skipped without CUDA or under TRITON_INTERPRET=1; the FlashInfer tests also skip
where `import flashinfer` fails (the Triton graph test still runs). The KV layout is the pool's:
per layer [slots, KVH, d], a sequence in shuffled blocks of 16 or 2048 tokens. Decode and extend
(cached prefix, a pure prefill, decode rows mixed in) in bf16 (head_dim 128: GQA 4, GQA 8 on the
tensor-core decode, MHA) and fp16 (head_dim 64); then prepare_graph + capture, and replays with
new metadata (more or fewer real rows, longer and shorter contexts) against eager runs.

FlashInfer compiles its kernels on first use: one decode and one prefill module per
(dtype, head_dim), four here; set FLASHINFER_WORKSPACE_BASE to keep them between runs.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU and compiled kernels", allow_module_level=True)
pytest.importorskip("triton")

from sglang_crosspool.engine.attention import (  # noqa: E402
    TorchAttention,
    TritonAttention,
    get_attention_backend,
)
from sglang_crosspool.engine.forward_batch import ForwardBatch  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _flashinfer():
    pytest.importorskip("flashinfer")
    return get_attention_backend("flashinfer")


class Pool:
    """One layer's K/V caches in the pool's layout and each sequence's shuffled blocks."""

    def __init__(self, max_ctx: list[int], kv_heads: int, d: int, bt: int, dtype, seed=0):
        gen = torch.Generator(device=DEV).manual_seed(seed)
        need = [-(-n // bt) for n in max_ctx]
        total = sum(need) + 2
        shape = (total * bt, kv_heads, d)
        self.k = torch.randn(shape, generator=gen, device=DEV).to(dtype)
        self.v = torch.randn(shape, generator=gen, device=DEV).to(dtype)
        perm = torch.randperm(total, generator=gen, device=DEV).tolist()
        self.tables, used = [], 0
        for nb in need:
            self.tables.append(perm[used : used + nb])
            used += nb
        self.bt, self.dtype, self.gen = bt, dtype, gen

    def batch(self, rows: list[int], q_lens: list[int], ctx_lens: list[int]) -> ForwardBatch:
        """The ForwardBatch of these sequences (indices into tables) for one step."""
        bt = self.bt
        positions, slots, starts, tables = [], [], [], []
        for row, n, ctx in zip(rows, q_lens, ctx_lens):
            table = self.tables[row]
            starts.append(len(positions))
            for p in range(ctx - n, ctx):
                positions.append(p)
                slots.append(table[p // bt] * bt + p % bt)
            tables.append(table)
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEV)
        return ForwardBatch(torch.zeros(len(slots), dtype=torch.int64, device=DEV),
                            torch.tensor(positions, device=DEV), torch.tensor(slots, device=DEV),
                            starts, list(q_lens), list(ctx_lens), table, bt)

    def qkv(self, tokens: int, heads: int):
        kv_heads, d = self.k.shape[1:]
        q = torch.randn(tokens, heads, d, generator=self.gen, device=DEV).to(self.dtype)
        k = torch.randn(tokens, kv_heads, d, generator=self.gen, device=DEV).to(self.dtype)
        v = torch.randn(tokens, kv_heads, d, generator=self.gen, device=DEV).to(self.dtype)
        return q, k, v


def _reference(pool: Pool, fb: ForwardBatch, q, k, v, heads: int):
    """The torch backend in float32 on copies of the caches: (output, k cache, v cache)."""
    ref = TorchAttention(heads, pool.k.shape[1], pool.k.shape[2])
    meta = fb.attn_meta
    ref.prepare(fb)
    kc, vc = pool.k.float(), pool.v.float()
    out = ref.forward(q.float(), k.float(), v.float(), kc, vc, fb)
    fb.attn_meta = meta
    return out, kc.to(pool.dtype), vc.to(pool.dtype)


def _close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


SHAPES = [  # heads, kv_heads, head_dim, dtype
    (32, 8, 128, torch.bfloat16),  # GQA 4: CUDA-core decode
    (32, 4, 128, torch.bfloat16),  # GQA 8: tensor-core decode
    (16, 16, 128, torch.bfloat16),  # MHA
    (16, 4, 64, torch.float16),
]
DECODE_CTX = [1, 17, 300, 2048, 2049, 5000]
EXTEND = ([5, 1, 300, 64, 1], [5, 2000, 700, 4100, 1])  # q_lens, ctx_lens


@pytest.mark.parametrize("bt", [16, 2048])
@pytest.mark.parametrize(("heads", "kv_heads", "d", "dtype"), SHAPES)
@pytest.mark.parametrize("mode", ["decode", "extend"])
def test_matches_torch(mode, heads, kv_heads, d, dtype, bt):
    cls = _flashinfer()
    if mode == "decode":
        q_lens, ctx_lens = [1] * len(DECODE_CTX), DECODE_CTX
    else:
        q_lens, ctx_lens = EXTEND
    pool = Pool(ctx_lens, kv_heads, d, bt, dtype)
    fb = pool.batch(list(range(len(ctx_lens))), q_lens, ctx_lens)
    q, k, v = pool.qkv(sum(q_lens), heads)
    expected, kc_ref, vc_ref = _reference(pool, fb, q, k, v, heads)
    # Extend runs plan at the first forward (the engine builds backends without a dtype).
    backend = cls(heads, kv_heads, d, dtype=dtype if mode == "decode" else None)
    backend.prepare(fb)
    for _layer in range(2):  # one plan, several layers
        out = backend.forward(q, k, v, pool.k, pool.v, fb)
        _close(out, expected, dtype)
    assert torch.equal(pool.k, kc_ref) and torch.equal(pool.v, vc_ref)


def test_micro_batches_in_flight():
    cls = _flashinfer()
    heads, kv_heads, d, dtype = 32, 8, 128, torch.bfloat16
    pool = Pool([300, 2049, 40, 999], kv_heads, d, 2048, dtype)
    backend = cls(heads, kv_heads, d, dtype=dtype)
    steps = [([0, 1], [1, 1], [300, 2049]), ([2, 3], [40, 1], [40, 999])]  # decode, extend
    fbs = [pool.batch(*s) for s in steps]
    data = [pool.qkv(sum(fb.q_lens), heads) for fb in fbs]
    expected = [_reference(pool, fb, *x, heads)[0] for fb, x in zip(fbs, data)]
    for fb in fbs:  # both prepared before either runs, as forward_pipelined does
        backend.prepare(fb)
    for _layer in range(2):
        for fb, (q, k, v), exp in zip(fbs, data, expected):
            _close(backend.forward(q, k, v, pool.k, pool.v, fb), exp, dtype)


def _static_batch(bucket: int, width: int, bt: int) -> ForwardBatch:
    """The graph's static tensors, as engine/cuda_graph.py allocates them."""
    def zeros(*shape, dtype=torch.int64):
        return torch.zeros(*shape, dtype=dtype, device=DEV)

    return ForwardBatch(zeros(bucket), zeros(bucket), zeros(bucket), list(range(bucket)),
                        [1] * bucket, [1] * bucket, zeros(bucket, width), bt,
                        ctx_lens_t=zeros(bucket, dtype=torch.int32), num_real=bucket)


def _fill(static: ForwardBatch, step: ForwardBatch, q, k, v, bufs) -> None:
    """Writes a decode step into the static tensors in place, padding rows repeating row 0."""
    n, bucket = len(step.ctx_lens), static.block_tables.shape[0]
    pad = bucket - n
    static.positions.copy_(torch.cat([step.positions, step.positions[:1].repeat(pad)]))
    static.slot_mapping.copy_(torch.cat([step.slot_mapping,
                                         torch.full((pad,), -1, device=DEV)]))
    static.block_tables.zero_()
    static.block_tables[:n, : step.block_tables.shape[1]] = step.block_tables
    static.block_tables[n:] = static.block_tables[0]
    ctx = step.ctx_lens + step.ctx_lens[:1] * pad
    static.ctx_lens_t.copy_(torch.tensor(ctx, dtype=torch.int32))
    static.ctx_lens, static.num_real = ctx, n
    for buf, x in zip(bufs, (q, k, v)):
        buf.copy_(torch.cat([x, x[:1].repeat(pad, 1, 1)]))


@pytest.mark.parametrize("bt", [16, 2048])
@pytest.mark.parametrize("name", ["flashinfer", "triton"])
def test_graph_replay_matches_eager(name, bt):
    heads, kv_heads, d, dtype, bucket = 32, 8, 128, torch.bfloat16, 8
    cls = _flashinfer() if name == "flashinfer" else TritonAttention
    max_ctx = 4100
    pool = Pool([max_ctx] * bucket, kv_heads, d, bt, dtype)
    width = -(-max_ctx // bt)
    static = _static_batch(bucket, width, bt)
    bufs = [torch.zeros(bucket, h, d, dtype=dtype, device=DEV) for h in (heads, kv_heads,
                                                                          kv_heads)]
    graph_backend = cls(heads, kv_heads, d, dtype=dtype)
    eager_backend = cls(heads, kv_heads, d, dtype=dtype)

    def step(rows, ctx_lens):
        fb = pool.batch(rows, [1] * len(rows), ctx_lens)
        return fb, pool.qkv(len(rows), heads)

    # Capture on a one-token-context step, after a warm-up on a side stream (as cuda_graph.py).
    fb, qkv = step([0], [1])
    _fill(static, fb, *qkv, bufs)
    graph_backend.prepare_graph(static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph_backend.forward(*bufs, pool.k.clone(), pool.v.clone(), static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graph_backend.forward(*bufs, pool.k, pool.v, static)

    for rows, ctx_lens in (([0, 1, 2, 3, 4], [17, 2048, 2049, 4100, 1]),
                           (list(range(8)), [4096, 1, 33, 300, 2047, 2048, 16, 3000]),
                           ([5, 6, 7], [5, 4000, 2])):
        fb, (q, k, v) = step(rows, ctx_lens)
        kc, vc = pool.k.clone(), pool.v.clone()
        eager_backend.prepare(fb)
        expected = eager_backend.forward(q, k, v, kc, vc, fb)
        reference = _reference(pool, fb, q, k, v, heads)[0]
        _fill(static, fb, q, k, v, bufs)
        graph_backend.prepare_graph(static)
        graph.replay()
        torch.cuda.synchronize()
        n = len(rows)
        _close(out[:n], expected, dtype)
        _close(out[:n], reference, dtype)
        _close(out[n:], out[:1].expand(bucket - n, -1), dtype)  # padding rows: row 0 again
        # The replay stored the real rows' K/V exactly as the eager step did, padding nothing.
        assert torch.equal(pool.k, kc) and torch.equal(pool.v, vc)
