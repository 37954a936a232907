import pytest
import torch

pytest.importorskip("triton")

from crosspool_kernels.store_kv import store_kv, store_kv_ref


@pytest.mark.parametrize(("tokens", "kv_heads", "head_dim", "dtype"), [
    (7, 2, 64, torch.float32), (5, 1, 80, torch.float16), (3, 3, 16, torch.float32),
])
def test_store_kv_matches_reference(tokens, kv_heads, head_dim, dtype, device):
    slots = 40
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    slot_mapping = torch.randperm(slots, device=device)[:tokens]
    slot_mapping[-1] = -1  # a padding token writes nothing
    caches = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slot_mapping)
    store_kv_ref(k, v, caches[2], caches[3], slot_mapping)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0][slot_mapping[0]], k[0])


def test_store_kv_strided_input(device):
    # k and v as views into one fused qkv projection output.
    qkv = torch.randn(6, 4 + 2 + 2, 32, device=device)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    kc, vc = torch.zeros(16, 2, 32, device=device), torch.zeros(16, 2, 32, device=device)
    slot_mapping = torch.tensor([3, 4, 5, 9, 10, 11], device=device)
    store_kv(k, v, kc, vc, slot_mapping)
    assert torch.equal(kc[slot_mapping], k) and torch.equal(vc[slot_mapping], v)
