"""Paged prefill / extend attention: causal attention of several new tokens per sequence.

In: q [T, H, d], the batch's new tokens flattened sequence after sequence (RoPE'd; their K/V
already stored in the cache by `store_kv`); k_cache, v_cache [num_slots, KVH, d];
block_tables [B, max_blocks]; per sequence q_starts (offset of its first new token in q),
q_lens and ctx_lens (cache length after this step). The new tokens of sequence i sit at
positions [ctx_len - q_len, ctx_len) and each sees every position up to its own, so a cached
prefix (chunked prefill, prefix reuse) and decode rows (q_len = 1) mix freely in one batch.
Out: [T, H, d] in q's dtype (rows of q not covered by any sequence are left untouched).

One program per (sequence, query head, block of BLOCK_M new tokens); it streams the context
in blocks of BLOCK_N through the block table with an online base-2 softmax, and stops at the
causal limit of its last query.
"""

import math

import torch

from crosspool_kernels._common import (
    cdiv,
    dot_precision,
    host_max,
    index_tensor,
    next_pow2,
    tl,
    triton,
)
from crosspool_kernels.decode_attention import context_slots
from crosspool_kernels.tuned import get_config

DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, qstart_ptr, qlen_ptr, ctx_ptr, o_ptr,
    stride_qt, stride_qh, stride_kcs, stride_kch, stride_vcs, stride_vch, stride_bt,
    stride_ot, stride_oh,
    sm_scale_log2, block_tokens, head_dim,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_len = tl.load(qlen_ptr + b)
    if mb * BLOCK_M < q_len:
        q_start = tl.load(qstart_ptr + b)
        ctx = tl.load(ctx_ptr + b)
        prefix = ctx - q_len
        kvh = h // GROUP
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = m < q_len
        q_pos = prefix + m
        d = tl.arange(0, BLOCK_D)
        dmask = d < head_dim
        rows = (q_start + m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # The last query of this block sees positions < min(ctx, prefix + (mb + 1) * BLOCK_M).
        end = tl.minimum(ctx, prefix + (mb + 1) * BLOCK_M)
        for n0 in range(0, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            nmask = pos < end
            blk = tl.load(bt_ptr + b * stride_bt + pos // block_tokens, mask=nmask, other=0)
            slot = blk.to(tl.int64) * block_tokens + pos % block_tokens
            kvmask = nmask[:, None] & dmask[None, :]
            k = tl.load(kc_ptr + slot[:, None] * stride_kcs + kvh * stride_kch + d[None, :],
                        mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
            # Every row sees position 0, so no row is all -inf after the first block.
            s = tl.where(nmask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vc_ptr + slot[:, None] * stride_vcs + kvh * stride_vch + d[None, :],
                        mask=kvmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def prefill_config(head_dim: int, max_q_len: int, device, dtype: torch.dtype) -> dict:
    return get_config("prefill_attention", {"D": head_dim}, device, dtype, DEFAULT_CONFIG,
                      batch=max_q_len)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    q_starts, q_lens, ctx_lens, block_tokens: int, sm_scale: float | None = None,
    out: torch.Tensor | None = None, max_q_len: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context; [T, H, d].

    q_starts / q_lens / ctx_lens are lists or [B] tensors. The grid is sized by the longest
    q_len: given for free by a list, else pass `max_q_len` (NOTE: else a device sync).
    Lists are copied to the device here; under CUDA-graph capture pass tensors.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and k_cache.shape[2] == head_dim
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q)
    batch = len(q_lens)
    if max_q_len is None:
        max_q_len = host_max(q_lens)
    if batch == 0 or max_q_len == 0 or num_tokens == 0:
        return out
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    cfg = config or prefill_config(head_dim, max_q_len, q.device, q.dtype)
    dev = q.device
    grid = (batch, num_heads, cdiv(max_q_len, cfg["BLOCK_M"]))
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables,
        index_tensor(q_starts, dev), index_tensor(q_lens, dev), index_tensor(ctx_lens, dev), out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        sm_scale * math.log2(math.e), block_tokens, head_dim,
        GROUP=num_heads // num_kv_heads, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=max(16, next_pow2(head_dim)), DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def prefill_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    q_starts, q_lens, ctx_lens, block_tokens: int, sm_scale: float | None = None,
    out: torch.Tensor | None = None, **_,
) -> torch.Tensor:
    """Eager float32 causal attention per sequence (extra keyword arguments are ignored)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[1]
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    out = torch.empty_like(q) if out is None else out

    def as_list(x):
        return x.tolist() if isinstance(x, torch.Tensor) else list(x)

    for i, (start, n, ctx) in enumerate(zip(as_list(q_starts), as_list(q_lens), as_list(ctx_lens))):
        if n == 0:
            continue
        slots = context_slots(block_tables, i, ctx, block_tokens)
        keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # [ctx, H, d]
        vals = v_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + n].float(), keys) * sm_scale
        q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + n] = torch.einsum("hqk,khd->qhd", probs, vals).to(q.dtype)
    return out
