"""Cost of the CUDA VMM page operations, and of KV block alloc/free over them (GPU only).

    PYTHONPATH=$PWD:$PWD/scheduler:$PWD/kernels python benchmark/vmm_bench.py --out vmm.json

Times in microseconds, median and p90 over many repetitions (after a few discarded warm-up
ones): the raw driver calls on one 2 MiB page (cuMemCreate, cuMemMap + cuMemSetAccess,
cuMemUnmap, cuMemRelease, each through cuda.bindings as the backend calls them), and
KVPool.alloc_blocks / free_blocks of one block of a 48-layer model (96 pages a block) with no
page reserve and with a reserve that covers the block. Prints a table and writes JSON; the
whole run takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sglang_crosspool.memory.cuda_vmm import (
    CudaVMMPageBackend,
    access_desc,
    allocation_prop,
    check,
    load_driver,
)
from sglang_crosspool.memory.kv_pool import KVPool

PAGE_BYTES = 2 << 20
LAYERS = 48
PAGES_PER_BLOCK = 2 * LAYERS  # a K and a V page per layer
WARMUP = 5


def summary(samples_ns: list[int]) -> dict:
    us = [s / 1000 for s in samples_ns[WARMUP:]]
    return {"median_us": round(statistics.median(us), 2),
            "p90_us": round(statistics.quantiles(us, n=10)[-1], 2), "n": len(us)}


def driver_calls(device: torch.device, reps: int) -> dict:
    """Each repetition creates a page, maps it at a fresh offset, unmaps and releases it."""
    driver = load_driver()
    backend = CudaVMMPageBackend(PAGE_BYTES, device)  # initialises CUDA on the device
    granularity, index = backend.granularity, backend.device.index
    prop, access = allocation_prop(driver, index), [access_desc(driver, index)]
    nbytes = (reps + WARMUP) * PAGE_BYTES
    base = int(check(driver, "cuMemAddressReserve",
                     driver.cuMemAddressReserve(nbytes, granularity, 0, 0)))
    names = ("cuMemCreate", "cuMemMap+cuMemSetAccess", "cuMemUnmap", "cuMemRelease")
    samples: dict[str, list[int]] = {name: [] for name in names}
    for i in range(reps + WARMUP):
        ptr = base + i * PAGE_BYTES
        t0 = time.perf_counter_ns()
        handle = check(driver, "cuMemCreate", driver.cuMemCreate(PAGE_BYTES, prop, 0))
        t1 = time.perf_counter_ns()
        check(driver, "cuMemMap", driver.cuMemMap(ptr, PAGE_BYTES, 0, handle, 0))
        check(driver, "cuMemSetAccess", driver.cuMemSetAccess(ptr, PAGE_BYTES, access, 1))
        t2 = time.perf_counter_ns()
        check(driver, "cuMemUnmap", driver.cuMemUnmap(ptr, PAGE_BYTES))
        t3 = time.perf_counter_ns()
        check(driver, "cuMemRelease", driver.cuMemRelease(handle))
        t4 = time.perf_counter_ns()
        for name, start, end in zip(names, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            samples[name].append(end - start)
    check(driver, "cuMemAddressFree", driver.cuMemAddressFree(base, nbytes))
    return {name: summary(s) for name, s in samples.items()}


def pool_ops(device: torch.device, reps: int, reserve_pages: int) -> dict:
    """alloc_blocks / free_blocks of one block of a 48-layer bf16 model (8 KV heads x 128)."""
    backend = CudaVMMPageBackend(PAGE_BYTES, device)
    pool = KVPool(backend, total_pages=4 * PAGES_PER_BLOCK, reserve_pages=reserve_pages)
    kv = pool.add_model("m", LAYERS, kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                        max_tokens=4 * 1024)  # 2 KiB a slot: 1024 tokens a block
    assert kv.pages_per_block == PAGES_PER_BLOCK
    alloc, free = [], []
    for _ in range(reps + WARMUP):
        t0 = time.perf_counter_ns()
        blocks = pool.alloc_blocks("m", 1)
        t1 = time.perf_counter_ns()
        pool.free_blocks("m", blocks)
        t2 = time.perf_counter_ns()
        alloc.append(t1 - t0)
        free.append(t2 - t1)
    for vrange in kv.k_ranges + kv.v_ranges:
        backend.release(vrange)
    return {"alloc_blocks": summary(alloc), "free_blocks": summary(free),
            "create_calls": backend.create_calls, "destroy_calls": backend.destroy_calls}


def table(result: dict) -> str:
    rows = [(name, t) for name, t in result["driver_calls"].items()]
    for reserve, ops in result["kv_pool"].items():
        for op in ("alloc_blocks", "free_blocks"):
            rows.append((f"KVPool.{op} (1 block, {PAGES_PER_BLOCK} pages), {reserve}", ops[op]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'operation':<{width}}  {'median us':>10}  {'p90 us':>10}"]
    lines += [f"{name:<{width}}  {t['median_us']:>10.1f}  {t['p90_us']:>10.1f}"
              for name, t in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=1000, help="repetitions of the driver calls")
    parser.add_argument("--pool-reps", type=int, default=50,
                        help="repetitions of each KVPool alloc/free")
    args = parser.parse_args()
    device = torch.device(args.device)
    driver = load_driver()
    if not torch.cuda.is_available() or driver is None:
        raise SystemExit("vmm_bench needs a CUDA GPU and cuda-python (cuda.bindings)")
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda_driver": check(driver, "cuDriverGetVersion", driver.cuDriverGetVersion()),
        "page_bytes": PAGE_BYTES, "layers": LAYERS, "pages_per_block": PAGES_PER_BLOCK,
        "driver_calls": driver_calls(device, args.reps),
        "kv_pool": {f"reserve {reserve}": pool_ops(device, args.pool_reps, reserve)
                    for reserve in (0, PAGES_PER_BLOCK)},
    }
    print(table(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
