"""One request's KV pages spread over several ranks' pools (attention sequence split).

Each rank of a sequence split holds its own `KVPool` on its own device; `SplitKVPool` puts
them behind the scheduler's `KVAllocator` protocol as one pool. A *global* block id names the
rank that holds the block and the block there:

    global = rank * stride + local        stride = the model's virtual blocks per rank + 1

so global slots (`global * block_tokens + offset`, what StepLists computes) decode the same
way with `rank_slots = stride * block_tokens`. Every rank's pool has the same models, sizes
and budget, so the stride is the same everywhere; block 0 of every rank is its guard, never
handed out.

Placement: `alloc_blocks(model, n)` gives each block, one at a time, to the rank with the most
free pages (ties to the lowest rank) among those that can still take one, so one request's
pages alternate over the ranks while memory is even, go where memory is when it is not, and a
long request can fill every rank's pool.

Every rank keeps the books of every rank: its own pool maps pages (the real backend), the
others are *ledgers*, the same KVPool code over `LedgerPageBackend`, which maps nothing and
holds no memory. All ranks apply the same operations in the same order (each runs the same
scheduler in lockstep, or followers `replay` the `journal` of rank 0's, as for KVPool under
tensor parallelism), so every ledger hands out the block ids that rank's real pool does.
"""

from __future__ import annotations

import torch

from sglang_crosspool.memory.kv_pool import KVPool, KVPoolError, ModelKV, replay_journal
from sglang_crosspool.memory.page_backend import PageBackend, VirtualRange


class LedgerPageBackend(PageBackend):
    """Accounting only: ranges are meta tensors, pages are numbers, nothing is mapped."""

    def __init__(self, page_bytes: int):
        super().__init__(page_bytes, "meta", poison=False)
        self._next_page = 0

    def _reserve(self, num_pages: int) -> VirtualRange:
        data = torch.empty(num_pages * self.page_bytes, dtype=torch.uint8, device="meta")
        return VirtualRange(num_pages, self.page_bytes, data)

    def _release(self, vrange: VirtualRange) -> None:
        pass

    def _create_page(self) -> int:
        self._next_page += 1
        return self._next_page - 1

    def _destroy_page(self, page: int) -> None:
        pass

    def _map(self, vrange: VirtualRange, index: int, page: int) -> None:
        pass

    def _unmap(self, vrange: VirtualRange, index: int) -> None:
        pass


