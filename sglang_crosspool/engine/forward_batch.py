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

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, batch: Batch, block_tokens: int, device) -> ForwardBatch:
        ids, positions, slots = [], [], []
        q_starts, q_lens, ctx_lens, tables = [], [], [], []
        for seq in batch.seqs:
            req = seq.req
            q_starts.append(len(ids))
            q_lens.append(seq.length)
            ctx_lens.append(seq.start + seq.length)
            ids.extend(req.tokens(seq.start, seq.start + seq.length))
            for pos in range(seq.start, seq.start + seq.length):
                positions.append(pos)
                slots.append(req.blocks[pos // block_tokens] * block_tokens + pos % block_tokens)
            tables.append(req.blocks)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]

        def tensor(x):
            return torch.tensor(x, dtype=torch.int64, device=device)

        return cls(tensor(ids), tensor(positions), tensor(slots), q_starts, q_lens, ctx_lens,
                   tensor(table), block_tokens)
