import pytest
import torch
from conftest import assert_close

pytest.importorskip("triton")

from crosspool_kernels.rope import apply_rope, apply_rope_ref

from sglang_crosspool.models.common import Rotary


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "rot", "dtype"), [
    (4, 2, 64, 64, torch.float32),  # full rotary, GQA
    (3, 3, 48, 32, torch.float32),  # partial rotary, odd head count
    (8, 1, 32, 32, torch.float16),
])
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_matches_reference(heads, kv_heads, head_dim, rot, dtype, inplace, device):
    tokens, max_pos = 9, 64
    tables = Rotary(rot, 10000.0, max_pos, device, dtype)
    q = torch.randn(tokens, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, max_pos, (tokens,), device=device)
    exp_q, exp_k = apply_rope_ref(q, k, positions, tables.cos, tables.sin)
    qi, ki = q.clone(), k.clone()
    out_q, out_k = apply_rope(qi, ki, positions, tables.cos, tables.sin, inplace=inplace)
    assert_close(out_q, exp_q, dtype)
    assert_close(out_k, exp_k, dtype)
    if inplace:
        assert out_q.data_ptr() == qi.data_ptr() and out_k.data_ptr() == ki.data_ptr()
    else:
        assert torch.equal(qi, q) and torch.equal(ki, k)
    if rot == head_dim:  # the engine's own rotary (full rotary only)
        assert_close(out_q, tables.apply(q, positions), dtype)
