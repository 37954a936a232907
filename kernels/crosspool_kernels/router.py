"""MoE router: softmax over the experts, top-k, optional renormalisation, in one kernel.

In: logits [T, E] (router output, any float dtype), top_k, renormalize, the dtype of the
weights out. Out: ids [T, top_k] int64 (largest probability first) and weights [T, top_k],
computed as transformers does: softmax in float32, top-k of the probabilities, divided by
their sum when renormalizing, then cast. One program per token; E up to a few hundred fits
one block. Replaces five torch launches per layer (softmax, top-k, sum, divide, cast) in a
small-batch decode step.
"""

import torch

from crosspool_kernels._common import next_pow2, tl, triton


@triton.jit
def _router_topk_kernel(
    logits_ptr, ids_ptr, w_ptr, stride_l, num_experts,
    TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + t * stride_l + e, mask=e < num_experts,
                other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(e < num_experts, p, -1.0)  # padding never wins
    k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int64)
    weights = tl.zeros([BLOCK_K], tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 0)
        # The lowest index among equal maxima, as torch.topk orders ties on CPU.
        idx = tl.min(tl.where(p == best, e, BLOCK_E), 0)
        ids = tl.where(k == j, idx.to(tl.int64), ids)
        weights = tl.where(k == j, best, weights)
        p = tl.where(e == idx, -1.0, p)
    if RENORM:
        weights = weights / tl.sum(weights, 0)
    tl.store(ids_ptr + t * TOP_K + k, ids, mask=k < TOP_K)
    tl.store(w_ptr + t * TOP_K + k, weights.to(w_ptr.dtype.element_ty), mask=k < TOP_K)


def router_topk(logits: torch.Tensor, top_k: int, renormalize: bool,
                out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, top_k] int64, weights [T, top_k] out_dtype or float32) of the router logits."""
    num_tokens, num_experts = logits.shape
    assert logits.stride(-1) == 1 and top_k <= num_experts
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((num_tokens, top_k), dtype=out_dtype or torch.float32,
                          device=logits.device)
    if num_tokens:
        _router_topk_kernel[(num_tokens,)](
            logits, ids, weights, logits.stride(0), num_experts,
            TOP_K=top_k, RENORM=renormalize, BLOCK_E=next_pow2(num_experts),
            BLOCK_K=next_pow2(top_k), num_warps=1 if num_experts <= 128 else 4,
        )
    return ids, weights


def router_topk_ref(logits: torch.Tensor, top_k: int, renormalize: bool,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(out_dtype or torch.float32)
