"""Page backends: virtual ranges backed by physical pages mapped on demand.

The KV pool only talks to `PageBackend`. The CPU backend simulates the driver's virtual memory
API so that every paging decision is exercised in CI; the CUDA VMM backend (cuMemAddressReserve
/ cuMemCreate / cuMemMap) implements the same contract on GPUs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from sglang_crosspool.options import DEFAULT_PAGE_BYTES


class PagingError(RuntimeError):
    """A mapping request that breaks the backend's contract (a bug, never a full pool)."""


@dataclass
class VirtualRange:
    """A reserved address range of `num_pages * page_bytes` bytes; `data` views all of it."""

    num_pages: int
    page_bytes: int
    data: torch.Tensor  # uint8, the whole range
    mapped: dict[int, object] = field(default_factory=dict)  # page index -> physical page

    def view(self, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return self.data.view(dtype).view(*shape)


class PageBackend(ABC):
    """Contract: `reserve` commits nothing; only mapped pages may be read or written; a
    physical page is mapped into at most one place at a time; `destroy_page` only on unmapped
    pages. All sizes are whole pages of `page_bytes`."""

    page_bytes: int
    device: torch.device

    @abstractmethod
    def reserve(self, num_pages: int) -> VirtualRange: ...

    @abstractmethod
    def release(self, vrange: VirtualRange) -> None: ...

    @abstractmethod
    def create_page(self) -> object: ...

    @abstractmethod
    def destroy_page(self, page: object) -> None: ...

    @abstractmethod
    def map(self, vrange: VirtualRange, index: int, page: object) -> None: ...

    @abstractmethod
    def unmap(self, vrange: VirtualRange, index: int) -> object: ...


class SimulatedPageBackend(PageBackend):
    """Simulated VMM: one plain allocation per range, with page ownership tracked in Python.

    On the CPU, `reserve` allocates an untouched buffer (the OS commits memory only when it is
    written), so this is virtual in effect. On a GPU it commits the whole range up front: the
    accounting is right but memory is not saved; the CUDA VMM backend is what saves it.
    map and unmap track ownership and check the contract. A page is poisoned with NaN bytes
    when it is mapped and when it is unmapped, so a kernel that reads a slot it never wrote, or
    reads after a free, produces NaN in tests instead of silently stale values.
    """

    POISON = 0xFF  # all-ones bytes are NaN in float32/16/bf16

    def __init__(self, page_bytes: int = 4096, device: torch.device | str = "cpu"):
        if page_bytes <= 0 or page_bytes % 64:
            raise ValueError(f"page_bytes must be a positive multiple of 64, got {page_bytes}")
        self.page_bytes = page_bytes
        self.device = torch.device(device)
        self._next_page = 0
        self._live_pages: set[int] = set()
        self._mapped_pages: set[int] = set()
        self.map_calls = 0
        self.unmap_calls = 0

    def reserve(self, num_pages: int) -> VirtualRange:
        data = torch.empty(num_pages * self.page_bytes, dtype=torch.uint8, device=self.device)
        return VirtualRange(num_pages, self.page_bytes, data)

    def release(self, vrange: VirtualRange) -> None:
        if vrange.mapped:
            raise PagingError(f"release of a range with {len(vrange.mapped)} pages still mapped")
        vrange.data = torch.empty(0, dtype=torch.uint8)

    def create_page(self) -> int:
        page = self._next_page
        self._next_page += 1
        self._live_pages.add(page)
        return page

    def destroy_page(self, page: int) -> None:
        if page in self._mapped_pages:
            raise PagingError(f"destroy of physical page {page} while it is mapped")
        self._live_pages.remove(page)

    def map(self, vrange: VirtualRange, index: int, page: int) -> None:
        if page not in self._live_pages or page in self._mapped_pages:
            raise PagingError(f"physical page {page} is not free to map")
        if index in vrange.mapped:
            raise PagingError(f"virtual page {index} is already mapped")
        vrange.mapped[index] = page
        self._mapped_pages.add(page)
        self._poison(vrange, index)
        self.map_calls += 1

    def unmap(self, vrange: VirtualRange, index: int) -> int:
        if index not in vrange.mapped:
            raise PagingError(f"virtual page {index} is not mapped")
        page = vrange.mapped.pop(index)
        self._mapped_pages.remove(page)
        self._poison(vrange, index)
        self.unmap_calls += 1
        return page

    def _poison(self, vrange: VirtualRange, index: int) -> None:
        start = index * self.page_bytes
        vrange.data[start : start + self.page_bytes].fill_(self.POISON)


def make_backend(device: torch.device, page_bytes: int | None) -> PageBackend:
    """The page backend for a device. NOTE: on CUDA this is still the simulated backend,
    which commits each model's whole range; the VMM backend comes with the GPU fast path."""
    return SimulatedPageBackend(page_bytes or DEFAULT_PAGE_BYTES.get(device.type, 4096), device)
