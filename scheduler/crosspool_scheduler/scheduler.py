"""The global scheduler: per-model queues, continuous batching, chunked prefill, retraction.

Each `schedule()` call picks one model (policy order) and builds its batch:
1. running requests first, in arrival order: a decode step (1 token) or the next prefill
   chunk; if their KV blocks cannot be had, the newest running request (of any model) is
   retracted - its blocks freed, its progress dropped, re-queued to recompute later;
2. then waiting requests, oldest first, while the token budget, the running-request limit and
   free KV blocks (enough for the whole prompt) allow; a request not `ready` yet (its grammar
   still compiling) is passed over until it is.
A retracted request keeps its output tokens and later recomputes prompt + output in one
prefill, so nothing is lost; requests that could never fit the pool are refused at `add`.

With a `PrefixCache`, an admitted request starts from the longest cached prefix of its tokens
(whole blocks) and computes only the rest; its full blocks join the cache as they are
computed. Where blocks are short, unused cached blocks are evicted first (any model's, least
recently used), and a running request is retracted only when eviction cannot make room.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from crosspool_scheduler.kv import KVAllocator
from crosspool_scheduler.policy import RoundRobinPolicy
from crosspool_scheduler.prefix_cache import PrefixCache
from crosspool_scheduler.request import ReqStatus, SchedReq


class RequestTooLarge(ValueError):
    """The request needs more KV than the pool could ever give one model."""


@dataclass(frozen=True)
class SchedulerLimits:
    max_running_requests: int = 64  # over all models
    chunk_tokens: int = 512  # tokens per step (prefill chunks + decodes)


@dataclass
class ScheduledSeq:
    req: SchedReq
    start: int  # first position computed this step
    length: int  # tokens computed this step

    @property
    def completes(self) -> bool:
        """True when this step reaches the end of the known tokens (a token can be sampled)."""
        return self.start + self.length == self.req.total_len


@dataclass
class Batch:
    model: str
    seqs: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.seqs)


@dataclass
class _ModelQueue:
    waiting: list[SchedReq] = field(default_factory=list)  # sorted by arrival
    running: list[SchedReq] = field(default_factory=list)  # sorted by arrival


class GlobalScheduler:
    def __init__(self, kv: KVAllocator, models: list[str], limits: SchedulerLimits,
                 policy: RoundRobinPolicy | None = None, cache: PrefixCache | None = None):
        self.kv = kv
        self.cache = cache
        self.models = list(models)
        self.limits = limits
        self.policy = policy or RoundRobinPolicy()
        self.queues = {m: _ModelQueue() for m in self.models}
        self.requests: dict[str, SchedReq] = {}
        self._arrivals = 0
        self.num_retractions = 0

    # -- the model set (models loaded and unloaded while serving) ---------------------------

    def add_model(self, model: str) -> None:
        """Serves one more model (its KV ranges must already be in the allocator)."""
        if model in self.queues:
            raise ValueError(f"model {model!r} is already scheduled")
        self.models.append(model)
        self.queues[model] = _ModelQueue()
        if self.cache is not None:
            self.cache.add_model(model)

    def remove_model(self, model: str) -> int:
        """Stops serving a model that has no request left; frees its cached blocks. Returns
        how many blocks the cache let go."""
        queue = self.queues[model]
        if queue.waiting or queue.running:
            raise ValueError(f"model {model!r} still has requests")
        freed = self.cache.drop_model(model) if self.cache is not None else 0
        del self.queues[model]
        self.models.remove(model)
        return freed

    # -- requests in and out ----------------------------------------------------------------

    def add(self, req: SchedReq) -> None:
        need = self._blocks_for(req.model, req.total_len + max(req.max_new_tokens, 0))
        if need > self.kv.max_blocks(req.model):
            raise RequestTooLarge(
                f"request needs {req.total_len + req.max_new_tokens} tokens of KV, but model "
                f"{req.model} can hold at most "
                f"{self.kv.max_blocks(req.model) * self.kv.block_tokens(req.model)}"
            )
        if req.rid in self.requests:
            raise ValueError(f"duplicate request id {req.rid!r}")
        req.arrival = self._arrivals
        self._arrivals += 1
        req.status = ReqStatus.WAITING
        self.requests[req.rid] = req
        self.queues[req.model].waiting.append(req)

    def finish(self, req: SchedReq) -> None:
        """Removes a request (finished or aborted) and frees its blocks."""
        if self.requests.pop(req.rid, None) is None:
            return
        queue = self.queues[req.model]
        if req.status is ReqStatus.RUNNING:
            queue.running.remove(req)
        elif req.status is ReqStatus.WAITING:
            queue.waiting.remove(req)
        self._release(req)
        req.status = ReqStatus.FINISHED

    def abort(self, rid: str) -> SchedReq | None:
        req = self.requests.get(rid)
        if req is not None:
            self.finish(req)
        return req

    # -- the step -----------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> Batch | None:
        batches = self.schedule_many(1)
        return batches[0] if batches else None

    def schedule_many(self, count: int) -> list[Batch]:
        """Up to `count` batches of distinct models, to run as pipelined micro-batches."""
        with_work = [m for m, q in self.queues.items() if q.waiting or q.running]
        batches: list[Batch] = []
        for model in self.policy.order(with_work, self.models):
            if len(batches) == count:
                break
            batch = self._schedule_model(model, [s for b in batches for s in b.seqs])
            if batch is not None:
                self.policy.served(model)
                batches.append(batch)
        return batches

    def _schedule_model(self, model: str, elsewhere: list[ScheduledSeq]) -> Batch | None:
        queue = self.queues[model]
        budget = self.limits.chunk_tokens
        seqs: list[ScheduledSeq] = []
        for req in list(queue.running):
            if budget == 0:
                break
            if req.status is not ReqStatus.RUNNING:
                continue  # retracted while making room for an older request
            n = min(req.remaining, budget)
            if self._grow(req, req.num_computed + n, seqs + elsewhere):
                seqs.append(ScheduledSeq(req, req.num_computed, n))
                budget -= n
        while budget > 0 and self._num_running() < self.limits.max_running_requests:
            req = next((r for r in queue.waiting if r.ready), None)
            if req is None or not self._admit(req):
                break
            n = min(req.remaining, budget)
            req.blocks += self.kv.alloc_blocks(
                model, self._blocks_for(model, req.num_computed + n) - len(req.blocks)) or []
            queue.waiting.remove(req)
            req.status = ReqStatus.RUNNING
            queue.running.append(req)
            seqs.append(ScheduledSeq(req, req.num_computed, n))
            budget -= n
        return Batch(model, seqs) if seqs else None

    def _admit(self, req: SchedReq) -> bool:
        """Takes the request's cached prefix if the blocks for the rest of its tokens can be
        had (evicting unused cached blocks if needed); False, with nothing taken, if not."""
        model = req.model
        whole = self._blocks_for(model, req.total_len)
        if self.cache is None:
            req.num_computed = 0
            return self.kv.can_alloc(model, whole)
        limit = req.total_len - 1 if req.max_cached is None else \
            min(req.total_len - 1, req.max_cached)
        node, blocks = self.cache.match(req, limit)
        self.cache.take(req, node, blocks)  # locked first: eviction must not take them
        if not self._room(model, whole - len(blocks)):
            self.cache.release(req)
            self._free(req)
            req.num_computed = 0
            return False
        if req.retractions == 0:
            req.cached_tokens = req.num_computed
        return True

    def _room(self, model: str, n: int) -> bool:
        """Whether n blocks of `model` can be allocated, after evicting cached blocks."""
        if n <= 0 or self.kv.can_alloc(model, n):
            return True
        return self.cache is not None and self.cache.evict(model, n)

    def _grow(self, req: SchedReq, tokens: int, scheduled: list[ScheduledSeq]) -> bool:
        """Gives `req` blocks for `tokens`, retracting newer requests if needed.

        Returns False when `req` itself was retracted or must wait for this step.
        """
        need = self._blocks_for(req.model, tokens) - len(req.blocks)
        while need > 0 and not self._room(req.model, need):
            in_batch = {id(s.req) for s in scheduled}
            victim = self._newest_running(exclude=in_batch)
            if victim is None:
                return False  # everything else is in this step's batch; wait
            self._retract(victim)
            if victim is req:
                return False
        if need > 0:
            req.blocks.extend(self.kv.alloc_blocks(req.model, need))
        return True

    def _newest_running(self, exclude: set[int]) -> SchedReq | None:
        candidates = [r for q in self.queues.values() for r in q.running if id(r) not in exclude]
        return max(candidates, key=lambda r: r.arrival, default=None)

    def _retract(self, req: SchedReq) -> None:
        queue = self.queues[req.model]
        queue.running.remove(req)
        self._release(req)
        req.num_computed = 0
        req.status = ReqStatus.WAITING
        req.retractions += 1
        self.num_retractions += 1
        bisect.insort(queue.waiting, req, key=lambda r: r.arrival)

    # -- after the model ran ------------------------------------------------------------------

    def advance(self, batch: Batch) -> None:
        """Marks the batch's tokens as computed (their K/V are now in the pool)."""
        for seq in batch.seqs:
            seq.req.num_computed = seq.start + seq.length
            if self.cache is not None and seq.req.status is ReqStatus.RUNNING:
                self.cache.update(seq.req)

    def flush_cache(self) -> bool:
        """Empties the prefix cache; refused (False) while any request is queued or runs."""
        if self.requests:
            return False
        if self.cache is not None:
            self.cache.flush()
        return True

    # -- helpers ------------------------------------------------------------------------------

    def _release(self, req: SchedReq) -> None:
        if self.cache is not None:
            self.cache.release(req)
        self._free(req)

    def _free(self, req: SchedReq) -> None:
        if req.blocks:
            self.kv.free_blocks(req.model, req.blocks)
            req.blocks = []

    def _blocks_for(self, model: str, tokens: int) -> int:
        t = self.kv.block_tokens(model)
        return -(-tokens // t)

    def _num_running(self) -> int:
        return sum(len(q.running) for q in self.queues.values())

    def stats(self) -> dict:
        return {
            "retractions": self.num_retractions,
            "prefix_cache": None if self.cache is None else self.cache.stats(),
            "models": {
                m: {"waiting": len(q.waiting), "running": len(q.running)}
                for m, q in self.queues.items()
            },
        }
