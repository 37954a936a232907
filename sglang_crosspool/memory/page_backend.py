"""Page backends: virtual ranges backed by physical pages mapped on demand.

The KV pool only talks to `PageBackend`. The base class owns the contract: which physical
pages are live, which are mapped where, and the call counters; a backend only implements the
six raw operations (`_reserve`, `_release`, `_create_page`, `_destroy_page`, `_map`,
`_unmap`). The CPU backend simulates the driver's virtual memory API, so the bookkeeping that
the CUDA VMM backend (memory/cuda_vmm.py: cuMemAddressReserve / cuMemCreate / cuMemMap) runs
on GPUs is the same code that CI exercises.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from sglang_crosspool.options import DEFAULT_PAGE_BYTES, KV_PAGE_BACKENDS

log = logging.getLogger("sglang_crosspool.memory")


class PagingError(RuntimeError):
    """A mapping request that breaks the backend's contract (a bug, never a full pool), or a
    driver call that failed."""


GUARD = "guard"  # stands for the shared guard page in `VirtualRange.mapped`


@dataclass
class VirtualRange:
    """A reserved address range of `num_pages * page_bytes` bytes; `data` views all of it."""

    num_pages: int
    page_bytes: int
    data: torch.Tensor  # uint8, the whole range
    mapped: dict[int, object] = field(default_factory=dict)  # page index -> physical page
    backing: object = None  # the backend's own record of the range (VMM: its address)

    def view(self, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return self.data.view(dtype).view(*shape)


class PageBackend(ABC):
    """Contract: `reserve` commits nothing; only mapped pages may be read or written; a
    physical page is mapped into at most one place at a time; `destroy_page` only on unmapped
    pages; `release` only of ranges with nothing mapped. All sizes are whole pages of
    `page_bytes`. Before unmapping, the caller calls `drain` once, so that no queued device
    work still touches the pages. With `poison`, a page reads as NaN right after it is mapped
    (all-ones bytes are NaN in float32/16/bf16), so a kernel that reads a slot it never wrote
    produces NaN instead of stale values."""

    POISON = 0xFF

    def __init__(self, page_bytes: int, device: torch.device | str, poison: bool):
        self.page_bytes = page_bytes
        self.device = torch.device(device)
        self.poison = poison
        self._live_pages: set = set()
        self._mapped_pages: set = set()
        self._guard = None  # the shared guard page, created on first use
        self.create_calls = 0
        self.destroy_calls = 0
        self.map_calls = 0
        self.unmap_calls = 0

    @property
    def live_pages(self) -> int:
        """Physical pages created and not yet destroyed (mapped or not)."""
        return len(self._live_pages)

    def reserve(self, num_pages: int) -> VirtualRange:
        if num_pages < 1:
            raise PagingError(f"a range needs at least one page, got {num_pages}")
        return self._reserve(num_pages)

    def release(self, vrange: VirtualRange) -> None:
        """Frees the address range. NOTE: views of `vrange.data` taken earlier must not be used
        afterwards (on CUDA their addresses are no longer reserved)."""
        if vrange.mapped:
            raise PagingError(f"release of a range with {len(vrange.mapped)} pages still mapped")
        self._release(vrange)

    def create_page(self) -> object:
        page = self._create_page()
        self._live_pages.add(page)
        self.create_calls += 1
        return page

    def destroy_page(self, page: object) -> None:
        if page in self._mapped_pages:
            raise PagingError(f"destroy of physical page {page} while it is mapped")
        if page not in self._live_pages:
            raise PagingError(f"destroy of physical page {page}, which is not live")
        self._destroy_page(page)
        self._live_pages.remove(page)
        self.destroy_calls += 1

    def map(self, vrange: VirtualRange, index: int, page: object) -> None:
        if page not in self._live_pages or page in self._mapped_pages:
            raise PagingError(f"physical page {page} is not free to map")
        if not 0 <= index < vrange.num_pages:
            raise PagingError(f"virtual page {index} is outside the {vrange.num_pages}-page range")
        if index in vrange.mapped:
            raise PagingError(f"virtual page {index} is already mapped")
        self._map(vrange, index, page)
        vrange.mapped[index] = page
        self._mapped_pages.add(page)
        if self.poison:
            self._poison(vrange, index)
        self.map_calls += 1

    def unmap(self, vrange: VirtualRange, index: int) -> object:
        if index not in vrange.mapped:
            raise PagingError(f"virtual page {index} is not mapped")
        self._unmap(vrange, index)
        page = vrange.mapped.pop(index)
        if page is not GUARD:
            self._mapped_pages.remove(page)
            self.unmap_calls += 1
        return page

    def map_guard(self, vrange: VirtualRange, index: int) -> None:
        """Maps the backend's one shared guard page at `index`. Unlike other pages it may be
        mapped in any number of places at once; it is created once, never handed out and
        counted in no budget. The KV pool puts it under block 0 of every range, which it never
        allocates: a range's base address is then always mapped, which kernel launchers that
        check a tensor's base pointer (Triton does) require, and padding rows that point at
        block 0 read mapped memory. Nothing may write it."""
        if index in vrange.mapped:
            raise PagingError(f"virtual page {index} is already mapped")
        if self._guard is None:
            self._guard = self._create_page()
        self._map(vrange, index, self._guard)
        vrange.mapped[index] = GUARD

    def drain(self) -> None:
        """Waits until queued device work can no longer touch mapped pages (nothing on CPU)."""

    def _poison(self, vrange: VirtualRange, index: int) -> None:
        start = index * self.page_bytes
        vrange.data[start : start + self.page_bytes].fill_(self.POISON)

    # -- what a backend implements (arguments already checked against the contract) --------

    @abstractmethod
    def _reserve(self, num_pages: int) -> VirtualRange: ...

    @abstractmethod
    def _release(self, vrange: VirtualRange) -> None: ...

    @abstractmethod
    def _create_page(self) -> object:
        """A new physical page; the returned handle must be hashable."""

    @abstractmethod
    def _destroy_page(self, page: object) -> None: ...

    @abstractmethod
    def _map(self, vrange: VirtualRange, index: int, page: object) -> None: ...

    @abstractmethod
    def _unmap(self, vrange: VirtualRange, index: int) -> None: ...


class SimulatedPageBackend(PageBackend):
    """Simulated VMM: one plain allocation per range; physical pages are numbers.

    On the CPU, `reserve` allocates an untouched buffer (the OS commits memory only when it is
    written), so this is virtual in effect. On a GPU it commits the whole range up front: the
    accounting is right but memory is not saved; the CUDA VMM backend is what saves it.
    Pages are always poisoned when mapped, and again when unmapped, so that reading after a
    free shows NaN here (on CUDA VMM it faults instead: the address is no longer mapped).
    """

    def __init__(self, page_bytes: int = 4096, device: torch.device | str = "cpu"):
        if page_bytes <= 0 or page_bytes % 64:
            raise ValueError(f"page_bytes must be a positive multiple of 64, got {page_bytes}")
        super().__init__(page_bytes, device, poison=True)
        self._next_page = 0

    def _reserve(self, num_pages: int) -> VirtualRange:
        data = torch.empty(num_pages * self.page_bytes, dtype=torch.uint8, device=self.device)
        return VirtualRange(num_pages, self.page_bytes, data)

    def _release(self, vrange: VirtualRange) -> None:
        vrange.data = torch.empty(0, dtype=torch.uint8)

    def _create_page(self) -> int:
        self._next_page += 1
        return self._next_page - 1

    def _destroy_page(self, page: int) -> None:
        pass  # a number: nothing to free

    def _map(self, vrange: VirtualRange, index: int, page: int) -> None:
        pass  # the range's memory is always there; ownership lives in the base class

    def _unmap(self, vrange: VirtualRange, index: int) -> None:
        self._poison(vrange, index)


def make_backend(device: torch.device | str, page_bytes: int | None,
                 kind: str = "auto") -> PageBackend:
    """The page backend for a device. `kind` is one of KV_PAGE_BACKENDS: "auto" takes the CUDA
    VMM backend on a CUDA device where cuda-python is installed and the device supports VMM,
    and the simulated backend otherwise (with a warning on CUDA, since that one commits each
    model's whole range); "vmm" fails with the reason where VMM cannot be used."""
    if kind not in KV_PAGE_BACKENDS:
        raise ValueError(f"kv page backend: {kind!r} is not one of {', '.join(KV_PAGE_BACKENDS)}")
    device = torch.device(device)
    if kind == "vmm" and device.type != "cuda":
        raise ValueError(f"kv page backend 'vmm' needs a CUDA device, got {device}")
    if kind == "simulated" or device.type != "cuda":
        return SimulatedPageBackend(page_bytes or DEFAULT_PAGE_BYTES.get(device.type, 4096),
                                    device)
    from sglang_crosspool.memory.cuda_vmm import CudaVMMPageBackend, vmm_unavailable_reason

    reason = vmm_unavailable_reason(device)
    if reason is None:
        return CudaVMMPageBackend(page_bytes or DEFAULT_PAGE_BYTES["cuda"], device)
    if kind == "vmm":
        raise ValueError(f"kv page backend 'vmm': {reason}")
    log.warning("KV pages: %s; using the simulated page backend, which commits every model's "
                "whole KV range up front", reason)
    return SimulatedPageBackend(page_bytes or DEFAULT_PAGE_BYTES["cuda"], device)
