"""Fused MoE: routed experts of one layer as two grouped GEMMs over tokens sorted by expert.

In: hidden [T, Hd]; topk_ids [T, k] (global expert ids; negative = no expert) and topk_weights
[T, k]; w13 [E, 2I, Hd] (per expert the gate rows, then the up rows) and w2 [E, Hd, I], where
E counts the experts held here; optional local_index [E_global] mapping a global expert id to
its row in w13/w2, or -1 where another FFN server owns it (those pairs contribute nothing).
Out: [T, Hd] = sum over the k pairs of weight * w2[e] @ (silu(gate) * up), in hidden's dtype.

Steps: `moe_align` sorts the (token, slot) pairs by local expert into BLOCK_M-aligned runs
(one Triton program up to 1024 pairs, torch ops beyond; neither waits on the host, so the
whole layer can sit in a CUDA graph); GEMM 1 gathers each block's tokens
and computes gate and up tiles together, writing silu(gate) * up per pair; GEMM 2 multiplies by
w2 with the routing weight fused in its epilogue, writing per pair; a last kernel sums each
token's k pairs in float32, skipping pairs that no local expert served.
"""

import torch
import torch.nn.functional as F

from crosspool_kernels._common import cdiv, dot_precision, next_pow2, tl, triton, triton_usable
from crosspool_kernels.tuned import get_config


def local_expert_ids(topk_ids: torch.Tensor, local_index: torch.Tensor | None) -> torch.Tensor:
    """Flat [T*k] local expert per pair; -1 where no local expert serves it."""
    flat = topk_ids.reshape(-1).long()
    if local_index is None:
        return flat.clamp(min=-1)
    return torch.where(flat >= 0, local_index[flat.clamp(min=0)], -1)


