import pytest
import torch
from conftest import assert_close

pytest.importorskip("triton")

from crosspool_kernels.fused_moe import (
    fused_moe,
    fused_moe_ref,
    moe_align,
    moe_align_torch,
)

SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}


def _inputs(tokens, experts, top_k, hidden, inter, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    probs = torch.randn(tokens, experts, generator=gen).softmax(-1)
    weights, ids = torch.topk(probs, top_k)
    return [t.to(device=device, dtype=dtype) for t in (h, w13, w2, weights)] + [ids.to(device)]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter", "dtype"), [
    (1, 8, 2, 64, 32, torch.float32),  # decode
    (37, 6, 3, 48, 40, torch.float32),  # several blocks per expert, sizes not powers of two
    (9, 4, 2, 32, 16, torch.float16),
])
def test_fused_moe_matches_reference(tokens, experts, top_k, hidden, inter, dtype, device):
    h, w13, w2, weights, ids = _inputs(tokens, experts, top_k, hidden, inter, dtype, device)
    out = fused_moe(h, w13, w2, weights, ids, config=SMALL)
    assert out.shape == h.shape and out.dtype == dtype
    assert_close(out, fused_moe_ref(h, w13, w2, weights, ids), dtype)


def test_fused_moe_subset_of_experts(device):
    # One FFN server's share: experts 1, 3, 4 of 8; pairs routed elsewhere contribute nothing,
    # and a negative id (no expert) is skipped too.
    h, w13, w2, weights, ids = _inputs(11, 8, 2, 32, 24, torch.float32, device, seed=1)
    ids[0, 1] = -1
    owned = [1, 3, 4]
    local_index = torch.full((8,), -1, dtype=torch.int64, device=device)
    local_index[owned] = torch.arange(3, device=device)
    out = fused_moe(h, w13[owned], w2[owned], weights, ids, local_index=local_index, config=SMALL)
    ref = fused_moe_ref(h, w13[owned], w2[owned], weights, ids, local_index=local_index)
    assert_close(out, ref, torch.float32)
    untouched = ~torch.isin(ids, torch.tensor(owned, device=device)).any(dim=1)
    assert torch.all(out[untouched] == 0)


def test_fused_moe_default_config(device):
    h, w13, w2, weights, ids = _inputs(20, 8, 2, 64, 32, torch.float32, device, seed=2)
    assert_close(fused_moe(h, w13, w2, weights, ids), fused_moe_ref(h, w13, w2, weights, ids),
                 torch.float32)


@pytest.mark.parametrize("align", [moe_align, moe_align_torch])
def test_moe_align_layout(align, device):
    ids = torch.tensor([[0, 2], [2, 3], [0, 2], [3, 1]], device=device)
    local_index = torch.tensor([0, -1, 1, 2], device=device)  # expert 1 lives elsewhere
    pairs, block_experts, used = align(ids, 3, 4, local_index)
    n = ids.numel()
    assert int(used) == 12 and pairs.numel() % 4 == 0
    local = local_index[ids.flatten()]
    for b, e in enumerate(block_experts.tolist()):
        run = pairs[b * 4 : (b + 1) * 4].tolist()
        if e < 0:
            assert b * 4 >= int(used) and all(p == n for p in run)
            continue
        assert all(p == n or int(local[p]) == e for p in run)
    served = sorted(p for p in pairs.tolist() if p < n)
    assert served == [i for i in range(n) if local[i] >= 0]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "block_m"), [
    (1, 8, 2, 16), (37, 6, 3, 16), (100, 64, 8, 16), (300, 16, 2, 64),
])
def test_moe_align_kernel_matches_torch_path(tokens, experts, top_k, block_m, device):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids = ids.to(device)
    ids[0, 0] = -1  # a pair with no expert
    for got, want in zip(moe_align(ids, experts, block_m), moe_align_torch(ids, experts, block_m)):
        assert torch.equal(got, want)
