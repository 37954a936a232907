"""Attention backends over the paged KV pool, found through a registry.

A backend stores the step's new K/V into the pool (at `slot_mapping`) and computes causal
attention of each sequence's new queries over its whole context, read through its block table.
`torch` is the reference (float32-exact against transformers' eager attention); `triton` runs
the kernels of `crosspool_kernels` (on CUDA, or on CPU under TRITON_INTERPRET=1); `flashinfer`
(engine/attention_flashinfer.py, imported only when chosen) is the CUDA fast path. `auto`
resolves once, in EngineConfig.build: torch on CPU; on CUDA flashinfer where it imports, else
triton.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch

from sglang_crosspool.engine.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


class AttentionBackend(ABC):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        # The model's (and KV pool's) dtype, where the caller knows it; backends that must
        # plan before they see a tensor (FlashInfer, graph decode) use it.
        self.dtype = dtype

    def prepare(self, fb: ForwardBatch) -> None:
        """Once per step, before the first layer: derive what the kernels index with and keep
        it in `fb.attn_meta` (several micro-batches of one model may be in flight at once)."""

    @abstractmethod
    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        """q [T, H, d], k/v [T, KVH, d]; caches [slots, KVH, d]. Returns [T, H*d]."""

    # -- CUDA-graph decode (engine/cuda_graph.py) ------------------------------------------
    supports_graphs = False
    # Whether one graph may hold several micro-batches of a model (each prepared on its own
    # slice of the static buffers); a backend with per-bucket planner state cannot.
    graph_microbatches = False

    def prepare_graph(self, fb: ForwardBatch) -> None:
        """Like `prepare`, for a decode step run as a captured graph. `fb` holds the graph's
        static tensors (batch padded to the bucket size, `fb.ctx_lens_t` filled, padding rows
        with slot -1). Called outside the graph before capture and before every replay; the
        tensors `forward` reads must be the same objects every time (write into them, never
        replace them), since the captured kernels hold their addresses."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")


def causal_masked(scores: torch.Tensor, ctx: int, n: int) -> torch.Tensor:
    """scores [..., n, ctx] of a sequence's last n queries over its ctx keys, with -inf where
    a key lies after its query: query i sits at position ctx - n + i."""
    q_pos = torch.arange(ctx - n, ctx, device=scores.device)[:, None]
    k_pos = torch.arange(ctx, device=scores.device)[None, :]
    return scores.masked_fill(k_pos > q_pos, float("-inf"))


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
            scores = causal_masked(scores, ctx, n)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[start : start + n] = torch.einsum("hqk,khd->qhd", probs, vals)
        return out.reshape(q.shape[0], -1)


class TritonAttention(AttentionBackend):
    """The Triton kernels of `crosspool_kernels`: store_kv, then decode attention when every
    sequence brings one token, else the extend kernel (which also takes decode rows)."""

    supports_graphs = True
    graph_microbatches = True  # its metadata lives in each ForwardBatch

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype | None = None):
        super().__init__(num_heads, num_kv_heads, head_dim, dtype)
        from crosspool_kernels import KERNELS

        self._store = KERNELS["store_kv"].triton
        self._decode = KERNELS["decode_attention"].triton
        self._extend = KERNELS["prefill_attention"].triton
        if self._store is None:
            raise ValueError("attention backend 'triton': triton is not installed")
        self._graph_splits: dict[int, int] = {}  # bucket size -> split count, fixed per graph

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

    def prepare_graph(self, fb: ForwardBatch) -> None:
        # The split count sets the grid, so it is fixed per bucket and nothing is read on the
        # host: the kernel takes each row's context length from ctx_lens_t on the device.
        batch = int(fb.block_tables.shape[0])
        if batch not in self._graph_splits:
            from crosspool_kernels.decode_attention import decode_config

            device = fb.block_tables.device
            dtype = self.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
            cfg = decode_config(batch, self.num_heads, self.num_kv_heads, self.head_dim, device,
                                dtype)
            self._graph_splits[batch] = int(cfg["num_splits"])
        fb.attn_meta = {"decode": True, "ctx_lens": fb.ctx_lens_t,
                        "num_splits": self._graph_splits[batch]}

    def forward(self, q, k, v, k_cache, v_cache, fb: ForwardBatch) -> torch.Tensor:
        meta = fb.attn_meta
        self._store(k, v, k_cache, v_cache, fb.slot_mapping)
        if meta["decode"]:
            out = self._decode(q, k_cache, v_cache, fb.block_tables, meta["ctx_lens"],
                               fb.block_tokens, sm_scale=self.scale,
                               num_splits=meta.get("num_splits"),
                               max_ctx_len=meta.get("max_ctx_len"))
        else:
            out = self._extend(q, k_cache, v_cache, fb.block_tables, meta["q_starts"],
                               meta["q_lens"], meta["ctx_lens"], fb.block_tokens,
                               sm_scale=self.scale, max_q_len=meta["max_q_len"])
        return out.reshape(q.shape[0], -1)


def _flashinfer() -> type[AttentionBackend]:
    from sglang_crosspool.engine.attention_flashinfer import FlashInferAttention

    return FlashInferAttention


# name -> loader of the class (heavy imports happen only for the backend chosen)
_BACKENDS = {
    "torch": lambda: TorchAttention,
    "triton": lambda: TritonAttention,
    "flashinfer": _flashinfer,
}


def _imports(module: str) -> bool:
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - a broken install (no CUDA libraries ...) is absent
        logger.debug("attention backend auto: cannot import %s: %s", module, e)
        return False
    return True


# What FlashInfer's kernels take (FlashInferAttention refuses anything else).
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
FLASHINFER_HEAD_DIMS = (64, 128, 256)


def resolve_attention_backend(name: str, device: str | torch.device,
                              dtype: torch.dtype | None = None, head_dims=()) -> str:
    """The backend `name` stands for on `device`: itself, or for `auto` torch on CPU and, on
    CUDA, flashinfer where `import flashinfer` works and it takes the dtype and every served
    model's head_dim, else triton (else torch)."""
    if name != "auto":
        if name not in _BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; available: "
                             f"{sorted(_BACKENDS)} or 'auto'")
        return name
    chosen = "torch"
    if torch.device(device).type == "cuda":
        fits = (dtype in (None, *FLASHINFER_DTYPES)
                and all(d in FLASHINFER_HEAD_DIMS for d in head_dims))
        candidates = ("flashinfer", "triton") if fits else ("triton",)
        chosen = next((c for c in candidates if _imports(c)), "torch")
    logger.info("attention backend auto -> %s on %s", chosen, device)
    return chosen


def get_attention_backend(name: str, device: str | torch.device | None = None
                          ) -> type[AttentionBackend]:
    """The backend class registered as `name` (`auto` needs the device it will run on)."""
    if name == "auto":
        if device is None:
            raise ValueError("attention backend 'auto': give the device to resolve it for")
        name = resolve_attention_backend(name, device)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()
