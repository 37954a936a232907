"""Attention backends over the paged KV pool, found through a registry.

A backend stores the step's new K/V into the pool (at `slot_mapping`) and computes causal
attention of each sequence's new queries over its whole context, read through its block table.
`torch` is the reference (float32-exact against transformers' eager attention); Triton and
FlashInfer backends register here with the GPU fast path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from sglang_crosspool.engine.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def prepare(self, fb: ForwardBatch) -> None:
        """Once per step, before the first layer: derive what the kernels index with and keep
        it in `fb.attn_meta` (several micro-batches of one model may be in flight at once)."""

    @abstractmethod
    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        """q [T, H, d], k/v [T, KVH, d]; caches [slots, KVH, d]. Returns [T, H*d]."""


class TorchAttention(AttentionBackend):
    """Gathers each sequence's K/V by slot and runs eager softmax attention in float32."""

    def prepare(self, fb: ForwardBatch) -> None:
        t = fb.block_tokens
        offsets = torch.arange(t, device=fb.block_tables.device)
        slots = (fb.block_tables[:, :, None] * t + offsets).flatten(1)
        fb.attn_meta = [slots[i, :n] for i, n in enumerate(fb.ctx_lens)]

    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        k_cache[fb.slot_mapping] = k
        v_cache[fb.slot_mapping] = v
        out = torch.empty_like(q)
        groups = self.num_heads // self.num_kv_heads
        for i, (start, n, ctx) in enumerate(zip(fb.q_starts, fb.q_lens, fb.ctx_lens)):
            slots = fb.attn_meta[i]
            keys = k_cache[slots].repeat_interleave(groups, dim=1)  # [ctx, H, d]
            vals = v_cache[slots].repeat_interleave(groups, dim=1)
            qs = q[start : start + n]
            scores = torch.einsum("qhd,khd->hqk", qs, keys) * self.scale
            # Query i sits at position ctx - n + i and sees keys at positions <= its own.
            q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[start : start + n] = torch.einsum("hqk,khd->qhd", probs, vals)
        return out.reshape(q.shape[0], -1)


_BACKENDS = {"torch": TorchAttention}


def get_attention_backend(name: str) -> type[AttentionBackend]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]
