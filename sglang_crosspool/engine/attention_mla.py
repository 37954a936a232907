"""Multi-head latent attention (MLA) over a latent KV cache: the torch reference.

In: per step, q [T, H, r + p] (each head's no-rope query already taken into the latent space by
the model, then its roped part) and the step's latents [T, 1, r + p] (the normalized kv latent
of rank r, then the roped shared key of p dims). Out: [T, H * r], each head's attention output
still in the latent space; the model maps it to v_head_dim per head with kv_b_proj's value rows.

This is MQA with one KV "head": the keys are the cached latents, the values their first r
entries, so the attention itself has no weights and the KV pool holds r + p values per token
and layer (model_runner passes the same latent range as the K and the V cache). Used for MLA
models whatever --attention-backend says; the GPU kernels are not written yet (issue 16).
"""

from __future__ import annotations

import torch

from sglang_crosspool.engine.attention import TorchAttention, causal_masked
from sglang_crosspool.engine.forward_batch import ForwardBatch


class LatentAttention(TorchAttention):
    """Gathers each sequence's latents by slot (TorchAttention.prepare) and runs eager softmax
    attention in float32, as transformers does on the decompressed keys and values."""

    def __init__(self, num_heads: int, latent_dim: int, value_dim: int, scale: float,
                 dtype: torch.dtype | None = None):
        super().__init__(num_heads, 1, latent_dim, dtype)
        self.value_dim = value_dim  # r: the values are the first r entries of each latent
        self.scale = scale  # the model's (1/sqrt(qk_head_dim), YaRN-corrected), not latent_dim's

    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        """q [T, H, r + p], k [T, 1, r + p] (v is k); k_cache [slots, 1, r + p]."""
        k_cache[fb.slot_mapping] = k
        out = q.new_empty(q.shape[0], self.num_heads, self.value_dim)
        for i, (start, n, ctx) in enumerate(zip(fb.q_starts, fb.q_lens, fb.ctx_lens)):
            latents = k_cache[fb.attn_meta[i], 0]  # [ctx, r + p]
            qs = q[start : start + n]
            scores = torch.einsum("qhd,kd->hqk", qs, latents) * self.scale
            scores = causal_masked(scores, ctx, n)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[start : start + n] = torch.einsum("hqk,kr->qhr", probs,
                                                  latents[:, : self.value_dim])
        return out.reshape(q.shape[0], -1)
