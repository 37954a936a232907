"""Shared-memory data path: fixed buffers per slot, created by the attention side.

Each link owns one shared-memory segment holding, per slot, an input area (hidden, top-k ids,
top-k weights) and an output area. Slots let several micro-batches be in flight to the same
FFN server at once. Areas are flat: `n` tokens of a model with hidden size `h` are the prefix
`[: n * h]`, so models of different widths share the buffers. Names come from the link config,
so two servers never collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from sglang_crosspool.models.common import Routing


@dataclass(frozen=True)
class ShmLayout:
    name: str
    slots: int
    max_tokens: int
    hidden: int
    max_top_k: int
    dtype: str  # torch dtype name of hidden states

    @property
    def _elem(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def _slot_bytes(self) -> int:
        t, h, k = self.max_tokens, self.hidden, self.max_top_k
        return 2 * t * h * self._elem + t * k * (8 + 4)

    @property
    def nbytes(self) -> int:
        return self.slots * self._slot_bytes()


class ShmBuffers:
    """Typed views of one link's shared-memory segment (create on one side, attach on the
    other)."""

    def __init__(self, layout: ShmLayout, create: bool):
        self.layout = layout
        self._shm = _open_segment(layout, create)
        self._owner = create
        raw = torch.frombuffer(self._shm.buf, dtype=torch.uint8)
        dtype = getattr(torch, layout.dtype)
        t, h, k = layout.max_tokens, layout.hidden, layout.max_top_k
        self.slots = []
        offset = 0

        def take(nbytes, view_dtype, *shape):
            nonlocal offset
            view = raw[offset : offset + nbytes].view(view_dtype).view(*shape)
            offset += nbytes
            return view

        elem = layout._elem
        for _ in range(layout.slots):
            self.slots.append({
                "hidden": take(t * h * elem, dtype, t * h),
                "out": take(t * h * elem, dtype, t * h),
                "ids": take(t * k * 8, torch.int64, t * k),
                "weights": take(t * k * 4, torch.float32, t * k),
            })

    def write_input(self, slot: int, hidden: torch.Tensor, routing: Routing) -> None:
        s, (n, h) = self.slots[slot], hidden.shape
        prefix(s["hidden"], n, h).copy_(hidden)
        if routing.topk_ids is not None:
            k = routing.topk_ids.shape[1]
            prefix(s["ids"], n, k).copy_(routing.topk_ids)
            prefix(s["weights"], n, k).copy_(routing.topk_weights)

    def read_input(self, slot: int, n: int, k: int, h: int) -> tuple[torch.Tensor, Routing]:
        s = self.slots[slot]
        if k == 0:
            return prefix(s["hidden"], n, h), Routing(None, None)
        return prefix(s["hidden"], n, h), Routing(prefix(s["ids"], n, k),
                                                  prefix(s["weights"], n, k))

    def output(self, slot: int, n: int, h: int) -> torch.Tensor:
        return prefix(self.slots[slot]["out"], n, h)

    def close(self) -> None:
        self.slots = []  # drop the views first: the segment cannot close while they exist
        self._shm.close()
        if self._owner:
            self._shm.unlink()


def prefix(flat: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """The first `rows` rows of a flat area seen as [rows, width] (contiguous)."""
    return flat[: rows * width].view(rows, width)


def _open_segment(layout: ShmLayout, create: bool) -> shared_memory.SharedMemory:
    if create:
        return shared_memory.SharedMemory(name=layout.name, create=True, size=layout.nbytes)
    try:  # Python >= 3.13: do not let this process's resource tracker own the segment
        return shared_memory.SharedMemory(name=layout.name, track=False)
    except TypeError:
        pass
    # NOTE: before 3.13, attaching registers the segment with this process's resource tracker,
    # which unlinks it when this process exits, under the creator's feet. Undo that.
    from multiprocessing import resource_tracker

    segment = shared_memory.SharedMemory(name=layout.name)
    resource_tracker.unregister(segment._name, "shared_memory")
    return segment
