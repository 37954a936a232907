"""The CUDA VMM page backend on a real GPU and driver (cuda.bindings).

Marked `gpu`; skipped without CUDA, without cuda-python, or where the device has no VMM.
Checks what the CPU tests cannot: reserving commits no device memory, created pages do (and
outside torch's allocator), the torch view reads and writes mapped pages, a physical page
keeps its bytes when it is mapped at another address, and a KVPool runs over the backend.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from sglang_crosspool.memory import cuda_vmm  # noqa: E402
from sglang_crosspool.memory.kv_pool import KVPool  # noqa: E402
from sglang_crosspool.memory.page_backend import PagingError  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())
MIB = 1 << 20
_REASON = cuda_vmm.vmm_unavailable_reason(DEV)
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)


def _free_bytes() -> int:
    torch.cuda.synchronize(DEV)
    return torch.cuda.mem_get_info(DEV)[0]


def _unmap_all(backend, vrange) -> list:
    backend.drain()
    return [backend.unmap(vrange, index) for index in list(vrange.mapped)]


def test_reserve_commits_nothing_and_pages_commit_outside_torch():
    backend = cuda_vmm.CudaVMMPageBackend(device=DEV)
    page = backend.page_bytes
    assert page % backend.granularity == 0
    allocated, free = torch.cuda.memory_allocated(DEV), _free_bytes()
    vrange = backend.reserve(512)  # 1 GiB of addresses with 2 MiB pages
    assert vrange.data.device == DEV and vrange.data.numel() == 512 * page
    assert vrange.data.data_ptr() == vrange.backing.ptr
    assert abs(free - _free_bytes()) <= 4 * MIB  # addresses only
    pages = [backend.create_page() for _ in range(32)]
    for index, p in enumerate(pages):
        backend.map(vrange, index * 7, p)
    drop = free - _free_bytes()
    assert 32 * page - 4 * MIB <= drop <= 32 * page + 16 * MIB, drop
    assert torch.cuda.memory_allocated(DEV) == allocated  # not torch's memory
    for p in _unmap_all(backend, vrange):
        backend.destroy_page(p)
    backend.release(vrange)
    assert abs(free - _free_bytes()) <= 8 * MIB  # all of it given back


def test_view_reads_and_writes_mapped_pages_and_a_page_keeps_its_bytes_when_remapped():
    backend = cuda_vmm.CudaVMMPageBackend(device=DEV)
    vrange = backend.reserve(4)
    rows = vrange.view(torch.float32, 4, backend.page_bytes // 4)
    a, b = backend.create_page(), backend.create_page()
    backend.map(vrange, 1, a)
    rows[1].fill_(1.5)
    assert bool((rows[1] == 1.5).all())
    backend.drain()
    assert backend.unmap(vrange, 1) == a
    backend.map(vrange, 3, a)  # the same physical page, another address
    backend.map(vrange, 1, b)
    rows[1].fill_(-2.0)
    assert bool((rows[3] == 1.5).all()) and bool((rows[1] == -2.0).all())
    with pytest.raises(PagingError):
        backend.map(vrange, 2, a)  # still mapped at 3
    for p in _unmap_all(backend, vrange):
        backend.destroy_page(p)
    backend.release(vrange)


def test_poison_makes_fresh_pages_read_nan():
    backend = cuda_vmm.CudaVMMPageBackend(device=DEV, poison=True)
    vrange = backend.reserve(2)
    page = backend.create_page()
    backend.map(vrange, 0, page)
    half = vrange.view(torch.bfloat16, 2, backend.page_bytes // 2)
    assert bool(torch.isnan(half[0]).all())
    _unmap_all(backend, vrange)
    backend.destroy_page(page)
    backend.release(vrange)


def test_kv_pool_over_vmm_allocates_frees_and_keeps_its_reserve():
    backend = cuda_vmm.CudaVMMPageBackend(device=DEV)
    pool = KVPool(backend, total_pages=64, reserve_pages=8)
    # bf16, 8 kv heads x 128: 2 KiB a slot, 1024 tokens a 2 MiB block; 4 layers: 8 pages.
    kv = pool.add_model("m", num_layers=4, kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                        max_tokens=16 * 1024)
    t = kv.block_tokens
    blocks = pool.alloc_blocks("m", 3)
    assert backend.create_calls == 8 + 16  # the reserve, then two blocks' worth
    for i, b in enumerate(blocks):
        slots = torch.arange(b * t, (b + 1) * t, device=DEV)
        for layer in range(4):
            kv.k[layer][slots] = float(i + 1)
            kv.v[layer].index_fill_(0, slots, -float(i + 1))
    pool.free_blocks("m", blocks[:2])
    last = torch.arange(blocks[2] * t, (blocks[2] + 1) * t, device=DEV)
    assert bool((kv.k[3][last] == 3.0).all()) and bool((kv.v[0][last] == -3.0).all())
    again = pool.alloc_blocks("m", 2)
    assert backend.create_calls == 8 + 16 + 8  # 8 from the reserve the frees refilled
    for b in again:
        slots = torch.arange(b * t, (b + 1) * t, device=DEV)
        kv.k[0][slots] = 7.0
        assert bool((kv.k[0][slots] == 7.0).all())
    pool.free_blocks("m", again + blocks[2:])
    assert pool.used_pages == 0 and backend.live_pages == 8
    for vrange in kv.k_ranges + kv.v_ranges:
        backend.unmap(vrange, 0)  # the shared guard page under block 0
        backend.release(vrange)
