"""Rotary position embedding, rotate-half (GPT-NeoX) style, on q and k together.

In: q [T, H, d], k [T, KVH, d] (head dimension contiguous), positions [T] (int), cos and sin
tables [max_pos, rot] with rot <= d even (the first rot dimensions rotate, the rest pass
through; tables laid out as `cat(freqs, freqs)`, as transformers builds them). Out: q and k
rotated, `x * cos + rotate_half(x) * sin`, computed in float32; in place or into new tensors.
One program per token covers all of its q and k heads.
"""

import torch

from crosspool_kernels._common import next_pow2, tl, triton


@triton.jit
def _rope_rotate(x_ptr, o_ptr, t, stride_xt, stride_xh, stride_ot, stride_oh, num_heads,
                 c1, c2, s1, s2, half,
                 BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    r = tl.arange(0, BLOCK_R)[None, :]
    mask = (h < num_heads) & (r < half)
    xb = x_ptr + t * stride_xt + h * stride_xh + r
    x1 = tl.load(xb, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xb + half, mask=mask, other=0.0).to(tl.float32)
    ob = o_ptr + t * stride_ot + h * stride_oh + r
    tl.store(ob, (x1 * c1 - x2 * s1).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(ob + half, (x2 * c2 + x1 * s2).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_copy_tail(x_ptr, o_ptr, t, stride_xt, stride_xh, stride_ot, stride_oh, num_heads,
                    rot, head_dim, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (c >= rot) & (c < head_dim)
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + c, mask=mask)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + c, x, mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cos, stride_sin, num_heads, num_kv_heads, head_dim, rot,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    half = rot // 2
    r = tl.arange(0, BLOCK_R)
    rmask = r < half
    c1 = tl.load(cos_ptr + p * stride_cos + r, mask=rmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + p * stride_cos + half + r, mask=rmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + p * stride_sin + r, mask=rmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + p * stride_sin + half + r, mask=rmask, other=0.0).to(tl.float32)[None, :]
    _rope_rotate(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, num_heads,
                 c1, c2, s1, s2, half, BLOCK_H, BLOCK_R)
    _rope_rotate(k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, num_kv_heads,
                 c1, c2, s1, s2, half, BLOCK_KH, BLOCK_R)
    if COPY_TAIL:  # out of place with a partial rotary: the unrotated dimensions too
        _rope_copy_tail(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh,
                        num_heads, rot, head_dim, BLOCK_H, BLOCK_D)
        _rope_copy_tail(k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh,
                        num_kv_heads, rot, head_dim, BLOCK_KH, BLOCK_D)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q, k) rotated; with inplace the inputs are overwritten and returned."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rot = cos.shape[-1]
    assert rot % 2 == 0 and rot <= head_dim and k.shape[2] == head_dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    q_out, k_out = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    if num_tokens == 0:
        return q_out, k_out
    block_h, block_kh = next_pow2(num_heads), next_pow2(num_kv_heads)
    _rope_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), sin.stride(0), num_heads, num_kv_heads, head_dim, rot,
        BLOCK_H=block_h, BLOCK_KH=block_kh, BLOCK_R=next_pow2(rot // 2),
        BLOCK_D=next_pow2(head_dim), COPY_TAIL=(not inplace) and rot < head_dim,
        num_warps=4 if block_h * head_dim >= 2048 else 1,
    )
    return q_out, k_out


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, inplace: bool = False):
    rot = cos.shape[-1]
    c = cos[positions].float().unsqueeze(1)
    s = sin[positions].float().unsqueeze(1)

    def rotate(x):
        xr = x[..., :rot].float()
        half = rot // 2
        rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
        y = torch.cat(((xr * c + rotated * s).to(x.dtype), x[..., rot:]), dim=-1)
        if inplace:
            x.copy_(y)
            return x
        return y

    return rotate(q), rotate(k)
