"""CUDA VMM page backend: KV ranges are reserved device addresses, pages are driver allocations.

    reserve       cuMemAddressReserve (address space only: nothing is committed)
    create_page   cuMemCreate (one pinned page of device memory)
    map           cuMemMap + cuMemSetAccess (read/write for the device) at index * page_bytes
    unmap         cuMemUnmap
    destroy_page  cuMemRelease
    release       cuMemAddressFree

The contract checks and counters are PageBackend's: the same code CI runs with the simulated
backend. A range's `data` is a uint8 CUDA tensor over the whole reserved range, built through
`__cuda_array_interface__`; it does not own the memory. Pages mapped here are outside torch's
caching allocator, so `torch.cuda.memory_allocated` does not count them. cuda-python
(`cuda.bindings`, package cuda-bindings) is imported on first use: importing this module never
needs CUDA.
"""

from __future__ import annotations

import torch

from sglang_crosspool.memory.page_backend import PageBackend, PagingError, VirtualRange


def load_driver():
    """cuda-python's driver module, or None where cuda-python is not installed."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # the name before cuda-python 12.6
        except ImportError:
            return None
    return driver


def check(driver, call: str, result):
    """The values of a driver call's `(CUresult, *values)`; PagingError naming the call and the
    error where it failed."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise PagingError(f"{call} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values)


def check_page_bytes(page_bytes: int, granularity: int) -> None:
    """VMM maps whole allocation granules (2 MiB on Hopper); a page must be a multiple."""
    if page_bytes <= 0 or page_bytes % granularity:
        raise ValueError(f"page_bytes must be a positive multiple of the device's VMM allocation "
                         f"granularity ({granularity} bytes), got {page_bytes}")


def vmm_unavailable_reason(device: torch.device) -> str | None:
    """Why the VMM backend cannot serve the CUDA `device`, or None where it can."""
    driver = load_driver()
    if driver is None:
        return "cuda-python (cuda.bindings) is not installed"
    attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
    try:
        device = init_cuda(driver, device)
        cu_device = check(driver, "cuDeviceGet", driver.cuDeviceGet(device.index))
        supported = check(driver, "cuDeviceGetAttribute",
                          driver.cuDeviceGetAttribute(attr, cu_device))
    except Exception as e:  # noqa: BLE001 - any failure to reach the driver means: fall back
        return f"the CUDA driver cannot be used through cuda-python ({e})"
    return None if supported else f"{device} does not support virtual memory management"


def init_cuda(driver, device: torch.device) -> torch.device:
    """The device with its index, once torch has made its CUDA context and the driver API is
    initialised (the VMM calls then act on the same device memory torch uses)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    device = torch.device("cuda", index)
    torch.cuda.init()
    torch.empty(1, device=device)  # creates torch's (primary) context on that device
    check(driver, "cuInit", driver.cuInit(0))
    return device


def allocation_prop(driver, index: int):
    """cuMemCreate's properties: pinned memory on device `index`, not shareable."""
    prop = driver.CUmemAllocationProp()
    prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = index
    return prop


def access_desc(driver, index: int):
    """cuMemSetAccess's descriptor: read/write for device `index`."""
    desc = driver.CUmemAccessDesc()
    desc.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = index
    desc.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return desc


class DeviceSpan:
    """A reserved device address range, described to torch as a flat uint8 CUDA array.

    torch.as_tensor keeps a reference to this object for as long as a view exists; it owns
    nothing itself (the backend frees the addresses in `release`)."""

    def __init__(self, ptr: int, nbytes: int):
        self.ptr = ptr
        self.nbytes = nbytes

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"version": 3, "shape": (self.nbytes,), "typestr": "|u1",
                "data": (self.ptr, False), "strides": None, "stream": None}


class CudaVMMPageBackend(PageBackend):
    """Pages are cuMemCreate handles (as ints); a range's `backing` is its DeviceSpan.

    `poison=True` fills each page with NaN bytes when it is mapped (an async fill on the
    current stream); off by default, since it costs a kernel per page. Reading a page after it
    is unmapped faults (illegal address) rather than reading stale values.
    """

    def __init__(self, page_bytes: int = 2 << 20, device: torch.device | str = "cuda",
                 poison: bool = False):
        driver = load_driver()
        if driver is None:
            raise PagingError("the CUDA VMM page backend needs cuda-python "
                              "(pip install cuda-bindings)")
        device = init_cuda(driver, torch.device(device))
        self._driver = driver
        self._prop = allocation_prop(driver, device.index)
        self._access = [access_desc(driver, device.index)]
        minimum = driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        self.granularity = self._check("cuMemGetAllocationGranularity",
                                       driver.cuMemGetAllocationGranularity(self._prop, minimum))
        check_page_bytes(page_bytes, self.granularity)
        super().__init__(page_bytes, device, poison)

    def drain(self) -> None:
        # NOTE: cuMemUnmap does not wait for kernels still reading the page.
        torch.cuda.synchronize(self.device)

    def _check(self, call: str, result):
        return check(self._driver, call, result)

    def _reserve(self, num_pages: int) -> VirtualRange:
        nbytes = num_pages * self.page_bytes
        ptr = self._check("cuMemAddressReserve",
                          self._driver.cuMemAddressReserve(nbytes, self.granularity, 0, 0))
        span = DeviceSpan(int(ptr), nbytes)
        try:
            data = self._view(span)
        except Exception:
            self._driver.cuMemAddressFree(span.ptr, nbytes)
            raise
        return VirtualRange(num_pages, self.page_bytes, data, backing=span)

    def _view(self, span: DeviceSpan) -> torch.Tensor:
        """The uint8 tensor over a span. NOTE: torch versions that do not take the device from
        `device=` ask the driver which device owns the span's first address, which fails while
        nothing is mapped there; so a scratch page is mapped at the start meanwhile."""
        page = self._create_page()
        try:
            self._map_at(span.ptr, page)
            try:
                return torch.as_tensor(span, device=self.device)
            finally:
                self._unmap_at(span.ptr)
        finally:
            self._destroy_page(page)

    def _release(self, vrange: VirtualRange) -> None:
        span = vrange.backing
        vrange.data = torch.empty(0, dtype=torch.uint8, device=self.device)
        vrange.backing = None
        self._check("cuMemAddressFree", self._driver.cuMemAddressFree(span.ptr, span.nbytes))

    def _create_page(self) -> int:
        handle = self._check("cuMemCreate",
                             self._driver.cuMemCreate(self.page_bytes, self._prop, 0))
        return int(handle)

    def _destroy_page(self, page: int) -> None:
        self._check("cuMemRelease", self._driver.cuMemRelease(page))

    def _map(self, vrange: VirtualRange, index: int, page: int) -> None:
        self._map_at(vrange.backing.ptr + index * self.page_bytes, page)

    def _unmap(self, vrange: VirtualRange, index: int) -> None:
        self._unmap_at(vrange.backing.ptr + index * self.page_bytes)

    def _map_at(self, ptr: int, page: int) -> None:
        self._check("cuMemMap", self._driver.cuMemMap(ptr, self.page_bytes, 0, page, 0))
        try:
            self._check("cuMemSetAccess", self._driver.cuMemSetAccess(
                ptr, self.page_bytes, self._access, len(self._access)))
        except PagingError:
            self._driver.cuMemUnmap(ptr, self.page_bytes)
            raise

    def _unmap_at(self, ptr: int) -> None:
        self._check("cuMemUnmap", self._driver.cuMemUnmap(ptr, self.page_bytes))