class SplitKVPool:
    """The scheduler's KVAllocator over `world_size` ranks' pools (module docstring)."""

    def __init__(self, local: KVPool, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise KVPoolError(f"rank {rank} is outside a split of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.pools = [local if r == rank else
                      KVPool(LedgerPageBackend(local.page_bytes), local.total_pages,
                             reserve_pages=local.reserve_pages)
                      for r in range(world_size)]
        # A list: block operations are recorded in global ids, as KVPool.journal (rank 0).
        self.journal: list | None = None

    @property
    def local(self) -> KVPool:
        return self.pools[self.rank]

    # -- what the engine reads of its own pool ------------------------------------------------

    @property
    def models(self) -> dict[str, ModelKV]:
        """This rank's models (the tensors its attention reads and writes)."""
        return self.local.models

    @property
    def backend(self) -> PageBackend:
        return self.local.backend

    @property
    def page_bytes(self) -> int:
        return self.local.page_bytes

    def stride(self, model: str) -> int:
        """Global block ids per rank for `model` (its virtual blocks + the guard)."""
        return self.local.models[model].num_blocks + 1

    def rank_slots(self, model: str) -> int:
        return self.stride(model) * self.local.models[model].block_tokens

    def owner(self, model: str, block: int) -> tuple[int, int]:
        """(rank, local block) of a global block id."""
        return divmod(block, self.stride(model))

    # -- model set ------------------------------------------------------------------------

    def add_model(self, name: str, *args, **kwargs) -> ModelKV:
        kvs = [pool.add_model(name, *args, **kwargs) for pool in self.pools]
        return kvs[self.rank]

    def remove_model(self, name: str) -> int:
        return sum(pool.remove_model(name) for pool in self.pools)

    def set_quota(self, model: str, pages: int) -> None:
        raise KVPoolError("the static pool mode has no sequence split (one request's pages "
                          "would need a quota per rank)")

    # -- KVAllocator protocol ---------------------------------------------------------------

    def block_tokens(self, model: str) -> int:
        return self.local.block_tokens(model)

    def pages_per_block(self, model: str) -> int:
        return self.local.pages_per_block(model)

    def max_blocks(self, model: str) -> int:
        return sum(pool.max_blocks(model) for pool in self.pools)

    def _room(self, pool: KVPool, model: str) -> int:
        kv = pool.models[model]
        return min(len(kv.free_blocks), pool.free_pages // kv.pages_per_block)

    def place(self, model: str, n: int) -> list[int] | None:
        """The rank of each of n new blocks, in order, or None if they do not all fit."""
        ppb = self.pages_per_block(model)
        room = [self._room(pool, model) for pool in self.pools]
        free = [pool.free_pages for pool in self.pools]
        if sum(room) < n:
            return None
        ranks = []
        for _ in range(n):
            r = max((r for r in range(self.world_size) if room[r]), key=lambda r: (free[r], -r))
            ranks.append(r)
            room[r] -= 1
            free[r] -= ppb
        return ranks

    def can_alloc(self, model: str, n: int) -> bool:
        return self.place(model, n) is not None

    def alloc_blocks(self, model: str, n: int) -> list[int] | None:
        ranks = self.place(model, n)
        if ranks is None:
            return None
        blocks = self._alloc_on(model, ranks)
        self._record("alloc", model, blocks)
        return blocks

    def _record(self, op: str, model: str, blocks: list[int]) -> None:
        if self.journal is not None:
            self.journal.append((op, model, list(blocks)))

    def _alloc_on(self, model: str, ranks: list[int]) -> list[int]:
        local = {r: iter(self.pools[r].alloc_blocks(model, ranks.count(r)) or ())
                 for r in set(ranks)}
        stride = self.stride(model)
        return [r * stride + next(local[r]) for r in ranks]

    def _by_rank(self, model: str, blocks: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for b in blocks:
            r, local = self.owner(model, b)
            out.setdefault(r, []).append(local)
        return out

    def retain(self, model: str, blocks: list[int]) -> None:
        self._record("retain", model, blocks)
        for r, local in self._by_rank(model, blocks).items():
            self.pools[r].retain(model, local)

    def free_blocks(self, model: str, blocks: list[int]) -> None:
        self._record("free", model, blocks)
        for r, local in self._by_rank(model, blocks).items():
            self.pools[r].free_blocks(model, local)

    @property
    def free_pages(self) -> int:
        return sum(pool.free_pages for pool in self.pools)

    @property
    def used_pages(self) -> int:
        return sum(pool.used_pages for pool in self.pools)

    @property
    def total_pages(self) -> int:
        return sum(pool.total_pages for pool in self.pools)

    def refill(self) -> int:
        return sum(pool.refill() for pool in self.pools)

    # -- followers ----------------------------------------------------------------------------

    def replay(self, journal: list) -> None:
        """Applies rank 0's recorded operations (a follower that runs no scheduler): the same
        books give the same placement, which is checked."""
        replay_journal(self, journal, "rank 0")

    # -- accounting -------------------------------------------------------------------------

    def stats(self, cached: dict[str, tuple[int, int]] | None = None) -> dict:
        """KVPool.stats summed over the ranks (`cached` in global blocks), plus per rank the
        pages in use and free ("ranks")."""
        per_rank = [pool.stats() for pool in self.pools]
        out = {k: sum(s[k] for s in per_rank) for k, v in per_rank[0].items()
               if isinstance(v, int) and k != "page_bytes"}
        out["page_bytes"] = self.page_bytes
        models = {}
        for name in per_rank[0]["models"]:
            rows = [s["models"][name] for s in per_rank]
            m = {k: sum(row[k] for row in rows) for k in rows[0]}
            m["block_tokens"] = rows[0]["block_tokens"]
            held, evictable = (cached or {}).get(name, (0, 0))
            ppb = self.pages_per_block(name)
            m["blocks_in_use"] -= evictable
            m["pages_in_use"] -= evictable * ppb
            m["tokens_capacity_in_use"] -= evictable * m["block_tokens"]
            m["cached_pages"] = held * ppb
            m["evictable_pages"] = evictable * ppb
            models[name] = m
        evictable = sum(m["evictable_pages"] for m in models.values())
        out["used_pages"] -= evictable
        out["free_pages"] += evictable
        out["evictable_pages"] = evictable
        out["cached_pages"] = sum(m["cached_pages"] for m in models.values())
        out["used_bytes"] = out["used_pages"] * self.page_bytes
        out["models"] = models
        out["ranks"] = [{"used_pages": s["used_pages"], "free_pages": s["free_pages"]}
                        for s in per_rank]
        return out
