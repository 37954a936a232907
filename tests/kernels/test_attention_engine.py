"""The kernels against the engine's own torch attention backend, on its ForwardBatch layout."""

import pytest
import torch

pytest.importorskip("triton")

from crosspool_kernels.decode_attention import decode_attention
from crosspool_kernels.prefill_attention import prefill_attention
from crosspool_kernels.store_kv import store_kv

from sglang_crosspool.engine.attention import TorchAttention
from sglang_crosspool.engine.forward_batch import ForwardBatch


def _batch(blocks, q_lens, ctx_lens, block_tokens, device):
    positions, slots, starts = [], [], []
    for table, n, ctx in zip(blocks, q_lens, ctx_lens):
        starts.append(len(positions))
        for p in range(ctx - n, ctx):
            positions.append(p)
            slots.append(table[p // block_tokens] * block_tokens + p % block_tokens)
    width = max(len(t) for t in blocks)
    table = torch.tensor([t + [0] * (width - len(t)) for t in blocks], device=device)
    ids = torch.zeros(len(positions), dtype=torch.int64, device=device)
    return ForwardBatch(ids, torch.tensor(positions, device=device),
                        torch.tensor(slots, device=device), starts, list(q_lens), list(ctx_lens),
                        table, block_tokens)


def test_store_then_attend_matches_engine_backend(device):
    torch.manual_seed(0)
    heads, kv_heads, d, bt = 4, 2, 32, 8
    slots = 12 * bt
    blocks = [[5, 2, 9], [0], [7, 3, 11, 1]]
    fb = _batch(blocks, q_lens=[13, 1, 6], ctx_lens=[20, 4, 30], block_tokens=bt,
                device=device)
    q = torch.randn(fb.num_tokens, heads, d, device=device)
    k = torch.randn(fb.num_tokens, kv_heads, d, device=device)
    v = torch.randn(fb.num_tokens, kv_heads, d, device=device)
    prefix_k = torch.randn(slots, kv_heads, d, device=device)
    prefix_v = torch.randn(slots, kv_heads, d, device=device)

    backend = TorchAttention(heads, kv_heads, d)
    backend.prepare(fb)
    kc_ref, vc_ref = prefix_k.clone(), prefix_v.clone()
    expected = backend.forward(q, k, v, kc_ref, vc_ref, fb)

    kc, vc = prefix_k.clone(), prefix_v.clone()
    store_kv(k, v, kc, vc, fb.slot_mapping)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    out = prefill_attention(q, kc, vc, fb.block_tables, fb.q_starts, fb.q_lens, fb.ctx_lens, bt,
                            sm_scale=backend.scale)
    torch.testing.assert_close(out.reshape(fb.num_tokens, -1), expected, atol=2e-5, rtol=2e-5)

    # The decode row (q_len 1) alone through the decode kernel.
    row = 1
    dec = decode_attention(q[fb.q_starts[row]][None], kc, vc, fb.block_tables[row : row + 1],
                           [fb.ctx_lens[row]], bt, sm_scale=backend.scale, num_splits=2)
    start = fb.q_starts[row]
    torch.testing.assert_close(dec.reshape(1, -1), expected[start : start + 1], atol=2e-5,
                               rtol=2e-5)
