"""Paged decode attention: one new query token per sequence over its whole cached context.

In: q [B, H, d] (row i is sequence i's new token, already RoPE'd, its K/V already stored);
k_cache, v_cache [num_slots, KVH, d] (H a multiple of KVH: MHA, GQA or MQA); block_tables
[B, max_blocks] (block ids; position p of sequence i lives in slot
`block_tables[i, p // block_tokens] * block_tokens + p % block_tokens`); ctx_lens [B] (tokens
in the cache for each sequence, this step's included; 0 marks a padding row, whose output is 0).
Out: [B, H, d] in q's dtype.

Split-K: stage 1 runs one program per (sequence, KV head, split) and covers 1/num_splits of
the context for all query heads sharing that KV head (packed as the M side of tl.dot); it
writes a partial output and its log-sum-exp. Stage 2 merges the splits. With one split, stage
1 writes the output directly. Softmax runs in base 2 with the scale folded in.
"""

import functools
import math

import torch

from crosspool_kernels._common import cdiv, dot_precision, host_max, next_pow2, tl, triton
from crosspool_kernels.tuned import get_config

DEFAULT_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "num_splits": 0,
                  "min_split_tokens": 256}


@triton.jit
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    sm_scale_log2, block_tokens, head_dim, num_splits,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DIRECT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # Splits start on BLOCK_N boundaries; trailing splits of a short context may be empty.
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    hs = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + hs
    hmask = hs < GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < end
        blk = tl.load(bt_ptr + b * stride_bt + pos // block_tokens, mask=nmask, other=0)
        slot = blk.to(tl.int64) * block_tokens + pos % block_tokens
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + slot[:, None] * stride_kcs + kvh * stride_kch + d[None, :],
                    mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + slot[:, None] * stride_vcs + kvh * stride_vch + d[None, :],
                    mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    omask = hmask[:, None] & dmask[None, :]
    o_off = b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    if DIRECT:
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(o_ptr + o_off, out, mask=omask)
        # -inf for an empty split (the maximum keeps log2 off zero).
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def _decode_merge_kernel(
    mid_ptr, lse_ptr, o_ptr, lse_out_ptr,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    stride_xb, stride_xh, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    smask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: a padding row
    w = tl.exp2(lse - top)
    part = tl.load(mid_ptr + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + d[None, :],
                   mask=smask[:, None] & dmask[None, :], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty),
             mask=dmask)
    if WRITE_LSE:  # the row's natural log-sum-exp (sequence split: partials merge by it)
        merged = tl.where(den == 0.0, float("-inf"),
                          (top + tl.log2(tl.maximum(den, 1e-30))) * 0.6931471805599453)
        tl.store(lse_out_ptr + b * stride_xb + h * stride_xh, merged)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def decode_config(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, device,
                  dtype: torch.dtype) -> dict:
    shape = {"G": num_heads // num_kv_heads, "D": head_dim}
    cfg = get_config("decode_attention", shape, device, dtype, DEFAULT_CONFIG, batch=batch)
    if not cfg["num_splits"]:
        # Enough programs to fill the machine about four times over.
        programs = batch * num_kv_heads
        cfg["num_splits"] = max(1, min(64, cdiv(4 * _sm_count(torch.device(device)), programs)))
    return cfg


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    ctx_lens, block_tokens: int, sm_scale: float | None = None, out: torch.Tensor | None = None,
    num_splits: int | None = None, max_ctx_len: int | None = None, config: dict | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, H, d] over each sequence's paged context; returns [B, H, d].

    `lse_out` [B, H] float32: also write each row's natural log-sum-exp of the scaled scores
    there (-inf for an empty row), for merging with partials over other keys (sequence split).

    `num_splits` fixes the split count (keep it fixed under CUDA graphs); otherwise it comes
    from the tuned config, capped so that a split covers at least `min_split_tokens` when
    `max_ctx_len` is known (known for free when ctx_lens is a list).
    NOTE: a list ctx_lens is copied to the device here; under graph capture pass a tensor.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and k_cache.shape[2] == head_dim
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    cfg = config or decode_config(batch, num_heads, num_kv_heads, head_dim, q.device, q.dtype)
    if num_splits is None:
        num_splits = cfg["num_splits"]
        if max_ctx_len is None and not isinstance(ctx_lens, torch.Tensor):
            max_ctx_len = host_max(ctx_lens)
        if max_ctx_len is not None:
            num_splits = max(1, min(num_splits, cdiv(max_ctx_len, cfg["min_split_tokens"])))
    ctx = ctx_lens if isinstance(ctx_lens, torch.Tensor) else torch.tensor(
        list(ctx_lens), device=q.device, dtype=torch.int32)
    group = num_heads // num_kv_heads
    common = {
        "GROUP": group, "BLOCK_H": max(16, next_pow2(group)), "BLOCK_N": cfg["BLOCK_N"],
        "BLOCK_D": max(16, next_pow2(head_dim)), "DOT_PREC": dot_precision(q.dtype),
        "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
    }
    grid = (batch, num_kv_heads, num_splits)
    scale_log2 = sm_scale * math.log2(math.e)
    if num_splits == 1 and lse_out is None:
        _decode_split_kernel[grid](
            q, k_cache, v_cache, block_tables, ctx, out, out,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
            out.stride(0), out.stride(1), 0, 0, 0,
            scale_log2, block_tokens, head_dim, 1, DIRECT=True, **common,
        )
        return out
    mid = torch.empty((batch, num_heads, num_splits, head_dim), device=q.device,
                      dtype=torch.float32)
    lse = torch.empty((batch, num_heads, num_splits), device=q.device, dtype=torch.float32)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, block_tables, ctx, mid, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        mid.stride(0), mid.stride(1), mid.stride(2), lse.stride(0), lse.stride(1),
        scale_log2, block_tokens, head_dim, num_splits, DIRECT=False, **common,
    )
    lse_args = (lse_out.stride(0), lse_out.stride(1)) if lse_out is not None else (0, 0)
    _decode_merge_kernel[(batch, num_heads)](
        mid, lse, out, lse_out if lse_out is not None else lse,
        mid.stride(0), mid.stride(1), mid.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), *lse_args, head_dim, num_splits,
        BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_D=next_pow2(head_dim),
        WRITE_LSE=lse_out is not None, num_warps=4 if head_dim >= 128 else 2,
    )
    return out


def context_slots(block_tables: torch.Tensor, row: int, ctx_len: int, block_tokens: int):
    """Slots of positions [0, ctx_len) of one sequence."""
    pos = torch.arange(ctx_len, device=block_tables.device)
    return block_tables[row, pos // block_tokens] * block_tokens + pos % block_tokens


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    ctx_lens, block_tokens: int, sm_scale: float | None = None, out: torch.Tensor | None = None,
    **_,
) -> torch.Tensor:
    """Eager float32 softmax attention per sequence (extra keyword arguments are ignored)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[1]
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    out = torch.zeros_like(q) if out is None else out
    lens = ctx_lens.tolist() if isinstance(ctx_lens, torch.Tensor) else list(ctx_lens)
    for i, n in enumerate(lens):
        if n == 0:
            out[i] = 0
            continue
        slots = context_slots(block_tables, i, n, block_tokens)
        keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # [n, H, d]
        vals = v_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), keys) * sm_scale
        probs = torch.softmax(scores, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", probs, vals).to(q.dtype)
    return out
