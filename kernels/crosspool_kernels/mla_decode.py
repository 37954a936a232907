"""Paged MLA decode: one new query token per sequence over its cached latents (absorbed form).

In: q [B, H, r + p]: each head's query already absorbed into the latent space (q_nope @ W_UK,
r wide) followed by its roped part (p wide); latent_cache [num_slots, 1, r + p], one latent per
token (the normalized kv latent c_kv, then the roped shared key k_pe); block_tables
[B, max_blocks] and ctx_lens [B] as for decode_attention (ctx 0: a padding row, output 0).
Out: [B, H, r], each head's output still in the latent space (the caller maps it through W_UV).

    score(h, t) = (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t]) * sm_scale
    out[h]      = softmax_t(score(h, .)) @ c_kv

It is MQA with a single KV "head" whose values are the first r entries of the keys, so one
program serves BLOCK_H query heads (the M side of tl.dot) and each latent tile is loaded once
for the scores and reused as the values. Split-K as in decode_attention: stage 1 writes a
partial output and its log-sum-exp per split; stage 2 merges them, one program per sequence,
head and slice of the latent dims (so hundreds of splits still fit one program).
"""

import math

import torch

from crosspool_kernels._common import cdiv, dot_precision, host_max, next_pow2, tl, triton
from crosspool_kernels.decode_attention import _sm_count, context_slots
from crosspool_kernels.tuned import get_config

# Measured on an H200 (DeepSeek-V2-Lite's 16 heads, r 512, p 64, bf16; BLOCK_N 32/64, 4/8 warps,
# 1-3 stages, 1-256 splits): BLOCK_N 32, 4 warps, 2 stages was best or within 10% everywhere;
# the split count is what matters: about two programs per SM (256 splits at batch 1, 32 at
# batch 8), and splits down to 64 tokens (16 at 1k). num_splits 0: from that rule.
DEFAULT_CONFIG = {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2,
                  "num_splits": 0, "max_splits": 256, "min_split_tokens": 64}


