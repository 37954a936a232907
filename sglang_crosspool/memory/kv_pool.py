"""The KV pool: one physical page budget shared by every model's virtual KV ranges.

Each model reserves, per layer, a K range and a V range large enough for its maximum tokens;
nothing physical is committed. A model's token slots are grouped in *blocks*: block b covers
slots [b*T, (b+1)*T) in all 2*L ranges of the model, where T = page_bytes / (bytes of one
token's K in one layer). Allocating a block maps 2*L physical pages (one per range, same
offset) from the shared budget; freeing it unmaps them and returns them to the budget. Kernels
see ordinary tensors `k[layer]`, `v[layer]` of shape [slots, kv_heads, head_dim] and index them
with slot numbers computed from a request's block list (its page table).

A *latent* model (MLA: DeepSeek-V2) caches one vector per token and layer, from which keys and
values are both derived: it has only the K ranges (L pages a block), and `v` is `k`.

Creating a physical page costs more than mapping it (on CUDA, cuMemCreate), so the pool keeps
a *reserve*: up to `reserve_pages` created pages that are not mapped anywhere. Allocation maps
reserve pages first and creates the rest; a free refills the reserve before it destroys pages.
Created pages, mapped or in the reserve, never exceed the budget.

Blocks are reference counted (the prefix cache shares one block between the cache and every
request that reuses it): `alloc_blocks` maps a block with count 1, `retain` adds a holder, and
`free_blocks` drops one; only the last drop unmaps the block's pages. So a shared block is
mapped once and unmapped once, whatever the backend (simulated or CUDA VMM) below.

Tensor parallelism keeps one pool per rank with the same blocks mapped: rank 0's scheduler
drives its pool, which records every block operation in `journal` (when it is a list), and
the other ranks `replay` those operations on theirs before each step (engine/tensor_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sglang_crosspool.memory.page_backend import PageBackend, VirtualRange


class KVPoolError(ValueError):
    """A model whose KV layout does not fit the pool (configuration error)."""


@dataclass
class ModelKV:
    """One model's virtual KV ranges and block bookkeeping."""

    name: str
    num_layers: int
    block_tokens: int
    num_blocks: int  # virtual capacity in blocks (block 0, the guard, not counted)
    k_ranges: list[VirtualRange]
    v_ranges: list[VirtualRange]
    k: list[torch.Tensor]  # per layer [num_blocks * block_tokens, kv_heads, head_dim]
    v: list[torch.Tensor]
    free_blocks: list[int] = field(default_factory=list)
    blocks_in_use: int = 0  # mapped blocks (each counted once, however many hold it)
    refs: list[int] = field(default_factory=list)  # per block: holders (0: not mapped)
    quota_pages: int | None = None  # static pool mode: this model's fixed slice
    latent: bool = False  # one range per layer (v_ranges empty, v is k)

    @property
    def pages_per_block(self) -> int:
        return len(self.k_ranges) + len(self.v_ranges)


