"""RMSNorm, and residual add fused with RMSNorm, over the last dimension.

In: x [..., N] (last dimension contiguous), weight [N], eps; for the fused form also
residual [..., N]. Out: `weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)`, as
transformers computes it (statistics in float32, the weight multiplied after the cast back);
the fused form first forms `s = x + residual` in x's dtype and returns (norm(s), s).
One program per row; rows up to 64k wide fit one block.
"""

import torch

from crosspool_kernels._common import next_pow2, tl, triton


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, o_ptr, s_ptr,
    stride_x, stride_r, stride_o, stride_s, n, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded as torch's add
        tl.store(s_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, (w * y).to(o_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    assert t.stride(-1) == 1, "the normalized dimension must be contiguous"
    return t.reshape(-1, t.shape[-1])  # a view whenever the rows are evenly strided


def _launch(x, residual, weight, eps, out, sum_out):
    n = x.shape[-1]
    x2, o2 = _rows(x), _rows(out)
    r2 = _rows(residual) if residual is not None else x2
    s2 = _rows(sum_out) if sum_out is not None else o2
    block = next_pow2(n)
    num_warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, s2, x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype)) if out is None else out
    if x.numel():
        _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); with inplace, written into (x, residual)."""
    if inplace:
        out, total = x, residual
    else:
        out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
        total = torch.empty_like(x)
    if x.numel():
        # In place, each program reads its row of x and residual before writing either.
        _launch(x, residual, weight, eps, out, total)
    return out, total


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None) -> torch.Tensor:
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, inplace: bool = False):
    total = x + residual
    y = rms_norm_ref(total, weight, eps)
    if inplace:
        x.copy_(y)
        residual.copy_(total)
        return x, residual
    return y, total
