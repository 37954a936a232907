"""Attention-side parallelism and the paged KV layout of one model on a group of devices.

In: a model's shape (layers, KV heads, head_dim), the dtype, the page size and the number of
devices its attention may use. Out: `AttentionParallel` (TP x DP and why), the block layout
the KV pool will use (tokens per block, pages per block - the same rule as
`memory.kv_pool.KVPool.add_model`), and the tokens that a number of pages holds.

Why TP is capped by the KV heads: a TP rank holds whole KV heads. With more ranks than heads,
heads are replicated and that share of KV memory is wasted, so the rest of the group becomes
data-parallel replicas instead; a request's KV then lives only on its replica's devices, which
is the "KV-head-limited attention" that caps the longest context one request can reach.
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_crosspool.planner.errors import PlanError
from sglang_crosspool.planner.figure import Figure, num, size


@dataclass(frozen=True)
class AttentionParallel:
    """DP replicas over consecutive devices of a group, each running attention TP-way."""

    devices: int  # the group the model's attention runs on
    replicas: tuple[int, ...]  # TP degree of each DP replica, largest first
    how: str
    waste_note: str  # what one TP group over all the devices would waste ('' when nothing)

    @property
    def tp(self) -> int:
        return self.replicas[0]

    @property
    def dp(self) -> int:
        return len(self.replicas)

    def replica_devices(self) -> list[range]:
        """Device positions (0-based within the group) of each replica."""
        out, start = [], 0
        for tp in self.replicas:
            out.append(range(start, start + tp))
            start += tp
        return out

    def tp_of(self, position: int) -> int:
        return next(tp for tp, r in zip(self.replicas, self.replica_devices()) if position in r)


def attention_parallel(kv_heads: int, devices: int) -> AttentionParallel:
    """Replicas largest first: each takes TP = the largest divisor of kv_heads that fits the
    devices still free, so the first replica reaches as many devices as the heads allow."""
    replicas, left = [], devices
    while left:
        tp = max(t for t in range(1, min(kv_heads, left) + 1) if kv_heads % t == 0)
        replicas.append(tp)
        left -= tp
    shape = " + ".join(f"TP {t}" for t in replicas)
    how = (f"{kv_heads} kv_heads on {devices} device(s): {shape} (each replica takes the "
           f"largest divisor of {kv_heads} kv_heads that fits the devices left)")
    if len(replicas) > 1:
        how += (f"; a request's KV lives on its replica's devices: at most {replicas[0]} of "
                f"{devices}")
    note = ""
    if devices > kv_heads:
        note = (f"TP {devices} would hold each of the {kv_heads} KV heads on "
                f"{num(devices / kv_heads)} devices: {num(100 * (1 - kv_heads / devices))}% of "
                "KV memory wasted")
    elif replicas[0] < devices:
        note = f"TP {devices} is impossible: {devices} does not divide {kv_heads} kv_heads"
    return AttentionParallel(devices, tuple(replicas), how, note)


@dataclass(frozen=True)
class BlockLayout:
    block_tokens: Figure  # tokens per block (one page per layer per K/V per device)
    pages_per_block: Figure  # per device


def block_layout(name: str, num_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                 tp: int, page_bytes: int) -> BlockLayout:
    heads = kv_heads // tp
    slot = heads * head_dim * dtype_bytes
    if page_bytes % slot:
        # NOTE: KVPool refuses such a model too; a partial-page layout would waste memory.
        raise PlanError(f"model {name!r}: one token's K of one layer on one TP rank is "
                        f"{heads} kv_heads x {head_dim} x {dtype_bytes} B = {slot} B, which does "
                        f"not divide the {page_bytes:,} B page")
    tokens = page_bytes // slot
    block = Figure(tokens, f"{num(page_bytes)} B page / ({kv_heads} kv_heads / TP {tp} x "
                   f"{head_dim} head_dim x {dtype_bytes} B = {num(slot)} B per token per layer)"
                   f" = {num(tokens)} tokens per block")
    pages = Figure(2 * num_layers, f"2 (K,V) x {num_layers} layers = {2 * num_layers} pages "
                   "per block per device")
    return BlockLayout(block, pages)


def pool_pages(free_bytes: int, page_bytes: int, what: str) -> Figure:
    pages = max(free_bytes, 0) // page_bytes
    return Figure(pages, f"{what} {size(max(free_bytes, 0))} / {num(page_bytes)} B page = "
                  f"{num(pages)} pages")


def tokens_in(pages: int, layout: BlockLayout) -> Figure:
    """Tokens that `pages` pages on each device of one replica hold for this model."""
    per_block = int(layout.pages_per_block)
    blocks = pages // per_block
    tokens = blocks * int(layout.block_tokens)
    return Figure(tokens, f"{num(pages)} pages / {per_block} pages per block = {num(blocks)} "
                  f"blocks x {num(int(layout.block_tokens))} tokens = {num(tokens)} tokens")


def blocks_for(tokens: int, layout: BlockLayout) -> int:
    return -(-tokens // int(layout.block_tokens))
