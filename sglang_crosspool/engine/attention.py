"""Attention backends over the paged KV pool, found through a registry.

A backend stores the step's new K/V into the pool (at `slot_mapping`) and computes causal
attention of each sequence's new queries over its whole context, read through its block table.
`torch` is the reference (float32-exact against transformers' eager attention); `triton` runs
the kernels of `crosspool_kernels` (on CUDA, or on CPU under TRITON_INTERPRET=1); FlashInfer
registers here with the GPU fast path.
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


class TritonAttention(AttentionBackend):
    """The Triton kernels of `crosspool_kernels`: store_kv, then decode attention when every
    sequence brings one token, else the extend kernel (which also takes decode rows)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(num_heads, num_kv_heads, head_dim)
        from crosspool_kernels import KERNELS

        self._store = KERNELS["store_kv"].triton
        self._decode = KERNELS["decode_attention"].triton
        self._extend = KERNELS["prefill_attention"].triton
        if self._store is None:
            raise ValueError("attention backend 'triton': triton is not installed")

    def prepare(self, fb: ForwardBatch) -> None:
        device = fb.input_ids.device

        def tensor(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        fb.attn_meta = {
            "decode": all(n == 1 for n in fb.q_lens),
            "q_starts": tensor(fb.q_starts),
            "q_lens": tensor(fb.q_lens),
            "ctx_lens": tensor(fb.ctx_lens),
            "max_q_len": max(fb.q_lens),
            "max_ctx_len": max(fb.ctx_lens),
        }

    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        meta = fb.attn_meta
        self._store(k, v, k_cache, v_cache, fb.slot_mapping)
        if meta["decode"]:
            out = self._decode(q, k_cache, v_cache, fb.block_tables, meta["ctx_lens"],
                               fb.block_tokens, sm_scale=self.scale,
                               max_ctx_len=meta["max_ctx_len"])
        else:
            out = self._extend(q, k_cache, v_cache, fb.block_tables, meta["q_starts"],
                               meta["q_lens"], meta["ctx_lens"], fb.block_tokens,
                               sm_scale=self.scale, max_q_len=meta["max_q_len"])
        return out.reshape(q.shape[0], -1)


_BACKENDS = {"torch": TorchAttention, "triton": TritonAttention}


def get_attention_backend(name: str) -> type[AttentionBackend]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]
