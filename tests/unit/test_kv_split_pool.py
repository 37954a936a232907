"""SplitKVPool: one request's blocks over several ranks' pools, placed where free pages are;
every rank's books agree; a follower replaying rank 0's journal gets the same blocks."""

import pytest
import torch

from sglang_crosspool.memory.kv_pool import KVPool, KVPoolError
from sglang_crosspool.memory.kv_split import SplitKVPool
from sglang_crosspool.memory.page_backend import SimulatedPageBackend

PAGE = 256  # bytes: 16 tokens of one float32 latent of 4 values per page


def _split(rank: int, world: int, pages: int = 8) -> SplitKVPool:
    pool = SplitKVPool(KVPool(SimulatedPageBackend(PAGE), pages), rank, world)
    pool.add_model("m", num_layers=2, kv_heads=1, head_dim=4, dtype=torch.float32,
                   max_tokens=16 * 16, latent=True)
    return pool


def test_blocks_alternate_over_ranks_and_fill_every_pool():
    pool = _split(0, 3)
    assert pool.max_blocks("m") == 3 * 4  # 8 pages per rank, 2 pages a block
    blocks = pool.alloc_blocks("m", 5)
    owners = [pool.owner("m", b)[0] for b in blocks]
    assert owners == [0, 1, 2, 0, 1]
    assert pool.stats()["ranks"] == [{"used_pages": 4, "free_pages": 4},
                                     {"used_pages": 4, "free_pages": 4},
                                     {"used_pages": 2, "free_pages": 6}]
    more = pool.alloc_blocks("m", 7)  # the whole budget of all three ranks
    assert more is not None and pool.free_pages == 0
    assert not pool.can_alloc("m", 1) and pool.alloc_blocks("m", 1) is None
    pool.free_blocks("m", blocks + more)
    assert pool.free_pages == 24


def test_placement_follows_free_memory():
    pool = _split(1, 2)
    pool.pools[0].add_model("other", 1, 1, 4, torch.float32, 16 * 16, latent=True)
    pool.pools[0].alloc_blocks("other", 6)  # rank 0 has 2 pages left
    owners = [pool.owner("m", b)[0] for b in pool.alloc_blocks("m", 4)]
    assert owners == [1, 1, 1, 0]


def test_only_the_local_pool_maps_pages():
    pool = _split(1, 2)
    pool.alloc_blocks("m", 4)
    assert pool.local.backend.map_calls == 4  # 2 blocks here x 2 layers
    assert pool.pools[0].models["m"].k[0].device.type == "meta"
    assert pool.models["m"].k[0].device.type == "cpu"


def test_follower_replays_the_journal():
    leader, follower = _split(0, 2), _split(1, 2)
    leader.journal = []
    a = leader.alloc_blocks("m", 3)
    leader.retain("m", a[:1])
    leader.free_blocks("m", a)
    b = leader.alloc_blocks("m", 2)
    follower.replay(leader.journal)
    assert follower.stats()["ranks"] == leader.stats()["ranks"]
    assert follower.alloc_blocks("m", 1) == leader.alloc_blocks("m", 1)
    assert b


def test_static_quota_is_refused():
    with pytest.raises(KVPoolError, match="static"):
        _split(0, 2).set_quota("m", 4)
