"""The prefix cache with the scheduler and a real KV pool (simulated pages, no model):
matching whole blocks, shared blocks mapped once, LRU eviction across models before any
retraction, per-model floors, flush."""

from __future__ import annotations

import pytest
import torch
from crosspool_scheduler import GlobalScheduler, PrefixCache, SchedReq, SchedulerLimits
from crosspool_scheduler.prefix_cache import _nodes

from sglang_crosspool.memory.kv_pool import KVPool
from sglang_crosspool.memory.page_backend import SimulatedPageBackend


def make(total_pages=200, floors=None, chunk=64, models=("a", "b")):
    pool = KVPool(SimulatedPageBackend(page_bytes=256), total_pages)
    for m in models:  # 1 kv head x 16 dims x 4 bytes: 4 tokens a block, 2 pages a block
        pool.add_model(m, num_layers=1, kv_heads=1, head_dim=16, dtype=torch.float32,
                       max_tokens=400)
    cache = PrefixCache(pool, list(models), floors)
    sched = GlobalScheduler(pool, list(models), SchedulerLimits(8, chunk), cache=cache)
    return pool, cache, sched


def run(sched: GlobalScheduler, reqs: list[SchedReq]) -> list:
    """Adds the requests and drives the scheduler as the engine does (a step that completes
    a sequence samples token 0); returns the batches."""
    for r in reqs:
        sched.add(r)
    log = []
    for _ in range(1000):
        batch = sched.schedule()
        if batch is None:
            return log
        log.append(batch)
        sched.advance(batch)
        for seq in batch.seqs:
            if seq.completes:
                seq.req.output_ids.append(0)
                if not seq.req.wants_more_tokens:
                    sched.finish(seq.req)
    raise AssertionError("did not drain")


def check_node_counts(cache: PrefixCache) -> None:
    for m, tree in cache.trees.items():
        assert cache.stats()["models"][m]["nodes"] == sum(1 for _ in _nodes(tree.root)) - 1


def req(rid, tokens, model="a", new=1):
    return SchedReq(rid, model, list(tokens), new)


def test_a_cached_prefix_is_reused_in_whole_blocks_and_mapped_once():
    pool, cache, sched = make()
    backend = pool.backend
    run(sched, [req("first", range(1, 11))])  # 10 tokens: blocks [1-4] [5-8] cached
    assert cache.blocks()["a"] == (2, 2)
    assert pool.used_pages == 4 and pool.stats(cache.blocks())["used_pages"] == 0
    maps = backend.map_calls
    second = req("second", list(range(1, 10)) + [99, 98, 97])
    batches = run(sched, [second])
    assert second.cached_tokens == 8
    assert batches[0].seqs[0].start == 8 and batches[0].seqs[0].length == 4
    assert backend.map_calls - maps == 2  # one new block (2 pages); the cached two stay
    # The whole prompt may not come from the cache: its last token is computed for logits.
    third = req("third", range(1, 9))
    run(sched, [third])
    assert third.cached_tokens == 4


def test_a_shared_block_is_unmapped_only_when_its_last_holder_lets_go():
    pool, _, _ = make()
    backend = pool.backend
    [b] = pool.alloc_blocks("a", 1)
    pool.retain("a", [b])
    pool.retain("a", [b])
    assert backend.map_calls == 2 and pool.used_pages == 2
    pool.free_blocks("a", [b])
    pool.free_blocks("a", [b])
    assert backend.unmap_calls == 0 and pool.used_pages == 2
    pool.free_blocks("a", [b])
    assert backend.unmap_calls == 2 and pool.used_pages == 0
    with pytest.raises(ValueError, match="not mapped"):
        pool.free_blocks("a", [b])


def test_requests_running_together_share_the_prefix_one_computed():
    pool, cache, sched = make(chunk=8)
    # The first prompt's prefill runs in chunks of 8: its blocks join the tree as they fill,
    # so the second request, admitted once they are there, starts from them.
    first, second = req("x", range(1, 18), new=6), req("y", list(range(1, 17)) + [50], new=6)
    sched.add(first)
    batch = sched.schedule()
    sched.advance(batch)
    assert cache.blocks()["a"] == (2, 0)  # cached, and locked by the running request
    run(sched, [second])
    # Admitted after the first's second chunk: 16 tokens (4 blocks) were in the tree.
    assert second.cached_tokens == 16
    assert second.blocks == [] and pool.stats(cache.blocks())["used_pages"] == 0


