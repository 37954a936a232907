"""Option values shared by the engine config, the launcher and the planner (no torch import)."""

POOL_MODES = ("static", "monolithic", "crosspool")
# auto: p2p when crosspool's FFN servers sit on another GPU than attention, else local
FFN_TRANSPORTS = ("auto", "local", "p2p", "shm", "cuda-ipc", "dist", "nccl")
KV_PAGE_BACKENDS = ("auto", "vmm", "simulated")  # auto: CUDA VMM where supported
# auto: torch on CPU; on CUDA flashinfer where it imports, else triton (engine/attention.py)
ATTENTION_BACKENDS = ("auto", "flashinfer", "triton", "torch")
# KV page size per device type; CUDA: the VMM granularity.
DEFAULT_PAGE_BYTES = {"cpu": 4096, "cuda": 2 << 20}
# Constrained decoding (regex, JSON schema, EBNF); none: such requests are refused (400).
GRAMMAR_BACKENDS = ("xgrammar", "none")
# The small-batch MoE path (grouped GEMVs over the chosen experts) at <= 8 tokens; auto: on
# CUDA; on: wherever Triton runs (the CPU interpreter, for tests); off: the fused-MoE GEMM.
MOE_SMALL_BATCH = ("auto", "on", "off")
# How one model's attention spreads over several ranks' KV pools (issue 16): none; seq: each
# request's KV pages over every rank, partials merged by log-sum-exp; head: KV heads divided
# (tensor parallelism of attention, as --tp-size).
ATTENTION_SPLITS = ("none", "seq", "head")
