"""Attention over a subset of a sequence's keys, as (output, log-sum-exp), and the merge.

Sequence split (engine/seq_split.py) runs each rank's attention over the KV pages that rank
holds and merges the ranks' partials; these are the two halves of that, in torch.

In (GQA): q [n, H, d] with each query's absolute position q_pos [n]; keys and values [m, KVH, d]
at absolute positions k_pos [m], in any order (a rank's pages of the sequence). A key after
its query is masked (causal by position, so prefill rows and decode rows are the same case).
In (MLA, absorbed): q [n, H, r + p], latents [m, r + p]; values are the first r entries.
Out: the softmax-normalized output over these keys only [n, H, dv] (float32) and its natural
log-sum-exp lse [n, H] (float32; -inf where no key is visible, output 0 there). Products run
in q's dtype (float32 on CPU), softmax and the results in float32.

    merge: out = sum_r exp(lse_r - L) out_r / sum_r exp(lse_r - L),  L = max_r lse_r
           lse = L + log(sum_r exp(lse_r - L))

which equals attention over the union of the keys (FlashInfer's merge_state computes the same;
this is our own code). Merging in rank order on every rank gives every rank the same bits.
"""

from __future__ import annotations

import torch

# Float32 scores per query chunk: H x chunk x m at most this many (512 MiB), so a long prefill
# over a long context stays within a fixed budget.
SCORE_ELEMENTS = 1 << 27


def _softmax_partial(scores: torch.Tensor, values: torch.Tensor, einsum: str):
    """scores [H, n, m] float32 (masked with -inf) -> (out [n, H, dv], lse [n, H]), float32.
    The products run in the values' dtype, as the unsplit torch paths do (bf16 on GPUs)."""
    lse = torch.logsumexp(scores, dim=-1)  # [H, n]; -inf where every key is masked
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum(einsum, probs.to(values.dtype), values).float()
    return out, lse.transpose(0, 1).contiguous()


def _chunks(n: int, heads: int, m: int):
    step = max(1, SCORE_ELEMENTS // (heads * max(m, 1)))
    return [(c, min(n, c + step)) for c in range(0, n, step)]


def partial_attention(q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, k_pos: torch.Tensor, scale: float):
    """GQA partial attention (module docstring): (out [n, H, d], lse [n, H]), float32."""
    n, heads, _ = q.shape
    groups = heads // keys.shape[1]
    out = q.new_zeros(n, heads, values.shape[-1], dtype=torch.float32)
    lse = q.new_full((n, heads), float("-inf"), dtype=torch.float32)
    if keys.shape[0] == 0 or n == 0:
        return out, lse
    kf = keys.to(q.dtype).repeat_interleave(groups, dim=1)  # [m, H, d]
    vf = values.to(q.dtype).repeat_interleave(groups, dim=1)
    for c0, c1 in _chunks(n, heads, keys.shape[0]):
        scores = torch.einsum("qhd,khd->hqk", q[c0:c1], kf).float() * scale
        scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, c0:c1, None],
                                    float("-inf"))
        out[c0:c1], lse[c0:c1] = _softmax_partial(scores, vf, "hqk,khd->qhd")
    return out, lse


def partial_latent_attention(q: torch.Tensor, q_pos: torch.Tensor, latents: torch.Tensor,
                             k_pos: torch.Tensor, value_dim: int, scale: float):
    """MLA partial attention over latents [m, r + p] (module docstring): (out [n, H, r],
    lse [n, H]), float32."""
    n, heads, _ = q.shape
    out = q.new_zeros(n, heads, value_dim, dtype=torch.float32)
    lse = q.new_full((n, heads), float("-inf"), dtype=torch.float32)
    if latents.shape[0] == 0 or n == 0:
        return out, lse
    lf = latents.to(q.dtype)
    for c0, c1 in _chunks(n, heads, latents.shape[0]):
        scores = torch.einsum("qhd,kd->hqk", q[c0:c1], lf).float() * scale
        scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, c0:c1, None],
                                    float("-inf"))
        out[c0:c1], lse[c0:c1] = _softmax_partial(scores, lf[:, :value_dim], "hqk,kr->qhr")
    return out, lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor):
    """outs [R, ..., H, dv], lses [R, ..., H] (partials of disjoint key sets, in a fixed
    order) -> (out [..., H, dv], lse [..., H]), float32, in torch. Rows with no key anywhere
    give 0."""
    from crosspool_kernels.merge_state import merge_state_ref

    return merge_state_ref(outs, lses)


def merge_state(outs: torch.Tensor, lses: torch.Tensor):
    """merge_partials through the Triton kernel where it runs (CUDA, or the interpreter with
    TRITON_INTERPRET=1), else torch."""
    from crosspool_kernels import KERNELS, triton_usable

    op = KERNELS["merge_state"]
    if op.triton is not None and triton_usable(outs.device):
        return op.triton(outs, lses)
    return merge_partials(outs, lses)
