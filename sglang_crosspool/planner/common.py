"""Pieces every pool mode uses: per-device attention bytes, a model's KV figures, totals.

In: `Inputs`, `ModelInfo`s, a parallelism and the KV pages a request can map. Out: `Figure`s,
`ModelKV` rows and `DeviceUse` rows with their arithmetic.
"""

from __future__ import annotations

from fractions import Fraction

from sglang_crosspool.planner.figure import Figure, num, size, total
from sglang_crosspool.planner.kv import (
    AttentionParallel,
    BlockLayout,
    block_layout,
    blocks_for,
    tokens_in,
)
from sglang_crosspool.planner.schema import DeviceUse, Inputs, ModelInfo, ModelKV


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def layout_for(info: ModelInfo, inputs: Inputs, tp: int) -> BlockLayout:
    return block_layout(info.name, info.num_layers, info.num_kv_heads, info.head_dim,
                        inputs.dtype_bytes, tp, inputs.page_bytes)


def attention_per_device(info: ModelInfo, tp: int) -> Figure:
    """Attention-side bytes on each device of a TP group: norms and router are kept whole."""
    w = info.weights
    side, rep = int(w.attention_side), int(w.replicated_bytes)
    if tp == 1:
        return Figure(side, f"{info.name} attention side {size(side)}")
    per = ceil_div(side - rep, tp) + rep
    return Figure(per, f"{info.name} (attention side {num(side)} - norms+router {num(rep)}) / "
                  f"TP {tp} + {num(rep)} = {size(per)}")


def virtual_pages(info: ModelInfo, layout: BlockLayout) -> Figure:
    t = info.traffic
    blocks = blocks_for(t.max_running * t.max_context, layout)
    pages = blocks * int(layout.pages_per_block)
    return Figure(pages, f"{t.max_running} max_running x {num(t.max_context)} max_context / "
                  f"{num(int(layout.block_tokens))} tokens per block = {num(blocks)} blocks x "
                  f"{int(layout.pages_per_block)} pages = {num(pages)} virtual pages (nothing "
                  "committed)")


def fitted(info: ModelInfo, inputs: Inputs, devices: tuple[int, ...],
           par: AttentionParallel, pages: list[Figure]) -> ModelKV:
    """A model that fits. `pages[i]`: KV pages the model may map on `devices[i]` (the shared
    pool there, or its own slice). A request's KV lives on one replica, whose devices all hold
    the same blocks, so a replica holds what its emptiest device holds."""
    per_replica = []
    for tp, positions in zip(par.replicas, par.replica_devices()):
        layout = layout_for(info, inputs, tp)
        least = min((pages[i] for i in positions), key=int)
        per_replica.append((tp, layout, least, tokens_in(int(least), layout)))
    best = max(range(len(per_replica)), key=lambda r: (int(per_replica[r][3]), -r))
    _, layout, least, longest = per_replica[best]
    if len(per_replica) > 1:
        alone = total([(f"replica {r} (TP {tp})", tok)
                       for r, (tp, _, _, tok) in enumerate(per_replica)], unit="tokens")
    else:
        alone = longest
    cap = info.max_position_embeddings
    served_value = min(int(longest), cap)
    served = Figure(served_value, f"min({num(int(longest))} memory, {num(cap)} "
                    f"max_position_embeddings) = {num(served_value)} tokens")
    mean = info.traffic.mean_context
    requests = Figure(int(alone) // mean, f"{num(int(alone))} tokens / {num(mean)} mean_context"
                      f" = {num(int(alone) // mean)} requests")
    return ModelKV(info.name, True, "", devices, par, layout.block_tokens,
                   layout.pages_per_block, least, longest, served,
                   served_value >= info.traffic.max_context, alone, requests,
                   virtual_pages(info, layout), cache_floor(info, layout))


def cache_floor(info: ModelInfo, layout: BlockLayout) -> Figure:
    """Pages the prefix cache keeps for the model's cached_prefix tokens: whole blocks only,
    as the cache holds them."""
    tokens = info.traffic.cached_prefix
    blocks = tokens // int(layout.block_tokens)
    pages = blocks * int(layout.pages_per_block)
    return Figure(pages, f"{num(tokens)} cached_prefix tokens // {num(int(layout.block_tokens))} "
                  f"tokens per block = {num(blocks)} whole blocks x "
                  f"{int(layout.pages_per_block)} pages = {num(pages)} pages kept from eviction")


def unfitted(info: ModelInfo, reason: str) -> ModelKV:
    return ModelKV(info.name, False, reason, (), None, None, None, None, None, None, False,
                   None, None, None)


def device_row(index: int, role: str, holds: list[str], weights: list[tuple[str, Figure]],
               kv_pages: Figure, usable: int, page_bytes: int) -> DeviceUse:
    w = total(weights) if weights else Figure(0, "no weights: 0 B")
    kv_bytes = int(kv_pages) * page_bytes
    kv = Figure(kv_bytes, f"{num(int(kv_pages))} pages x {num(page_bytes)} B = {size(kv_bytes)}")
    idle_value = usable - int(w) - kv_bytes
    idle = Figure(idle_value, f"usable {num(usable)} - weights {num(int(w))} - KV "
                  f"{num(kv_bytes)} = {size(idle_value)}")
    return DeviceUse(index, role, tuple(holds), w, kv, kv_pages, idle)


def mix_tokens(models: list[ModelInfo], pool_bytes: int) -> Figure:
    """Tokens a shared pool of `pool_bytes` holds when its tokens follow the traffic mix
    (each model's share of tokens = rate x mean_context); block rounding ignored."""
    if not models or pool_bytes <= 0:
        return Figure(0, "no shared KV pool: 0 tokens")
    weights = [Fraction(m.traffic.rate) * m.traffic.mean_context for m in models]
    whole = sum(weights)
    if not whole:  # every rate is 0: weigh the models equally
        weights, whole = [Fraction(1)] * len(models), Fraction(len(models))
    per_token = sum(w / whole * int(m.kv_bytes_per_token) for w, m in zip(weights, models))
    tokens = int(pool_bytes / per_token)
    shares = " + ".join(f"{m.name} {num(float(100 * w / whole))}% x "
                        f"{num(int(m.kv_bytes_per_token))}" for w, m in zip(weights, models))
    return Figure(tokens, f"{num(pool_bytes)} B of KV pool / ({shares} = "
                  f"{num(float(per_token))} B/token at the traffic mix, shares by rate x "
                  f"mean_context) ~= {num(tokens)} tokens")