@triton.jit
def _mla_decode_split_kernel(
    q_ptr, c_ptr, bt_ptr, ctx_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_cs, stride_bt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    sm_scale_log2, block_tokens, num_heads, rank, rope_dim, num_splits,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr, DIRECT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < num_heads
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank
    p = tl.arange(0, BLOCK_P)
    pmask = p < rope_dim
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
    q_pe = tl.load(q_row + rank + p[None, :], mask=hmask[:, None] & pmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < end
        blk = tl.load(bt_ptr + b * stride_bt + pos // block_tokens, mask=nmask, other=0)
        row = c_ptr + (blk.to(tl.int64) * block_tokens + pos % block_tokens)[:, None] * stride_cs
        c = tl.load(row + r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
        k_pe = tl.load(row + rank + p[None, :], mask=nmask[:, None] & pmask[None, :], other=0.0)
        s = tl.dot(q_lat, tl.trans(c), input_precision=DOT_PREC)
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PREC)
        s = tl.where(nmask[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(c.dtype), c, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    omask = hmask[:, None] & rmask[None, :]
    o_off = b * stride_ob + heads[:, None] * stride_oh + split * stride_os + r[None, :]
    if DIRECT:
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(o_ptr + o_off, out, mask=omask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def _mla_merge_kernel(
    mid_ptr, lse_ptr, o_ptr, lse_out_ptr,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    stride_xb, stride_xh, rank, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    # One program per (sequence, head, slice of BLOCK_D latent dims): with up to hundreds of
    # splits the [splits, dims] tile of one program stays a few thousand values.
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < rank
    s = tl.arange(0, BLOCK_S)
    smask = s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: a padding row
    w = tl.exp2(lse - top)
    den = tl.sum(w, 0)
    part = tl.load(mid_ptr + b * stride_mb + h * stride_mh + s[:, None] * stride_ms + d[None, :],
                   mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty),
             mask=dmask)
    if WRITE_LSE:  # the row's natural log-sum-exp (sequence split: partials merge by it)
        merged = tl.where(den == 0.0, float("-inf"),
                          (top + tl.log2(tl.maximum(den, 1e-30))) * 0.6931471805599453)
        tl.store(lse_out_ptr + b * stride_xb + h * stride_xh, merged,
                 mask=tl.program_id(2) == 0)


def mla_decode_config(batch: int, num_heads: int, rank: int, rope_dim: int, device,
                      dtype: torch.dtype) -> dict:
    shape = {"H": num_heads, "R": rank, "P": rope_dim}
    cfg = get_config("mla_decode", shape, device, dtype, DEFAULT_CONFIG, batch=batch)
    if not cfg["num_splits"]:
        # About two programs per SM (see DEFAULT_CONFIG).
        programs = batch * cdiv(num_heads, cfg["BLOCK_H"])
        cfg["num_splits"] = max(1, min(cfg["max_splits"],
                                       cdiv(2 * _sm_count(torch.device(device)), programs)))
    return cfg


def mla_decode(
    q: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor, ctx_lens,
    block_tokens: int, value_dim: int, sm_scale: float, out: torch.Tensor | None = None,
    num_splits: int | None = None, max_ctx_len: int | None = None, config: dict | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention of q [B, H, r + p] over each sequence's paged latents
    [slots, 1, r + p] (r = value_dim); returns [B, H, r] in q's dtype (or out's).

    `lse_out` [B, H] float32: also write each row's natural log-sum-exp of the scaled scores
    there (-inf for an empty row), for merging with partials over other keys (sequence split).

    `num_splits`, `max_ctx_len` and `config` as in decode_attention (fix num_splits under
    CUDA graphs). NOTE: a list ctx_lens is copied to the device here.
    """
    batch, num_heads, width = q.shape
    rank, rope_dim = value_dim, width - value_dim
    assert latent_cache.shape[-1] == width and latent_cache.shape[1] == 1, latent_cache.shape
    assert q.stride(-1) == 1 and latent_cache.stride(-1) == 1
    if out is None:
        out = q.new_empty(batch, num_heads, rank)
    if batch == 0:
        return out
    cfg = config or mla_decode_config(batch, num_heads, rank, rope_dim, q.device, q.dtype)
    if num_splits is None:
        num_splits = cfg["num_splits"]
        if max_ctx_len is None and not isinstance(ctx_lens, torch.Tensor):
            max_ctx_len = host_max(ctx_lens)
        if max_ctx_len is not None:
            num_splits = max(1, min(num_splits, cdiv(max_ctx_len, cfg["min_split_tokens"])))
    ctx = ctx_lens if isinstance(ctx_lens, torch.Tensor) else torch.tensor(
        list(ctx_lens), device=q.device, dtype=torch.int32)
    block_h = max(16, min(next_pow2(num_heads), cfg["BLOCK_H"]))
    common = {
        "BLOCK_H": block_h, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_R": max(16, next_pow2(rank)),
        "BLOCK_P": max(16, next_pow2(rope_dim)), "DOT_PREC": dot_precision(q.dtype),
        "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
    }
    grid = (batch, cdiv(num_heads, block_h), num_splits)
    scale_log2 = sm_scale * math.log2(math.e)
    shape_args = (scale_log2, block_tokens, num_heads, rank, rope_dim, num_splits)
    if num_splits == 1 and lse_out is None:
        _mla_decode_split_kernel[grid](
            q, latent_cache, block_tables, ctx, out, out,
            q.stride(0), q.stride(1), latent_cache.stride(0), block_tables.stride(0),
            out.stride(0), out.stride(1), 0, 0, 0, *shape_args, DIRECT=True, **common)
        return out
    mid = torch.empty((batch, num_heads, num_splits, rank), device=q.device, dtype=torch.float32)
    lse = torch.empty((batch, num_heads, num_splits), device=q.device, dtype=torch.float32)
    _mla_decode_split_kernel[grid](
        q, latent_cache, block_tables, ctx, mid, lse,
        q.stride(0), q.stride(1), latent_cache.stride(0), block_tables.stride(0),
        mid.stride(0), mid.stride(1), mid.stride(2), lse.stride(0), lse.stride(1),
        *shape_args, DIRECT=False, **common)
    block_s = max(2, next_pow2(num_splits))
    block_d = max(16, min(next_pow2(rank), 4096 // block_s))
    lse_args = (lse_out.stride(0), lse_out.stride(1)) if lse_out is not None else (0, 0)
    _mla_merge_kernel[(batch, num_heads, cdiv(rank, block_d))](
        mid, lse, out, lse_out if lse_out is not None else lse,
        mid.stride(0), mid.stride(1), mid.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), *lse_args, rank, num_splits,
        BLOCK_S=block_s, BLOCK_D=block_d, WRITE_LSE=lse_out is not None, num_warps=4,
    )
    return out


def mla_decode_ref(
    q: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor, ctx_lens,
    block_tokens: int, value_dim: int, sm_scale: float, out: torch.Tensor | None = None, **_,
) -> torch.Tensor:
    """Eager float32 absorbed MLA per sequence (extra keyword arguments are ignored)."""
    batch, num_heads, _ = q.shape
    out = q.new_zeros(batch, num_heads, value_dim) if out is None else out
    lens = ctx_lens.tolist() if isinstance(ctx_lens, torch.Tensor) else list(ctx_lens)
    for i, n in enumerate(lens):
        if n == 0:
            out[i] = 0
            continue
        latents = latent_cache[context_slots(block_tables, i, n, block_tokens), 0].float()
        probs = torch.softmax(q[i].float() @ latents.T * sm_scale, dim=-1)  # [H, n]
        out[i] = (probs @ latents[:, :value_dim]).to(out.dtype)
    return out


def mla_decode_unabsorbed_ref(
    q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
    latent_cache: torch.Tensor, block_tables: torch.Tensor, ctx_lens, block_tokens: int,
    sm_scale: float,
) -> torch.Tensor:
    """The same step as transformers computes it, keys and values decompressed per head:
    q_nope [B, H, n], q_pe [B, H, p], w_uk [H, n, r], w_uv [H, v, r] -> [B, H, v] float32.
    Checks the absorption (mla_decode's output @ W_UV^T must equal this)."""
    rank = w_uk.shape[-1]
    out = q_nope.new_zeros(q_nope.shape[0], q_nope.shape[1], w_uv.shape[1], dtype=torch.float32)
    lens = ctx_lens.tolist() if isinstance(ctx_lens, torch.Tensor) else list(ctx_lens)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        latents = latent_cache[context_slots(block_tables, i, n, block_tokens), 0].float()
        c_kv, k_pe = latents[:, :rank], latents[:, rank:]
        keys = torch.einsum("tr,hnr->htn", c_kv, w_uk.float())  # [H, n_ctx, nope]
        values = torch.einsum("tr,hvr->htv", c_kv, w_uv.float())
        scores = torch.einsum("hn,htn->ht", q_nope[i].float(), keys) + q_pe[i].float() @ k_pe.T
        probs = torch.softmax(scores * sm_scale, dim=-1)
        out[i] = torch.einsum("ht,htv->hv", probs, values)
    return out
