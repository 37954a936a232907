"""Attention split over the sequence: each rank attends over the KV pages it holds.

Every rank of the split runs the model's attention in lockstep with the same batch (the
attention weights are small and replicated; the experts are divided over the ranks or live in
the weights pool: engine/seq_split_runtime.py), and its KV pool holds only the blocks placed on
it (memory/kv_split.py: global block ids name their rank). Per layer, on every rank:

    q, k, v of the step's new tokens (every rank computes all of them)
      -> store k, v only where the token's page lives (slot_mapping decoded to this rank)
      -> partial attention of every new query over this rank's pages of its sequence
         (causal by absolute position: prefill rows and decode rows alike), as (out, lse)
      -> all_gather (out, lse) over the ranks, packed in one tensor [R, T, H, dv + 1]
      -> merge by log-sum-exp in rank order (engine/partial_attention.py)

so every rank ends the layer with the same attention output, bit for bit, and the rest of the
step (o_proj, the FFN's all-reduce or broadcast, sampling) stays identical on every rank.

`wrap(backend, group, rank_slots)` turns the model's unsplit backend into its split twin:
`SeqSplitAttention` for GQA/MHA backends, `SeqSplitLatentAttention` for MLA's latent cache.
On CUDA both run decode steps through the Triton decode kernels (decode_attention,
mla_decode) over a compact table of this rank's blocks (keys need no order in decode: there is
no mask inside the context), which return the log-sum-exp too; prefill and mixed steps use the
torch partials. No CUDA graphs (eager steps).
"""

from __future__ import annotations

import torch

from sglang_crosspool.engine.attention import AttentionBackend, TritonAttention
from sglang_crosspool.engine.attention_mla import LatentAttention, TritonLatentAttention
from sglang_crosspool.engine.forward_batch import ForwardBatch
from sglang_crosspool.engine.partial_attention import (
    merge_state,
    partial_attention,
    partial_latent_attention,
)


