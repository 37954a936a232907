import pytest
import torch
from conftest import assert_close, make_paged_cache

pytest.importorskip("triton")

from crosspool_kernels.decode_attention import (
    DEFAULT_CONFIG,
    decode_attention,
    decode_attention_ref,
)

SMALL = {**DEFAULT_CONFIG, "BLOCK_N": 16}


# ctx lens cover: one token, exactly one block, one past a block, and a context that spans
# several splits of several BLOCK_N each.
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "ctx_lens", "splits", "dtype"), [
    (4, 4, 32, [1, 16, 17, 150], 1, torch.float32),  # MHA, one split (direct store)
    (8, 2, 64, [1, 16, 17, 150], 4, torch.float32),  # GQA 4
    (6, 2, 48, [33, 200, 5], 3, torch.float32),  # GQA 3, head_dim not a power of two
    (4, 1, 32, [70, 9], 8, torch.float16),  # MQA, more splits than a short context needs
])
def test_decode_matches_reference(heads, kv_heads, head_dim, ctx_lens, splits, dtype, device):
    block_tokens = 16
    k, v, table = make_paged_cache(ctx_lens, kv_heads, head_dim, block_tokens, dtype, device)
    q = torch.randn(len(ctx_lens), heads, head_dim, dtype=dtype, device=device)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    out = decode_attention(q, k, v, table, ctx, block_tokens, num_splits=splits, config=SMALL)
    ref = decode_attention_ref(q, k, v, table, ctx_lens, block_tokens)
    assert_close(out, ref, dtype)


def test_decode_auto_splits_scale_and_padding_row(device):
    # A list of ctx lens lets the wrapper pick splits itself; ctx 0 marks a padded row.
    block_tokens = 8
    ctx_lens = [300, 0, 12]
    k, v, table = make_paged_cache(ctx_lens, 2, 32, block_tokens, device=device)
    q = torch.randn(3, 4, 32, device=device)
    cfg = {**SMALL, "num_splits": 4, "min_split_tokens": 64}
    out = decode_attention(q, k, v, table, ctx_lens, block_tokens, sm_scale=0.3, config=cfg)
    ref = decode_attention_ref(q, k, v, table, ctx_lens, block_tokens, sm_scale=0.3)
    assert_close(out, ref, torch.float32)
    assert torch.all(out[1] == 0)
