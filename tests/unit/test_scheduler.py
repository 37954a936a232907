"""The global scheduler on its own: pure Python, with a fake KV allocator."""

from __future__ import annotations

import sys

import pytest
from crosspool_scheduler import (
    GlobalScheduler,
    ReqStatus,
    RequestTooLarge,
    SchedReq,
    SchedulerLimits,
)


class FakeKV:
    """Blocks of 4 tokens; `pages` blocks shared by every model."""

    def __init__(self, pages: int):
        self.pages = pages
        self.used: dict[str, int] = {}
        self.next = 0

    def block_tokens(self, model):
        return 4

    def max_blocks(self, model):
        return self.pages

    def can_alloc(self, model, n):
        return sum(self.used.values()) + n <= self.pages

    def alloc_blocks(self, model, n):
        if not self.can_alloc(model, n):
            return None
        self.used[model] = self.used.get(model, 0) + n
        self.next += n
        return list(range(self.next - n, self.next))

    def free_blocks(self, model, blocks):
        self.used[model] -= len(blocks)


def run(sched: GlobalScheduler, max_steps=1000) -> list:
    """Drives the scheduler like the engine does: each completed step samples one token."""
    log = []
    for _ in range(max_steps):
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


def test_no_torch_import():
    assert "crosspool_scheduler" in sys.modules
    import crosspool_scheduler.scheduler as mod

    assert "torch" not in mod.__dict__


def test_round_robin_across_models_and_chunked_prefill():
    kv = FakeKV(100)
    sched = GlobalScheduler(kv, ["a", "b"], SchedulerLimits(max_running_requests=8,
                                                           chunk_tokens=6))
    sched.add(SchedReq("r1", "a", list(range(10)), 2))
    sched.add(SchedReq("r2", "b", list(range(3)), 2))
    log = run(sched)
    assert [b.model for b in log[:4]] == ["a", "b", "a", "b"]
    assert [(s.start, s.length) for s in log[0].seqs] == [(0, 6)]  # first chunk
    assert [(s.start, s.length) for s in log[2].seqs] == [(6, 4)]  # rest, then sample
    assert kv.used == {"a": 0, "b": 0}


def test_decodes_and_new_prefills_share_a_step():
    kv = FakeKV(100)
    sched = GlobalScheduler(kv, ["a"], SchedulerLimits(8, chunk_tokens=16))
    sched.add(SchedReq("old", "a", [1, 2, 3], 5))
    first = sched.schedule()
    sched.advance(first)
    first.seqs[0].req.output_ids.append(9)
    sched.add(SchedReq("new", "a", [4, 5, 6, 7], 5))
    step = sched.schedule()
    assert [(s.req.rid, s.length) for s in step.seqs] == [("old", 1), ("new", 4)]


def test_pressure_retracts_the_newest_and_everything_finishes():
    kv = FakeKV(6)  # 24 tokens in all
    sched = GlobalScheduler(kv, ["a", "b"], SchedulerLimits(8, 64))
    reqs = [SchedReq(f"r{i}", "ab"[i % 2], [1] * 5, 6) for i in range(4)]
    for r in reqs:
        sched.add(r)
    run(sched)
    assert sched.num_retractions > 0
    assert all(len(r.output_ids) == 6 and r.status is ReqStatus.FINISHED for r in reqs)
    assert reqs[0].retractions == 0  # the oldest is never the victim
    assert sum(kv.used.values()) == 0


def test_max_running_requests_is_global():
    kv = FakeKV(100)
    sched = GlobalScheduler(kv, ["a", "b"], SchedulerLimits(max_running_requests=2,
                                                           chunk_tokens=64))
    for i in range(4):
        sched.add(SchedReq(f"r{i}", "ab"[i % 2], [1, 2], 3))
    sched.schedule()
    sched.schedule()
    running = sum(s["running"] for s in sched.stats()["models"].values())
    assert running == 2


def test_requests_that_cannot_fit_are_refused_and_duplicates_too():
    sched = GlobalScheduler(FakeKV(2), ["a"], SchedulerLimits())
    with pytest.raises(RequestTooLarge):
        sched.add(SchedReq("big", "a", [1] * 6, 4))  # 10 tokens > 8
    sched.add(SchedReq("ok", "a", [1] * 4, 4))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add(SchedReq("ok", "a", [1], 1))


def test_abort_frees_blocks_in_any_state():
    kv = FakeKV(10)
    sched = GlobalScheduler(kv, ["a"], SchedulerLimits(8, 64))
    sched.add(SchedReq("run", "a", [1] * 9, 4))
    sched.add(SchedReq("wait", "a", [1] * 30, 4))
    sched.advance(sched.schedule())
    assert sched.abort("run").status is ReqStatus.FINISHED
    assert sched.abort("wait").status is ReqStatus.FINISHED
    assert sched.abort("missing") is None
    assert sum(kv.used.values()) == 0 and not sched.has_work()