class _LocalPages:
    """One step's view of this rank's share: per sequence its local blocks in context order
    (a compact block table) and how many context tokens they hold, the local slots of those
    tokens and their absolute positions, and which new tokens' KV this rank stores."""

    def __init__(self, fb: ForwardBatch, rank: int, rank_slots: int):
        t = fb.block_tokens
        stride = rank_slots // t
        device = fb.block_tables.device
        offsets = torch.arange(t, device=device)
        tables = fb.block_tables.cpu().tolist()  # NOTE: one device sync per step
        self.tables, self.lens, self.slots, self.positions = [], [], [], []
        for row, ctx in zip(tables, fb.ctx_lens):
            blocks = row[: -(-ctx // t)]
            mine = [j for j, b in enumerate(blocks) if b // stride == rank]
            # Only the context's last block can be partial, and it comes last in `mine`.
            n = sum(min(t, ctx - j * t) for j in mine)
            local = torch.tensor([blocks[j] % stride for j in mine], dtype=torch.int64,
                                 device=device)
            first = torch.tensor(mine, dtype=torch.int64, device=device) * t
            self.tables.append(local)
            self.lens.append(n)
            self.slots.append((local[:, None] * t + offsets).flatten()[:n])
            self.positions.append((first[:, None] + offsets).flatten()[:n])
        owner = fb.slot_mapping // rank_slots
        self.store_rows = torch.nonzero(owner == rank).flatten()
        self.store_slots = fb.slot_mapping[self.store_rows] % rank_slots
        self.q_positions = fb.positions

    def compact_table(self, device) -> torch.Tensor:
        """[B, max local blocks] of this rank's blocks per sequence (padded with block 0, the
        guard): with `lens`, what the decode kernels read."""
        width = max(1, max(len(t) for t in self.tables))
        table = torch.zeros(len(self.tables), width, dtype=torch.int64, device=device)
        for i, t in enumerate(self.tables):
            table[i, : len(t)] = t
        return table


class _SeqSplit(AttentionBackend):
    def __init__(self, inner: AttentionBackend, group, rank_slots: int):
        super().__init__(inner.num_heads, inner.num_kv_heads, inner.head_dim, inner.dtype)
        self.inner = inner
        self.scale = inner.scale
        self.group = group
        self.rank_slots = rank_slots

    def prepare(self, fb: ForwardBatch) -> None:
        fb.attn_meta = _LocalPages(fb, self.group.rank, self.rank_slots)

    def _merge(self, out: torch.Tensor, lse: torch.Tensor, dtype) -> torch.Tensor:
        """out [T, H, dv], lse [T, H] of this rank -> the merged output over every rank's
        pages [T, H * dv] in `dtype`."""
        packed = torch.cat([out, lse[..., None]], dim=-1)[None]
        gathered = self.group.all_gather(packed, dim=0)  # [R, T, H, dv + 1]
        merged, _ = merge_state(gathered[..., :-1], gathered[..., -1])
        return merged.to(dtype).reshape(out.shape[0], -1)

    def _rows(self, fb: ForwardBatch):
        meta = fb.attn_meta
        for i, (start, n) in enumerate(zip(fb.q_starts, fb.q_lens)):
            yield i, slice(start, start + n), meta


class SeqSplitAttention(_SeqSplit):
    """GQA/MHA over this rank's pages of each sequence, merged over the ranks. Decode steps
    run the Triton decode kernel on CUDA (and on CPU where the model's backend is triton: the
    interpreter), the rest the torch partials."""

    def __init__(self, inner: AttentionBackend, group, rank_slots: int):
        super().__init__(inner, group, rank_slots)
        from crosspool_kernels import KERNELS

        self._kernel = KERNELS["decode_attention"].triton  # None without triton
        self._kernel_on_cpu = isinstance(inner, TritonAttention)

    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        meta = fb.attn_meta
        k_cache[meta.store_slots] = k[meta.store_rows]
        v_cache[meta.store_slots] = v[meta.store_rows]
        if self._kernel is not None and (q.is_cuda or self._kernel_on_cpu) and \
                all(n == 1 for n in fb.q_lens):
            lse = q.new_empty(q.shape[0], self.num_heads, dtype=torch.float32)
            out = self._kernel(q, k_cache, v_cache, meta.compact_table(q.device), meta.lens,
                               fb.block_tokens, sm_scale=self.scale,
                               out=q.new_empty(q.shape, dtype=torch.float32), lse_out=lse,
                               max_ctx_len=max(meta.lens))
            return self._merge(out, lse, q.dtype)
        out = q.new_zeros(q.shape[0], self.num_heads, self.head_dim, dtype=torch.float32)
        lse = q.new_full((q.shape[0], self.num_heads), float("-inf"), dtype=torch.float32)
        for i, rows, meta in self._rows(fb):
            slots = meta.slots[i]
            out[rows], lse[rows] = partial_attention(
                q[rows], meta.q_positions[rows], k_cache[slots], v_cache[slots],
                meta.positions[i], self.scale)
        return self._merge(out, lse, q.dtype)


class SeqSplitLatentAttention(_SeqSplit):
    """MLA over this rank's latents of each sequence, merged over the ranks."""

    def __init__(self, inner: LatentAttention, group, rank_slots: int):
        super().__init__(inner, group, rank_slots)
        self.value_dim = inner.value_dim
        # Decode through the Triton kernel where the model's own MLA path does (CUDA, or the
        # interpreter with the triton backend).
        self._kernel = None
        if isinstance(inner, TritonLatentAttention):
            from crosspool_kernels import KERNELS

            self._kernel = KERNELS["mla_decode"].triton

    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        """q [T, H, r + p], k [T, 1, r + p] (v is k); k_cache [slots, 1, r + p]."""
        meta = fb.attn_meta
        k_cache[meta.store_slots] = k[meta.store_rows]
        if self._kernel is not None and all(n == 1 for n in fb.q_lens):
            out, lse = self._decode_kernel(q, k_cache, meta, fb.block_tokens)
            return self._merge(out, lse, q.dtype)
        out = q.new_zeros(q.shape[0], self.num_heads, self.value_dim, dtype=torch.float32)
        lse = q.new_full((q.shape[0], self.num_heads), float("-inf"), dtype=torch.float32)
        for i, rows, meta in self._rows(fb):
            out[rows], lse[rows] = partial_latent_attention(
                q[rows], meta.q_positions[rows], k_cache[meta.slots[i], 0], meta.positions[i],
                self.value_dim, self.scale)
        return self._merge(out, lse, q.dtype)

    def _decode_kernel(self, q, k_cache, meta: _LocalPages, block_tokens: int):
        """Decode rows through the Triton MLA kernel over compact local tables: (out [B, H, r]
        float32, lse [B, H] natural log)."""
        lse = q.new_empty(q.shape[0], self.num_heads, dtype=torch.float32)
        out = self._kernel(
            q, k_cache, meta.compact_table(q.device), meta.lens, block_tokens, self.value_dim, self.scale,
            out=q.new_empty(q.shape[0], self.num_heads, self.value_dim, dtype=torch.float32),
            lse_out=lse, max_ctx_len=max(meta.lens))
        return out, lse


def wrap(backend: AttentionBackend, group, rank_slots: int) -> AttentionBackend:
    """The sequence-split twin of a model's attention backend (module docstring)."""
    if isinstance(backend, LatentAttention):
        return SeqSplitLatentAttention(backend, group, rank_slots)
    return SeqSplitAttention(backend, group, rank_slots)
