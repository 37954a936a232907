"""Small-batch MoE: decode at batch <= 8 as grouped GEMVs that read only the chosen experts.

In: hidden [T, Hd]; topk_ids [T, k] (global expert ids; negative = no expert) and topk_weights
[T, k]; w13 [E, 2I, Hd] (per expert the gate rows, then the up rows) and w2 [E, Hd, I], the
layout `FFNHalf` holds (no copies); optional local_index [E_global] -> local row or -1 (another
FFN server owns it); optional shared expert shared_w13 [2S, Hd], shared_w2 [Hd, S] and its
sigmoid gate shared_gate [1, Hd] (Qwen2-MoE; without a gate the shared output is added as is).
Out: [T, Hd] = sum over the token's k pairs of weight * w2[e] @ (silu(gate) * up)
(+ sigmoid(h . shared_gate) * shared_w2 @ (silu(gate_s) * up_s)), in hidden's dtype.

Why not the fused-MoE GEMM at batch <= 8: it sorts pairs by expert and pads every expert's run
to BLOCK_M >= 16 rows of tensor-core tiles, so a batch-1 step computes 16x the rows it needs and
costs an align launch and a sum launch besides. Decode at this size is bound by reading the
chosen experts' bytes once; these kernels are GEMVs on CUDA cores, as many programs as the
weights allow, and no sort.

Two launches (three with split-K):
1. gate/up: one program per (token, pair, BLOCK_N rows of the intermediate dim), and per
   (token, BLOCK_N rows of the shared expert): both projections of its rows over the whole
   hidden dim, silu(gate) * up, times the pair's routing weight (the shared expert: its sigmoid
   gate, computed by the same program), written in float32 to act [T, k*I + S], one row per
   token. Splitting along the intermediate dim is what gives a batch-1 step its parallelism:
   T * k * I / BLOCK_N programs (Qwen3-30B-A3B: 8 * 768 / 16 = 384 at T=1; Mixtral 1792).
2. down: one program per (token, BLOCK_N output rows, K split). It loops over the token's k
   experts (and the shared expert), reading each one's w2 rows against that expert's slice of
   act, and keeps the sum over the experts in registers: the weighted sum needs no atomics and
   no pass over per-pair outputs. With SPLIT_K > 1 each program covers 1/SPLIT_K of every
   expert's intermediate dim (more programs when T * Hd / BLOCK_N alone would leave SMs idle)
   and writes a float32 partial; 3. a reduction kernel sums the partials and casts.

Why a second pass rather than float32 atomics for split-K on Hopper: `red.global.add.f32` is
cheap there (resolved in L2, little contention with k <= 8 adders per element), but it needs a
zeroed float32 buffer (a memset node) and a cast to bf16 afterwards, which are as many launches
as the reduction pass; and the order of the adds varies from run to run, so the bf16 output,
hence greedy tokens, would not be reproducible between two replays of one graph. The pass is
deterministic at the same launch count; at SPLIT_K = 1 neither is needed.

Nothing waits on the host: shapes and the config depend on T only (static per CUDA-graph
bucket), expert ids are read on the device. A pair that shares its expert with another token
reads that expert again (from L2 when the programs overlap in time), which at <= 8 tokens is
rare for 60-128 experts and bounded for Mixtral's 8.
"""

import functools

import torch
import torch.nn.functional as F

from crosspool_kernels._common import cdiv, next_pow2, tl, triton, triton_usable
from crosspool_kernels.tuned import get_config

# Largest batch the engine sends here; above it the fused-MoE GEMM reuses each expert's tiles
# across tokens and wins.
SMALL_BATCH_MAX_TOKENS = 8
# Largest batch `auto` sends here. On an H200 (benchmark/results/moe-small-batch-h200/) the
# path beat the fused-MoE GEMM at 1 token on every shape (1.06-1.36x), tied at 2 and lost from
# 4 tokens on (0.56-0.95x).
AUTO_MAX_TOKENS = 2


def use_small_batch(mode: str, num_tokens: int, device) -> bool:
    """The selection behind --moe-small-batch: `auto` on CUDA, `on` wherever Triton runs (the
    interpreter on CPU, for tests), `off` never; `on` up to SMALL_BATCH_MAX_TOKENS, `auto` up to
    AUTO_MAX_TOKENS."""
    if mode == "off" or not 0 < num_tokens <= SMALL_BATCH_MAX_TOKENS:
        return False
    if mode == "auto" and (torch.device(device).type != "cuda" or num_tokens > AUTO_MAX_TOKENS):
        return False
    return triton_usable(device)


@triton.jit
def _expert_of(ids_ptr, index_ptr, pair, HAS_INDEX: tl.constexpr):
    """Local expert row of a (token, slot) pair, or -1."""
    g = tl.load(ids_ptr + pair).to(tl.int64)
    e = g
    if HAS_INDEX:
        e = tl.load(index_ptr + tl.maximum(g, 0)).to(tl.int64)
    return tl.where(g >= 0, e, -1)


