"""Per-step metadata of one model's batch, built once per step from the scheduler's batch.

Layers read it and never rebuild it: input ids and positions of the new tokens, the KV slot
each new token writes, and per sequence its query span, context length and block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from crosspool_scheduler import Batch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: KV slot written by each new token
    q_starts: list[int]  # per sequence: offset of its first new token in the flat batch
    q_lens: list[int]
    ctx_lens: list[int]  # per sequence: tokens in the KV pool after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    block_tokens: int
    attn_meta: object = None  # set by the attention backend's prepare(), once per step
    # Decode under a CUDA graph (engine/cuda_graph.py): the graph's static buffers, padded to
    # the bucket size; padding rows repeat row 0's block table and context length (so every
    # read stays inside mapped pages) and have slot -1 (their K/V store is skipped).
    ctx_lens_t: torch.Tensor | None = None  # [B] int32 on the device
    num_real: int | None = None  # rows before the padding

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, batch: Batch, block_tokens: int, device) -> ForwardBatch:
        return cls.from_lists(StepLists.from_batch(batch, block_tokens), block_tokens, device)

    @classmethod
    def from_lists(cls, lists: StepLists, block_tokens: int, device) -> ForwardBatch:
        width = max(len(t) for t in lists.tables)
        table = [t + [0] * (width - len(t)) for t in lists.tables]

        def tensor(x):
            return torch.tensor(x, dtype=torch.int64, device=device)

        return cls(tensor(lists.ids), tensor(lists.positions), tensor(lists.slots),
                   lists.q_starts, lists.q_lens, lists.ctx_lens, tensor(table), block_tokens)


@dataclass
class StepLists:
    """The step's metadata as host lists, before any upload (a graph replay packs these into
    one pinned buffer instead of building tensors)."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    q_starts: list[int]
    q_lens: list[int]
    ctx_lens: list[int]
    tables: list[list[int]]  # per sequence, its blocks (unpadded)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)

    @classmethod
    def from_batch(cls, batch: Batch, block_tokens: int) -> StepLists:
        lists = cls([], [], [], [], [], [], [])
        for seq in batch.seqs:
            req = seq.req
            lists.q_starts.append(len(lists.ids))
            lists.q_lens.append(seq.length)
            lists.ctx_lens.append(seq.start + seq.length)
            lists.ids.extend(req.tokens(seq.start, seq.start + seq.length))
            for pos in range(seq.start, seq.start + seq.length):
                lists.positions.append(pos)
                lists.slots.append(req.blocks[pos // block_tokens] * block_tokens
                                   + pos % block_tokens)
            lists.tables.append(req.blocks)
        return lists
