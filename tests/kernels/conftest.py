"""Kernel tests run the Triton kernels under the interpreter on CPU (TRITON_INTERPRET=1).

NOTE: triton reads TRITON_INTERPRET when a function is decorated, its own helpers (tl.cdiv ...)
included, so it must be set before triton is first imported: run
`TRITON_INTERPRET=1 python -m pytest tests/kernels` (scripts/test.sh does). Without it on a
CPU-only machine, this file sets it if triton is not imported yet, else skips these tests.
"""

import os
import sys

import pytest
import torch

_SKIP_REASON = None
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        _SKIP_REASON = "CPU run without TRITON_INTERPRET=1 set before triton was imported"
    else:
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _needs_interpreter_or_gpu():
    if _SKIP_REASON:
        pytest.skip(_SKIP_REASON)


def _device():
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture
def device() -> str:
    return _device()


def make_paged_cache(ctx_lens, num_kv_heads, head_dim, block_tokens, dtype=torch.float32,
                     device="cpu", seed=0, spare_blocks=3):
    """Random K/V caches and a block table placing each sequence in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_tokens) for n in ctx_lens]
    total = sum(blocks) + spare_blocks
    shape = (total * block_tokens, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    perm = torch.randperm(total, generator=gen).tolist()
    width = max(max(blocks, default=1), 1)
    table = torch.zeros(len(ctx_lens), width, dtype=torch.int64)
    used = 0
    for i, nb in enumerate(blocks):
        table[i, :nb] = torch.tensor(perm[used : used + nb], dtype=torch.int64)
        used += nb
    return k, v, table.to(device)


def assert_close(actual, expected, dtype):
    tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)
