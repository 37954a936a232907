"""Merge of attention partials by log-sum-exp (the sequence split's reduction).

In: outs [R, ..., H, D] (R partial outputs over disjoint key sets, each softmax-normalized over
its own keys) and lses [R, ..., H] (their natural log-sum-exp; -inf for a partial with no key).
Out: (out [..., H, D] float32, lse [..., H] float32): attention over the union of the keys.

    L = max_r lse_r;  w_r = exp(lse_r - L);  out = sum_r w_r out_r / sum_r w_r
    lse = L + log(sum_r w_r)        (rows with no key anywhere: out 0, lse -inf)

One program per (row, slice of BLOCK_D values); the R partials are one [R, BLOCK_D] tile.
Partials are merged in rank order, so every rank that merges the same inputs gets the same bits.
"""

import torch

from crosspool_kernels._common import cdiv, next_pow2, tl, triton


@triton.jit
def _merge_state_kernel(
    outs_ptr, lses_ptr, o_ptr, lse_ptr,
    stride_or, stride_on, stride_lr, rows, dim, parts,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < dim
    r = tl.arange(0, BLOCK_R)
    rmask = r < parts
    lse = tl.load(lses_ptr + r * stride_lr + row, mask=rmask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2((lse - top) * 1.4426950408889634)
    den = tl.sum(w, 0)
    part = tl.load(outs_ptr + r[:, None] * stride_or + row * stride_on + d[None, :],
                   mask=rmask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * part.to(tl.float32), 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(o_ptr + row * dim + d, out, mask=dmask)
    if tl.program_id(1) == 0:
        merged = tl.where(den == 0.0, float("-inf"), top + tl.log2(tl.maximum(den, 1e-30))
                          / 1.4426950408889634)
        tl.store(lse_ptr + row, merged)


def merge_state(outs: torch.Tensor, lses: torch.Tensor):
    """(out, lse) merged over the first dimension of `outs` / `lses` (module docstring)."""
    parts, dim = outs.shape[0], outs.shape[-1]
    lead = outs.shape[1:-1]
    assert lses.shape == (parts, *lead), (outs.shape, lses.shape)
    rows = lses[0].numel()
    o3 = outs.reshape(parts, rows, dim).contiguous()
    l2 = lses.reshape(parts, rows).float().contiguous()
    out = torch.empty(rows, dim, device=outs.device, dtype=torch.float32)
    lse = torch.empty(rows, device=outs.device, dtype=torch.float32)
    if rows:
        block_r = max(2, next_pow2(parts))
        block_d = max(16, min(next_pow2(dim), 1024))
        _merge_state_kernel[(rows, cdiv(dim, block_d))](
            o3, l2, out, lse, o3.stride(0), o3.stride(1), l2.stride(0), rows, dim, parts,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out.view(*lead, dim), lse.view(*lead)


def merge_state_ref(outs: torch.Tensor, lses: torch.Tensor):
    """The same in torch (float32)."""
    lses = lses.float()
    top = lses.amax(dim=0)
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp(lses - top)
    den = w.sum(dim=0)
    out = (w[..., None] * outs.float()).sum(dim=0) / torch.where(den == 0, 1.0, den)[..., None]
    return out, torch.where(den == 0, float("-inf"), top + torch.log(den))
