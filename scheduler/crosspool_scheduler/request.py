"""Scheduler-side state of one request: token ids, progress through them, and KV blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ReqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SchedReq:
    rid: str
    model: str
    prompt_ids: list[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    arrival: int = -1  # set by the scheduler; larger is newer
    status: ReqStatus = ReqStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the pool
    blocks: list[int] = field(default_factory=list)  # the request's page table
    retractions: int = 0
    # False while the engine prepares something the request needs first (its compiled
    # grammar): the scheduler then admits newer requests before it, and it keeps its place.
    ready: bool = True
    # Prefix cache: at most this many leading tokens may come from the cache (None: all but
    # the last; the engine lowers it where it needs rows for those positions, as logprobs do).
    max_cached: int | None = None
    cached_tokens: int = 0  # prompt tokens taken from the cache (at the first admission)
    # the tree node whose path the request locks (kept out of repr: it reaches the whole tree)
    cache_node: Any = field(default=None, repr=False)
    cache_len: int = 0  # tokens of that path

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens to run through the model before the next token can be sampled."""
        return self.total_len - self.num_computed

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def wants_more_tokens(self) -> bool:
        return len(self.output_ids) < self.max_new_tokens
