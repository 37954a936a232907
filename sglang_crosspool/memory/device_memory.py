"""What an attention worker holds on its device, as the allocator and the KV pool count it.

The planner's figures are checked against these on the GPU: tensors (weights, CUDA graphs'
and workspace buffers), what the caching allocator reserved, KV pages mapped (in use and
spare; VMM pages live outside the allocator), and the whole device's used bytes (every
process on it, contexts included). On CPU only the KV figure exists; the others are None.
Read at most once a second: stats are taken every step.
"""

from __future__ import annotations

import time

import torch

REFRESH_S = 1.0


class DeviceMemory:
    def __init__(self, device: str, kv_pool):
        self.device = torch.device(device)
        self.kv_pool = kv_pool
        self._last: dict | None = None
        self._at = 0.0

    def read(self) -> dict:
        now = time.monotonic()
        if self._last is None or now - self._at >= REFRESH_S:
            self._last, self._at = self._measure(), now
        return self._last

    def _measure(self) -> dict:
        kv = self.kv_pool.stats()
        mapped = (kv["used_pages"] + kv["spare_pages"]) * kv["page_bytes"]
        if self.device.type != "cuda":
            return {"allocated_bytes": None, "reserved_bytes": None, "kv_mapped_bytes": mapped,
                    "device_used_bytes": None}
        free, total = torch.cuda.mem_get_info(self.device)
        return {"allocated_bytes": torch.cuda.memory_allocated(self.device),
                "reserved_bytes": torch.cuda.memory_reserved(self.device),
                "kv_mapped_bytes": mapped, "device_used_bytes": total - free}