@triton.jit
def _swiglu_rows(x_ptr, w_ptr, stride_n, stride_k, n, nmask, up_rows, hidden,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """silu(W_gate[n] . x) * (W_up[n] . x) in float32 for the rows n of one expert."""
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < hidden
        x = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        m = nmask[:, None] & kmask[None, :]
        rows = w_ptr + n[:, None] * stride_n + kk[None, :] * stride_k
        w_gate = tl.load(rows, mask=m, other=0.0)
        w_up = tl.load(rows + up_rows * stride_n, mask=m, other=0.0)
        acc_gate += w_gate.to(tl.float32) * x[None, :]
        acc_up += w_up.to(tl.float32) * x[None, :]
    gate = tl.sum(acc_gate, 1)
    return gate / (1.0 + tl.exp(-gate)) * tl.sum(acc_up, 1)


@triton.jit
def _gate_up_kernel(
    x_ptr, ids_ptr, weights_ptr, index_ptr, w13_ptr, sw13_ptr, sgate_ptr, act_ptr,
    stride_xt, stride_we, stride_wn, stride_wk, stride_sn, stride_sk, stride_at,
    top_k, inter, shared_inter, hidden, routed_tiles,
    HAS_INDEX: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    x_row = x_ptr + t * stride_xt
    act_row = act_ptr + t * stride_at
    if w < top_k * routed_tiles:
        slot = w // routed_tiles
        pair = t * top_k + slot
        e = _expert_of(ids_ptr, index_ptr, pair, HAS_INDEX)
        if e >= 0:  # an unserved pair's act is never read
            n = (w % routed_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = n < inter
            act = _swiglu_rows(x_row, w13_ptr + e * stride_we, stride_wn, stride_wk, n, nmask,
                               inter, hidden, BLOCK_N, BLOCK_K)
            act = act * tl.load(weights_ptr + pair).to(tl.float32)
            tl.store(act_row + slot * inter + n, act, mask=nmask)
    elif HAS_SHARED:
        n = (w - top_k * routed_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < shared_inter
        act = _swiglu_rows(x_row, sw13_ptr, stride_sn, stride_sk, n, nmask, shared_inter,
                           hidden, BLOCK_N, BLOCK_K)
        if HAS_GATE:
            acc = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                kmask = kk < hidden
                x = tl.load(x_row + kk, mask=kmask, other=0.0).to(tl.float32)
                g = tl.load(sgate_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                acc += x * g
            act = act / (1.0 + tl.exp(-tl.sum(acc, 0)))
        tl.store(act_row + top_k * inter + n, act, mask=nmask)


@triton.jit
def _down_rows(acc, a_ptr, w_ptr, stride_n, stride_k, n, nmask, lo, hi,
               BLOCK_K: tl.constexpr):
    """acc += W[n, lo:hi] * a[lo:hi] (elementwise; reduced over the columns by the caller)."""
    for k0 in range(lo, hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < hi
        a = tl.load(a_ptr + kk, mask=kmask, other=0.0)
        wt = tl.load(w_ptr + n[:, None] * stride_n + kk[None, :] * stride_k,
                     mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += wt.to(tl.float32) * a[None, :]
    return acc


@triton.jit
def _down_kernel(
    act_ptr, ids_ptr, index_ptr, w2_ptr, sw2_ptr, out_ptr,
    stride_at, stride_we, stride_wn, stride_wk, stride_sn, stride_sk, stride_os, stride_ot,
    top_k, inter, shared_inter, hidden, k_chunk, shared_chunk,
    HAS_INDEX: tl.constexpr, HAS_SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.program_id(2)
    nmask = n < hidden
    act_row = act_ptr + t * stride_at
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    lo = s * k_chunk
    hi = tl.minimum(lo + k_chunk, inter)
    for j in range(top_k):
        e = _expert_of(ids_ptr, index_ptr, t * top_k + j, HAS_INDEX)
        if e >= 0:
            acc = _down_rows(acc, act_row + j * inter, w2_ptr + e * stride_we, stride_wn,
                             stride_wk, n, nmask, lo, hi, BLOCK_K)
    if HAS_SHARED:
        lo = s * shared_chunk
        hi = tl.minimum(lo + shared_chunk, shared_inter)
        acc = _down_rows(acc, act_row + top_k * inter, sw2_ptr, stride_sn, stride_sk, n, nmask,
                         lo, hi, BLOCK_K)
    y = tl.sum(acc, 1)
    tl.store(out_ptr + s * stride_os + t * stride_ot + n, y.to(out_ptr.dtype.element_ty),
             mask=nmask)


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, stride_ps, stride_pt, stride_ot, splits, hidden,
                      BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * stride_ps + t * stride_pt + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@functools.cache
def _sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests cover the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(num_tokens: int, hidden: int, inter: int, device) -> dict:
    """Untuned: 16-row tiles over 256 columns; down split along K until the down launch has
    about two programs per SM (SPLIT_K 0 = this automatic choice)."""
    return {"BLOCK_N": 16, "BLOCK_K": 256, "DOWN_BLOCK_N": 16, "DOWN_BLOCK_K": 256,
            "SPLIT_K": 0, "num_warps": 4}


def split_k(cfg: dict, num_tokens: int, hidden: int, inter: int, device) -> int:
    """SPLIT_K of `cfg`, or for 0 the smallest split giving ~2 programs per SM, such that no
    split is empty."""
    blocks = cdiv(inter, cfg["DOWN_BLOCK_K"])
    split = cfg["SPLIT_K"]
    if split <= 0:
        programs = num_tokens * cdiv(hidden, cfg["DOWN_BLOCK_N"])
        split = min(8, cdiv(2 * _sm_count(device), programs))
    split = max(1, min(split, blocks))
    return cdiv(blocks, cdiv(blocks, split))


def small_batch_config(num_tokens: int, num_experts: int, hidden: int, inter: int, device,
                       dtype: torch.dtype) -> dict:
    shape = {"E": num_experts, "N": inter, "H": hidden}
    return get_config("moe_small_batch", shape, device, dtype,
                      default_config(num_tokens, hidden, inter, device), batch=num_tokens)


def moe_small_batch(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, local_index: torch.Tensor | None = None,
    shared_w13: torch.Tensor | None = None, shared_w2: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None, config: dict | None = None,
) -> torch.Tensor:
    """Routed experts (a partial sum when local_index leaves some out) plus the shared expert,
    [T, Hd], for a small T; see the module docstring."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    assert w13.shape[2] == hidden_size and w2.shape == (num_experts, hidden_size, inter)
    assert hidden.stride(-1) == 1
    has_shared = shared_w13 is not None
    shared_inter = shared_w13.shape[0] // 2 if has_shared else 0
    if has_shared:
        assert shared_w2.shape == (hidden_size, shared_inter)
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    dev = hidden.device
    cfg = config or small_batch_config(num_tokens, num_experts, hidden_size, inter, dev,
                                       hidden.dtype)
    cfg = {**default_config(num_tokens, hidden_size, inter, dev), **cfg}
    bn, bk, dbn, dbk = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["DOWN_BLOCK_N"], cfg["DOWN_BLOCK_K"]
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    weights = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    index = local_index if local_index is not None else ids  # a dummy pointer when absent
    sw13 = shared_w13 if has_shared else w13[0]
    sw2 = shared_w2 if has_shared else w2[0]
    sgate = shared_gate if shared_gate is not None else hidden
    act = torch.empty((num_tokens, top_k * inter + shared_inter), device=dev,
                      dtype=torch.float32)
    routed_tiles = cdiv(inter, bn)
    flags = {"HAS_INDEX": local_index is not None, "HAS_SHARED": has_shared}
    _gate_up_kernel[(num_tokens, top_k * routed_tiles + cdiv(shared_inter, bn))](
        hidden, ids, weights, index, w13, sw13, sgate, act,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13.stride(2),
        sw13.stride(0), sw13.stride(-1), act.stride(0),
        top_k, inter, shared_inter, hidden_size, routed_tiles,
        HAS_GATE=shared_gate is not None, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg["num_warps"], **flags,
    )
    splits = split_k(cfg, num_tokens, hidden_size, max(inter, shared_inter), dev)
    k_chunk = cdiv(cdiv(inter, dbk), splits) * dbk
    shared_chunk = cdiv(cdiv(shared_inter, dbk), splits) * dbk
    out = torch.empty_like(hidden)
    dst = out if splits == 1 else torch.empty((splits, num_tokens, hidden_size), device=dev,
                                              dtype=torch.float32)
    stride_os = 0 if splits == 1 else dst.stride(0)
    _down_kernel[(num_tokens, cdiv(hidden_size, dbn), splits)](
        act, ids, index, w2, sw2, dst,
        act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), sw2.stride(0), sw2.stride(1),
        stride_os, dst.stride(-2),
        top_k, inter, shared_inter, hidden_size, k_chunk, shared_chunk,
        BLOCK_N=dbn, BLOCK_K=dbk, num_warps=cfg["num_warps"], **flags,
    )
    if splits > 1:
        block = min(1024, next_pow2(hidden_size))
        _split_sum_kernel[(num_tokens, cdiv(hidden_size, block))](
            dst, out, dst.stride(0), dst.stride(1), out.stride(0), splits, hidden_size,
            BLOCK=block, num_warps=4,
        )
    return out


def moe_small_batch_ref(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, local_index: torch.Tensor | None = None,
    shared_w13: torch.Tensor | None = None, shared_w2: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None, **_,
) -> torch.Tensor:
    """Per token and chosen expert, in float32; then the shared expert behind its gate."""
    x = hidden.float()
    out = torch.zeros_like(x)
    ids = topk_ids.long()
    if local_index is not None:
        ids = torch.where(ids >= 0, local_index[ids.clamp(min=0)], -1)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                out[t] += float(topk_weights[t, j]) * _swiglu(x[t], w13[e], w2[e])
    if shared_w13 is not None:
        shared = _swiglu(x, shared_w13, shared_w2)
        if shared_gate is not None:
            shared = torch.sigmoid(F.linear(x, shared_gate.float())) * shared
        out += shared
    return out.to(hidden.dtype)


def _swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13.float()).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2.float())
