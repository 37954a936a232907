"""TritonAttention.prepare_graph on a padded static batch, as engine/cuda_graph.py builds it.

Batch 3 padded to 4: the padding row repeats row 0's block table and context length and has
slot -1. Rows 0..2 must match the torch backend on the unpadded batch, the padding row must not
write the KV cache, and the split count must be fixed (no host-side max) across steps.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sglang_crosspool.engine.attention import TorchAttention, TritonAttention
from sglang_crosspool.engine.forward_batch import ForwardBatch

HEADS, KV_HEADS, D, BT = 4, 2, 16, 8
TABLES = [[3, 1, 6], [0], [5, 2]]


def _decode_batch(ctx_lens, device, pad_to=None):
    slots = [t[(n - 1) // BT] * BT + (n - 1) % BT for t, n in zip(TABLES, ctx_lens)]
    rows = [t + [0] * (3 - len(t)) for t in TABLES]
    ctx, q_lens = list(ctx_lens), [1] * len(ctx_lens)
    if pad_to:
        pad = pad_to - len(rows)
        rows, ctx, slots = rows + rows[:1] * pad, ctx + ctx[:1] * pad, slots + [-1] * pad
        q_lens += [1] * pad
    n = len(rows)

    def t(x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype, device=device)

    fb = ForwardBatch(t([0] * n), t([c - 1 for c in ctx]), t(slots), list(range(n)), q_lens,
                      ctx, t(rows), BT)
    if pad_to:
        fb.ctx_lens_t, fb.num_real = t(ctx, torch.int32), len(TABLES)
    return fb


def test_prepare_graph_padded_decode_matches_torch(device):
    gen = torch.Generator().manual_seed(0)
    kc = torch.randn(8 * BT, KV_HEADS, D, generator=gen).to(device)
    vc = torch.randn(8 * BT, KV_HEADS, D, generator=gen).to(device)
    backend, ref = TritonAttention(HEADS, KV_HEADS, D), TorchAttention(HEADS, KV_HEADS, D)
    static = _decode_batch([17, 5, 9], device, pad_to=4)
    splits = None
    for ctx_lens in ([17, 5, 9], [18, 6, 16], [24, 1, 10]):
        step = _decode_batch(ctx_lens, device)
        # The step written into the static tensors in place, as a graph replay needs.
        padded = _decode_batch(ctx_lens, device, pad_to=4)
        for name in ("positions", "slot_mapping", "block_tables", "ctx_lens_t"):
            getattr(static, name).copy_(getattr(padded, name))
        static.ctx_lens = padded.ctx_lens
        q = torch.randn(4, HEADS, D, generator=gen).to(device)
        q[3] = q[0]
        k = torch.randn(4, KV_HEADS, D, generator=gen).to(device)
        v = torch.randn(4, KV_HEADS, D, generator=gen).to(device)

        ref.prepare(step)
        kc_ref, vc_ref = kc.clone(), vc.clone()
        expected = ref.forward(q[:3], k[:3], v[:3], kc_ref, vc_ref, step)

        backend.prepare_graph(static)
        meta = static.attn_meta
        assert meta["decode"] and meta["ctx_lens"] is static.ctx_lens_t
        assert "max_ctx_len" not in meta
        splits = splits or meta["num_splits"]
        assert meta["num_splits"] == splits and splits >= 1  # fixed for the bucket
        out = backend.forward(q, k, v, kc, vc, static)
        torch.testing.assert_close(out[:3], expected, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(out[3], out[0], atol=2e-5, rtol=2e-5)  # a valid row 0 copy
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # slot -1: nothing written
