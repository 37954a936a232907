"""The scheduler's view of KV memory: blocks of token slots, per model, from a shared budget."""

from __future__ import annotations

from typing import Protocol


class KVAllocator(Protocol):
    """Contract the KV pool implements for the scheduler.

    A block holds `block_tokens(model)` token slots of one model across all its layers.
    `alloc_blocks` is all-or-nothing and returns None when the shared budget (or the model's
    virtual range) cannot supply n blocks; `max_blocks` is what one model could hold with the
    whole budget to itself, used to refuse requests that could never fit.

    Blocks are reference counted: `alloc_blocks` gives each block one holder, `retain` adds
    one, `free_blocks` drops one and gives the block back when none is left. A block is
    `pages_per_block(model)` pages of the shared budget, of which `free_pages` are free.
    """

    def block_tokens(self, model: str) -> int: ...

    def max_blocks(self, model: str) -> int: ...

    def can_alloc(self, model: str, n: int) -> bool: ...

    def alloc_blocks(self, model: str, n: int) -> list[int] | None: ...

    def free_blocks(self, model: str, blocks: list[int]) -> None: ...

    def retain(self, model: str, blocks: list[int]) -> None: ...

    def pages_per_block(self, model: str) -> int: ...

    @property
    def free_pages(self) -> int: ...
