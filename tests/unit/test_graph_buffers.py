"""The decode graph's static buffers: one packed upload, padding rows that stay valid."""

from __future__ import annotations

import torch

from sglang_crosspool.engine.cuda_graph import StaticBuffers
from sglang_crosspool.engine.forward_batch import StepLists


def test_fill_pads_with_row_zero_and_skipped_slots():
    buf = StaticBuffers(max_bs=4, max_blocks=3, device=torch.device("cpu"))
    lists = StepLists(ids=[11, 12], positions=[5, 9], slots=[21, 37], q_starts=[0, 1],
                      q_lens=[1, 1], ctx_lens=[6, 10], tables=[[2], [4, 7]])
    fb = buf.forward_batch(4, buf.fill(lists, bs=4), len(lists.ids), block_tokens=8)
    assert fb.input_ids.tolist() == [11, 12, 0, 0]
    assert fb.positions.tolist() == [5, 9, 5, 5]
    assert fb.slot_mapping.tolist() == [21, 37, -1, -1]  # padding never stores K/V
    assert fb.ctx_lens_t.dtype == torch.int32
    assert fb.ctx_lens_t.tolist() == [6, 10, 6, 6] and fb.ctx_lens == [6, 10, 6, 6]
    assert fb.block_tables.tolist() == [[2, 0, 0], [4, 7, 0], [2, 0, 0], [2, 0, 0]]
    assert fb.num_real == 2 and fb.q_lens == [1] * 4

    # A smaller step reuses the same memory; stale table entries are cleared.
    one = StepLists([5], [3], [3], [0], [1], [4], [[1]])
    fb1 = buf.forward_batch(1, buf.fill(one, bs=1), 1, 8)
    assert fb1.block_tables.data_ptr() == fb.block_tables.data_ptr()
    assert fb.block_tables[0].tolist() == [1, 0, 0]
    assert fb.input_ids[0].item() == 5
