import pytest
import torch

pytest.importorskip("triton")

from crosspool_kernels.router import router_topk, router_topk_ref


@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (60, 4), (64, 8), (128, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_router_topk_matches_reference(experts, top_k, renormalize, device):
    gen = torch.Generator().manual_seed(experts + top_k)
    logits = (torch.randn(5, experts, generator=gen) * 2).to(device)
    ids, weights = router_topk(logits, top_k, renormalize)
    ref_ids, ref_weights = router_topk_ref(logits, top_k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)  # random logits: no ties
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(5, device=device))


def test_router_topk_casts_weights_and_takes_low_precision_logits(device):
    logits = torch.randn(3, 16, device=device).to(torch.float16)
    ids, weights = router_topk(logits, 4, True, out_dtype=torch.float16)
    ref_ids, ref_weights = router_topk_ref(logits, 4, True, out_dtype=torch.float16)
    assert weights.dtype == torch.float16
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-3, atol=1e-3)
