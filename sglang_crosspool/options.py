"""Option values shared by the engine config, the launcher and the planner (no torch import)."""

POOL_MODES = ("static", "monolithic", "crosspool")
FFN_TRANSPORTS = ("local", "shm", "dist")
# KV page size per device type; CUDA: the VMM granularity.
DEFAULT_PAGE_BYTES = {"cpu": 4096, "cuda": 2 << 20}
