"""Multi-head latent attention (MLA) over a latent KV cache: the torch path and the Triton path.

In: per step, q [T, H, r + p] (each head's no-rope query already taken into the latent space by
the model, then its roped part) and the step's latents [T, 1, r + p] (the normalized kv latent
of rank r, then the roped shared key of p dims). Out: [T, H * r], each head's attention output
still in the latent space; the model maps it to v_head_dim per head with kv_b_proj's value rows.

This is MQA with one KV "head": the keys are the cached latents, the values their first r
entries, so the attention itself has no weights and the KV pool holds r + p values per token
and layer (model_runner passes the same latent range as the K and the V cache).

`make_latent_attention` picks the implementation once per model, whatever --attention-backend
names (FlashInfer's MLA kernels are not wired):
- CUDA: `TritonLatentAttention`: decode steps run `crosspool_kernels.mla_decode` (paged,
  split-K, CUDA-graph capable); steps with prefill or extend rows run the torch path below,
  in query chunks so that the scores of a long context stay within a fixed budget.
- CPU: `LatentAttention` (float32, matches transformers), or the Triton path under
  TRITON_INTERPRET=1 when the engine's backend is `triton` (how tests run the kernel path).
"""

from __future__ import annotations

import logging

import torch

from sglang_crosspool.engine.attention import TorchAttention, TritonAttention, causal_masked
from sglang_crosspool.engine.forward_batch import ForwardBatch

log = logging.getLogger(__name__)

# Float32 scores per query chunk of the torch path: H x chunk x ctx at most this many (512 MiB).
_SCORE_ELEMENTS = 1 << 27


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
        return self._attend(q, k_cache, fb, fb.attn_meta)

    def _attend(self, q, k_cache, fb: ForwardBatch, slots: list) -> torch.Tensor:
        """Causal attention of every row of q over its sequence's latents at `slots[i]`."""
        out = q.new_empty(q.shape[0], self.num_heads, self.value_dim)
        for i, (start, n, ctx) in enumerate(zip(fb.q_starts, fb.q_lens, fb.ctx_lens)):
            latents = k_cache[slots[i], 0]  # [ctx, r + p]
            chunk = max(1, _SCORE_ELEMENTS // (self.num_heads * max(ctx, 1)))
            for c0 in range(0, n, chunk):  # one chunk on CPU test sizes
                c1 = min(n, c0 + chunk)
                qs = q[start + c0 : start + c1]
                scores = torch.einsum("qhd,kd->hqk", qs, latents[: ctx - n + c1]) * self.scale
                scores = causal_masked(scores, ctx - n + c1, c1 - c0)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                out[start + c0 : start + c1] = torch.einsum(
                    "hqk,kr->qhr", probs, latents[: ctx - n + c1, : self.value_dim])
        return out.reshape(q.shape[0], -1)


class TritonLatentAttention(LatentAttention):
    """Decode steps through the Triton MLA decode kernel (one launch per layer, two with
    split-K), latents stored by the store_kv kernel (padding slots -1 skipped, as graphs
    need); prefill and mixed steps through LatentAttention's torch path."""

    supports_graphs = True
    graph_microbatches = True  # its metadata lives in each ForwardBatch

    def __init__(self, num_heads: int, latent_dim: int, value_dim: int, scale: float,
                 dtype: torch.dtype | None = None):
        super().__init__(num_heads, latent_dim, value_dim, scale, dtype)
        from crosspool_kernels import KERNELS

        self._store = KERNELS["store_kv"].triton
        self._decode = KERNELS["mla_decode"].triton
        if self._store is None:
            raise ValueError("MLA attention on the Triton path: triton is not installed")
        self._graph_splits: dict[int, int] = {}  # bucket size -> split count, fixed per graph

    def prepare(self, fb: ForwardBatch) -> None:
        if all(n == 1 for n in fb.q_lens):
            ctx = torch.tensor(fb.ctx_lens, dtype=torch.int32, device=fb.block_tables.device)
            fb.attn_meta = {"decode": True, "ctx_lens": ctx, "max_ctx_len": max(fb.ctx_lens)}
            return
        super().prepare(fb)  # slots per sequence, for the torch path
        fb.attn_meta = {"decode": False, "slots": fb.attn_meta}

    def prepare_graph(self, fb: ForwardBatch) -> None:
        # The split count sets the grid: fixed per bucket, nothing read on the host.
        batch = int(fb.block_tables.shape[0])
        if batch not in self._graph_splits:
            from crosspool_kernels.mla_decode import mla_decode_config

            device = fb.block_tables.device
            dtype = self.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
            cfg = mla_decode_config(batch, self.num_heads, self.value_dim,
                                    self.head_dim - self.value_dim, device, dtype)
            self._graph_splits[batch] = int(cfg["num_splits"])
        fb.attn_meta = {"decode": True, "ctx_lens": fb.ctx_lens_t,
                        "num_splits": self._graph_splits[batch]}

    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        meta = fb.attn_meta
        # NOTE: k_cache is v_cache (one latent range), so the latent is written twice; it is
        # r + p values per token, nothing next to the attention's reads.
        self._store(k, k, k_cache, k_cache, fb.slot_mapping)
        if not meta["decode"]:
            return self._attend(q, k_cache, fb, meta["slots"])
        out = self._decode(q.contiguous(), k_cache, fb.block_tables, meta["ctx_lens"],
                           fb.block_tokens, self.value_dim, self.scale,
                           num_splits=meta.get("num_splits"), max_ctx_len=meta.get("max_ctx_len"))
        return out.reshape(q.shape[0], -1)


def make_latent_attention(engine_backend, device, num_heads: int, latent_dim: int,
                          value_dim: int, scale: float, dtype: torch.dtype | None = None
                          ) -> LatentAttention:
    """The MLA implementation for a model on `device` (see the module docstring)."""
    from crosspool_kernels import triton_usable

    cls = LatentAttention
    if torch.device(device).type == "cuda":
        if not triton_usable(device):
            raise ValueError("MLA attention on CUDA needs triton (crosspool_kernels.mla_decode)")
        cls = TritonLatentAttention
    elif isinstance(engine_backend, TritonAttention) and triton_usable(device):
        cls = TritonLatentAttention
    log.info("MLA attention on %s: %s", device, cls.__name__)
    return cls(num_heads, latent_dim, value_dim, scale, dtype)
