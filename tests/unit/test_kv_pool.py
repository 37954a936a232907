"""KV pool: virtual ranges per model, one shared physical budget, exact accounting.

The backend contract and the page reserve are tested in test_page_backends.py.
"""

from __future__ import annotations

import pytest
import torch

from sglang_crosspool.memory.kv_pool import KVPool, KVPoolError
from sglang_crosspool.memory.page_backend import SimulatedPageBackend


def make_pool(total_pages=40):
    pool = KVPool(SimulatedPageBackend(page_bytes=1024), total_pages)
    # 2 kv heads x 16 dims x 4 bytes = 128 bytes a slot: 8 tokens a block.
    pool.add_model("a", num_layers=2, kv_heads=2, head_dim=16, dtype=torch.float32,
                   max_tokens=100)
    pool.add_model("b", num_layers=3, kv_heads=1, head_dim=16, dtype=torch.float32,
                   max_tokens=64)
    return pool


def test_reserving_commits_nothing_and_blocks_map_pages_from_one_budget():
    pool = make_pool()
    assert pool.used_pages == 0 and pool.free_pages == 40
    assert pool.block_tokens("a") == 8 and pool.block_tokens("b") == 16
    a = pool.alloc_blocks("a", 3)  # 3 blocks x 2 layers x (K, V) = 12 pages
    b = pool.alloc_blocks("b", 2)  # 2 x 3 x 2 = 12 pages
    assert len(a) == 3 and len(b) == 2
    stats = pool.stats()
    assert stats["used_pages"] == 24 and stats["free_pages"] == 16
    assert stats["models"]["a"]["pages_in_use"] == 12
    assert stats["models"]["b"]["pages_in_use"] == 12
    assert stats["used_bytes"] == 24 * 1024
    pool.free_blocks("a", a)
    pool.free_blocks("b", b)
    assert pool.used_pages == 0 and pool.stats()["models"]["a"]["pages_in_use"] == 0


def test_allocation_is_all_or_nothing_against_the_shared_budget():
    pool = make_pool(total_pages=20)
    assert pool.alloc_blocks("b", 3) is not None  # 18 pages
    assert not pool.can_alloc("a", 1)  # needs 4, 2 left
    assert pool.alloc_blocks("a", 1) is None
    assert pool.used_pages == 18
    assert pool.max_blocks("a") == 5  # 20 pages / 4 per block; virtual range has 13


def test_virtual_range_limits_a_model_even_with_free_pages():
    pool = make_pool(total_pages=1000)
    assert pool.max_blocks("b") == 4  # 64 tokens / 16
    assert pool.alloc_blocks("b", 5) is None
    assert pool.alloc_blocks("b", 4) is not None


def test_views_write_through_mapped_pages_and_poison_on_unmap():
    pool = make_pool()
    kv = pool.models["a"]
    [block] = pool.alloc_blocks("a", 1)
    slots = torch.arange(block * 8, block * 8 + 8)
    assert torch.isnan(kv.k[0][slots]).all()  # a fresh page holds no stale data
    kv.k[1][slots] = 1.5
    assert (kv.k[1][slots] == 1.5).all()
    pool.free_blocks("a", [block])
    assert torch.isnan(kv.k[1][slots]).all()  # reading after free shows NaN, not old KV


def test_page_size_must_fit_whole_slots():
    pool = KVPool(SimulatedPageBackend(page_bytes=1024), 10)
    with pytest.raises(KVPoolError, match="divide"):
        pool.add_model("x", 1, kv_heads=3, head_dim=8, dtype=torch.float32, max_tokens=10)
