import pytest
import torch
from conftest import assert_close, make_paged_cache

pytest.importorskip("triton")

from crosspool_kernels.prefill_attention import (
    DEFAULT_CONFIG,
    prefill_attention,
    prefill_attention_ref,
)

SMALL = {**DEFAULT_CONFIG, "BLOCK_M": 16, "BLOCK_N": 16}


def _starts(q_lens):
    starts, total = [], 0
    for n in q_lens:
        starts.append(total)
        total += n
    return starts, total


# Mixed batches: decode rows (q_len 1), a fresh prefill, extends over a cached prefix, and
# spans that cross blocks of the cache and of BLOCK_M / BLOCK_N.
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "q_lens", "ctx_lens", "dtype"), [
    (4, 2, 32, [1, 37, 20, 3], [10, 37, 70, 19], torch.float32),
    (4, 4, 48, [17, 1], [17, 33], torch.float32),  # MHA, head_dim not a power of two
    (6, 2, 32, [5, 16, 1], [21, 40, 1], torch.float32),  # GQA 3
    (8, 1, 64, [24, 1], [30, 7], torch.float16),  # MQA
])
def test_prefill_matches_reference(heads, kv_heads, head_dim, q_lens, ctx_lens, dtype, device):
    block_tokens = 8
    k, v, table = make_paged_cache(ctx_lens, kv_heads, head_dim, block_tokens, dtype, device)
    starts, total = _starts(q_lens)
    q = torch.randn(total, heads, head_dim, dtype=dtype, device=device)
    out = prefill_attention(q, k, v, table, starts, q_lens, ctx_lens, block_tokens, config=SMALL)
    ref = prefill_attention_ref(q, k, v, table, starts, q_lens, ctx_lens, block_tokens)
    assert_close(out, ref, dtype)


def test_prefill_default_config_tensor_metadata(device):
    # Tensors for the per-sequence metadata, a max_q_len hint, the default (tuned) config.
    q_lens, ctx_lens = [40, 1, 9], [100, 50, 9]
    k, v, table = make_paged_cache(ctx_lens, 2, 32, 16, device=device)
    starts, total = _starts(q_lens)
    q = torch.randn(total, 4, 32, device=device)

    def as_tensor(x):
        return torch.tensor(x, device=device)

    out = prefill_attention(q, k, v, table, as_tensor(starts), as_tensor(q_lens),
                            as_tensor(ctx_lens), 16, sm_scale=0.2, max_q_len=40)
    ref = prefill_attention_ref(q, k, v, table, starts, q_lens, ctx_lens, 16, sm_scale=0.2)
    assert_close(out, ref, torch.float32)
