"""Triton kernels of the engine's GPU fast path, each next to its pure-torch reference.

What flows in and out (shapes as the engine lays them out; T = new tokens of a step, flat):
- store_kv: k, v [T, KVH, d] + slot_mapping [T] -> written into k_cache, v_cache
  [num_slots, KVH, d] (a sequence's position p lives in slot
  `block_tables[i, p // block_tokens] * block_tokens + p % block_tokens`).
- decode_attention: q [B, H, d] (one token per sequence) + caches + block_tables [B, nb] +
  ctx_lens [B] -> [B, H, d]; split-K over long contexts.
- prefill_attention: q [T, H, d] + q_starts / q_lens / ctx_lens per sequence -> [T, H, d];
  causal over the cached prefix and the new tokens; decode rows (q_len 1) may be mixed in.
- mla_decode: q [B, H, r + p] (absorbed into the latent space, then its roped part) + one
  latent cache [num_slots, 1, r + p] + block_tables + ctx_lens -> [B, H, r] (MLA, DeepSeek).
- merge_state: partial outputs [R, ..., H, D] + their log-sum-exp [R, ..., H] -> merged
  (out, lse) (the sequence split's reduction over ranks).
- rms_norm / fused_add_rms_norm: x [..., N] (+ residual) -> normed (, x + residual).
- rope: q [T, H, d], k [T, KVH, d], positions [T], cos/sin [max_pos, rot] -> rotated q, k.
- fused_moe: hidden [T, Hd], topk_ids / topk_weights [T, k], w13 [E, 2I, Hd], w2 [E, Hd, I]
  (+ local_index [E_global] -> local expert or -1) -> [T, Hd].
- moe_small_batch: the same inputs (+ shared expert shared_w13 [2S, Hd], shared_w2 [Hd, S],
  sigmoid gate [1, Hd]) -> [T, Hd] for decode at T <= 8: grouped GEMVs over the chosen
  experts only, the shared expert in the same launches.
- router_topk: router logits [T, E] -> ids [T, k] int64 and weights [T, k] (softmax, top-k,
  optional renormalisation, cast), one launch.
- sample / greedy: probs or logits [B, V] + per-row top_k, top_p, min_p, uniforms -> ids [B].

`KERNELS[name]` gives `KernelOp(triton, reference)`; modules load on first use, and `triton`
is None where triton is not installed. Triton impls run on CUDA tensors, or on CPU tensors
under TRITON_INTERPRET=1 (tests); `triton_usable(device)` says which. Launch configs come
from JSON files in `configs/` (see `tuned.py`, written by `tune.py`).
"""

import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

# op name -> (module, triton wrapper, torch reference)
_OPS: dict[str, tuple[str, str, str]] = {
    "store_kv": ("store_kv", "store_kv", "store_kv_ref"),
    "decode_attention": ("decode_attention", "decode_attention", "decode_attention_ref"),
    "prefill_attention": ("prefill_attention", "prefill_attention", "prefill_attention_ref"),
    "mla_decode": ("mla_decode", "mla_decode", "mla_decode_ref"),
    "merge_state": ("merge_state", "merge_state", "merge_state_ref"),
    "rms_norm": ("rmsnorm", "rms_norm", "rms_norm_ref"),
    "fused_add_rms_norm": ("rmsnorm", "fused_add_rms_norm", "fused_add_rms_norm_ref"),
    "rope": ("rope", "apply_rope", "apply_rope_ref"),
    "fused_moe": ("fused_moe", "fused_moe", "fused_moe_ref"),
    "moe_small_batch": ("moe_small_batch", "moe_small_batch", "moe_small_batch_ref"),
    "router_topk": ("router", "router_topk", "router_topk_ref"),
    "sample": ("sampling", "top_k_top_p_sample", "top_k_top_p_sample_ref"),
    "greedy": ("sampling", "greedy_sample", "greedy_sample_ref"),
}

HAS_TRITON = importlib.util.find_spec("triton") is not None


class KernelOp(NamedTuple):
    triton: Callable | None
    reference: Callable


class _Registry(Mapping):
    """Lazy op name -> KernelOp; importing a kernel module happens on first lookup."""

    def __getitem__(self, name: str) -> KernelOp:
        if name not in _OPS:
            raise KeyError(f"unknown kernel op {name!r}; available: {sorted(_OPS)}")
        module_name, impl, ref = _OPS[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        return KernelOp(getattr(module, impl) if HAS_TRITON else None, getattr(module, ref))

    def __iter__(self) -> Iterator[str]:
        return iter(_OPS)

    def __len__(self) -> int:
        return len(_OPS)


KERNELS: Mapping[str, KernelOp] = _Registry()


def triton_usable(device) -> bool:
    from crosspool_kernels._common import triton_usable as usable

    return usable(device)


__all__ = ["HAS_TRITON", "KERNELS", "KernelOp", "triton_usable"]
