"""Page backends: one contract, run by both backends; the page reserve; picking a backend.

The CUDA VMM backend runs here against `FakeDriver`, a Python stand-in for cuda.bindings.driver
that keeps the driver's rules (sizes and addresses in whole granules, maps only inside a
reservation, one mapping per address). So its address arithmetic, error handling and the
bookkeeping it shares with the simulated backend are tested without a GPU; tests/gpu/
test_vmm_gpu.py runs it on the real driver.
"""

from __future__ import annotations

import enum
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from sglang_crosspool import Engine
from sglang_crosspool.config import RESERVE_BLOCKS, EngineConfig
from sglang_crosspool.memory import cuda_vmm
from sglang_crosspool.memory.kv_pool import KVPool, KVPoolError
from sglang_crosspool.memory.page_backend import (
    PagingError,
    SimulatedPageBackend,
    make_backend,
)

GRANULE = 2 << 20


class FakeDriver:
    """The VMM subset of cuda.bindings.driver: every call returns (CUresult, *values)."""

    class CUresult(enum.Enum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_INVALID_VALUE = 1
        CUDA_ERROR_OUT_OF_MEMORY = 2

    CUmemAllocationGranularity_flags = SimpleNamespace(CU_MEM_ALLOC_GRANULARITY_MINIMUM=0)
    CUmemAllocationType = SimpleNamespace(CU_MEM_ALLOCATION_TYPE_PINNED="pinned")
    CUmemLocationType = SimpleNamespace(CU_MEM_LOCATION_TYPE_DEVICE="device")
    CUmemAccess_flags = SimpleNamespace(CU_MEM_ACCESS_FLAGS_PROT_READWRITE="rw")

    def __init__(self):
        self.reserved: dict[int, int] = {}  # address -> size
        self.handles: set[int] = set()
        self.mappings: dict[int, list] = {}  # address -> [handle, accessible]
        self.failing: set[str] = set()  # calls that return an error
        self._next_va, self._next_handle = 1 << 40, 1

    @staticmethod
    def CUmemAllocationProp():
        return SimpleNamespace(location=SimpleNamespace())

    CUmemAccessDesc = CUmemAllocationProp

    def _result(self, call: str, ok: bool, *values):
        if call in self.failing:
            return (self.CUresult.CUDA_ERROR_OUT_OF_MEMORY,)
        return (self.CUresult.CUDA_SUCCESS if ok else self.CUresult.CUDA_ERROR_INVALID_VALUE,
                *values)

    def _inside_reservation(self, ptr: int) -> bool:
        return any(base <= ptr and ptr + GRANULE <= base + size
                   for base, size in self.reserved.items())

    def cuMemGetAllocationGranularity(self, prop, flag):
        ok = prop.type == "pinned" and prop.location.type == "device"
        return self._result("cuMemGetAllocationGranularity", ok, GRANULE)

    def cuMemAddressReserve(self, size, alignment, addr, flags):
        ok = size % GRANULE == 0 and alignment % GRANULE == 0 and addr == 0 and flags == 0
        ptr = self._next_va
        if ok:
            self.reserved[ptr] = size
            self._next_va += size + GRANULE
        return self._result("cuMemAddressReserve", ok, ptr)

    def cuMemAddressFree(self, ptr, size):
        ok = self.reserved.get(ptr) == size and not any(
            ptr <= a < ptr + size for a in self.mappings)
        if ok:
            del self.reserved[ptr]
        return self._result("cuMemAddressFree", ok)

    def cuMemCreate(self, size, prop, flags):
        handle = self._next_handle
        self._next_handle += 1
        result = self._result("cuMemCreate", size == GRANULE and flags == 0, handle)
        if result[0] == self.CUresult.CUDA_SUCCESS:
            self.handles.add(handle)
        return result

    def cuMemRelease(self, handle):
        ok = handle in self.handles
        self.handles.discard(handle)
        return self._result("cuMemRelease", ok)

    def cuMemMap(self, ptr, size, offset, handle, flags):
        ok = (size == GRANULE and offset == 0 and flags == 0 and ptr % GRANULE == 0
              and handle in self.handles and ptr not in self.mappings
              and self._inside_reservation(ptr))
        result = self._result("cuMemMap", ok)
        if result[0] == self.CUresult.CUDA_SUCCESS:
            self.mappings[ptr] = [handle, False]
        return result

    def cuMemSetAccess(self, ptr, size, descs, count):
        ok = (ptr in self.mappings and size == GRANULE and count == len(descs) == 1
              and descs[0].flags == "rw")
        result = self._result("cuMemSetAccess", ok)
        if result[0] == self.CUresult.CUDA_SUCCESS:
            self.mappings[ptr][1] = True
        return result

    def cuMemUnmap(self, ptr, size):
        ok = ptr in self.mappings and size == GRANULE
        self.mappings.pop(ptr, None)
        return self._result("cuMemUnmap", ok)


@pytest.fixture
def fake_driver(monkeypatch):
    """A FakeDriver behind cuda_vmm, with torch's CUDA calls made harmless on the CPU: a range's
    view is a plain CPU tensor of the size its __cuda_array_interface__ gives, and `drain`
    counts instead of synchronizing."""
    driver = FakeDriver()
    driver.drains = 0

    def as_tensor(obj, device):
        iface = obj.__cuda_array_interface__
        assert iface["data"] == (obj.ptr, False) and iface["typestr"] == "|u1"
        assert driver.mappings[obj.ptr][1]  # made while a scratch page is mapped there
        return torch.zeros(iface["shape"], dtype=torch.uint8)

    def synchronize(device=None):
        driver.drains += 1

    monkeypatch.setattr(cuda_vmm, "load_driver", lambda: driver)
    monkeypatch.setattr(cuda_vmm, "init_cuda", lambda drv, device: torch.device("cpu"))
    monkeypatch.setattr(torch, "as_tensor", as_tensor)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    return driver


def simulated():
    return SimulatedPageBackend(page_bytes=GRANULE)


def vmm():
    return cuda_vmm.CudaVMMPageBackend(page_bytes=GRANULE)


@pytest.fixture(params=["simulated", "vmm"])
def backend(request):
    if request.param == "vmm":
        request.getfixturevalue("fake_driver")
        return vmm()
    return simulated()


# -- the contract, the same bookkeeping code for both backends ------------------------------


def test_contract_is_enforced_by_both_backends(backend):
    vrange = backend.reserve(4)
    page = backend.create_page()
    backend.map(vrange, 0, page)
    with pytest.raises(PagingError, match="not free to map"):
        backend.map(vrange, 1, page)  # one physical page, one place
    with pytest.raises(PagingError, match="already mapped"):
        backend.map(vrange, 0, backend.create_page())
    with pytest.raises(PagingError, match="outside"):
        backend.map(vrange, 4, backend.create_page())
    with pytest.raises(PagingError, match="while it is mapped"):
        backend.destroy_page(page)
    with pytest.raises(PagingError, match="still mapped"):
        backend.release(vrange)
    assert backend.unmap(vrange, 0) == page
    with pytest.raises(PagingError, match="not mapped"):
        backend.unmap(vrange, 0)
    backend.destroy_page(page)
    with pytest.raises(PagingError, match="not live"):
        backend.destroy_page(page)
    backend.release(vrange)
    assert (backend.create_calls, backend.destroy_calls) == (3, 1)
    assert (backend.map_calls, backend.unmap_calls) == (1, 1)
    assert backend.live_pages == 2


def test_pool_over_either_backend_keeps_the_same_accounting(backend):
    pool = KVPool(backend, total_pages=16, reserve_pages=4)
    pool.add_model("m", num_layers=2, kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                   max_tokens=4096)  # 2 KiB a slot: 1024 tokens a block, 4 pages a block
    blocks = pool.alloc_blocks("m", 3)
    assert pool.used_pages == 12 and backend.create_calls == 12  # 4 reserved up front + 8
    pool.free_blocks("m", blocks[:2])
    assert pool.used_pages == 4 and pool.stats()["spare_pages"] == 4
    assert backend.destroy_calls == 4 and backend.live_pages == 8
    pool.free_blocks("m", blocks[2:])
    assert pool.used_pages == 0 and backend.live_pages == 4


# -- the CUDA VMM backend's own code, on FakeDriver ---------------------------------------


def test_vmm_maps_each_block_at_its_offset_with_access_and_unmaps_all(fake_driver):
    backend = vmm()
    pool = KVPool(backend, total_pages=40)
    kv = pool.add_model("m", num_layers=2, kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                        max_tokens=4096)
    # Nothing committed but the one shared guard page, mapped under block 0 of all 4 ranges.
    assert len(fake_driver.reserved) == 4 and len(fake_driver.handles) == 1
    assert all(size == (4 + 1) * GRANULE for size in fake_driver.reserved.values())
    bases = {r.backing.ptr for r in kv.k_ranges + kv.v_ranges}
    assert bases == set(fake_driver.mappings)
    pool.alloc_blocks("m", 1)
    [b] = pool.alloc_blocks("m", 1)
    expected = {r.backing.ptr + b * GRANULE for r in kv.k_ranges + kv.v_ranges}
    assert expected <= set(fake_driver.mappings) and len(fake_driver.mappings) == 4 + 8
    assert all(accessible for _, accessible in fake_driver.mappings.values())
    pool.free_blocks("m", [b])
    assert fake_driver.drains == 1  # once before the unmaps, not once a page
    assert expected.isdisjoint(fake_driver.mappings) and len(fake_driver.handles) == 1 + 4
    assert bases <= set(fake_driver.mappings)
    for vrange in kv.k_ranges:
        with pytest.raises(PagingError, match="still mapped"):
            backend.release(vrange)


def test_vmm_releases_ranges_and_pages_back_to_the_driver(fake_driver):
    backend = vmm()
    vrange = backend.reserve(3)
    pages = [backend.create_page() for _ in range(2)]
    backend.map(vrange, 2, pages[0])
    backend.unmap(vrange, 2)
    for page in pages:
        backend.destroy_page(page)
    backend.release(vrange)
    assert not fake_driver.reserved and not fake_driver.handles and not fake_driver.mappings
    assert vrange.backing is None and vrange.data.numel() == 0


def test_vmm_driver_errors_name_the_call_and_leave_no_half_mapping(fake_driver):
    backend = vmm()
    vrange = backend.reserve(2)
    page = backend.create_page()
    fake_driver.failing = {"cuMemSetAccess"}
    with pytest.raises(PagingError, match="cuMemSetAccess failed: CUDA_ERROR_OUT_OF_MEMORY"):
        backend.map(vrange, 0, page)
    assert not fake_driver.mappings and not vrange.mapped  # the cuMemMap was undone
    fake_driver.failing = {"cuMemCreate"}
    with pytest.raises(PagingError, match="cuMemCreate failed"):
        backend.create_page()
    fake_driver.failing = set()
    backend.map(vrange, 0, page)  # the page is still free to map
    assert backend.live_pages == 1 and len(fake_driver.mappings) == 1


def test_vmm_page_size_must_be_whole_granules(fake_driver):
    with pytest.raises(ValueError, match="granularity"):
        cuda_vmm.CudaVMMPageBackend(page_bytes=4096)
    assert cuda_vmm.CudaVMMPageBackend(page_bytes=3 * GRANULE).page_bytes == 3 * GRANULE


def test_check_page_bytes_and_check():
    cuda_vmm.check_page_bytes(4 * GRANULE, GRANULE)
    for bad in (0, -GRANULE, GRANULE // 2, GRANULE + 4096):
        with pytest.raises(ValueError, match=f"{GRANULE} bytes"):
            cuda_vmm.check_page_bytes(bad, GRANULE)
    ok, err = FakeDriver.CUresult.CUDA_SUCCESS, FakeDriver.CUresult.CUDA_ERROR_INVALID_VALUE
    assert cuda_vmm.check(FakeDriver, "cuMemCreate", (ok, 7)) == 7
    assert cuda_vmm.check(FakeDriver, "cuMemGetInfo", (ok, 1, 2)) == (1, 2)
    assert cuda_vmm.check(FakeDriver, "cuInit", (ok,)) == ()
    with pytest.raises(PagingError, match="cuMemMap failed: CUDA_ERROR_INVALID_VALUE"):
        cuda_vmm.check(FakeDriver, "cuMemMap", (err,))


def test_device_span_describes_the_range_as_flat_bytes():
    iface = cuda_vmm.DeviceSpan(0x7F0000000000, 6 * GRANULE).__cuda_array_interface__
    assert iface == {"version": 3, "shape": (6 * GRANULE,), "typestr": "|u1",
                     "data": (0x7F0000000000, False), "strides": None, "stream": None}


# -- the page reserve ---------------------------------------------------------------------


def make_pool(reserve: int, total_pages: int = 40) -> KVPool:
    pool = KVPool(SimulatedPageBackend(page_bytes=1024), total_pages, reserve_pages=reserve)
    pool.add_model("a", num_layers=2, kv_heads=2, head_dim=16, dtype=torch.float32,
                   max_tokens=100)  # 4 pages a block
    pool.add_model("b", num_layers=3, kv_heads=1, head_dim=16, dtype=torch.float32,
                   max_tokens=64)  # 6 pages a block
    return pool


def test_reserved_pages_are_mapped_before_new_ones_are_created():
    pool = make_pool(reserve=4)
    backend = pool.backend
    assert backend.create_calls == 4 and pool.used_pages == 0  # created, not in use
    blocks = pool.alloc_blocks("a", 1)
    assert backend.create_calls == 4  # all four from the reserve
    pool.free_blocks("a", blocks)
    assert pool.stats()["spare_pages"] == 4 and backend.destroy_calls == 0
    blocks = pool.alloc_blocks("a", 2)  # 8 pages: 4 reused, 4 created
    assert backend.create_calls == 8
    pool.free_blocks("a", blocks)  # 4 refill the reserve, 4 are destroyed
    assert backend.destroy_calls == 4 and backend.live_pages == 4


def test_a_reserve_changes_no_accounting():
    def run(pool):
        rng = random.Random(0)
        held, seen = {"a": [], "b": []}, []
        for _ in range(200):
            model = rng.choice("ab")
            if held[model] and rng.random() < 0.45:
                pool.free_blocks(model, [held[model].pop(rng.randrange(len(held[model])))])
            else:
                held[model] += pool.alloc_blocks(model, rng.randint(1, 2)) or []
            stats = pool.stats()
            del stats["spare_pages"]
            seen.append(stats)
            backend = pool.backend
            assert backend.live_pages == pool.used_pages + pool.stats()["spare_pages"]
            assert backend.live_pages <= pool.total_pages
        return seen

    assert run(make_pool(reserve=0)) == run(make_pool(reserve=10))


def test_refill_tops_the_reserve_up_within_the_budget():
    pool = make_pool(reserve=8, total_pages=20)
    assert pool.refill() == 0  # full since start-up
    held = pool.alloc_blocks("b", 2)  # 12 pages: the 8 reserved + 4 new
    assert pool.stats()["spare_pages"] == 0
    assert pool.refill() == 8 and pool.backend.live_pages == 20
    pool.alloc_blocks("a", 2)  # 8 pages, all from the reserve
    assert pool.refill() == 0  # the budget is all mapped: nothing more may be created
    pool.free_blocks("b", held)
    assert pool.stats()["spare_pages"] == 8 and pool.backend.live_pages == 16


def test_reserve_is_capped_by_the_budget_and_never_negative():
    assert make_pool(reserve=100, total_pages=12).backend.live_pages == 12
    with pytest.raises(KVPoolError, match="negative"):
        make_pool(reserve=-1)


# -- picking a backend ----------------------------------------------------------------------


def test_make_backend_on_cpu():
    assert isinstance(make_backend(torch.device("cpu"), None), SimulatedPageBackend)
    assert make_backend("cpu", None, "simulated").page_bytes == 4096
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_backend("cpu", None, "vmm")
    with pytest.raises(ValueError, match="not one of"):
        make_backend("cpu", None, "mmap")


def test_make_backend_on_cuda_without_cuda_python(monkeypatch, caplog):
    monkeypatch.setattr(cuda_vmm, "load_driver", lambda: None)
    with caplog.at_level(logging.WARNING, "sglang_crosspool.memory"):
        backend = make_backend(torch.device("cuda"), None)
    assert isinstance(backend, SimulatedPageBackend) and backend.page_bytes == GRANULE
    assert "cuda.bindings" in caplog.text and "simulated" in caplog.text
    with pytest.raises(ValueError, match="cuda-python"):
        make_backend(torch.device("cuda"), None, "vmm")


def test_make_backend_takes_vmm_where_the_device_supports_it(fake_driver, monkeypatch):
    monkeypatch.setattr(cuda_vmm, "vmm_unavailable_reason", lambda device: None)
    assert isinstance(make_backend(torch.device("cuda"), None),
                      cuda_vmm.CudaVMMPageBackend)
    monkeypatch.setattr(cuda_vmm, "vmm_unavailable_reason", lambda device: "no VMM here")
    with pytest.raises(ValueError, match="no VMM here"):
        make_backend(torch.device("cuda"), None, "vmm")


# -- the engine's options -----------------------------------------------------------------


def test_engine_config_resolves_the_page_backend_and_reserve(tiny_models):
    path = tiny_models["qwen3_moe"]
    assert EngineConfig.build(path).kv_reserve_pages == 0  # CPU default
    cfg = EngineConfig.build(path, device="cuda", kv_page_backend="vmm")
    layers = cfg.models[0].spec.num_layers
    assert cfg.kv_page_backend == "vmm" and cfg.kv_reserve_pages == RESERVE_BLOCKS * 2 * layers
    assert EngineConfig.build(path, kv_reserve_pages=5).kv_reserve_pages == 5
    with pytest.raises(ValueError, match="kv_reserve_pages"):
        EngineConfig.build(path, kv_reserve_pages=-1)
    with pytest.raises(ValueError, match="kv_page_backend"):
        EngineConfig.build(path, kv_page_backend="mmap")


def test_engine_with_a_reserve_generates_the_same_tokens(tiny_models):
    params = {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}
    prompts = [list(range(i * 10 + 1, i * 10 + 12)) for i in range(4)]
    outputs = {}
    for reserve in (0, 6):
        engine = Engine(tiny_models["qwen3_moe"], kv_pages=40, kv_reserve_pages=reserve,
                        kv_page_backend="simulated")
        outputs[reserve] = [o["output_ids"] for o in
                            engine.generate(input_ids=prompts, sampling_params=params)]
        pool = engine.core.kv_pool
        assert pool.reserve_pages == reserve and pool.used_pages == 0
        assert pool.stats()["spare_pages"] == reserve  # refilled by the frees
    assert outputs[0] == outputs[6]


def test_block_zero_is_the_guard_never_allocated():
    backend = SimulatedPageBackend(page_bytes=4096)
    pool = KVPool(backend, total_pages=64)
    kv = pool.add_model("m", num_layers=2, kv_heads=2, head_dim=16, dtype=torch.float32,
                        max_tokens=8 * 32)  # 32 tokens a block
    assert kv.num_blocks == 8 and pool.max_blocks("m") == 8
    blocks = pool.alloc_blocks("m", 8)
    assert sorted(blocks) == list(range(1, 9)) and pool.alloc_blocks("m", 1) is None
    assert all(r.mapped[0] == "guard" for r in kv.k_ranges + kv.v_ranges)
    assert backend.live_pages == 8 * 4  # the guard page is not counted
    pool.free_blocks("m", blocks)
    assert all(list(r.mapped) == [0] for r in kv.k_ranges + kv.v_ranges)
