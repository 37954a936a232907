"""crosspool_scheduler: the global scheduler of sglang-crosspool, in pure Python (no torch).

In: requests (token ids, model name, limits) and a `KVAllocator` that hands out KV blocks.
Out: one `Batch` per step (the model to run and, per request, which token range to compute),
with retraction of the newest request when KV pages run out, and per model a prefix cache
(a radix tree of token ids to KV blocks) whose unused blocks are evicted before any request is
retracted. The engine runs the batch and reports back finished requests; nothing here touches a
tensor or a socket.
"""

from crosspool_scheduler.kv import KVAllocator
from crosspool_scheduler.pipeline import Op, Timeline, layer_pipeline
from crosspool_scheduler.policy import RoundRobinPolicy
from crosspool_scheduler.prefix_cache import PrefixCache
from crosspool_scheduler.request import ReqStatus, SchedReq
from crosspool_scheduler.scheduler import (
    Batch,
    GlobalScheduler,
    RequestTooLarge,
    ScheduledSeq,
    SchedulerLimits,
)

__all__ = [
    "Batch",
    "GlobalScheduler",
    "KVAllocator",
    "Op",
    "PrefixCache",
    "ReqStatus",
    "RequestTooLarge",
    "RoundRobinPolicy",
    "SchedReq",
    "ScheduledSeq",
    "SchedulerLimits",
    "Timeline",
    "layer_pipeline",
]