def test_a_model_never_reuses_another_models_prefix():
    _, cache, sched = make()
    run(sched, [req("a1", range(1, 20), "a")])
    other = req("b1", range(1, 20), "b")
    run(sched, [other])
    assert other.cached_tokens == 0
    assert cache.blocks()["a"][0] == 4 and cache.blocks()["b"][0] == 4


def test_max_cached_keeps_positions_that_need_logits_out_of_the_cache():
    _, _, sched = make()
    run(sched, [req("p", range(1, 30))])
    limited = req("q", range(1, 30))
    limited.max_cached = 10
    run(sched, [limited])
    assert limited.cached_tokens == 8


def test_split_nodes_serve_both_branches():
    _, cache, sched = make()
    run(sched, [req("l", list(range(1, 13)) + [7] * 8)])  # 5 blocks
    run(sched, [req("r", list(range(1, 13)) + [8] * 8)])  # shares 3, then branches
    both = req("again", list(range(1, 13)) + [8] * 8 + [1])
    run(sched, [both])
    assert both.cached_tokens == 20
    assert cache.stats()["models"]["a"]["nodes"] == 3  # the shared stem, then one per branch
    check_node_counts(cache)


def test_eviction_takes_lru_unused_blocks_of_any_model_before_retracting():
    # 12 pages: 6 blocks. Each request needs 3 blocks at its longest.
    pool, cache, sched = make(total_pages=12)
    run(sched, [req("old-a", range(1, 13), "a"), req("old-b", range(100, 112), "b")])
    assert cache.blocks() == {"a": (3, 3), "b": (3, 3)}  # 12 tokens computed: 3 full blocks
    # Two requests running together need all six blocks: the six cached ones go.
    run(sched, [req("n1", range(200, 211), "a", new=2), req("n2", range(300, 311), "b", new=2)])
    assert sched.num_retractions == 0
    assert cache.evicted_blocks == 6
    check_node_counts(cache)
    assert pool.stats(cache.blocks())["used_pages"] == 0


def test_lru_order_across_models():
    pool, cache, sched = make(total_pages=16)  # 8 blocks
    run(sched, [req("a-old", range(1, 10), "a")])  # caches 2 blocks of a
    run(sched, [req("b-new", range(100, 109), "b")])  # caches 2 blocks of b, later
    # 8 blocks: 4 cached, a 17-token request needs 5: one cached block goes, the last of a's
    # (least recently used); then big's own 4 full blocks join a's tree.
    run(sched, [req("big", range(500, 517), "a")])
    assert cache.blocks() == {"a": (1 + 4, 5), "b": (2, 2)}
    assert cache.evicted_blocks == 1 and sched.num_retractions == 0


def test_a_floor_keeps_a_models_cache_from_other_models_requests():
    pool, cache, sched = make(total_pages=16, floors={"b": 4})
    run(sched, [req("b-old", range(100, 109), "b")])  # 2 blocks of b: 4 pages, the floor
    run(sched, [req("a1", range(1, 25), "a")])  # needs 6 blocks of 8; b's 2 may not go
    assert cache.blocks()["b"][0] == 2
    # b's own requests may evict b's cache.
    run(sched, [req("b-big", range(700, 724), "b")])
    assert sched.num_retractions == 0


def test_flush_is_refused_while_requests_run_then_empties_the_cache():
    pool, cache, sched = make()
    run(sched, [req("one", range(1, 30))])
    assert pool.used_pages > 0
    running = req("two", range(1, 30), new=5)
    sched.add(running)
    sched.advance(sched.schedule())
    assert not sched.flush_cache()
    sched.finish(running)
    assert sched.flush_cache()
    assert pool.used_pages == 0 and cache.blocks()["a"] == (0, 0)
    assert pool.backend.unmap_calls == pool.backend.map_calls


def test_retracted_requests_free_their_pages_and_keep_the_cache_consistent():
    # Many requests, little room: retractions happen; at the end nothing but the cache holds
    # pages, and the cache's counts match what the pool holds.
    pool, cache, sched = make(total_pages=20, chunk=16)
    reqs = [req(f"r{i}", [i % 3 + 1] * 6 + list(range(10 * i, 10 * i + 6)), new=8)
            for i in range(8)]
    run(sched, reqs)
    assert sched.num_retractions > 0
    held = sum(c for c, _ in cache.blocks().values())
    assert pool.used_pages == 2 * held
    assert pool.stats(cache.blocks())["used_pages"] == 0
    assert all(len(r.output_ids) == 8 for r in reqs)
    check_node_counts(cache)