class KVPool:
    """Implements the scheduler's `KVAllocator` protocol over a `PageBackend`."""

    def __init__(self, backend: PageBackend, total_pages: int, reserve_pages: int = 0):
        if total_pages <= 0:
            raise KVPoolError(f"the KV budget must hold at least one page, got {total_pages}")
        if reserve_pages < 0:
            raise KVPoolError(f"the page reserve cannot be negative, got {reserve_pages}")
        self.backend = backend
        self.total_pages = total_pages
        self.models: dict[str, ModelKV] = {}
        self._spare: list[object] = []  # the reserve: created physical pages not mapped anywhere
        self._pages_out = 0  # physical pages mapped into some model's range
        self.reserve_pages = min(reserve_pages, total_pages)
        self.journal: list | None = None  # a list: block operations are recorded (TP rank 0)
        self.refill()

    @property
    def page_bytes(self) -> int:
        return self.backend.page_bytes

    def add_model(
        self, name: str, num_layers: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, max_tokens: int, latent: bool = False,
    ) -> ModelKV:
        """Reserves `name`'s ranges. `latent`: kv_heads x head_dim is the one vector a token
        caches per layer (MLA), kept in the K range; no V range is reserved or mapped."""
        slot_bytes = kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        if self.page_bytes % slot_bytes:
            what = "latent" if latent else "K"
            raise KVPoolError(
                f"model {name}: one token's {what} of one layer is {slot_bytes} bytes, which does "
                f"not divide the {self.page_bytes}-byte page (choose a page size that it divides)"
            )
        block_tokens = self.page_bytes // slot_bytes
        num_blocks = -(-max_tokens // block_tokens)
        # Block 0 is never allocated: the backend's shared guard page sits under it in every
        # range (see PageBackend.map_guard), so blocks 1..num_blocks serve requests.
        k_ranges = [self.backend.reserve(num_blocks + 1) for _ in range(num_layers)]
        v_ranges = [] if latent else [self.backend.reserve(num_blocks + 1)
                                      for _ in range(num_layers)]
        for vrange in k_ranges + v_ranges:
            self.backend.map_guard(vrange, 0)
        slots = (num_blocks + 1) * block_tokens

        def views(ranges):
            return [r.view(dtype, slots, kv_heads, head_dim) for r in ranges]

        k = views(k_ranges)
        kv = ModelKV(name, num_layers, block_tokens, num_blocks, k_ranges, v_ranges,
                     k, k if latent else views(v_ranges),
                     free_blocks=list(range(1, num_blocks + 1))[::-1],
                     refs=[0] * (num_blocks + 1), latent=latent)
        self.models[name] = kv
        return kv

    def remove_model(self, name: str) -> int:
        """Releases `name`'s virtual ranges (a model unloaded); every block must be free.
        Returns the virtual pages released."""
        kv = self.models[name]
        if kv.blocks_in_use:
            raise KVPoolError(f"model {name}: {kv.blocks_in_use} KV blocks are still mapped")
        released = 0
        for vrange in kv.k_ranges + kv.v_ranges:
            self.backend.unmap(vrange, 0)  # the shared guard page
            released += vrange.num_pages
            self.backend.release(vrange)
        del self.models[name]
        return released

    def set_quota(self, model: str, pages: int) -> None:
        """Caps a model at `pages` physical pages (the static pool mode's fixed slice)."""
        self.models[model].quota_pages = pages

    # -- KVAllocator protocol (used by the pure-Python scheduler) ---------------------------

    def block_tokens(self, model: str) -> int:
        return self.models[model].block_tokens

    def pages_per_block(self, model: str) -> int:
        return self.models[model].pages_per_block

    def max_blocks(self, model: str) -> int:
        """The most blocks one model can ever hold: its virtual range or the whole budget."""
        kv = self.models[model]
        pages = self.total_pages if kv.quota_pages is None else kv.quota_pages
        return min(kv.num_blocks, pages // kv.pages_per_block)

    def can_alloc(self, model: str, n: int) -> bool:
        kv = self.models[model]
        pages = n * kv.pages_per_block
        if kv.quota_pages is not None and kv.blocks_in_use * kv.pages_per_block + pages > \
                kv.quota_pages:
            return False
        return n <= len(kv.free_blocks) and pages <= self.free_pages

    def alloc_blocks(self, model: str, n: int) -> list[int] | None:
        """Maps n blocks for `model`, all or nothing."""
        if not self.can_alloc(model, n):
            return None
        kv = self.models[model]
        blocks = [kv.free_blocks.pop() for _ in range(n)]
        for b in blocks:
            for vrange in kv.k_ranges + kv.v_ranges:
                page = self._spare.pop() if self._spare else self.backend.create_page()
                self.backend.map(vrange, b, page)
            kv.refs[b] = 1
        kv.blocks_in_use += n
        self._pages_out += n * kv.pages_per_block
        if self.journal is not None:
            self.journal.append(("alloc", model, list(blocks)))
        return blocks

    def retain(self, model: str, blocks: list[int]) -> None:
        """Adds a holder to mapped blocks (nothing is mapped again)."""
        kv = self.models[model]
        for b in blocks:
            if kv.refs[b] <= 0:
                raise KVPoolError(f"model {model}: retain of block {b}, which is not mapped")
            kv.refs[b] += 1
        if self.journal is not None:
            self.journal.append(("retain", model, list(blocks)))

    def free_blocks(self, model: str, blocks: list[int]) -> None:
        """Drops one holder of each block; unmaps the blocks whose last holder this was."""
        kv = self.models[model]
        if self.journal is not None:
            self.journal.append(("free", model, list(blocks)))
        last = []
        for b in blocks:
            if kv.refs[b] <= 0:
                raise KVPoolError(f"model {model}: free of block {b}, which is not mapped")
            kv.refs[b] -= 1
            if kv.refs[b] == 0:
                last.append(b)
        if not last:
            return
        self.backend.drain()
        for b in last:
            for vrange in kv.k_ranges + kv.v_ranges:
                page = self.backend.unmap(vrange, b)
                # Keep a small reserve of created pages so that the next map skips creation.
                if len(self._spare) < self.reserve_pages:
                    self._spare.append(page)
                else:
                    self.backend.destroy_page(page)
            kv.free_blocks.append(b)
        kv.blocks_in_use -= len(last)
        self._pages_out -= len(last) * kv.pages_per_block

    def replay(self, journal: list) -> None:
        """Applies another pool's recorded block operations to this one (same models, same
        budget, same history: so each allocation yields the same blocks, which is checked)."""
        replay_journal(self, journal, "the recording pool")

    def refill(self) -> int:
        """Creates pages until the reserve is full (or the budget is all created); returns how
        many. Off the critical path: for start-up and idle time, since allocations drain the
        reserve and only frees refill it."""
        target = min(self.reserve_pages, self.total_pages - self._pages_out)
        created = max(0, target - len(self._spare))
        for _ in range(created):
            self._spare.append(self.backend.create_page())
        return created

    # -- accounting -------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return self.total_pages - self._pages_out

    @property
    def used_pages(self) -> int:
        return self._pages_out

    def pages_in_use(self, model: str) -> int:
        kv = self.models[model]
        return kv.blocks_in_use * kv.pages_per_block

    def stats(self, cached: dict[str, tuple[int, int]] | None = None) -> dict:
        """Accounting for metrics and tests: pages and bytes, pool-wide and per model.

        `cached`: per model, (blocks the prefix cache holds, of which evictable: held by the
        cache alone). As in SGLang, evictable pages count as free, not used: `used_pages` are
        the pages requests hold, `mapped_pages` every page mapped, `cached_pages` the cache's.
        """
        cached = cached or {}
        models = {}
        for name, kv in self.models.items():
            held, evictable = cached.get(name, (0, 0))
            in_use = kv.blocks_in_use - evictable
            models[name] = {
                "pages_in_use": in_use * kv.pages_per_block,
                "blocks_in_use": in_use,
                "cached_pages": held * kv.pages_per_block,
                "evictable_pages": evictable * kv.pages_per_block,
                "block_tokens": kv.block_tokens,
                "tokens_capacity_in_use": in_use * kv.block_tokens,
                "virtual_blocks": kv.num_blocks,
            }
        evictable = sum(m["evictable_pages"] for m in models.values())
        used = self.used_pages - evictable
        return {
            "page_bytes": self.page_bytes,
            "total_pages": self.total_pages,
            "used_pages": used,
            "free_pages": self.total_pages - used,
            "mapped_pages": self.used_pages,
            "cached_pages": sum(m["cached_pages"] for m in models.values()),
            "evictable_pages": evictable,
            "spare_pages": len(self._spare),
            "used_bytes": used * self.page_bytes,
            "total_bytes": self.total_pages * self.page_bytes,
            "models": models,
        }


def replay_journal(pool, journal: list, source: str) -> None:
    """Applies recorded block operations ("alloc" | "retain" | "free", model, blocks) to
    `pool`; an allocation must give the blocks it gave `source`."""
    for op, model, blocks in journal:
        if op == "alloc":
            got = pool.alloc_blocks(model, len(blocks))
            if got != blocks:
                raise KVPoolError(f"model {model}: replayed allocation gave blocks {got}, "
                                  f"{source} {blocks} (the books diverged)")
        elif op == "retain":
            pool.retain(model, blocks)
        else:
            pool.free_blocks(model, blocks)
