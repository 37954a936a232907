"""MLA decode kernel (absorbed form) against its torch reference, the engine's torch MLA path
(LatentAttention) and the unabsorbed form transformers computes, at tiny shapes."""

import pytest
import torch
from conftest import assert_close, make_paged_cache

pytest.importorskip("triton")

from crosspool_kernels.mla_decode import (  # noqa: E402
    DEFAULT_CONFIG,
    mla_decode,
    mla_decode_ref,
    mla_decode_unabsorbed_ref,
)

from sglang_crosspool.engine.attention_mla import LatentAttention  # noqa: E402
from sglang_crosspool.engine.forward_batch import ForwardBatch  # noqa: E402

SMALL = {**DEFAULT_CONFIG, "BLOCK_N": 16}


def _latents(ctx_lens, width, block_tokens, dtype, device, seed=0):
    cache, _, table = make_paged_cache(ctx_lens, 1, width, block_tokens, dtype, device, seed)
    return cache, table


# Page layouts (block_tokens 4 / 16 / 32, shuffled blocks) and lengths: one token, exactly a
# block, one past, and contexts spanning several splits of several BLOCK_N each; rank and rope
# widths that are and are not powers of two; more heads than one BLOCK_H.
@pytest.mark.parametrize(("heads", "rank", "rope", "block_tokens", "ctx_lens", "splits", "dtype"), [
    (4, 56, 8, 16, [1, 16, 17, 150], 1, torch.float32),  # the tiny model's latent, direct store
    (4, 56, 8, 4, [1, 16, 17, 150], 4, torch.float32),  # small blocks, split-K
    (20, 32, 16, 32, [33, 200, 5], 3, torch.float32),  # two head blocks, the last one partial
    (16, 64, 16, 16, [70, 9], 8, torch.float16),  # more splits than a short context needs
])
def test_mla_decode_matches_reference(heads, rank, rope, block_tokens, ctx_lens, splits, dtype,
                                      device):
    cache, table = _latents(ctx_lens, rank + rope, block_tokens, dtype, device)
    q = torch.randn(len(ctx_lens), heads, rank + rope, dtype=dtype, device=device)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    scale = 0.3
    out = mla_decode(q, cache, table, ctx, block_tokens, rank, scale, num_splits=splits,
                     config=SMALL)
    assert out.shape == (len(ctx_lens), heads, rank)
    assert_close(out, mla_decode_ref(q, cache, table, ctx_lens, block_tokens, rank, scale), dtype)


def test_mla_decode_auto_splits_and_padding_row(device):
    block_tokens, rank, rope = 8, 24, 8
    ctx_lens = [300, 0, 12]
    cache, table = _latents(ctx_lens, rank + rope, block_tokens, torch.float32, device)
    q = torch.randn(3, 4, rank + rope, device=device)
    cfg = {**SMALL, "num_splits": 4, "min_split_tokens": 64}
    out = mla_decode(q, cache, table, ctx_lens, block_tokens, rank, 0.2, config=cfg)
    assert_close(out, mla_decode_ref(q, cache, table, ctx_lens, block_tokens, rank, 0.2),
                 torch.float32)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("block_tokens", [4, 16])
def test_mla_decode_matches_the_engines_torch_path(block_tokens, device):
    # The same decode step through LatentAttention (the CPU path that matches transformers).
    heads, rank, rope, ctx_lens = 4, 56, 8, [1, 23, 64]
    cache, table = _latents(ctx_lens, rank + rope, block_tokens, torch.float32, device)
    q = torch.randn(3, heads, rank + rope, device=device)
    new = torch.randn(3, 1, rank + rope, device=device)  # this step's latents
    slots = [int(table[i, (n - 1) // block_tokens]) * block_tokens + (n - 1) % block_tokens
             for i, n in enumerate(ctx_lens)]
    fb = ForwardBatch(torch.zeros(3, dtype=torch.int64), torch.tensor(ctx_lens) - 1,
                      torch.tensor(slots), [0, 1, 2], [1, 1, 1], ctx_lens, table, block_tokens)
    torch_path = LatentAttention(heads, rank + rope, rank, scale=0.25)
    torch_path.prepare(fb)
    expected = torch_path.forward(q, new, new, cache.clone(), cache.clone(), fb)
    cache[torch.tensor(slots)] = new
    out = mla_decode(q, cache, table, ctx_lens, block_tokens, rank, 0.25, num_splits=2,
                     config=SMALL)
    assert_close(out.reshape(3, -1), expected, torch.float32)


def test_absorbed_decode_equals_decompressed_attention(device):
    # q_nope @ W_UK into the latent space, the kernel, then @ W_UV: transformers' numbers.
    heads, nope, rank, rope, v_dim, bt = 4, 12, 40, 8, 10, 8
    ctx_lens = [37, 5]
    cache, table = _latents(ctx_lens, rank + rope, bt, torch.float32, device)
    gen = torch.Generator().manual_seed(3)
    w_uk = torch.randn(heads, nope, rank, generator=gen).to(device) / rank**0.5
    w_uv = torch.randn(heads, v_dim, rank, generator=gen).to(device) / rank**0.5
    q_nope = torch.randn(2, heads, nope, generator=gen).to(device)
    q_pe = torch.randn(2, heads, rope, generator=gen).to(device)
    q = torch.cat([torch.einsum("bhn,hnr->bhr", q_nope, w_uk), q_pe], dim=-1)
    o_lat = mla_decode(q, cache, table, ctx_lens, bt, rank, 0.2, num_splits=2, config=SMALL)
    out = torch.einsum("bhr,hvr->bhv", o_lat, w_uv)
    ref = mla_decode_unabsorbed_ref(q_nope, q_pe, w_uk, w_uv, cache, table, ctx_lens, bt, 0.2)
    assert_close(out, ref, torch.float32)