def align_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound of the aligned length: each expert that gets pairs pads < block_m."""
    return cdiv(num_pairs + min(num_pairs, num_experts) * (block_m - 1), block_m) * block_m


# Up to this many pairs one program beats the dozen launches of the torch path.
ALIGN_KERNEL_MAX_PAIRS = 1024


@triton.jit
def _moe_align_kernel(
    local_ptr, pairs_ptr, experts_ptr, npad_ptr, num_pairs, num_experts, size,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program: per-expert counts, padded offsets, a stable scatter of the pair ids and
    the expert of every block. The padding entries were filled before the launch."""
    counts = tl.zeros([BLOCK_E], tl.int32)
    for n0 in range(0, num_pairs, BLOCK_N):
        i = n0 + tl.arange(0, BLOCK_N)
        e = tl.load(local_ptr + i, mask=i < num_pairs, other=-1).to(tl.int32)
        counts += tl.histogram(tl.maximum(e, 0), BLOCK_E, mask=e >= 0)
    experts = tl.arange(0, BLOCK_E)
    padded = tl.where(experts < num_experts, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, 0)
    tl.store(npad_ptr, tl.sum(padded, 0))

    cursor = ends - padded  # next free slot of each expert
    j = tl.arange(0, BLOCK_N)
    for n0 in range(0, num_pairs, BLOCK_N):
        i = n0 + j
        e = tl.load(local_ptr + i, mask=i < num_pairs, other=-1).to(tl.int32)
        valid = e >= 0
        ec = tl.maximum(e, 0)
        # Rank among this chunk's earlier pairs of the same expert keeps the order stable.
        same = (e[:, None] == e[None, :]) & (j[None, :] < j[:, None]) & valid[None, :]
        dest = tl.gather(cursor, ec, 0) + tl.sum(same.to(tl.int32), 1)
        tl.store(pairs_ptr + dest, i, mask=valid)
        cursor += tl.histogram(ec, BLOCK_E, mask=valid)

    for b0 in range(0, size // BLOCK_M, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        first = b * BLOCK_M
        owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), 1)
        tl.store(experts_ptr + b, tl.where(owner < num_experts, owner, -1), mask=first < size)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              local_index: torch.Tensor | None = None, local: torch.Tensor | None = None):
    """Sorts the T*k (token, slot) pairs by local expert, each expert's run padded to block_m.

    Returns (sorted_pairs [P], block_experts [P // block_m], num_padded [1]): pair ids
    (token * k + slot), in their original order within an expert, with padding entries equal
    to T*k; the local expert of each block, -1 for blocks past the end; and the used length.
    P = align_size(...) is a static bound, so nothing here waits on the device. Small batches
    take one Triton program, larger ones the torch path (`moe_align_torch`); both give the
    same result.
    """
    if local is None:
        local = local_expert_ids(topk_ids, local_index)
    n = local.numel()
    if n > ALIGN_KERNEL_MAX_PAIRS or not triton_usable(local.device):
        return moe_align_torch(topk_ids, num_experts, block_m, local=local)
    size = align_size(n, num_experts, block_m)
    dev = local.device
    sorted_pairs = torch.full((size,), n, device=dev, dtype=torch.int32)
    block_experts = torch.empty(size // block_m, device=dev, dtype=torch.int32)
    num_padded = torch.empty(1, device=dev, dtype=torch.int32)
    _moe_align_kernel[(1,)](
        local, sorted_pairs, block_experts, num_padded, n, num_experts, size,
        BLOCK_M=block_m, BLOCK_E=next_pow2(num_experts), BLOCK_N=64, BLOCK_B=64, num_warps=4,
    )
    return sorted_pairs, block_experts, num_padded


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                    local_index: torch.Tensor | None = None, local: torch.Tensor | None = None):
    """`moe_align` in torch ops (stable argsort); the path for large batches."""
    n = topk_ids.numel()
    dev = topk_ids.device
    if local is None:
        local = local_expert_ids(topk_ids, local_index)
    key = torch.where(local >= 0, local, num_experts)  # pairs without a local expert sort last
    counts = torch.zeros(num_experts + 1, device=dev, dtype=torch.int64)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = torch.cat([ends.new_zeros(1), ends[:-1], ends[-1:]])  # dump slot for expert E
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=dev) - first[sorted_key]
    size = align_size(n, num_experts, block_m)
    # Pairs of non-local experts land in slot `size`, cut off below.
    dest = torch.where(sorted_key < num_experts, starts[sorted_key] + rank, size)
    sorted_pairs = torch.full((size + 1,), n, device=dev, dtype=torch.int32)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, size, block_m, device=dev)
    block_experts = torch.searchsorted(ends, block_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return sorted_pairs[:size], block_experts, ends[-1:].to(torch.int32)


@triton.jit
def _moe_gate_up_kernel(
    a_ptr, w_ptr, o_ptr, pairs_ptr, experts_ptr, npad_ptr,
    stride_am, stride_we, stride_wn, stride_wk, stride_om,
    num_pairs, top_k, inter, hidden,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(experts_ptr + pid_m)
    if (pid_m * BLOCK_M < tl.load(npad_ptr)) & (e >= 0):
        pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        pmask = pairs < num_pairs
        tokens = (pairs // top_k).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < inter
        w_base = w_ptr + e.to(tl.int64) * stride_we
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < hidden
            a = tl.load(a_ptr + tokens[:, None] * stride_am + kk[None, :],
                        mask=pmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            w_gate = tl.load(w_base + n[None, :] * stride_wn + kk[:, None] * stride_wk,
                             mask=wmask, other=0.0)
            w_up = tl.load(w_base + (inter + n[None, :]) * stride_wn + kk[:, None] * stride_wk,
                           mask=wmask, other=0.0)
            acc_gate += tl.dot(a, w_gate, input_precision=DOT_PREC)
            acc_up += tl.dot(a, w_up, input_precision=DOT_PREC)
        act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        tl.store(o_ptr + pairs[:, None].to(tl.int64) * stride_om + n[None, :],
                 act.to(o_ptr.dtype.element_ty), mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _moe_down_kernel(
    a_ptr, w_ptr, o_ptr, pairs_ptr, experts_ptr, npad_ptr, weights_ptr,
    stride_am, stride_we, stride_wn, stride_wk, stride_om,
    num_pairs, hidden, inter,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(experts_ptr + pid_m)
    if (pid_m * BLOCK_M < tl.load(npad_ptr)) & (e >= 0):
        pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        pmask = pairs < num_pairs
        rows = pairs.to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < hidden
        w_base = w_ptr + e.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < inter
            a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :],
                        mask=pmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_base + n[None, :] * stride_wn + kk[:, None] * stride_wk,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(a, w, input_precision=DOT_PREC)
        weight = tl.load(weights_ptr + rows, mask=pmask, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        tl.store(o_ptr + rows[:, None] * stride_om + n[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _moe_sum_kernel(x_ptr, local_ptr, o_ptr, stride_xm, stride_om, top_k, hidden,
                    BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(top_k):
        pair = t * top_k + j
        served = tl.load(local_ptr + pair) >= 0  # rows of unserved pairs were never written
        x = tl.load(x_ptr + pair * stride_xm + cols, mask=cmask & served, other=0.0)
        acc += x.to(tl.float32)
    tl.store(o_ptr + t * stride_om + cols, acc.to(o_ptr.dtype.element_ty), mask=cmask)


def default_config(num_tokens: int, top_k: int, num_experts: int) -> dict:
    # BLOCK_M near the mean tokens per expert: padding rows cost MMA work, and on an H100 with
    # 128 experts BLOCK_M 16 beat 32 and 64 up to 64 tokens x top-8 (bench, untuned).
    per_expert = num_tokens * top_k / num_experts
    if per_expert < 24:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    if per_expert < 96:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def moe_config(num_tokens: int, top_k: int, num_experts: int, inter: int, device,
               dtype: torch.dtype) -> dict:
    shape = {"E": num_experts, "N": inter}
    return get_config("fused_moe", shape, device, dtype,
                      default_config(num_tokens, top_k, num_experts), batch=num_tokens)


def fused_moe(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, local_index: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Routed-expert output [T, Hd] (a partial sum when local_index leaves experts out)."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    assert w13.shape[2] == hidden_size and w2.shape == (num_experts, hidden_size, inter)
    assert hidden.stride(-1) == 1
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    cfg = config or moe_config(num_tokens, top_k, num_experts, inter, hidden.device, hidden.dtype)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    local = local_expert_ids(topk_ids, local_index)
    pairs, block_experts, num_padded = moe_align(topk_ids, num_experts, bm, local=local)
    num_pairs = num_tokens * top_k
    act = torch.empty((num_pairs, inter), device=hidden.device, dtype=hidden.dtype)
    per_pair = torch.empty((num_pairs, hidden_size), device=hidden.device, dtype=hidden.dtype)
    weights = topk_weights.reshape(-1)
    prec = dot_precision(hidden.dtype)
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    _moe_gate_up_kernel[(block_experts.numel(), cdiv(inter, bn))](
        hidden, w13, act, pairs, block_experts, num_padded,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0),
        num_pairs, top_k, inter, hidden_size,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PREC=prec, **launch,
    )
    _moe_down_kernel[(block_experts.numel(), cdiv(hidden_size, bn))](
        act, w2, per_pair, pairs, block_experts, num_padded, weights,
        act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), per_pair.stride(0),
        num_pairs, hidden_size, inter,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PREC=prec, **launch,
    )
    out = torch.empty_like(hidden)
    block = min(1024, next_pow2(hidden_size))
    _moe_sum_kernel[(num_tokens, cdiv(hidden_size, block))](
        per_pair, local, out, per_pair.stride(0), out.stride(0), top_k, hidden_size,
        BLOCK=block, num_warps=4,
    )
    return out


def fused_moe_ref(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, local_index: torch.Tensor | None = None, **_,
) -> torch.Tensor:
    """Loop over the local experts that received tokens, in float32."""
    out = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
    ids = topk_ids.long()
    if local_index is not None:
        ids = torch.where(ids >= 0, local_index[ids.clamp(min=0)], -1)
    for e in torch.unique(ids[ids >= 0]).tolist():
        token_idx, slot = torch.where(ids == e)
        gate, up = F.linear(hidden[token_idx].float(), w13[e].float()).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e].float())
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None].float())
    return out.to(hidden.dtype)
